//! NBD server (placeholder until the protocol module lands).

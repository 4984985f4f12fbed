//! Control plane (placeholder until the daemon lands).

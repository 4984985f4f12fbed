//! Frontends: protocol adapters in front of the engine.
//!
//! Owns: wire protocols (NBD, and ublk for kernel block devices) and the mapping of their requests
//! and errors onto [`crate::engine::View`] calls.
//!
//! Must never: decide anything about snapshots or copy-on-write, touch a
//! backend directly, or let one client's bad input disturb another client.

pub mod nbd;
pub mod ublk;

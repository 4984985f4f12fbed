//! Control plane: the daemon and the control socket.
//!
//! Owns: the control protocol's wire types ([`protocol`], JSON lines; people
//! read `docs/control-protocol.md`), the socket, its access check and the
//! dispatch of each request to the layer that does it ([`server`]), the ublk
//! driver the registry's devices run on ([`ublk`]), the same protocol over
//! mutual TLS for other machines ([`remote`]), and the daemon's life
//! cycle: startup, NBD listeners, signals, shutdown ([`daemon`]), and its
//! numbers for `snapblk top` and Prometheus ([`metrics`]). Seed 002's
//! out-of-band control connection is what it implements; the registry of
//! volumes it serves is [`crate::volumes`], beneath it.
//!
//! Must never: touch a volume's bytes or decide anything about snapshots
//! (that is the engine's), keep volume state of its own (the registry's),
//! speak NBD (the frontend's), be imported by any layer beneath it, or let
//! one client's bad request disturb another client or the daemon.

pub mod access;
pub mod daemon;
pub mod metrics;
pub mod protocol;
pub mod remote;
pub mod server;
pub mod ublk;

pub use daemon::{DaemonConfig, NbdAccess};
pub use protocol::{ControlError, ErrorCode, Request, Response};

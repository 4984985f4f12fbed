//! Control plane: the daemon, its registry of volumes and the control socket.
//!
//! Owns: which volumes exist and where they live ([`registry`]), which kernel
//! devices run for them and come back at restart ([`devices`], [`ublk`]), the control
//! protocol's wire types ([`protocol`], JSON lines; people read
//! `docs/control-protocol.md`), the socket and its access check ([`server`]),
//! and the daemon's life cycle: startup, NBD listeners, signals, shutdown
//! ([`daemon`]). Seed 002's out-of-band control connection and "registry
//! rebuilt on restart" are what it implements.
//!
//! Must never: touch a volume's bytes or decide anything about snapshots
//! (that is the engine's), speak NBD (the frontend's), or let one client's
//! bad request disturb another client or the daemon.

pub mod daemon;
pub mod devices;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod ublk;

pub use daemon::{DaemonConfig, NbdAccess};
pub use protocol::{ControlError, ErrorCode, Request, Response};
pub use registry::Registry;

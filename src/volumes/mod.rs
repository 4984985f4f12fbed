//! The registry of volumes: which volumes exist and where they live
//! ([`registry`]), which kernel devices run for them and come back at
//! restart ([`devices`]), consistency groups and their snapshots
//! ([`groups`]), owners and access lists ([`access`]), space quotas
//! ([`quota`]), restore claims, and the JSON that describes them.
//! Seed 002's "registry rebuilt on restart" is what it implements.
//!
//! It sits beneath everything that works on whole volumes (copy jobs,
//! replication, schedules) and above the engine; its
//! errors are its own ([`VolumeError`]), which `control` turns into the
//! control protocol's.
//!
//! Must never: import `control` (the socket, the protocol and the daemon's
//! life cycle live there, above this), touch a volume's bytes or decide
//! anything about snapshots (that is the engine's), or speak NBD or ublk
//! itself (devices run through the [`devices::Driver`] the daemon hands in).

pub mod access;
pub mod devices;
pub mod error;
pub mod flatten;
pub mod groups;
pub mod json_file;
pub mod quota;
pub mod registry;

pub use error::{ErrorKind, VolumeError};
pub use registry::{validate_name, CephPlacement, Registry, RestoreClaim, Slot};

//! snapblk: a userspace block device daemon with snapshots, live copy and
//! replication inline in its I/O path.
//!
//! Layers, top to bottom (data flows down, never back up):
//! - [`control`]: the daemon, the control socket and its protocol;
//! - [`frontend`]: NBD (and, next, ublk) adapters that turn requests into engine calls;
//! - [`schedule`] and [`quiesce`]: snapshots on a schedule, with retention,
//!   and application hooks and filesystem freeze with a timer around a snapshot;
//! - [`copy`] and [`replication`]: live copy jobs, and mirrors of volumes on
//!   other daemons (links, replicas);
//! - [`volumes`]: the registry of volumes and their devices, beneath
//!   everything that works on whole volumes;
//! - [`engine`]: volumes, partitions, snapshots, copy-on-write, journals, recovery;
//! - [`backend`]: files, block devices and the fault-injecting memory disk;
//! - [`runtime`]: the per-thread io_uring executor everything above runs on;
//! - [`security`]: who may connect (local peers' credentials) and which
//!   files must stay private, shared by every door into the daemon.

pub mod backend;
pub mod cli;
pub mod control;
pub mod copy;
pub mod engine;
pub mod frontend;
pub mod quiesce;
pub mod replication;
pub mod runtime;
pub mod schedule;
pub mod security;
pub mod volumes;

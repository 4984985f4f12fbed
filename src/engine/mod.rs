//! The volume engine: snapshots and copy-on-write inline in the I/O path.
//!
//! Owns: volumes (origin + partitions), generations, snapshots, the decision
//! whether a write must first preserve a chunk, each partition's journal and
//! change-log store, recovery after a crash, and the on-disk formats of all of
//! them. Seed 004 (partition snapshots tied by an overall snapshot, change
//! logs per partition) and seeds 000/001 (snapshot map + snapshot data) are
//! what it implements; DESIGN.md's "one preserved copy for many snapshots"
//! sketch is the scheme.
//!
//! Must never: know about ublk, NBD or the control socket; block a thread in
//! the I/O path (all I/O goes through [`crate::runtime`] or the in-memory
//! backend); acknowledge a FLUSH/FUA before the data and metadata it covers
//! are durable; let an origin overwrite reach storage before the preserved
//! copy it depends on and its journal record are durable.

mod budget;
mod error;
mod gate;
mod gather;
mod hooks;
mod journal;
mod layer;
mod manifest;
mod partition;
mod stats;
mod volume;
mod writeback;

pub use budget::SpaceBudget;
pub use error::{EngineError, Result};
pub use hooks::{Change, WriteGuard, WriteHook};
pub use manifest::{AccessRecord, AclEntry, CacheMode, Level, Principal, CONTAINER, MANIFEST};
pub use stats::{IoStatsSnapshot, KindSnapshot, LATENCY_BOUNDS_US};
pub use volume::{
    now_unix_ms, FlattenProgress, Reverted, SnapshotConsumer, SnapshotCreated, SnapshotInfo, View,
    Volume, VolumeConfig, VolumeInfo,
};
pub use writeback::WriteBackConfig;

/// The engine's addressing granularity.
pub const SECTOR_SIZE: u64 = 512;
/// Default chunk (copy-on-write unit); see README "Choosing the chunk size".
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;
pub const DEFAULT_PARTITIONS: u32 = 4;
pub const MAX_PARTITIONS: u32 = 256;

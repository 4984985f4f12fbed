//! Volumes and their views: the engine's public face.

use super::error::{EngineError, Result};
use crate::backend::{Extent, Storage};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// Parameters of `volume create`.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    pub size: u64,
    pub chunk_size: u32,
    pub partitions: u32,
    /// An existing file or block device to use as the origin instead of a
    /// new sparse container file.
    pub backing: Option<PathBuf>,
}

/// What `volume info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub capacity: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub chunk_size: u32,
    pub partitions: u32,
    pub generation: u64,
    pub snapshots: usize,
    pub origin: String,
}

/// What `snapshot list` reports for one snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub generation: u64,
    pub created_unix_ms: u64,
    /// Preserved bytes no other snapshot needs: what deleting it frees.
    pub exclusive_bytes: u64,
}

/// Result of `create_snapshot`: the snapshot and how long writes were paused.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotCreated {
    #[serde(flatten)]
    pub snapshot: SnapshotInfo,
    pub stall_us: u64,
}

pub struct Volume {}

/// A handle to read (and, for the live volume, write) one image: the volume
/// itself or one of its snapshots. Cheap to clone; one per connection/queue.
#[derive(Clone)]
pub struct View {
    volume: Arc<Volume>,
}

impl Volume {
    pub async fn create(_name: &str, _storage: Storage, _config: &VolumeConfig) -> Result<Arc<Volume>> {
        todo!()
    }
    pub async fn open(_name: &str, _storage: Storage) -> Result<Arc<Volume>> {
        todo!()
    }
    pub fn name(&self) -> &str {
        todo!()
    }
    pub fn size(&self) -> u64 {
        todo!()
    }
    pub fn chunk_size(&self) -> u32 {
        todo!()
    }
    pub fn info(&self) -> Result<VolumeInfo> {
        todo!()
    }
    pub fn live(self: &Arc<Self>) -> View {
        View { volume: self.clone() }
    }
    pub fn snapshot_view(self: &Arc<Self>, _snapshot: &str) -> Result<View> {
        todo!()
    }
    pub async fn create_snapshot(&self, _name: &str) -> Result<SnapshotCreated> {
        todo!()
    }
    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        todo!()
    }
    pub async fn delete_snapshot(&self, _name: &str) -> Result<()> {
        todo!()
    }
    pub async fn shutdown(&self) -> Result<()> {
        todo!()
    }
}

impl View {
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }
    pub fn snapshot_name(&self) -> Option<&str> {
        todo!()
    }
    pub fn size(&self) -> u64 {
        todo!()
    }
    pub fn read_only(&self) -> bool {
        todo!()
    }
    pub async fn read(&self, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        todo!()
    }
    pub async fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<()> {
        todo!()
    }
    pub async fn flush(&self) -> Result<()> {
        todo!()
    }
    pub async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        todo!()
    }
    pub async fn write_zeroes(&self, _offset: u64, _len: u64, _keep_allocated: bool) -> Result<()> {
        todo!()
    }
    pub fn block_status(&self, _offset: u64, _len: u64) -> Result<Vec<Extent>> {
        let _ = EngineError::ReadOnly;
        todo!()
    }
}

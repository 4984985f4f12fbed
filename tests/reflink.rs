//! Preservation by cloning: on a file system that shares blocks (XFS with
//! reflink), a chunk's first overwrite after a snapshot gives the
//! change-log store the origin's blocks instead of a copy; the snapshot
//! reads its point-in-time data, before and after a restart (whose replay
//! checks each slot's crc). Where blocks cannot be shared, the same writes
//! copy, with the same result (and every other test on ext4 takes that
//! path).
//!
//! The XFS test mounts a loop image, so it needs root and a kernel with
//! XFS and loop devices (CI has both); without them it prints SKIP.

mod common;

use common::mount_xfs;
use snapblk::backend::memory::MemDisk;
use snapblk::backend::Storage;
use snapblk::engine::{CacheMode, Volume, VolumeConfig, WriteBackConfig};
use snapblk::runtime::block_on;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 64;

fn config(cache: CacheMode) -> VolumeConfig {
    VolumeConfig {
        size: (CHUNK * CHUNKS) as u64,
        chunk_size: CHUNK as u32,
        partitions: 2,
        backing: None,
        cache,
    }
}

fn writeback() -> WriteBackConfig {
    WriteBackConfig {
        limit_bytes: 1 << 20,
        commit_delay: Duration::ZERO,
        background: false,
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..CHUNK * CHUNKS)
        .map(|i| (i / 512) as u8 ^ seed.wrapping_mul(31))
        .collect()
}

/// Fills the volume, takes snapshot "s", overwrites 4 KiB in every chunk
/// and flushes; returns the volume.
async fn overwrite_after_snapshot(storage: Storage, cache: CacheMode) -> Arc<Volume> {
    let volume = Volume::create_with("v", storage, &config(cache), writeback())
        .await
        .unwrap();
    let live = volume.live();
    live.write(0, &pattern(1), false).await.unwrap();
    volume.create_snapshot("s").await.unwrap();
    for c in 0..CHUNKS {
        live.write((c * CHUNK + 8192) as u64, &[0xee; 4096], false)
            .await
            .unwrap();
    }
    live.flush().await.unwrap();
    volume
}

/// The snapshot reads the original data; the live volume the overwrites.
async fn check(volume: &Arc<Volume>) {
    let mut snap = vec![0u8; CHUNK * CHUNKS];
    let view = volume.snapshot_view("s").unwrap();
    view.read(0, &mut snap).await.unwrap();
    assert!(snap == pattern(1), "snapshot s does not read its data");
    let mut live = vec![0u8; CHUNK * CHUNKS];
    volume.live().read(0, &mut live).await.unwrap();
    let mut want = pattern(1);
    for c in 0..CHUNKS {
        want[c * CHUNK + 8192..c * CHUNK + 12288].fill(0xee);
    }
    assert!(live == want, "the live volume does not read its writes");
}

#[test]
fn a_disk_that_shares_blocks_preserves_by_clone() {
    for reflink in [true, false] {
        let disk = MemDisk::new();
        disk.set_reflink(reflink);
        block_on(async {
            let volume =
                overwrite_after_snapshot(Storage::Memory(disk.clone()), CacheMode::Writeback).await;
            let cloned = volume.info().unwrap().cloned_chunks;
            assert_eq!(cloned, if reflink { CHUNKS as u64 } else { 0 });
            check(&volume).await;
        });
    }
}

/// Whether `filefrag` reports any extent of `path` as shared.
fn has_shared_extents(path: &Path) -> bool {
    let out = Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("shared")
}

#[test]
fn xfs_with_reflink_preserves_by_clone_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let test = "xfs_with_reflink_preserves_by_clone_and_survives_a_restart";
    let Some(_mount) = mount_xfs(test, &tmp.path().join("xfs.img"), &mnt) else {
        return;
    };
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let dir = mnt.join(format!("{cache:?}"));
        std::fs::create_dir(&dir).unwrap();
        block_on(async {
            let volume = overwrite_after_snapshot(Storage::Dir(dir.clone()), cache).await;
            assert_eq!(volume.info().unwrap().cloned_chunks, CHUNKS as u64);
            check(&volume).await;
        });
        let stores: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".store"))
            .collect();
        assert!(!stores.is_empty(), "no store files in {dir:?}");
        assert!(
            stores.iter().any(|s| has_shared_extents(s)),
            "no store file shares blocks with the origin: {stores:?}"
        );
        // A restart replays the journal and checks each slot's crc.
        block_on(async {
            let volume = Volume::open_with("v", Storage::Dir(dir.clone()), writeback())
                .await
                .unwrap();
            check(&volume).await;
        });
    }
}

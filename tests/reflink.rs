//! Preservation by cloning: on a file system that shares blocks (XFS with
//! reflink), a long sequential overwrite after a snapshot gives the
//! change-log store the origin's blocks instead of a copy (one data write
//! per byte instead of two), while short writes keep copying. Either way
//! the snapshot reads its point-in-time data, before and after a restart
//! (whose replay checks each slot's crc). Where blocks cannot be shared,
//! the same writes copy with the same result (every other test on ext4
//! takes that path; the crash tests run half their seeds on a memory disk
//! that shares blocks).
//!
//! The XFS test mounts a loop image, so it needs root and a kernel with
//! XFS and loop devices (CI has both); without them it prints SKIP (and
//! fails under `SNAPBLK_TESTS_STRICT=1`, as `scripts/test` runs it).

mod common;

use snapblk::backend::memory::MemDisk;
use snapblk::backend::Storage;
use snapblk::engine::{CacheMode, Volume, VolumeConfig, WriteBackConfig};
use snapblk::runtime::block_on;
use std::sync::Arc;
use std::time::Duration;

const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 64;
/// Chunks of the volume's first half, overwritten by 1 MiB writes (runs of
/// 16 chunks: cloned); the second half gets one 4 KiB write per chunk
/// (copied).
const LONG: usize = CHUNKS / 2;

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

/// What the live volume holds after [`overwrite_after_snapshot`].
fn overwritten() -> Vec<u8> {
    let mut want = pattern(1);
    want[..LONG * CHUNK].copy_from_slice(&pattern(2)[..LONG * CHUNK]);
    for c in LONG..CHUNKS {
        want[c * CHUNK + 8192..c * CHUNK + 12288].fill(0xee);
    }
    want
}

/// Fills the volume, takes snapshot "s", overwrites the first half with
/// 1 MiB writes and 4 KiB in every chunk of the second half, and flushes.
async fn overwrite_after_snapshot(storage: Storage, cache: CacheMode) -> Arc<Volume> {
    let volume = Volume::create_with("v", storage, &config(cache), writeback())
        .await
        .unwrap();
    let live = volume.live();
    live.write(0, &pattern(1), false).await.unwrap();
    live.flush().await.unwrap();
    volume.create_snapshot("s").await.unwrap();
    let new = pattern(2);
    for at in (0..LONG * CHUNK).step_by(1 << 20) {
        live.write(at as u64, &new[at..at + (1 << 20)], false)
            .await
            .unwrap();
    }
    for c in LONG..CHUNKS {
        live.write((c * CHUNK + 8192) as u64, &[0xee; 4096], false)
            .await
            .unwrap();
    }
    live.flush().await.unwrap();
    volume
}

/// The snapshot reads the original data; the live volume the overwrites.
async fn check(volume: &Arc<Volume>, ctx: &str) {
    let mut snap = vec![0u8; CHUNK * CHUNKS];
    let view = volume.snapshot_view("s").unwrap();
    view.read(0, &mut snap).await.unwrap();
    assert!(
        snap == pattern(1),
        "{ctx}: snapshot s does not read its data"
    );
    let mut live = vec![0u8; CHUNK * CHUNKS];
    volume.live().read(0, &mut live).await.unwrap();
    assert!(
        live == overwritten(),
        "{ctx}: the live volume does not read its writes"
    );
}

/// Runs [`overwrite_after_snapshot`] on `storage`, checks how many chunks
/// were preserved and cloned and what the volume reads, then reopens it (a
/// replay that checks each slot's crc) and checks again.
fn overwrite_check_and_reopen(storage: Storage, cache: CacheMode, cloned: u64, ctx: &str) {
    block_on(async {
        let volume = overwrite_after_snapshot(storage.clone(), cache).await;
        let info = volume.info().unwrap();
        assert_eq!(info.preserved_chunks, CHUNKS as u64, "{ctx}");
        assert_eq!(info.cloned_chunks, cloned, "{ctx}");
        check(&volume, ctx).await;
    });
    block_on(async {
        let volume = Volume::open_with("v", storage, writeback()).await.unwrap();
        check(&volume, &format!("{ctx}, reopened")).await;
    });
}

#[test]
fn long_overwrites_clone_on_a_disk_that_shares_blocks_and_short_ones_copy() {
    for reflink in [true, false] {
        let disk = MemDisk::new();
        disk.set_reflink(reflink);
        let ctx = format!("reflink {reflink}");
        let cloned = if reflink { LONG as u64 } else { 0 };
        overwrite_check_and_reopen(Storage::Memory(disk), CacheMode::Writeback, cloned, &ctx);
    }
}

#[test]
fn xfs_with_reflink_preserves_long_overwrites_by_clone_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let Some(_xfs) = common::mount_xfs(
        "xfs_with_reflink_preserves_long_overwrites_by_clone_and_survives_a_restart",
        &dir.path().join("xfs.img"),
        &mnt,
    ) else {
        return;
    };
    for cache in [
        CacheMode::Writearound,
        CacheMode::None,
        CacheMode::Writeback,
    ] {
        let dir = mnt.join(format!("{cache:?}"));
        std::fs::create_dir(&dir).unwrap();
        let ctx = format!("XFS, cache {cache:?}");
        overwrite_check_and_reopen(Storage::Dir(dir), cache, LONG as u64, &ctx);
    }
}

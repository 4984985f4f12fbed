//! The change-log store grows ahead of its slots (so ext4 takes its
//! preservation writes under the shared inode lock, as overwrites inside the
//! file's size), without counting the reserve as held by snapshots, giving it
//! back at the next open, and without a power cut at any point costing a
//! snapshot its data.

use snapblk::backend::memory::{MemDisk, SplitMix};
use snapblk::backend::Storage;
use snapblk::engine::{CacheMode, Volume, VolumeConfig, WriteBackConfig};
use snapblk::runtime::block_on;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

const CHUNK: u64 = 64 << 10;
/// What one growth adds past the slot that triggered it (16 MiB of 64 KiB slots).
const STEP: u64 = 16 << 20;

fn config(size: u64, partitions: u32) -> VolumeConfig {
    VolumeConfig {
        size,
        chunk_size: CHUNK as u32,
        partitions,
        backing: None,
        cache: CacheMode::None,
    }
}

fn pattern(tag: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i / 4096) as u8 ^ 0x5a).collect()
}

async fn read(volume: &Arc<Volume>, snapshot: Option<&str>, len: u64) -> Vec<u8> {
    let view = match snapshot {
        Some(name) => volume.snapshot_view(name).unwrap(),
        None => volume.live(),
    };
    let mut buf = vec![0u8; len as usize];
    view.read(0, &mut buf).await.unwrap();
    buf
}

/// Fills the volume with pattern 1, flushes it and takes snapshot `s` of
/// it; returns the content.
async fn filled_and_snapshotted(volume: &Arc<Volume>) -> Vec<u8> {
    let old = pattern(1, volume.size());
    volume.live().write(0, &old, false).await.unwrap();
    volume.live().flush().await.unwrap();
    volume.create_snapshot("s").await.unwrap();
    old
}

/// What a file system may count in a file's blocks beyond its data: ext4
/// adds an extent tree block once the file's extents no longer fit in its
/// inode, and how many extents the store ends with depends on how its
/// grow-ahead and its preservation writes interleaved.
const FS_METADATA_SLACK: u64 = 16 << 10;

/// Asserts that the volume's snapshots hold `bytes` of its change log (the
/// store's allocated blocks less its reserve), give or take the file
/// system's own metadata.
fn assert_snapshots_hold(volume: &Volume, bytes: u64) {
    let held = volume.snapshot_bytes();
    assert!(
        (bytes..=bytes + FS_METADATA_SLACK).contains(&held),
        "snapshots hold {held} bytes, want {bytes} (plus at most {FS_METADATA_SLACK} of file \
         system metadata)"
    );
}

/// (size, allocated bytes) of the store file.
fn store_file(dir: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(dir.join("part-000.store")).unwrap();
    (meta.len(), meta.blocks() * 512)
}

#[test]
fn the_store_grows_ahead_allocated_and_the_reserve_is_not_held_by_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::Dir(dir.path().to_path_buf());
    let size = 32 << 20;
    let chunks = size / CHUNK;
    block_on(async {
        let volume = Volume::create("v", storage.clone(), &config(size, 1))
            .await
            .unwrap();
        let old = filled_and_snapshotted(&volume).await;

        // Ten chunks preserved: the store holds a step of allocated slots
        // past them, none of it counted as held by the snapshot.
        let new = pattern(2, size);
        volume
            .live()
            .write(0, &new[..(10 * CHUNK) as usize], false)
            .await
            .unwrap();
        volume.live().flush().await.unwrap();
        let (len, allocated) = store_file(dir.path());
        assert!(
            len >= 10 * CHUNK + STEP,
            "store of {len} bytes did not grow ahead"
        );
        assert!(
            allocated >= len,
            "only {allocated} of the store's {len} bytes are allocated"
        );
        assert_snapshots_hold(&volume, 10 * CHUNK);
        let info = volume.info().unwrap();
        assert!(
            info.used_bytes >= volume.quota_bytes() + STEP,
            "used bytes {} leave out the reserve",
            info.used_bytes
        );

        // Every chunk preserved: slots past the first reserve, so it grew again.
        volume.live().write(0, &new, false).await.unwrap();
        volume.live().flush().await.unwrap();
        let (len, _) = store_file(dir.path());
        assert!(
            len >= chunks * CHUNK + STEP / 2,
            "store of {len} bytes did not grow again"
        );
        assert_snapshots_hold(&volume, chunks * CHUNK);
        assert!(read(&volume, Some("s"), size).await == old);
        assert!(read(&volume, None, size).await == new);
        volume.shutdown().await.unwrap();
        drop(volume);

        // The next open cuts the reserve off; the data stays.
        let volume = Volume::open("v", storage.clone()).await.unwrap();
        assert_eq!(store_file(dir.path()).0, chunks * CHUNK);
        assert_snapshots_hold(&volume, chunks * CHUNK);
        assert!(read(&volume, Some("s"), size).await == old);
        assert!(read(&volume, None, size).await == new);
        volume.delete_snapshot("s").await.unwrap();
        assert_eq!(volume.snapshot_bytes(), 0);
        volume.shutdown().await.unwrap();
    });
}

/// Data extents of the store file, as (start, end) byte ranges, from
/// SEEK_DATA/SEEK_HOLE.
fn store_extents(dir: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(dir.join("part-000.store")).unwrap();
    let len = file.metadata().unwrap().len() as i64;
    let seek = |at: i64, whence: i32| {
        // SAFETY: a plain lseek on a descriptor this function owns.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        if r < 0 {
            len
        } else {
            r
        }
    };
    let mut extents = Vec::new();
    let mut at = 0;
    while at < len {
        let start = seek(at, libc::SEEK_DATA);
        if start >= len {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE);
        extents.push((start as u64, end as u64));
        at = end;
    }
    extents
}

/// A deleted snapshot's slots are punched (its space goes back at once) and
/// the next preservations take them lowest first, so a batch of them is one
/// sequential run at the start of the store, not scattered over it in the
/// order the chunk map happened to free them.
#[test]
fn freed_slots_are_reused_lowest_first_in_runs() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::Dir(dir.path().to_path_buf());
    let size = 8 << 20;
    let chunks = size / CHUNK;
    block_on(async {
        let volume = Volume::create("v", storage.clone(), &config(size, 1))
            .await
            .unwrap();
        filled_and_snapshotted(&volume).await;
        // Every chunk preserved, in a shuffled order of writes.
        let new = pattern(2, size);
        for i in 0..chunks {
            let c = (i * 37) % chunks;
            let range = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
            volume
                .live()
                .write(c * CHUNK, &new[range], false)
                .await
                .unwrap();
        }
        volume.live().flush().await.unwrap();
        volume.delete_snapshot("s").await.unwrap();
        let used = chunks * CHUNK;
        assert!(
            store_extents(dir.path())
                .iter()
                .all(|&(start, _)| start >= used),
            "the deleted snapshot's slots were not all punched: {:?}",
            store_extents(dir.path())
        );

        // A quarter of the volume overwritten after a new snapshot, chunks
        // in reverse order: their slots are the first quarter of the store.
        volume.create_snapshot("t").await.unwrap();
        let newer = pattern(3, size);
        for c in (0..chunks / 4).rev() {
            let range = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
            volume
                .live()
                .write(c * CHUNK, &newer[range], false)
                .await
                .unwrap();
        }
        volume.live().flush().await.unwrap();
        let extents = store_extents(dir.path());
        assert_eq!(
            extents.first(),
            Some(&(0, used / 4)),
            "reused slots are not the lowest ones: store extents {extents:?}"
        );
        assert!(
            extents[1..].iter().all(|&(start, _)| start >= used),
            "reused slots scattered over the store: {extents:?}"
        );
        assert!(read(&volume, Some("t"), size).await == new);
        let mut expected = new.clone();
        expected[..(used / 4) as usize].copy_from_slice(&newer[..(used / 4) as usize]);
        assert!(read(&volume, None, size).await == expected);
        volume.shutdown().await.unwrap();
    });
}

/// No background committer: a seed replays the same operations, so its
/// power cut falls at the same point every run.
fn writeback() -> WriteBackConfig {
    WriteBackConfig {
        limit_bytes: 1 << 20,
        commit_delay: std::time::Duration::ZERO,
        background: false,
    }
}

#[test]
fn power_cuts_around_store_growth_lose_no_snapshot_data() {
    let size = 2 << 20;
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let base: u64 = env("CRASH_SEED").unwrap_or(0x5eed);
    for seed in base..base.wrapping_add(env("CRASH_CASES").unwrap_or(200)) {
        block_on(async {
            let disk = MemDisk::new();
            let storage = Storage::Memory(disk.clone());
            let volume = Volume::create_with("v", storage.clone(), &config(size, 2), writeback())
                .await
                .unwrap();
            let old = filled_and_snapshotted(&volume).await;
            // Writes of a few chunks each, some flushed: each preserves
            // chunks, and the first of each partition grows its store.
            let mut rng = SplitMix(seed);
            let mut flushed = old.clone();
            // Writes since the last flush: a sector may hold any of them.
            let mut unflushed: Vec<(usize, Vec<u8>)> = Vec::new();
            for round in 0..4u8 {
                let chunk = rng.below(size / CHUNK - 3);
                let len = (1 + rng.below(3)) * CHUNK;
                let at = (chunk * CHUNK) as usize;
                let data = pattern(10 + round, len);
                volume.live().write(at as u64, &data, false).await.unwrap();
                unflushed.push((at, data));
                if rng.below(2) == 0 {
                    volume.live().flush().await.unwrap();
                    for (at, data) in unflushed.drain(..) {
                        flushed[at..at + data.len()].copy_from_slice(&data);
                    }
                }
            }
            let after = disk.power_cut(&mut rng);
            drop(volume);
            let storage = Storage::Memory(after.clone());
            let volume = Volume::open_with("v", storage, writeback()).await.unwrap();
            assert!(
                read(&volume, Some("s"), size).await == old,
                "seed {seed}: the snapshot lost data"
            );
            let live = read(&volume, None, size).await;
            for (i, c) in live.chunks(512).enumerate() {
                let at = i * 512;
                let legal = c == &flushed[at..at + 512]
                    || unflushed.iter().any(|(w, data)| {
                        (*w..*w + data.len()).contains(&at) && c == &data[at - w..at - w + 512]
                    });
                assert!(
                    legal,
                    "seed {seed}: sector {i} holds data never written there since the last flush"
                );
            }
            // The reopen cut each store back to the slots its records use.
            for p in 0..2 {
                let len = after.file_len(&format!("part-{p:03}.store")).unwrap() as u64;
                assert!(
                    len.is_multiple_of(CHUNK) && len <= 12 * CHUNK,
                    "seed {seed}: store {p} holds {len} bytes"
                );
            }
        });
    }
}

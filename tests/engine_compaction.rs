//! Online journal compaction on real files while writer threads keep
//! committing preserved versions.
//!
//! A snapshot taken before the load and one taken during it live through
//! hundreds of snapshot create/delete cycles, each of which preserves chunks
//! under the writers and may compact the journals while their commits are in
//! flight or queued. Every image must stay exact, before and after a reopen
//! that replays the compacted journals.

use snapblk::backend::Storage;
use snapblk::engine::{CacheMode, Volume, VolumeConfig};
use snapblk::runtime::block_on;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod engine_load;
use engine_load::{assert_between, block_bytes, start_writers, versions, Progress, BLOCK, BLOCKS};

const PARTITIONS: u32 = 3;
const WRITER_THREADS: usize = 2;
const TASKS_PER_THREAD: usize = 4;
const CYCLES: usize = 60;

/// Compares block versions, naming the first block that differs.
fn same(got: &[u64], expected: &[u64], what: &str) {
    if let Some(b) = (0..BLOCKS).find(|&b| got[b] != expected[b]) {
        panic!(
            "{what}: block {b} holds version {}, expected {}",
            got[b], expected[b]
        );
    }
}

fn journal_lens(dir: &Path) -> Vec<u64> {
    (0..PARTITIONS)
        .map(|p| {
            let path = dir.join(format!("part-{p:03}.journal"));
            std::fs::metadata(path).unwrap().len()
        })
        .collect()
}

#[test]
fn compaction_under_concurrent_writes_keeps_every_snapshot_exact() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::Dir(dir.path().to_path_buf());
    let config = VolumeConfig {
        size: (BLOCK * BLOCKS) as u64,
        chunk_size: 16 * 1024,
        partitions: PARTITIONS,
        backing: None,
        cache: CacheMode::Writeback,
    };
    let volume = block_on(Volume::create("v", storage.clone(), &config)).unwrap();
    let fill: Vec<u8> = (0..BLOCKS).flat_map(|b| block_bytes(b, 1)).collect();
    block_on(volume.live().write(0, &fill, false)).unwrap();
    block_on(volume.create_snapshot("before")).unwrap();
    // Every block holds version 1 now.
    let progress = Progress::starting_at(1);
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&volume, &progress, &stop, WRITER_THREADS, TASKS_PER_THREAD);

    let mut during = None;
    let mut shrinks = 0;
    let mut lens = journal_lens(dir.path());
    for cycle in 0..CYCLES {
        if cycle == CYCLES / 2 {
            let low = Progress::snapshot(&progress.acked);
            block_on(volume.create_snapshot("during")).unwrap();
            during = Some((low, Progress::snapshot(&progress.started)));
        }
        let name = format!("churn-{cycle}");
        block_on(volume.create_snapshot(&name)).unwrap();
        block_on(volume.delete_snapshot(&name)).unwrap();
        let now = journal_lens(dir.path());
        shrinks += now.iter().zip(&lens).filter(|(n, l)| n < l).count();
        lens = now;
    }
    stop.store(true, Ordering::SeqCst);
    writers.into_iter().for_each(|w| w.join().unwrap());
    assert!(
        shrinks >= 5,
        "journals compacted only {shrinks} times: the test proves nothing"
    );

    let (low, high) = during.unwrap();
    let during = versions(&volume, Some("during"));
    assert_between("snapshot during", &during, &low, &high);
    let acked = Progress::snapshot(&progress.acked);
    let check = |volume: &Arc<Volume>, when: &str| {
        let before = vec![1; BLOCKS];
        for (image, expected) in [("before", &before), ("during", &during)] {
            same(
                &versions(volume, Some(image)),
                expected,
                &format!("{when}: {image}"),
            );
        }
        same(
            &versions(volume, None),
            &acked,
            &format!("{when}: live volume"),
        );
    };
    check(&volume, "under load");
    block_on(volume.shutdown()).unwrap();
    drop(volume);
    let volume = block_on(Volume::open("v", storage)).unwrap();
    check(&volume, "after reopen");
}

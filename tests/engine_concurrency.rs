//! Snapshots under concurrent load on a real file-backed volume.
//!
//! Writer threads (each its own io_uring and many tasks) overwrite 4 KiB
//! blocks that share chunks, so writers race on the same chunk's
//! preservation; snapshots are taken meanwhile, and reader threads read the
//! snapshots while writes go on. Each snapshot must hold, for every block, one
//! whole version no older than the last write acknowledged before the
//! snapshot was requested and no newer than the last write started before it
//! returned; reads taken during the load must equal the same snapshot read
//! when all is quiet.

use snapblk::backend::Storage;
use snapblk::engine::{CacheMode, Volume, VolumeConfig};
use snapblk::runtime::{block_on, spawn};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const BLOCK: usize = 4096;
const BLOCKS: usize = 1024;
const WRITER_THREADS: usize = 2;
const TASKS_PER_THREAD: usize = 16;
const SNAPSHOTS: usize = 12;

fn block_bytes(block: usize, version: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    if version > 0 {
        for (i, word) in data.chunks_mut(8).enumerate() {
            word.copy_from_slice(
                &((block as u64) << 40 | version << 8 | (i as u64 & 0xff)).to_le_bytes(),
            );
        }
    }
    data
}

fn version_of(block: usize, data: &[u8]) -> u64 {
    if data.iter().all(|&b| b == 0) {
        return 0;
    }
    let word = u64::from_le_bytes(data[..8].try_into().unwrap());
    let version = (word >> 8) & ((1 << 32) - 1);
    assert_eq!(
        data,
        &block_bytes(block, version)[..],
        "block {block} is torn or foreign"
    );
    version
}

/// A snapshot's name and the block versions one read of it saw.
type SnapshotRead = (String, Vec<u64>);

struct Progress {
    started: Vec<AtomicU64>,
    acked: Vec<AtomicU64>,
}

fn snapshot_versions(volume: &Arc<Volume>, name: &str) -> Vec<u64> {
    let view = volume.snapshot_view(name).unwrap();
    let mut buf = vec![0u8; BLOCK * BLOCKS];
    block_on(view.read(0, &mut buf)).unwrap();
    buf.chunks(BLOCK)
        .enumerate()
        .map(|(b, d)| version_of(b, d))
        .collect()
}

#[test]
fn snapshots_are_point_in_time_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let config = VolumeConfig {
        size: (BLOCK * BLOCKS) as u64,
        chunk_size: 16 * 1024,
        partitions: 3,
        backing: None,
        cache: CacheMode::Writeback,
    };
    let volume = block_on(Volume::create(
        "v",
        Storage::Dir(dir.path().to_path_buf()),
        &config,
    ))
    .unwrap();
    let progress = Arc::new(Progress {
        started: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
        acked: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
    });
    let stop = Arc::new(AtomicBool::new(false));

    let writers: Vec<_> = (0..WRITER_THREADS)
        .map(|t| {
            let (volume, progress, stop) = (volume.clone(), progress.clone(), stop.clone());
            std::thread::spawn(move || {
                block_on(async move {
                    let (done_tx, mut done_rx) = futures::channel::mpsc::unbounded::<()>();
                    for task in 0..TASKS_PER_THREAD {
                        let (view, progress, stop, done) = (
                            volume.live(),
                            progress.clone(),
                            stop.clone(),
                            done_tx.clone(),
                        );
                        // Each task owns the blocks congruent to its id: one
                        // write in flight per block, many per chunk.
                        let id = t * TASKS_PER_THREAD + task;
                        spawn(async move {
                            let mut rng = id as u64 * 7919 + 1;
                            while !stop.load(Ordering::Relaxed) {
                                rng = rng
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407);
                                let n = (BLOCKS / (WRITER_THREADS * TASKS_PER_THREAD)) as u64;
                                let block =
                                    ((rng >> 33) % n) as usize * WRITER_THREADS * TASKS_PER_THREAD
                                        + id;
                                let version = progress.started[block].load(Ordering::SeqCst) + 1;
                                progress.started[block].store(version, Ordering::SeqCst);
                                view.write(
                                    (block * BLOCK) as u64,
                                    &block_bytes(block, version),
                                    false,
                                )
                                .await
                                .unwrap();
                                progress.acked[block].store(version, Ordering::SeqCst);
                            }
                            drop(done);
                        });
                    }
                    drop(done_tx);
                    use futures::StreamExt;
                    while done_rx.next().await.is_some() {}
                })
            })
        })
        .collect();

    // Readers re-read every snapshot that exists while writes go on.
    let reads_during_load: Arc<std::sync::Mutex<Vec<SnapshotRead>>> = Default::default();
    let reader = {
        let (volume, stop, reads) = (volume.clone(), stop.clone(), reads_during_load.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for s in volume.list_snapshots() {
                    let versions = snapshot_versions(&volume, &s.name);
                    reads.lock().unwrap().push((s.name, versions));
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };

    let mut bounds = Vec::new();
    for i in 0..SNAPSHOTS {
        std::thread::sleep(std::time::Duration::from_millis(40));
        let low: Vec<u64> = progress
            .acked
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        let name = format!("s{i}");
        block_on(volume.create_snapshot(&name)).unwrap();
        let high: Vec<u64> = progress
            .started
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        bounds.push((name, low, high));
    }
    std::thread::sleep(std::time::Duration::from_millis(40));
    stop.store(true, Ordering::SeqCst);
    writers.into_iter().for_each(|w| w.join().unwrap());
    reader.join().unwrap();

    let total_writes: u64 = progress
        .acked
        .iter()
        .map(|a| a.load(Ordering::SeqCst))
        .sum();
    assert!(
        total_writes > 1000,
        "the load was too light to prove anything ({total_writes} writes)"
    );
    for (name, low, high) in &bounds {
        let versions = snapshot_versions(&volume, name);
        for b in 0..BLOCKS {
            assert!(
                low[b] <= versions[b] && versions[b] <= high[b],
                "snapshot {name} block {b}: version {} outside [{}, {}]",
                versions[b],
                low[b],
                high[b]
            );
        }
        for (_, during) in reads_during_load
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
        {
            assert_eq!(
                during, &versions,
                "snapshot {name} read differently under load"
            );
        }
    }
    // The live volume holds the last acknowledged write of every block.
    let mut buf = vec![0u8; BLOCK * BLOCKS];
    block_on(volume.live().read(0, &mut buf)).unwrap();
    for (b, data) in buf.chunks(BLOCK).enumerate() {
        assert_eq!(
            version_of(b, data),
            progress.acked[b].load(Ordering::SeqCst)
        );
    }
    assert!(
        !reads_during_load.lock().unwrap().is_empty(),
        "readers never ran"
    );
}

//! Writer threads for the engine's load tests (`engine_concurrency`,
//! `engine_compaction`): each block's content names its block and version,
//! so a read can tell which write it saw, and every write is counted when it
//! starts and when it is acknowledged.

use snapblk::engine::Volume;
use snapblk::runtime::{block_on, spawn};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub const BLOCK: usize = 4096;
pub const BLOCKS: usize = 1024;

/// Version `version` of `block` (version 0: never written, zeros).
pub fn block_bytes(block: usize, version: u64) -> Vec<u8> {
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

/// The version `data` holds; panics on a torn or foreign block.
pub fn version_of(block: usize, data: &[u8]) -> u64 {
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

/// The block versions the live volume (`None`) or a snapshot holds.
pub fn versions(volume: &Arc<Volume>, snapshot: Option<&str>) -> Vec<u64> {
    let view = match snapshot {
        Some(name) => volume.snapshot_view(name).unwrap(),
        None => volume.live(),
    };
    let mut buf = vec![0u8; BLOCK * BLOCKS];
    block_on(view.read(0, &mut buf)).unwrap();
    buf.chunks(BLOCK)
        .enumerate()
        .map(|(b, d)| version_of(b, d))
        .collect()
}

/// Asserts that every block of the image `what` holds a version no older
/// than `low` (acknowledged before it was taken) and no newer than `high`
/// (started before it returned).
pub fn assert_between(what: &str, versions: &[u64], low: &[u64], high: &[u64]) {
    for b in 0..BLOCKS {
        assert!(
            low[b] <= versions[b] && versions[b] <= high[b],
            "{what}, block {b}: version {} outside [{}, {}]",
            versions[b],
            low[b],
            high[b]
        );
    }
}

/// Per block: the newest version a writer started, and the newest acknowledged.
pub struct Progress {
    pub started: Vec<AtomicU64>,
    pub acked: Vec<AtomicU64>,
}

impl Progress {
    /// Every block's writes start after `version`.
    pub fn starting_at(version: u64) -> Arc<Progress> {
        Arc::new(Progress {
            started: (0..BLOCKS).map(|_| AtomicU64::new(version)).collect(),
            acked: (0..BLOCKS).map(|_| AtomicU64::new(version)).collect(),
        })
    }

    pub fn snapshot(counters: &[AtomicU64]) -> Vec<u64> {
        counters.iter().map(|a| a.load(Ordering::SeqCst)).collect()
    }
}

/// `threads` writer threads (each its own io_uring) of `tasks` tasks each,
/// writing random blocks until `stop`. Each task owns the blocks congruent
/// to its id: one write in flight per block, many per chunk.
pub fn start_writers(
    volume: &Arc<Volume>,
    progress: &Arc<Progress>,
    stop: &Arc<AtomicBool>,
    threads: usize,
    tasks: usize,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            let (volume, progress, stop) = (volume.clone(), progress.clone(), stop.clone());
            std::thread::spawn(move || {
                block_on(async move {
                    let (done_tx, mut done_rx) = futures::channel::mpsc::unbounded::<()>();
                    for task in 0..tasks {
                        let (view, progress, stop, done) = (
                            volume.live(),
                            progress.clone(),
                            stop.clone(),
                            done_tx.clone(),
                        );
                        let id = t * tasks + task;
                        let stride = threads * tasks;
                        spawn(async move {
                            let mut rng = id as u64 * 7919 + 1;
                            while !stop.load(Ordering::Relaxed) {
                                rng = rng
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407);
                                let block =
                                    ((rng >> 33) % (BLOCKS / stride) as u64) as usize * stride + id;
                                let version = progress.started[block].load(Ordering::SeqCst) + 1;
                                progress.started[block].store(version, Ordering::SeqCst);
                                let data = block_bytes(block, version);
                                view.write((block * BLOCK) as u64, &data, false)
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
        .collect()
}

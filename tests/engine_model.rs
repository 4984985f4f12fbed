//! The engine against a model: random workloads of writes, discards,
//! write-zeroes, flushes, snapshot create/delete and reopen, then simulated
//! power cuts at random points with the fault-injecting memory disk.
//! A diff op checks the engine's changed-block map between two snapshots
//! (or a snapshot and the live volume) against the chunks the model wrote
//! in between. A revert op rolls the live volume back to a snapshot (and
//! counts the chunks it rewrote as changed); the clone tests run a parent
//! and a clone of one of its snapshots side by side, with flatten, and cut
//! power on either volume's disk.
//!
//! Every sector written carries a tag (the id of the write that wrote it and
//! its own sector number), so after a crash each sector can be checked
//! against the set of values it may legally hold: the value at the last
//! acknowledged flush, or anything written after it.

use snapblk::backend::memory::{MemDisk, SplitMix};
use snapblk::backend::Storage;
use snapblk::engine::{CacheMode, EngineError, Volume, VolumeConfig, WriteBackConfig};
use snapblk::runtime::block_on;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const SECTOR: usize = 512;
/// Deliberately not a multiple of chunk size x partitions: edges get exercised.
const SIZE: u64 = 300 * 1024 + 3 * 512;
const CHUNK: u32 = 4096;

fn config() -> VolumeConfig {
    VolumeConfig {
        size: SIZE,
        chunk_size: CHUNK,
        partitions: 3,
        backing: None,
        cache: CacheMode::Writeback,
    }
}

/// Write-back without the background committer, so a seed replays the same
/// operations in the same order (crash points stay reproducible), with a
/// small budget so full-buffer back-pressure happens often.
fn writeback() -> WriteBackConfig {
    WriteBackConfig {
        limit_bytes: 24 * 1024,
        commit_delay: std::time::Duration::ZERO,
        background: false,
    }
}

async fn open(storage: &Storage) -> Result<Arc<Volume>, EngineError> {
    Volume::open_with("v", storage.clone(), writeback()).await
}

async fn create(storage: &Storage) -> Result<Arc<Volume>, EngineError> {
    Volume::create_with("v", storage.clone(), &config(), writeback()).await
}

fn sectors() -> usize {
    SIZE as usize / SECTOR
}

/// The content of sector `lba` as written by write `tag` (0: zeros).
fn sector_bytes(tag: u64, lba: usize) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    if tag != 0 {
        for (i, word) in s.chunks_mut(8).enumerate() {
            let v = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((lba as u64) << 20) ^ i as u64;
            word.copy_from_slice(&v.to_le_bytes());
        }
        s[..8].copy_from_slice(&tag.to_le_bytes());
        s[8..16].copy_from_slice(&(lba as u64).to_le_bytes());
    }
    s
}

/// Which tag a sector read back holds; panics on content no write produced.
fn tag_of(bytes: &[u8], lba: usize, what: &str) -> u64 {
    if bytes.iter().all(|&b| b == 0) {
        return 0;
    }
    let tag = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(
        bytes,
        &sector_bytes(tag, lba)[..],
        "{what}: sector {lba} holds bytes no write produced"
    );
    tag
}

/// A fresh volume on a fresh fault-injecting memory disk.
async fn new_volume() -> (Arc<MemDisk>, Storage, Arc<Volume>) {
    let disk = MemDisk::new();
    let storage = Storage::Memory(disk.clone());
    let volume = create(&storage).await.unwrap();
    (disk, storage, volume)
}

/// Each partition's journal length in bytes.
fn journal_lens(disk: &MemDisk) -> Vec<usize> {
    (0..config().partitions)
        .map(|p| disk.file_len(&format!("part-{p:03}.journal")).unwrap())
        .collect()
}

async fn try_read_tags(
    volume: &Arc<Volume>,
    snapshot: Option<&str>,
) -> Result<Vec<u64>, EngineError> {
    let view = match snapshot {
        Some(name) => volume.snapshot_view(name)?,
        None => volume.live(),
    };
    let mut buf = vec![0u8; SIZE as usize];
    view.read(0, &mut buf).await?;
    let what = snapshot.unwrap_or("live volume");
    Ok(buf
        .chunks(SECTOR)
        .enumerate()
        .map(|(lba, s)| tag_of(s, lba, what))
        .collect())
}

async fn read_tags(volume: &Arc<Volume>, snapshot: Option<&str>) -> Vec<u64> {
    try_read_tags(volume, snapshot).await.unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        lba: usize,
        count: usize,
        fua: bool,
    },
    Zero {
        lba: usize,
        count: usize,
        keep_allocated: bool,
    },
    Flush,
    Snapshot,
    DeleteSnapshot {
        pick: usize,
    },
    Reopen,
    Check,
    /// Changed chunks from the `pick`th snapshot to a later one, or live.
    Diff {
        pick: usize,
        to: usize,
    },
    /// Rolls the live volume back to the `pick`th snapshot.
    Revert {
        pick: usize,
    },
}

fn random_op(rng: &mut SplitMix, allow_reopen: bool) -> Op {
    let lba = rng.below(sectors() as u64) as usize;
    let count = (1 + rng.below(24) as usize).min(sectors() - lba);
    match rng.below(100) {
        0..=44 => Op::Write {
            lba,
            count,
            fua: false,
        },
        45..=51 => Op::Write {
            lba,
            count,
            fua: true,
        },
        52..=61 => Op::Zero {
            lba,
            count,
            keep_allocated: rng.below(2) == 0,
        },
        62..=71 => Op::Flush,
        72..=83 => Op::Snapshot,
        84..=89 => Op::DeleteSnapshot {
            pick: rng.below(64) as usize,
        },
        90..=92 if allow_reopen => Op::Reopen,
        // No draws of its own: the crash tests' workloads stay as they were.
        93..=96 => Op::Diff {
            pick: lba,
            to: count,
        },
        97..=98 => Op::Revert { pick: lba },
        _ => Op::Check,
    }
}

/// What the volume must look like: the live image, what each sector may
/// hold after a crash, and every snapshot's image.
#[derive(Debug)]
struct Model {
    live: Vec<u64>,
    /// Per sector: values a crash may leave (the durable one first).
    may_hold: Vec<Vec<u64>>,
    snapshots: BTreeMap<String, Vec<u64>>,
    /// Snapshots whose create or delete was cut off: either outcome is fine.
    uncertain: BTreeMap<String, Vec<u64>>,
    next_tag: u64,
    next_snapshot: u64,
    /// Per snapshot: the chunks written since it was taken.
    touched: BTreeMap<String, BTreeSet<u64>>,
    /// (older, newer): the chunks written between the two snapshots.
    between: BTreeMap<(String, String), BTreeSet<u64>>,
    /// A write failed (a simulated crash): what it touched is unknown.
    touch_unknown: bool,
    /// A revert to this image was cut off: after recovery the live volume
    /// is either all of it or what it was before (never a mix).
    reverting: Option<Vec<u64>>,
}

impl Model {
    fn new() -> Self {
        Model {
            live: vec![0; sectors()],
            may_hold: vec![vec![0]; sectors()],
            snapshots: BTreeMap::new(),
            uncertain: BTreeMap::new(),
            next_tag: 1,
            next_snapshot: 0,
            touched: BTreeMap::new(),
            between: BTreeMap::new(),
            touch_unknown: false,
            reverting: None,
        }
    }

    /// The chunks a revert rewrote changed for every snapshot.
    fn touch_chunks(&mut self, chunks: &BTreeSet<u64>) {
        for set in self.touched.values_mut() {
            set.extend(chunks);
        }
    }

    /// The `pick`th snapshot, by name order.
    fn pick_snapshot(&self, pick: usize) -> Option<String> {
        self.snapshots
            .keys()
            .nth(pick % self.snapshots.len().max(1))
            .cloned()
    }

    /// Sectors `[lba, lba + count)` were written: their chunks changed for
    /// every snapshot.
    fn touch(&mut self, lba: usize, count: usize) {
        let per_chunk = CHUNK as usize / SECTOR;
        let chunks = (lba / per_chunk) as u64..=((lba + count - 1) / per_chunk) as u64;
        for set in self.touched.values_mut() {
            set.extend(chunks.clone());
        }
    }

    fn snapshot_taken(&mut self, name: &str) {
        for (older, set) in &self.touched {
            self.between
                .insert((older.clone(), name.to_string()), set.clone());
        }
        self.touched.insert(name.to_string(), BTreeSet::new());
    }

    fn snapshot_deleted(&mut self, name: &str) {
        self.touched.remove(name);
        self.between.retain(|(a, b), _| a != name && b != name);
    }

    fn written(&mut self, lba: usize, tags: &[u64], durable: bool) {
        for (i, &tag) in tags.iter().enumerate() {
            self.live[lba + i] = tag;
            if durable {
                self.may_hold[lba + i] = vec![tag];
            } else {
                self.may_hold[lba + i].push(tag);
            }
        }
    }

    fn flushed(&mut self) {
        for (may, &now) in self.may_hold.iter_mut().zip(&self.live) {
            *may = vec![now];
        }
    }
}

/// Runs one op against the volume and the model. An error is returned as is
/// (the crash tests expect the simulated power cut); the model then records
/// the op as in flight: its effects may or may not survive.
async fn apply(
    volume: &mut Arc<Volume>,
    storage: &Storage,
    model: &mut Model,
    op: &Op,
) -> Result<(), EngineError> {
    match *op {
        Op::Write { lba, count, fua } => {
            let tags: Vec<u64> = (0..count).map(|i| model.next_tag + i as u64).collect();
            model.next_tag += count as u64;
            let data: Vec<u8> = tags
                .iter()
                .enumerate()
                .flat_map(|(i, &t)| sector_bytes(t, lba + i))
                .collect();
            let result = volume.live().write((lba * SECTOR) as u64, &data, fua).await;
            match &result {
                Ok(()) => model.written(lba, &tags, fua),
                Err(_) => (0..count).for_each(|i| model.may_hold[lba + i].push(tags[i])),
            }
            model.touch(lba, count);
            model.touch_unknown |= result.is_err();
            result
        }
        Op::Zero {
            lba,
            count,
            keep_allocated,
        } => {
            let view = volume.live();
            let (offset, len) = ((lba * SECTOR) as u64, (count * SECTOR) as u64);
            let result = if keep_allocated {
                view.write_zeroes(offset, len, true).await
            } else {
                view.discard(offset, len).await
            };
            match &result {
                Ok(()) => model.written(lba, &vec![0; count], false),
                Err(_) => (lba..lba + count).for_each(|s| model.may_hold[s].push(0)),
            }
            model.touch(lba, count);
            model.touch_unknown |= result.is_err();
            result
        }
        Op::Flush => {
            volume.live().flush().await?;
            model.flushed();
            Ok(())
        }
        Op::Snapshot => {
            let name = format!("s{}", model.next_snapshot);
            model.next_snapshot += 1;
            match volume.create_snapshot(&name).await {
                Ok(created) => {
                    assert_eq!(created.snapshot.name, name);
                    model.snapshot_taken(&name);
                    model.snapshots.insert(name, model.live.clone());
                    Ok(())
                }
                Err(e) => {
                    model.uncertain.insert(name, model.live.clone());
                    Err(e)
                }
            }
        }
        Op::DeleteSnapshot { pick } => {
            let Some(name) = model
                .snapshots
                .keys()
                .nth(pick % model.snapshots.len().max(1))
                .cloned()
            else {
                return Ok(());
            };
            let image = model.snapshots.remove(&name).unwrap();
            model.snapshot_deleted(&name);
            match volume.delete_snapshot(&name).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    model.uncertain.insert(name, image);
                    Err(e)
                }
            }
        }
        Op::Reopen => {
            volume.shutdown().await?;
            *volume = open(storage).await?;
            Ok(())
        }
        Op::Revert { pick } => {
            let Some(name) = model.pick_snapshot(pick) else {
                return Ok(());
            };
            let image = model.snapshots[&name].clone();
            match volume.revert(&name).await {
                Ok(reverted) => {
                    // After a crash the model no longer knows (touch_unknown).
                    let rewritten = model.touched.get(&name).cloned().unwrap_or_default();
                    if !model.touch_unknown {
                        assert_eq!(
                            reverted.changed_bytes.div_ceil(CHUNK as u64),
                            rewritten.len() as u64,
                            "revert to {name} rewrote other chunks than changed since it"
                        );
                    }
                    model.touch_chunks(&rewritten);
                    model.live = image;
                    // A revert ends with a flush.
                    model.flushed();
                    Ok(())
                }
                Err(e) => {
                    model.reverting = Some(image);
                    model.touch_unknown = true;
                    Err(e)
                }
            }
        }
        Op::Diff { pick, to } => {
            let names: Vec<String> = model.snapshots.keys().cloned().collect();
            if names.is_empty() || model.touch_unknown || !model.uncertain.is_empty() {
                return Ok(());
            }
            let from = &names[pick % names.len()];
            // Names sort in creation order up to s9; compare by generation.
            let generation = |n: &str| n[1..].parse::<u64>().unwrap();
            let later: Vec<&String> = names
                .iter()
                .filter(|n| generation(n) > generation(from))
                .collect();
            let to = later.get(to % (later.len() + 1)).copied();
            let want = match to {
                Some(to) => model.between[&(from.clone(), to.clone())].clone(),
                None => model.touched[from].clone(),
            };
            let got: BTreeSet<u64> = volume
                .changed_extents(from, to.map(String::as_str), 0, SIZE)?
                .into_iter()
                .flat_map(|r| r.start / CHUNK as u64..=(r.end - 1) / CHUNK as u64)
                .collect();
            assert_eq!(got, want, "changed chunks from {from} to {to:?}");
            Ok(())
        }
        Op::Check => {
            assert_eq!(
                try_read_tags(volume, None).await?,
                model.live,
                "live volume differs from the model"
            );
            for (name, image) in &model.snapshots {
                let got = try_read_tags(volume, Some(name)).await?;
                assert_eq!(&got, image, "snapshot {name} differs from the model");
            }
            Ok(())
        }
    }
}

async fn check_everything(volume: &Arc<Volume>, model: &Model) {
    assert_eq!(
        read_tags(volume, None).await,
        model.live,
        "live volume differs from the model"
    );
    let listed: Vec<String> = volume
        .list_snapshots()
        .into_iter()
        .map(|s| s.name)
        .collect();
    let expected: Vec<String> = model.snapshots.keys().cloned().collect();
    assert_eq!(
        listed.iter().collect::<std::collections::BTreeSet<_>>(),
        expected.iter().collect()
    );
    for (name, image) in &model.snapshots {
        assert_eq!(
            &read_tags(volume, Some(name)).await,
            image,
            "snapshot {name} differs from the model"
        );
    }
}

/// Random workloads per model test run: `PROPTEST_CASES` overrides
/// `default` (proptest reads it only when a test sets no count of its own).
fn model_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Crash cases per test run: `CRASH_CASES` overrides `default`, and
/// `CRASH_SEED` the first seed.
fn crash_cases(default: u64) -> std::ops::Range<u64> {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let base: u64 = env("CRASH_SEED").unwrap_or(0x5eed);
    base..base.wrapping_add(env("CRASH_CASES").unwrap_or(default))
}

mod model {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: model_cases(64), ..ProptestConfig::default() })]

        /// Random workloads without crashes: after every step the live
        /// volume and every snapshot equal the model, across clean reopens.
        #[test]
        fn engine_matches_model(seed in any::<u64>(), steps in 20usize..120) {
            block_on(async {
                let (_, storage, mut volume) = new_volume().await;
                let mut model = Model::new();
                let mut rng = SplitMix(seed);
                for _ in 0..steps {
                    let op = random_op(&mut rng, true);
                    apply(&mut volume, &storage, &mut model, &op).await.unwrap();
                }
                check_everything(&volume, &model).await;
                // Deleting every snapshot gives all preserved space back.
                for name in model.snapshots.keys() {
                    volume.delete_snapshot(name).await.unwrap();
                }
                let info = volume.info().unwrap();
                assert_eq!(info.snapshots, 0);
                assert!(volume.list_snapshots().is_empty());
                assert_eq!(read_tags(&volume, None).await, model.live);
            });
        }
    }

    /// On real files: preserved data shows in used bytes and in the
    /// snapshot's exclusive bytes, and deleting the snapshot punches it out
    /// of the change log, giving the space back to the filesystem.
    #[test]
    fn deleting_a_snapshot_gives_its_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let config = VolumeConfig {
            size: 8 << 20,
            chunk_size: 64 * 1024,
            partitions: 2,
            backing: None,
            cache: CacheMode::Writeback,
        };
        block_on(async {
            let volume = Volume::create("v", Storage::Dir(dir.path().into()), &config)
                .await
                .unwrap();
            let live = volume.live();
            let data = vec![0x5au8; 4 << 20];
            live.write(0, &data, false).await.unwrap();
            volume.create_snapshot("s").await.unwrap();
            let before = volume.info().unwrap().used_bytes;
            live.write(0, &vec![0xa5u8; 4 << 20], false).await.unwrap();
            let with_copy = volume.info().unwrap().used_bytes;
            assert!(
                with_copy >= before + (4 << 20),
                "{before} -> {with_copy}: 4 MiB preserved"
            );
            assert_eq!(volume.list_snapshots()[0].exclusive_bytes, 4 << 20);
            volume.delete_snapshot("s").await.unwrap();
            let after = volume.info().unwrap().used_bytes;
            // The journal grows by the Free records meanwhile: allow it a few blocks.
            let freed = with_copy.saturating_sub(after);
            assert!(
                freed >= (4 << 20) - 16384,
                "{with_copy} -> {after}: delete must free 4 MiB"
            );
        });
    }

    /// A snapshot read that finds a chunk still in the origin must not
    /// return what a writer lands there meanwhile: here another thread
    /// preserves and overwrites the chunk inside the read's window, and the
    /// read must notice and go to the preserved copy.
    #[test]
    fn snapshot_read_racing_an_overwrite_returns_the_old_data() {
        let (disk, _, volume) = block_on(new_volume());
        block_on(async {
            volume.live().write(0, &[1u8; 4096], false).await.unwrap();
            volume.create_snapshot("s").await.unwrap();
        });
        let writer = volume.clone();
        disk.before_next_read("origin.img", move || {
            // Another thread, as another connection or ublk queue would be.
            let overwrite = move || block_on(writer.live().write(0, &[2u8; 4096], false)).unwrap();
            std::thread::spawn(overwrite).join().unwrap();
        });
        let mut buf = [0u8; 4096];
        block_on(volume.snapshot_view("s").unwrap().read(0, &mut buf)).unwrap();
        assert_eq!(
            buf, [1u8; 4096],
            "snapshot read returned data written after it"
        );
        block_on(volume.live().read(0, &mut buf)).unwrap();
        assert_eq!(buf, [2u8; 4096]);
    }

    #[test]
    fn one_preserved_copy_serves_many_snapshots() {
        block_on(async {
            let (_, _, volume) = new_volume().await;
            let live = volume.live();
            live.write(0, &[7u8; 4096], false).await.unwrap();
            for i in 0..10 {
                volume.create_snapshot(&format!("s{i}")).await.unwrap();
            }
            live.write(0, &[9u8; 4096], false).await.unwrap();
            let snapshots = volume.list_snapshots();
            // One 4 KiB version is shared by all ten: nobody holds it alone.
            assert!(
                snapshots.iter().all(|s| s.exclusive_bytes == 0),
                "{snapshots:?}"
            );
            for i in 0..10 {
                let mut buf = [0u8; 4096];
                volume
                    .snapshot_view(&format!("s{i}"))
                    .unwrap()
                    .read(0, &mut buf)
                    .await
                    .unwrap();
                assert_eq!(buf, [7u8; 4096]);
            }
            for i in 1..10 {
                volume.delete_snapshot(&format!("s{i}")).await.unwrap();
            }
            assert_eq!(volume.list_snapshots()[0].exclusive_bytes, 4096);
        });
    }

    /// A write over many chunks after a snapshot copies them out together:
    /// one origin read and one change-log write for the run, not one of
    /// each per chunk (what made 1M sequential writes after a snapshot slow),
    /// and every chunk's old content still reads back from the snapshot.
    #[test]
    fn a_long_write_after_a_snapshot_preserves_its_chunks_in_one_batch() {
        block_on(async {
            let (disk, _, volume) = new_volume().await;
            let live = volume.live();
            // 16 chunks, all in partition 0 (26 chunks per partition).
            let old: Vec<u8> = (0..16 * CHUNK as usize)
                .map(|i| (i / 4096 + 1) as u8)
                .collect();
            live.write(0, &old, false).await.unwrap();
            live.flush().await.unwrap();
            volume.create_snapshot("s").await.unwrap();
            let before = disk.operations();
            live.write(0, &vec![0xEE; old.len()], false).await.unwrap();
            // One origin read and one store write (per chunk: 16 of each),
            // the store's growth ahead of its first slots, then the commit
            // the write drives since it overflows the model's 24 KiB
            // buffer: journal write and flush, store flush, and the write
            // itself to the origin.
            assert_eq!(disk.operations() - before, 2 + 1 + 4);
            live.flush().await.unwrap();
            let mut buf = vec![0u8; old.len()];
            volume
                .snapshot_view("s")
                .unwrap()
                .read(0, &mut buf)
                .await
                .unwrap();
            assert!(buf == old, "the snapshot lost the old content");
            live.read(0, &mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == 0xEE));
        });
    }

    /// Journal bytes online compaction lets each partition reach under the
    /// churn below. Live records, encoded (README, on-disk layout): every
    /// chunk of a partition (at most 26 here) may hold one preserved
    /// version per live snapshot (at most 2), at 61 bytes each, plus 2
    /// partition snapshots (29 bytes) and the 2 commit markers (21 bytes)
    /// of a compacted journal. The engine compacts beyond twice that plus
    /// 4 KiB; a cycle's own records and rounding get the rest.
    const LIVE_RECORD_BYTES: usize = 26 * 2 * 61 + 2 * 29 + 2 * 21;
    const JOURNAL_BOUND: usize = 3 * LIVE_RECORD_BYTES + 8192;

    /// 10,000 snapshot create/delete cycles under a writer: without
    /// compaction each journal would grow by at least 50 bytes a cycle
    /// (500 KB); with it no journal ever exceeds a bound set by the live
    /// records, a reopen reads only that, and every image stays exact.
    #[test]
    fn snapshot_churn_keeps_journals_bounded() {
        const CYCLES: usize = 10_000;
        block_on(async {
            let (disk, storage, mut volume) = new_volume().await;
            let mut model = Model::new();
            let mut rng = SplitMix(0xc4a0);
            let mut largest = 0;
            let write = |rng: &mut SplitMix| {
                let lba = rng.below(sectors() as u64) as usize;
                Op::Write {
                    lba,
                    count: (1 + rng.below(64) as usize).min(sectors() - lba),
                    fua: false,
                }
            };
            let whole = Op::Write {
                lba: 0,
                count: sectors(),
                fua: false,
            };
            // A snapshot that lives through the churn keeps versions live.
            for op in [whole, Op::Snapshot] {
                apply(&mut volume, &storage, &mut model, &op).await.unwrap();
            }
            for cycle in 1..=CYCLES {
                let name = format!("s{cycle}");
                let ops = [Op::Snapshot, write(&mut rng), write(&mut rng)];
                for op in &ops {
                    apply(&mut volume, &storage, &mut model, op).await.unwrap();
                    largest = largest.max(journal_lens(&disk).into_iter().max().unwrap());
                }
                let pick = model.snapshots.keys().position(|n| *n == name).unwrap();
                let delete = Op::DeleteSnapshot { pick };
                apply(&mut volume, &storage, &mut model, &delete)
                    .await
                    .unwrap();
                largest = largest.max(journal_lens(&disk).into_iter().max().unwrap());
            }
            assert!(
                largest <= JOURNAL_BOUND,
                "a journal reached {largest} bytes, bound {JOURNAL_BOUND}"
            );
            assert_eq!(model.snapshots.len(), 1);
            // What the reopen replays is each journal whole.
            let replayed = journal_lens(&disk);
            assert!(
                replayed.iter().all(|&len| len <= JOURNAL_BOUND),
                "{replayed:?}"
            );
            apply(&mut volume, &storage, &mut model, &Op::Reopen)
                .await
                .unwrap();
            check_everything(&volume, &model).await;
            let info = volume.info().unwrap();
            assert!(info.generation > CYCLES as u64, "{info:?}");
        });
    }

    #[test]
    fn bad_requests_fail_alone() {
        block_on(async {
            let (_, _, volume) = new_volume().await;
            let live = volume.live();
            let mut buf = [0u8; 1024];
            assert_eq!(
                live.read(SIZE - 512, &mut buf).await.unwrap_err().errno(),
                libc::EINVAL
            );
            assert_eq!(
                live.write(100, &[1u8; 512], false)
                    .await
                    .unwrap_err()
                    .errno(),
                libc::EINVAL
            );
            assert_eq!(
                live.discard(u64::MAX - 511, 512).await.unwrap_err().errno(),
                libc::EINVAL
            );
            volume.create_snapshot("s").await.unwrap();
            let snap = volume.snapshot_view("s").unwrap();
            assert_eq!(
                snap.write(0, &[1u8; 512], false).await.unwrap_err().errno(),
                libc::EPERM
            );
            assert!(matches!(
                volume.create_snapshot("s").await,
                Err(EngineError::AlreadyExists(_))
            ));
            assert!(matches!(
                volume.snapshot_view("nope"),
                Err(EngineError::NotFound(_))
            ));
            // The volume still works.
            live.write(0, &[3u8; 512], false).await.unwrap();
            live.read(0, &mut buf[..512]).await.unwrap();
            assert_eq!(buf[..512], [3u8; 512]);
            // A view of a deleted snapshot says so, instead of reading anything.
            volume.delete_snapshot("s").await.unwrap();
            let gone = snap.read(0, &mut buf).await.unwrap_err();
            assert_eq!(gone.errno(), libc::ESTALE, "{gone}");
            assert!(gone.to_string().contains("deleted"), "{gone}");
        });
    }
}

mod crash {
    use super::*;

    /// What a crash test runs before the power cut.
    struct Workload {
        ops: usize,
        op: fn(&mut SplitMix) -> Op,
        /// Aim most crash points at the ops this picks (the op, whether a
        /// journal shrank during it), among the last `tail` disk
        /// operations of each.
        aim: Option<fn(&Op, bool) -> bool>,
        tail: u64,
    }

    const MIXED: Workload = Workload {
        ops: 70,
        op: |rng| random_op(rng, false),
        aim: None,
        tail: 0,
    };

    /// Writes, snapshots and reverts: crash points land inside reverts.
    const REVERTS: Workload = Workload {
        ops: 40,
        op: revert_op,
        aim: Some(|op, _| matches!(op, Op::Revert { .. })),
        tail: u64::MAX,
    };

    fn revert_op(rng: &mut SplitMix) -> Op {
        let lba = rng.below(sectors() as u64) as usize;
        let count = (1 + rng.below(64) as usize).min(sectors() - lba);
        match rng.below(100) {
            0..=54 => Op::Write {
                lba,
                count,
                fua: rng.below(4) == 0,
            },
            55..=64 => Op::Zero {
                lba,
                count,
                keep_allocated: false,
            },
            65..=69 => Op::Flush,
            70..=79 => Op::Snapshot,
            _ => Op::Revert { pick: lba },
        }
    }

    /// Long writes and discards (up to 40 chunks: several preservation
    /// windows, across partitions) after snapshots, with deletes that leave
    /// free slots to reuse: crash points land inside the batched
    /// preservations of writes over more than one chunk.
    const LONG_WRITES: Workload = Workload {
        ops: 50,
        op: long_write_op,
        aim: Some(|op, _| matches!(*op, Op::Write { count, .. } if count > 8)),
        tail: u64::MAX,
    };

    fn long_write_op(rng: &mut SplitMix) -> Op {
        let lba = rng.below(sectors() as u64) as usize;
        let count = (1 + rng.below(320) as usize).min(sectors() - lba);
        match rng.below(100) {
            0..=54 => Op::Write {
                lba,
                count,
                fua: rng.below(6) == 0,
            },
            55..=62 => Op::Zero {
                lba,
                count,
                keep_allocated: rng.below(2) == 0,
            },
            63..=69 => Op::Flush,
            70..=87 => Op::Snapshot,
            _ => Op::DeleteSnapshot {
                pick: rng.below(64) as usize,
            },
        }
    }

    /// Heavy in snapshot create/delete, with writes large enough that the
    /// journals compact in nearly every run (three ops compact, on average).
    const CHURN: Workload = Workload {
        ops: 140,
        op: churn_op,
        aim: Some(|_, compacted| compacted),
        tail: COMPACTION_TAIL,
    };

    fn churn_op(rng: &mut SplitMix) -> Op {
        let lba = rng.below(sectors() as u64) as usize;
        let count = (1 + rng.below(96) as usize).min(sectors() - lba);
        match rng.below(100) {
            0..=39 => Op::Write {
                lba,
                count,
                fua: false,
            },
            40..=44 => Op::Write {
                lba,
                count,
                fua: true,
            },
            45..=49 => Op::Zero {
                lba,
                count,
                keep_allocated: rng.below(2) == 0,
            },
            50..=54 => Op::Flush,
            55..=77 => Op::Snapshot,
            _ => Op::DeleteSnapshot {
                pick: rng.below(64) as usize,
            },
        }
    }

    /// Disk operations an op of a run spanned: `(first, end)`, end exclusive.
    type Span = (u64, u64);

    /// Runs the workload of `seed` until it ends or the disk "loses power".
    /// `aimed` gets the spans of the ops the workload aims at.
    async fn run(
        disk: &Arc<MemDisk>,
        seed: u64,
        model: &mut Model,
        workload: &Workload,
        aimed: &mut Vec<Span>,
    ) -> Option<Arc<Volume>> {
        let storage = Storage::Memory(disk.clone());
        let mut volume = create(&storage).await.ok()?;
        let mut rng = SplitMix(seed);
        for _ in 0..workload.ops {
            let op = (workload.op)(&mut rng);
            let (first, lens) = (disk.operations(), journal_lens(disk));
            if let Err(e) = apply(&mut volume, &storage, model, &op).await {
                assert!(
                    e.to_string().contains("simulated power cut"),
                    "seed {seed}: unexpected failure {e} in {op:?}"
                );
                return None;
            }
            let compacted = journal_lens(disk)
                .iter()
                .zip(&lens)
                .any(|(now, was)| now < was);
            if workload.aim.is_some_and(|aim| aim(&op, compacted)) {
                aimed.push((first, disk.operations()));
            }
        }
        Some(volume)
    }

    /// A compaction's disk operations come last in its op (reading the old
    /// journal and what was committed meanwhile, replacing, reopening: four
    /// per partition); aimed crash points land among the last this many.
    const COMPACTION_TAIL: u64 = 16;

    /// What one crash case did before its power cut.
    struct Outcome {
        /// The crash point was aimed at an op the workload picks.
        aimed: bool,
        /// Chunks the dry run preserved by cloning.
        cloned: u64,
    }

    /// The shortest run the reflink seeds clone: 8 chunks, so the small
    /// test volume takes the clone path (a file system's 512 KiB is more
    /// than the whole volume).
    const TEST_CLONE_MIN_BYTES: u64 = 8 * CHUNK as u64;

    fn reflink_disk(reflink: bool) -> Arc<MemDisk> {
        let disk = MemDisk::new();
        disk.set_reflink(reflink);
        disk.set_clone_min_bytes(TEST_CLONE_MIN_BYTES);
        disk
    }

    /// Runs `seed`'s workload with a crash at a random point, then checks
    /// recovery.
    async fn crash_and_check(seed: u64, workload: &Workload) -> Outcome {
        // A dry run counts the workload's disk operations, so the crash can
        // land anywhere inside it. Half the seeds run on a disk that shares
        // blocks (XFS with reflink): long preservations clone there.
        let reflink = seed & 1 == 1;
        let dry = reflink_disk(reflink);
        let mut spans = Vec::new();
        let cloned = run(&dry, seed, &mut Model::new(), workload, &mut spans)
            .await
            .expect("dry run must not fail")
            .info()
            .unwrap()
            .cloned_chunks;
        let mut rng = SplitMix(seed ^ 0xC0FFEE);
        let aimed = !spans.is_empty() && rng.below(8) != 0;
        let crash_at = if aimed {
            let (first, end) = spans[rng.below(spans.len() as u64) as usize];
            end - rng.below(workload.tail.min(end - first) + 1)
        } else {
            rng.below(dry.operations() + 1)
        };

        let disk = reflink_disk(reflink);
        disk.crash_after(crash_at);
        let mut model = Model::new();
        let _ = run(&disk, seed, &mut model, workload, &mut Vec::new()).await;
        let after = disk.power_cut(&mut rng);

        let storage = Storage::Memory(after);
        let volume = match open(&storage).await {
            Ok(v) => v,
            // Power went out before the create committed: no volume, nothing acknowledged.
            Err(EngineError::NotFound(_)) if model.next_tag == 1 && model.next_snapshot == 0 => {
                return Outcome { aimed, cloned }
            }
            Err(e) => panic!("seed {seed} crash at {crash_at}: recovery failed: {e}"),
        };
        let ctx = format!("seed {seed} crash at op {crash_at}");
        let mut model = check_recovered(&volume, model, &ctx).await;
        let mut volume = volume;
        let mut rng = SplitMix(seed.rotate_left(17));
        for _ in 0..30 {
            let op = random_op(&mut rng, true);
            apply(&mut volume, &storage, &mut model, &op)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: after recovery {op:?}: {e}"));
        }
        check_everything(&volume, &model).await;
        Outcome { aimed, cloned }
    }

    /// Checks a volume recovered after a power cut against the model of
    /// what ran before it, and returns the model of what it holds now.
    pub(super) async fn check_recovered(volume: &Arc<Volume>, model: Model, ctx: &str) -> Model {
        // Every acknowledged snapshot reads exactly its image; an uncertain
        // one is either gone or exact; nothing else exists.
        let listed: Vec<String> = volume
            .list_snapshots()
            .into_iter()
            .map(|s| s.name)
            .collect();
        for name in model.snapshots.keys() {
            assert!(
                listed.contains(name),
                "{ctx}: acknowledged snapshot {name} lost"
            );
        }
        for name in &listed {
            let image = model
                .snapshots
                .get(name)
                .or_else(|| model.uncertain.get(name))
                .unwrap_or_else(|| panic!("{ctx}: snapshot {name} should not exist"));
            assert_eq!(
                &read_tags(volume, Some(name)).await,
                image,
                "{ctx}: snapshot {name} damaged"
            );
        }
        // Every sector holds its last flushed value or a later write; after
        // a revert that was cut off, the whole snapshot image instead.
        let live = read_tags(volume, None).await;
        if model.reverting.as_ref() != Some(&live) {
            for (lba, tag) in live.iter().enumerate() {
                assert!(
                    model.may_hold[lba].contains(tag),
                    "{ctx}: sector {lba} holds write {tag}, allowed {:?}{}",
                    model.may_hold[lba],
                    if model.reverting.is_some() {
                        " (a revert was cut off: neither the old content nor the snapshot's)"
                    } else {
                        ""
                    }
                );
            }
        }

        // The recovered volume keeps working: more writes, snapshots and
        // deletes on top of what recovery rebuilt stay exact.
        Model {
            live: live.clone(),
            may_hold: live.iter().map(|&t| vec![t]).collect(),
            snapshots: listed
                .iter()
                .map(|n| {
                    (
                        n.clone(),
                        model
                            .snapshots
                            .get(n)
                            .or_else(|| model.uncertain.get(n))
                            .unwrap()
                            .clone(),
                    )
                })
                .collect(),
            uncertain: BTreeMap::new(),
            next_tag: model.next_tag + 1_000_000,
            next_snapshot: model.next_snapshot + 1000,
            // Which writes before the crash landed is not known.
            touched: BTreeMap::new(),
            between: BTreeMap::new(),
            touch_unknown: true,
            reverting: None,
        }
    }

    fn cases(default: u64) -> std::ops::Range<u64> {
        crash_cases(default)
    }

    /// A thousand random crash points per run (CRASH_CASES overrides).
    #[test]
    fn every_snapshot_and_flushed_write_survives_power_cuts() {
        for seed in cases(1000) {
            block_on(crash_and_check(seed, &MIXED));
        }
    }

    /// Power cuts while journals are compacted online, under snapshot churn:
    /// most crash points land in or just before a compaction's rename.
    #[test]
    fn power_cuts_during_journal_compaction_lose_nothing() {
        let cases = cases(400);
        let total = cases.end - cases.start;
        let aimed = cases
            .filter(|&seed| block_on(crash_and_check(seed, &CHURN)).aimed)
            .count() as u64;
        // About seven in eight when every run compacts.
        assert!(
            aimed * 2 >= total,
            "only {aimed} of {total} crash points aimed at a compaction: \
             the workload no longer compacts"
        );
    }

    /// Power cuts inside long writes after snapshots (batched
    /// preservations, cloned on the reflink seeds): every snapshot exact,
    /// every flushed write there.
    #[test]
    fn power_cuts_during_long_writes_after_snapshots_lose_nothing() {
        let cases = cases(300);
        let total = cases.end - cases.start;
        let (mut aimed, mut cloning) = (0, 0);
        for seed in cases {
            let outcome = block_on(crash_and_check(seed, &LONG_WRITES));
            aimed += u64::from(outcome.aimed);
            cloning += u64::from(outcome.cloned > 0);
        }
        assert!(
            aimed * 2 >= total,
            "only {aimed} of {total} crash points aimed at a long write"
        );
        // Half the seeds share blocks; most of those must clone, or the
        // clone path has no power cuts in it.
        assert!(
            cloning * 4 >= total,
            "only {cloning} of {total} runs preserved a chunk by cloning"
        );
    }

    /// Power cuts inside reverts: after recovery the live volume is the
    /// whole snapshot image (the revert resumed at open) or what it held
    /// before, every snapshot intact.
    #[test]
    fn power_cuts_during_revert_leave_old_or_new_never_a_mix() {
        let cases = cases(300);
        let total = cases.end - cases.start;
        let aimed = cases
            .filter(|&seed| block_on(crash_and_check(seed, &REVERTS)).aimed)
            .count() as u64;
        assert!(
            aimed * 2 >= total,
            "only {aimed} of {total} crash points aimed at a revert: the workload no longer reverts"
        );
    }

    #[test]
    fn corrupt_manifest_is_a_clear_error() {
        block_on(async {
            let (disk, storage, _) = new_volume().await;
            disk.set_manifest("volume.json", b"{\"format\": 1, \"name\": ");
            let err = Volume::open("v", storage).await.err().expect("must fail");
            assert!(matches!(err, EngineError::Corrupt(_)), "{err}");
            assert!(err.to_string().contains("volume.json"), "{err}");
        });
    }

    #[test]
    fn corrupt_journal_middle_is_refused_and_torn_tail_dropped() {
        block_on(async {
            let (disk, _, volume) = new_volume().await;
            let live = volume.live();
            live.write(0, &[1u8; 4096], false).await.unwrap();
            volume.create_snapshot("a").await.unwrap();
            live.write(0, &[2u8; 4096], false).await.unwrap();
            volume.create_snapshot("b").await.unwrap();
            live.write(0, &[3u8; 4096], false).await.unwrap();
            // The flush commits that overwrite's preservation: the last batch.
            live.flush().await.unwrap();
            drop((live, volume));
            let journal = "part-000.journal";
            let len = disk.file_len(journal).unwrap();
            // A torn last record is dropped; everything before it stays.
            let torn = disk.power_cut(&mut SplitMix(1));
            torn.corrupt(journal, len - 1);
            let v = open(&Storage::Memory(torn)).await.unwrap();
            let mut buf = [0u8; 4096];
            v.snapshot_view("a")
                .unwrap()
                .read(0, &mut buf)
                .await
                .unwrap();
            assert_eq!(buf, [1u8; 4096]);
            // Damage in the middle is refused with a message naming the file.
            disk.corrupt(journal, 3);
            let err = open(&Storage::Memory(disk.clone()))
                .await
                .err()
                .expect("must fail");
            assert!(err.to_string().contains(journal), "{err}");
        });
    }
}

/// A parent volume and a clone of one of its snapshots, each on its own
/// fault-injecting disk, each with its own model.
mod clones {
    use super::*;

    /// The parent snapshot the clone reads from.
    const BASE: &str = "s0";

    #[derive(Debug, Clone)]
    enum WorldOp {
        Parent(Op),
        Clone(Op),
        /// Copies up to `chunks` chunks into the clone; finishes the flatten
        /// once none is left.
        Flatten {
            chunks: u64,
        },
        /// Deleting the clone's parent snapshot: refused until flattened.
        DeleteBase,
        /// Both volumes shut down and reopened, parent first.
        Reopen,
    }

    fn world_op(rng: &mut SplitMix) -> WorldOp {
        match rng.below(100) {
            0..=29 => WorldOp::Parent(random_op(rng, false)),
            30..=79 => WorldOp::Clone(random_op(rng, false)),
            80..=91 => WorldOp::Flatten {
                chunks: 1 + rng.below(24),
            },
            92..=94 => WorldOp::DeleteBase,
            _ => WorldOp::Reopen,
        }
    }

    struct Side {
        disk: Arc<MemDisk>,
        storage: Storage,
        volume: Arc<Volume>,
        model: Model,
    }

    struct World {
        parent: Side,
        clone: Side,
        /// Where the flatten goes on from; `None` once finished.
        flatten_at: Option<u64>,
        base_deleted: bool,
    }

    async fn open_clone(
        storage: &Storage,
        parent: &Arc<Volume>,
    ) -> Result<Arc<Volume>, EngineError> {
        Volume::open_layered("c", storage.clone(), writeback(), Some(parent.clone())).await
    }

    /// A parent filled with random writes, snapshot `BASE`, and a clone of
    /// it, on `parent_disk` and `clone_disk`.
    async fn build(
        parent_disk: &Arc<MemDisk>,
        clone_disk: &Arc<MemDisk>,
        rng: &mut SplitMix,
    ) -> Result<World, (Model, Option<Model>, EngineError)> {
        let storage = Storage::Memory(parent_disk.clone());
        let mut model = Model::new();
        let mut volume = match create(&storage).await {
            Ok(v) => v,
            Err(e) => return Err((model, None, e)),
        };
        for _ in 0..12 {
            let lba = rng.below(sectors() as u64) as usize;
            let op = Op::Write {
                lba,
                count: (1 + rng.below(48) as usize).min(sectors() - lba),
                fua: false,
            };
            if let Err(e) = apply(&mut volume, &storage, &mut model, &op).await {
                return Err((model, None, e));
            }
        }
        if let Err(e) = apply(&mut volume, &storage, &mut model, &Op::Snapshot).await {
            return Err((model, None, e));
        }
        let image = model.snapshots[BASE].clone();
        let clone_model = Model {
            live: image.clone(),
            may_hold: image.iter().map(|&t| vec![t]).collect(),
            next_tag: 1 << 40,
            ..Model::new()
        };
        let clone_storage = Storage::Memory(clone_disk.clone());
        let clone = match Volume::create_clone(
            "c",
            clone_storage.clone(),
            &volume,
            BASE,
            writeback(),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return Err((model, Some(clone_model), e)),
        };
        Ok(World {
            parent: Side {
                disk: parent_disk.clone(),
                storage,
                volume,
                model,
            },
            clone: Side {
                disk: clone_disk.clone(),
                storage: clone_storage,
                volume: clone,
                model: clone_model,
            },
            flatten_at: Some(0),
            base_deleted: false,
        })
    }

    /// Whether a clone's ownership map is on its (memory) disk.
    fn has_owned_map(storage: &Storage) -> bool {
        matches!(storage, Storage::Memory(d) if d.file_len("owned.map").is_some())
    }

    async fn step(world: &mut World, op: &WorldOp) -> Result<(), EngineError> {
        match op {
            WorldOp::Parent(Op::DeleteSnapshot { pick })
                if world.parent.model.pick_snapshot(*pick).as_deref() == Some(BASE) =>
            {
                delete_base(world).await
            }
            WorldOp::Parent(op) => {
                let p = &mut world.parent;
                apply(&mut p.volume, &p.storage, &mut p.model, op).await
            }
            WorldOp::Clone(op) => {
                let c = &mut world.clone;
                apply(&mut c.volume, &c.storage, &mut c.model, op).await
            }
            WorldOp::Flatten { chunks } => {
                let Some(at) = world.flatten_at else {
                    return Ok(());
                };
                let clone = &world.clone.volume;
                if at == 0 {
                    clone.begin_flatten().await?;
                }
                match clone.flatten_step(at, *chunks).await? {
                    Some(next) => world.flatten_at = Some(next),
                    None => {
                        clone.finish_flatten().await?;
                        assert!(clone.info().unwrap().parent.is_none());
                        assert!(
                            !has_owned_map(&world.clone.storage),
                            "a flattened clone kept its ownership map"
                        );
                        world.flatten_at = None;
                    }
                }
                Ok(())
            }
            WorldOp::DeleteBase => delete_base(world).await,
            WorldOp::Reopen => {
                world.clone.volume.shutdown().await?;
                world.parent.volume.shutdown().await?;
                world.parent.volume = open(&world.parent.storage).await?;
                world.clone.volume = open_clone(&world.clone.storage, &world.parent.volume).await?;
                Ok(())
            }
        }
    }

    /// Deletes the clone's parent snapshot: refused, naming the clone,
    /// until a flatten finished.
    async fn delete_base(world: &mut World) -> Result<(), EngineError> {
        if world.base_deleted {
            return Ok(());
        }
        let result = world.parent.volume.delete_snapshot(BASE).await;
        if world.flatten_at.is_some() {
            match result {
                Err(EngineError::InUse(m)) => {
                    assert!(m.contains("clone(s) c"), "{m}");
                    return Ok(());
                }
                other => panic!("deleting the parent snapshot of a clone: {other:?}"),
            }
        }
        let p = &mut world.parent.model;
        let image = p.snapshots.remove(BASE);
        p.snapshot_deleted(BASE);
        if let (Err(_), Some(image)) = (&result, image) {
            // Cut off by a power cut: the delete may or may not have
            // committed, as for any other snapshot's.
            p.uncertain.insert(BASE.to_string(), image);
        }
        world.base_deleted = true;
        result
    }

    async fn check_world(world: &World) {
        check_everything(&world.parent.volume, &world.parent.model).await;
        check_everything(&world.clone.volume, &world.clone.model).await;
    }

    /// Flattens the clone to the end, deletes the parent snapshot, and
    /// checks the clone still reads its model without it.
    async fn flatten_and_detach(world: &mut World) {
        while world.flatten_at.is_some() {
            step(world, &WorldOp::Flatten { chunks: 64 }).await.unwrap();
        }
        step(world, &WorldOp::DeleteBase).await.unwrap();
        assert!(world.parent.volume.clones().is_empty());
        check_world(world).await;
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: model_cases(48), ..Default::default() })]

        /// Parent and clone written, snapshotted, reverted and diffed
        /// independently, with a flatten going on: each equals its model
        /// at every check, across reopens; after the flatten the parent
        /// snapshot goes and the clone keeps its content.
        #[test]
        fn parent_and_clone_match_their_models(seed in proptest::prelude::any::<u64>(), steps in 20usize..100) {
            block_on(async {
                let mut rng = SplitMix(seed);
                let mut world = build(&MemDisk::new(), &MemDisk::new(), &mut rng).await.unwrap();
                check_world(&world).await;
                for _ in 0..steps {
                    let op = world_op(&mut rng);
                    step(&mut world, &op).await.unwrap();
                }
                check_world(&world).await;
                flatten_and_detach(&mut world).await;
            });
        }
    }

    /// A parent volume of 5s throughout with snapshot [`BASE`] of that.
    async fn snapshotted_fives() -> Arc<Volume> {
        let (_, _, parent) = new_volume().await;
        parent
            .live()
            .write(0, &vec![5u8; SIZE as usize], false)
            .await
            .unwrap();
        parent.create_snapshot(BASE).await.unwrap();
        parent
    }

    /// A clone's unwritten chunks read from the parent snapshot, its own
    /// space grows only with what it writes, and FUA on a chunk it did not
    /// own survives a power cut right after (its ownership is durable too).
    #[test]
    fn clone_reads_parent_costs_only_its_writes_and_fua_owns_durably() {
        block_on(async {
            let parent = snapshotted_fives().await;
            parent.live().write(0, &[6u8; 4096], false).await.unwrap();
            let disk = MemDisk::new();
            let clone = Volume::create_clone(
                "c",
                Storage::Memory(disk.clone()),
                &parent,
                BASE,
                writeback(),
            )
            .await
            .unwrap();
            let mut buf = vec![0u8; SIZE as usize];
            clone.live().read(0, &mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == 5), "clone must read the snapshot");
            assert_eq!(clone.info().unwrap().owned_bytes, Some(0));
            clone.live().write(8192, &[7u8; 512], true).await.unwrap();
            assert_eq!(clone.info().unwrap().owned_bytes, Some(CHUNK as u64));
            let after = disk.power_cut(&mut SplitMix(3));
            let clone = open_clone(&Storage::Memory(after), &parent).await.unwrap();
            clone.live().read(0, &mut buf).await.unwrap();
            assert_eq!(
                buf[8192..8704],
                [7u8; 512],
                "a FUA write to a new chunk was lost"
            );
            assert!(buf[..8192].iter().chain(&buf[8704..]).all(|&b| b == 5));
            assert_eq!(
                clone.info().unwrap().parent.as_deref(),
                Some(format!("v@{BASE}").as_str())
            );
            // The parent's own writes after the snapshot stay out of the clone.
            parent.live().read(0, &mut buf[..4096]).await.unwrap();
            assert_eq!(buf[..4096], [6u8; 4096]);
        });
    }

    /// A power cut at every point of a flatten's end: the clone either
    /// still has its parent (the flatten can run again) or is independent
    /// and, once opened, has no ownership map left.
    #[test]
    fn power_cuts_at_the_end_of_a_flatten_leave_no_ownership_map() {
        block_on(async {
            let parent = snapshotted_fives().await;
            let mut cut = 0;
            loop {
                let disk = MemDisk::new();
                let storage = Storage::Memory(disk.clone());
                let clone = Volume::create_clone("c", storage, &parent, BASE, writeback())
                    .await
                    .unwrap();
                clone.live().write(0, &[7u8; 512], true).await.unwrap();
                clone.begin_flatten().await.unwrap();
                while clone.flatten_step(0, 1 << 20).await.unwrap().is_some() {}
                disk.crash_after(disk.operations() + cut);
                let finished = clone.finish_flatten().await;
                let after = Storage::Memory(disk.power_cut(&mut SplitMix(cut)));
                let clone = open_clone(&after, &parent).await.unwrap();
                let independent = clone.info().unwrap().parent.is_none();
                assert!(
                    !(independent && has_owned_map(&after)),
                    "cut at op {cut}: a flattened clone kept its ownership map"
                );
                let mut buf = vec![0u8; SIZE as usize];
                clone.live().read(0, &mut buf).await.unwrap();
                assert_eq!(buf[..512], [7u8; 512], "cut at op {cut}");
                assert!(buf[512..].iter().all(|&b| b == 5), "cut at op {cut}");
                if finished.is_ok() {
                    assert!(independent);
                    break;
                }
                cut += 1;
            }
        });
    }

    mod crash {
        use super::*;

        /// Runs `seed`'s world until it ends or a disk loses power.
        async fn run(
            parent_disk: &Arc<MemDisk>,
            clone_disk: &Arc<MemDisk>,
            seed: u64,
        ) -> Result<World, (Model, Option<Model>, bool)> {
            let mut rng = SplitMix(seed);
            let mut world = match build(parent_disk, clone_disk, &mut rng).await {
                Ok(w) => w,
                Err((p, c, e)) => {
                    assert!(
                        e.to_string().contains("simulated power cut"),
                        "seed {seed}: {e}"
                    );
                    return Err((p, c, false));
                }
            };
            for _ in 0..40 {
                let op = world_op(&mut rng);
                if let Err(e) = step(&mut world, &op).await {
                    assert!(
                        e.to_string().contains("simulated power cut"),
                        "seed {seed}: unexpected failure {e} in {op:?}"
                    );
                    let flattening = matches!(op, WorldOp::Flatten { .. });
                    let World { parent, clone, .. } = world;
                    return Err((parent.model, Some(clone.model), flattening));
                }
            }
            Ok(world)
        }

        /// Cuts power on the parent's or the clone's disk at a random point
        /// (both disks lose what was not flushed), then checks both
        /// volumes, finishes the flatten and drops the parent snapshot.
        async fn crash_and_check(seed: u64) -> bool {
            let (dry_parent, dry_clone) = (MemDisk::new(), MemDisk::new());
            let dry = run(&dry_parent, &dry_clone, seed).await;
            assert!(dry.is_ok(), "seed {seed}: the dry run must not fail");
            let mut rng = SplitMix(seed ^ 0xC10E);
            let on_clone = rng.below(2) == 0;
            let ops = if on_clone {
                dry_clone.operations()
            } else {
                dry_parent.operations()
            };
            let crash_at = rng.below(ops + 1);
            let (parent_disk, clone_disk) = (MemDisk::new(), MemDisk::new());
            if on_clone {
                clone_disk.crash_after(crash_at);
            } else {
                parent_disk.crash_after(crash_at);
            }
            let ran = run(&parent_disk, &clone_disk, seed).await;
            let (parent_model, clone_model, in_flatten) = match ran {
                Ok(world) => {
                    let World { parent, clone, .. } = world;
                    (parent.model, Some(clone.model), false)
                }
                Err(models) => models,
            };
            let ctx = format!(
                "seed {seed} crash at op {crash_at} of the {} disk",
                if on_clone { "clone's" } else { "parent's" }
            );
            let parent_storage = Storage::Memory(parent_disk.power_cut(&mut rng));
            let clone_storage = Storage::Memory(clone_disk.power_cut(&mut rng));
            let parent = match open(&parent_storage).await {
                Ok(v) => v,
                Err(EngineError::NotFound(_)) if parent_model.next_tag == 1 => return in_flatten,
                Err(e) => panic!("{ctx}: parent recovery failed: {e}"),
            };
            let parent_model =
                super::super::crash::check_recovered(&parent, parent_model, &ctx).await;
            let clone = match (open_clone(&clone_storage, &parent).await, clone_model) {
                (Ok(c), Some(model)) => Some((c, model)),
                // The clone's create never committed.
                (Err(EngineError::NotFound(_)), _) | (_, None) => None,
                (Err(e), Some(_)) => panic!("{ctx}: clone recovery failed: {e}"),
            };
            let Some((clone, clone_model)) = clone else {
                return in_flatten;
            };
            let clone_model = super::super::crash::check_recovered(&clone, clone_model, &ctx).await;
            // A flatten resumes where the ownership map says; a finished
            // one left the clone independent.
            let flatten_at = clone.info().unwrap().parent.is_some().then_some(0);
            assert!(
                flatten_at.is_some() || !has_owned_map(&clone_storage),
                "{ctx}: the flattened clone's ownership map survived its open"
            );
            let base_deleted = !parent_model.snapshots.contains_key(BASE);
            let mut world = World {
                parent: Side {
                    disk: parent_disk,
                    storage: parent_storage,
                    volume: parent,
                    model: parent_model,
                },
                clone: Side {
                    disk: clone_disk,
                    storage: clone_storage,
                    volume: clone,
                    model: clone_model,
                },
                flatten_at,
                base_deleted,
            };
            let mut rng = SplitMix(seed.rotate_left(9));
            for _ in 0..20 {
                let op = world_op(&mut rng);
                step(&mut world, &op)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: after recovery {op:?}: {e}"));
            }
            check_world(&world).await;
            flatten_and_detach(&mut world).await;
            let _ = (&world.parent.disk, &world.clone.disk);
            in_flatten
        }

        /// Power cuts anywhere in a parent-and-clone workload, flatten
        /// included; some land inside a flatten step.
        #[test]
        fn parent_and_clone_survive_power_cuts_during_writes_reverts_and_flatten() {
            let cases = super::super::crash_cases(400);
            let total = cases.end - cases.start;
            let in_flatten = cases
                .filter(|&seed| block_on(crash_and_check(seed)))
                .count();
            assert!(
                in_flatten > 0,
                "none of {total} crash points landed in a flatten: the workload no longer flattens"
            );
        }
    }
}

//! The engine against a model: random workloads of writes, discards,
//! write-zeroes, flushes, snapshot create/delete and reopen, then simulated
//! power cuts at random points with the fault-injecting memory disk.
//!
//! Every sector written carries a tag (the id of the write that wrote it and
//! its own sector number), so after a crash each sector can be checked
//! against the set of values it may legally hold: the value at the last
//! acknowledged flush, or anything written after it.

use snapblk::backend::memory::{MemDisk, SplitMix};
use snapblk::backend::Storage;
use snapblk::engine::{CacheMode, EngineError, Volume, VolumeConfig};
use snapblk::runtime::block_on;
use std::collections::BTreeMap;
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
    let volume = Volume::create("v", storage.clone(), &config())
        .await
        .unwrap();
    (disk, storage, volume)
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
        _ => Op::Check,
    }
}

/// What the volume must look like: the live image, what each sector may
/// hold after a crash, and every snapshot's image.
struct Model {
    live: Vec<u64>,
    /// Per sector: values a crash may leave (the durable one first).
    may_hold: Vec<Vec<u64>>,
    snapshots: BTreeMap<String, Vec<u64>>,
    /// Snapshots whose create or delete was cut off: either outcome is fine.
    uncertain: BTreeMap<String, Vec<u64>>,
    next_tag: u64,
    next_snapshot: u64,
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
        }
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
            *volume = Volume::open("v", storage.clone()).await?;
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

mod model {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

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

    /// Snapshot churn grows the journals; reopening compacts them to the
    /// live state without changing what any image reads.
    #[test]
    fn reopen_compacts_journals_to_live_state() {
        block_on(async {
            let (disk, storage, mut volume) = new_volume().await;
            let mut model = Model::new();
            for round in 0..800usize {
                let lba = (round * 8) % 200; // partition 0: its journal grows fastest
                apply(&mut volume, &storage, &mut model, &Op::Snapshot)
                    .await
                    .unwrap();
                apply(
                    &mut volume,
                    &storage,
                    &mut model,
                    &Op::Write {
                        lba,
                        count: 8,
                        fua: false,
                    },
                )
                .await
                .unwrap();
                if round % 50 != 0 {
                    let newest = model
                        .snapshots
                        .keys()
                        .find(|n| **n == format!("s{round}"))
                        .cloned();
                    let pick = model
                        .snapshots
                        .keys()
                        .position(|n| Some(n) == newest.as_ref())
                        .unwrap();
                    apply(
                        &mut volume,
                        &storage,
                        &mut model,
                        &Op::DeleteSnapshot { pick },
                    )
                    .await
                    .unwrap();
                }
            }
            let before = disk.file_len("part-000.journal").unwrap();
            apply(&mut volume, &storage, &mut model, &Op::Reopen)
                .await
                .unwrap();
            let after = disk.file_len("part-000.journal").unwrap();
            assert!(
                after * 2 < before,
                "journal not compacted: {before} -> {after} bytes"
            );
            check_everything(&volume, &model).await;
            // The compacted journal goes on working, and survives another reopen.
            for op in [
                Op::Snapshot,
                Op::Write {
                    lba: 0,
                    count: 16,
                    fua: false,
                },
                Op::Reopen,
            ] {
                apply(&mut volume, &storage, &mut model, &op).await.unwrap();
            }
            check_everything(&volume, &model).await;
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

    const WORKLOAD: usize = 70;

    /// Runs the workload of `seed` until it ends or the disk "loses power".
    async fn run(disk: &Arc<MemDisk>, seed: u64, model: &mut Model) -> Option<Arc<Volume>> {
        let storage = Storage::Memory(disk.clone());
        let mut volume = Volume::create("v", storage.clone(), &config()).await.ok()?;
        let mut rng = SplitMix(seed);
        for _ in 0..WORKLOAD {
            let op = random_op(&mut rng, false);
            if let Err(e) = apply(&mut volume, &storage, model, &op).await {
                assert!(
                    e.to_string().contains("simulated power cut"),
                    "seed {seed}: unexpected failure {e} in {op:?}"
                );
                return None;
            }
        }
        Some(volume)
    }

    async fn crash_and_check(seed: u64) {
        // A dry run counts the workload's disk operations, so the crash can
        // land anywhere inside it.
        let dry = MemDisk::new();
        run(&dry, seed, &mut Model::new())
            .await
            .expect("dry run must not fail");
        let mut rng = SplitMix(seed ^ 0xC0FFEE);
        let crash_at = rng.below(dry.operations() + 1);

        let disk = MemDisk::new();
        disk.crash_after(crash_at);
        let mut model = Model::new();
        let _ = run(&disk, seed, &mut model).await;
        let after = disk.power_cut(&mut rng);

        let storage = Storage::Memory(after);
        let volume = match Volume::open("v", storage.clone()).await {
            Ok(v) => v,
            // Power went out before the create committed: no volume, nothing acknowledged.
            Err(EngineError::NotFound(_)) if model.next_tag == 1 && model.next_snapshot == 0 => {
                return
            }
            Err(e) => panic!("seed {seed} crash at {crash_at}: recovery failed: {e}"),
        };
        let ctx = format!("seed {seed} crash at op {crash_at}");

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
                &read_tags(&volume, Some(name)).await,
                image,
                "{ctx}: snapshot {name} damaged"
            );
        }
        // Every sector holds its last flushed value or a later write.
        let live = read_tags(&volume, None).await;
        for (lba, tag) in live.iter().enumerate() {
            assert!(
                model.may_hold[lba].contains(tag),
                "{ctx}: sector {lba} holds write {tag}, allowed {:?}",
                model.may_hold[lba]
            );
        }

        // The recovered volume keeps working: more writes, snapshots and
        // deletes on top of what recovery rebuilt stay exact.
        let mut model = Model {
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
        };
        let mut volume = volume;
        let mut rng = SplitMix(seed.rotate_left(17));
        for _ in 0..30 {
            let op = random_op(&mut rng, true);
            apply(&mut volume, &storage, &mut model, &op)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: after recovery {op:?}: {e}"));
        }
        check_everything(&volume, &model).await;
    }

    /// Hundreds of random crash points per run (CRASH_CASES overrides).
    #[test]
    fn every_snapshot_and_flushed_write_survives_power_cuts() {
        let cases: u64 = std::env::var("CRASH_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600);
        let base: u64 = std::env::var("CRASH_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0x5eed);
        for i in 0..cases {
            block_on(crash_and_check(base.wrapping_add(i)));
        }
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
            drop((live, volume));
            let journal = "part-000.journal";
            let len = disk.file_len(journal).unwrap();
            // A torn last record is dropped; everything before it stays.
            let torn = disk.power_cut(&mut SplitMix(1));
            torn.corrupt(journal, len - 1);
            let v = Volume::open("v", Storage::Memory(torn)).await.unwrap();
            let mut buf = [0u8; 4096];
            v.snapshot_view("a")
                .unwrap()
                .read(0, &mut buf)
                .await
                .unwrap();
            assert_eq!(buf, [1u8; 4096]);
            // Damage in the middle is refused with a message naming the file.
            disk.corrupt(journal, 3);
            let err = Volume::open("v", Storage::Memory(disk.clone()))
                .await
                .err()
                .expect("must fail");
            assert!(err.to_string().contains(journal), "{err}");
        });
    }
}

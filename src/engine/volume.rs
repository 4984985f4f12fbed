//! Volumes and their views: the engine's public face.

use super::budget::SpaceBudget;
use super::error::{EngineError, Result};
use super::gate::{Epoch, Gate, OpenTicket, Paused, Ticket};
use super::hooks::{Change, ChunkSet, WriteGuard, WriteHook};
use super::journal::Journal;
use super::layer::{self, Layer};
use super::manifest::{
    self, AccessRecord, CacheMode, Manifest, Origin, ParentRecord, SnapshotRecord,
};
use super::partition::{Partition, Source};
use super::stats::{self, IoKind, IoStats, IoStatsSnapshot};
use super::writeback::{Held, HeldOp, Holding, Tightened, WriteBack, WriteBackConfig};
use super::{MAX_CHUNK_SIZE, MAX_PARTITIONS, MIN_CHUNK_SIZE, SECTOR_SIZE};
use crate::backend::file::FileBackend;
use crate::backend::{Backend, Extent, Reuse, Storage};
use crate::runtime::AlignedBuf;
use futures::future::{join_all, try_join_all, Either};
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Parameters of `volume create`.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    pub size: u64,
    pub chunk_size: u32,
    pub partitions: u32,
    /// An existing file or block device to use as the origin instead of a
    /// new sparse container file.
    pub backing: Option<PathBuf>,
    pub cache: CacheMode,
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
    pub cache: CacheMode,
    /// Origin I/Os that O_DIRECT could not take as they were (cache mode
    /// none): copied through an aligned buffer or sent through the page cache.
    pub bounced_ios: u64,
    /// Reads of data read once (old content a write preserves, one per run
    /// of chunks; a replication sync's or a copy job's reads) served from
    /// the page cache instead of the disk (cache mode writearound: only when
    /// all of the range was cached; otherwise they bypass it).
    pub once_reads_from_cache: u64,
    /// A clone's parent snapshot, `VOL@SNAP` (absent once flattened).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// A clone's chunks that its own origin holds (the rest read from the
    /// parent); with `used_bytes`, what the clone costs by itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owned_bytes: Option<u64>,
    /// A flatten was asked for and has not finished.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub flattening: bool,
    /// Clones whose parent is a snapshot of this volume.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clones: Vec<String>,
    /// Chunks copied out for snapshots since the volume opened.
    pub preserved_chunks: u64,
    /// Of those, chunks whose change-log slot shares the origin's blocks
    /// instead of holding a copy (reflink; long sequential overwrites only).
    pub cloned_chunks: u64,
    /// Requests served through any view since the volume opened.
    pub io: IoStatsSnapshot,
}

/// What a revert did.
#[derive(Clone, Debug, Serialize)]
pub struct Reverted {
    pub snapshot: String,
    /// Bytes rewritten: the chunks that changed since the snapshot.
    pub changed_bytes: u64,
}

/// How far a flatten got.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FlattenProgress {
    pub owned_chunks: u64,
    pub total_chunks: u64,
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

pub struct Volume {
    name: String,
    size: u64,
    chunk_size: u32,
    chunk_shift: u32,
    chunks_per_partition: u64,
    storage: Storage,
    origin: Backend,
    partitions: Vec<Partition>,
    gate: Gate,
    /// The committed manifest (snapshot list included).
    manifest: Mutex<Manifest>,
    /// Serializes snapshot create/delete and shutdown.
    admin: futures::lock::Mutex<()>,
    /// Writes acknowledged before the preservations they overwrite are durable.
    writeback: Arc<WriteBack>,
    /// A clone's parent snapshot and ownership map; `None` for a volume
    /// that is not a clone (or no longer: flattened).
    layer: Mutex<Option<Arc<Layer>>>,
    /// Whether `layer` is set: every read and write asks, and a layer only
    /// ever goes away (flatten), so most volumes answer with one load.
    layered: AtomicBool,
    /// Clones that read from a snapshot of this volume: (clone, generation).
    clones: Mutex<Vec<(String, u64)>>,
    io_stats: IoStats,
    /// One reference per [`View`] of a snapshot (plus this one): a revert
    /// leaves snapshots alone, so their readers do not stop it.
    snapshot_readers: Arc<()>,
    /// Asked before each write that may allocate (the owner's quota).
    budget: RwLock<Option<Arc<dyn SpaceBudget>>>,
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.writeback.stop();
    }
}

/// A handle to read (and, for the live volume, write) one image: the volume
/// itself or one of its snapshots. Cheap to clone; one per connection/queue.
#[derive(Clone)]
pub struct View {
    volume: Arc<Volume>,
    snapshot: Option<(String, u64)>,
    /// A snapshot view's share of `Volume::snapshot_readers`.
    _reader: Option<Arc<()>>,
    /// How its reads use the origin's page cache ([`View::for_one_pass`]).
    reuse: Reuse,
}

/// The reader of a snapshot that nobody else reads (a copy job's private
/// point-in-time image) giving back chunks it has durably consumed: writes
/// stop preserving them for it. Released chunks of that snapshot then read
/// as whatever the volume holds, so only the consumer may read it, and only
/// ranges it has not released.
pub struct SnapshotConsumer {
    set: Arc<ChunkSet>,
    chunk_shift: u32,
}

impl SnapshotConsumer {
    /// Releases every chunk wholly inside `[offset, offset + len)`.
    pub fn release(&self, offset: u64, len: u64) {
        let chunk_size = 1u64 << self.chunk_shift;
        let first = offset.div_ceil(chunk_size);
        let end = (offset + len) >> self.chunk_shift;
        (first..end).for_each(|c| self.set.insert(c));
    }
}

/// What a write holds while it overwrites the origin.
struct Admitted<'a> {
    how: Admission<'a>,
    /// Every preservation the range needed is durable already.
    settled: bool,
    /// A clone's ownership of some chunk of the range is not durable yet.
    newly_owned: bool,
}

enum Admission<'a> {
    /// The epoch asked nothing of the write (no hooks, no live snapshot).
    Open { _ticket: OpenTicket<'a> },
    Prepared {
        _ticket: Ticket<'a>,
        epoch: Epoch,
        /// One per hook of `epoch`, in its order.
        guards: Vec<WriteGuard>,
    },
}

impl Admitted<'_> {
    fn has_hooks(&self) -> bool {
        matches!(&self.how, Admission::Prepared { epoch, .. } if !epoch.hooks.is_empty())
    }

    fn applied(&mut self, offset: u64, change: Change<'_>) {
        if let Admission::Prepared { epoch, guards, .. } = &mut self.how {
            for (hook, guard) in epoch.hooks.iter().zip(guards.iter_mut()) {
                hook.after_write(guard, offset, change);
            }
        }
    }
}

/// Whether the kernel refused I/O on a registered buffer that the same I/O
/// through the daemon's memory would do: memory O_DIRECT cannot take
/// (EINVAL), a file that cannot take fixed buffers (EOPNOTSUPP), end of
/// file (a registered buffer cannot be zero-filled from here).
fn refused_registered(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
        || e.kind() == io::ErrorKind::UnexpectedEof
}

/// Whether two epochs run the same write hooks.
fn same_hooks(a: &[Arc<dyn WriteHook>], b: &[Arc<dyn WriteHook>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// Chunks a write preserves at once: bounds the chunk buffers one request
/// holds (a 4 GiB discard under a snapshot copies 16 chunks at a time).
const PRESERVE_WINDOW: u64 = 16;
/// The write-back budget of a volume with native snapshots from the drain
/// before a snapshot's pause to the pause's end. The pause lands every
/// held write (see `take_native_snapshot`); with the whole budget (64 MiB
/// of 4k writes under load) that took up to 13 s on the one-node test
/// cluster. Lowered while the drain before the pause runs, writes arriving
/// meanwhile push back once this much is held, so the pause lands at most
/// this (plus the requests in flight): a few hundred 4k writes.
const NATIVE_PAUSE_WRITEBACK: usize = 1 << 20;
/// Chunks one step of a long discard or write-zeroes covers: each step is
/// admitted, preserved and applied on its own, so neither memory nor the
/// held budget grows with the request.
const ZEROING_STEP_CHUNKS: u64 = 256;
/// Held writes a drive keeps in flight to the origin: enough to keep an
/// RBD image's OSDs busy (fio's librbd limit row runs at QD32), few enough
/// that a drive on an I/O thread's ring leaves it room.
const APPLY_CONCURRENCY: usize = 128;
/// Bytes a revert reads from the snapshot and writes back at once.
const REVERT_STEP: u64 = 1 << 20;

/// Wall-clock milliseconds since the epoch, for timestamps people read.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn validate_config(config: &VolumeConfig) -> Result<()> {
    let bad = |m: String| Err(EngineError::InvalidArgument(m));
    let cs = config.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return bad(format!(
            "chunk size {cs} must be a power of two between 4K and 1M"
        ));
    }
    if config.size == 0 || !config.size.is_multiple_of(SECTOR_SIZE) {
        return bad(format!(
            "size {} must be a positive multiple of 512 bytes",
            config.size
        ));
    }
    if config.partitions == 0 || config.partitions > MAX_PARTITIONS {
        return bad(format!(
            "partitions {} must be between 1 and {MAX_PARTITIONS}",
            config.partitions
        ));
    }
    Ok(())
}

impl Volume {
    /// Creates the volume's files in `storage` (an existing, empty directory)
    /// and commits its manifest last, so a crash mid-create leaves no volume.
    pub async fn create(
        name: &str,
        storage: Storage,
        config: &VolumeConfig,
    ) -> Result<Arc<Volume>> {
        Volume::create_with(name, storage, config, WriteBackConfig::daemon_default()).await
    }

    /// [`Volume::create`] with explicit write-back settings.
    pub async fn create_with(
        name: &str,
        storage: Storage,
        config: &VolumeConfig,
        writeback: WriteBackConfig,
    ) -> Result<Arc<Volume>> {
        validate_config(config)?;
        if storage.read_manifest(manifest::MANIFEST)?.is_some() {
            return Err(EngineError::AlreadyExists(format!("volume {name}")));
        }
        // Opened as the volume will open it, so a file system that refuses
        // O_DIRECT fails the create, not every later open.
        let cache = config.cache.page_cache();
        let origin = match &config.backing {
            Some(path) => {
                let backing = Backend::File(Arc::new(FileBackend::open_with(path, false, cache)?));
                let available = backing.size()?;
                if available < config.size {
                    return Err(EngineError::InvalidArgument(format!(
                        "{} holds {available} bytes, less than the requested size {}",
                        path.display(),
                        config.size
                    )));
                }
                Origin::Backing(path.clone())
            }
            None => {
                let container = storage.open_with(manifest::CONTAINER, true, cache)?;
                container.truncate(config.size).await?;
                Origin::Container
            }
        };
        for p in 0..config.partitions {
            storage.open(&manifest::journal_name(p), true)?;
            storage.open(&manifest::store_name(p), true)?;
        }
        let manifest = Manifest {
            cache: config.cache,
            native_snapshots: storage.native_snapshots() && config.backing.is_none(),
            ..Manifest::new(
                name,
                config.size,
                config.chunk_size,
                config.partitions,
                origin,
            )
        };
        storage.replace_manifest(manifest::MANIFEST, &manifest.to_bytes())?;
        Volume::open_with(name, storage, writeback).await
    }

    /// Where the volume's files live.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Opens a volume and recovers it: replays each partition's journal,
    /// cuts torn tails, drops preserved versions no committed snapshot needs.
    pub async fn open(name: &str, storage: Storage) -> Result<Arc<Volume>> {
        Volume::open_with(name, storage, WriteBackConfig::daemon_default()).await
    }

    /// [`Volume::open`] with explicit write-back settings.
    pub async fn open_with(
        name: &str,
        storage: Storage,
        writeback: WriteBackConfig,
    ) -> Result<Arc<Volume>> {
        Volume::open_layered(name, storage, writeback, None).await
    }

    /// The parent volume a clone's manifest names (`None`: not a clone, or
    /// flattened), so a caller can open parents before their clones.
    pub fn parent_of(storage: &Storage) -> Result<Option<String>> {
        let Some(bytes) = storage.read_manifest(manifest::MANIFEST)? else {
            return Ok(None);
        };
        let manifest = Manifest::parse(&bytes, manifest::MANIFEST)?;
        Ok(manifest.parent.map(|p| p.volume))
    }

    /// Opens a volume that may be a clone: `parent` is the open volume its
    /// manifest names (see [`Volume::parent_of`]). Completes a revert a
    /// crash interrupted before it returns.
    pub async fn open_layered(
        name: &str,
        storage: Storage,
        writeback: WriteBackConfig,
        parent: Option<Arc<Volume>>,
    ) -> Result<Arc<Volume>> {
        let what = format!("volume {name}: {}", manifest::MANIFEST);
        let bytes = storage
            .read_manifest(manifest::MANIFEST)?
            .ok_or_else(|| EngineError::NotFound(format!("{what} (not a volume directory)")))?;
        let manifest = Manifest::parse(&bytes, &what)?;
        let layer = match (&manifest.parent, parent) {
            (None, _) => {
                // A flatten commits before it removes the map; a crash
                // between leaves it behind.
                storage.remove(layer::OWNED_MAP)?;
                None
            }
            (Some(p), Some(parent)) if parent.name == p.volume => {
                let view = parent.snapshot_view(&p.snapshot).map_err(|e| {
                    EngineError::Corrupt(format!(
                        "volume {name} is a clone of {}@{}, which cannot be read: {e}",
                        p.volume, p.snapshot
                    ))
                })?;
                Some(Arc::new(
                    Layer::open(name, &storage, view, manifest.chunk_size, manifest.size).await?,
                ))
            }
            (Some(p), _) => {
                return Err(EngineError::NotFound(format!(
                    "volume {} (the parent of clone {name}, which reads from its snapshot {})",
                    p.volume, p.snapshot
                )))
            }
        };
        let cache = manifest.cache.page_cache();
        let origin = match &manifest.origin {
            Origin::Container => storage.open_with(manifest::CONTAINER, false, cache)?,
            Origin::Backing(path) => {
                Backend::File(Arc::new(FileBackend::open_with(path, false, cache)?))
            }
        };
        if origin.size()? < manifest.size {
            return Err(EngineError::Corrupt(format!(
                "volume {name}: origin holds {} bytes, the manifest says {}",
                origin.size()?,
                manifest.size
            )));
        }
        let chunk_shift = manifest.chunk_size.trailing_zeros();
        let chunks = manifest.size.div_ceil(manifest.chunk_size as u64);
        let chunks_per_partition = chunks.div_ceil(manifest.partitions as u64);
        let mut partitions = Vec::new();
        let live: Vec<u64> = manifest.snapshots.iter().map(|s| s.generation).collect();
        for p in 0..manifest.partitions {
            let journal_name = manifest::journal_name(p);
            let store = storage.open_store(&manifest::store_name(p))?;
            let label = format!("volume {name}: {journal_name}");
            let cs = manifest.chunk_size as u64;
            let (journal, replayed) =
                Journal::open_compacted(&storage, &journal_name, store.clone(), cs, &label, &live)
                    .await?;
            let partition = Partition::recover(
                p,
                manifest.chunk_size,
                manifest.native_snapshots,
                journal,
                store,
                &replayed.records,
            );
            partition.trim_store().await?;
            partitions.push(partition);
        }
        for snapshot in &manifest.snapshots {
            if let Some(p) = partitions
                .iter()
                .find(|p| !p.recorded_snapshots().contains(&snapshot.generation))
            {
                return Err(EngineError::Corrupt(format!(
                    "volume {name}: snapshot {} has no record in {}; the journal lost committed data",
                    snapshot.name,
                    manifest::journal_name(p.index)
                )));
            }
        }
        let generation = partitions
            .iter()
            .flat_map(|p| {
                p.recorded_snapshots()
                    .into_iter()
                    .map(|g| g + 1)
                    .chain([p.max_version_end()])
            })
            .chain([manifest.next_generation])
            .max()
            .unwrap_or(1);
        // Versions made for a snapshot whose create never committed, or left
        // by a delete cut short, are garbage now.
        try_join_all(partitions.iter().map(|p| p.collect_garbage(&live))).await?;
        if manifest.native_snapshots {
            storage.open_native_snapshots(&live)?;
        }
        let background = writeback.background;
        let volume = Arc::new(Volume {
            writeback: Arc::new(WriteBack::new(chunk_shift, writeback)),
            name: name.to_string(),
            size: manifest.size,
            chunk_size: manifest.chunk_size,
            chunk_shift,
            chunks_per_partition,
            storage,
            origin,
            partitions,
            gate: Gate::new(generation, live),
            manifest: Mutex::new(manifest),
            admin: futures::lock::Mutex::new(()),
            layered: AtomicBool::new(layer.is_some()),
            layer: Mutex::new(layer),
            clones: Mutex::new(Vec::new()),
            io_stats: IoStats::default(),
            snapshot_readers: Arc::new(()),
            budget: RwLock::new(None),
        });
        if background {
            volume.start_committer()?;
        }
        let reverting = volume.manifest.lock().unwrap().reverting.clone();
        if let Some(snapshot) = reverting {
            log::info!(
                "volume {name}: completing the revert to snapshot {snapshot} a crash cut short"
            );
            let _admin = volume.admin.lock().await;
            volume.finish_revert(&snapshot).await?;
        }
        Ok(volume)
    }

    /// Creates clone `name` of `parent@snapshot` in `storage` (an existing,
    /// empty directory): an empty sparse origin, empty journals and an
    /// empty ownership map, so it takes the same time for any size. Its
    /// manifest, committed last, names the parent snapshot.
    pub async fn create_clone(
        name: &str,
        storage: Storage,
        parent: &Arc<Volume>,
        snapshot: &str,
        writeback: WriteBackConfig,
    ) -> Result<Arc<Volume>> {
        parent.snapshot_generation_of(snapshot)?;
        if storage.read_manifest(manifest::MANIFEST)?.is_some() {
            return Err(EngineError::AlreadyExists(format!("volume {name}")));
        }
        let (cache, partitions) = {
            let m = parent.manifest.lock().unwrap();
            (m.cache, m.partitions)
        };
        let container = storage.open_with(manifest::CONTAINER, true, cache.page_cache())?;
        container.truncate(parent.size).await?;
        let chunks = parent.size.div_ceil(parent.chunk_size as u64);
        storage
            .open(layer::OWNED_MAP, true)?
            .truncate(layer::map_len(chunks))
            .await?;
        for p in 0..partitions {
            storage.open(&manifest::journal_name(p), true)?;
            storage.open(&manifest::store_name(p), true)?;
        }
        let manifest = Manifest {
            cache,
            parent: Some(ParentRecord {
                volume: parent.name.clone(),
                snapshot: snapshot.to_string(),
            }),
            ..Manifest::new(
                name,
                parent.size,
                parent.chunk_size,
                partitions,
                Origin::Container,
            )
        };
        storage.replace_manifest(manifest::MANIFEST, &manifest.to_bytes())?;
        Volume::open_layered(name, storage, writeback, Some(parent.clone())).await
    }

    fn layer(&self) -> Option<Arc<Layer>> {
        if !self.layered.load(Ordering::Acquire) {
            return None;
        }
        self.layer.lock().unwrap().clone()
    }

    pub(super) fn pin_clone(&self, clone: &str, generation: u64) {
        self.clones
            .lock()
            .unwrap()
            .push((clone.to_string(), generation));
    }

    pub(super) fn unpin_clone(&self, clone: &str) {
        self.clones.lock().unwrap().retain(|(c, _)| c != clone);
    }

    /// Clones that read from a snapshot of this volume, by name.
    pub fn clones(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .clones
            .lock()
            .unwrap()
            .iter()
            .map(|(c, _)| c.clone())
            .collect();
        names.sort();
        names
    }

    /// Reads the base image: the origin, and for a clone the parent
    /// snapshot where the clone owns no chunk yet.
    async fn read_base(&self, buf: &mut [u8], offset: u64, reuse: Reuse) -> Result<()> {
        match self.layer() {
            Some(layer) => layer.read(&self.origin, buf, offset, reuse).await,
            None => Ok(self.origin.read(buf, offset, reuse).await?),
        }
    }

    /// The base image's allocation map (see [`Volume::read_base`]).
    fn base_extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        match self.layer() {
            Some(layer) => layer.extents(&self.origin, offset, len),
            None => Ok(self.origin.extents(offset, len)?),
        }
    }

    /// The thread that drains the write-back buffer in the background, on
    /// its own ring, so no I/O thread stalls on a commit. It holds the volume
    /// only while it drives, and ends when the volume is dropped.
    fn start_committer(self: &Arc<Self>) -> Result<()> {
        let volume = Arc::downgrade(self);
        let writeback = self.writeback.clone();
        let name = self.name.clone();
        std::thread::Builder::new()
            .name("snapblk-commit".into())
            .spawn(move || {
                let mut last_error: Option<String> = None;
                while writeback.wait_for_work() {
                    let Some(volume) = volume.upgrade() else {
                        break;
                    };
                    match crate::runtime::block_on(volume.drive()) {
                        Ok(()) => last_error = None,
                        Err(e) => {
                            let e = e.to_string();
                            if last_error.as_ref() != Some(&e) {
                                log::warn!(
                                    "volume {name}: committing held writes failed: {e}; \
                                     they stay held and FLUSH reports the error"
                                );
                            }
                            last_error = Some(e);
                            // A full disk is not a reason to spin.
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(())
    }

    /// Commits every queued journal record, then applies every write held
    /// before that commit began to the origin, all at once but each after
    /// the earlier ones it overlaps (see [`super::writeback::Landing`]). This is the one
    /// place held writes reach the origin, so the ordering rule (preserved
    /// copy and record durable first) lives here.
    async fn drive(&self) -> Result<()> {
        let _driver = self.writeback.driver.lock().await;
        // Taken before the commit: each of these was held after its
        // preservation's record was queued, so the commit covers them all.
        let held = self.writeback.all_held();
        try_join_all(self.partitions.iter().map(Partition::sync_journal)).await?;
        if held.is_empty() {
            return Ok(());
        }
        let mut landing = self.writeback.landing(held);
        let mut in_flight = FuturesUnordered::new();
        let mut first_error = None;
        loop {
            while in_flight.len() < APPLY_CONCURRENCY {
                let Some((i, held)) = landing.next() else {
                    break;
                };
                let held = held.clone();
                in_flight.push(async move { (i, self.apply_held(&held).await) });
            }
            let Some((i, result)) = in_flight.next().await else {
                break;
            };
            let held = landing.landed(i);
            // A write the origin refused (a full disk) is dropped, as the
            // page cache drops a page whose writeback failed, and the next
            // FLUSH reports it: kept, it would block every later write to
            // its chunks, the discards that could free space among them.
            if let Err(e) = result {
                self.writeback.lost(held, &e);
                first_error.get_or_insert(e);
            }
            self.writeback.applied(std::slice::from_ref(held));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// FLUSH: every write acknowledged so far is durable, or the error
    /// that lost one since the last FLUSH.
    async fn flush_all(&self) -> Result<()> {
        self.make_durable(true).await
    }

    /// Commits, applies the held writes and flushes the origin; then
    /// records, for a clone, the chunks owned before it began (their
    /// copy-ups are durable now). `report_lost`: a FLUSH's answer, the
    /// error that lost a held write since the last one.
    async fn make_durable(&self, report_lost: bool) -> Result<()> {
        let layer = self.layer();
        let mut map = match &layer {
            Some(l) => Some(l.lock_map().await),
            None => None,
        };
        let owned = layer.as_ref().map(|l| l.take_pending());
        let flushed = async {
            let driven = self.drive().await;
            if report_lost {
                if let Some(lost) = self.writeback.take_lost() {
                    return Err(lost);
                }
            }
            driven?;
            Ok(self.origin.flush().await?)
        }
        .await;
        match (&layer, owned, map.as_mut()) {
            (Some(layer), Some(owned), Some(map)) if flushed.is_ok() => {
                layer.record(map, owned).await
            }
            (Some(layer), Some(owned), _) => {
                layer.requeue(owned);
                flushed
            }
            _ => flushed,
        }
    }

    /// Writes `data` (the bytes of `owned`, where the caller has it shared)
    /// to the origin, without a copy where its storage can keep the buffer.
    /// Either write, not one awaited inside another: this is every direct
    /// write's path.
    fn write_origin<'a>(
        &'a self,
        data: &'a [u8],
        owned: Option<&'a Arc<AlignedBuf>>,
        offset: u64,
        durable: bool,
    ) -> impl Future<Output = io::Result<()>> + 'a {
        match owned {
            Some(buf) if self.origin.takes_write_buffers() => {
                Either::Left(self.origin.write_owned_at(buf, offset, durable))
            }
            _ => Either::Right(self.origin.write_at(data, offset, durable)),
        }
    }

    async fn apply_held(&self, held: &Held) -> Result<()> {
        match &held.op {
            HeldOp::Data(data) => {
                self.write_origin(data, Some(data), held.offset, false)
                    .await?
            }
            HeldOp::Zeroes { keep_allocated } => {
                self.zero_origin(held.offset, held.len, *keep_allocated)
                    .await?
            }
        }
        Ok(())
    }

    async fn zero_origin(
        &self,
        offset: u64,
        len: u64,
        keep_allocated: bool,
    ) -> std::io::Result<()> {
        if keep_allocated {
            self.origin.zero_range(offset, len).await
        } else {
            self.origin.punch_hole(offset, len).await
        }
    }

    /// Bytes the write-back buffer holds now.
    pub fn held_bytes(&self) -> usize {
        self.writeback.held_bytes()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    pub fn info(&self) -> Result<VolumeInfo> {
        let manifest = self.manifest.lock().unwrap().clone();
        let layer = self.layer();
        let origin_bytes = self.origin.allocated_bytes()?;
        let used = origin_bytes
            + self
                .partitions
                .iter()
                .map(Partition::allocated_bytes)
                .sum::<u64>();
        Ok(VolumeInfo {
            name: self.name.clone(),
            capacity: self.size,
            used_bytes: used,
            free_bytes: self.storage.free_bytes()?,
            chunk_size: self.chunk_size,
            partitions: manifest.partitions,
            generation: self.gate.epoch().generation,
            snapshots: manifest.snapshots.len(),
            origin: match &manifest.origin {
                Origin::Container => manifest::CONTAINER.to_string(),
                Origin::Backing(path) => path.display().to_string(),
            },
            cache: manifest.cache,
            bounced_ios: self.origin.bounced_ios(),
            once_reads_from_cache: self.origin.once_reads_from_cache(),
            parent: manifest
                .parent
                .as_ref()
                .map(|p| format!("{}@{}", p.volume, p.snapshot)),
            owned_bytes: layer.map(|l| (l.owned_chunks() * self.chunk_size as u64).min(self.size)),
            flattening: manifest.flattening,
            clones: self.clones(),
            preserved_chunks: self
                .partitions
                .iter()
                .map(Partition::preserved_chunks)
                .sum(),
            cloned_chunks: self.partitions.iter().map(Partition::cloned_chunks).sum(),
            io: self.io_stats.snapshot(),
        })
    }

    pub fn live(self: &Arc<Self>) -> View {
        View {
            volume: self.clone(),
            snapshot: None,
            _reader: None,
            reuse: Reuse::Again,
        }
    }

    pub fn snapshot_view(self: &Arc<Self>, snapshot: &str) -> Result<View> {
        // Counted under the manifest lock: a delete_snapshot_unless_read
        // either sees this view or removed the snapshot before it was found.
        let manifest = self.manifest.lock().unwrap();
        let generation = self.generation_in(&manifest, snapshot)?;
        let reader = self.snapshot_readers.clone();
        drop(manifest);
        Ok(View {
            volume: self.clone(),
            snapshot: Some((snapshot.to_string(), generation)),
            _reader: Some(reader),
            reuse: Reuse::Again,
        })
    }

    /// How many [`View`]s of this volume's snapshots exist (each holds one
    /// reference to the volume).
    pub fn snapshot_views(&self) -> usize {
        Arc::strong_count(&self.snapshot_readers) - 1
    }

    /// Takes a snapshot: pauses writes only to close the generation (the
    /// stall), then makes it durable: origin flush, a partition snapshot in
    /// every partition's journal (in parallel), then the overall snapshot in
    /// the manifest, which is the commit point.
    pub async fn create_snapshot(&self, name: &str) -> Result<SnapshotCreated> {
        let _admin = self.admin.lock().await;
        let tightened = self.ready_for_snapshot(name).await?;
        let (generation, stall) = {
            let paused = self.gate.pause().await;
            self.take_native_snapshot(&paused).await?;
            (Self::close_generation(&paused), paused.elapsed())
        };
        drop(tightened);
        self.commit_snapshot(name, generation, stall).await
    }

    /// Takes snapshot `name` of each of `members` at one instant (a
    /// consistency group's): every member's gate is shut and drained before
    /// any generation closes, and none reopens before all have closed. So a
    /// write acknowledged on any member before the last gate shut is in its
    /// snapshot, and one that waited at a gate is in none; a write issued
    /// after another member's write was acknowledged cannot be in a
    /// snapshot that lacks that one. All or nothing: if one member cannot
    /// commit, those that did lose the snapshot again.
    pub async fn create_snapshots_together(
        members: &[(&Volume, &str)],
    ) -> Result<Vec<SnapshotCreated>> {
        // Admin locks in name order, so two callers never wait on each other.
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by_key(|&i| members[i].0.name.as_str());
        if order
            .windows(2)
            .any(|w| members[w[0]].0.name == members[w[1]].0.name)
        {
            return Err(EngineError::InvalidArgument(
                "a volume is named twice in one group snapshot".to_string(),
            ));
        }
        let mut admins = Vec::with_capacity(members.len());
        for &i in &order {
            admins.push(members[i].0.admin.lock().await);
        }
        let tightened =
            try_join_all(members.iter().map(|(v, name)| v.ready_for_snapshot(name))).await?;
        let (generations, stall) = {
            let mut paused = Vec::with_capacity(members.len());
            for (v, _) in members {
                paused.push(v.gate.pause().await);
            }
            for ((v, _), p) in members.iter().zip(&paused) {
                v.take_native_snapshot(p).await?;
            }
            let generations: Vec<u64> = paused.iter().map(Self::close_generation).collect();
            // The first gate shut is the one held longest.
            (generations, paused[0].elapsed())
        };
        drop(tightened);
        let results = join_all(
            members
                .iter()
                .zip(&generations)
                .map(|((v, name), &g)| v.commit_snapshot(name, g, stall)),
        )
        .await;
        let mut failed = None;
        let mut committed = Vec::with_capacity(results.len());
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(c) => committed.push((i, c)),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        let Some(e) = failed else {
            return Ok(committed.into_iter().map(|(_, c)| c).collect());
        };
        for (i, _) in committed {
            let (v, name) = members[i];
            if let Err(undo) = v.delete_snapshot_locked(name, false).await {
                log::error!(
                    "volume {}: cannot remove snapshot {name} of a failed group snapshot: {undo}",
                    v.name
                );
            }
        }
        Err(e)
    }

    /// Refuses a name in use, then sends most dirty and held data out
    /// before the pause, so little is left inside it: the origin flush
    /// first (it may take long, and writes keep being held meanwhile), then
    /// the buffer, last thing before the pause. Under `admin`.
    ///
    /// A volume with native snapshots lands every held write inside the
    /// pause, so its budget is lowered before that drain (and until the
    /// pause ends, when the returned guard drops): while the drain lands
    /// the whole buffer, writes keep coming but push back once
    /// [`NATIVE_PAUSE_WRITEBACK`] is held, and the pause lands only what
    /// they left. Why not a small budget always: each write over it drives
    /// a journal commit of its own (1 MiB writes after a snapshot ran at
    /// 0.44x of librbd with a 1 MiB budget).
    async fn ready_for_snapshot(&self, name: &str) -> Result<Option<Tightened<'_>>> {
        if self
            .manifest
            .lock()
            .unwrap()
            .snapshots
            .iter()
            .any(|s| s.name == name)
        {
            return Err(EngineError::AlreadyExists(format!(
                "snapshot {}@{name}",
                self.name
            )));
        }
        self.origin.flush().await?;
        let tightened = self
            .manifest
            .lock()
            .unwrap()
            .native_snapshots
            .then(|| self.writeback.tighten(NATIVE_PAUSE_WRITEBACK));
        self.drive().await?;
        Ok(tightened)
    }

    /// For a volume with native snapshots, while its gate is shut: lands
    /// every held write and takes the storage's snapshot of the origin for
    /// the generation about to close, which then holds that generation's
    /// image whole. Inside the pause, because a write of the next
    /// generation must not reach the origin before it; that costs the
    /// stall a drain of the buffer (drained just before the pause, with
    /// its budget lowered: at most [`NATIVE_PAUSE_WRITEBACK`] is left)
    /// and one snapshot create (an RBD header update: the OSDs then copy
    /// each object at its first overwrite, inside the cluster, instead of
    /// this daemon reading and writing every preserved chunk).
    async fn take_native_snapshot(&self, paused: &Paused<'_>) -> Result<()> {
        if !self.manifest.lock().unwrap().native_snapshots {
            return Ok(());
        }
        self.drive().await?;
        self.origin.flush().await?;
        Ok(self
            .storage
            .take_native_snapshot(paused.epoch().generation)?)
    }

    /// Closes the current generation while the gate is shut; returns it.
    fn close_generation(paused: &Paused<'_>) -> u64 {
        // Held writes stay held across the pause (committing them
        // inside it cost a journal flush of stall under load): the
        // snapshot's reads of the origin and the next generation's
        // preservations lay them over what they read until they land.
        let epoch = paused.epoch();
        let generation = epoch.generation;
        let mut live = epoch.live.to_vec();
        live.push(generation);
        paused.set(generation + 1, live);
        generation
    }

    /// Makes the snapshot of the closed `generation` durable and records
    /// it; on failure the generation is forgotten again. Under `admin`.
    async fn commit_snapshot(
        &self,
        name: &str,
        generation: u64,
        stall: std::time::Duration,
    ) -> Result<SnapshotCreated> {
        let committed = async {
            // Every write acknowledged before the pause is in generation
            // `generation` or earlier; those not preserved since live in
            // the origin, or are held: applied now and flushed, the
            // snapshot's image is durable before its commit point (a
            // clone's ownership of the chunks it copied up included).
            self.make_durable(false).await?;
            if self.manifest.lock().unwrap().native_snapshots {
                // Taken in the pause; opened here, outside it.
                self.storage.open_native_snapshot(generation)?;
            }
            try_join_all(
                self.partitions
                    .iter()
                    .map(|p| p.record_snapshot(generation)),
            )
            .await?;
            let mut manifest = self.manifest.lock().unwrap().clone();
            manifest.snapshots.push(SnapshotRecord {
                name: name.to_string(),
                generation,
                created_unix_ms: now_unix_ms(),
            });
            manifest.next_generation = generation + 1;
            self.storage
                .replace_manifest(manifest::MANIFEST, &manifest.to_bytes())?;
            let record = manifest.snapshots.last().unwrap().clone();
            *self.manifest.lock().unwrap() = manifest;
            Ok::<_, EngineError>(record)
        }
        .await;
        match committed {
            Ok(record) => Ok(SnapshotCreated {
                snapshot: SnapshotInfo {
                    name: record.name,
                    generation,
                    created_unix_ms: record.created_unix_ms,
                    exclusive_bytes: 0,
                },
                stall_us: stall.as_micros() as u64,
            }),
            Err(e) => {
                self.forget_generation(generation).await;
                Err(e)
            }
        }
    }

    /// Replaces the manifest with `change` applied. Under `admin`.
    fn update_manifest(&self, change: impl FnOnce(&mut Manifest)) -> Result<()> {
        let mut manifest = self.manifest.lock().unwrap().clone();
        change(&mut manifest);
        self.storage
            .replace_manifest(manifest::MANIFEST, &manifest.to_bytes())?;
        *self.manifest.lock().unwrap() = manifest;
        Ok(())
    }

    /// The volume's owner and access list (root and none for a manifest
    /// written before owners existed).
    pub fn access(&self) -> AccessRecord {
        self.manifest
            .lock()
            .unwrap()
            .access
            .clone()
            .unwrap_or_default()
    }

    /// Replaces the owner and access list; durable (the manifest) on return.
    pub async fn set_access(&self, access: AccessRecord) -> Result<()> {
        let _admin = self.admin.lock().await;
        self.update_manifest(|m| m.access = Some(access))
    }

    /// Sets (or, `None`, removes) the budget every write is admitted by.
    pub fn set_budget(&self, budget: Option<Arc<dyn SpaceBudget>>) {
        *self.budget.write().unwrap() = budget;
    }

    /// Whether `budget` is the one this volume's writes are admitted by.
    pub fn has_budget(&self, budget: &Arc<dyn SpaceBudget>) -> bool {
        self.budget
            .read()
            .unwrap()
            .as_ref()
            .is_some_and(|b| std::ptr::addr_eq(Arc::as_ptr(b), Arc::as_ptr(budget)))
    }

    /// Bytes the volume holds on its storage against a quota: the origin's
    /// and the change logs' allocated blocks (journals are metadata, not
    /// counted).
    pub fn quota_bytes(&self) -> u64 {
        self.origin.allocated_bytes().unwrap_or(0) + self.snapshot_bytes()
    }

    /// The change logs' allocated bytes: old data kept only for snapshots
    /// (a copy job's included).
    pub fn snapshot_bytes(&self) -> u64 {
        self.partitions.iter().map(Partition::store_bytes).sum()
    }

    /// Asks the budget, if any, to admit a request on `[offset, +len)` that
    /// allocates its length when `allocates`: at worst that plus, while a
    /// snapshot (or a copy job's) may need the old content or a clone must
    /// copy its parent's chunk up, one chunk per chunk touched.
    fn admit_growth(&self, offset: u64, len: u64, allocates: bool) -> Result<()> {
        let budget = self.budget.read().unwrap();
        let Some(budget) = budget.as_ref().filter(|b| !b.unlimited()) else {
            return Ok(());
        };
        let mut bytes = if allocates { len } else { 0 };
        if len > 0 && (!self.gate.epoch().live.is_empty() || self.layer().is_some()) {
            let chunks =
                ((offset + len - 1) >> self.chunk_shift) - (offset >> self.chunk_shift) + 1;
            bytes += chunks << self.chunk_shift;
        }
        budget.admit(bytes).map_err(EngineError::QuotaExceeded)
    }

    /// Makes the live volume's content equal to snapshot `name`'s by
    /// writing back, through the normal write path, only the chunks that
    /// changed since it (so newer snapshots keep their images and a later
    /// diff counts the rewritten chunks as changed). The caller makes sure
    /// nothing else writes meanwhile.
    ///
    /// Crash safety: everything acknowledged before is made durable, then
    /// the manifest marks the revert as begun (the commit point); a crash
    /// after it leaves a volume that [`Volume::open`] reverts again before
    /// anyone reads it (rewriting a chunk twice writes the same content),
    /// a crash before it leaves the pre-revert content.
    pub async fn revert(self: &Arc<Self>, name: &str) -> Result<Reverted> {
        let _admin = self.admin.lock().await;
        self.snapshot_generation_of(name)?;
        self.flush_all().await?;
        self.update_manifest(|m| m.reverting = Some(name.to_string()))?;
        self.finish_revert(name).await
    }

    /// The rewrite and commit of a revert whose begin is committed. Under `admin`.
    async fn finish_revert(self: &Arc<Self>, name: &str) -> Result<Reverted> {
        let generation = self.snapshot_generation_of(name).map_err(|_| {
            EngineError::Corrupt(format!(
                "volume {}: a revert to snapshot {name} was begun but the snapshot is gone",
                self.name
            ))
        })?;
        let changed = self.changed_between(generation, u64::MAX, 0, self.size)?;
        let live = self.live();
        let image = self.snapshot_view(name)?;
        let mut buf = AlignedBuf::zeroed(REVERT_STEP as usize);
        for range in &changed {
            let mut at = range.start;
            while at < range.end {
                let n = REVERT_STEP.min(range.end - at);
                for e in image.block_status(at, n)? {
                    if e.data {
                        let piece = &mut buf[..e.len as usize];
                        image.read(e.offset, piece).await?;
                        live.write(e.offset, piece, false).await?;
                    } else {
                        live.write_zeroes(e.offset, e.len, false).await?;
                    }
                }
                at += n;
            }
        }
        self.flush_all().await?;
        self.update_manifest(|m| m.reverting = None)?;
        log::info!("volume {}: reverted to snapshot {name}", self.name);
        Ok(Reverted {
            snapshot: name.to_string(),
            changed_bytes: changed.iter().map(|r| r.end - r.start).sum(),
        })
    }

    /// A clone's flatten progress (`None`: not a clone, or flattened).
    pub fn flatten_progress(&self) -> Option<FlattenProgress> {
        self.layer().map(|l| FlattenProgress {
            owned_chunks: l.owned_chunks(),
            total_chunks: l.chunks(),
        })
    }

    /// Whether a flatten was asked for and has not finished (it resumes
    /// after a restart: the caller starts it again).
    pub fn flattening(&self) -> bool {
        self.manifest.lock().unwrap().flattening
    }

    /// Records that a flatten of this clone was asked for.
    pub async fn begin_flatten(&self) -> Result<()> {
        let _admin = self.admin.lock().await;
        if self.layer().is_none() {
            return Err(EngineError::InvalidArgument(format!(
                "volume {} is not a clone (or is flattened already): it has no parent to copy from",
                self.name
            )));
        }
        self.update_manifest(|m| m.flattening = true)
    }

    /// Copies up to `count` chunks the clone does not own yet, from chunk
    /// `from` on, into its origin (as a first write would, so a concurrent
    /// write waits for it). Returns the chunk to go on from, or `None` once
    /// every chunk is owned.
    pub async fn flatten_step(&self, from: u64, count: u64) -> Result<Option<u64>> {
        let Some(layer) = self.layer() else {
            return Ok(None);
        };
        let mut chunks = Vec::new();
        let mut at = from;
        while chunks.len() < count as usize {
            match layer.next_unowned(at) {
                Some(c) => {
                    chunks.push(c);
                    at = c + 1;
                }
                None => break,
            }
        }
        let cs = self.chunk_size as u64;
        for window in chunks.chunks(PRESERVE_WINDOW as usize) {
            try_join_all(window.iter().map(|&c| {
                let len = cs.min(self.size - c * cs);
                layer.own(&self.origin, c * cs, len)
            }))
            .await?;
        }
        Ok(if chunks.is_empty() { None } else { Some(at) })
    }

    /// Ends a flatten whose steps copied every chunk: makes the copies and
    /// their ownership durable, then drops the parent from the manifest
    /// (the commit point) and lets go of the parent snapshot.
    pub async fn finish_flatten(&self) -> Result<()> {
        let _admin = self.admin.lock().await;
        let Some(layer) = self.layer() else {
            return Ok(());
        };
        if let Some(c) = layer.next_unowned(0) {
            return Err(EngineError::InvalidArgument(format!(
                "volume {}: chunk {c} is not copied yet; the flatten is not done",
                self.name
            )));
        }
        self.make_durable(false).await?;
        self.update_manifest(|m| {
            m.parent = None;
            m.flattening = false;
        })?;
        *self.layer.lock().unwrap() = None;
        self.layered.store(false, Ordering::Release);
        self.storage.remove(layer::OWNED_MAP).map_err(|e| {
            EngineError::Io(std::io::Error::new(
                e.kind(),
                format!(
                    "volume {} is flattened (independent of its parent) but its {} could \
                     not be removed: {e}; the next open of the volume removes it",
                    self.name,
                    layer::OWNED_MAP
                ),
            ))
        })?;
        log::info!("volume {}: flattened, independent of its parent", self.name);
        Ok(())
    }

    /// Drops `generation` from the live set and frees what only it needed.
    async fn forget_generation(&self, generation: u64) {
        let live = {
            let paused = self.gate.pause().await;
            let epoch = paused.epoch();
            let live: Vec<u64> = epoch
                .live
                .iter()
                .copied()
                .filter(|&g| g != generation)
                .collect();
            paused.set(epoch.generation, live.clone());
            live
        };
        if let Err(e) = try_join_all(self.partitions.iter().map(|p| p.collect_garbage(&live))).await
        {
            // Recovery collects it at the next open.
            log::warn!("volume {}: freeing snapshot data failed: {e}", self.name);
        }
        if self.manifest.lock().unwrap().native_snapshots {
            if let Err(e) = self.storage.drop_native_snapshot(generation) {
                log::warn!(
                    "volume {}: removing the native snapshot of generation {generation} \
                     failed: {e}; the next open removes it",
                    self.name
                );
            }
        }
    }

    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        let snapshots = self.manifest.lock().unwrap().snapshots.clone();
        let live: Vec<u64> = self.gate.epoch().live.to_vec();
        let mut exclusive = HashMap::new();
        for p in &self.partitions {
            p.exclusive_bytes(&live, &mut exclusive);
        }
        snapshots
            .into_iter()
            .map(|s| SnapshotInfo {
                exclusive_bytes: exclusive.get(&s.generation).copied().unwrap_or(0),
                name: s.name,
                generation: s.generation,
                created_unix_ms: s.created_unix_ms,
            })
            .collect()
    }

    /// Deletes a snapshot: the manifest without it is the commit point; then
    /// preserved versions no remaining snapshot needs are freed and their
    /// space punched out of the change logs.
    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let _admin = self.admin.lock().await;
        self.delete_snapshot_locked(name, false).await.map(drop)
    }

    /// [`Volume::delete_snapshot`] unless a [`View`] of any of this volume's
    /// snapshots is open: `Ok(false)` then, and nothing changed. A reader's
    /// image must not vanish under it; no view opens between the check and
    /// the delete (both happen under the manifest lock).
    pub async fn delete_snapshot_unless_read(&self, name: &str) -> Result<bool> {
        let _admin = self.admin.lock().await;
        self.delete_snapshot_locked(name, true).await
    }

    /// [`Volume::delete_snapshot`] for a caller that holds `admin`; whether
    /// it deleted (see [`Volume::delete_snapshot_unless_read`]).
    async fn delete_snapshot_locked(&self, name: &str, unless_read: bool) -> Result<bool> {
        let generation = {
            let mut current = self.manifest.lock().unwrap();
            if unless_read && self.snapshot_views() > 0 {
                return Ok(false);
            }
            let generation = self.generation_in(&current, name)?;
            let clones: Vec<String> = self
                .clones
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, g)| *g == generation)
                .map(|(c, _)| c.clone())
                .collect();
            if !clones.is_empty() {
                return Err(EngineError::InUse(format!(
                    "snapshot {}@{name} is the parent of clone(s) {}; delete them, or make them \
                     independent first with `snapblk volume flatten CLONE`",
                    self.name,
                    clones.join(", ")
                )));
            }
            let mut manifest = current.clone();
            manifest.snapshots.retain(|s| s.name != name);
            self.storage
                .replace_manifest(manifest::MANIFEST, &manifest.to_bytes())?;
            *current = manifest;
            generation
        };
        self.forget_generation(generation).await;
        self.compact_journals().await;
        Ok(true)
    }

    /// Compacts the journals a delete left mostly dead. Under `admin`, so no
    /// snapshot is half created; a failure leaves the old journal, to be
    /// compacted at a later delete or at open.
    async fn compact_journals(&self) {
        let live = self.gate.epoch().live.to_vec();
        // join_all, not try_join_all: a compaction holds its journal's commit
        // leadership and must not be dropped halfway.
        let results = join_all(self.partitions.iter().map(|p| p.compact_journal(&live))).await;
        for (p, result) in self.partitions.iter().zip(results) {
            if let Err(e) = result {
                let journal = manifest::journal_name(p.index);
                log::warn!("volume {}: compacting {journal} failed: {e}", self.name);
            }
        }
    }

    /// Makes everything durable; called on clean shutdown.
    pub async fn shutdown(&self) -> Result<()> {
        let _admin = self.admin.lock().await;
        let _paused = self.gate.pause().await;
        self.make_durable(false).await?;
        try_join_all(self.partitions.iter().map(Partition::flush_store)).await?;
        self.writeback.stop();
        Ok(())
    }

    /// What a held write owes after it was acknowledged to the buffer: a
    /// FUA write is made durable at once; a write that took the buffer past
    /// its budget drives the commit itself (back-pressure).
    ///
    /// A FUA write to a chunk a clone owns without its bit durable yet makes
    /// that ownership durable: without it the chunk would read from the
    /// parent again after a power cut, and the write would be lost.
    async fn after_holding(&self, holding: Holding, fua: bool, newly_owned: bool) -> Result<()> {
        match holding {
            Holding::Direct if fua && newly_owned => self.make_durable(false).await,
            Holding::Direct => Ok(()),
            Holding::Held { .. } if fua => self.flush_all().await,
            Holding::Held { over_budget: true } => self.drive().await,
            Holding::Held { over_budget: false } => Ok(()),
        }
    }

    fn partition_of(&self, chunk: u64) -> &Partition {
        &self.partitions[(chunk / self.chunks_per_partition) as usize]
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(EngineError::Misaligned { offset, len });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(EngineError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    fn chunks(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        (offset >> self.chunk_shift)..=((offset + len.max(1) - 1) >> self.chunk_shift)
    }

    /// Preserves, once, every chunk of the range that a live snapshot needs,
    /// a window of chunks at a time, each partition's part of a window in
    /// one batch; returns whether all those preservations are durable
    /// already.
    async fn preserve_range(&self, offset: u64, len: u64, epoch: &Epoch) -> Result<bool> {
        if epoch.live.is_empty() || len == 0 {
            return Ok(true);
        }
        let chunks = self.chunks(offset, len);
        let mut all_settled = true;
        let mut first = *chunks.start();
        while first <= *chunks.end() {
            let end = (first + PRESERVE_WINDOW).min(*chunks.end() + 1);
            let mut parts = Vec::new();
            let mut at = first;
            while at < end {
                let part_end =
                    ((at / self.chunks_per_partition + 1) * self.chunks_per_partition).min(end);
                parts.push(self.partition_of(at).preserve(
                    at..part_end,
                    epoch,
                    &self.origin,
                    &self.writeback,
                    self.size,
                ));
                at = part_end;
            }
            let settled = try_join_all(parts).await?;
            all_settled &= settled.iter().all(|&s| s);
            first = end;
        }
        Ok(all_settled)
    }

    /// [`Volume::ready_to_overwrite`] for a write with nothing to do first
    /// (not a clone, no hooks, no live snapshot), without its future: the
    /// common write takes no lock here (see [`Gate::enter_open`]). `None`:
    /// go the long way.
    fn admit_unprepared(&self) -> Option<Admitted<'_>> {
        if self.layered.load(Ordering::Acquire) {
            return None;
        }
        Some(Admitted {
            how: Admission::Open {
                _ticket: self.gate.enter_open()?,
            },
            settled: true,
            newly_owned: false,
        })
    }

    /// Runs the write hooks, preserves what the range's overwrite needs, then
    /// returns the ticket for the origin write. Hooks and preservation (which
    /// waits for journal flushes) run outside the gate, so a snapshot never
    /// waits for them; if the epoch changed meanwhile, they run again for the
    /// new one.
    async fn ready_to_overwrite(&self, offset: u64, len: u64) -> Result<Admitted<'_>> {
        // A clone copies up what it does not own first, so the origin holds
        // the whole chunk before a preservation reads it or a write lands.
        let newly_owned = match self.layer() {
            Some(layer) => layer.own(&self.origin, offset, len).await?,
            None => false,
        };
        // A write that prepares again under a new epoch with the same hooks
        // keeps their guards: given back and asked for again, a replication
        // link would count a write that never reached the origin as one
        // whose blocks hold anything, and read them whole at its next CP.
        let mut guarded: Option<(Epoch, Vec<WriteGuard>)> = None;
        loop {
            let epoch = self.gate.epoch();
            let guards = match guarded.take() {
                Some((before, guards)) if same_hooks(&before.hooks, &epoch.hooks) => guards,
                before => {
                    drop(before);
                    let mut guards = Vec::with_capacity(epoch.hooks.len());
                    for hook in epoch.hooks.iter() {
                        guards.push(hook.before_write(offset, len).await?);
                    }
                    guards
                }
            };
            // A hook may have made the write wait (a replication CP's
            // barrier) while the epoch changed (the CP's snapshot, then
            // the chunks it will not read released): preserving for the
            // old epoch would copy chunks for nothing.
            if !guards.is_empty() && self.gate.epoch_id() != epoch.id {
                guarded = Some((epoch, guards));
                continue;
            }
            let settled = self.preserve_range(offset, len, &epoch).await?;
            let ticket = self.gate.enter().await;
            if ticket.epoch_id == epoch.id {
                return Ok(Admitted {
                    how: Admission::Prepared {
                        _ticket: ticket,
                        epoch,
                        guards,
                    },
                    settled,
                    newly_owned,
                });
            }
            guarded = Some((epoch, guards));
        }
    }

    /// Puts `hook` in the write path of every write that has not yet
    /// reached its origin write.
    pub async fn add_write_hook(&self, hook: Arc<dyn WriteHook>) {
        let _admin = self.admin.lock().await;
        let paused = self.gate.pause().await;
        paused.change(|epoch| {
            epoch.hooks.push(hook);
        });
    }

    /// Takes `hook` out of the write path; no write runs it after this returns.
    pub async fn remove_write_hook(&self, hook: &Arc<dyn WriteHook>) {
        let _admin = self.admin.lock().await;
        let paused = self.gate.pause().await;
        paused.change(|epoch| {
            epoch.hooks.retain(|h| !Arc::ptr_eq(h, hook));
        });
    }

    /// Makes the caller the sole reader of snapshot `name`, able to give back
    /// chunks it has consumed (see [`SnapshotConsumer`]).
    pub async fn consume_snapshot(&self, name: &str) -> Result<SnapshotConsumer> {
        let _admin = self.admin.lock().await;
        let generation = self.snapshot_generation_of(name)?;
        let set = Arc::new(ChunkSet::new(self.size.div_ceil(self.chunk_size as u64)));
        let paused = self.gate.pause().await;
        paused.change(|epoch| {
            epoch.released.retain(|(g, _)| *g != generation);
            epoch.released.push((generation, set.clone()));
        });
        Ok(SnapshotConsumer {
            set,
            chunk_shift: self.chunk_shift,
        })
    }

    fn snapshot_generation_of(&self, name: &str) -> Result<u64> {
        self.generation_in(&self.manifest.lock().unwrap(), name)
    }

    fn generation_in(&self, manifest: &Manifest, name: &str) -> Result<u64> {
        manifest
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.generation)
            .ok_or_else(|| EngineError::NotFound(format!("snapshot {}@{name}", self.name)))
    }

    /// The byte ranges of `[offset, offset + len)` whose content differs
    /// between snapshot `from` and image `to` (a later snapshot's
    /// generation, or `u64::MAX` for the live volume), merged and in order.
    /// Computed from birth generations and preserved versions (see
    /// [`Partition::changed_chunks`]), at chunk granularity; memory grows
    /// with the changed chunks of the range, not with the volume.
    fn changed_between(
        &self,
        from: u64,
        to: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Range<u64>>> {
        self.check_range(offset, len)?;
        let epoch = self.gate.epoch();
        if epoch.live.binary_search(&from).is_err() {
            return Err(self.snapshot_gone(from));
        }
        if epoch.released.iter().any(|(g, _)| *g == from) {
            return Err(EngineError::InvalidArgument(format!(
                "generation {from} of {} is a copy job's private image; changes cannot be \
                 counted from it",
                self.name
            )));
        }
        let mut out: Vec<Range<u64>> = Vec::new();
        if len == 0 || from >= to {
            return Ok(out);
        }
        let cs = self.chunk_size as u64;
        let (first, end) = (offset >> self.chunk_shift, (offset + len).div_ceil(cs));
        let mut chunks = Vec::new();
        let mut at = first;
        while at < end {
            // One partition at a time: its chunks are consecutive, so the
            // output stays in order.
            let stop = ((at / self.chunks_per_partition + 1) * self.chunks_per_partition).min(end);
            chunks.clear();
            self.partition_of(at)
                .changed_chunks(from, to, at, stop, &mut chunks);
            for &c in &chunks {
                let r = (c * cs).max(offset)..((c + 1) * cs).min(offset + len);
                match out.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => out.push(r),
                }
            }
            at = stop;
        }
        Ok(out)
    }

    /// The generation of the image `snapshot` names (`None`: the live
    /// volume, `u64::MAX`).
    fn image_generation(&self, snapshot: Option<&str>) -> Result<u64> {
        snapshot.map_or(Ok(u64::MAX), |s| self.snapshot_generation_of(s))
    }

    /// What changed between snapshot `from` and `to` (a later snapshot, or
    /// the live volume for `None`) within `[offset, offset + len)`: merged
    /// byte ranges, chunk aligned (clipped to the range), in order. Never
    /// stale: computed from what the engine keeps for its snapshots anyway,
    /// not from a bitmap. `to` older than `from` is refused.
    pub fn changed_extents(
        &self,
        from: &str,
        to: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Range<u64>>> {
        let g1 = self.snapshot_generation_of(from)?;
        let g2 = self.image_generation(to)?;
        if g2 < g1 {
            return Err(EngineError::InvalidArgument(format!(
                "snapshot {}@{} is older than {}@{from}: name the older snapshot first",
                self.name,
                to.unwrap_or_default(),
                self.name
            )));
        }
        self.changed_between(g1, g2, offset, len)
    }

    /// Reads snapshot `generation`: each chunk from its preserved version if
    /// one covers the generation, else from the origin. An origin read is
    /// checked afterwards and redone if a writer began preserving-then-
    /// overwriting that chunk meanwhile.
    async fn read_snapshot(
        &self,
        generation: u64,
        offset: u64,
        buf: &mut [u8],
        reuse: Reuse,
    ) -> Result<()> {
        let cs = self.chunk_size as u64;
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            let chunk = pos >> self.chunk_shift;
            let in_chunk = pos - chunk * cs;
            let n = ((cs - in_chunk) as usize).min(buf.len() - at);
            let part = self.partition_of(chunk);
            let piece = &mut buf[at..at + n];
            loop {
                match part.source(chunk, generation) {
                    Source::Zero => piece.fill(0),
                    Source::Store(slot) => part.read_store(slot, in_chunk, piece).await?,
                    Source::Native => {
                        self.storage
                            .read_native_snapshot(generation, piece, pos)
                            .await?
                    }
                    Source::Gone => return Err(self.snapshot_gone(generation)),
                    Source::Origin => {
                        // Writes of this snapshot's generation may still be
                        // held (a snapshot does not wait for them to land).
                        let held = self.writeback.overlapping(pos, n as u64);
                        self.read_base(piece, pos, reuse).await?;
                        if !part.origin_still_valid(chunk, generation) {
                            continue;
                        }
                        held.iter().for_each(|h| h.overlay(pos, piece));
                    }
                }
                break;
            }
            at += n;
        }
        Ok(())
    }

    fn snapshot_gone(&self, generation: u64) -> EngineError {
        EngineError::SnapshotGone(format!("{} (generation {generation})", self.name))
    }

    fn snapshot_extents(&self, generation: u64, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let cs = self.chunk_size as u64;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| match out.last_mut() {
            Some(last) if last.data == e.data && last.offset + last.len == e.offset => {
                last.len += e.len
            }
            _ => out.push(e),
        };
        let mut pos = offset;
        while pos < offset + len {
            let chunk = pos >> self.chunk_shift;
            let end = ((chunk + 1) * cs).min(offset + len);
            match self.partition_of(chunk).source(chunk, generation) {
                // Held writes are not in the origin's map yet: data.
                Source::Origin if !self.writeback.overlapping(pos, end - pos).is_empty() => {
                    push(Extent {
                        offset: pos,
                        len: end - pos,
                        data: true,
                    })
                }
                Source::Origin => self
                    .base_extents(pos, end - pos)?
                    .into_iter()
                    .for_each(&mut push),
                Source::Zero => push(Extent {
                    offset: pos,
                    len: end - pos,
                    data: false,
                }),
                Source::Store(_) | Source::Native => push(Extent {
                    offset: pos,
                    len: end - pos,
                    data: true,
                }),
                Source::Gone => return Err(self.snapshot_gone(generation)),
            }
            pos = end;
        }
        Ok(out)
    }
}

impl View {
    /// This view for a reader that passes over the volume once (a
    /// replication sync, a copy job): its reads of the origin leave the
    /// page cache as they found it ([`Reuse::Once`]).
    pub fn for_one_pass(mut self) -> View {
        self.reuse = Reuse::Once;
        self
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    pub fn snapshot_name(&self) -> Option<&str> {
        self.snapshot.as_ref().map(|(name, _)| name.as_str())
    }

    /// The generation of the snapshot this view reads (`None`: live).
    pub fn generation(&self) -> Option<u64> {
        self.snapshot.as_ref().map(|(_, g)| *g)
    }

    pub fn size(&self) -> u64 {
        self.volume.size
    }

    pub fn read_only(&self) -> bool {
        self.snapshot.is_some()
    }

    /// The snapshot generation this view reads, after checking it still exists.
    fn snapshot_generation(&self) -> Result<Option<u64>> {
        match &self.snapshot {
            None => Ok(None),
            Some((name, generation)) => {
                if self
                    .volume
                    .gate
                    .epoch()
                    .live
                    .binary_search(generation)
                    .is_err()
                {
                    return Err(EngineError::SnapshotGone(format!(
                        "{}@{name}",
                        self.volume.name
                    )));
                }
                Ok(Some(*generation))
            }
        }
    }

    fn writable(&self, offset: u64, len: u64) -> Result<()> {
        self.volume.check_range(offset, len)?;
        if self.read_only() {
            return Err(EngineError::ReadOnly);
        }
        Ok(())
    }

    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_with(offset, buf, self.reuse).await
    }

    /// [`View::read`] as a reader with this use of the page cache (a clone's
    /// one-pass reader reads its parent snapshot's view so too).
    pub(crate) async fn read_with(&self, offset: u64, buf: &mut [u8], reuse: Reuse) -> Result<()> {
        let (started, len) = (stats::now_ns(), buf.len() as u64);
        let result = self.read_untimed(offset, buf, reuse).await;
        self.volume
            .io_stats
            .record(IoKind::Read, len, started, &result);
        result
    }

    async fn read_untimed(&self, offset: u64, buf: &mut [u8], reuse: Reuse) -> Result<()> {
        let volume = &self.volume;
        volume.check_range(offset, buf.len() as u64)?;
        match self.snapshot_generation()? {
            None => {
                // Held writes are taken before the origin is read and laid
                // over it: one applied meanwhile is laid again, unchanged.
                let held = volume.writeback.overlapping(offset, buf.len() as u64);
                // Not `read_base`: its future nests the origin's, which cost
                // every read of the live volume ~120 instructions more
                // (scripts/bench-instructions).
                match volume.layer() {
                    Some(layer) => layer.read(&volume.origin, buf, offset, reuse).await?,
                    None => volume.origin.read(buf, offset, reuse).await?,
                }
                held.iter().for_each(|h| h.overlay(offset, buf));
                Ok(())
            }
            Some(generation) => volume.read_snapshot(generation, offset, buf, reuse).await,
        }
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let write = self.write_untimed(offset, data, None, fua);
        self.timed_write(data.len(), write).await
    }

    /// As [`View::write`], from a buffer the origin's storage may keep
    /// instead of copying it (see [`Backend::write_owned_at`]).
    pub async fn write_owned(&self, offset: u64, data: &Arc<AlignedBuf>, fua: bool) -> Result<()> {
        let write = self.write_untimed(offset, data, Some(data), fua);
        self.timed_write(data.len(), write).await
    }

    /// A read into memory the daemon cannot address: a buffer the kernel
    /// registered with this thread's ring (ublk zero copy, see
    /// [`crate::frontend::ublk`]). `read(fd, offset)` moves the bytes from
    /// the origin file straight into it where the live view reads them from
    /// the origin alone: a file-backed volume, no clone layer, no held write
    /// over the range (held writes are laid over what the origin holds, in
    /// memory). Returns false where that is not so, or where the kernel
    /// refused the I/O (memory O_DIRECT cannot take, a file system without
    /// it): the caller then reads with [`View::read`] and copies.
    pub async fn read_registered<F, Fut>(&self, offset: u64, len: u64, read: F) -> Result<bool>
    where
        F: FnOnce(RawFd, u64) -> Fut,
        Fut: Future<Output = io::Result<()>>,
    {
        let volume = &self.volume;
        volume.check_range(offset, len)?;
        if self.snapshot.is_some()
            || self.reuse == Reuse::Once
            || volume.layer().is_some()
            || !volume.writeback.overlapping(offset, len).is_empty()
        {
            return Ok(false);
        }
        let Some(fd) = volume.origin.registered_read_target(offset, len) else {
            return Ok(false);
        };
        let started = stats::now_ns();
        let result = read(fd, offset).await;
        if result.as_ref().is_err_and(refused_registered) {
            return Ok(false);
        }
        volume.io_stats.record(IoKind::Read, len, started, &result);
        result?;
        Ok(true)
    }

    /// A write from memory the daemon cannot address (see
    /// [`View::read_registered`]): `write(fd, offset, rw_flags)` moves the
    /// bytes to the origin file where nothing in the engine needs them: a
    /// file-backed volume, no clone layer, no write hook (replication, a
    /// copy job: they keep or look at the bytes), and every preservation
    /// the range needs durable with no held write on its chunks (the first
    /// overwrite of a chunk after a snapshot is held in the write-back
    /// buffer, in memory). Returns false, having written nothing, where
    /// that is not so or the kernel refused the I/O: the caller then copies
    /// the bytes in and calls [`View::write`], which finds the preservation
    /// this call queued already under way.
    pub async fn write_registered<F, Fut>(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        write: F,
    ) -> Result<bool>
    where
        F: FnOnce(RawFd, u64, i32) -> Fut,
        Fut: Future<Output = io::Result<()>>,
    {
        self.writable(offset, len)?;
        let volume = &self.volume;
        // Declined before the admission: a storage that is not a file
        // would decline every write only after it (and admit it again).
        if volume.layer().is_some() || !matches!(volume.origin, Backend::File(_)) {
            return Ok(false);
        }
        let started = stats::now_ns();
        let admitted = match volume.admit_unprepared() {
            Some(admitted) => admitted,
            None => {
                // Checked before the hooks are asked: a guard given back
                // unused makes a replication link read its blocks whole.
                if !volume.gate.epoch().hooks.is_empty() {
                    return Ok(false);
                }
                volume.ready_to_overwrite(offset, len).await?
            }
        };
        if admitted.has_hooks() || !volume.writeback.goes_direct(offset, len, admitted.settled) {
            // Not admitted against the budget yet: the copying write that
            // follows is, once.
            return Ok(false);
        }
        // Settled: this admission preserved nothing, so asking the budget
        // after it asks before anything of this write is allocated.
        volume.admit_growth(offset, len, true)?;
        // Only now: the target drops the range's cached pages first, which
        // a declined write would have the copying one do again.
        let Some((fd, rw_flags)) = volume.origin.registered_write_target(offset, len, fua) else {
            return Ok(false);
        };
        let result = write(fd, offset, rw_flags).await;
        if result.as_ref().is_err_and(refused_registered) {
            return Ok(false);
        }
        let newly_owned = admitted.newly_owned;
        drop(admitted);
        let result = match result {
            Ok(()) => {
                volume
                    .after_holding(Holding::Direct, fua, newly_owned)
                    .await
            }
            Err(e) => Err(e.into()),
        };
        volume.io_stats.record(IoKind::Write, len, started, &result);
        result.map(|()| true)
    }

    async fn timed_write(&self, len: usize, write: impl Future<Output = Result<()>>) -> Result<()> {
        let started = stats::now_ns();
        let result = write.await;
        self.volume
            .io_stats
            .record(IoKind::Write, len as u64, started, &result);
        result
    }

    async fn write_untimed(
        &self,
        offset: u64,
        data: &[u8],
        owned: Option<&Arc<AlignedBuf>>,
        fua: bool,
    ) -> Result<()> {
        self.writable(offset, data.len() as u64)?;
        let volume = &self.volume;
        let len = data.len() as u64;
        volume.admit_growth(offset, len, true)?;
        let mut admitted = match volume.admit_unprepared() {
            Some(admitted) => admitted,
            None => volume.ready_to_overwrite(offset, len).await?,
        };
        let holding = volume.writeback.hold(offset, len, admitted.settled, || {
            let mut copy = AlignedBuf::for_overwrite(data.len());
            copy.copy_from_slice(data);
            HeldOp::Data(Arc::new(copy))
        });
        if let Holding::Direct = holding {
            volume.write_origin(data, owned, offset, fua).await?;
        }
        admitted.applied(offset, Change::Data(data));
        let newly_owned = admitted.newly_owned;
        drop(admitted);
        volume.after_holding(holding, fua, newly_owned).await
    }

    /// Makes every write completed so far durable, from any connection:
    /// commits the queued preservations, applies the held writes, then
    /// flushes the origin.
    pub async fn flush(&self) -> Result<()> {
        let started = stats::now_ns();
        let result = self.volume.flush_all().await;
        self.volume
            .io_stats
            .record(IoKind::Flush, 0, started, &result);
        result
    }

    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, false).await
    }

    /// Zeroes a range; `keep_allocated` (NBD's NO_HOLE) keeps it allocated,
    /// otherwise the space goes back to the filesystem.
    pub async fn write_zeroes(&self, offset: u64, len: u64, keep_allocated: bool) -> Result<()> {
        let started = stats::now_ns();
        let result = self.zero_untimed(offset, len, keep_allocated).await;
        self.volume
            .io_stats
            .record(IoKind::Zero, len, started, &result);
        result
    }

    async fn zero_untimed(&self, offset: u64, len: u64, keep_allocated: bool) -> Result<()> {
        self.writable(offset, len)?;
        let volume = &self.volume;
        volume.admit_growth(offset, len, keep_allocated)?;
        let step = ZEROING_STEP_CHUNKS << volume.chunk_shift;
        let mut at = offset;
        while at < offset + len {
            // Steps end on chunk boundaries, so each chunk is in one step.
            let end = ((at / step + 1) * step).min(offset + len);
            let n = end - at;
            let mut admitted = volume.ready_to_overwrite(at, n).await?;
            let holding = volume
                .writeback
                .hold(at, n, admitted.settled, || HeldOp::Zeroes {
                    keep_allocated,
                });
            if let Holding::Direct = holding {
                volume.zero_origin(at, n, keep_allocated).await?;
            }
            admitted.applied(at, Change::Zeroes(n));
            drop(admitted);
            volume.after_holding(holding, false, false).await?;
            at = end;
        }
        Ok(())
    }

    /// True if every chunk of the range reads from the origin in this view
    /// (always for the live view). A caller that read the origin itself
    /// (a copy job's `copy_file_range`) asks again afterwards: true then
    /// means no write began overwriting those chunks meanwhile.
    pub fn reads_origin(&self, offset: u64, len: u64) -> Result<bool> {
        let volume = &self.volume;
        volume.check_range(offset, len)?;
        // A clone's chunks it does not own are not in its origin.
        if volume.layer().is_some_and(|l| !l.owns_range(offset, len)) {
            return Ok(false);
        }
        let Some(generation) = self.snapshot_generation()? else {
            return Ok(volume.writeback.overlapping(offset, len).is_empty());
        };
        // Held writes are part of the image but not of the origin yet.
        Ok(volume.writeback.overlapping(offset, len).is_empty()
            && volume
                .chunks(offset, len)
                .all(|c| volume.partition_of(c).origin_still_valid(c, generation)))
    }

    /// The snapshots older than this view's image, oldest first: those a
    /// change map ([`View::changed_since`]) can start from.
    pub fn older_snapshots(&self) -> Vec<String> {
        let to = self.snapshot.as_ref().map_or(u64::MAX, |(_, g)| *g);
        let manifest = self.volume.manifest.lock().unwrap();
        manifest
            .snapshots
            .iter()
            .filter(|s| s.generation < to)
            .map(|s| s.name.clone())
            .collect()
    }

    /// The ranges of `[offset, offset + len)` where this view's image
    /// differs from snapshot `from` (see [`Volume::changed_extents`]).
    pub fn changed_since(&self, from: &str, offset: u64, len: u64) -> Result<Vec<Range<u64>>> {
        let to = self.snapshot_generation()?.unwrap_or(u64::MAX);
        let g1 = self.volume.snapshot_generation_of(from)?;
        if g1 >= to {
            return Err(EngineError::InvalidArgument(format!(
                "snapshot {}@{from} is not older than this image",
                self.volume.name
            )));
        }
        self.volume.changed_between(g1, to, offset, len)
    }

    /// Allocation map: `data: false` extents read as zeros.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let volume = &self.volume;
        volume.check_range(offset, len)?;
        match self.snapshot_generation()? {
            None if volume.writeback.overlapping(offset, len).is_empty() => {
                volume.base_extents(offset, len)
            }
            // Held writes are not in the origin's map yet: report the range
            // as data rather than guess (data is always a safe answer).
            None => Ok(vec![Extent {
                offset,
                len,
                data: true,
            }]),
            Some(generation) => volume.snapshot_extents(generation, offset, len),
        }
    }
}

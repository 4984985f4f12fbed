//! One partition: a fixed slice of the volume's chunks with its own journal,
//! change-log store and chunk map (seed 004's per-partition snapshot data).
//!
//! The copy-on-write decision lives here, in [`Partition::preserve`]: a chunk
//! whose origin content some live snapshot still needs is copied once into the
//! store, its record made durable, and only then may the origin be
//! overwritten. One preserved version serves every snapshot whose generation
//! falls in its range, so a write costs the same with 1 or 100 snapshots.
//!
//! The store grows ahead of its slots ([`Partition::grow_ahead`]): a direct
//! write past a file's end is one ext4 takes its inode lock for exclusively
//! and waits on under it, so appends run one at a time whatever the queue
//! depth; writes into blocks allocated inside the size run in parallel. The
//! reserve holds no data a record points at, so a crash can leave it or not;
//! the next open cuts it off, and it is not counted as held by snapshots.

use super::error::Result;
use super::gate::Epoch;
use super::gather::Gather;
use super::journal::{in_store, slot_crc, Journal, Record, NATIVE_SLOT, ZERO_SLOT};
use super::writeback::WriteBack;
use crate::backend::{Backend, Reuse};
use crate::runtime::AlignedBuf;
use futures::channel::oneshot;
use futures::future::try_join_all;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Old content of one chunk, valid for snapshots of generation `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub start: u64,
    pub end: u64,
    pub slot: u64,
}

#[derive(Default, Debug)]
struct ChunkState {
    /// Generation in which the origin content was born (last preserved-over).
    birth: u64,
    /// Ordered by `start`; their ranges tile `[first.start, birth)`.
    versions: Vec<Version>,
}

#[derive(Default)]
struct State {
    chunks: HashMap<u64, ChunkState>,
    /// Chunks being preserved now, with the writers waiting for it.
    preserving: HashMap<u64, Vec<oneshot::Sender<()>>>,
    /// Chunks whose newest preservation is queued in this journal batch and
    /// may not be durable yet: writes over them are held (see `writeback`).
    unsettled: HashMap<u64, u64>,
    /// Slots no record points at, below `next_slot`. Taken lowest first, so
    /// a batch of reused slots forms runs a few vectored writes cover (a
    /// deleted snapshot frees its slots in the random order of the chunk
    /// map, and a stack of them scattered every batch over the store).
    free_slots: BTreeSet<u64>,
    next_slot: u64,
    /// The store's size in slots, as this process grew it ahead.
    grown_to: u64,
    growing: bool,
    /// Whether growing allocated blocks the store's allocated bytes count.
    reserve_allocated: bool,
    /// Generations of partition snapshots recorded in this journal, less
    /// those of snapshots deleted since the partition was opened.
    recorded_snapshots: Vec<u64>,
}

impl State {
    fn alloc_slot(&mut self) -> u64 {
        self.free_slots.pop_first().unwrap_or_else(|| {
            self.next_slot += 1;
            self.next_slot - 1
        })
    }
}

/// Where a snapshot's view of one chunk lives right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The origin still holds it (born at or before the snapshot).
    Origin,
    Zero,
    Store(u64),
    /// The storage's native snapshot of the generation read holds it.
    Native,
    /// No version covers the generation: the snapshot was deleted.
    Gone,
}

/// Chunks one preservation sends to the store: its read buffers, and each
/// chunk.
#[derive(Default)]
struct ToStore {
    bufs: Vec<AlignedBuf>,
    chunks: Vec<ToSlot>,
}

/// One chunk on its way to a slot.
#[derive(Clone, Copy)]
struct ToSlot {
    /// Its index among the caller's versions.
    tag: usize,
    /// Its buffer in [`ToStore::bufs`] and its place in that buffer.
    buf: usize,
    at: usize,
    /// The chunk, and whether its buffer holds exactly what the origin
    /// does (a whole chunk, no held write over it), so the slot may share
    /// the origin's blocks instead ([`worth_cloning`]).
    chunk: u64,
    clonable: bool,
}

impl ToStore {
    /// `stored`: (index in `buf` and among the versions from `first_tag`,
    /// clonable) of the chunks of a run that starts at `first_chunk`.
    fn add(
        &mut self,
        buf: AlignedBuf,
        stored: &[(usize, bool)],
        first_tag: usize,
        first_chunk: u64,
    ) {
        let b = self.bufs.len();
        self.bufs.push(buf);
        self.chunks
            .extend(stored.iter().map(|&(i, clonable)| ToSlot {
                tag: first_tag + i,
                buf: b,
                at: i,
                chunk: first_chunk + i as u64,
                clonable,
            }));
    }
}

/// Store writes per partition in flight at once; more preservations wait
/// and go out together in the next one (see [`gather`](super::gather)).
const STORE_WRITERS: usize = 2;
/// The most one gathered store write carries (at least one preservation).
const STORE_BATCH_BYTES: usize = 8 << 20;
/// Buffers in one vectored write, under the kernel's IOV_MAX of 1024.
const MAX_WRITE_PIECES: usize = 512;
/// The shortest run of chunks, consecutive in the origin and in the store,
/// preserved by sharing the origin's blocks (reflink) instead of a copy:
/// at least [`CLONE_MIN_CHUNKS`] chunks and the store's
/// [`Backend::clone_min_bytes`] (512 KiB on a file system: 8 of the default
/// 64 KiB chunks, 128 of 4 KiB, 2 of 1 MiB). In bytes, so small chunks do
/// not clone short runs; in chunks too, so a large chunk under one small
/// write is copied.
const CLONE_MIN_CHUNKS: usize = 2;

fn worth_cloning(chunks: usize, chunk_size: u64, min_bytes: u64) -> bool {
    chunks >= CLONE_MIN_CHUNKS && chunks as u64 * chunk_size >= min_bytes
}

/// The same failure for every preservation of a failed batch (a full disk
/// must still read as ENOSPC to each).
fn same_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

pub struct Partition {
    pub index: u32,
    chunk_size: u64,
    /// The volume's snapshots are native ones (see `NATIVE_SLOT`): a
    /// preservation records where the old content is and copies nothing.
    native: bool,
    journal: Journal,
    store: Backend,
    state: Mutex<State>,
    /// Chunks copied out since the partition opened (metrics).
    preserved: AtomicU64,
    /// Chunks whose slot shares the origin's blocks (see [`worth_cloning`]).
    cloned: AtomicU64,
    store_writes: Gather<ToStore, io::Result<Vec<(usize, u64)>>>,
}

impl Partition {
    /// Builds the partition from its replayed journal.
    pub fn recover(
        index: u32,
        chunk_size: u32,
        native: bool,
        journal: Journal,
        store: Backend,
        records: &[Record],
    ) -> Self {
        let mut state = State::default();
        for record in records {
            match *record {
                Record::Preserve {
                    chunk,
                    slot,
                    start,
                    end,
                    ..
                } => {
                    let c = state.chunks.entry(chunk).or_default();
                    // One version per chunk and start, as compaction keeps
                    // them: of a version recorded twice (only a damaged
                    // journal does that) the last record counts.
                    c.versions.retain(|v| v.start != start);
                    c.versions.push(Version { start, end, slot });
                    c.birth = c.birth.max(end);
                }
                Record::Free { chunk, start } => {
                    if let Some(c) = state.chunks.get_mut(&chunk) {
                        c.versions.retain(|v| v.start != start);
                        if c.versions.is_empty() {
                            state.chunks.remove(&chunk);
                        }
                    }
                }
                Record::PartitionSnapshot { generation } => {
                    state.recorded_snapshots.push(generation)
                }
                Record::Commit => {}
            }
        }
        let mut used: Vec<u64> = Vec::new();
        for c in state.chunks.values_mut() {
            c.versions.sort_by_key(|v| v.start);
            used.extend(c.versions.iter().map(|v| v.slot).filter(|&s| in_store(s)));
        }
        used.sort_unstable();
        // A slot two versions name (a damaged journal again) is used once:
        // counted twice, it would hide the slot after it from the walk below,
        // which would then hand that used slot out as free.
        used.dedup();
        state.next_slot = used.last().map_or(0, |&s| s + 1);
        state.grown_to = state.next_slot;
        let mut used = used.into_iter().peekable();
        for slot in 0..state.next_slot {
            if used.peek() == Some(&slot) {
                used.next();
            } else {
                state.free_slots.insert(slot);
            }
        }
        Partition {
            index,
            chunk_size: chunk_size as u64,
            native,
            journal,
            store,
            state: Mutex::new(state),
            preserved: AtomicU64::new(0),
            cloned: AtomicU64::new(0),
            store_writes: Gather::new(STORE_WRITERS, STORE_BATCH_BYTES),
        }
    }

    /// Cuts the store off after its last used slot: the grow-ahead reserve
    /// of the previous run, or slots of preservations a crash left
    /// unrecorded. No record points past it, so nothing is lost.
    pub async fn trim_store(&self) -> Result<()> {
        let end = self.state.lock().unwrap().next_slot * self.chunk_size;
        if self.store.size()? > end {
            self.store.truncate(end).await?;
        }
        Ok(())
    }

    pub fn recorded_snapshots(&self) -> Vec<u64> {
        self.state.lock().unwrap().recorded_snapshots.clone()
    }

    /// Highest generation any preserved version ends at.
    pub fn max_version_end(&self) -> u64 {
        let state = self.state.lock().unwrap();
        state
            .chunks
            .values()
            .flat_map(|c| c.versions.iter().map(|v| v.end))
            .max()
            .unwrap_or(0)
    }

    /// Makes sure every chunk of `chunks` (all of this partition) may be
    /// overwritten by a write of `epoch`: preserves the current origin
    /// content of those a live snapshot needs, or waits for a concurrent
    /// writer that is doing so. The preservations' records are queued, not
    /// committed: returns whether they (or earlier ones of these chunks) are
    /// all durable yet. Within one epoch a chunk is preserved at most once,
    /// so `true` stays true until the epoch changes.
    ///
    /// The chunks this call claims are copied out together (see
    /// [`Partition::copy_out`]): one write of many chunks costs one origin
    /// read, one store write and one journal enqueue, not one of each per
    /// chunk.
    pub async fn preserve(
        &self,
        chunks: Range<u64>,
        epoch: &Epoch,
        origin: &Backend,
        held: &WriteBack,
        volume_size: u64,
    ) -> Result<bool> {
        let mut settled = true;
        let mut pending: Vec<u64> = chunks.collect();
        while !pending.is_empty() {
            let mut claimed: Vec<(u64, Version)> = Vec::new();
            let mut waits = Vec::new();
            {
                let mut state = self.state.lock().unwrap();
                for &chunk in &pending {
                    let birth = state.chunks.get(&chunk).map_or(0, |c| c.birth);
                    if !epoch.must_preserve(chunk, birth) {
                        settled &= self.settled(&mut state, chunk);
                        continue;
                    }
                    match state.preserving.get_mut(&chunk) {
                        Some(waiters) => {
                            let (tx, rx) = oneshot::channel();
                            waiters.push(tx);
                            waits.push((chunk, rx));
                        }
                        None => {
                            state.preserving.insert(chunk, Vec::new());
                            claimed.push((
                                chunk,
                                Version {
                                    start: birth,
                                    end: epoch.generation,
                                    slot: 0,
                                },
                            ));
                        }
                    }
                }
            }
            if !claimed.is_empty() {
                settled = false;
                self.finish_claims(
                    &claimed,
                    self.copy_out(&claimed, origin, held, volume_size).await,
                )?;
            }
            // Either outcome of a wait (done, or the preserver failed)
            // means: look at that chunk again.
            pending.clear();
            for (chunk, wait) in waits {
                let _ = wait.await;
                pending.push(chunk);
            }
        }
        Ok(settled)
    }

    /// Installs the versions `copied` made of the `claimed` chunks (a
    /// failed copy gave its slots back itself), then wakes the writers
    /// waiting for those chunks.
    fn finish_claims(
        &self,
        claimed: &[(u64, Version)],
        copied: Result<(Vec<Version>, u64)>,
    ) -> Result<()> {
        let waiters: Vec<_> = {
            let mut state = self.state.lock().unwrap();
            if let Ok((versions, batch)) = &copied {
                for ((chunk, _), version) in claimed.iter().zip(versions) {
                    let c = state.chunks.entry(*chunk).or_default();
                    c.versions.push(*version);
                    c.birth = version.end;
                    state.unsettled.insert(*chunk, *batch);
                }
                self.preserved
                    .fetch_add(claimed.len() as u64, Ordering::Relaxed);
            }
            claimed
                .iter()
                .flat_map(|(chunk, _)| state.preserving.remove(chunk).unwrap_or_default())
                .collect()
        };
        for waiter in waiters {
            let _ = waiter.send(());
        }
        copied.map(drop)
    }

    fn settled(&self, state: &mut State, chunk: u64) -> bool {
        match state.unsettled.get(&chunk) {
            None => true,
            Some(&batch) if batch <= self.journal.durable_batch() => {
                state.unsettled.remove(&chunk);
                true
            }
            Some(_) => false,
        }
    }

    /// Commits every queued record (preservations included); then forgets
    /// which chunks were waiting for that.
    pub async fn sync_journal(&self) -> Result<()> {
        self.journal.sync().await?;
        let durable = self.journal.durable_batch();
        self.state
            .lock()
            .unwrap()
            .unsettled
            .retain(|_, batch| *batch > durable);
        Ok(())
    }

    /// Copies the `claimed` chunks' origin content (ascending) into the
    /// store and queues their records in one batch; returns the versions as
    /// recorded and the journal batch that will hold them.
    async fn copy_out(
        &self,
        claimed: &[(u64, Version)],
        origin: &Backend,
        held: &WriteBack,
        volume_size: u64,
    ) -> Result<(Vec<Version>, u64)> {
        let mut versions: Vec<Version> = claimed.iter().map(|&(_, v)| v).collect();
        let mut crcs = vec![0; claimed.len()];
        if self.native {
            // Every snapshot in the versions' ranges took its native
            // snapshot with every write of its generation in the origin
            // (see `Volume::take_native_snapshot`): nothing to copy.
            versions.iter_mut().for_each(|v| v.slot = NATIVE_SLOT);
        } else {
            let mut to_store = ToStore::default();
            let mut first = 0;
            while first < claimed.len() {
                // A run of consecutive chunks: one read of the origin.
                let mut end = first + 1;
                while end < claimed.len() && claimed[end].0 == claimed[end - 1].0 + 1 {
                    end += 1;
                }
                let run = self
                    .read_run(
                        claimed[first].0,
                        &mut versions[first..end],
                        &mut crcs[first..end],
                        origin,
                        held,
                        volume_size,
                    )
                    .await?;
                if let Some((data, stored)) = run {
                    to_store.add(data, &stored, first, claimed[first].0);
                }
                first = end;
            }
            if !to_store.chunks.is_empty() {
                let slots = self.store_chunks(to_store, origin).await?;
                for (i, slot) in slots {
                    versions[i].slot = slot;
                }
            }
        }
        let records: Vec<Record> = claimed
            .iter()
            .zip(&versions)
            .zip(crcs)
            .map(|((&(chunk, _), v), data_crc)| Record::Preserve {
                chunk,
                slot: v.slot,
                start: v.start,
                end: v.end,
                data_crc,
            })
            .collect();
        match self.journal.enqueue(&records) {
            Ok(batch) => Ok((versions, batch)),
            Err(e) => {
                // Written but never to be recorded: the slots are free.
                let slots = versions.iter().map(|v| v.slot).filter(|&s| in_store(s));
                self.state.lock().unwrap().free_slots.extend(slots);
                Err(e)
            }
        }
    }

    /// Reads the consecutive chunks from `first_chunk` (one per version) as
    /// the snapshots need them: the origin with the held writes over it.
    /// Sets a version's slot to `ZERO_SLOT` (and its crc stays 0) where the
    /// chunk holds only zeros; returns the data and the indexes of the
    /// chunks that go to the store, if any do, each with whether its data
    /// is the origin's own (see [`ToSlot::clonable`]).
    async fn read_run(
        &self,
        first_chunk: u64,
        versions: &mut [Version],
        crcs: &mut [u32],
        origin: &Backend,
        held: &WriteBack,
        volume_size: u64,
    ) -> Result<Option<(AlignedBuf, Vec<(usize, bool)>)>> {
        let cs = self.chunk_size;
        let offset = first_chunk * cs;
        let len = (versions.len() as u64 * cs).min(volume_size - offset);
        // The chunks' content is the origin with the writes still held
        // over it (all of earlier generations: this generation's writes to
        // these chunks wait for this preservation).
        let held = held.overlapping(offset, len);
        // A chunk the origin never allocated is preserved as zeros without
        // reading it: a discard of a large sparse volume under a snapshot
        // would otherwise read (and zero-check) every byte of its holes.
        let extents = origin.extents(offset, len)?;
        let touches = |i: usize, o: u64, l: u64| {
            let (lo, hi) = (offset + i as u64 * cs, offset + (i as u64 + 1) * cs);
            o < hi && lo < o + l
        };
        let held_over: Vec<bool> = (0..versions.len())
            .map(|i| held.iter().any(|h| touches(i, h.offset, h.len)))
            .collect();
        let needs_read: Vec<bool> = (0..versions.len())
            .map(|i| {
                held_over[i]
                    || extents
                        .iter()
                        .any(|e| e.data && touches(i, e.offset, e.len))
            })
            .collect();
        let (Some(lo), Some(hi)) = (
            needs_read.iter().position(|&r| r),
            needs_read.iter().rposition(|&r| r),
        ) else {
            versions.iter_mut().for_each(|v| v.slot = ZERO_SLOT);
            return Ok(None);
        };
        // Whole slots (zero-padded past the volume's end), so a slot's crc
        // is the crc of what it holds; page-aligned, so the store write can
        // bypass the page cache.
        let mut data = AlignedBuf::for_overwrite(versions.len() * cs as usize);
        let read_from = lo as u64 * cs;
        let read_to = ((hi as u64 + 1) * cs).min(len);
        data[..read_from as usize].fill(0);
        data[read_to as usize..].fill(0);
        origin
            .read(
                &mut data[read_from as usize..read_to as usize],
                offset + read_from,
                Reuse::Once,
            )
            .await?;
        held.iter()
            .for_each(|h| h.overlay(offset, &mut data[..len as usize]));
        let mut stored = Vec::new();
        for (i, version) in versions.iter_mut().enumerate() {
            let slot_data = &data[i * cs as usize..(i + 1) * cs as usize];
            if !needs_read[i] || is_zero(slot_data) {
                version.slot = ZERO_SLOT;
            } else {
                crcs[i] = slot_crc(slot_data);
                let whole = (i as u64 + 1) * cs <= len;
                stored.push((i, whole && !held_over[i]));
            }
        }
        Ok((!stored.is_empty()).then_some((data, stored)))
    }

    /// Writes chunks to free slots of the store, gathered with those of
    /// concurrent preservations (see [`gather`](super::gather)); returns
    /// each chunk's tag with the slot it went to. `origin` is where the
    /// chunks come from (the partition's volume's, whoever runs the batch).
    async fn store_chunks(&self, chunks: ToStore, origin: &Backend) -> Result<Vec<(usize, u64)>> {
        let weight = chunks.chunks.len() * self.chunk_size as usize;
        let written = self
            .store_writes
            .submit(chunks, weight, |batch| self.write_batch(batch, origin))
            .await;
        match written {
            Some(Ok(slots)) => Ok(slots),
            Some(Err(e)) => Err(e.into()),
            None => Err(io::Error::other(
                "the change-log write carrying this preservation was abandoned",
            )
            .into()),
        }
    }

    /// One store write per run of consecutive slots for a whole batch: the
    /// slots are taken here, in the batch's order, so a batch of new chunks
    /// lands as one sequential write. On failure every slot goes back.
    async fn write_batch(
        &self,
        batch: Vec<ToStore>,
        origin: &Backend,
    ) -> Vec<io::Result<Vec<(usize, u64)>>> {
        let cs = self.chunk_size as usize;
        let count: usize = batch.iter().map(|t| t.chunks.len()).sum();
        let mut slots: Vec<u64> = {
            let mut state = self.state.lock().unwrap();
            (0..count).map(|_| state.alloc_slot()).collect()
        };
        slots.sort_unstable();
        if let Some(&top) = slots.last() {
            self.grow_ahead(top).await;
        }
        // The batch's chunks in order, each going to the slot of its index.
        let pieces: Vec<(&[u8], ToSlot)> = batch
            .iter()
            .flat_map(|t| {
                t.chunks
                    .iter()
                    .map(|c| (&t.bufs[c.buf][c.at * cs..(c.at + 1) * cs], *c))
            })
            .collect();
        let writes = slot_runs(&slots, MAX_WRITE_PIECES).into_iter().map(|run| {
            let (slots, pieces) = (&slots[run.clone()], &pieces[run]);
            async move { self.store_run(origin, slots, pieces).await }
        });
        if let Err(e) = try_join_all(writes).await {
            self.state.lock().unwrap().free_slots.extend(&slots);
            return batch.iter().map(|_| Err(same_error(&e))).collect();
        }
        let mut slots = slots.into_iter();
        batch
            .iter()
            .map(|t| {
                Ok(t.chunks
                    .iter()
                    .map(|c| (c.tag, slots.next().expect("a slot per chunk")))
                    .collect())
            })
            .collect()
    }

    /// Fills consecutive `slots` with `pieces`: by sharing the origin's
    /// blocks where a long enough stretch of them is the origin's own
    /// consecutive chunks ([`worth_cloning`]) and the storage can, by
    /// vectored writes otherwise. Either lands as a write to the store:
    /// durable at its next flush.
    async fn store_run(
        &self,
        origin: &Backend,
        slots: &[u64],
        pieces: &[(&[u8], ToSlot)],
    ) -> io::Result<()> {
        let cs = self.chunk_size;
        let clone_min_bytes = self.store.clone_min_bytes();
        // Stretches of the origin's own consecutive chunks long enough to
        // clone, and between them stretches to copy.
        let mut segments: Vec<(Range<usize>, bool)> = Vec::new();
        let mut start = 0;
        while start < pieces.len() {
            let mut end = start + 1;
            if pieces[start].1.clonable {
                while end < pieces.len()
                    && pieces[end].1.clonable
                    && pieces[end].1.chunk == pieces[end - 1].1.chunk + 1
                {
                    end += 1;
                }
            }
            let clone = worth_cloning(end - start, cs, clone_min_bytes);
            match segments.last_mut() {
                Some((copy, false)) if !clone => copy.end = end,
                _ => segments.push((start..end, clone)),
            }
            start = end;
        }
        for (range, clone) in segments {
            let at = slots[range.start] * cs;
            let from = pieces[range.start].1.chunk * cs;
            let len = range.len() as u64 * cs;
            if clone && self.store.clone_range_from(origin, from, at, len).await? {
                self.cloned.fetch_add(range.len() as u64, Ordering::Relaxed);
                continue;
            }
            let bufs: Vec<&[u8]> = pieces[range].iter().map(|p| p.0).collect();
            self.store.write_vectored_at(&bufs, at).await?;
        }
        Ok(())
    }

    /// Grows the store to [`grow_step`] slots past `top` (a slot about to
    /// be written) once fewer than half a step are left past it. One
    /// caller grows at a time; the others write on, past the end if they
    /// must. Best effort: on a full disk the store grows by its writes as
    /// before, and those fail with the disk's error.
    async fn grow_ahead(&self, top: u64) {
        let step = grow_step(self.chunk_size);
        let target = {
            let mut state = self.state.lock().unwrap();
            if state.growing || top + step / 2 < state.grown_to {
                return;
            }
            state.growing = true;
            top + 1 + step
        };
        let grown = self.store.grow(target * self.chunk_size).await;
        let mut state = self.state.lock().unwrap();
        state.growing = false;
        match grown {
            Ok(allocated) => {
                state.grown_to = state.grown_to.max(target);
                state.reserve_allocated = allocated;
            }
            Err(e) => log::debug!("partition {}: cannot grow the change log: {e}", self.index),
        }
    }

    /// Where snapshot `generation` finds `chunk`, and a token to validate an
    /// origin read afterwards (see [`Partition::origin_still_valid`]).
    pub fn source(&self, chunk: u64, generation: u64) -> Source {
        let state = self.state.lock().unwrap();
        let Some(c) = state.chunks.get(&chunk) else {
            return Source::Origin;
        };
        if c.birth <= generation {
            return Source::Origin;
        }
        match c
            .versions
            .iter()
            .find(|v| v.start <= generation && generation < v.end)
        {
            Some(v) if v.slot == ZERO_SLOT => Source::Zero,
            Some(v) if v.slot == NATIVE_SLOT => Source::Native,
            Some(v) => Source::Store(v.slot),
            // Versions tile [0, birth) for every live snapshot, so only a
            // snapshot deleted under this read gets here.
            None => Source::Gone,
        }
    }

    /// Appends to `out`, in order, the chunks of `[first, end)` whose content
    /// differs between snapshot `from` and image `to` (a later snapshot's
    /// generation, or `u64::MAX` for the live volume).
    ///
    /// Exact, and never stale: every write after `from` to a chunk `from`
    /// reads from the origin preserves it (`from` is live and not released),
    /// so the version `from` reads ends at the generation of the chunk's
    /// first write after `from`; the chunk changed by `to` iff that end is
    /// at most `to`. A chunk with no version was never written after any
    /// live snapshot. Costs the smaller of the range and the chunks this
    /// partition tracks, never the volume's size.
    pub fn changed_chunks(&self, from: u64, to: u64, first: u64, end: u64, out: &mut Vec<u64>) {
        let state = self.state.lock().unwrap();
        let changed = |c: &ChunkState| {
            if c.birth <= from {
                return false;
            }
            match c.versions.iter().find(|v| v.start <= from && from < v.end) {
                Some(v) => v.end <= to,
                // Only a deleted `from` has none: say changed (the safe answer).
                None => true,
            }
        };
        let start = out.len();
        if end.saturating_sub(first) <= state.chunks.len() as u64 {
            out.extend((first..end).filter(|c| state.chunks.get(c).is_some_and(changed)));
        } else {
            out.extend(
                state
                    .chunks
                    .iter()
                    .filter(|&(&c, s)| (first..end).contains(&c) && changed(s))
                    .map(|(&c, _)| c),
            );
            out[start..].sort_unstable();
        }
    }

    /// After reading the origin for snapshot `generation`: true if no write
    /// has begun overwriting the chunk since [`Partition::source`] said Origin.
    /// (A writer installs the preserved version before touching the origin.)
    pub fn origin_still_valid(&self, chunk: u64, generation: u64) -> bool {
        let state = self.state.lock().unwrap();
        state
            .chunks
            .get(&chunk)
            .is_none_or(|c| c.birth <= generation)
    }

    pub async fn read_store(&self, slot: u64, offset_in_chunk: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self
            .store
            .read_at(buf, slot * self.chunk_size + offset_in_chunk)
            .await?)
    }

    /// Journals this partition's part of a snapshot.
    pub async fn record_snapshot(&self, generation: u64) -> Result<()> {
        self.journal
            .commit(&[Record::PartitionSnapshot { generation }])
            .await?;
        self.state
            .lock()
            .unwrap()
            .recorded_snapshots
            .push(generation);
        Ok(())
    }

    /// Frees every version no live snapshot reads any more, giving its space
    /// back to the filesystem. Returns the bytes freed.
    pub async fn collect_garbage(&self, live: &[u64]) -> Result<u64> {
        let needed = |v: &Version| {
            let i = live.partition_point(|&g| g < v.start);
            live.get(i).is_some_and(|&g| g < v.end)
        };
        let freed: Vec<(u64, Version)> = {
            let mut state = self.state.lock().unwrap();
            // Memory stays bounded under any number of create/delete cycles.
            state
                .recorded_snapshots
                .retain(|g| live.binary_search(g).is_ok());
            state
                .chunks
                .iter()
                .flat_map(|(&chunk, c)| {
                    c.versions
                        .iter()
                        .filter(|v| !needed(v))
                        .map(move |v| (chunk, *v))
                })
                .collect()
        };
        if freed.is_empty() {
            return Ok(0);
        }
        let records: Vec<Record> = freed
            .iter()
            .map(|&(chunk, v)| Record::Free {
                chunk,
                start: v.start,
            })
            .collect();
        {
            let mut state = self.state.lock().unwrap();
            for (chunk, v) in &freed {
                let c = state.chunks.get_mut(chunk).expect("chunk vanished");
                c.versions.retain(|x| x.start != v.start);
                if c.versions.is_empty() {
                    state.chunks.remove(chunk);
                }
            }
        }
        self.journal.commit(&records).await?;
        let mut slots: Vec<u64> = freed
            .iter()
            .map(|(_, v)| v.slot)
            .filter(|&s| in_store(s))
            .collect();
        slots.sort_unstable();
        for run in slot_runs(&slots, usize::MAX) {
            let len = (run.end - run.start) as u64 * self.chunk_size;
            self.store
                .punch_hole(slots[run.start] * self.chunk_size, len)
                .await?;
        }
        let bytes = slots.len() as u64 * self.chunk_size;
        self.state.lock().unwrap().free_slots.extend(slots);
        Ok(bytes)
    }

    /// Rewrites the journal to what snapshots `live` read once dead records
    /// dominate it. Only while no snapshot is being created or deleted (the
    /// volume's admin lock): a partition snapshot recorded for a create not
    /// yet committed is not in `live` and would be dropped.
    pub async fn compact_journal(&self, live: &[u64]) -> Result<()> {
        let versions = {
            let state = self.state.lock().unwrap();
            state.chunks.values().map(|c| c.versions.len()).sum()
        };
        self.journal.compact_if_grown(live, versions).await
    }

    /// Preserved bytes held by exactly one live snapshot, per snapshot generation.
    pub fn exclusive_bytes(&self, live: &[u64], out: &mut HashMap<u64, u64>) {
        let state = self.state.lock().unwrap();
        for v in state.chunks.values().flat_map(|c| &c.versions) {
            if !in_store(v.slot) {
                continue;
            }
            let first = live.partition_point(|&g| g < v.start);
            let last = live.partition_point(|&g| g < v.end);
            if last - first == 1 {
                *out.entry(live[first]).or_default() += self.chunk_size;
            }
        }
    }

    /// Chunks preserved since the partition opened.
    pub fn preserved_chunks(&self) -> u64 {
        self.preserved.load(Ordering::Relaxed)
    }

    /// Preserved chunks whose slot shares the origin's blocks, since the open.
    pub fn cloned_chunks(&self) -> u64 {
        self.cloned.load(Ordering::Relaxed)
    }

    /// The change log's allocated bytes (without the journal), less its
    /// grow-ahead reserve: no snapshot holds that.
    pub fn store_bytes(&self) -> u64 {
        let reserve = {
            let state = self.state.lock().unwrap();
            if state.reserve_allocated {
                state.grown_to.saturating_sub(state.next_slot) * self.chunk_size
            } else {
                0
            }
        };
        self.store
            .allocated_bytes()
            .unwrap_or(0)
            .saturating_sub(reserve)
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.store.allocated_bytes().unwrap_or(0) + self.journal.allocated_bytes()
    }

    pub async fn flush_store(&self) -> Result<()> {
        Ok(self.store.flush().await?)
    }
}

/// Index ranges of `slots` (sorted) that hold consecutive slots, at most
/// `max_len` each: one store write or hole punch per range.
fn slot_runs(slots: &[u64], max_len: usize) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=slots.len() {
        if i == slots.len() || i - start == max_len || slots[i] != slots[i - 1] + 1 {
            runs.push(start..i);
            start = i;
        }
    }
    runs
}

/// Slots the store grows by at a time: 16 MiB (at least 16 slots, at most
/// 256), so a sequential pass triggers a growth every few hundred chunks
/// while the reserve stays small beside the volume.
fn grow_step(chunk_size: u64) -> u64 {
    ((16 << 20) / chunk_size).clamp(16, 256)
}

/// Whether `data` is all zeros (a chunk is checked on every preservation,
/// so this is on the write path). Words are ORed a 512-byte block at a
/// time, which vectorizes, and a chunk that holds data (most do) stops at
/// its first block that is not zero instead of reading all of it.
fn is_zero(data: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64.
    let (head, words, tail) = unsafe { data.align_to::<u64>() };
    head.iter().all(|&b| b == 0)
        && words
            .chunks(64)
            .all(|block| block.iter().fold(0, |acc, &w| acc | w) == 0)
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemDisk;
    use crate::backend::Storage;
    use crate::engine::writeback::{HeldOp, Holding};
    use crate::runtime::block_on;
    use std::sync::Arc;

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut data = vec![0u8; 65536 + 16];
        // Slices that start off word alignment, so head and tail are used.
        for start in [0, 1, 7, 8] {
            let len = 65536 + 3;
            assert!(is_zero(&data[start..start + len]));
            for at in [0, 1, 511, 512, 4095, 32768, len - 9, len - 1] {
                data[start + at] = 0x80;
                assert!(
                    !is_zero(&data[start..start + len]),
                    "byte {at} of {start}.."
                );
                data[start + at] = 0;
            }
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn on_a_file_system_only_runs_of_512_kib_and_two_chunks_or_more_are_worth_cloning() {
        let kib = 1024;
        let worth = |chunks, cs| worth_cloning(chunks, cs, crate::backend::file::CLONE_MIN_BYTES);
        assert!(!worth(7, 64 * kib));
        assert!(worth(8, 64 * kib));
        assert!(!worth(8, 4 * kib), "32 KiB of 4 KiB chunks");
        assert!(!worth(127, 4 * kib));
        assert!(worth(128, 4 * kib));
        assert!(!worth(1, 1024 * kib), "one large chunk under a small write");
        assert!(worth(2, 1024 * kib));
        assert!(worth(2, 256 * kib));
        // A store that clones shorter stretches still keeps the chunk floor.
        assert!(worth_cloning(2, 4 * kib, 8 * kib));
        assert!(!worth_cloning(1, 64 * kib, 8 * kib));
    }

    #[test]
    fn slot_runs_split_at_gaps_and_at_the_cap() {
        assert_eq!(slot_runs(&[], 4), Vec::<Range<usize>>::new());
        assert_eq!(slot_runs(&[3, 4, 5, 9, 10, 12], 4), vec![0..3, 3..5, 5..6]);
        assert_eq!(slot_runs(&[0, 1, 2, 3, 4], 2), vec![0..2, 2..4, 4..5]);
    }

    /// A partition of 4 KiB chunks on a memory disk, recovered from `records`.
    async fn replayed(records: &[Record]) -> Partition {
        let storage = Storage::Memory(MemDisk::new());
        storage.open("j", true).unwrap();
        let store = storage.open("s", true).unwrap();
        let (journal, _) = Journal::open(&storage, "j", store.clone(), 4096, "j")
            .await
            .unwrap();
        Partition::recover(0, 4096, false, journal, store, records)
    }

    /// What a damaged journal may say twice: one version of a chunk
    /// (fuzz/regressions/journal/a-version-recorded-twice: collecting
    /// garbage panicked on it), one slot for two versions.
    #[test]
    fn a_journal_that_names_a_version_or_a_slot_twice_replays_consistently() {
        let preserve = |chunk, slot| Record::Preserve {
            chunk,
            slot,
            start: 0,
            end: 2,
            data_crc: 0,
        };
        block_on(async {
            let records = [
                preserve(1, 0),
                preserve(1, 1),
                preserve(5, 3),
                preserve(6, 3),
                preserve(7, 4),
            ];
            let partition = replayed(&records).await;
            {
                let state = partition.state.lock().unwrap();
                let versions: Vec<_> = state.chunks[&1].versions.iter().map(|v| v.slot).collect();
                assert_eq!(versions, vec![1], "the last record of the version counts");
                let free: Vec<u64> = state.free_slots.iter().copied().collect();
                assert_eq!(free, vec![0, 2], "a used slot was handed out as free");
            }
            // Four versions, none read by a live snapshot: all freed, once.
            partition.collect_garbage(&[]).await.unwrap();
            assert!(partition.state.lock().unwrap().chunks.is_empty());
        });
    }

    /// Deleted snapshots leave nothing behind in memory, so a daemon's
    /// memory does not grow with create/delete cycles.
    #[test]
    fn deleted_snapshots_are_forgotten() {
        block_on(async {
            let partition = replayed(&[]).await;
            for generation in 0..1000 {
                partition.record_snapshot(generation).await.unwrap();
                partition.collect_garbage(&[0]).await.unwrap();
            }
            assert_eq!(partition.recorded_snapshots(), vec![0]);
        });
    }

    /// A chunk is clonable only if what the snapshot needs is exactly the
    /// origin's bytes: whole, and no held write over it. A write held
    /// across a snapshot's pause (one that got held between the pause's
    /// drain of the buffer and the gate closing) is in the snapshot but not
    /// yet in the origin; cloning its chunk would lose it from the snapshot.
    #[test]
    fn a_chunk_under_a_held_write_or_past_the_end_is_read_with_it_and_not_clonable() {
        const CS: usize = 4096;
        block_on(async {
            let partition = replayed(&[]).await;
            let storage = Storage::Memory(MemDisk::new());
            let origin = storage.open("origin", true).unwrap();
            let old: Vec<u8> = (0..8 * CS).map(|i| (i % 251) as u8 + 1).collect();
            origin.write_at(&old, 0, false).await.unwrap();
            let held = WriteBack::new(12, Default::default());
            let mut over = AlignedBuf::for_overwrite(512);
            over.fill(0xee);
            let holding = held.hold(3 * CS as u64 + 1024, 512, false, || {
                HeldOp::Data(Arc::new(over))
            });
            assert!(matches!(holding, Holding::Held { .. }));
            let version = Version {
                start: 0,
                end: 1,
                slot: 0,
            };
            // The last chunk is short: the volume ends 100 bytes into it.
            let volume_size = 7 * CS as u64 + 100;
            let mut versions = vec![version; 8];
            let mut crcs = vec![0u32; 8];
            let (data, stored) = partition
                .read_run(0, &mut versions, &mut crcs, &origin, &held, volume_size)
                .await
                .unwrap()
                .unwrap();
            let clonable: Vec<bool> = stored.iter().map(|&(_, c)| c).collect();
            assert_eq!(clonable, [true, true, true, false, true, true, true, false]);
            let mut want = old.clone();
            want[3 * CS + 1024..3 * CS + 1536].fill(0xee);
            want[7 * CS + 100..].fill(0);
            assert!(
                data[..] == want[..],
                "the held write is laid over the origin"
            );
        });
    }
}

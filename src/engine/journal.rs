//! A partition's metadata journal: checksummed append-only records with group
//! commit.
//!
//! Record layout (little endian):
//! `magic u32 | payload_len u32 | seq u64 | payload | crc32c u32`,
//! the checksum covering everything before it. Replay stops at the first record
//! that is short or fails its checksum; if nothing valid follows, that is a
//! torn tail (a crash mid-append) and it is cut off. If valid records follow a
//! bad one, the journal is corrupt in the middle and replay refuses to guess.
//!
//! Group commit: concurrent callers queue their records; one of them (the
//! leader) appends the whole batch followed by a `Commit` marker and flushes
//! the journal and the change-log store in parallel. Leadership passes to a
//! waiting compaction, else to a waiter of the next batch, so no caller
//! commits other callers' batches forever, and batches are durable strictly
//! one after another.
//!
//! Because the two flushes race, a crash can leave the last batch's records
//! durable while the preserved data they point at is not. Each `Preserve`
//! record therefore carries the crc32c of its data, and replay checks the
//! data of the last complete batch only (every earlier batch finished both
//! flushes before the next one was written): if any of it is wrong, the
//! whole batch is dropped, which is safe because no origin write that
//! depends on it was issued before its commit returned.
//!
//! Compaction: deleting a snapshot leaves dead records behind (its partition
//! snapshot, the versions only it read and the `Free` records that let them
//! go), so a journal under snapshot churn would grow without bound and be
//! read whole at the next open. Once the journal exceeds `GROWTH` times the
//! encoded size of its live records plus `SLACK` bytes, it is rewritten to
//! the live records alone (`compact`): at open, and online while the volume
//! is written ([`Journal::compact_if_grown`], after every snapshot delete).
//! Online, the committed prefix is read and compacted while commits go on
//! (appends never touch it); then the compaction takes commit leadership, so
//! no batch is in flight and new commits queue, adds the batches committed
//! meanwhile, writes the new file with [`Storage::replace_file`] (temp file,
//! fsync, rename, fsync of the directory), reopens it and hands leadership
//! on: the queued records go into the new file.
//!
//! Why a crash at any point is safe: until the rename is durable the old file
//! is the journal, whole: from the moment the compaction reads its last
//! records until the new file is open, the compaction holds leadership and
//! nothing is appended. After the rename the new file is the journal, and it
//! holds every record a live snapshot needs. Every record in
//! it comes from a batch whose store flush finished, so it ends with an empty
//! batch and replay has no data to verify. If the rename may have happened
//! but may not be durable (a failed directory fsync), the journal fails: an
//! append to either file could be lost. Slots of versions a compaction drops
//! are not punched online: `Free` records already gave them back, and a new
//! version may hold them now. Only a rewrite at open punches them.
//!
//! Must never: drop a record a live snapshot needs, or the partition
//! snapshot of a snapshot being created (callers compact only while no
//! snapshot is being created or deleted), or append to a file that may no
//! longer be the journal.

use super::error::{EngineError, Result};
use super::manifest::MAX_GENERATION;
use crate::backend::{Backend, Storage};
use futures::channel::oneshot;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const MAGIC: u32 = 0x524a_4e53; // "SNJR"
const HEADER: usize = 16;
const TRAILER: usize = 4;
/// Payloads are tiny; anything larger is garbage, not a record.
const MAX_PAYLOAD: u32 = 4096;
/// Encoded sizes of the records a compacted journal holds.
const PRESERVE_LEN: u64 = (HEADER + 41 + TRAILER) as u64;
const SNAPSHOT_LEN: u64 = (HEADER + 9 + TRAILER) as u64;
const COMMIT_LEN: u64 = (HEADER + 1 + TRAILER) as u64;

/// A journal is compacted once it exceeds `GROWTH` times its live records'
/// encoded size plus `SLACK` bytes. Each compaction then rewrites at most as
/// many bytes as dead ones went since the last, and a small journal is not
/// rewritten every few records.
const GROWTH: u64 = 2;
const SLACK: u64 = 4096;

/// Space kept allocated past the journal's end (FALLOC_FL_KEEP_SIZE), so
/// that on a full disk the records that free space (a snapshot delete's
/// `Free` records, about 20k of them) and those that let held writes reach
/// the origin can still be appended. Topped up when half is used.
const RESERVE: u64 = 1 << 20;

/// Whether a journal of `bytes` whose live records take `live_bytes` encoded
/// is due for compaction.
fn compaction_due(bytes: u64, live_bytes: u64) -> bool {
    bytes > GROWTH * live_bytes + SLACK
}

/// Marks a version whose data was all zeros: no store slot holds it.
pub const ZERO_SLOT: u64 = u64::MAX;
/// Marks a version kept by the storage's native snapshots (RBD snapshots
/// of a Ceph volume's origin): each snapshot the version serves reads the
/// chunk from its own native snapshot, and no store slot holds it.
pub const NATIVE_SLOT: u64 = u64::MAX - 1;

/// Whether `slot` names a slot of the change-log store.
pub fn in_store(slot: u64) -> bool {
    slot != ZERO_SLOT && slot != NATIVE_SLOT
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// Chunk content valid for generations `[start, end)` is preserved in
    /// `slot` of the change-log store (or is all zeros: `ZERO_SLOT`; or
    /// is in the native snapshots: `NATIVE_SLOT`).
    Preserve {
        chunk: u64,
        slot: u64,
        start: u64,
        end: u64,
        /// crc32c of the whole slot as written (0 without a slot).
        data_crc: u32,
    },
    /// The version of `chunk` starting at `start` is no longer needed.
    Free { chunk: u64, start: u64 },
    /// This partition's part of the snapshot closing `generation`.
    PartitionSnapshot { generation: u64 },
    /// Ends a group-commit batch.
    Commit,
}

impl Record {
    fn encode_payload(&self, out: &mut Vec<u8>) {
        match *self {
            Record::Preserve {
                chunk,
                slot,
                start,
                end,
                data_crc,
            } => {
                out.push(1);
                for v in [chunk, slot, start, end, data_crc as u64] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Record::Free { chunk, start } => {
                out.push(2);
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&start.to_le_bytes());
            }
            Record::PartitionSnapshot { generation } => {
                out.push(3);
                out.extend_from_slice(&generation.to_le_bytes());
            }
            Record::Commit => out.push(4),
        }
    }

    fn decode_payload(payload: &[u8]) -> Option<Record> {
        let (&kind, rest) = payload.split_first()?;
        let field = |i: usize| -> Option<u64> {
            rest.get(i * 8..i * 8 + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        };
        let record = match (kind, rest.len()) {
            (1, 40) => Record::Preserve {
                chunk: field(0)?,
                slot: field(1)?,
                start: field(2)?,
                end: field(3)?,
                data_crc: u32::try_from(field(4)?).ok()?,
            },
            (2, 16) => Record::Free {
                chunk: field(0)?,
                start: field(1)?,
            },
            (3, 8) => Record::PartitionSnapshot {
                generation: field(0)?,
            },
            (4, 0) => Record::Commit,
            _ => return None,
        };
        Some(record)
    }
}

fn encode(record: &Record, seq: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    record.encode_payload(out);
    let payload_len = (out.len() - start - HEADER) as u32;
    out[start + 4..start + 8].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Parses one record at the start of `bytes`: the record, its seq and length.
fn decode(bytes: &[u8]) -> Option<(Record, u64, usize)> {
    if bytes.len() < HEADER + TRAILER {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    if word(0) != MAGIC || word(4) > MAX_PAYLOAD {
        return None;
    }
    let len = HEADER + word(4) as usize + TRAILER;
    if bytes.len() < len {
        return None;
    }
    if crc32c::crc32c(&bytes[..len - TRAILER]) != word(len - TRAILER) {
        return None;
    }
    let seq = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let record = Record::decode_payload(&bytes[HEADER..len - TRAILER])?;
    Some((record, seq, len))
}

/// What compaction keeps and what it lets go.
struct Compacted {
    /// Records that rebuild the same state for the live snapshots: versions
    /// some live snapshot still reads, and live partition snapshots.
    records: Vec<Record>,
    /// Store slots of versions no live snapshot reads; their space is freed
    /// with the old journal.
    dropped_slots: Vec<u64>,
}

/// Compacts `records` for the live snapshot generations `live` (sorted).
fn compact(records: &[Record], live: &[u64]) -> Compacted {
    let mut versions: std::collections::BTreeMap<(u64, u64), Record> = Default::default();
    let mut out = Vec::new();
    for record in records {
        match *record {
            Record::Preserve { chunk, start, .. } => {
                versions.insert((chunk, start), *record);
            }
            Record::Free { chunk, start } => {
                versions.remove(&(chunk, start));
            }
            Record::PartitionSnapshot { generation } => {
                if live.binary_search(&generation).is_ok() {
                    out.push(*record);
                }
            }
            Record::Commit => {}
        }
    }
    let mut dropped_slots = Vec::new();
    for record in versions.into_values() {
        let Record::Preserve {
            start, end, slot, ..
        } = record
        else {
            unreachable!("only versions are kept in the map")
        };
        let i = live.partition_point(|&g| g < start);
        if live.get(i).is_some_and(|&g| g < end) {
            out.push(record);
        } else if in_store(slot) {
            dropped_slots.push(slot);
        }
    }
    Compacted {
        records: out,
        dropped_slots,
    }
}

/// A whole journal file holding `records` from sequence 0, for compaction.
/// Their data is already durable, so they are one batch followed by an empty
/// one: the next replay has nothing to verify.
fn encode_all(records: &[Record]) -> Vec<u8> {
    let mut bytes = Vec::new();
    let all = records.iter().chain([&Record::Commit, &Record::Commit]);
    for (seq, record) in all.enumerate() {
        encode(record, seq as u64, &mut bytes);
    }
    bytes
}

/// crc32c of a store slot's content, as `Preserve` records carry it.
pub fn slot_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// What replay found.
pub struct Replayed {
    pub records: Vec<Record>,
}

enum Turn {
    Done(std::result::Result<(), CommitError>),
    Lead,
}

struct State {
    /// End of the committed records: everything before it is immutable
    /// until a compaction replaces the file.
    tail: u64,
    next_seq: u64,
    /// Id of the batch now gathering in `batch` (ids count from 1).
    batch_id: u64,
    batch: Vec<Record>,
    batch_waiters: Vec<oneshot::Sender<Turn>>,
    /// Someone holds commit leadership: a batch or a compaction is in flight.
    committing: bool,
    /// Compactions waiting for leadership; they get it before the next batch.
    compactions: Vec<oneshot::Sender<()>>,
    failed: Option<String>,
}

pub struct Journal {
    /// The open journal file; a compaction swaps in the file it renamed over it.
    file: Mutex<Backend>,
    storage: Storage,
    /// The journal's file name in `storage`.
    name: String,
    /// Names the journal in messages.
    label: String,
    /// The change-log store whose data the records point at.
    store: Backend,
    state: Mutex<State>,
    /// Every batch with an id up to this one is durable.
    durable: AtomicU64,
    /// One compaction at a time: each reads the file before taking leadership.
    compacting: futures::lock::Mutex<()>,
    /// The file is allocated up to here (see [`RESERVE`]).
    reserved_to: AtomicU64,
}

impl Journal {
    /// Replays the journal file `name` of `storage`: cuts a torn tail
    /// (records after the last `Commit`), and drops the last batch too if
    /// the store does not hold the data its records point at. `slot_size` is
    /// the store's slot size; `label` names the journal in messages.
    pub async fn open(
        storage: &Storage,
        name: &str,
        store: Backend,
        slot_size: u64,
        label: &str,
    ) -> Result<(Journal, Replayed)> {
        let file = storage.open(name, false)?;
        let len = file.size()? as usize;
        let mut bytes = vec![0u8; len];
        file.read_at(&mut bytes, 0).await?;
        // (records, byte offset after it) for every record up to the first bad one.
        let mut parsed: Vec<(Record, usize)> = Vec::new();
        let mut at = 0;
        while at < len {
            let expected = parsed.len() as u64;
            match decode(&bytes[at..]) {
                Some((record, seq, n)) if seq == expected => {
                    at += n;
                    parsed.push((record, at));
                }
                Some((_, seq, _)) => {
                    return Err(EngineError::Corrupt(format!(
                        "{label}: record at byte {at} has sequence {seq}, expected {expected}"
                    )))
                }
                None => break,
            }
        }
        if at < len {
            // Valid records after the bad one mean damage in the middle, not a torn append.
            let next = parsed.len() as u64;
            if (at + 1..len).any(|i| decode(&bytes[i..]).is_some_and(|(_, seq, _)| seq >= next)) {
                return Err(EngineError::Corrupt(format!(
                    "{label}: damaged record at byte {at} is followed by valid records; \
                     refusing to drop them (restore the volume from a copy)"
                )));
            }
        }
        let commits: Vec<usize> = (0..parsed.len())
            .filter(|&i| parsed[i].0 == Record::Commit)
            .collect();
        let mut keep = commits.last().map_or(0, |&i| i + 1);
        let store_slots = store.size()? / slot_size;
        if let Some(&last) = commits.last() {
            let first = commits.len().checked_sub(2).map_or(0, |i| commits[i] + 1);
            if !data_is_durable(&store, slot_size, store_slots, &parsed[first..last]).await? {
                log::warn!(
                    "{label}: the last commit's preserved data never reached the store; dropping it"
                );
                keep = first;
            }
        }
        // Every batch before the last finished its store flush, so its
        // slots lie inside the store; recovery reserves every slot up to
        // the highest, which must not be a number a damaged record made up.
        // A version freed in the batch that preserved it (a snapshot
        // deleted before the commit) is the exception: its data may never
        // have reached the store, and nothing reserves its slot.
        let freed = freed_versions(&parsed[..keep]);
        for (i, (record, _)) in parsed[..keep].iter().enumerate() {
            let at = i.checked_sub(1).map_or(0, |p| parsed[p].1);
            if let Some(generation) = generation_beyond_bound(record) {
                return Err(EngineError::Corrupt(format!(
                    "{label}: record at byte {at} names generation {generation}, beyond \
                     {MAX_GENERATION} (restore the volume from a copy)"
                )));
            }
            if let Record::Preserve {
                chunk, slot, start, ..
            } = *record
            {
                if in_store(slot) && slot >= store_slots && !freed.contains(&(chunk, start)) {
                    return Err(EngineError::Corrupt(format!(
                        "{label}: record at byte {at} puts a preserved chunk in slot {slot}, \
                         beyond the {store_slots} slots of its store (restore the volume from a copy)"
                    )));
                }
            }
        }
        let good_len = if keep == 0 { 0 } else { parsed[keep - 1].1 };
        if good_len < len {
            log::warn!(
                "{label}: dropping {} bytes of torn journal tail at byte {good_len}",
                len - good_len
            );
            file.truncate(good_len as u64).await?;
        }
        parsed.truncate(keep);
        let journal = Journal {
            file: Mutex::new(file),
            storage: storage.clone(),
            name: name.to_string(),
            label: label.to_string(),
            store,
            state: Mutex::new(State {
                tail: good_len as u64,
                next_seq: keep as u64,
                batch_id: 1,
                batch: Vec::new(),
                batch_waiters: Vec::new(),
                committing: false,
                compactions: Vec::new(),
                failed: None,
            }),
            durable: AtomicU64::new(0),
            compacting: futures::lock::Mutex::new(()),
            reserved_to: AtomicU64::new(0),
        };
        journal.top_up_reserve(good_len as u64).await;
        let records = parsed
            .into_iter()
            .map(|(r, _)| r)
            .filter(|r| *r != Record::Commit)
            .collect();
        Ok((journal, Replayed { records }))
    }

    /// [`Journal::open`], and if the journal has outgrown the records
    /// snapshots `live` need, rewrites it to them first and punches the
    /// slots of the versions it drops: nothing runs yet that could have
    /// reused them. Start-up time follows live state, not history.
    pub async fn open_compacted(
        storage: &Storage,
        name: &str,
        store: Backend,
        slot_size: u64,
        label: &str,
        live: &[u64],
    ) -> Result<(Journal, Replayed)> {
        let (journal, replayed) =
            Journal::open(storage, name, store.clone(), slot_size, label).await?;
        let compacted = compact(&replayed.records, live);
        let bytes = encode_all(&compacted.records);
        if !compaction_due(journal.committed_bytes(), bytes.len() as u64) {
            return Ok((journal, replayed));
        }
        drop(journal);
        storage.replace_file(name, &bytes)?;
        for slot in compacted.dropped_slots {
            store.punch_hole(slot * slot_size, slot_size).await?;
        }
        Journal::open(storage, name, store, slot_size, label).await
    }

    fn file(&self) -> Backend {
        self.file.lock().unwrap().clone()
    }

    /// Bytes of committed records.
    pub fn committed_bytes(&self) -> u64 {
        self.state.lock().unwrap().tail
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.file().allocated_bytes().unwrap_or(0)
    }

    /// Queues `records` for the next commit without waiting for it; returns
    /// the batch they belong to, durable once [`Journal::durable_batch`]
    /// reaches it. A batch that fails for lack of space hands its records to
    /// the next one, so that stays true.
    pub fn enqueue(&self, records: &[Record]) -> Result<u64> {
        let mut state = self.state.lock().unwrap();
        if let Some(reason) = &state.failed {
            return Err(journal_failed(reason));
        }
        state.batch.extend_from_slice(records);
        Ok(state.batch_id)
    }

    /// The newest batch id such that it and every earlier batch are durable.
    pub fn durable_batch(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Makes every record queued so far durable.
    pub async fn sync(&self) -> Result<()> {
        {
            let state = self.state.lock().unwrap();
            if let Some(reason) = &state.failed {
                return Err(journal_failed(reason));
            }
            if state.batch.is_empty() && !state.committing {
                return Ok(());
            }
        }
        self.commit(&[]).await
    }

    /// Makes `records` durable, after everything written to the store so far.
    pub async fn commit(&self, records: &[Record]) -> Result<()> {
        let lead = {
            let mut state = self.state.lock().unwrap();
            if let Some(reason) = &state.failed {
                return Err(journal_failed(reason));
            }
            state.batch.extend_from_slice(records);
            if state.committing {
                let (tx, rx) = oneshot::channel();
                state.batch_waiters.push(tx);
                Some(rx)
            } else {
                state.committing = true;
                None
            }
        };
        if let Some(rx) = lead {
            match rx.await {
                Ok(Turn::Done(result)) => return result.map_err(CommitError::into_engine),
                Ok(Turn::Lead) => {}
                Err(_) => return Err(journal_failed("commit leader vanished")),
            }
        }
        self.lead().await
    }

    /// Commits the current batch (which holds the leader's own records), then
    /// hands leadership on.
    async fn lead(&self) -> Result<()> {
        let mut own_result = None;
        loop {
            let result = self.write_batch().await;
            own_result.get_or_insert(result);
            if !self.pass_leadership() {
                break;
            }
        }
        own_result
            .expect("led at least once")
            .map_err(CommitError::into_engine)
    }

    /// Hands commit leadership to a waiting compaction, else to a waiter of
    /// the next batch, so no caller commits other callers' batches forever.
    /// True if the caller must lead the next batch itself: its first waiter
    /// is gone.
    fn pass_leadership(&self) -> bool {
        loop {
            let mut state = self.state.lock().unwrap();
            if !state.compactions.is_empty() {
                let compaction = state.compactions.remove(0);
                drop(state);
                if compaction.send(()).is_ok() {
                    return false;
                }
                continue;
            }
            if state.batch_waiters.is_empty() {
                state.committing = false;
                return false;
            }
            let next = state.batch_waiters.remove(0);
            drop(state);
            return next.send(Turn::Lead).is_err();
        }
    }

    async fn write_batch(&self) -> std::result::Result<(), CommitError> {
        let (records, waiters, tail, seq, failed, id) = {
            let mut state = self.state.lock().unwrap();
            state.batch_id += 1;
            (
                std::mem::take(&mut state.batch),
                std::mem::take(&mut state.batch_waiters),
                state.tail,
                state.next_seq,
                state.failed.clone(),
                state.batch_id - 1,
            )
        };
        let mut bytes = Vec::with_capacity(records.len() * 56 + 24);
        for (i, record) in records.iter().chain([&Record::Commit]).enumerate() {
            encode(record, seq + i as u64, &mut bytes);
        }
        let result = match failed {
            Some(reason) => Err(CommitError::Failed(reason)),
            None => self.append(&bytes, tail).await,
        };
        {
            let mut state = self.state.lock().unwrap();
            match &result {
                Ok(()) => {
                    state.tail += bytes.len() as u64;
                    state.next_seq += records.len() as u64 + 1;
                    self.durable.store(id, Ordering::Release);
                }
                Err(CommitError::Failed(reason)) => state.failed = Some(reason.clone()),
                Err(CommitError::NoSpace) => {
                    // Queued preservations stay promised: their held writes
                    // wait for a later batch that has space.
                    let later = std::mem::take(&mut state.batch);
                    state.batch = records;
                    state.batch.extend(later);
                }
            }
        }
        for waiter in waiters {
            let _ = waiter.send(Turn::Done(result.clone()));
        }
        result
    }

    async fn append(&self, bytes: &[u8], tail: u64) -> std::result::Result<(), CommitError> {
        let file = self.file();
        // Both flushes at once: replay verifies the last batch's data, so
        // the store need not be durable before the journal is.
        let journal = async {
            file.write_at(bytes, tail, false).await?;
            file.flush().await
        };
        let written = futures::future::try_join(journal, self.store.flush())
            .await
            .map(drop);
        match written {
            Ok(()) => {
                self.top_up_reserve(tail + bytes.len() as u64).await;
                Ok(())
            }
            // A full disk fails this batch only: cut what may have landed
            // (the reserve with it) and the journal goes on from the same
            // tail and sequence.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => match file.truncate(tail).await {
                Ok(()) => {
                    self.reserved_to.store(0, Ordering::Relaxed);
                    Err(CommitError::NoSpace)
                }
                Err(e) => Err(CommitError::Failed(e.to_string())),
            },
            Err(e) => Err(CommitError::Failed(e.to_string())),
        }
    }

    /// Keeps [`RESERVE`] bytes allocated past `end`, the journal's end, once
    /// less than half of it is left. Best effort: on a full disk the reserve
    /// shrinks as appends use it, and grows again when space comes back.
    async fn top_up_reserve(&self, end: u64) {
        if end + RESERVE / 2 <= self.reserved_to.load(Ordering::Relaxed) {
            return;
        }
        match self.file().reserve(end, RESERVE).await {
            Ok(()) => self.reserved_to.store(end + RESERVE, Ordering::Relaxed),
            Err(e) => log::debug!("{}: cannot reserve journal space: {e}", self.label),
        }
    }

    /// Rewrites the journal to the records snapshots `live` need, if it has
    /// outgrown them (see the module docs). `versions` is how many preserved
    /// versions the partition holds. Every live snapshot's partition snapshot
    /// must be committed: the record of one being created now would be
    /// dropped. Like [`Journal::commit`], must run to completion once polled.
    pub async fn compact_if_grown(&self, live: &[u64], versions: usize) -> Result<()> {
        let live_bytes =
            versions as u64 * PRESERVE_LEN + live.len() as u64 * SNAPSHOT_LEN + 2 * COMMIT_LEN;
        if !compaction_due(self.committed_bytes(), live_bytes) {
            return Ok(());
        }
        let _one = self.compacting.lock().await;
        // Appends never touch the committed prefix, so it is read and
        // compacted while commits go on.
        let (tail, seq) = {
            let state = self.state.lock().unwrap();
            (state.tail, state.next_seq)
        };
        let mut bytes = vec![0u8; tail as usize];
        self.file().read_at(&mut bytes, 0).await?;
        let records = compact(&self.decode_committed(&bytes, 0, 0)?, live).records;
        self.take_leadership().await?;
        let result = self.replace(records, tail, seq).await;
        if self.pass_leadership() {
            // The first queued committer is gone: commit the batch for the
            // others, who get its result from it.
            let _ = self.lead().await;
        }
        result
    }

    /// Waits until no batch is in flight and takes commit leadership:
    /// committers queue meanwhile.
    async fn take_leadership(&self) -> Result<()> {
        let wait = {
            let mut state = self.state.lock().unwrap();
            if state.committing {
                let (tx, rx) = oneshot::channel();
                state.compactions.push(tx);
                Some(rx)
            } else {
                state.committing = true;
                None
            }
        };
        if let Some(rx) = wait {
            rx.await
                .map_err(|_| journal_failed("commit leader vanished"))?;
        }
        Ok(())
    }

    /// With leadership: replaces the file with `compacted` (the records of
    /// its first `tail` bytes, compacted, which start at sequence 0) plus the
    /// batches committed after them (from sequence `seq`).
    async fn replace(&self, mut compacted: Vec<Record>, tail: u64, seq: u64) -> Result<()> {
        let (end, failed) = {
            let state = self.state.lock().unwrap();
            (state.tail, state.failed.clone())
        };
        if let Some(reason) = failed {
            return Err(journal_failed(&reason));
        }
        let mut since = vec![0u8; (end - tail) as usize];
        self.file().read_at(&mut since, tail).await?;
        compacted.extend(self.decode_committed(&since, seq, tail)?);
        let bytes = encode_all(&compacted);
        if bytes.len() as u64 >= end {
            return Ok(());
        }
        if let Err(e) = self.storage.replace_file(&self.name, &bytes) {
            return Err(self.replace_failed(e, end));
        }
        match self.storage.open(&self.name, false) {
            Ok(file) => *self.file.lock().unwrap() = file,
            Err(e) => {
                // The handle still writes the old file, which is no longer the journal.
                let reason = format!("reopening it after compaction: {e}");
                self.state.lock().unwrap().failed = Some(reason.clone());
                return Err(journal_failed(&reason));
            }
        }
        self.reserved_to.store(0, Ordering::Relaxed);
        self.top_up_reserve(bytes.len() as u64).await;
        let mut state = self.state.lock().unwrap();
        state.tail = bytes.len() as u64;
        state.next_seq = compacted.len() as u64 + 2;
        log::debug!(
            "{}: compacted from {end} to {} bytes",
            self.label,
            bytes.len()
        );
        Ok(())
    }

    /// After `replace_file` failed on a journal of `end` bytes: if the old
    /// file is still in place (the new one is smaller), it stays the journal
    /// and only this compaction failed. Otherwise the rename happened but may
    /// not be durable, so an append to either file could be lost: the
    /// journal fails until a reopen finds whichever file the disk kept.
    fn replace_failed(&self, error: std::io::Error, end: u64) -> EngineError {
        let old_in_place = self
            .storage
            .open(&self.name, false)
            .and_then(|file| file.size())
            .is_ok_and(|len| len == end);
        if old_in_place {
            return EngineError::Io(std::io::Error::other(format!(
                "{error}; the uncompacted journal stays in place until a later \
                 compaction succeeds"
            )));
        }
        let reason = format!("replacing it with its compacted copy: {error}");
        self.state.lock().unwrap().failed = Some(reason.clone());
        journal_failed(&reason)
    }

    /// The records (without `Commit` markers) of committed journal bytes
    /// that begin at sequence `seq`, at byte `at` of the file.
    fn decode_committed(&self, bytes: &[u8], mut seq: u64, at: u64) -> Result<Vec<Record>> {
        let mut records = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            match decode(&bytes[pos..]) {
                Some((record, s, n)) if s == seq => {
                    if record != Record::Commit {
                        records.push(record);
                    }
                    pos += n;
                    seq += 1;
                }
                _ => {
                    return Err(EngineError::Corrupt(format!(
                        "{}: committed record at byte {} no longer reads back; \
                         restore the volume from a copy",
                        self.label,
                        at + pos as u64
                    )))
                }
            }
        }
        Ok(records)
    }
}

/// A generation in `record` no live volume reaches ([`MAX_GENERATION`]):
/// a version may end at the bound, a snapshot must close below it.
fn generation_beyond_bound(record: &Record) -> Option<u64> {
    match *record {
        Record::Preserve { start, end, .. } => {
            [start, end].into_iter().find(|&g| g > MAX_GENERATION)
        }
        Record::Free { start, .. } => Some(start).filter(|&g| g > MAX_GENERATION),
        Record::PartitionSnapshot { generation } => {
            Some(generation).filter(|&g| g >= MAX_GENERATION)
        }
        Record::Commit => None,
    }
}

/// The versions (chunk, start) that `records` free.
fn freed_versions(records: &[(Record, usize)]) -> std::collections::HashSet<(u64, u64)> {
    records
        .iter()
        .filter_map(|(r, _)| match *r {
            Record::Free { chunk, start } => Some((chunk, start)),
            _ => None,
        })
        .collect()
}

/// Whether every `Preserve` in `batch` finds its data in the store. A
/// version freed later in the same batch is skipped: one commit may carry a
/// preservation and, after a snapshot delete, its `Free`, and the slot is
/// punched once that commit returns.
async fn data_is_durable(
    store: &Backend,
    slot_size: u64,
    store_slots: u64,
    batch: &[(Record, usize)],
) -> Result<bool> {
    let freed = freed_versions(batch);
    let mut buf = vec![0u8; slot_size as usize];
    for (record, _) in batch {
        if let Record::Preserve {
            chunk,
            slot,
            start,
            data_crc,
            ..
        } = *record
        {
            if !in_store(slot) || freed.contains(&(chunk, start)) {
                continue;
            }
            if slot >= store_slots {
                return Ok(false);
            }
            store.read_at(&mut buf, slot * slot_size).await?;
            if slot_crc(&buf) != data_crc {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[derive(Clone, Debug)]
enum CommitError {
    NoSpace,
    Failed(String),
}

impl CommitError {
    fn into_engine(self) -> EngineError {
        match self {
            CommitError::NoSpace => EngineError::NoSpace,
            CommitError::Failed(reason) => journal_failed(&reason),
        }
    }
}

fn journal_failed(reason: &str) -> EngineError {
    EngineError::Io(std::io::Error::other(format!(
        "metadata journal write failed ({reason}); the volume refuses writes that need \
         copy-on-write until it is reopened: once the storage works again, run `snapblk volume \
         reopen NAME` (or restart the daemon)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemDisk;
    use crate::backend::Storage;
    use crate::runtime::block_on;
    use std::sync::Arc;

    const SLOT: u64 = 4096;

    fn records() -> Vec<Record> {
        vec![
            Record::Preserve {
                chunk: 7,
                slot: ZERO_SLOT,
                start: 0,
                end: 2,
                data_crc: 0,
            },
            Record::PartitionSnapshot { generation: 1 },
            Record::Free { chunk: 7, start: 0 },
        ]
    }

    async fn open(disk: &Arc<MemDisk>, store: &Backend) -> Result<(Journal, Replayed)> {
        let storage = Storage::Memory(disk.clone());
        Journal::open(&storage, "j", store.clone(), SLOT, "j").await
    }

    /// An empty journal file "j" with its store "s".
    async fn empty(disk: &Arc<MemDisk>) -> (Journal, Backend) {
        let storage = Storage::Memory(disk.clone());
        storage.open("j", true).unwrap();
        let store = storage.open("s", true).unwrap();
        let (journal, _) = open(disk, &store).await.unwrap();
        (journal, store)
    }

    /// A journal file "j" (with store "s") holding `records()` as two batches.
    async fn committed(disk: &Arc<MemDisk>) -> (Journal, Backend, Backend) {
        let storage = Storage::Memory(disk.clone());
        let file = storage.open("j", true).unwrap();
        let store = storage.open("s", true).unwrap();
        let (journal, replayed) = open(disk, &store).await.unwrap();
        assert!(replayed.records.is_empty());
        journal.commit(&records()[..2]).await.unwrap();
        journal.commit(&records()[2..]).await.unwrap();
        (journal, file, store)
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_cut() {
        let disk = MemDisk::new();
        block_on(async {
            let (_, file, store) = committed(&disk).await;
            let good_len = file.size().unwrap();
            // A torn append: half a record.
            file.write_at(&[0x53, 0x4e, 0x4a, 0x52, 9, 0], good_len, true)
                .await
                .unwrap();
            let (journal, replayed) = open(&disk, &store).await.unwrap();
            assert_eq!(replayed.records, records());
            assert_eq!(file.size().unwrap(), good_len);
            // Appending continues after the cut with the next sequence number.
            journal
                .commit(&[Record::PartitionSnapshot { generation: 5 }])
                .await
                .unwrap();
            let (_, replayed) = open(&disk, &store).await.unwrap();
            assert_eq!(replayed.records.len(), 4);
        });
    }

    #[test]
    fn damage_in_the_middle_is_reported_not_dropped() {
        let disk = MemDisk::new();
        block_on(async {
            let (_, _, store) = committed(&disk).await;
            disk.corrupt("j", 20);
            let err = open(&disk, &store).await.err().expect("must refuse");
            assert!(matches!(err, EngineError::Corrupt(_)), "{err}");
            assert!(err.to_string().contains("byte 0"), "{err}");
        });
    }

    #[test]
    fn a_corrupt_last_record_is_a_torn_tail_and_takes_its_batch() {
        let disk = MemDisk::new();
        block_on(async {
            let (_, _, store) = committed(&disk).await;
            disk.corrupt("j", disk.file_len("j").unwrap() - 2);
            let (_, replayed) = open(&disk, &store).await.unwrap();
            assert_eq!(replayed.records, records()[..2].to_vec());
        });
    }

    #[test]
    fn a_last_batch_whose_data_is_missing_is_dropped() {
        let disk = MemDisk::new();
        block_on(async {
            let (journal, store) = empty(&disk).await;
            let data = vec![0xabu8; SLOT as usize];
            let preserve = |slot| Record::Preserve {
                chunk: slot,
                slot,
                start: 0,
                end: 2,
                data_crc: slot_crc(&data),
            };
            store.write_at(&data, 0, false).await.unwrap();
            journal.commit(&[preserve(0)]).await.unwrap();
            // Slot 1's data never lands, but its record does.
            journal.commit(&[preserve(1)]).await.unwrap();
            let (_, replayed) = open(&disk, &store).await.unwrap();
            assert_eq!(replayed.records, vec![preserve(0)]);
            // Only the last batch is checked: earlier ones were flushed before it.
            let (journal, _) = open(&disk, &store).await.unwrap();
            journal
                .commit(&[Record::PartitionSnapshot { generation: 1 }])
                .await
                .unwrap();
            store.punch_hole(0, SLOT).await.unwrap();
            let (_, replayed) = open(&disk, &store).await.unwrap();
            assert_eq!(replayed.records.len(), 2);
        });
    }

    #[test]
    fn a_slot_beyond_the_store_is_refused_or_dropped_with_its_batch() {
        let disk = MemDisk::new();
        block_on(async {
            let (journal, store) = empty(&disk).await;
            let data = vec![0xabu8; SLOT as usize];
            store.write_at(&data, 0, false).await.unwrap();
            let far = Record::Preserve {
                chunk: 1,
                slot: 1 << 40,
                start: 0,
                end: 2,
                data_crc: slot_crc(&data),
            };
            // In the last batch: its data never reached the store.
            journal.commit(&[far]).await.unwrap();
            let (journal, replayed) = open(&disk, &store).await.unwrap();
            assert!(replayed.records.is_empty());
            // In an earlier batch: the journal is damaged. Recovery would
            // otherwise reserve 2^40 free slots.
            journal.commit(&[far]).await.unwrap();
            journal
                .commit(&[Record::PartitionSnapshot { generation: 1 }])
                .await
                .unwrap();
            let err = open(&disk, &store).await.err().expect("must refuse");
            assert!(matches!(err, EngineError::Corrupt(_)), "{err}");
            assert!(err.to_string().contains("slot 1099511627776"), "{err}");
        });
    }

    /// Found by the journal fuzzer: a snapshot of generation u64::MAX made
    /// the volume open overflow computing the next generation.
    #[test]
    fn a_generation_beyond_the_bound_is_refused() {
        let beyond = [
            Record::PartitionSnapshot {
                generation: u64::MAX,
            },
            Record::PartitionSnapshot {
                generation: MAX_GENERATION,
            },
            Record::Free {
                chunk: 0,
                start: MAX_GENERATION + 1,
            },
            Record::Preserve {
                chunk: 0,
                slot: ZERO_SLOT,
                start: 0,
                end: u64::MAX,
                data_crc: 0,
            },
        ];
        for record in beyond {
            let disk = MemDisk::new();
            block_on(async {
                let (journal, store) = empty(&disk).await;
                journal.commit(&[record]).await.unwrap();
                let err = open(&disk, &store).await.err().expect("must refuse");
                assert!(matches!(err, EngineError::Corrupt(_)), "{record:?}: {err}");
                assert!(
                    err.to_string().contains("beyond 4611686018427387904"),
                    "{err}"
                );
            });
        }
        // At the bound is still a version's end.
        let disk = MemDisk::new();
        block_on(async {
            let (journal, store) = empty(&disk).await;
            let last = Record::Preserve {
                chunk: 0,
                slot: ZERO_SLOT,
                start: 1,
                end: MAX_GENERATION,
                data_crc: 0,
            };
            journal.commit(&[last]).await.unwrap();
            let (_, replayed) = open(&disk, &store).await.unwrap();
            assert_eq!(replayed.records, vec![last]);
        });
    }

    /// A power cut after the journal flush of a batch but before its store
    /// flush, where the batch also frees a version it preserves (a
    /// snapshot deleted before the commit): the freed version's slot may
    /// lie past the store's end, then and after later batches, and that is
    /// no damage.
    #[test]
    fn a_version_freed_in_the_last_batch_may_point_past_the_store() {
        let disk = MemDisk::new();
        block_on(async {
            let (journal, store) = empty(&disk).await;
            let preserved = Record::Preserve {
                chunk: 1,
                slot: 3,
                start: 0,
                end: 2,
                data_crc: 7,
            };
            let freed = Record::Free { chunk: 1, start: 0 };
            journal.commit(&[preserved, freed]).await.unwrap();
            let (journal, replayed) = open(&disk, &store).await.unwrap();
            assert_eq!(replayed.records, vec![preserved, freed]);
            // Nor once a later batch follows it.
            let snapshot = Record::PartitionSnapshot { generation: 3 };
            journal.commit(&[snapshot]).await.unwrap();
            let (_, replayed) = open(&disk, &store).await.unwrap();
            assert_eq!(replayed.records, vec![preserved, freed, snapshot]);
        });
    }

    #[test]
    fn compaction_keeps_what_live_snapshots_read() {
        let preserve = |chunk, slot, start, end| Record::Preserve {
            chunk,
            slot,
            start,
            end,
            data_crc: 0,
        };
        let history = [
            Record::PartitionSnapshot { generation: 1 },
            preserve(1, 0, 0, 2),
            Record::PartitionSnapshot { generation: 2 },
            Record::Commit,
            preserve(1, 1, 2, 3),
            preserve(2, 2, 0, 3),
            Record::Free { chunk: 2, start: 0 },
        ];
        // Snapshot 1 deleted, 2 live: only the version covering 2 stays;
        // the one only snapshot 1 read gives its slot back.
        let compacted = compact(&history, &[2]);
        assert_eq!(
            compacted.records,
            vec![
                Record::PartitionSnapshot { generation: 2 },
                preserve(1, 1, 2, 3)
            ]
        );
        assert_eq!(compacted.dropped_slots, vec![0]);
        // The trigger's estimate of live bytes is exact.
        assert_eq!(
            encode_all(&compacted.records).len() as u64,
            SNAPSHOT_LEN + PRESERVE_LEN + 2 * COMMIT_LEN
        );
        let bytes = encode_all(&compact(&history, &[1, 2]).records);
        assert_eq!(
            decode(&bytes).map(|(r, seq, _)| (r, seq)),
            Some((history[0], 0))
        );
    }

    /// `count` partition snapshots of which only the last stays live: a
    /// journal due for compaction.
    async fn churned(journal: &Journal, count: u64) -> Vec<u64> {
        for generation in 0..count {
            journal
                .commit(&[Record::PartitionSnapshot { generation }])
                .await
                .unwrap();
        }
        vec![count - 1]
    }

    fn zero_version(chunk: u64) -> Record {
        Record::Preserve {
            chunk,
            slot: ZERO_SLOT,
            start: 0,
            end: 1,
            data_crc: 0,
        }
    }

    /// Records committed while a compaction reads the old file go into the
    /// new one, and so do records queued while it holds commit leadership.
    #[test]
    fn compaction_under_concurrent_commits_loses_no_queued_record() {
        use std::future::Future;
        use std::sync::mpsc;
        use std::task::{Context, Poll};
        use std::thread::JoinHandle;

        let disk = MemDisk::new();
        let storage = Storage::Memory(disk.clone());
        storage.open("j", true).unwrap();
        let store = storage.open("s", true).unwrap();
        let journal = Arc::new(block_on(open(&disk, &store)).unwrap().0);
        let live = block_on(churned(&journal, 300));
        let before = disk.file_len("j").unwrap();
        let queued: Arc<Mutex<Vec<JoinHandle<Result<()>>>>> = Default::default();

        // Commits from other threads, as partitions are written from many.
        let commit_now = {
            let journal = journal.clone();
            move |record: Record| {
                let journal = journal.clone();
                let commit = move || block_on(journal.commit(&[record]));
                std::thread::spawn(commit).join().unwrap().unwrap();
            }
        };
        let commit_queued = {
            let (journal, queued) = (journal.clone(), queued.clone());
            move |record: Record| {
                let journal = journal.clone();
                let (polled, ready) = mpsc::channel();
                let handle = std::thread::spawn(move || {
                    let records = [record];
                    let mut commit = Box::pin(journal.commit(&records));
                    let waker = futures::task::noop_waker();
                    let first = commit.as_mut().poll(&mut Context::from_waker(&waker));
                    assert!(
                        matches!(first, Poll::Pending),
                        "a commit must wait while a compaction holds leadership"
                    );
                    polled.send(()).unwrap();
                    block_on(commit)
                });
                ready.recv().unwrap();
                queued.lock().unwrap().push(handle);
            }
        };
        // The first read of the journal is the compaction reading the old
        // file without leadership; the second, of what was committed
        // meanwhile, runs with it.
        let d = disk.clone();
        disk.before_next_read("j", move || {
            commit_now(zero_version(1));
            d.before_next_read("j", move || {
                commit_queued(zero_version(2));
                commit_queued(zero_version(3));
            });
        });
        block_on(journal.compact_if_grown(&live, 0)).unwrap();
        for handle in std::mem::take(&mut *queued.lock().unwrap()) {
            handle.join().unwrap().unwrap();
        }
        let after = disk.file_len("j").unwrap();
        assert!(
            after * 10 < before,
            "not compacted: {before} -> {after} bytes"
        );
        block_on(journal.commit(&[zero_version(4)])).unwrap();
        let (_, replayed) = block_on(open(&disk, &store)).unwrap();
        let mut expected = vec![Record::PartitionSnapshot { generation: 299 }];
        expected.extend((1..=4).map(zero_version));
        assert_eq!(replayed.records, expected);
    }

    /// On real files the rename leaves the old handle on the unlinked file:
    /// commits after a compaction must reach the new one. Below the trigger
    /// the journal is left alone.
    #[test]
    fn compaction_on_real_files_reopens_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::Dir(dir.path().into());
        let path = dir.path().join("j");
        block_on(async {
            storage.open("j", true).unwrap();
            let store = storage.open("s", true).unwrap();
            let open = || Journal::open(&storage, "j", store.clone(), SLOT, "j");
            let (journal, _) = open().await.unwrap();
            let live = churned(&journal, 40).await;
            let small = std::fs::metadata(&path).unwrap().len();
            assert!(small < SLACK, "{small} bytes");
            journal.compact_if_grown(&live, 0).await.unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), small);

            let live = churned(&journal, 300).await;
            journal.compact_if_grown(&live, 0).await.unwrap();
            journal.commit(&[zero_version(1)]).await.unwrap();
            let expected = [
                Record::PartitionSnapshot { generation: 299 },
                zero_version(1),
            ];
            let (_, replayed) = open().await.unwrap();
            assert_eq!(replayed.records, expected);
            // Exactly the live records, their commit markers and one batch.
            let len = std::fs::metadata(&path).unwrap().len();
            assert_eq!(len, SNAPSHOT_LEN + PRESERVE_LEN + 3 * COMMIT_LEN);
        });
    }

    /// At open a journal that outgrew its live records is rewritten to them
    /// and the slots of the versions it drops are punched; one within the
    /// bound is left alone.
    #[test]
    fn open_compacts_an_outgrown_journal_and_frees_dropped_slots() {
        let disk = MemDisk::new();
        let storage = Storage::Memory(disk.clone());
        block_on(async {
            storage.open("j", true).unwrap();
            let store = storage.open("s", true).unwrap();
            let data = vec![0xabu8; SLOT as usize];
            let version = |chunk, end| Record::Preserve {
                chunk,
                slot: chunk,
                start: 0,
                end,
                data_crc: slot_crc(&data),
            };
            let (journal, _) = open(&disk, &store).await.unwrap();
            store.write_at(&data, 0, false).await.unwrap();
            store.write_at(&data, SLOT, false).await.unwrap();
            // Slot 0 serves only generation 0, slot 1 the live 299.
            journal
                .commit(&[version(0, 1), version(1, 300)])
                .await
                .unwrap();
            let live = churned(&journal, 300).await;
            drop(journal);
            let before = disk.file_len("j").unwrap();
            let open_compacted =
                || Journal::open_compacted(&storage, "j", store.clone(), SLOT, "j", &live);
            let (journal, replayed) = open_compacted().await.unwrap();
            let mut expected = vec![
                Record::PartitionSnapshot { generation: 299 },
                version(1, 300),
            ];
            assert_eq!(replayed.records, expected);
            let after = disk.file_len("j").unwrap();
            assert!(
                after * 10 < before,
                "not compacted: {before} -> {after} bytes"
            );
            let mut slots = vec![0u8; 2 * SLOT as usize];
            store.read_at(&mut slots, 0).await.unwrap();
            assert!(
                slots[..SLOT as usize].iter().all(|&b| b == 0),
                "slot 0 kept"
            );
            assert_eq!(slots[SLOT as usize..], data[..]);
            // A dead record within the bound survives the next open.
            journal.commit(&[zero_version(5)]).await.unwrap();
            drop(journal);
            let (_, replayed) = open_compacted().await.unwrap();
            expected.push(zero_version(5));
            assert_eq!(replayed.records, expected);
        });
    }
}

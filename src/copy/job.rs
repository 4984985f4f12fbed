//! One copy job: its segments, its write hook (`hold` / `direct`), the job
//! thread that walks the block list, group commit of progress, verify, and
//! the end of a job (done, failed, cancelled).
//!
//! A segment is `Pending`, `InFlight` (someone is copying it) or `Done`
//! (its data is durable in the target and its progress entry is durable).
//! Only the claimant of a segment copies it; a write to a segment that is
//! not `Done` waits (`hold`, while the job thread runs) or claims it and
//! copies it itself first (`direct`, and `hold` while the job is paused or
//! the daemon stops). A `cow` job has no hook: it reads its point-in-time
//! snapshot and gives each segment back to the engine once it is `Done`.
//!
//! A stalled target (a pipe nobody drains, a hung network file system) must
//! not block the volume: every write waiting for the job is timed, and
//! [`Job::check_stall`] (called by the jobs' timer thread, seed 002's
//! "timer") fails the job once one waited longer than its hold timeout.
//! An ended job's hook lets writes through, and whatever waits on the
//! target (the job thread, a write copying first) stops waiting: its I/O is
//! dropped, which cancels it.

use super::progress::{Entry, JobRecord, JobState, Moved, Policy, ProgressMap};
use super::stream;
use super::target::{engine_io, Target};
use crate::engine::{EngineError, SnapshotConsumer, View, Volume, WriteGuard, WriteHook};
use crate::runtime::AlignedBuf;
use futures::future::{join_all, BoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Bytes in flight on the job thread (fewer under a low `--rate`).
const IN_FLIGHT_BYTES: u64 = 32 << 20;
/// Consecutive segments are copied as one I/O of at most this many bytes
/// (or one segment, when segments are larger).
const RUN_BYTES: u64 = 8 << 20;
/// Segments verified at once.
const VERIFY_BATCH: usize = 16;
/// Copied bytes per progress commit at most (fewer when a write waits).
const COMMIT_BYTES: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seg {
    Pending,
    InFlight,
    Done(Entry),
}

struct Shared {
    segs: Vec<Seg>,
    /// Segments that held writes wait for, in arrival order.
    urgent: VecDeque<u64>,
    /// Held writes' picks in a row (the walk gets every fourth).
    urgent_streak: u32,
    /// Segments a write waits for (held, or in flight under `direct`):
    /// once copied, they are committed at once instead of with the group.
    awaited: HashSet<u64>,
    /// The sequential walk's next segment.
    cursor: u64,
    done: u64,
    done_bytes: u64,
    moved: Moved,
    /// Bumped on every change a waiting write may care about.
    changes: u64,
    waiters: Vec<Waker>,
    committed_stream_len: u64,
    /// When each write now waiting for the job began to wait, by ticket.
    waits: BTreeMap<u64, Instant>,
    next_ticket: u64,
}

/// What the job thread is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Run,
    Pause,
    Cancel,
    /// The daemon stops: leave the job as it is on disk, to resume later.
    Stop,
}

pub struct Job {
    pub id: u64,
    dir: PathBuf,
    record: Mutex<JobRecord>,
    volume: Arc<Volume>,
    source: View,
    consumer: Option<SnapshotConsumer>,
    target: Target,
    map: ProgressMap,
    shared: Mutex<Shared>,
    /// One committer at a time writes the map (the stream length in its
    /// header only grows); held across the map's asynchronous writes.
    commit: futures::lock::Mutex<()>,
    want: Mutex<Want>,
    wake: Condvar,
    /// The job thread is walking the block list (not paused or stopped).
    active: AtomicBool,
    /// The job ended (done, failed or cancelled); hooks let writes through.
    ended: AtomicBool,
    failure: Mutex<Option<String>>,
    hook: Mutex<Option<Arc<dyn WriteHook>>>,
    run_start: Mutex<(Instant, u64)>,
    buffers: Mutex<Vec<AlignedBuf>>,
    block_size: u64,
    verify: bool,
    /// The origin file and the target file, for `copy_file_range`.
    kernel_copy: Option<(std::fs::File, std::fs::File)>,
    kernel_copy_ok: AtomicBool,
    tuning: Tuning,
}

/// Switches for benchmarks that measure what each part of the data path
/// gains (`SNAPBLK_COPY_TUNING=no-kernel-copy,no-registered-buffers,
/// no-coalescing` in the daemon's environment). Everything is on by default.
#[derive(Clone, Copy, Debug)]
struct Tuning {
    kernel_copy: bool,
    registered_buffers: bool,
    coalescing: bool,
}

impl Tuning {
    fn from_env() -> Tuning {
        let off = std::env::var("SNAPBLK_COPY_TUNING").unwrap_or_default();
        let off: Vec<&str> = off.split(',').map(str::trim).collect();
        for word in &off {
            if ![
                "",
                "no-kernel-copy",
                "no-registered-buffers",
                "no-coalescing",
            ]
            .contains(word)
            {
                log::warn!("SNAPBLK_COPY_TUNING: unknown switch {word:?} ignored");
            }
        }
        Tuning {
            kernel_copy: !off.contains(&"no-kernel-copy"),
            registered_buffers: !off.contains(&"no-registered-buffers"),
            coalescing: !off.contains(&"no-coalescing"),
        }
    }
}

/// Everything a job is built from (new or resumed).
pub struct Parts {
    pub dir: PathBuf,
    pub record: JobRecord,
    pub volume: Arc<Volume>,
    pub source: View,
    pub consumer: Option<SnapshotConsumer>,
    pub target: Target,
    pub map: ProgressMap,
    pub entries: Vec<Entry>,
    pub committed_stream_len: u64,
    /// The origin file and the target file when the kernel can copy
    /// between them (`copy_file_range`, same file system).
    pub kernel_copy: Option<(std::fs::File, std::fs::File)>,
}

impl Job {
    pub fn new(p: Parts) -> Arc<Job> {
        let bs = p.record.block_size;
        let size = p.record.size;
        let mut shared = Shared {
            segs: Vec::with_capacity(p.entries.len()),
            urgent: VecDeque::new(),
            urgent_streak: 0,
            awaited: HashSet::new(),
            cursor: 0,
            done: 0,
            done_bytes: 0,
            moved: Moved::default(),
            changes: 0,
            waiters: Vec::new(),
            committed_stream_len: p.committed_stream_len,
            waits: BTreeMap::new(),
            next_ticket: 0,
        };
        for (i, e) in p.entries.iter().enumerate() {
            if *e == Entry::Pending {
                shared.segs.push(Seg::Pending);
                continue;
            }
            let off = i as u64 * bs;
            let len = bs.min(size - off);
            shared.segs.push(Seg::Done(*e));
            shared.done += 1;
            shared.done_bytes += len;
            if let Some(c) = &p.consumer {
                c.release(off, len);
            }
        }
        let done_bytes = shared.done_bytes;
        let verify = p.record.verify;
        let tuning = Tuning::from_env();
        Arc::new(Job {
            id: p.record.id,
            dir: p.dir,
            want: Mutex::new(if p.record.state == JobState::Paused {
                Want::Pause
            } else {
                Want::Run
            }),
            record: Mutex::new(p.record),
            volume: p.volume,
            source: p.source,
            consumer: p.consumer,
            target: p.target,
            map: p.map,
            shared: Mutex::new(shared),
            commit: futures::lock::Mutex::new(()),
            wake: Condvar::new(),
            active: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            failure: Mutex::new(None),
            hook: Mutex::new(None),
            run_start: Mutex::new((Instant::now(), done_bytes)),
            buffers: Mutex::new(Vec::new()),
            block_size: bs,
            verify,
            kernel_copy_ok: AtomicBool::new(p.kernel_copy.is_some() && tuning.kernel_copy),
            kernel_copy: p.kernel_copy,
            tuning,
        })
    }

    pub fn record(&self) -> JobRecord {
        self.record.lock().unwrap().clone()
    }

    fn seg_range(&self, seg: u64) -> (u64, u64) {
        let r = self.record.lock().unwrap();
        let off = seg * r.block_size;
        (off, r.block_size.min(r.size - off))
    }

    /// Puts the job's hook in the volume's write path (`hold` / `direct`).
    pub async fn install_hook(self: &Arc<Self>) {
        let hook: Arc<dyn WriteHook> = Arc::new(Hook(self.clone()));
        self.volume.add_write_hook(hook.clone()).await;
        *self.hook.lock().unwrap() = Some(hook);
    }

    fn notify(&self) {
        let waiters = {
            let mut s = self.shared.lock().unwrap();
            s.changes += 1;
            std::mem::take(&mut s.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }

    /// Asks the job thread to pause, resume, cancel or stop.
    pub fn set_want(&self, want: Want) {
        *self.want.lock().unwrap() = want;
        match want {
            Want::Pause => self.set_state(JobState::Paused),
            Want::Run if self.record.lock().unwrap().state == JobState::Paused => {
                self.set_state(JobState::Running)
            }
            _ => {}
        }
        self.wake.notify_all();
    }

    pub fn want(&self) -> Want {
        *self.want.lock().unwrap()
    }

    /// Records a failure on the job thread (which may block): in the job's
    /// record first, then every write goes through; the job thread ends
    /// the job. A write that went through before a crash must not find
    /// the job resumed, copying what it wrote.
    fn fail(&self, what: &str, e: &io::Error) {
        let msg = self.failure_message(what, e);
        if let Some(r) = self.mark_failed(&msg) {
            let _ = self.save(&r);
        }
        self.failed(msg);
    }

    /// A write's hook could not copy its segment first: the job fails
    /// durably before the write goes through, so that after a restart (the
    /// job thread may have stopped with the daemon, or the daemon may be
    /// killed) the job shows this error instead of resuming and copying
    /// what the write put there.
    async fn fail_before_write(&self, what: &str, e: &io::Error) {
        let msg = self.failure_message(what, e);
        if let Some(r) = self.mark_failed(&msg) {
            if let Err(e) = super::progress::save_record_off_thread(&self.dir, r).await {
                log::error!("copy job {}: cannot save its failure: {e}", self.id);
            }
        }
        self.failed(msg);
    }

    /// Marks the record failed; returns it to be saved, unless the job
    /// had already ended.
    fn mark_failed(&self, msg: &str) -> Option<JobRecord> {
        let mut r = self.record.lock().unwrap();
        (!r.state.finished()).then(|| {
            r.state = JobState::Failed;
            r.error = Some(msg.to_string());
            r.clone()
        })
    }

    /// What the job reports: its first failure.
    fn failure_message(&self, what: &str, e: &io::Error) -> String {
        if let Some(first) = self.failure.lock().unwrap().clone() {
            return first;
        }
        let target = self.record.lock().unwrap().target.clone();
        if e.raw_os_error() == Some(libc::ENOSPC) {
            format!(
                "the target {target} is full (no space left on device) while {what}; the volume \
                 is unaffected; free space there or copy to a larger target with a new `copy start`"
            )
        } else {
            format!(
                "{what} failed: {}",
                crate::cli::strip_os_error(&e.to_string())
            )
        }
    }

    fn failed(&self, msg: String) {
        log::error!("copy job {}: {msg}", self.id);
        self.failure.lock().unwrap().get_or_insert(msg);
        self.ended.store(true, Ordering::Release);
        self.wake.notify_all();
        self.notify();
    }

    /// Lets everything waiting for the job go: hooks pass writes through,
    /// and whatever waits on the target gives up (see [`Self::unless_ended`]).
    /// For `copy cancel` when the job thread does not finish by itself.
    pub fn stop_waiting(&self) {
        self.ended.store(true, Ordering::Release);
        self.wake.notify_all();
        self.notify();
    }

    /// Fails the job if a write has waited for it longer than its hold
    /// timeout: the target stopped taking data, and the volume's writes
    /// must not wait for it forever. Blocks (saves the record).
    pub fn check_stall(&self) {
        let oldest = self.shared.lock().unwrap().waits.values().min().copied();
        let (timeout, target) = {
            let r = self.record.lock().unwrap();
            (Duration::from_millis(r.hold_timeout_ms), r.target.clone())
        };
        if oldest.is_none_or(|t| t.elapsed() <= timeout) || self.ended.load(Ordering::Acquire) {
            return;
        }
        let msg = format!(
            "the target {target} took no data for {} s while a write to the volume waited for \
             the copy (hold timeout); the job failed so that writes go on, and the volume is \
             unaffected; check the target, then start a new copy (--hold-timeout sets the limit)",
            timeout.as_secs_f64()
        );
        if let Some(r) = self.mark_failed(&msg) {
            let _ = self.save(&r);
        }
        self.failed(msg);
    }

    /// Times a write's wait for the job until the guard drops.
    fn start_wait(&self) -> WaitGuard<'_> {
        let mut s = self.shared.lock().unwrap();
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.waits.insert(ticket, Instant::now());
        WaitGuard { job: self, ticket }
    }

    /// `fut`'s output, or None if the job ends first; `fut` is then
    /// dropped, which cancels its I/O (a write to a target that stopped
    /// taking data never completes by itself).
    async fn unless_ended<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        let fut = std::pin::pin!(fut);
        match futures::future::select(fut, Ended(self)).await {
            futures::future::Either::Left((v, _)) => Some(v),
            futures::future::Either::Right(_) => None,
        }
    }

    /// Segments per run (one I/O) at most.
    fn run_segments(&self) -> u64 {
        if !self.tuning.coalescing {
            return 1;
        }
        (RUN_BYTES / self.block_size).max(1)
    }

    /// Copies the `n` consecutive segments from `first` on from the source
    /// to the target (not yet durable): zero segments are skipped as one,
    /// each stretch of data segments is one read and one write (or one
    /// `copy_file_range`); under `--since`, segments that did not change
    /// since its snapshot are not touched. `may_block`: on the job thread,
    /// which may wait in a syscall. `buf` holds at least `n` segments.
    async fn copy_run(
        &self,
        first: u64,
        n: u64,
        may_block: bool,
        buf: &mut [u8],
    ) -> io::Result<Vec<(u64, Entry)>> {
        let (off, _) = self.seg_range(first);
        let (last_off, last_len) = self.seg_range(first + n - 1);
        let len = last_off + last_len - off;
        let extents = self.source.block_status(off, len).map_err(engine_io)?;
        let since = self.record.lock().unwrap().since.clone();
        let changed = match since {
            Some(s) => Some(
                self.source
                    .changed_since(&s.snapshot, off, len)
                    .map_err(engine_io)?,
            ),
            None => None,
        };
        #[derive(Clone, Copy, PartialEq)]
        enum Kind {
            Data,
            Zero,
            Unchanged,
        }
        let kind = |seg: u64| {
            let (o, l) = self.seg_range(seg);
            let overlaps = |a: u64, b: u64| a < o + l && o < b;
            if changed
                .as_ref()
                .is_some_and(|c| !c.iter().any(|r| overlaps(r.start, r.end)))
            {
                Kind::Unchanged
            } else if extents
                .iter()
                .any(|e| e.data && overlaps(e.offset, e.offset + e.len))
            {
                Kind::Data
            } else {
                Kind::Zero
            }
        };
        let mut out = Vec::with_capacity(n as usize);
        let mut seg = first;
        while seg < first + n {
            let k = kind(seg);
            let mut end = seg + 1;
            while end < first + n && kind(end) == k {
                end += 1;
            }
            let (o, _) = self.seg_range(seg);
            let (lo, ll) = self.seg_range(end - 1);
            match k {
                Kind::Data => {
                    let at = ((seg - first) * self.block_size) as usize;
                    let data = &mut buf[at..at + (lo + ll - o) as usize];
                    out.extend(self.copy_data(seg, end, o, data, may_block).await?);
                }
                Kind::Zero => {
                    self.target.write_zeroes(o, lo + ll - o).await?;
                    out.extend((seg..end).map(|s| (s, Entry::Zero)));
                }
                Kind::Unchanged => out.extend((seg..end).map(|s| (s, Entry::Unchanged))),
            }
            seg = end;
        }
        Ok(out)
    }

    /// Copies segments `[first, end)`, the bytes `[off, +data.len())`, that
    /// hold data, through `data`.
    async fn copy_data(
        &self,
        first: u64,
        end: u64,
        off: u64,
        data: &mut [u8],
        may_block: bool,
    ) -> io::Result<Vec<(u64, Entry)>> {
        let len = data.len() as u64;
        if may_block && self.kernel_copy(off, len)? {
            self.shared.lock().unwrap().moved.bytes_kernel_copied += len;
            return Ok((first..end).map(|s| (s, Entry::Copied(0))).collect());
        }
        self.source.read(off, data).await.map_err(engine_io)?;
        self.target.write_blocks(off, data, self.block_size).await?;
        // Only --verify needs the checksums (it compares the target with
        // them), one per segment.
        Ok(data
            .chunks(self.block_size as usize)
            .zip(first..end)
            .map(|(d, s)| {
                let crc = if self.verify { crc32c::crc32c(d) } else { 0 };
                (s, Entry::Copied(crc))
            })
            .collect())
    }

    /// Lets the kernel copy the segment from the origin file to the target
    /// file when the source reads it from the origin (no data through user
    /// memory); false when the segment must take the read/write path.
    fn kernel_copy(&self, off: u64, len: u64) -> io::Result<bool> {
        let Some((origin, target)) = &self.kernel_copy else {
            return Ok(false);
        };
        if !self.kernel_copy_ok.load(Ordering::Relaxed)
            || !self.source.reads_origin(off, len).map_err(engine_io)?
        {
            return Ok(false);
        }
        let (mut from, mut to, end) = (off as i64, off as i64, (off + len) as i64);
        while from < end {
            // SAFETY: plain syscall on descriptors we own, offsets by pointer.
            let n = unsafe {
                libc::copy_file_range(
                    origin.as_raw_fd(),
                    &mut from,
                    target.as_raw_fd(),
                    &mut to,
                    (end - from) as usize,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => {
                        log::info!("copy job {}: no copy_file_range here ({e})", self.id);
                        self.kernel_copy_ok.store(false, Ordering::Relaxed);
                        Ok(false)
                    }
                    _ => Err(e),
                };
            }
            if n == 0 {
                return Ok(false);
            }
        }
        // A write that began preserving a chunk meanwhile may have changed
        // what was read: then the read/write path redoes the segment.
        self.source.reads_origin(off, len).map_err(engine_io)
    }

    /// A segment-size buffer for a write's hook, which copies one segment
    /// on the writer's thread (allocating and faulting in a fresh one per
    /// copy costs as much CPU as the copy itself).
    fn buffer(&self) -> AlignedBuf {
        let popped = self.buffers.lock().unwrap().pop();
        popped.unwrap_or_else(|| AlignedBuf::zeroed(self.block_size as usize))
    }

    /// Makes copied segments durable (target flush, then their progress
    /// entries with one fdatasync), then marks them done and, for `cow`,
    /// gives them back to the engine.
    async fn commit(&self, done: &[(u64, Entry)]) -> io::Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let stream_len = self.target.stream_len().await;
        self.target.flush().await?;
        {
            let _one = self.commit.lock().await;
            let header = stream_len.map(|l| {
                let mut s = self.shared.lock().unwrap();
                s.committed_stream_len = s.committed_stream_len.max(l);
                s.committed_stream_len
            });
            self.map.write(done, header).await?;
        }
        self.map.sync().await?;
        let ranges: Vec<(u64, u64)> = done.iter().map(|&(s, _)| self.seg_range(s)).collect();
        {
            let mut s = self.shared.lock().unwrap();
            for (&(seg, entry), &(_, len)) in done.iter().zip(&ranges) {
                s.segs[seg as usize] = Seg::Done(entry);
                s.awaited.remove(&seg);
                s.done += 1;
                s.done_bytes += len;
                if matches!(entry, Entry::Copied(_)) {
                    s.moved.bytes_copied += len;
                }
            }
        }
        if let Some(c) = &self.consumer {
            ranges.iter().for_each(|&(off, len)| c.release(off, len));
        }
        self.notify();
        Ok(())
    }

    /// The write hook's work for `[offset, +len)`.
    async fn before_write(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (bs, hold) = {
            let r = self.record.lock().unwrap();
            (r.block_size, r.policy == Policy::Hold)
        };
        let mut timed = None;
        for seg in offset / bs..=(offset + len - 1) / bs {
            loop {
                enum Next {
                    Go,
                    Wait(u64),
                    CopyFirst,
                }
                let next = {
                    let mut s = self.shared.lock().unwrap();
                    if self.ended.load(Ordering::Acquire) {
                        return;
                    }
                    match s.segs[seg as usize] {
                        Seg::Done(_) => Next::Go,
                        Seg::InFlight => {
                            s.awaited.insert(seg);
                            Next::Wait(s.changes)
                        }
                        Seg::Pending if hold && self.active.load(Ordering::Acquire) => {
                            if s.awaited.insert(seg) {
                                s.urgent.push_back(seg);
                            }
                            Next::Wait(s.changes)
                        }
                        Seg::Pending => {
                            s.segs[seg as usize] = Seg::InFlight;
                            Next::CopyFirst
                        }
                    }
                };
                if !matches!(next, Next::Go) && timed.is_none() {
                    timed = Some(self.start_wait());
                }
                match next {
                    Next::Go => break,
                    Next::Wait(seen) => Changed { job: self, seen }.await,
                    Next::CopyFirst => {
                        let mut buf = self.buffer();
                        let copy = async {
                            match self.copy_run(seg, 1, false, &mut buf).await {
                                Ok(d) => self.commit(&d).await,
                                Err(e) => Err(e),
                            }
                        };
                        // None: the job ended (timed out) meanwhile.
                        let copied = self.unless_ended(copy).await.unwrap_or(Ok(()));
                        self.buffers.lock().unwrap().push(buf);
                        if let Err(e) = copied {
                            let (off, _) = self.seg_range(seg);
                            let what = format!("copying the segment at {off} before a write");
                            self.fail_before_write(&what, &e).await;
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Claims the next runs to copy in one slot (see [`next_pick`]).
    fn pick(&self, max: u64) -> Option<Vec<(u64, u64)>> {
        next_pick(&mut self.shared.lock().unwrap(), max)
    }

    /// Copies `runs` (of at most `buf`'s size together) at once; on
    /// failure, the first segment of the run that failed.
    async fn copy_slot(
        &self,
        runs: &[(u64, u64)],
        buf: &mut [u8],
    ) -> Result<Vec<(u64, Entry)>, (u64, io::Error)> {
        let mut rest = buf;
        let mut copies = Vec::with_capacity(runs.len());
        for &(seg, n) in runs {
            let (b, tail) = rest.split_at_mut((n * self.block_size) as usize);
            rest = tail;
            copies.push(async move { self.copy_run(seg, n, true, b).await.map_err(|e| (seg, e)) });
        }
        let mut done = Vec::new();
        for copied in join_all(copies).await {
            done.extend(copied?);
        }
        Ok(done)
    }

    fn all_done(&self) -> bool {
        let s = self.shared.lock().unwrap();
        s.done == s.segs.len() as u64
    }

    /// Waits while paused; returns what to do next.
    fn runnable(&self) -> Want {
        let mut want = self.want.lock().unwrap();
        loop {
            if *want == Want::Stop {
                // Stays as it is on disk (failed, if it failed meanwhile).
                self.active.store(false, Ordering::Release);
                self.notify();
                return Want::Stop;
            }
            if self.ended.load(Ordering::Acquire) {
                return Want::Cancel;
            }
            match *want {
                Want::Pause => {
                    if self.active.swap(false, Ordering::AcqRel) {
                        self.notify();
                        self.set_state(JobState::Paused);
                    }
                    want = self.wake.wait(want).unwrap();
                }
                Want::Run => {
                    if !self.active.swap(true, Ordering::AcqRel) {
                        self.set_state(JobState::Running);
                        let done = self.shared.lock().unwrap().done_bytes;
                        *self.run_start.lock().unwrap() = (Instant::now(), done);
                    }
                    return Want::Run;
                }
                w => {
                    self.active.store(false, Ordering::Release);
                    self.notify();
                    return w;
                }
            }
        }
    }

    /// Moves a job that has not ended to `state` and saves its record (an
    /// ended one, e.g. failed by a write's hook, stays so).
    fn set_state(&self, state: JobState) {
        let mut r = self.record.lock().unwrap();
        if r.state == state || r.state.finished() {
            return;
        }
        r.state = state;
        let _ = self.save(&r);
    }

    /// Saves the record; false (logged) if it could not be.
    fn save(&self, r: &JobRecord) -> bool {
        match super::progress::save_record(&self.dir, r) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("copy job {}: cannot save its state: {e}", self.id);
                false
            }
        }
    }

    /// The job thread: walks the block list until done, then verifies and
    /// ends the job.
    pub fn run(self: Arc<Self>) {
        crate::runtime::block_on(async {
            let (rate, bs) = {
                let r = self.record.lock().unwrap();
                (r.rate, r.block_size)
            };
            let max = (IN_FLIGHT_BYTES / bs).max(1);
            // Under --rate, at most a quarter second's worth in flight: the
            // pacing after each run then keeps bursts that short.
            let depth = rate.map_or(max, |r| (r / 4 / bs).clamp(1, max));
            let run_segments = self.run_segments().min(depth);
            let slots = (depth / run_segments).max(1);
            // Each run in flight has its slot in one arena registered with
            // this thread's io_uring: the kernel pins and maps it once, not
            // at every read and write (part of seed 001's direct
            // device-to-device copy).
            let arena_len = (slots * run_segments * bs) as usize;
            let mut arena = if self.tuning.registered_buffers {
                crate::runtime::FixedArena::new(arena_len)
            } else {
                log::info!("copy job {}: registered buffers switched off", self.id);
                crate::runtime::FixedArena::unregistered(arena_len)
            };
            let mut free: Vec<&mut [u8]> = arena.chunks_mut((run_segments * bs) as usize).collect();
            let fixed_at_start = crate::runtime::fixed_io_bytes();
            // Runs in flight: a run that completes frees its slot for the
            // next at once, so the target never waits for a whole batch.
            let mut in_flight = FuturesUnordered::new();
            // Copied, not yet durable: committed together (one target flush
            // and one map fdatasync), at once when a write waits for one.
            let mut pending = Vec::new();
            let job = &*self;
            loop {
                if job.want() != Want::Run {
                    while let Some(Some((buf, copied))) = job.unless_ended(in_flight.next()).await {
                        free.push(buf);
                        job.collect(copied, &mut pending);
                    }
                    job.commit_pending(&mut pending).await;
                }
                match job.runnable() {
                    Want::Run => {}
                    Want::Stop => return,
                    Want::Pause => unreachable!("runnable waits out pauses"),
                    Want::Cancel => {
                        while let Some(Some(_)) = job.unless_ended(in_flight.next()).await {}
                        drop(in_flight);
                        let state = if job.failure.lock().unwrap().is_some() {
                            JobState::Failed
                        } else {
                            JobState::Cancelled
                        };
                        return job.end(state).await;
                    }
                }
                while let Some(buf) = free.pop() {
                    let Some(runs) = job.pick(run_segments) else {
                        free.push(buf);
                        break;
                    };
                    in_flight.push(async move {
                        let copied = job.copy_slot(&runs, buf).await;
                        (buf, copied)
                    });
                }
                let Some(next) = job.unless_ended(in_flight.next()).await else {
                    continue; // ended: `runnable` says Cancel
                };
                let Some((buf, copied)) = next else {
                    if !pending.is_empty() {
                        job.commit_pending(&mut pending).await;
                        continue;
                    }
                    if job.all_done() {
                        break;
                    }
                    // Writes are copying the last segments themselves.
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                free.push(buf);
                job.collect(copied, &mut pending);
                let waited_for = {
                    let mut s = job.shared.lock().unwrap();
                    s.moved.registered_buffer_io_bytes =
                        crate::runtime::fixed_io_bytes() - fixed_at_start;
                    pending.iter().any(|(seg, _)| s.awaited.contains(seg))
                };
                if rate.is_some() || waited_for || pending.len() as u64 * bs >= COMMIT_BYTES {
                    job.commit_pending(&mut pending).await;
                }
                if let Some(rate) = rate {
                    let (t0, b0) = *job.run_start.lock().unwrap();
                    let moved = job.shared.lock().unwrap().done_bytes - b0;
                    let due = Duration::from_secs_f64(moved as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(wait.min(Duration::from_secs(1)));
                    }
                }
            }
            drop(in_flight);
            if let Err((what, e)) = job.finish_target().await {
                job.fail(&what, &e);
                return job.end(JobState::Failed).await;
            }
            job.end(JobState::Done).await
        })
    }

    /// Takes a finished run's result: its segments wait for the next
    /// commit, or the job fails.
    fn collect(
        &self,
        copied: Result<Vec<(u64, Entry)>, (u64, io::Error)>,
        pending: &mut Vec<(u64, Entry)>,
    ) {
        match copied {
            Ok(done) => pending.extend(done),
            Err((seg, e)) => {
                let (off, _) = self.seg_range(seg);
                self.fail(&format!("copying the segments from {off} on"), &e);
            }
        }
    }

    async fn commit_pending(&self, pending: &mut Vec<(u64, Entry)>) {
        if let Err(e) = self.commit(pending).await {
            self.fail("making the copied data durable", &e);
        }
        pending.clear();
    }

    /// The stream's footer, then `--verify`.
    async fn finish_target(&self) -> Result<(), (String, io::Error)> {
        if let Target::Stream { file, pos, .. } = &self.target {
            let p = pos.lock().await;
            let footer = stream::footer(p.blocks, p.crc);
            crate::runtime::write_at(file.as_raw_fd(), &footer, p.len, 0)
                .await
                .map_err(|e| ("writing the stream's footer".to_string(), e))?;
            self.target
                .flush()
                .await
                .map_err(|e| ("flushing the stream".to_string(), e))?;
        }
        if !self.record.lock().unwrap().verify {
            return Ok(());
        }
        self.verify().await.map_err(|e| ("verify".to_string(), e))
    }

    /// Re-reads the target and compares it with the checksums recorded
    /// while copying (a stream: checks every frame and the footer).
    async fn verify(&self) -> io::Result<()> {
        if let Target::Stream { file, .. } = &self.target {
            let f = file.try_clone()?;
            let mut r = stream::StreamReader::open(io::BufReader::new(stream::ReadFrom(f, 0)))
                .map_err(io::Error::other)?;
            let mut data = Vec::new();
            let want: Vec<Seg> = self.shared.lock().unwrap().segs.clone();
            let bs = self.record.lock().unwrap().block_size;
            loop {
                match r.next(&mut data).map_err(io::Error::other)? {
                    stream::Item::Block { offset } => {
                        let crc = crc32c::crc32c(&data);
                        if want[(offset / bs) as usize] != Seg::Done(Entry::Copied(crc)) {
                            return Err(mismatch(offset));
                        }
                    }
                    stream::Item::Zero { offset, .. } => {
                        if want[(offset / bs) as usize] != Seg::Done(Entry::Zero) {
                            return Err(mismatch(offset));
                        }
                    }
                    stream::Item::End { .. } => return Ok(()),
                }
            }
        }
        let segs: Vec<Seg> = self.shared.lock().unwrap().segs.clone();
        for batch in (0..segs.len() as u64)
            .collect::<Vec<_>>()
            .chunks(VERIFY_BATCH)
        {
            let checks = batch.iter().map(|&seg| {
                let want = segs[seg as usize];
                async move {
                    let (off, len) = self.seg_range(seg);
                    let mut buf = AlignedBuf::zeroed(len as usize);
                    self.target.read(off, &mut buf).await?;
                    let ok = match want {
                        Seg::Done(Entry::Copied(crc)) => crc32c::crc32c(&buf) == crc,
                        Seg::Done(Entry::Zero) => buf.iter().all(|&b| b == 0),
                        // Not copied: the target must have held it already.
                        Seg::Done(Entry::Unchanged) => {
                            let mut source = AlignedBuf::zeroed(len as usize);
                            self.source
                                .read(off, &mut source)
                                .await
                                .map_err(engine_io)?;
                            buf[..] == source[..]
                        }
                        _ => false,
                    };
                    if ok {
                        Ok(())
                    } else {
                        Err(mismatch(off))
                    }
                }
            });
            for r in join_all(checks).await {
                r?;
            }
        }
        Ok(())
    }

    /// Ends the job: lets every write through, takes the hook out, frees
    /// the point-in-time snapshot and the progress map, records the state.
    pub async fn end(&self, state: JobState) {
        self.ended.store(true, Ordering::Release);
        self.active.store(false, Ordering::Release);
        self.notify();
        let hook = self.hook.lock().unwrap().take();
        if let Some(h) = hook {
            self.volume.remove_write_hook(&h).await;
        }
        let (internal, volume) = {
            let r = self.record.lock().unwrap();
            (r.internal_snapshot.clone(), r.volume.clone())
        };
        if let Some(name) = internal {
            match self.volume.delete_snapshot(&name).await {
                Ok(()) | Err(EngineError::NotFound(_)) => {}
                Err(e) => log::warn!("copy job {}: cannot delete {volume}@{name}: {e}", self.id),
            }
        }
        let ended = {
            let (done, moved) = {
                let s = self.shared.lock().unwrap();
                (s.done_bytes, s.moved)
            };
            let mut r = self.record.lock().unwrap();
            r.error = self.failure.lock().unwrap().clone();
            r.bytes_done = done;
            r.moved = moved;
            r.state = state;
            r.clone()
        };
        if state == JobState::Done {
            self.remember_image(&ended).await;
        }
        // Only once the end is saved: a crash (or a failed save) before
        // that must find the map, to resume; after it, the job has ended.
        if self.save(&ended) {
            let _ = std::fs::remove_file(super::progress::map_path(&self.dir, self.id));
        }
        log::info!("copy job {} ended: {state:?}", self.id);
    }

    /// A raw target that received the whole image remembers which, so a
    /// later `--since` copy or incremental restore can build on it.
    async fn remember_image(&self, r: &JobRecord) {
        if r.format != super::progress::Format::Raw {
            return;
        }
        let image = stream::Image {
            volume: r.volume.clone(),
            generation: r.generation,
            stamp: r.stamp,
        };
        let remembered = match &self.target {
            Target::Volume(view) => super::chain::volume_remember(view.volume(), &image)
                .await
                .map_err(|e| e.to_string()),
            _ => match (r.target_real.as_ref(), self.dir.parent()) {
                (Some(path), Some(data_dir)) => {
                    super::chain::remember(std::path::Path::new(path), data_dir, &image)
                        .map_err(|e| e.to_string())
                }
                _ => Ok(()),
            },
        };
        if let Err(e) = remembered {
            log::warn!(
                "copy job {}: {} holds {image} but cannot record so ({e}); a later --since \
                 copy to it will be refused",
                self.id,
                r.target
            );
        }
    }

    /// Progress for `copy status`.
    pub fn status(&self) -> serde_json::Value {
        let mut r = self.record();
        let (done, done_bytes) = {
            let s = self.shared.lock().unwrap();
            r.moved = s.moved;
            (s.done, s.done_bytes)
        };
        let (t0, b0) = *self.run_start.lock().unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let running = r.state == JobState::Running;
        // The first batch lands at once, before any pacing: a rate over
        // less than a second would show that burst, not the job's speed.
        let throughput = if running && secs >= 1.0 {
            ((done_bytes - b0) as f64 / secs) as u64
        } else {
            0
        };
        let eta = (running && throughput > 0).then(|| (r.size - done_bytes) / throughput.max(1));
        let mut v = record_json(&r);
        v["segments_done"] = done.into();
        v["bytes_done"] = done_bytes.into();
        v["throughput_bps"] = throughput.into();
        v["eta_s"] = eta.into();
        v
    }
}

/// Claims the next runs for one slot of `max` segments: held writes'
/// segments first, up to `max` of them at once, but never a fourth such
/// pick in a row, so the sequential walk always advances; else one run of
/// the walk's next pending segments, merged while they are consecutive.
/// Each run is `(first, count)`.
fn next_pick(s: &mut Shared, max: u64) -> Option<Vec<(u64, u64)>> {
    let urgent = |s: &mut Shared| {
        let mut runs = Vec::new();
        while (runs.len() as u64) < max {
            let Some(seg) = s.urgent.pop_front() else {
                break;
            };
            if s.segs[seg as usize] == Seg::Pending {
                s.segs[seg as usize] = Seg::InFlight;
                runs.push((seg, 1));
            }
        }
        (!runs.is_empty()).then_some(runs)
    };
    if s.urgent_streak < 3 {
        if let Some(runs) = urgent(s) {
            s.urgent_streak += 1;
            return Some(runs);
        }
    }
    s.urgent_streak = 0;
    let n = s.segs.len() as u64;
    while s.cursor < n && s.segs[s.cursor as usize] != Seg::Pending {
        s.cursor += 1;
    }
    if s.cursor == n {
        return urgent(s);
    }
    let first = s.cursor;
    while s.cursor < n && s.cursor - first < max && s.segs[s.cursor as usize] == Seg::Pending {
        s.segs[s.cursor as usize] = Seg::InFlight;
        s.cursor += 1;
    }
    Some(vec![(first, s.cursor - first)])
}

/// A finished or running job's record as `copy status` shows it.
pub fn record_json(r: &JobRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("records serialize");
    v["segments"] = r.segments().into();
    if r.state == JobState::Done {
        v["segments_done"] = r.segments().into();
    }
    v
}

fn mismatch(offset: u64) -> io::Error {
    io::Error::other(format!(
        "the target does not hold what was copied at offset {offset}"
    ))
}

/// Resolves once the job has ended.
struct Ended<'a>(&'a Job);

impl Future for Ended<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.0.shared.lock().unwrap();
        if self.0.ended.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if !s.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            s.waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A write's wait for the job, timed by [`Job::check_stall`].
struct WaitGuard<'a> {
    job: &'a Job,
    ticket: u64,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.job.shared.lock().unwrap().waits.remove(&self.ticket);
    }
}

/// Resolves when the job's shared state changed after `seen`.
struct Changed<'a> {
    job: &'a Job,
    seen: u64,
}

impl Future for Changed<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.job.shared.lock().unwrap();
        if s.changes != self.seen {
            return Poll::Ready(());
        }
        s.waiters.push(cx.waker().clone());
        Poll::Pending
    }
}

struct Hook(Arc<Job>);

impl WriteHook for Hook {
    fn before_write(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, crate::engine::Result<WriteGuard>> {
        Box::pin(async move {
            self.0.before_write(offset, len).await;
            Ok(None)
        })
    }

    fn after_write(&self, _: &mut WriteGuard, _: u64, _: crate::engine::Change<'_>) {}
}

#[cfg(test)]
mod tests {
    use super::{next_pick, Entry, Seg, Shared};
    use std::collections::{HashSet, VecDeque};

    fn shared(segs: Vec<Seg>, urgent: &[u64]) -> Shared {
        Shared {
            segs,
            urgent: urgent.iter().copied().collect::<VecDeque<_>>(),
            urgent_streak: 0,
            awaited: HashSet::new(),
            cursor: 0,
            done: 0,
            done_bytes: 0,
            moved: Default::default(),
            changes: 0,
            waiters: Vec::new(),
            committed_stream_len: 0,
            waits: Default::default(),
            next_ticket: 0,
        }
    }

    #[test]
    fn the_walk_merges_consecutive_pending_segments_up_to_the_limit() {
        let (p, d) = (Seg::Pending, Seg::Done(Entry::Zero));
        let mut s = shared(vec![p, p, p, p, d, p, Seg::InFlight, p], &[]);
        assert_eq!(next_pick(&mut s, 3), Some(vec![(0, 3)]));
        let one = |seg| Some(vec![(seg, 1)]);
        assert_eq!(next_pick(&mut s, 3), one(3), "a done segment ends a run");
        assert_eq!(next_pick(&mut s, 3), one(5), "so does one in flight");
        assert_eq!(next_pick(&mut s, 3), one(7));
        assert_eq!(next_pick(&mut s, 3), None);
        assert!(s.segs.iter().all(|&x| x != Seg::Pending), "all claimed");
    }

    #[test]
    fn held_writes_go_first_but_the_walk_gets_every_fourth_pick() {
        let mut s = shared(vec![Seg::Pending; 16], &[9, 1, 11, 12, 13, 14, 15, 9]);
        let picked: Vec<_> = (0..6).map_while(|_| next_pick(&mut s, 2)).collect();
        let held = |a, b| vec![(a, 1), (b, 1)];
        assert_eq!(
            picked,
            [
                held(9, 1),
                held(11, 12),
                held(13, 14),
                vec![(0, 1)],
                vec![(15, 1)],
                vec![(2, 2)]
            ],
            "9 is claimed once; the walk never starves"
        );
        // Once the walk is through, held segments still come.
        let mut s = shared(vec![Seg::Done(Entry::Zero), Seg::Pending], &[1]);
        s.urgent_streak = 3;
        assert_eq!(next_pick(&mut s, 4), Some(vec![(1, 1)]));
    }
}

//! The write-back buffer: origin writes held in memory until the journal
//! records of the preservations they overwrite are durable.
//!
//! Why it exists (issue 10, DESIGN.md "Making preservation cheap"): the
//! devices advertise a volatile write cache, so a write without FUA promises
//! nothing until the next FLUSH. The one ordering rule copy-on-write needs is
//! that a preserved copy and its record are durable before the overwritten
//! origin content can reach stable storage. Waiting for that commit inside
//! every first overwrite made writes after a snapshot as slow as one journal
//! and store flush per client queue depth. Instead, a write whose chunk has a
//! preservation not yet committed is acknowledged once it is held here; one
//! commit then covers every preservation queued meanwhile, however many
//! writes that is, and the held writes go to the origin right after it. This
//! is how dm-thin and qcow2 behave (metadata committed on FLUSH or
//! periodically), with the difference that our old data is copied once into
//! the partition's change log (seed 004) rather than redirected.
//!
//! Owns: the held writes (data or zeroes) in arrival order, the overlay that
//! reads of the live volume apply over the origin, the byte budget (a write
//! that takes the buffer past it drives the commit itself before it is
//! acknowledged: back-pressure, never unbounded memory; a snapshot of a
//! volume with native snapshots lowers it for a while, see
//! [`WriteBack::tighten`]), the order in which a drain may land them
//! ([`Landing`]), and the background committer thread that drains the
//! buffer.
//!
//! Must never: let a held write reach the origin before every journal record
//! queued before it was held is durable (the volume's `drive` commits the
//! journals first, then applies); let a held write reach the origin before
//! an earlier held write that overlaps it (see [`Landing`]); drop a held write whose application failed (it stays held and
//! readable, and the error goes to the FLUSH that asked).

use super::error::EngineError;
use crate::runtime::AlignedBuf;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How a volume's write-back buffer behaves; the daemon's settings.
#[derive(Clone, Debug)]
pub struct WriteBackConfig {
    /// Bytes of held writes before a write must wait for a commit.
    pub limit_bytes: usize,
    /// How long the background committer lets held writes gather before it
    /// commits them (it commits at once when half the budget is used).
    pub commit_delay: Duration,
    /// Run a background committer thread. Without one, held writes wait for
    /// a FLUSH, a FUA write, a full buffer or a snapshot (the deterministic
    /// crash tests run that way).
    pub background: bool,
}

/// Default budget: enough for a database's burst between flushes, small
/// next to the page cache. See README "The write path".
pub const DEFAULT_LIMIT_BYTES: usize = 64 << 20;
pub const DEFAULT_COMMIT_DELAY: Duration = Duration::from_millis(2);

impl Default for WriteBackConfig {
    fn default() -> Self {
        WriteBackConfig {
            limit_bytes: DEFAULT_LIMIT_BYTES,
            commit_delay: DEFAULT_COMMIT_DELAY,
            background: true,
        }
    }
}

/// The settings the daemon was started with (`--writeback-buffer`), used
/// by every volume it opens; the built-in default until it sets them.
static DAEMON_SETTINGS: std::sync::RwLock<Option<WriteBackConfig>> = std::sync::RwLock::new(None);

impl WriteBackConfig {
    pub fn set_daemon_default(config: WriteBackConfig) {
        *DAEMON_SETTINGS.write().unwrap() = Some(config);
    }

    pub fn daemon_default() -> WriteBackConfig {
        DAEMON_SETTINGS.read().unwrap().clone().unwrap_or_default()
    }
}

/// What a held write will do to the origin.
pub enum HeldOp {
    /// Shared, so that the origin's storage may keep it instead of copying
    /// it (see `Backend::write_owned_at`).
    Data(Arc<AlignedBuf>),
    Zeroes {
        keep_allocated: bool,
    },
}

/// One acknowledged write not yet applied to the origin.
pub struct Held {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub op: HeldOp,
}

/// What a held zeroing costs in the budget: it carries no data.
const ZEROES_COST: usize = 64;

impl Held {
    fn cost(&self) -> usize {
        match self.op {
            HeldOp::Data(_) => self.len as usize,
            HeldOp::Zeroes { .. } => ZEROES_COST,
        }
    }

    /// Copies what this write puts in `[offset, offset + buf.len())` into `buf`.
    pub fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let start = self.offset.max(offset);
        let end = (self.offset + self.len).min(offset + buf.len() as u64);
        if start >= end {
            return;
        }
        let dst = &mut buf[(start - offset) as usize..(end - offset) as usize];
        match &self.op {
            HeldOp::Data(data) => {
                let from = (start - self.offset) as usize;
                dst.copy_from_slice(&data[from..from + dst.len()]);
            }
            HeldOp::Zeroes { .. } => dst.fill(0),
        }
    }
}

#[derive(Default)]
struct State {
    next_seq: u64,
    held: BTreeMap<u64, Arc<Held>>,
    /// Chunk -> seqs of the held writes touching it, ascending.
    by_chunk: HashMap<u64, Vec<u64>>,
    bytes: usize,
    /// A held write the origin refused since the last FLUSH: why.
    lost: Option<(i32, String)>,
}

#[derive(Default)]
struct Committer {
    /// Held writes arrived since the committer last looked.
    kicked: bool,
    stop: bool,
}

pub struct WriteBack {
    chunk_shift: u32,
    config: WriteBackConfig,
    /// The budget in force: `config.limit_bytes`, or less while a
    /// [`Tightened`] guard lives.
    limit: AtomicUsize,
    /// `held.len()`, read without the lock by the fast paths.
    count: AtomicUsize,
    state: Mutex<State>,
    /// One drive (commit, then apply) at a time.
    pub(super) driver: futures::lock::Mutex<()>,
    committer: (Mutex<Committer>, Condvar),
}

/// A budget lowered by [`WriteBack::tighten`]; dropping it restores the
/// configured one.
pub struct Tightened<'a>(&'a WriteBack);

impl Drop for Tightened<'_> {
    fn drop(&mut self) {
        self.0
            .limit
            .store(self.0.config.limit_bytes, Ordering::Release);
    }
}

/// Whether [`WriteBack::hold`] took the write, and if so whether the
/// buffer is now over its budget.
pub enum Holding {
    /// Nothing the write touches waits for a commit: write the origin now.
    Direct,
    Held {
        over_budget: bool,
    },
}

impl WriteBack {
    pub fn new(chunk_shift: u32, config: WriteBackConfig) -> Self {
        WriteBack {
            chunk_shift,
            limit: AtomicUsize::new(config.limit_bytes),
            config,
            count: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            driver: futures::lock::Mutex::new(()),
            committer: (Mutex::new(Committer::default()), Condvar::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Lowers the budget to `bytes` until the guard drops, so that writes
    /// held meanwhile push back as soon as that much is held: what a
    /// drive must land right after a drain is bounded by it, however
    /// large the configured budget.
    pub fn tighten(&self, bytes: usize) -> Tightened<'_> {
        self.limit
            .store(bytes.min(self.config.limit_bytes), Ordering::Release);
        Tightened(self)
    }

    /// Bytes held now (data, plus a token for each held zeroing).
    pub fn held_bytes(&self) -> usize {
        self.state.lock().unwrap().bytes
    }

    fn chunks(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        (offset >> self.chunk_shift)..=((offset + len.max(1) - 1) >> self.chunk_shift)
    }

    /// Holds the write of `[offset, offset + len)` unless it may go straight
    /// to the origin: every chunk it touches has its preservation committed
    /// (`all_settled`) and no earlier held write touches any of them (that
    /// one would land later and undo this one). `op` builds the held copy.
    pub fn hold(
        &self,
        offset: u64,
        len: u64,
        all_settled: bool,
        op: impl FnOnce() -> HeldOp,
    ) -> Holding {
        if all_settled && self.is_empty() {
            return Holding::Direct;
        }
        let over_budget = {
            let mut state = self.state.lock().unwrap();
            if all_settled && !self.holds_any(&state, offset, len) {
                return Holding::Direct;
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            let held = Arc::new(Held {
                seq,
                offset,
                len,
                op: op(),
            });
            state.bytes += held.cost();
            for c in self.chunks(offset, len) {
                state.by_chunk.entry(c).or_default().push(seq);
            }
            state.held.insert(seq, held);
            self.count.store(state.held.len(), Ordering::Release);
            state.bytes >= self.limit()
        };
        self.kick();
        Holding::Held { over_budget }
    }

    /// Whether [`WriteBack::hold`] would send this write straight to the
    /// origin now (for a writer that has no bytes to hold, see
    /// [`super::View::write_registered`]).
    pub fn goes_direct(&self, offset: u64, len: u64, all_settled: bool) -> bool {
        all_settled
            && (self.is_empty() || !self.holds_any(&self.state.lock().unwrap(), offset, len))
    }

    /// Whether a held write touches a chunk of the range.
    fn holds_any(&self, state: &State, offset: u64, len: u64) -> bool {
        self.chunks(offset, len)
            .any(|c| state.by_chunk.contains_key(&c))
    }

    /// The held writes overlapping `[offset, offset + len)`, oldest first:
    /// a read takes them before it reads the origin and lays them over what
    /// it read, so a write applied in between is simply laid again.
    pub fn overlapping(&self, offset: u64, len: u64) -> Vec<Arc<Held>> {
        if self.is_empty() {
            return Vec::new();
        }
        let state = self.state.lock().unwrap();
        let mut seqs: Vec<u64> = self
            .chunks(offset, len)
            .filter_map(|c| state.by_chunk.get(&c))
            .flatten()
            .copied()
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs.iter()
            .map(|s| state.held[s].clone())
            .filter(|h| h.offset < offset + len && offset < h.offset + h.len)
            .collect()
    }

    /// Every write held so far, oldest first (what a drive applies).
    pub fn all_held(&self) -> Vec<Arc<Held>> {
        if self.is_empty() {
            return Vec::new();
        }
        self.state.lock().unwrap().held.values().cloned().collect()
    }

    /// Forgets writes that reached the origin.
    pub fn applied(&self, done: &[Arc<Held>]) {
        let mut state = self.state.lock().unwrap();
        for held in done {
            if state.held.remove(&held.seq).is_none() {
                continue;
            }
            state.bytes -= held.cost();
            for c in self.chunks(held.offset, held.len) {
                if let Some(seqs) = state.by_chunk.get_mut(&c) {
                    seqs.retain(|&s| s != held.seq);
                    if seqs.is_empty() {
                        state.by_chunk.remove(&c);
                    }
                }
            }
        }
        self.count.store(state.held.len(), Ordering::Release);
    }

    /// Notes that `held` could not be applied and is dropped; the next
    /// [`WriteBack::take_lost`] reports it.
    pub fn lost(&self, held: &Held, error: &EngineError) {
        log::warn!(
            "a held write of {} bytes at {} could not reach the origin and is lost: {error}; \
             the next FLUSH fails",
            held.len,
            held.offset
        );
        let why = (error.errno(), error.to_string());
        self.state.lock().unwrap().lost.get_or_insert(why);
    }

    /// The error that lost a held write since the last call, if any.
    pub fn take_lost(&self) -> Option<EngineError> {
        let (errno, why) = self.state.lock().unwrap().lost.take()?;
        Some(match errno {
            libc::ENOSPC => EngineError::NoSpace,
            _ => EngineError::Io(std::io::Error::other(format!(
                "a write acknowledged earlier could not be written: {why}"
            ))),
        })
    }

    /// Orders a batch of held writes (oldest first) for landing: see
    /// [`Landing`].
    pub fn landing(&self, held: Vec<Arc<Held>>) -> Landing {
        Landing::new(self.chunk_shift, held)
    }

    /// Tells the background committer that writes are waiting.
    fn kick(&self) {
        if !self.config.background {
            return;
        }
        let (lock, cv) = &self.committer;
        let mut c = lock.lock().unwrap();
        if !c.kicked {
            c.kicked = true;
            cv.notify_one();
        }
    }

    /// Ends the background committer (the volume is going away).
    pub fn stop(&self) {
        let (lock, cv) = &self.committer;
        lock.lock().unwrap().stop = true;
        cv.notify_all();
    }

    /// For the committer thread: waits until writes are held (then lets
    /// them gather for the commit delay, unless half the budget is used) or
    /// the volume stops. False: stop.
    pub fn wait_for_work(&self) -> bool {
        let (lock, cv) = &self.committer;
        let mut c = lock.lock().unwrap();
        c = cv.wait_while(c, |c| !c.kicked && !c.stop).unwrap();
        if c.stop {
            return false;
        }
        c.kicked = false;
        drop(c);
        let delay = self.config.commit_delay;
        if !delay.is_zero() && self.held_bytes() < self.limit() / 2 {
            let c = lock.lock().unwrap();
            let (c, _) = cv.wait_timeout_while(c, delay, |c| !c.stop).unwrap();
            if c.stop {
                return false;
            }
        }
        true
    }
}

/// A batch of held writes on their way to the origin, each free to go as
/// soon as every earlier write of the batch that overlaps it (by byte) has
/// landed. So every write that overlaps no earlier one is in flight at once,
/// and only overlapping writes keep their order: the last acknowledged
/// write of a block lands last, and a power cut can leave an earlier one
/// over it never. Why not waves of writes to distinct chunks: a wave ends
/// at its slowest write and at the first chunk touched twice, so 64 MiB of
/// 4k random writes landed as hundreds of short waves one after another
/// (8 to 24 s on the one-node Ceph cluster).
pub struct Landing {
    held: Vec<Arc<Held>>,
    /// Per write: how many of the writes it waits for have not landed.
    waiting: Vec<usize>,
    /// Per write: the later writes that wait for it.
    dependents: Vec<Vec<usize>>,
    /// Writes free to go, oldest first.
    ready: VecDeque<usize>,
}

impl Landing {
    fn new(chunk_shift: u32, held: Vec<Arc<Held>>) -> Landing {
        let mut dependents = vec![Vec::new(); held.len()];
        let mut waiting = vec![0; held.len()];
        // Chunk -> the batch's writes touching it so far, oldest first.
        let mut by_chunk: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut waits_for = Vec::new();
        for (i, h) in held.iter().enumerate() {
            let end = h.offset + h.len;
            let first = h.offset >> chunk_shift;
            let last = (end.max(h.offset + 1) - 1) >> chunk_shift;
            waits_for.clear();
            for c in first..=last {
                let piece = (
                    h.offset.max(c << chunk_shift),
                    end.min((c + 1) << chunk_shift),
                );
                let earlier = by_chunk.entry(c).or_default();
                // Newest first: an earlier write whose overlap with this one
                // lies within the overlaps already waited for overlaps one
                // of those newer writes, which waits for it in turn.
                let mut covered = Covered::default();
                for &j in earlier.iter().rev() {
                    let e = &held[j];
                    let overlap = (piece.0.max(e.offset), piece.1.min(e.offset + e.len));
                    if overlap.0 < overlap.1 && covered.add(overlap) {
                        waits_for.push(j);
                        if covered.is(piece) {
                            break;
                        }
                    }
                }
                earlier.push(i);
            }
            waits_for.sort_unstable();
            waits_for.dedup();
            waiting[i] = waits_for.len();
            for &j in &waits_for {
                dependents[j].push(i);
            }
        }
        let ready = (0..held.len()).filter(|&i| waiting[i] == 0).collect();
        Landing {
            held,
            waiting,
            dependents,
            ready,
        }
    }

    /// A write free to land now, oldest first; `None` until one that is in
    /// flight lands, or once all have gone.
    pub fn next(&mut self) -> Option<(usize, &Arc<Held>)> {
        let i = self.ready.pop_front()?;
        Some((i, &self.held[i]))
    }

    /// Write `i` (from [`Landing::next`]) reached the origin, or failed and
    /// is dropped: the writes that waited for it may go.
    pub fn landed(&mut self, i: usize) -> &Arc<Held> {
        for &k in &self.dependents[i] {
            self.waiting[k] -= 1;
            if self.waiting[k] == 0 {
                self.ready.push_back(k);
            }
        }
        &self.held[i]
    }
}

/// Disjoint byte ranges, sorted: the part of a write that the newer
/// writes it waits for already cover.
#[derive(Default)]
struct Covered(Vec<(u64, u64)>);

impl Covered {
    /// Adds `[start, end)`; false if it was covered already.
    fn add(&mut self, (start, end): (u64, u64)) -> bool {
        if self.0.iter().any(|&(s, e)| s <= start && end <= e) {
            return false;
        }
        let (mut start, mut end) = (start, end);
        self.0.retain(|&(s, e)| {
            let apart = e < start || end < s;
            if !apart {
                start = start.min(s);
                end = end.max(e);
            }
            apart
        });
        let at = self.0.partition_point(|&(s, _)| s < start);
        self.0.insert(at, (start, end));
        true
    }

    /// Whether `[start, end)` is covered whole.
    fn is(&self, (start, end): (u64, u64)) -> bool {
        self.0.iter().any(|&(s, e)| s <= start && end <= e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, byte: u8) -> HeldOp {
        let mut buf = AlignedBuf::zeroed(len);
        buf.fill(byte);
        HeldOp::Data(Arc::new(buf))
    }

    fn quiet() -> WriteBack {
        WriteBack::new(
            12,
            WriteBackConfig {
                limit_bytes: 2 * 4096,
                commit_delay: Duration::ZERO,
                background: false,
            },
        )
    }

    #[test]
    fn settled_writes_go_direct_unless_an_earlier_write_is_held_on_their_chunk() {
        let wb = quiet();
        assert!(matches!(
            wb.hold(0, 512, true, || data(512, 1)),
            Holding::Direct
        ));
        assert!(matches!(
            wb.hold(4096, 512, false, || data(512, 2)),
            Holding::Held { over_budget: false }
        ));
        // Settled, but chunk 1 has a held write: it must queue behind it.
        assert!(matches!(
            wb.hold(4096 + 1024, 512, true, || data(512, 3)),
            Holding::Held { .. }
        ));
        assert!(matches!(
            wb.hold(8192, 512, true, || data(512, 4)),
            Holding::Direct
        ));
        let all = wb.all_held();
        assert_eq!(all.iter().map(|h| h.seq).collect::<Vec<_>>(), vec![0, 1]);
        wb.applied(&all);
        assert!(wb.is_empty());
        assert_eq!(wb.held_bytes(), 0);
        assert!(matches!(
            wb.hold(4096, 512, true, || data(512, 5)),
            Holding::Direct
        ));
    }

    #[test]
    fn reads_see_held_writes_in_order_and_the_budget_pushes_back() {
        let wb = quiet();
        wb.hold(0, 4096, false, || data(4096, 1));
        wb.hold(1024, 512, false, || HeldOp::Zeroes {
            keep_allocated: false,
        });
        let held = wb.hold(2048, 4096, false, || data(4096, 3));
        assert!(matches!(held, Holding::Held { over_budget: true }));
        let mut buf = vec![9u8; 4096];
        for h in wb.overlapping(0, 4096) {
            h.overlay(0, &mut buf);
        }
        assert_eq!(&buf[..1024], &[1u8; 1024][..]);
        assert_eq!(&buf[1024..1536], &[0u8; 512][..]);
        assert_eq!(&buf[1536..2048], &[1u8; 512][..]);
        assert_eq!(&buf[2048..], &[3u8; 2048][..]);
        assert!(wb.overlapping(8192, 512).is_empty());
    }

    fn held(seq: u64, offset: u64, len: u64) -> Arc<Held> {
        Arc::new(Held {
            seq,
            offset,
            len,
            op: data(len as usize, seq as u8 + 1),
        })
    }

    fn overlap(a: &Held, b: &Held) -> bool {
        a.offset < b.offset + b.len && b.offset < a.offset + a.len
    }

    fn ready(landing: &mut Landing) -> Vec<usize> {
        std::iter::from_fn(|| landing.next().map(|(i, _)| i)).collect()
    }

    #[test]
    fn only_writes_that_overlap_wait_for_each_other() {
        let batch = vec![
            held(0, 0, 512),
            held(1, 1024, 512),   // same chunk as 0, other bytes
            held(2, 256, 512),    // over 0
            held(3, 8192, 4096),  // another chunk
            held(4, 0, 4096),     // over 0, 1 and 2
            held(5, 4096, 8192),  // two chunks, over 3
            held(6, 12288, 4096), // after 3 and 5, overlapping neither
        ];
        let mut landing = quiet().landing(batch);
        assert_eq!(ready(&mut landing), vec![0, 1, 3, 6]);
        landing.landed(1);
        assert!(ready(&mut landing).is_empty());
        landing.landed(0);
        assert_eq!(ready(&mut landing), vec![2]);
        landing.landed(3);
        assert_eq!(ready(&mut landing), vec![5]);
        landing.landed(2);
        assert_eq!(ready(&mut landing), vec![4]);
    }

    proptest::proptest! {
        /// Random batches landing in random order: a write is free to go
        /// exactly when every earlier write it overlaps has landed (never
        /// sooner: the last write of a byte lands last; never later: all
        /// the others are in flight at once), and the result is the
        /// batch applied one by one.
        #[test]
        fn a_write_goes_exactly_when_the_earlier_ones_it_overlaps_landed(
            seed in proptest::prelude::any::<u64>(),
            count in 1usize..200,
        ) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            const SECTORS: u64 = 64; // four 4k chunks
            let batch: Vec<Arc<Held>> = (0..count as u64)
                .map(|seq| {
                    let start = rng.gen_range(0..SECTORS);
                    let len = rng.gen_range(1..=(SECTORS - start).min(20));
                    held(seq, start * 512, len * 512)
                })
                .collect();
            let mut expected = vec![0u8; SECTORS as usize * 512];
            batch.iter().for_each(|h| h.overlay(0, &mut expected));
            let mut landing = quiet().landing(batch.clone());
            let (mut started, mut landed) = (vec![false; count], vec![false; count]);
            let mut image = vec![0u8; expected.len()];
            let mut in_flight = Vec::new();
            loop {
                for i in ready(&mut landing) {
                    proptest::prop_assert!(!started[i], "write {} went twice", i);
                    proptest::prop_assert!(
                        (0..i).all(|j| landed[j] || !overlap(&batch[i], &batch[j])),
                        "write {} went before an earlier write over it landed", i
                    );
                    started[i] = true;
                    in_flight.push(i);
                }
                for i in (0..count).filter(|&i| !started[i]) {
                    proptest::prop_assert!(
                        (0..i).any(|j| !landed[j] && overlap(&batch[i], &batch[j])),
                        "write {} waits for nothing", i
                    );
                }
                if in_flight.is_empty() {
                    break;
                }
                let i = in_flight.swap_remove(rng.gen_range(0..in_flight.len()));
                batch[i].overlay(0, &mut image);
                landed[i] = true;
                landing.landed(i);
            }
            proptest::prop_assert!(landed.iter().all(|&l| l));
            proptest::prop_assert_eq!(image, expected);
        }
    }
}

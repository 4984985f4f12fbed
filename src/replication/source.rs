//! The source end of a replication link: the write hook, the bounded write
//! log, the persistent dirty map and the sender thread.
//!
//! Per replication block (a setting of the link, at most the volume's
//! chunk: `replicate start --block-size`) the link knows, for the epoch
//! since the last consistency point (CP), what the destination can rebuild
//! it from: `Logged(seq)` (last written wholly by log entry `seq`, not
//! shipped yet), `Shipped(tid, index)` (last written wholly by a piece the
//! destination has stored durably) or `Partial` (anything else: partial
//! writes, zeroes, a write the full log could not take, a broken link, a
//! restart). At a CP, shipped blocks become references and the others are
//! read whole from the CP's snapshot. A block smaller than the chunk makes
//! a 4k write a whole block: logged, shipped once and referenced, instead of
//! a chunk read and shipped whole at every CP. Memory: one map entry (about
//! 40 bytes) per block written since the last CP.
//!
//! Consistency points on time: the sender ships the log one transfer (at
//! most [`TRANSFER_BYTES`]) at a time and checks between transfers whether
//! a CP fell due (interval, `replicate cp`, a user's snapshot). A due CP's
//! snapshot is therefore taken after at most the transfer in flight when
//! it fell due; the CP then ships only the log up to that snapshot (at most
//! `--max-log` bytes, as the log is bounded), sends its other changed
//! blocks whole, and writes logged after the snapshot wait for the next
//! transfer. A writer that outpaces the link can delay the next CP only by
//! what the CP itself must carry, never by what keeps arriving.
//!
//! One CP at a time, without stopping the log: once a CP is committed the
//! destination applies it in the background and the sender goes on
//! shipping the log (the `CpAck` arrives among the transfer
//! acknowledgements); the next CP is taken once that one is applied. A
//! sender that waited for the apply instead filled a 64 MiB log within a
//! fraction of a second under a fast writer and sent every later write's
//! blocks whole.
//!
//! Ordering: `before_write` takes a block-granular range lock, so writes to
//! the same block reach the origin and `after_write` in one order and a
//! block's state always names its last write. A CP sets a barrier that new
//! writes wait at in `before_write`, waits until no hooked write is between
//! `before_write` and the end of `after_write`, takes the internal snapshot
//! `.repl-cp-N`, and splits the epoch: every write before the snapshot is in
//! the CP's block set, every later one in the next. Right after the
//! snapshot the CP knows which of its blocks it will read whole (the log up
//! to the snapshot is always shipped, never dropped): every chunk holding
//! none of them is released from the snapshot at once, so writes after the
//! CP do not preserve chunks the CP never reads.

use super::dirty::DirtyMap;
use super::group::GroupCps;
use super::wire::{self, CpCommit, CpEntry, Kind, TransferFrame};
use super::write_log::WriteLog;
use crate::engine::{Change, EngineError, Volume, WriteGuard, WriteHook};
use crate::runtime::{block_on, AlignedBuf};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::future::poll_fn;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Pieces per transfer are gathered up to this many bytes.
const TRANSFER_BYTES: usize = 1 << 20;
/// A sender that has caught up ships the log once it holds this much or
/// its oldest write is [`LINGER`] old ([`WriteLog::ship_at`]).
const LINGER_BYTES: u64 = TRANSFER_BYTES as u64 / 2;
const LINGER: Duration = Duration::from_millis(2);
/// How long to wait before reconnecting after a failure.
const RETRY: Duration = Duration::from_secs(1);
/// The dirty map's granularity (at least one block): one bit per 64 KiB, as
/// md's write-intent bitmap chunk. Finer would cost an fsync for nearly every
/// small random write with small blocks; coarser would resend more after a
/// restart or a broken link.
const DIRTY_REGION: u64 = 64 * 1024;
/// The smallest replication block: finer would cost a map entry per 512
/// bytes written for writes that are rarely that small.
pub const MIN_BLOCK: u64 = 4096;
/// How often an idle sender checks that the destination is still there.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// How often an idle sender looks for the acknowledgement of the CP being
/// applied (the next CP waits for it).
const ACK_CHECK: Duration = Duration::from_millis(20);
/// An idle sender pings this often, well within the destination's idle
/// timeout ([`super::dest::SESSION_IDLE_TIMEOUT`]).
const PING_EVERY: Duration = Duration::from_secs(5);
/// Connecting, and the whole handshake up to `Opened`, must end within
/// these: a destination that accepts and never answers is retried, not
/// waited for.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Keepalive probes start after this long without traffic, and data sent
/// but unacknowledged this long (plus 15 s) ends the connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);

/// What `DATA_DIR/replication/VOL.json` holds: the pair and how far it got.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkRecord {
    pub volume: String,
    /// Destination daemon, `HOST:PORT`.
    pub host: String,
    pub dest_volume: String,
    pub cp_interval_ms: u64,
    pub key_file: PathBuf,
    pub keep_cps: u32,
    pub max_log_bytes: u64,
    /// The replication block; `None` in records from before it was a
    /// setting, which replicate whole chunks.
    #[serde(default)]
    pub block_size: Option<u64>,
    /// The last CP the destination acknowledged, and when it was taken.
    #[serde(default)]
    pub last_acked_cp: Option<u64>,
    #[serde(default)]
    pub last_acked_unix_ms: u64,
    /// The replica's identity from its `Opened` (`None` from daemons before
    /// failback): a failback of this pair must name it.
    #[serde(default)]
    pub dest_replica_id: Option<String>,
    /// A failback resync not acknowledged yet (`replicate start --resync`).
    #[serde(default)]
    pub resync: Option<FailbackBase>,
    /// The consistency group replicated together (shared CPs, see
    /// [`super::group`]) and its members when the replication started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_members: Vec<String>,
}

/// Where a failback resync from this volume starts: the base as the wire
/// names it, and this volume's snapshot holding it, by name and engine
/// generation (a snapshot deleted and taken again under the name is not it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailbackBase {
    pub base: wire::ResyncBase,
    pub snapshot: String,
    pub generation: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlockState {
    Partial,
    Logged(u64),
    Shipped { tid: u64, index: u32 },
}

/// Blocks' states. Keys are block numbers a client chooses, so the hasher is
/// seeded per process (foldhash), and it costs a few nanoseconds a lookup,
/// against SipHash's tens at two lookups per write.
type BlockMap = foldhash::HashMap<u64, BlockState>;

/// Why the current CP is taken; decides the state shown while it runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Syncing,
    Resyncing,
    Replicating,
}

#[derive(Clone, Default, Serialize)]
struct Stats {
    bytes_written: u64,
    bytes_sent: u64,
    bytes_saved: u64,
    transfers: u64,
    cps: u64,
    full_syncs: u64,
    /// Blocks sent whole by CPs after a reconnect, a restart or a log overflow.
    resync_blocks: u64,
    log_overflows: u64,
    last_cp_ref_blocks: u64,
    last_cp_full_blocks: u64,
    last_cp_zero_blocks: u64,
    /// From the moment a CP fell due (interval, request, user snapshot)
    /// until the destination acknowledged applying it.
    last_cp_delay_ms: u64,
    /// The largest such delay among CPs taken while replicating (a session's
    /// first CP, a full copy or a resync, is bounded by the volume instead).
    max_cp_delay_ms: u64,
    /// Progress of the running full copy or resync (its blocks sent whole):
    /// bytes and blocks read and sent (or found zero) of the total.
    sync_done_bytes: u64,
    sync_total_bytes: u64,
    sync_done_blocks: u64,
    sync_total_blocks: u64,
}

/// The CP being sent: its snapshot, where its writes end, its block set.
struct CpInFlight {
    number: u64,
    boundary: u64,
    map: BlockMap,
    written: u64,
    unix_ms: u64,
    requested: u64,
    /// When it fell due.
    due: Instant,
    /// The consumer of its snapshot, once [`Link::split_epoch`] gave back
    /// the chunks the CP will not read, while writes still waited at the
    /// barrier.
    released: Option<crate::engine::SnapshotConsumer>,
}

struct Shared {
    // The write barrier and the range lock.
    inflight: usize,
    cp_pending: bool,
    locked: Vec<(u64, u64)>,
    waiters: Vec<Waker>,
    // The epoch since the last CP and the log.
    next_seq: u64,
    epoch: BlockMap,
    cp: Option<CpInFlight>,
    /// Logged writes, trimmed to the whole blocks they cover (a partial
    /// block can never be referenced, so it is sent whole at the CP
    /// instead); each ships as one piece.
    log: WriteLog,
    connected: bool,
    /// Whether a session has opened since the link started: before that,
    /// a link without an error is still making its first connection.
    ever_connected: bool,
    overflowed: bool,
    phase: Phase,
    // Requests to the sender.
    stop: bool,
    cp_requests: u64,
    cp_acked_requests: u64,
    /// When the oldest request not covered by a CP snapshot arrived.
    cp_requested_at: Option<Instant>,
    record: LinkRecord,
    written_at_last_cp: u64,
    stats: Stats,
    error: Option<String>,
}

pub struct Link {
    volume: Arc<Volume>,
    block_size: u64,
    chunk_size: u64,
    blocks: u64,
    /// Blocks per bit of the dirty map.
    region_blocks: u64,
    dirty: DirtyMap,
    record_path: PathBuf,
    source_id: String,
    shared: Mutex<Shared>,
    cond: Condvar,
    stream: Mutex<Option<TcpStream>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The group whose members take their CPs together, if any.
    group: Option<Arc<GroupCps>>,
}

/// Test hook: with this set in the source daemon's environment, CP
/// snapshots are named `repl-cp-N` (visible, exportable) and kept after the
/// CP is acknowledged, so a test can compare each CP with the replica.
const KEEP_KNOB: &str = "SNAPBLK_TEST_KEEP_SOURCE_CPS";

fn keep_cp_snapshots() -> bool {
    std::env::var_os(KEEP_KNOB).is_some()
}

/// The internal snapshot holding CP `n`'s image on the source.
pub fn cp_snapshot_name(n: u64) -> String {
    if keep_cp_snapshots() {
        format!("repl-cp-{n}")
    } else {
        format!(".repl-cp-{n}")
    }
}

pub fn save_record(path: &Path, record: &LinkRecord) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
    crate::backend::file::replace_atomically(path, &bytes)
}

/// Held by a write from `before_write` until it is done: its blocks' lock
/// and its place in the CP barrier. `after_write` gives both back (with
/// the blocks' new state, under one lock); dropped before that, the write
/// may have left its blocks holding anything.
struct RangeGuard {
    link: Arc<Link>,
    range: (u64, u64),
    finished: bool,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut s = self.link.lock();
        // While disconnected the dirty map alone keeps the blocks (a
        // session begins by reading that map).
        if s.connected {
            for b in self.range.0..=self.range.1 {
                s.epoch.insert(b, BlockState::Partial);
            }
        }
        self.link.release(s, self.range, false);
    }
}

/// The link's place in the volume's write path.
pub struct Tap(pub Arc<Link>);

impl WriteHook for Tap {
    fn before_write(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, crate::engine::Result<WriteGuard>> {
        Box::pin(async move {
            if len == 0 {
                return Ok(None);
            }
            let link = &self.0;
            let range = link.block_range(offset, len);
            let rb = link.region_blocks;
            let durable = poll_fn(|cx| {
                let mut s = link.lock();
                let busy = s.locked.iter().any(|r| r.0 <= range.1 && range.0 <= r.1);
                if s.cp_pending || busy {
                    s.waiters.push(cx.waker().clone());
                    return Poll::Pending;
                }
                s.inflight += 1;
                s.locked.push(range);
                // Marked under the link's lock: a session that begins reads
                // the map under it too, and so sees this write's region.
                Poll::Ready(link.dirty.mark(range.0 / rb, range.1 / rb))
            })
            .await;
            let guard = RangeGuard {
                link: link.clone(),
                range,
                finished: false,
            };
            if let Some(generation) = durable {
                link.dirty
                    .make_durable(generation)
                    .await
                    .map_err(EngineError::Io)?;
            }
            Ok(Some(Box::new(guard) as Box<dyn std::any::Any + Send>))
        })
    }

    fn after_write(&self, guard: &mut WriteGuard, offset: u64, change: Change<'_>) {
        let Some(guard) = guard.as_mut().and_then(|g| g.downcast_mut::<RangeGuard>()) else {
            return;
        };
        guard.finished = true;
        let link = &self.0;
        let range = guard.range;
        let mut s = link.lock();
        s.stats.bytes_written += change.len();
        let seq = s.next_seq;
        s.next_seq += 1;
        // While disconnected the dirty map alone keeps the blocks, so
        // memory does not grow with what is written during an outage.
        let wake_sender = s.connected && {
            // The write's whole blocks are logged if the log takes them;
            // zeroes, partial blocks and what the log cannot take are left
            // Partial: read whole at the CP. Nothing read these blocks'
            // states while the write ran (a CP waits for it), so this is
            // their one map entry per write.
            let bs = link.block_size;
            let logged = link
                .whole_blocks(offset, change)
                .filter(|&(_, data)| link.log_takes(&mut s, data.len() as u64));
            let logged_blocks = logged.map_or(0..0, |(start, data)| {
                start / bs..(start + data.len() as u64) / bs
            });
            for b in range.0..=range.1 {
                let state = if logged_blocks.contains(&b) {
                    BlockState::Logged(seq)
                } else {
                    BlockState::Partial
                };
                s.epoch.insert(b, state);
            }
            logged.is_some_and(|(start, data)| {
                // The sender waits for the log only when it is empty; while
                // it has more to ship it does not wait, and a wake-up per
                // write would cost a futex call each (and a switch to the
                // sender).
                let sender_waits = s.log.is_empty();
                s.log.push(seq, start, data);
                sender_waits
            })
        };
        link.release(s, range, wake_sender);
    }
}

impl Shared {
    /// Forgets the log and the per-block map (the link broke); the dirty
    /// map holds every block they held.
    fn forget(&mut self) {
        self.epoch = BlockMap::default();
        self.log.clear();
    }

    fn state(&self) -> &'static str {
        if !self.connected && !self.ever_connected && self.error.is_none() {
            "connecting"
        } else if !self.connected {
            "disconnected"
        } else if self.phase == Phase::Syncing {
            "syncing"
        } else if self.phase == Phase::Resyncing {
            "resyncing"
        } else if self.overflowed {
            "log-overflow"
        } else {
            "replicating"
        }
    }
}

/// One authenticated connection to the destination, sealed (wire.rs).
struct Conn<'a> {
    link: &'a Link,
    stream: TcpStream,
    sealed: wire::Session,
    /// When the last frame went out (an idle link pings).
    last_sent: Instant,
    /// The CP committed and not acknowledged yet: the destination applies
    /// it while the next CP's log ships.
    cp_sent: Option<CpSent>,
}

/// What [`Link::cp_applied`] needs of a CP once the destination applied it.
struct CpSent {
    number: u64,
    full: bool,
    refs: u64,
    whole: u64,
    zero: u64,
}

impl Conn<'_> {
    fn send(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        let n = self.sealed.send(&mut self.stream, kind, payload)?;
        self.sent(n);
        Ok(())
    }

    fn sent(&mut self, bytes: usize) {
        self.last_sent = Instant::now();
        self.link.lock().stats.bytes_sent += bytes as u64;
    }

    /// The destination's next answer, which must be `kind`; the
    /// acknowledgement of the CP being applied may come first and is taken
    /// care of on the way.
    fn reply(&mut self, kind: Kind) -> io::Result<Vec<u8>> {
        loop {
            let (k, payload) = self.sealed.recv(&mut self.stream)?;
            if k == Kind::CpAck && kind != Kind::CpAck {
                self.cp_acked(&payload)?;
                continue;
            }
            return wire::peer_error(k, payload, kind);
        }
    }

    /// The destination applied CP `payload`, the one sent.
    fn cp_acked(&mut self, payload: &[u8]) -> io::Result<()> {
        let acked = wire::parse_u64(payload)?;
        let sent = self.cp_sent.take().ok_or_else(|| {
            io::Error::other(format!(
                "the destination acknowledged consistency point {acked}, which was not sent"
            ))
        })?;
        if acked != sent.number {
            return Err(io::Error::other(format!(
                "the destination acknowledged consistency point {acked}, expected {}",
                sent.number
            )));
        }
        self.link.cp_applied(sent).map_err(io::Error::other)
    }

    /// Waits until the CP sent, if any, is applied.
    fn await_cp(&mut self) -> io::Result<()> {
        if self.cp_sent.is_some() {
            let payload = self.reply(Kind::CpAck)?;
            self.cp_acked(&payload)?;
        }
        Ok(())
    }

    /// Takes the acknowledgement of the CP being applied if it arrived, and
    /// fails if the destination closed the connection (it speaks only to
    /// answer, so anything else readable while idle means it is gone).
    fn check_alive(&mut self) -> io::Result<()> {
        self.stream.set_nonblocking(true)?;
        let mut byte = [0u8; 1];
        let peeked = self.stream.peek(&mut byte);
        self.stream.set_nonblocking(false)?;
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the destination closed the connection",
            )),
            Ok(_) => {
                let msg = match self.sealed.recv(&mut self.stream) {
                    Ok((Kind::CpAck, payload)) if self.cp_sent.is_some() => {
                        return self.cp_acked(&payload).and_then(|()| self.keep_alive());
                    }
                    Ok((_, payload)) => String::from_utf8_lossy(&payload).into_owned(),
                    Err(e) => e.to_string(),
                };
                Err(io::Error::other(format!(
                    "the destination ended the session: {msg}"
                )))
            }
        }?;
        self.keep_alive()
    }

    /// Pings if nothing was sent for a while, so that the destination's
    /// idle timeout tells a busy or idle source from a vanished one.
    fn keep_alive(&mut self) -> io::Result<()> {
        if self.last_sent.elapsed() >= PING_EVERY {
            self.send(Kind::Ping, &[])?;
        }
        Ok(())
    }

    /// Sends transfer `tid` and waits until the destination has it durably;
    /// returns the frame's buffer for reuse.
    fn transfer(&mut self, tid: u64, transfer: TransferFrame) -> io::Result<Vec<u8>> {
        let mut frame = transfer.finish(tid);
        let n = self
            .sealed
            .send_frame(&mut self.stream, Kind::Transfer, &mut frame)?;
        self.sent(n);
        let acked = wire::parse_u64(&self.reply(Kind::TransferAck)?)?;
        if acked != tid {
            return Err(io::Error::other(format!(
                "the destination acknowledged transfer {acked}, expected {tid}"
            )));
        }
        self.link.lock().stats.transfers += 1;
        Ok(frame)
    }
}

type SessionResult = Result<(), String>;

impl Link {
    /// Opens the link's dirty map and puts it in the volume's write path.
    /// Call [`Link::start`] to begin shipping.
    pub fn open(
        volume: Arc<Volume>,
        mut record: LinkRecord,
        dir: &Path,
        source_id: &str,
        group: Option<Arc<GroupCps>>,
    ) -> io::Result<(Arc<Link>, Arc<dyn WriteHook>)> {
        let chunk_size = volume.chunk_size() as u64;
        let block_size = record.block_size.unwrap_or(chunk_size);
        let blocks = volume.size().div_ceil(block_size);
        let dirty_path = dir.join(format!("{}.dirty", record.volume));
        // A failback starts from a fresh map: its base is a snapshot.
        if !dirty_path.exists() && record.last_acked_cp.is_some() && record.resync.is_none() {
            log::warn!(
                "replication of {}: {} is missing; the next consistency point is a full copy",
                record.volume,
                dirty_path.display()
            );
            record.last_acked_cp = None;
        }
        let region_blocks = (DIRTY_REGION / block_size).max(1);
        let dirty = DirtyMap::open(&dirty_path, blocks.div_ceil(region_blocks))?;
        let link = Arc::new(Link {
            block_size,
            chunk_size,
            blocks,
            region_blocks,
            dirty,
            record_path: dir.join(format!("{}.json", record.volume)),
            source_id: source_id.to_string(),
            shared: Mutex::new(Shared {
                inflight: 0,
                cp_pending: false,
                locked: Vec::new(),
                waiters: Vec::new(),
                next_seq: 0,
                // A session begins with the dirty map's blocks.
                epoch: BlockMap::default(),
                cp: None,
                log: WriteLog::new(TRANSFER_BYTES as u64),
                connected: false,
                ever_connected: false,
                overflowed: false,
                phase: Phase::Syncing,
                stop: false,
                cp_requests: 0,
                cp_acked_requests: 0,
                cp_requested_at: None,
                record,
                written_at_last_cp: 0,
                stats: Stats::default(),
                error: None,
            }),
            cond: Condvar::new(),
            stream: Mutex::new(None),
            thread: Mutex::new(None),
            group,
            volume,
        });
        save_record(&link.record_path, &link.lock().record)?;
        link.drop_stale_snapshots();
        let hook: Arc<dyn WriteHook> = Arc::new(Tap(link.clone()));
        block_on(link.volume.add_write_hook(hook.clone()));
        Ok((link, hook))
    }

    /// Starts the sender thread.
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        let link = self.clone();
        let handle = std::thread::Builder::new()
            .name(format!("repl-{}", self.volume.name()))
            .spawn(move || link.run())?;
        *self.thread.lock().unwrap() = Some(handle);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The dirty map's regions that a CP's acknowledgement must not clear:
    /// under the lock, a write that begins after it either is in the epoch
    /// already, or in flight (its blocks locked; it enters the epoch when
    /// it ends), or sets its region's bit again.
    fn regions_in_use(&self, s: &Shared) -> HashSet<u64> {
        let rb = self.region_blocks;
        s.epoch
            .keys()
            .map(|b| b / rb)
            .chain(s.locked.iter().flat_map(|r| r.0 / rb..=r.1 / rb))
            .collect()
    }

    /// Where the whole blocks `change` wrote with data start, and their
    /// data, if there are any.
    fn whole_blocks<'a>(&self, offset: u64, change: Change<'a>) -> Option<(u64, &'a [u8])> {
        let Change::Data(data) = change else {
            return None;
        };
        let bs = self.block_size;
        let start = offset.div_ceil(bs) * bs;
        let end = ((offset + data.len() as u64) / bs) * bs;
        let at = (start - offset) as usize;
        (start < end).then(|| (start, &data[at..at + (end - start) as usize]))
    }

    /// Whether the log has room for `len` more bytes; counts (and warns of)
    /// a write it has no room for. What is logged still ships when it is
    /// full (it is on its way, and the CP in flight needs what precedes its
    /// snapshot); the CP sends the blocks of writes it could not take whole.
    fn log_takes(&self, s: &mut Shared, len: u64) -> bool {
        if s.log.bytes() + len <= s.record.max_log_bytes {
            return true;
        }
        s.stats.log_overflows += 1;
        if !s.overflowed {
            log::warn!(
                "replication of {}: the write log is full ({} bytes); sending the blocks \
                 of writes it cannot take whole at the next consistency point",
                self.volume.name(),
                s.record.max_log_bytes
            );
        }
        s.overflowed = true;
        false
    }

    /// Ends a hooked write's hold, under the lock `s` it was recorded
    /// under: unlocks its blocks, leaves the CP barrier, and wakes the
    /// writers waiting at either (and the sender, if `wake_sender`).
    fn release(&self, mut s: MutexGuard<'_, Shared>, range: (u64, u64), wake_sender: bool) {
        if let Some(i) = s.locked.iter().position(|r| *r == range) {
            s.locked.swap_remove(i);
        }
        s.inflight -= 1;
        let waiters = std::mem::take(&mut s.waiters);
        // Only a CP barrier waits for writes to end; a wake-up per write
        // (a futex call, and a switch to the sender) cost more than the
        // write's logging.
        let barrier_reached = s.cp_pending && s.inflight == 0;
        drop(s);
        waiters.into_iter().for_each(Waker::wake);
        if barrier_reached || wake_sender {
            self.cond.notify_all();
        }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Blocks the dirty map says may differ from the last applied CP.
    fn dirty_blocks(&self) -> Vec<u64> {
        expand_regions(&self.dirty, self.region_blocks, self.blocks)
    }

    fn block_range(&self, offset: u64, len: u64) -> (u64, u64) {
        (
            offset / self.block_size,
            (offset + len - 1) / self.block_size,
        )
    }

    /// Stops the sender thread (interrupting any wait on the network).
    pub fn stop(&self) {
        self.lock().stop = true;
        self.cond.notify_all();
        if let Some(s) = self.stream.lock().unwrap().as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }

    /// Stops the link for good: out of the write path, its files and
    /// internal snapshots gone.
    pub fn remove(&self, hook: &Arc<dyn WriteHook>) {
        self.stop();
        block_on(self.volume.remove_write_hook(hook));
        self.drop_stale_snapshots();
        let volume = self.volume.name();
        for path in [
            self.record_path.clone(),
            self.record_path.with_file_name(format!("{volume}.dirty")),
        ] {
            if let Err(e) = std::fs::remove_file(&path) {
                log::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }

    /// Deletes every `.repl-cp-*` snapshot of the volume (left by a CP that
    /// did not finish).
    fn drop_stale_snapshots(&self) {
        for s in self.volume.list_snapshots() {
            if s.name.starts_with(".repl-cp-") {
                if let Err(e) = block_on(self.volume.delete_snapshot(&s.name)) {
                    log::warn!(
                        "volume {}: cannot delete {}: {e}",
                        self.volume.name(),
                        s.name
                    );
                }
            }
        }
    }

    /// Failback onto this volume: `Ok` if `base` is a CP of this link
    /// (this daemon's identity and volume, the replica this link sent to)
    /// that the dirty map still covers: the last acknowledged CP, or the
    /// next one if its acknowledgement was lost (its blocks are still dirty).
    pub fn check_failback_base(
        &self,
        source_id: &str,
        base: &wire::ResyncBase,
    ) -> Result<(), String> {
        let s = self.lock();
        let r = &s.record;
        if base.source_id != source_id || base.source_volume != r.volume {
            return Err(format!(
                "the replica's base is a consistency point of volume {} of source {}, not of \
                 volume {} of this daemon (source {source_id})",
                base.source_volume, base.source_id, r.volume
            ));
        }
        if r.dest_replica_id.as_deref() != Some(base.replica_id.as_str()) {
            return Err(format!(
                "volume {} was replicated to another replica than the one asking (or before \
                 this snapblk recorded replica identities)",
                r.volume
            ));
        }
        match r.last_acked_cp {
            Some(a) if base.cp == a || base.cp == a + 1 => Ok(()),
            acked => Err(format!(
                "the replica's base is consistency point {}, and the last one this daemon saw \
                 acknowledged is {}",
                base.cp,
                acked.map_or("none".to_string(), |a| a.to_string())
            )),
        }
    }

    /// Stops the sender for a failback and returns the byte ranges the
    /// dirty map says changed since the last acknowledged CP, merged.
    pub fn stop_for_failback(&self) -> Vec<(u64, u64)> {
        self.stop();
        let bs = self.block_size;
        let runs = to_runs(&self.dirty_blocks())
            .into_iter()
            .map(|(a, b)| (a * bs, (b * bs).min(self.volume.size())))
            .collect();
        coarsen(runs, MAX_FAILBACK_RANGES)
    }

    /// Asks for a CP now; returns a ticket for [`Link::wait_cp`].
    pub fn request_cp(&self) -> u64 {
        let mut s = self.lock();
        s.cp_requests += 1;
        s.cp_requested_at.get_or_insert_with(Instant::now);
        let ticket = s.cp_requests;
        drop(s);
        self.cond.notify_all();
        ticket
    }

    /// Waits until a CP taken after request `ticket` is acknowledged; fails
    /// if the link is down or stops.
    pub fn wait_cp(&self, ticket: u64) -> Result<u64, String> {
        let mut s = self.lock();
        loop {
            if s.cp_acked_requests >= ticket {
                return Ok(s.record.last_acked_cp.unwrap_or(0));
            }
            if s.stop {
                return Err("the replication link was stopped".into());
            }
            if !s.connected && s.error.is_some() {
                return Err(format!(
                    "the destination is not reachable ({}); the consistency point is taken \
                     when the link is back",
                    s.error.clone().unwrap_or_default()
                ));
            }
            s = self
                .cond
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// `replicate status` for this link.
    pub fn status(&self) -> serde_json::Value {
        let s = self.lock();
        let r = &s.record;
        let now = crate::engine::now_unix_ms();
        let mut v = serde_json::json!({
            "role": "source",
            "volume": r.volume,
            "to": format!("{}/{}", r.host, r.dest_volume),
            "state": s.state(),
            "error": s.error,
            "cp_interval_ms": r.cp_interval_ms,
            "last_cp": r.last_acked_cp,
            "last_cp_unix_ms": r.last_acked_cp.map(|_| r.last_acked_unix_ms),
            "lag_bytes": s.stats.bytes_written.saturating_sub(s.written_at_last_cp),
            "lag_seconds": r.last_acked_cp.map(|_| now.saturating_sub(r.last_acked_unix_ms) as f64 / 1000.0),
            "dirty_blocks": self.dirty_blocks().len(),
            "tracked_blocks": s.epoch.len() + s.cp.as_ref().map_or(0, |c| c.map.len()),
            "block_size": self.block_size,
            "chunk_size": self.chunk_size,
            "log_bytes": s.log.bytes(),
            "max_log_bytes": r.max_log_bytes,
            "failback_base_cp": r.resync.as_ref().map(|f| f.base.cp),
        });
        let stats = serde_json::to_value(&s.stats).expect("stats serialize");
        for (k, x) in stats.as_object().expect("an object") {
            v[k] = x.clone();
        }
        v
    }

    // ---- the sender thread ----

    fn run(self: Arc<Self>) {
        // An outage is logged once, not at every retry: the same failure
        // repeating (destination down) says nothing new; status shows it.
        let mut logged: Option<String> = None;
        loop {
            if self.lock().stop {
                break;
            }
            let result = self.session();
            if self.lock().connected {
                logged = None;
            }
            self.disconnected(result.as_ref().err().cloned());
            if let Err(e) = result {
                let name = self.volume.name();
                if logged.as_ref() == Some(&e) {
                    log::debug!(
                        "replication of {name}: {e}; retrying in {} s",
                        RETRY.as_secs()
                    );
                } else {
                    log::warn!(
                        "replication of {name}: {e}; retrying every {} s (logged once until \
                         it changes; `snapblk replicate status {name}` shows the state)",
                        RETRY.as_secs()
                    );
                    logged = Some(e);
                }
            }
            let s = self.lock();
            if s.stop {
                break;
            }
            let _ = self.cond.wait_timeout(s, RETRY);
        }
        log::info!("replication of {}: sender stopped", self.volume.name());
    }

    /// After a session ended: the log and the per-block map are gone, the
    /// dirty map remembers (every block in them has its region's bit set,
    /// and the next session starts from the dirty map).
    fn disconnected(&self, error: Option<String>) {
        let stale = {
            let mut s = self.lock();
            s.connected = false;
            s.error = error;
            s.forget();
            s.cp.take().map(|c| c.number)
        };
        *self.stream.lock().unwrap() = None;
        self.cond.notify_all();
        if let Some(n) = stale {
            let _ = block_on(self.volume.delete_snapshot(&cp_snapshot_name(n)));
        }
    }

    /// Connects and authenticates; the connection is registered first, so
    /// that [`Link::stop`] can end it at any moment.
    fn connect(&self, until: Instant) -> Result<Conn<'_>, String> {
        let (host, key_file, version) = {
            let s = self.lock();
            let version = if s.record.resync.is_some() {
                wire::RESYNC_VERSION
            } else {
                wire::VERSION
            };
            (s.record.host.clone(), s.record.key_file.clone(), version)
        };
        let key = wire::read_key(&key_file)?;
        let addrs: Vec<_> = host
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        let mut last = format!("{host} has no address");
        for addr in addrs {
            let stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => s,
                Err(e) => {
                    last = format!("cannot connect to {addr}: {e}");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let _ = wire::keepalive(&stream, KEEPALIVE_IDLE);
            {
                let mut registered = self.stream.lock().unwrap();
                if self.lock().stop {
                    return Err("the link was stopped".into());
                }
                *registered = Some(stream.try_clone().map_err(|e| e.to_string())?);
            }
            let mut hs = wire::Deadline {
                stream: &stream,
                until,
            };
            let (sealed, sent) = wire::authenticate_to_destination(&mut hs, &key, version)
                .map_err(|e| format!("{host}: {e}"))?;
            self.lock().stats.bytes_sent += sent as u64;
            return Ok(Conn {
                link: self,
                stream,
                sealed,
                last_sent: Instant::now(),
                cp_sent: None,
            });
        }
        Err(last)
    }

    fn session(&self) -> SessionResult {
        let until = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut conn = self.connect(until)?;
        let open = {
            let s = self.lock();
            wire::Open {
                source_id: self.source_id.clone(),
                source_volume: s.record.volume.clone(),
                dest_volume: s.record.dest_volume.clone(),
                size: self.volume.size(),
                chunk_size: self.chunk_size as u32,
                block_size: self.block_size as u32,
                keep_cps: s.record.keep_cps,
                resync: s.record.resync.as_ref().map(|f| f.base.clone()),
            }
        };
        let io = |e: io::Error| e.to_string();
        conn.send(Kind::Open, &wire::to_json(&open)).map_err(io)?;
        let opened = {
            let mut hs = wire::Deadline {
                stream: &conn.stream,
                until,
            };
            conn.sealed
                .expect(&mut hs, Kind::Opened)
                .and_then(|p| wire::from_json::<wire::Opened>(&p))
                .map_err(io)?
        };
        // From here the destination may take long to answer (applying a
        // CP); keepalive and `stop` bound the wait instead.
        conn.stream.set_read_timeout(None).map_err(io)?;
        conn.stream.set_write_timeout(None).map_err(io)?;
        let mut next_tid = opened.next_tid;
        self.remember_replica(&opened.replica_id)?;
        let (full, mut next_cp) = {
            let acked = self.lock().record.last_acked_cp;
            let full = match (opened.last_applied_cp, acked) {
                (Some(d), Some(a)) => d != a && d != a + 1,
                _ => true,
            };
            // A failback resync also sends what either side changed since
            // the base (a full copy sends everything anyway).
            let failback = match self.lock().record.resync.clone() {
                Some(f) if !full => self.failback_blocks(&f, &opened.resync_changed)?,
                _ => Vec::new(),
            };
            let mut s = self.lock();
            let next_cp = opened.last_applied_cp.map_or(0, |d| d + 1);
            // The destination keeps staging across sessions, but references
            // are only trusted within one: resync from the dirty map.
            for b in self.dirty_blocks().into_iter().chain(failback) {
                s.epoch.insert(b, BlockState::Partial);
            }
            for st in s.epoch.values_mut() {
                *st = BlockState::Partial;
            }
            s.connected = true;
            s.ever_connected = true;
            s.error = None;
            s.phase = if full {
                Phase::Syncing
            } else {
                Phase::Resyncing
            };
            (full, next_cp)
        };
        log::info!(
            "replication of {} connected to {}/{}: {}",
            open.source_volume,
            self.lock().record.host,
            open.dest_volume,
            if full {
                "full copy".to_string()
            } else {
                format!("resync of {} changed block(s)", self.dirty_blocks().len())
            }
        );
        next_cp =
            self.consistency_point(&mut conn, next_cp, &mut next_tid, full, Instant::now())? + 1;
        let interval = Duration::from_millis(self.lock().record.cp_interval_ms.max(1));
        let mut due = Instant::now() + interval;
        let mut checked = Instant::now();
        loop {
            // `Some(when it fell due)`: take a CP now; `None`: ship one transfer.
            let cp_due = {
                let mut s = self.lock();
                loop {
                    if s.stop {
                        return Ok(());
                    }
                    let now = Instant::now();
                    let wanted = if s.cp_requests > s.cp_acked_requests {
                        let requested = s.cp_requested_at.unwrap_or(now);
                        Some(if now >= due {
                            requested.min(due)
                        } else {
                            requested
                        })
                    } else if now >= due {
                        // A write in flight enters the epoch at its end.
                        if s.epoch.is_empty() && s.log.is_empty() && s.inflight == 0 {
                            due = now + interval;
                            None
                        } else {
                            Some(due)
                        }
                    } else {
                        None
                    };
                    // One CP at a time: the next is taken once the last is
                    // applied, and the log ships meanwhile.
                    let applying = conn.cp_sent.is_some();
                    if let Some(when) = wanted.filter(|_| !applying) {
                        break Some(when);
                    }
                    let ship_at = s.log.ship_at(LINGER_BYTES, LINGER);
                    if ship_at.is_some_and(|at| at <= now) {
                        break None;
                    }
                    // Counted from the last check, not from this wait: writes
                    // that are not logged (partial blocks) wake this loop
                    // far more often than it checks.
                    let next_check = checked + if applying { ACK_CHECK } else { IDLE_CHECK };
                    if now >= next_check {
                        drop(s);
                        conn.check_alive().map_err(|e| e.to_string())?;
                        checked = Instant::now();
                        s = self.lock();
                        continue;
                    }
                    let until = if wanted.is_some() {
                        next_check
                    } else {
                        due.min(next_check)
                    };
                    let until = ship_at.map_or(until, |at| at.min(until));
                    s = self
                        .cond
                        .wait_timeout(s, until.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            match cp_due {
                None => {
                    self.ship_transfer(&mut conn, u64::MAX, &mut next_tid)?;
                }
                Some(fell_due) => {
                    next_cp =
                        self.consistency_point(&mut conn, next_cp, &mut next_tid, false, fell_due)?
                            + 1;
                    due = Instant::now() + interval;
                }
            }
        }
    }

    /// Records the replica's identity from its `Opened`, for a failback.
    fn remember_replica(&self, replica_id: &str) -> SessionResult {
        let record = {
            let mut s = self.lock();
            if replica_id.is_empty() || s.record.dest_replica_id.as_deref() == Some(replica_id) {
                return Ok(());
            }
            s.record.dest_replica_id = Some(replica_id.to_string());
            s.record.clone()
        };
        save_record(&self.record_path, &record).map_err(|e| e.to_string())
    }

    /// The blocks a failback resync must send besides the dirty ones: what
    /// this volume changed since its base snapshot (which must still be the
    /// base, by generation) and what the destination changed since (`theirs`,
    /// byte ranges from its `Opened`).
    fn failback_blocks(&self, f: &FailbackBase, theirs: &[(u64, u64)]) -> Result<Vec<u64>, String> {
        let name = self.volume.name();
        let size = self.volume.size();
        let held = self
            .volume
            .list_snapshots()
            .into_iter()
            .any(|s| s.name == f.snapshot && s.generation == f.generation);
        if !held {
            return Err(format!(
                "the failback base, snapshot {name}@{}, was deleted or replaced: no common base \
                 is left; run a full sync instead: `snapblk replicate stop {name}`, then \
                 `snapblk replicate start` without --resync to a new destination volume",
                f.snapshot
            ));
        }
        let ours = self
            .volume
            .changed_extents(&f.snapshot, None, 0, size)
            .map_err(|e| e.to_string())?;
        let bs = self.block_size;
        let mut blocks = Vec::new();
        for (a, b) in ours
            .into_iter()
            .map(|r| (r.start, r.end))
            .chain(theirs.iter().copied())
        {
            if a >= b || b > size {
                return Err(format!(
                    "the destination reported changed bytes {a}..{b} outside volume {name} \
                     ({size} bytes)"
                ));
            }
            blocks.extend(a / bs..b.div_ceil(bs));
        }
        blocks.sort_unstable();
        blocks.dedup();
        log::info!(
            "replication of {name}: failback resync from consistency point {}: {} block(s) \
             changed on either side ({} reported by the destination)",
            f.base.cp,
            blocks.len(),
            theirs.len()
        );
        Ok(blocks)
    }

    /// Ships the oldest segment of the log if its writes come before
    /// sequence number `limit` (up to [`TRANSFER_BYTES`], or one larger
    /// write); false if there was none.
    fn ship_transfer(
        &self,
        conn: &mut Conn,
        limit: u64,
        next_tid: &mut u64,
    ) -> Result<bool, String> {
        let Some(segment) = self.lock().log.take_before(limit) else {
            return Ok(false);
        };
        let tid = *next_tid;
        *next_tid += 1;
        let frame = conn
            .transfer(tid, segment.frame)
            .map_err(|e| e.to_string())?;
        let bs = self.block_size;
        let mut s = self.lock();
        s.log.recycle(frame);
        let boundary = s.cp.as_ref().map_or(0, |c| c.boundary);
        for (index, &(seq, offset, len)) in segment.writes.iter().enumerate() {
            let map = match &mut s.cp {
                Some(cp) if seq < boundary => &mut cp.map,
                _ => &mut s.epoch,
            };
            for block in offset / bs..(offset + len) / bs {
                if let Some(st) = map.get_mut(&block) {
                    if *st == BlockState::Logged(seq) {
                        *st = BlockState::Shipped {
                            tid,
                            index: index as u32,
                        };
                    }
                }
            }
        }
        Ok(true)
    }

    /// Takes snapshot `.repl-cp-N` with no hooked write in flight and starts
    /// a new epoch; `due` is when the CP fell due. A group member takes it
    /// with every other member, under a number they share: returns the
    /// number taken (at least `number`).
    fn take_cp_snapshot(&self, number: u64, due: Instant) -> Result<u64, String> {
        if let Some(group) = &self.group {
            return group.rendezvous(self, number, due);
        }
        self.raise_barrier()?;
        let name = cp_snapshot_name(number);
        let taken = block_on(self.volume.create_snapshot(&name));
        self.split_epoch(number, due, taken.is_ok());
        taken
            .map(|_| number)
            .map_err(|e| format!("cannot take snapshot {name}: {e}"))
    }

    /// Holds new hooked writes at the barrier and waits for those in
    /// flight; [`Link::split_epoch`] lowers it.
    pub(super) fn raise_barrier(&self) -> SessionResult {
        // Most dirty data goes out before writes wait at the barrier.
        block_on(self.volume.live().flush()).map_err(|e| e.to_string())?;
        let mut s = self.lock();
        s.cp_pending = true;
        while s.inflight > 0 {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    /// After CP `number`'s snapshot was `taken` (or not): every write
    /// before it is in the CP's block set, later ones in the next epoch;
    /// the barrier goes down.
    pub(super) fn split_epoch(&self, number: u64, due: Instant, taken: bool) {
        let released = if taken {
            self.release_unread(number)
        } else {
            None
        };
        let mut s = self.lock();
        s.cp_pending = false;
        // Writes after the snapshot go to new transfers.
        s.log.close();
        if taken {
            // The next epoch likely touches as many blocks: sized like this
            // one, its map never rehashes (moving every entry, under the
            // lock) while it grows.
            let next = BlockMap::with_capacity_and_hasher(s.epoch.len(), Default::default());
            let map = std::mem::replace(&mut s.epoch, next);
            s.cp = Some(CpInFlight {
                number,
                boundary: s.next_seq,
                map,
                written: s.stats.bytes_written,
                unix_ms: crate::engine::now_unix_ms(),
                requested: s.cp_requests,
                due,
                released,
            });
            s.cp_requested_at = None;
        }
        let waiters = std::mem::take(&mut s.waiters);
        drop(s);
        waiters.into_iter().for_each(Waker::wake);
    }

    /// With the barrier still up: stops preserving the chunks of CP
    /// `number`'s snapshot that it will not read (those with no block that
    /// a write did not log whole), so the writes waiting at the barrier
    /// do not each copy their chunk for the snapshot first (with 4k random
    /// writes, some 300 chunk copies per CP). A full copy reads nearly every
    /// block: its chunks go as it reads them ([`Link::consistency_point`]),
    /// and it gets no consumer here.
    fn release_unread(&self, number: u64) -> Option<crate::engine::SnapshotConsumer> {
        if keep_cp_snapshots() {
            return None;
        }
        let whole = {
            let s = self.lock();
            if s.phase == Phase::Syncing {
                return None;
            }
            read_whole(&s.epoch, false, self.blocks)
        };
        let name = cp_snapshot_name(number);
        let consumer = match block_on(self.volume.consume_snapshot(&name)) {
            Ok(c) => c,
            Err(e) => {
                // The CP asks again, after the barrier.
                log::debug!("cannot release the chunks of {name} yet: {e}");
                return None;
            }
        };
        let release = Release {
            consumer: Some(consumer),
            block_size: self.block_size,
            chunk_size: self.chunk_size,
            next: 0,
        };
        release.all_but(&whole, self.blocks);
        release.consumer
    }

    /// True once [`Link::stop`] was asked.
    pub(super) fn stopping(&self) -> bool {
        self.lock().stop
    }

    /// The record's group, if the link replicates one.
    pub fn group(&self) -> Option<String> {
        self.lock().record.group.clone()
    }

    /// One consistency point: snapshot, release the chunks it will not read,
    /// ship the log up to it, send the blocks not shipped whole, commit, wait
    /// for the destination to apply it, then forget what it covered.
    fn consistency_point(
        &self,
        conn: &mut Conn,
        number: u64,
        next_tid: &mut u64,
        full: bool,
        due: Instant,
    ) -> Result<u64, String> {
        conn.await_cp().map_err(|e| e.to_string())?;
        let number = self.take_cp_snapshot(number, due)?;
        let name = cp_snapshot_name(number);
        // The log up to the snapshot ships before the commit (it is never
        // dropped while the session lasts), so the blocks read whole are
        // known now: the Partial ones, or on a full copy all but the logged.
        let (boundary, whole) = {
            let s = self.lock();
            let cp = s.cp.as_ref().expect("taken");
            (cp.boundary, read_whole(&cp.map, full, self.blocks))
        };
        {
            let mut s = self.lock();
            if s.phase != Phase::Replicating {
                s.stats.sync_total_blocks = whole.iter().map(|(a, b)| b - a).sum();
                s.stats.sync_total_bytes = whole.iter().map(|&(a, b)| self.run_len(a, b)).sum();
                s.stats.sync_done_blocks = 0;
                s.stats.sync_done_bytes = 0;
            }
        }
        let err = |e: EngineError| e.to_string();
        // A sync reads the whole volume once, a CP its changed blocks: in
        // cache mode writearound, pages cached by these reads would make
        // every later write of them drop them first (and push out what the
        // volume's clients read).
        let view = self
            .volume
            .snapshot_view(&name)
            .map_err(err)?
            .for_one_pass();
        // Chunks released stop being preserved for this snapshot (unless a
        // test keeps it to compare).
        let released = self.lock().cp.as_mut().and_then(|c| c.released.take());
        let released_early = released.is_some();
        let consumer = match released {
            Some(c) => Some(c),
            None if keep_cp_snapshots() => None,
            None => Some(block_on(self.volume.consume_snapshot(&name)).map_err(err)?),
        };
        let mut release = Release {
            consumer,
            block_size: self.block_size,
            chunk_size: self.chunk_size,
            next: 0,
        };
        if !released_early {
            release.all_but(&whole, self.blocks);
        }
        while self.ship_transfer(conn, boundary, next_tid)? {}
        let mut entries = self.references(number)?;
        let refs = entries
            .iter()
            .map(|e| match e {
                CpEntry::Ref { count, .. } => *count,
                CpEntry::Zero { .. } => 0,
            })
            .sum();
        let (sent_whole, zero) = self.send_whole_blocks(
            conn,
            &view,
            &mut release,
            &whole,
            full,
            next_tid,
            &mut entries,
        )?;
        release.rest(self.blocks);
        let commit = CpCommit {
            cp: number,
            keep_from_tid: *next_tid,
            block_size: self.block_size as u32,
            entries,
        };
        conn.send(Kind::CpCommit, &wire::encode_cp(&commit))
            .map_err(|e| e.to_string())?;
        conn.cp_sent = Some(CpSent {
            number,
            full,
            refs,
            whole: sent_whole,
            zero,
        });
        Ok(number)
    }

    /// The destination applied CP `sent`: it is the replica's image now.
    fn cp_applied(&self, sent: CpSent) -> SessionResult {
        let CpSent {
            number,
            full,
            refs,
            whole,
            zero,
        } = sent;
        self.acknowledged(number, full, refs, whole, zero)?;
        if keep_cp_snapshots() {
            return Ok(());
        }
        let name = cp_snapshot_name(number);
        if let Err(e) = block_on(self.volume.delete_snapshot(&name)) {
            log::warn!("volume {}: cannot delete {name}: {e}", self.volume.name());
        }
        Ok(())
    }

    /// The in-flight CP's shipped blocks as references, runs of blocks of
    /// one piece in one entry.
    fn references(&self, number: u64) -> Result<Vec<CpEntry>, String> {
        let s = self.lock();
        let map = &s.cp.as_ref().expect("taken").map;
        let mut shipped = Vec::new();
        for (&block, st) in map {
            match *st {
                BlockState::Shipped { tid, index } => shipped.push((block, tid, index)),
                BlockState::Logged(seq) => {
                    return Err(format!(
                        "consistency point {number}: block {block}, logged by write {seq} before \
                         its snapshot, was not shipped; resyncing"
                    ))
                }
                BlockState::Partial => {}
            }
        }
        shipped.sort_unstable();
        let mut entries: Vec<CpEntry> = Vec::new();
        for (b, t, i) in shipped {
            if let Some(CpEntry::Ref {
                block,
                count,
                tid,
                index,
            }) = entries.last_mut()
            {
                if *block + *count == b && *tid == t && *index == i {
                    *count += 1;
                    continue;
                }
            }
            entries.push(CpEntry::Ref {
                block: b,
                count: 1,
                tid: t,
                index: i,
            });
        }
        Ok(entries)
    }

    /// Reads the block runs `whole` from the CP snapshot and ships their
    /// non-zero blocks in transfers, adding entries for them (a run of
    /// adjacent non-zero blocks is one piece and one entry) and for the zero
    /// ones. Each chunk is released once its blocks are read. Returns how
    /// many blocks were sent whole and how many were zero.
    #[allow(clippy::too_many_arguments)]
    fn send_whole_blocks(
        &self,
        conn: &mut Conn,
        view: &crate::engine::View,
        release: &mut Release,
        whole: &[(u64, u64)],
        full: bool,
        next_tid: &mut u64,
        entries: &mut Vec<CpEntry>,
    ) -> Result<(u64, u64), String> {
        let err = |e: EngineError| e.to_string();
        let bs = self.block_size;
        let size = self.volume.size();
        // On a full copy, unallocated ranges are zeros without reading them.
        let allocated: Option<Vec<(u64, u64)>> = if full {
            let extents = view.block_status(0, size).map_err(err)?;
            Some(
                extents
                    .into_iter()
                    .filter(|e| e.data)
                    .map(|e| (e.offset / bs, (e.offset + e.len).div_ceil(bs)))
                    .collect(),
            )
        } else {
            None
        };
        // The transfer being gathered and its pieces' block runs.
        let mut batch = TransferFrame::new(Vec::new());
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let (mut sent, mut zero) = (0u64, 0u64);
        let flush = |batch: &mut TransferFrame,
                     runs: &mut Vec<(u64, u64)>,
                     conn: &mut Conn,
                     entries: &mut Vec<CpEntry>,
                     next_tid: &mut u64| {
            if batch.is_empty() {
                return Ok::<(), String>(());
            }
            let tid = *next_tid;
            *next_tid += 1;
            let full = std::mem::replace(batch, TransferFrame::new(Vec::new()));
            let frame = conn.transfer(tid, full).map_err(|e| e.to_string())?;
            *batch = TransferFrame::new(frame);
            for (index, (block, count)) in runs.drain(..).enumerate() {
                entries.push(CpEntry::Ref {
                    block,
                    count,
                    tid,
                    index: index as u32,
                });
            }
            Ok(())
        };
        let per_read = (TRANSFER_BYTES as u64 / bs).max(1);
        for &(first, end) in whole {
            for (a, b, data_here) in split_by_allocation(allocated.as_deref(), first, end) {
                if !data_here {
                    push_zero(entries, a, b - a);
                    zero += b - a;
                    release.progress(b);
                    self.sync_progress(a, b);
                    continue;
                }
                let mut at = a;
                while at < b {
                    let n = per_read.min(b - at);
                    let offset = at * bs;
                    let len = (n * bs).min(size - offset) as usize;
                    // Aligned: the origin may be opened with O_DIRECT.
                    let mut data = AlignedBuf::zeroed(len);
                    block_on(view.read(offset, &mut data)).map_err(err)?;
                    release.progress(at + n);
                    self.sync_progress(at, at + n);
                    // Long runs of zeros send nothing for a while.
                    conn.keep_alive().map_err(|e| e.to_string())?;
                    let block_of = |k: u64| {
                        let s = (k * bs) as usize;
                        &data[s..((k + 1) * bs).min(len as u64) as usize]
                    };
                    let mut k = 0;
                    while k < n {
                        if block_of(k).iter().all(|&x| x == 0) {
                            push_zero(entries, at + k, 1);
                            zero += 1;
                            k += 1;
                            continue;
                        }
                        let run = k;
                        while k < n && !block_of(k).iter().all(|&x| x == 0) {
                            k += 1;
                        }
                        let bytes = &data[(run * bs) as usize..((k * bs) as usize).min(len)];
                        sent += k - run;
                        batch.push((at + run) * bs, bytes);
                        runs.push((at + run, k - run));
                        if batch.payload_len() >= TRANSFER_BYTES {
                            flush(&mut batch, &mut runs, conn, entries, next_tid)?;
                        }
                    }
                    at += n;
                }
            }
        }
        flush(&mut batch, &mut runs, conn, entries, next_tid)?;
        Ok((sent, zero))
    }

    /// Bytes of blocks `a..b` (the volume's last block may be short).
    fn run_len(&self, a: u64, b: u64) -> u64 {
        (b * self.block_size).min(self.volume.size()) - a * self.block_size
    }

    /// Blocks `a..b` of a full copy or resync were read (or are zero).
    fn sync_progress(&self, a: u64, b: u64) {
        let mut s = self.lock();
        if s.phase != Phase::Replicating {
            s.stats.sync_done_blocks += b - a;
            s.stats.sync_done_bytes += self.run_len(a, b);
        }
    }

    /// The destination applied CP `number`: record it, clear the dirty bits
    /// of blocks it covered that were not written since, count.
    fn acknowledged(
        &self,
        number: u64,
        full: bool,
        refs: u64,
        whole: u64,
        zero: u64,
    ) -> SessionResult {
        let (record, generation) = {
            let mut s = self.lock();
            let cp = s.cp.take().expect("taken");
            // A session's first CP carries the failback's blocks: done.
            s.record.resync = None;
            s.record.last_acked_cp = Some(number);
            s.record.last_acked_unix_ms = cp.unix_ms;
            s.written_at_last_cp = cp.written;
            s.cp_acked_requests = s.cp_acked_requests.max(cp.requested);
            s.stats.cps += 1;
            s.stats.last_cp_ref_blocks = refs;
            s.stats.last_cp_full_blocks = whole;
            s.stats.last_cp_zero_blocks = zero;
            s.stats.bytes_saved += refs * self.block_size;
            let delay = cp.due.elapsed().as_millis() as u64;
            s.stats.last_cp_delay_ms = delay;
            if s.phase == Phase::Replicating {
                s.stats.max_cp_delay_ms = s.stats.max_cp_delay_ms.max(delay);
            }
            match s.phase {
                Phase::Syncing => s.stats.full_syncs += 1,
                Phase::Resyncing => s.stats.resync_blocks += whole,
                Phase::Replicating if s.overflowed => s.stats.resync_blocks += whole,
                Phase::Replicating => {}
            }
            s.phase = Phase::Replicating;
            s.overflowed = false;
            let rb = self.region_blocks;
            let covered: HashSet<u64> = if full {
                (0..self.blocks.div_ceil(rb)).collect()
            } else {
                cp.map.keys().map(|b| b / rb).collect()
            };
            let busy = self.regions_in_use(&s);
            let generation = self
                .dirty
                .clear(covered.into_iter().filter(|r| !busy.contains(r)));
            (s.record.clone(), generation)
        };
        self.cond.notify_all();
        save_record(&self.record_path, &record).map_err(|e| e.to_string())?;
        block_on(self.dirty.make_durable(generation)).map_err(|e| e.to_string())?;
        log::info!(
            "replication of {}: consistency point {number} applied ({refs} referenced, \
             {whole} sent whole, {zero} zero block(s))",
            self.volume.name()
        );
        Ok(())
    }
}

/// The blocks a CP reads whole from its snapshot, as sorted runs: those no
/// write logged whole (`map`'s Partial ones), or on a full copy all but the
/// logged ones.
fn read_whole(map: &BlockMap, full: bool, blocks: u64) -> Vec<(u64, u64)> {
    let mut picked: Vec<u64> = map
        .iter()
        .filter(|(_, st)| (**st == BlockState::Partial) != full)
        .map(|(&b, _)| b)
        .collect();
    picked.sort_unstable();
    let runs = to_runs(&picked);
    if full {
        complement(&runs, blocks)
    } else {
        runs
    }
}

/// The blocks of every dirty region.
fn expand_regions(dirty: &DirtyMap, region_blocks: u64, blocks: u64) -> Vec<u64> {
    dirty
        .dirty_blocks()
        .into_iter()
        .flat_map(|r| r * region_blocks..((r + 1) * region_blocks).min(blocks))
        .collect()
}

/// Adds blocks `b .. b + n` to the zero entries, extending the last run if
/// adjacent.
fn push_zero(entries: &mut Vec<CpEntry>, b: u64, n: u64) {
    if let Some(CpEntry::Zero { block, count }) = entries.last_mut() {
        if *block + *count == b {
            *count += n;
            return;
        }
    }
    entries.push(CpEntry::Zero { block: b, count: n });
}

/// At most this many changed ranges travel in a failback's `Opened` (about
/// 30 MiB as JSON, under the frame limit): more are merged across their
/// smallest gaps, which only sends more.
const MAX_FAILBACK_RANGES: usize = 1 << 20;

/// Sorted, disjoint `runs` merged across gaps (doubling from 64 KiB) until
/// at most `max` are left.
fn coarsen(mut runs: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    let mut gap = DIRTY_REGION;
    while runs.len() > max {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in runs {
            match out.last_mut() {
                Some(last) if r.0 - last.1 <= gap => last.1 = r.1,
                _ => out.push(r),
            }
        }
        runs = out;
        gap *= 2;
    }
    runs
}

/// Sorted block numbers -> runs `(first, end)`.
fn to_runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &b in sorted {
        match runs.last_mut() {
            Some(r) if r.1 == b => r.1 += 1,
            _ => runs.push((b, b + 1)),
        }
    }
    runs
}

/// The runs of `0..blocks` outside the sorted, disjoint `runs`.
fn complement(runs: &[(u64, u64)], blocks: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut next = 0;
    for &(a, b) in runs {
        if a > next {
            out.push((next, a));
        }
        next = b;
    }
    if next < blocks {
        out.push((next, blocks));
    }
    out
}

/// `first..end` split into runs inside and outside the sorted `allocated`
/// runs (all inside without them): `(first, end, allocated)`.
fn split_by_allocation(
    allocated: Option<&[(u64, u64)]>,
    first: u64,
    end: u64,
) -> Vec<(u64, u64, bool)> {
    let Some(allocated) = allocated else {
        return vec![(first, end, true)];
    };
    let mut out = Vec::new();
    let mut at = first;
    let from = allocated.partition_point(|&(_, e)| e <= first);
    for &(a, b) in &allocated[from..] {
        if a >= end {
            break;
        }
        if a > at {
            out.push((at, a, false));
        }
        let (s, e) = (a.max(at), b.min(end));
        if s < e {
            out.push((s, e, true));
            at = e;
        }
    }
    if at < end {
        out.push((at, end, false));
    }
    out
}

/// Gives a CP snapshot's chunks back to the engine (so writes stop
/// preserving them) as soon as the CP no longer reads them.
struct Release {
    consumer: Option<crate::engine::SnapshotConsumer>,
    block_size: u64,
    chunk_size: u64,
    /// Every chunk below this byte offset has been released.
    next: u64,
}

impl Release {
    /// Releases every chunk wholly inside blocks `first..end`.
    fn blocks(&self, first: u64, end: u64) {
        if let (Some(c), true) = (&self.consumer, end > first) {
            c.release(first * self.block_size, (end - first) * self.block_size);
        }
    }

    /// Releases every chunk that holds no block of the sorted `runs`.
    fn all_but(&self, runs: &[(u64, u64)], blocks: u64) {
        for (a, b) in complement(runs, blocks) {
            self.blocks(a, b);
        }
    }

    /// Every block below `done` has been read: release the chunks below it.
    fn progress(&mut self, done: u64) {
        let end = done * self.block_size / self.chunk_size * self.chunk_size;
        if end > self.next {
            self.blocks(self.next / self.block_size, end / self.block_size);
            self.next = end;
        }
    }

    /// The CP read everything it needed.
    fn rest(&mut self, blocks: u64) {
        self.blocks(self.next / self.block_size, blocks);
        self.next = blocks * self.block_size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{memory::MemDisk, Storage};
    use crate::engine::{CacheMode, VolumeConfig};

    const BLOCK: u64 = 4096;

    /// A link on a 1 MiB memory volume with 4K blocks on 64K chunks, as
    /// if connected (no destination: the sender never runs).
    fn connected_link(dir: &Path) -> (Arc<Link>, Tap) {
        let config = VolumeConfig {
            size: 1 << 20,
            chunk_size: 64 * 1024,
            partitions: 1,
            backing: None,
            cache: CacheMode::Writeback,
        };
        let volume = block_on(Volume::create(
            "v",
            Storage::Memory(MemDisk::new()),
            &config,
        ))
        .unwrap();
        let record = LinkRecord {
            volume: "v".into(),
            host: "127.0.0.1:1".into(),
            dest_volume: "v".into(),
            cp_interval_ms: 1000,
            key_file: dir.join("key"),
            keep_cps: 1,
            max_log_bytes: 64 * 1024,
            block_size: Some(BLOCK),
            last_acked_cp: None,
            last_acked_unix_ms: 0,
            dest_replica_id: None,
            resync: None,
            group: None,
            group_members: Vec::new(),
        };
        let (link, _hook) = Link::open(volume, record, dir, "test", None).unwrap();
        link.lock().connected = true;
        (link.clone(), Tap(link))
    }

    fn state(link: &Link, block: u64) -> Option<BlockState> {
        link.lock().epoch.get(&block).copied()
    }

    /// Each write's blocks get their state when it ends, in one step with
    /// the release of its range lock and barrier place; a write that ends
    /// without `after_write` (it failed at the origin) leaves its blocks
    /// Partial, and while it runs its dirty region stays in use.
    #[test]
    fn a_write_enters_the_epoch_when_it_ends_and_a_failed_one_leaves_its_blocks_partial() {
        let t = tempfile::tempdir().unwrap();
        let (link, tap) = connected_link(t.path());
        let released = |link: &Link| {
            let s = link.lock();
            s.inflight == 0 && s.locked.is_empty()
        };

        // Blocks 1 and 2 whole, block 3 in part: logged, logged, Partial.
        let mut guard = block_on(tap.before_write(BLOCK, 2 * BLOCK + 512)).unwrap();
        assert_eq!(state(&link, 1), None, "nothing until the write ends");
        assert!(
            link.regions_in_use(&link.lock()).contains(&0),
            "the region of a write in flight is not cleared by an acknowledgement"
        );
        let data = vec![7u8; 2 * BLOCK as usize + 512];
        tap.after_write(&mut guard, BLOCK, Change::Data(&data));
        assert!(
            released(&link),
            "after_write gave back the lock and the barrier place"
        );
        drop(guard);
        assert!(released(&link));
        assert_eq!(state(&link, 1), Some(BlockState::Logged(0)));
        assert_eq!(state(&link, 2), Some(BlockState::Logged(0)));
        assert_eq!(state(&link, 3), Some(BlockState::Partial));
        assert_eq!(link.lock().log.bytes(), 2 * BLOCK);

        // Zeroes leave their blocks Partial.
        let mut guard = block_on(tap.before_write(8 * BLOCK, BLOCK)).unwrap();
        tap.after_write(&mut guard, 8 * BLOCK, Change::Zeroes(BLOCK));
        drop(guard);
        assert_eq!(state(&link, 8), Some(BlockState::Partial));

        // A write that never reached after_write: its blocks may hold
        // anything, including block 1, logged whole before.
        let guard = block_on(tap.before_write(0, 2 * BLOCK)).unwrap();
        drop(guard);
        assert!(released(&link));
        assert_eq!(state(&link, 0), Some(BlockState::Partial));
        assert_eq!(state(&link, 1), Some(BlockState::Partial));

        // A write the full log cannot take: Partial, and counted.
        let big = vec![1u8; 128 * 1024];
        let mut guard = block_on(tap.before_write(16 * BLOCK, big.len() as u64)).unwrap();
        tap.after_write(&mut guard, 16 * BLOCK, Change::Data(&big));
        drop(guard);
        assert!(released(&link));
        assert_eq!(state(&link, 16), Some(BlockState::Partial));
        assert_eq!(link.lock().stats.log_overflows, 1);
        assert_eq!(
            link.lock().log.bytes(),
            2 * BLOCK,
            "nothing more was logged"
        );
        link.stop();
    }

    #[test]
    fn block_runs_complements_and_allocation_splits() {
        assert_eq!(to_runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 4), (7, 8), (9, 11)]);
        assert_eq!(to_runs(&[]), vec![]);
        assert_eq!(
            complement(&[(1, 4), (7, 8)], 10),
            vec![(0, 1), (4, 7), (8, 10)]
        );
        assert_eq!(complement(&[(0, 10)], 10), vec![]);
        assert_eq!(complement(&[], 3), vec![(0, 3)]);
        let allocated = [(2, 4), (6, 9)];
        assert_eq!(
            split_by_allocation(Some(&allocated), 0, 10),
            vec![
                (0, 2, false),
                (2, 4, true),
                (4, 6, false),
                (6, 9, true),
                (9, 10, false)
            ]
        );
        assert_eq!(
            split_by_allocation(Some(&allocated), 3, 7),
            vec![(3, 4, true), (4, 6, false), (6, 7, true)]
        );
        assert_eq!(split_by_allocation(None, 3, 7), vec![(3, 7, true)]);
        let runs = vec![(0, 4096), (65536, 69632), (1 << 20, (1 << 20) + 4096)];
        assert_eq!(coarsen(runs.clone(), 3), runs);
        assert_eq!(
            coarsen(runs, 2),
            vec![(0, 69632), (1 << 20, (1 << 20) + 4096)]
        );
        let mut zeros = Vec::new();
        push_zero(&mut zeros, 4, 2);
        push_zero(&mut zeros, 6, 1);
        push_zero(&mut zeros, 9, 1);
        assert_eq!(
            zeros,
            vec![
                CpEntry::Zero { block: 4, count: 3 },
                CpEntry::Zero { block: 9, count: 1 }
            ]
        );
    }
}

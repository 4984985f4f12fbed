//! The destination end: the listener, one thread per authenticated source
//! connection, the staging area and the atomic application of CPs (each by
//! a thread of its own while the connection's thread stages what follows).
//!
//! Per replica volume `DEST` (all under `DATA_DIR/replication/dest/`):
//! - `DEST.json`: the pairing (source identity and volume; a replica paired
//!   with one source refuses every other), the last applied CP, whether it
//!   was promoted;
//! - `DEST.staging/`: transfers appended to segment files as they arrive,
//!   acknowledged once written, and `cp-<n>.rec`, a CP's block set, made
//!   durable together with every transfer staged before it (one sync per
//!   CP, not per transfer) before it is applied ([`super::staging`]).
//!   References are trusted within one session only, so a transfer lost in
//!   a crash before its CP record was durable is never referred to: the
//!   source resyncs from its dirty map.
//!
//! Applying CP n writes every block of its set into the replica's live
//! volume, flushes, takes snapshot `cp-n`, then records n as applied. Readers
//! never see the live volume: NBD exports of `DEST` serve the newest `cp-n`
//! snapshot until promotion, so they see exactly one CP. A crash mid-apply
//! leaves `cp-n.rec` and the transfers it references; the restart applies
//! it again from the start (each block is simply rewritten), before any
//! export is served. So with one CP kept and nobody reading, `cp-(n-1)` is
//! deleted before the apply rather than after (`Replica::drop_unread_cps`).
//!
//! Failback ([`Receiver::failback`]): a resync `Open` for a volume here
//! that is not an unpromoted replica makes it one, at the base CP, once
//! this daemon's link of it ([`OldSource`]) proved the base and kept the
//! volume's image as a snapshot; its changed ranges travel in `Opened` and
//! the record until the first CP is applied.
//!
//! Test hooks (never set them outside tests): with
//! `SNAPBLK_TEST_PAUSE_APPLY=N` in its environment the daemon stops halfway
//! through applying CP N (it logs "pausing in the middle of applying") and
//! waits there until the file `SNAPBLK_TEST_RESUME_APPLY` names exists
//! (forever without one), so a test can kill it at that instant, then
//! fails the apply if the file says `fail`; with
//! `SNAPBLK_TEST_STAGE_DELAY_MS=N` it waits N ms before acknowledging each
//! transfer, a slow link that any writer outpaces.

use super::staging::Staging;
use super::wire::{self, CpEntry, Kind};
use crate::engine::Volume;
use crate::runtime::{block_on, AlignedBuf};
use crate::volumes::{validate_name, ErrorKind, Registry};
use futures::future::try_join_all;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, RwLockWriteGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PAUSE_KNOB: &str = "SNAPBLK_TEST_PAUSE_APPLY";
const RESUME_KNOB: &str = "SNAPBLK_TEST_RESUME_APPLY";
const STAGE_DELAY_KNOB: &str = "SNAPBLK_TEST_STAGE_DELAY_MS";
/// CP entries applied concurrently, and the bytes they may hold in memory.
const APPLY_BATCH: usize = 128;
const APPLY_BATCH_BYTES: u64 = 16 << 20;
/// Adjacent referenced blocks are written together up to this many bytes.
const APPLY_WRITE: u64 = 1 << 20;

/// One write of an apply: volume bytes `start..end`, gathered from staged
/// pieces (transfer, piece, where its part starts), in order.
struct Planned {
    start: u64,
    end: u64,
    parts: Vec<(u64, u32, u64)>,
}
/// The whole handshake (key proof, `Open`, pairing) must end within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many connections may be in their handshake at once (each
/// holds a thread and a socket until its deadline), and this many in all.
const MAX_HANDSHAKES: usize = 16;
const MAX_CONNECTIONS: usize = 256;
/// A session that receives nothing (not even the idle source's `Ping`)
/// for this long is dropped: its source is gone without a word.
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Keepalive probes start after this long without traffic.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
/// How long a new connection of a replica's source waits for the old one
/// (ended at once, but it may be in the middle of applying a CP) to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub volume: String,
    pub source_id: String,
    pub source_volume: String,
    pub size: u64,
    /// The block size of the current (or last) session; each CP carries its own.
    pub block_size: u32,
    pub keep_cps: u32,
    pub last_applied_cp: Option<u64>,
    pub applied_unix_ms: u64,
    /// Transfers below this id were dropped after the last apply.
    pub keep_from_tid: u64,
    pub promoted: bool,
    /// This replica's identity, random, made when it is created (empty in
    /// records from before failback): a failback names its base by it.
    #[serde(default)]
    pub replica_id: String,
    /// The engine generation of snapshot `cp-{last_applied_cp}`: a failback
    /// from here finds its base by it, never by the snapshot's name alone.
    #[serde(default)]
    pub cp_generation: Option<u64>,
    /// A failback resync being received: until its first CP is applied.
    #[serde(default)]
    pub resync: Option<PendingResync>,
}

/// What a failback resync needs to survive a restart of either side, kept
/// until its first CP is applied.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingResync {
    pub base_cp: u64,
    /// The byte ranges this volume changed since the base (sent to the
    /// source at every session start, as `Opened::resync_changed`).
    pub changed: Vec<(u64, u64)>,
    /// The snapshot that keeps this volume's divergent image.
    pub snapshot: String,
}

/// The old source's side of a failback, implemented by
/// [`super::Replication`], which owns the links.
pub trait OldSource: Send + Sync {
    /// Checks `base` against this daemon's link of `volume` and that nothing
    /// writes the volume, keeps its image as a snapshot and stops the link.
    /// Returns the byte ranges it changed since the base and the snapshot.
    fn failback_prepare(
        &self,
        volume: &str,
        base: &wire::ResyncBase,
    ) -> Result<(Vec<(u64, u64)>, String), String>;
    /// `volume` is a replica now (its record is durable): drop its link.
    fn failback_done(&self, volume: &str);
}

/// A fresh replica identity.
fn new_replica_id() -> String {
    wire::nonce()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub struct Replica {
    staging: Staging,
    record_path: PathBuf,
    record: Mutex<ReplicaRecord>,
    /// Held while a CP is applied (promote waits for it).
    apply: Mutex<()>,
    /// Written while the replica has no CP snapshot (an apply that dropped
    /// the previous one); export readers open their view under it.
    cp_image: RwLock<()>,
    /// The CP whose apply dropped the previous CP snapshot and failed: no
    /// CP image exists until an apply succeeds.
    image_lost_at: Mutex<Option<u64>>,
    session: Mutex<Option<Attached>>,
    /// Signalled when a connection lets go of the replica.
    released: Condvar,
    /// Why the replica could not be recovered at start: it is then neither
    /// exported nor written until the operator repaired it and restarted.
    broken: Mutex<Option<String>>,
    bytes_received: AtomicU64,
}

/// The connection a replica receives from.
struct Attached {
    /// Tells this connection from a later one of the same source.
    id: u64,
    peer: String,
    /// A handle on the connection, to end it (takeover, promote, shutdown).
    cut: TcpStream,
}

pub struct Receiver {
    registry: Arc<Registry>,
    dir: PathBuf,
    key: Option<Vec<u8>>,
    replicas: Mutex<BTreeMap<String, Arc<Replica>>>,
    listener: Option<TcpListener>,
    local_addr: Option<SocketAddr>,
    stopping: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Connections that have not proved the key yet, and all connections.
    handshaking: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    next_conn_id: AtomicU64,
    /// Connections not attached to a replica yet (shutdown ends them).
    unpaired: Mutex<HashMap<u64, TcpStream>>,
    /// The last refusal logged per source address: a source retries every
    /// second, and one line per outage is enough.
    refusals: Mutex<HashMap<IpAddr, String>>,
    /// Set once the links are loaded ([`Receiver::set_old_source`]).
    old_source: OnceLock<Weak<dyn OldSource>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn engine(e: crate::engine::EngineError) -> io::Error {
    io::Error::other(e.to_string())
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The bytes of blocks `block .. block + count` (the last block of the
/// volume may be short).
fn run_bytes(block: u64, count: u64, bs: u64, size: u64) -> (u64, u64) {
    (block * bs, ((block + count) * bs).min(size))
}

/// The replica's snapshot holding CP `n`.
pub fn cp_snapshot(n: u64) -> String {
    format!("cp-{n}")
}

/// The replica's CP snapshots (number, name), oldest first.
fn cp_snapshots(volume: &Volume) -> Vec<(u64, String)> {
    let mut cps: Vec<(u64, String)> = volume
        .list_snapshots()
        .into_iter()
        .filter_map(|s| {
            let n = s.name.strip_prefix("cp-")?.parse().ok()?;
            Some((n, s.name))
        })
        .collect();
    cps.sort();
    cps
}

impl Replica {
    fn new(dir: &Path, record_path: PathBuf, record: ReplicaRecord) -> Replica {
        Replica {
            staging: Staging::new(dir.join(format!("{}.staging", record.volume))),
            record_path,
            record: Mutex::new(record),
            apply: Mutex::new(()),
            cp_image: RwLock::new(()),
            image_lost_at: Mutex::new(None),
            session: Mutex::new(None),
            released: Condvar::new(),
            broken: Mutex::new(None),
            bytes_received: AtomicU64::new(0),
        }
    }

    /// Loads the replica recorded at `path` and finishes the CPs whose apply
    /// a crash cut short. One that cannot be recovered (an unreadable record,
    /// a bad staged transfer, a full disk) is returned broken rather than
    /// stopping the daemon: the rest is served, and it fails closed (neither
    /// exported nor written) until the operator repaired it.
    fn recover(registry: &Registry, dir: &Path, path: &Path) -> (String, Replica) {
        let stem = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let record = fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<ReplicaRecord>(&b).map_err(|e| e.to_string()));
        let replica = match record {
            Ok(record) => Replica::new(dir, path.to_path_buf(), record),
            Err(e) => {
                // What it replicates is unknown, so nothing may use the
                // volume as its own: a placeholder that refuses everything.
                let placeholder = ReplicaRecord {
                    volume: stem.clone(),
                    source_id: String::new(),
                    source_volume: String::new(),
                    size: 0,
                    block_size: 0,
                    keep_cps: 1,
                    last_applied_cp: None,
                    applied_unix_ms: 0,
                    keep_from_tid: 0,
                    promoted: false,
                    replica_id: String::new(),
                    cp_generation: None,
                    resync: None,
                };
                let r = Replica::new(dir, path.to_path_buf(), placeholder);
                r.mark_broken(format!(
                    "its record {} cannot be read ({e}); repair or remove that file and restart",
                    path.display()
                ));
                return (stem, r);
            }
        };
        let name = replica.record().volume;
        if let Err(e) = replica.finish_applies(registry, &name) {
            replica.mark_broken(format!(
                "it could not be recovered at start ({e}); free space or repair {} and restart, \
                 or promote it to use the last consistency point it applied",
                replica.staging.dir().display()
            ));
        }
        (name, replica)
    }

    /// Applies the staged CPs a crash left unapplied.
    fn finish_applies(&self, registry: &Registry, name: &str) -> io::Result<()> {
        let pending = {
            let r = self.record();
            self.staging
                .load(r.size, r.keep_from_tid, r.last_applied_cp)?
        };
        if pending.is_empty() || self.record().promoted {
            return Ok(());
        }
        let vol = match registry.volume(name) {
            Ok(v) => v,
            // Deleted: the next session creates it again and copies it whole.
            Err(e) if e.kind == ErrorKind::NotFound => {
                log::error!("replica {name}: {}", e.message);
                return Ok(());
            }
            Err(e) => return Err(io::Error::other(e.message)),
        };
        for cp in pending {
            log::info!(
                "replica {name}: applying consistency point {} again (an apply was cut short)",
                cp.cp
            );
            self.check_cp(&cp)?;
            self.apply(&vol, &cp)?;
        }
        Ok(())
    }

    fn mark_broken(&self, why: String) {
        log::error!(
            "replica {}: {why}; it is neither exported nor written until then",
            self.record().volume
        );
        *lock(&self.broken) = Some(why);
    }

    fn broken(&self) -> Option<String> {
        lock(&self.broken).clone()
    }

    fn record(&self) -> ReplicaRecord {
        lock(&self.record).clone()
    }

    fn save(&self, record: ReplicaRecord) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&record).expect("records serialize");
        crate::backend::file::replace_atomically(&self.record_path, &bytes)?;
        *lock(&self.record) = record;
        Ok(())
    }

    fn next_tid(&self) -> u64 {
        self.staging.next_tid(self.record().keep_from_tid)
    }

    /// Checks and stages a transfer; returns its id.
    fn store_transfer(&self, payload: &[u8]) -> io::Result<u64> {
        self.staging.store_transfer(payload, self.record().size)
    }

    /// Checks that every entry of `cp` lies inside the volume and every
    /// reference names a staged piece that covers its blocks.
    fn check_cp(&self, cp: &wire::CpCommit) -> io::Result<()> {
        let size = self.record().size;
        let bs = cp.block_size as u64;
        let blocks = size.div_ceil(bs);
        for e in &cp.entries {
            let (block, count) = match *e {
                CpEntry::Ref { block, count, .. } | CpEntry::Zero { block, count } => {
                    (block, count)
                }
            };
            if block.checked_add(count).is_none_or(|e| e > blocks) {
                return Err(invalid(format!(
                    "CP {}: blocks {block}+{count} of {bs} bytes are beyond the volume",
                    cp.cp
                )));
            }
            if let CpEntry::Ref { tid, index: i, .. } = *e {
                let piece = self.staging.piece(tid, i).ok_or_else(|| {
                    invalid(format!(
                        "CP {}: block {block} refers to piece {i} of transfer {tid}, \
                             which this replica does not hold",
                        cp.cp
                    ))
                })?;
                let (start, end) = run_bytes(block, count, bs, size);
                if start < piece.offset || end > piece.offset + piece.len as u64 {
                    return Err(invalid(format!(
                        "CP {}: piece {i} of transfer {tid} does not cover blocks {block}+{count}",
                        cp.cp
                    )));
                }
            }
        }
        Ok(())
    }

    /// Deletes the CP snapshots older than `cp` before CP `cp` is applied,
    /// unless someone reads one of the volume's snapshots: kept, each would
    /// have every chunk the apply overwrites copied for it first, only to be
    /// deleted once `cp-<cp>` exists (a CP that touches every chunk copied
    /// the whole volume once more). Staging already makes the apply safe
    /// against a crash: the restart redoes it from there before it serves
    /// anything. Returns the guard that keeps export readers waiting until
    /// the new CP snapshot exists, if it deleted any; until the apply
    /// succeeds, readers are told the image is lost (`image_lost_at`).
    fn drop_unread_cps(
        &self,
        volume: &Volume,
        cp: u64,
    ) -> io::Result<Option<RwLockWriteGuard<'_, ()>>> {
        let image = self.cp_image.write().unwrap_or_else(|e| e.into_inner());
        let mut dropped = false;
        for (_, name) in cp_snapshots(volume).into_iter().filter(|(n, _)| *n < cp) {
            if !block_on(volume.delete_snapshot_unless_read(&name)).map_err(engine)? {
                break;
            }
            dropped = true;
        }
        if !dropped {
            return Ok(None);
        }
        *lock(&self.image_lost_at) = Some(cp);
        Ok(Some(image))
    }

    /// Applies a staged CP to `volume` (see the module doc); idempotent.
    fn apply(&self, volume: &Arc<Volume>, cp: &wire::CpCommit) -> io::Result<()> {
        let _applying = lock(&self.apply);
        let mut record = self.record();
        if record.promoted {
            return Err(io::Error::other("the replica was promoted"));
        }
        let bs = cp.block_size as u64;
        let _no_cp_image = if record.keep_cps <= 1 {
            self.drop_unread_cps(volume, cp.cp)?
        } else {
            None
        };
        let view = volume.live();
        let mut staged = self.staging.reader();
        let pause_at = std::env::var(PAUSE_KNOB)
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        // Blocks of a CP are distinct: write a batch at a time, concurrently,
        // so the engine group-commits what the writes must preserve.
        let mid = cp.entries.len() / 2;
        for (half, entries) in [&cp.entries[..mid], &cp.entries[mid..]]
            .into_iter()
            .enumerate()
        {
            if half == 1 && pause_at == Some(cp.cp) && !entries.is_empty() {
                log::warn!(
                    "test hook {PAUSE_KNOB}: pausing in the middle of applying CP {} to {}",
                    cp.cp,
                    record.volume
                );
                let resume = std::env::var_os(RESUME_KNOB).map(PathBuf::from);
                while !resume.as_ref().is_some_and(|f| f.exists()) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if resume.is_some_and(|f| fs::read(f).is_ok_and(|b| b.starts_with(b"fail"))) {
                    return Err(io::Error::other("test hook: the apply fails here"));
                }
            }
            let mut rest = entries;
            while !rest.is_empty() {
                // References to adjacent blocks (entries are in block order)
                // become one write: small blocks of a dense CP cost one
                // engine write per run instead of one per block.
                let mut planned: Vec<Planned> = Vec::new();
                let mut zeroes = Vec::new();
                let mut bytes = 0;
                let mut taken = 0;
                for e in rest {
                    if planned.len() + zeroes.len() >= APPLY_BATCH || bytes >= APPLY_BATCH_BYTES {
                        break;
                    }
                    taken += 1;
                    match *e {
                        CpEntry::Ref {
                            block,
                            count,
                            tid,
                            index,
                        } => {
                            let run = run_bytes(block, count, bs, record.size);
                            bytes += run.1 - run.0;
                            match planned.last_mut() {
                                Some(w) if w.end == run.0 && w.end - w.start < APPLY_WRITE => {
                                    w.end = run.1;
                                    w.parts.push((tid, index, run.0));
                                }
                                _ => planned.push(Planned {
                                    start: run.0,
                                    end: run.1,
                                    parts: vec![(tid, index, run.0)],
                                }),
                            }
                        }
                        CpEntry::Zero { block, count } => {
                            let (start, end) = run_bytes(block, count, bs, record.size);
                            zeroes.push((start, end - start));
                        }
                    }
                }
                rest = &rest[taken..];
                let mut writes = Vec::with_capacity(planned.len());
                for w in planned {
                    // Aligned: the replica's origin may be opened with O_DIRECT.
                    // Its parts cover it end to end: nothing to clear.
                    let mut data = AlignedBuf::for_overwrite((w.end - w.start) as usize);
                    for (i, &(tid, index, start)) in w.parts.iter().enumerate() {
                        let end = w.parts.get(i + 1).map_or(w.end, |p| p.2);
                        let into = &mut data[(start - w.start) as usize..(end - w.start) as usize];
                        staged.read_into(tid, index, start, into)?;
                    }
                    writes.push((w.start, data));
                }
                block_on(async {
                    try_join_all(writes.iter().map(|(o, d)| view.write(*o, d, false))).await?;
                    try_join_all(zeroes.iter().map(|&(o, l)| view.write_zeroes(o, l, false))).await
                })
                .map_err(engine)?;
            }
        }
        drop(staged);
        block_on(view.flush()).map_err(engine)?;
        let name = cp_snapshot(cp.cp);
        let generation = match volume.list_snapshots().into_iter().find(|s| s.name == name) {
            Some(s) => s.generation,
            None => {
                block_on(volume.create_snapshot(&name))
                    .map_err(engine)?
                    .snapshot
                    .generation
            }
        };
        record.cp_generation = Some(generation);
        // A failback's first CP overwrote every divergent block: done.
        record.resync = None;
        record.last_applied_cp = Some(cp.cp);
        record.applied_unix_ms = crate::engine::now_unix_ms();
        record.keep_from_tid = record.keep_from_tid.max(cp.keep_from_tid);
        let keep_cps = record.keep_cps.max(1) as usize;
        let keep_from = record.keep_from_tid;
        self.save(record)?;
        *lock(&self.image_lost_at) = None;
        self.staging.applied(cp.cp, keep_from)?;
        let cps = cp_snapshots(volume);
        let excess = cps.len().saturating_sub(keep_cps);
        for (_, name) in cps.into_iter().take(excess) {
            block_on(volume.delete_snapshot(&name)).map_err(engine)?;
        }
        Ok(())
    }

    fn status(&self, name: &str) -> serde_json::Value {
        let r = self.record();
        let session = lock(&self.session).as_ref().map(|a| a.peer.clone());
        let broken = self.broken();
        let state = if broken.is_some() {
            "broken"
        } else if r.promoted {
            "promoted"
        } else if r.resync.is_some() {
            "resyncing"
        } else if session.is_some() {
            "receiving"
        } else {
            "waiting"
        };
        serde_json::json!({
            "role": "destination",
            "volume": name,
            "source": format!("{}/{}", r.source_id, r.source_volume),
            "state": state,
            "error": broken,
            "peer": session,
            "last_cp": r.last_applied_cp,
            "last_cp_unix_ms": r.last_applied_cp.map(|_| r.applied_unix_ms),
            "lag_seconds": r.last_applied_cp.map(|_| crate::engine::now_unix_ms().saturating_sub(r.applied_unix_ms) as f64 / 1000.0),
            "keep_cps": r.keep_cps,
            "block_size": r.block_size,
            "staged_transfers": self.staging.len(),
            "bytes_received": self.bytes_received.load(Ordering::Relaxed),
            "failback_base_cp": r.resync.as_ref().map(|f| f.base_cp),
            "failback_snapshot": r.resync.as_ref().map(|f| f.snapshot.clone()),
        })
    }
}

/// A CP being applied by a thread of its own while the session goes on
/// receiving ([`Receiver::receive`]).
struct Applying {
    cp: u64,
    thread: JoinHandle<io::Result<()>>,
    /// Readable once the thread ended (an eventfd), so that the session
    /// waits for the source and the apply at once.
    ended: OwnedFd,
}

impl Applying {
    fn start(
        replica: Arc<Replica>,
        volume: Arc<Volume>,
        cp: wire::CpCommit,
        name: &str,
    ) -> io::Result<Applying> {
        // SAFETY: plain syscall; the descriptor is owned at once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let ended = unsafe { OwnedFd::from_raw_fd(fd) };
        let signal = ended.try_clone()?;
        let name = name.to_string();
        let number = cp.cp;
        let thread = std::thread::Builder::new()
            .name(format!("repl-apply-{name}"))
            .spawn(move || {
                // Signalled however the apply ends, a panic included.
                struct Ended(OwnedFd);
                impl Drop for Ended {
                    fn drop(&mut self) {
                        let one = 1u64.to_ne_bytes();
                        // SAFETY: writes 8 bytes from a live buffer to an eventfd.
                        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
                    }
                }
                let _ended = Ended(signal);
                replica.apply(&volume, &cp)?;
                log::info!("replica {name}: consistency point {} applied", cp.cp);
                Ok(())
            })?;
        Ok(Applying {
            cp: number,
            thread,
            ended,
        })
    }

    /// Waits until the source sent something (true) or the apply ended
    /// (false). No idle timeout meanwhile: the source may well be silent
    /// while it waits for this CP's acknowledgement.
    fn wait(&self, stream: &TcpStream) -> io::Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.ended.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a live array of two pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(fds[1].revents == 0)
    }

    /// Waits for the apply to end; the CP applied.
    fn join(self) -> io::Result<u64> {
        match self.thread.join() {
            Ok(r) => r.map(|()| self.cp),
            Err(_) => Err(io::Error::other(format!(
                "applying consistency point {} panicked",
                self.cp
            ))),
        }
    }
}

impl Receiver {
    /// Loads every replica (finishing CPs whose apply a crash cut short) and,
    /// with `listen`, starts accepting sources.
    pub fn open(
        registry: Arc<Registry>,
        data_dir: &Path,
        listen: Option<&str>,
        key: Option<Vec<u8>>,
    ) -> anyhow::Result<Arc<Receiver>> {
        let dir = data_dir.join("replication").join("dest");
        fs::create_dir_all(&dir)?;
        let mut replicas = BTreeMap::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let (name, replica) = Replica::recover(&registry, &dir, &path);
            replicas.insert(name, Arc::new(replica));
        }
        let (listener, local_addr) = match listen {
            Some(addr) => {
                if key.is_none() {
                    anyhow::bail!(
                        "--replication-listen needs the shared key: give --replication-key-file PATH \
                         (or put it in {})",
                        data_dir.join("replication.key").display()
                    );
                }
                let l = TcpListener::bind(addr).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot listen for replication on {addr}: {e}; pick another address"
                    )
                })?;
                let a = l.local_addr()?;
                log::info!("replication listening on {a}");
                (Some(l), Some(a))
            }
            None => (None, None),
        };
        let receiver = Arc::new(Receiver {
            registry,
            dir,
            key,
            replicas: Mutex::new(replicas),
            listener,
            local_addr,
            stopping: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            handshaking: Arc::new(AtomicUsize::new(0)),
            connections: Arc::new(AtomicUsize::new(0)),
            next_conn_id: AtomicU64::new(0),
            unpaired: Mutex::new(HashMap::new()),
            refusals: Mutex::new(HashMap::new()),
            old_source: OnceLock::new(),
        });
        if let Some(l) = &receiver.listener {
            let l = l.try_clone()?;
            let r = receiver.clone();
            let t = std::thread::Builder::new()
                .name("repl-accept".into())
                .spawn(move || r.accept(l))?;
            lock(&receiver.threads).push(t);
        }
        Ok(receiver)
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Lets failbacks reach this daemon's links (before this, one is refused).
    pub fn set_old_source(&self, old: Weak<dyn OldSource>) {
        let _ = self.old_source.set(old);
    }

    /// Replica `volume`'s record (also once promoted).
    pub fn record(&self, volume: &str) -> Option<ReplicaRecord> {
        Some(lock(&self.replicas).get(volume)?.record())
    }

    /// The address of the source connected to an unpromoted replica now,
    /// and the source's volume name.
    pub fn receiving_from(&self, volume: &str) -> Option<(String, String)> {
        let replicas = lock(&self.replicas);
        let replica = replicas.get(volume)?;
        let record = replica.record();
        let peer = lock(&replica.session).as_ref()?.peer.clone();
        (!record.promoted).then_some((peer, record.source_volume))
    }

    fn accept(self: Arc<Self>, listener: TcpListener) {
        for conn in listener.incoming() {
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            let Ok(stream) = conn else { continue };
            let handshaking = self.handshaking.load(Ordering::Acquire);
            let connections = self.connections.load(Ordering::Acquire);
            if handshaking >= MAX_HANDSHAKES || connections >= MAX_CONNECTIONS {
                let addr = stream.peer_addr().ok();
                self.refused(
                    addr.map(|a| a.ip()),
                    &addr.map_or_else(|| "?".into(), |a| a.to_string()),
                    format!(
                        "refused the connection at once: {handshaking} connections are in their \
                         handshake and {connections} open (limits {MAX_HANDSHAKES} and \
                         {MAX_CONNECTIONS})"
                    ),
                );
                continue;
            }
            let counted = Counted::new(&self.connections, &self.handshaking);
            let r = self.clone();
            let spawned = std::thread::Builder::new()
                .name("repl-recv".into())
                .spawn(move || r.serve(stream, counted));
            match spawned {
                Ok(t) => {
                    let mut threads = lock(&self.threads);
                    threads.retain(|t| !t.is_finished());
                    threads.push(t);
                }
                Err(e) => log::error!("replication: cannot start a thread: {e}"),
            }
        }
    }

    /// Logs why a connection from `ip` was refused, once per source
    /// address until the reason changes or a session starts.
    fn refused(&self, ip: Option<IpAddr>, peer: &str, why: String) {
        let mut seen = lock(&self.refusals);
        if let Some(ip) = ip {
            if seen.get(&ip) == Some(&why) {
                log::debug!("replication: {peer}: {why}");
                return;
            }
            if seen.len() >= 1024 {
                seen.clear();
            }
            seen.insert(ip, why.clone());
        }
        log::warn!(
            "replication: {peer}: {why} (logged once per source address until the reason \
             changes or a session starts)"
        );
    }

    /// Serves one connection; `counted` holds its place in the limits
    /// until it ends.
    fn serve(&self, stream: TcpStream, mut counted: Counted) {
        let addr = stream.peer_addr().ok();
        let ip = addr.map(|a| a.ip());
        let peer = addr.map_or_else(|| "?".to_string(), |a| a.to_string());
        let key = self.key.as_ref().expect("listening needs a key");
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(s) => lock(&self.unpaired).insert(id, s),
            Err(e) => return log::warn!("replication: {peer}: {e}"),
        };
        let unpaired = Unpaired(&self.unpaired, id);
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        let _ = stream.set_nodelay(true);
        let _ = wire::keepalive(&stream, KEEPALIVE_IDLE);
        // Everything up to the pairing shares one deadline: a peer that
        // trickles bytes cannot hold a connection slot longer.
        let mut hs = wire::Deadline {
            stream: &stream,
            until: Instant::now() + HANDSHAKE_TIMEOUT,
        };
        let mut sealed = match wire::authenticate_source(&mut hs, key) {
            Ok(s) => {
                // It proved the key: the handshake slots are for strangers.
                counted.authenticated();
                s
            }
            Err(e) => {
                let why = if e.kind() == io::ErrorKind::PermissionDenied {
                    format!("refused the connection: {e}; nothing was written")
                } else {
                    format!("handshake failed: {e}")
                };
                return self.refused(ip, &peer, why);
            }
        };
        let open: wire::Open = match sealed
            .expect(&mut hs, Kind::Open)
            .and_then(|p| wire::from_json(&p))
            .and_then(|o: wire::Open| {
                if o.resync.is_some() && sealed.version() < wire::RESYNC_VERSION {
                    return Err(invalid(format!(
                        "a failback resync needs protocol version {}, the source spoke {}",
                        wire::RESYNC_VERSION,
                        sealed.version()
                    )));
                }
                Ok(o)
            }) {
            Ok(o) => o,
            Err(e) => return self.refused(ip, &peer, e.to_string()),
        };
        let attached = stream.try_clone().map(|cut| Attached {
            id,
            peer: peer.clone(),
            cut,
        });
        let replica = attached
            .map_err(|e| e.to_string())
            .and_then(|a| self.pair(&open, a));
        drop(unpaired);
        let replica = match replica {
            Ok(r) => r,
            Err(msg) => {
                let _ = sealed.send(&mut hs, Kind::Refused, msg.as_bytes());
                let why = format!(
                    "refused {} of source {}: {msg}",
                    open.source_volume, open.source_id
                );
                return self.refused(ip, &peer, why);
            }
        };
        if let Some(ip) = ip {
            lock(&self.refusals).remove(&ip);
        }
        let name = open.dest_volume.clone();
        let result = self.session(&replica, &name, &peer, &stream, &mut sealed);
        {
            let mut attached = lock(&replica.session);
            if attached.as_ref().is_some_and(|a| a.id == id) {
                *attached = None;
            }
        }
        replica.released.notify_all();
        match result {
            Ok(()) => log::info!("replica {name}: {peer} disconnected"),
            Err(e) => {
                log::warn!("replica {name}: dropping the connection from {peer}: {e}");
                if e.kind() == io::ErrorKind::InvalidData {
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = sealed.send(&mut &stream, Kind::Error, e.to_string().as_bytes());
                }
            }
        }
    }

    fn session(
        &self,
        replica: &Arc<Replica>,
        name: &str,
        peer: &str,
        mut stream: &TcpStream,
        sealed: &mut wire::Session,
    ) -> io::Result<()> {
        let record = replica.record();
        let opened = wire::Opened {
            last_applied_cp: record.last_applied_cp,
            next_tid: replica.next_tid(),
            replica_id: record.replica_id.clone(),
            resync_changed: record
                .resync
                .as_ref()
                .map(|f| f.changed.clone())
                .unwrap_or_default(),
        };
        stream.set_write_timeout(None)?;
        sealed.send(&mut stream, Kind::Opened, &wire::to_json(&opened))?;
        // The source speaks at least every few seconds (a `Ping` when
        // idle); silence this long means it is gone (half-open).
        stream.set_read_timeout(Some(SESSION_IDLE_TIMEOUT))?;
        let stage_delay = std::env::var(STAGE_DELAY_KNOB)
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        log::info!(
            "replica {name}: receiving from {} of {} at {peer} (last applied CP {:?})",
            record.source_volume,
            record.source_id,
            record.last_applied_cp
        );
        let mut applying: Option<Applying> = None;
        let result = self.receive(replica, name, stream, sealed, stage_delay, &mut applying);
        // The replica is let go only once its apply ended (a restart of
        // the source waits for that, as promote does).
        match applying.map(Applying::join) {
            Some(Err(e)) if result.is_ok() => Err(e),
            _ => result,
        }
    }

    /// The session's frames until the source leaves. A CP is applied by a
    /// thread of its own ([`Applying`]) while this one goes on staging the
    /// next CP's transfers, so the source keeps shipping its log instead of
    /// waiting (and overflowing it) through the apply; the CP's `CpAck`
    /// goes out once it is applied.
    fn receive(
        &self,
        replica: &Arc<Replica>,
        name: &str,
        mut stream: &TcpStream,
        sealed: &mut wire::Session,
        stage_delay: Option<u64>,
        applying: &mut Option<Applying>,
    ) -> io::Result<()> {
        loop {
            if let Some(a) = applying.as_ref() {
                if !a.wait(stream)? {
                    let cp = applying.take().expect("applying").join()?;
                    sealed.send(&mut stream, Kind::CpAck, &wire::u64_payload(cp))?;
                    continue;
                }
            }
            let (kind, payload) = match sealed.recv(&mut stream) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "nothing received for {} s: the source is gone",
                            SESSION_IDLE_TIMEOUT.as_secs()
                        ),
                    ))
                }
                r => r?,
            };
            if self.stopping.load(Ordering::Acquire) {
                return Ok(());
            }
            if replica.record().promoted {
                let msg = format!("volume {name} was promoted; it accepts no more replication");
                sealed.send(&mut stream, Kind::Error, msg.as_bytes())?;
                return Err(io::Error::other(msg));
            }
            replica.bytes_received.fetch_add(
                (payload.len() + wire::HEADER + wire::TAG) as u64,
                Ordering::Relaxed,
            );
            match kind {
                Kind::Ping => {}
                Kind::Transfer => {
                    let tid = replica.store_transfer(&payload)?;
                    if let Some(ms) = stage_delay {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                    sealed.send(&mut stream, Kind::TransferAck, &wire::u64_payload(tid))?;
                }
                Kind::CpCommit => {
                    // CPs apply one at a time, in order.
                    if let Some(a) = applying.take() {
                        let done = a.join()?;
                        sealed.send(&mut stream, Kind::CpAck, &wire::u64_payload(done))?;
                    }
                    let cp = wire::decode_cp(&payload)?;
                    let applied = replica.record().last_applied_cp;
                    if applied.is_none_or(|a| cp.cp > a) {
                        replica.check_cp(&cp)?;
                        replica.staging.stage_cp(cp.cp, &payload)?;
                        let vol = self
                            .registry
                            .volume(name)
                            .map_err(|e| io::Error::other(e.message))?;
                        *applying = Some(Applying::start(replica.clone(), vol, cp, name)?);
                    } else {
                        sealed.send(&mut stream, Kind::CpAck, &wire::u64_payload(cp.cp))?;
                    }
                }
                k => return Err(invalid(format!("unexpected {k:?} frame"))),
            }
        }
    }

    /// Finds or creates the replica `open` asks for, enforcing the pairing,
    /// and attaches the connection to it. A replica still attached to an
    /// older connection of the same source (one that went silent: the
    /// source lost power or its network) is taken over: that connection is
    /// ended and, once its thread let go, this one receives.
    fn pair(&self, open: &wire::Open, attached: Attached) -> Result<Arc<Replica>, String> {
        let replica = self.find_or_create(open)?;
        let name = &open.dest_volume;
        let deadline = Instant::now() + TAKEOVER_WAIT;
        let mut current = lock(&replica.session);
        if let Some(old) = current.as_ref() {
            log::warn!(
                "replica {name}: {} connects again while {} is still attached; ending the \
                 older connection (its source restarted or lost its network)",
                attached.peer,
                old.peer
            );
            let _ = old.cut.shutdown(std::net::Shutdown::Both);
        }
        while let Some(old) = current.as_ref() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stopping.load(Ordering::Acquire) {
                return Err(format!(
                    "volume {name} is still receiving from {} (busy applying a consistency \
                     point); retry later",
                    old.peer
                ));
            }
            current = replica
                .released
                .wait_timeout(current, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *current = Some(attached);
        drop(current);
        let mut rec = replica.record();
        if rec.keep_cps != open.keep_cps
            || rec.block_size != open.block_size
            || rec.replica_id.is_empty()
        {
            rec.keep_cps = open.keep_cps;
            rec.block_size = open.block_size;
            if rec.replica_id.is_empty() {
                rec.replica_id = new_replica_id();
            }
            replica.save(rec).map_err(|e| e.to_string())?;
        }
        Ok(replica)
    }

    fn find_or_create(&self, open: &wire::Open) -> Result<Arc<Replica>, String> {
        let name = &open.dest_volume;
        validate_name("volume", name).map_err(|e| e.message)?;
        let mut replicas = lock(&self.replicas);
        if let Some(base) = &open.resync {
            // A replica of this source already (a failback cut short, or
            // done and its acknowledgement lost) carries on as any replica.
            if replicas.get(name).is_none_or(|r| r.record().promoted) {
                return self.failback(&mut replicas, open, base);
            }
        }
        let replica = match replicas.get(name) {
            Some(r) => {
                if let Some(why) = r.broken() {
                    return Err(format!("replica {name} is broken: {why}"));
                }
                let rec = r.record();
                if rec.source_id != open.source_id || rec.source_volume != open.source_volume {
                    return Err(format!(
                        "volume {name} is the replica of volume {} of source {}; it accepts no \
                         other source (promote and delete it, or pick another destination volume)",
                        rec.source_volume, rec.source_id
                    ));
                }
                if rec.promoted {
                    return Err(format!(
                        "volume {name} was promoted to a normal volume and accepts no more \
                         replication; pick another destination volume"
                    ));
                }
                if rec.size != open.size {
                    return Err(format!(
                        "volume {name} has {} bytes, the source {}; pick another destination \
                         volume",
                        rec.size, open.size
                    ));
                }
                r.clone()
            }
            None => {
                if self.registry.volume(name).is_ok() {
                    return Err(format!(
                        "volume {name} exists on the destination and is not a replica; pick \
                         another destination volume or delete it there"
                    ));
                }
                let record = ReplicaRecord {
                    volume: name.clone(),
                    source_id: open.source_id.clone(),
                    source_volume: open.source_volume.clone(),
                    size: open.size,
                    block_size: open.block_size,
                    keep_cps: open.keep_cps,
                    last_applied_cp: None,
                    applied_unix_ms: 0,
                    keep_from_tid: 0,
                    promoted: false,
                    replica_id: new_replica_id(),
                    cp_generation: None,
                    resync: None,
                };
                self.install_replica(&mut replicas, record)?
            }
        };
        if self.registry.volume(name).is_err() {
            // Deleted under us (or never created): whatever it held is gone.
            let mut rec = replica.record();
            if rec.last_applied_cp.is_some() {
                rec.last_applied_cp = None;
                replica.save(rec).map_err(|e| e.to_string())?;
            }
            self.registry
                .create_volume(name, open.size, Some(open.chunk_size), None, None, None)
                .map_err(|e| format!("cannot create volume {name}: {}", e.message))?;
            log::info!(
                "replica {name}: created for {} of {}",
                open.source_volume,
                open.source_id
            );
        }
        Ok(replica)
    }

    /// Makes `record`'s volume a replica here: its record saved, its staging
    /// empty (what an earlier life as a replica staged is stale).
    fn install_replica(
        &self,
        replicas: &mut BTreeMap<String, Arc<Replica>>,
        record: ReplicaRecord,
    ) -> Result<Arc<Replica>, String> {
        let name = record.volume.clone();
        let replica = Arc::new(Replica::new(
            &self.dir,
            self.dir.join(format!("{name}.json")),
            record.clone(),
        ));
        replica.staging.reset(true).map_err(|e| e.to_string())?;
        replica.save(record).map_err(|e| e.to_string())?;
        replicas.insert(name, replica.clone());
        Ok(replica)
    }

    /// Failback onto this daemon's volume `name`, the old source of the
    /// replica now sending: this daemon's link checks the base and keeps the
    /// volume's divergent image as a snapshot, then the volume becomes a
    /// replica of the new source at the base CP, its own changes since the
    /// base recorded for the first CP to overwrite. The replica record is the
    /// commit point: written before the link is dropped (a restart between
    /// the two drops the link, see [`super::Replication::start`]).
    fn failback(
        &self,
        replicas: &mut BTreeMap<String, Arc<Replica>>,
        open: &wire::Open,
        base: &wire::ResyncBase,
    ) -> Result<Arc<Replica>, String> {
        let name = &open.dest_volume;
        let old = self
            .old_source
            .get()
            .and_then(Weak::upgrade)
            .ok_or("the daemon is starting or stopping; retry")?;
        let size = self.registry.volume(name).map_err(|e| e.message)?.size();
        if size != open.size {
            return Err(format!(
                "volume {name} has {size} bytes, the source {}; they share no base",
                open.size
            ));
        }
        let (changed, snapshot) = old.failback_prepare(name, base)?;
        let record = ReplicaRecord {
            volume: name.clone(),
            source_id: open.source_id.clone(),
            source_volume: open.source_volume.clone(),
            size,
            block_size: open.block_size,
            keep_cps: open.keep_cps,
            last_applied_cp: Some(base.cp),
            applied_unix_ms: crate::engine::now_unix_ms(),
            keep_from_tid: 0,
            promoted: false,
            replica_id: new_replica_id(),
            cp_generation: None,
            resync: Some(PendingResync {
                base_cp: base.cp,
                changed,
                snapshot: snapshot.clone(),
            }),
        };
        let replica = self.install_replica(replicas, record)?;
        old.failback_done(name);
        log::info!(
            "volume {name}: failback from {} of {}: a replica again from consistency point {}; \
             its own changes since then are kept in snapshot {snapshot}",
            open.source_volume,
            open.source_id,
            base.cp
        );
        Ok(replica)
    }

    /// The snapshot NBD clients read for `volume` if it is an unpromoted
    /// replica: `Some(Ok(cp-N))`, or `Some(Err)` before its first CP.
    pub fn export_snapshot(&self, volume: &str) -> Option<Result<String, String>> {
        let replica = lock(&self.replicas).get(volume).cloned()?;
        Self::newest_cp(volume, &replica)
    }

    /// `open` called with [`Receiver::export_snapshot`] if `volume` is an
    /// unpromoted replica, at a moment its newest CP snapshot exists: an
    /// apply that dropped the previous one (see `drop_unread_cps`) is
    /// waited for, and none drops this one while `open` makes its view.
    pub fn open_export<T>(
        &self,
        volume: &str,
        open: impl FnOnce(Result<String, String>) -> T,
    ) -> Option<T> {
        let replica = lock(&self.replicas).get(volume).cloned()?;
        let _image = replica.cp_image.read().unwrap_or_else(|e| e.into_inner());
        Self::newest_cp(volume, &replica).map(open)
    }

    fn newest_cp(volume: &str, replica: &Replica) -> Option<Result<String, String>> {
        if let Some(why) = replica.broken() {
            return Some(Err(format!("replica {volume} is broken: {why}")));
        }
        let r = replica.record();
        if r.promoted {
            return None;
        }
        if r.resync.is_some() {
            return Some(Err(format!(
                "replica {volume} is receiving a failback resync and has no consistency point \
                 yet; its own image is kept in snapshot {}",
                r.resync.map(|f| f.snapshot).unwrap_or_default()
            )));
        }
        if let Some(n) = *lock(&replica.image_lost_at) {
            return Some(Err(format!(
                "replica {volume} has no consistency point to serve: applying CP {n} failed \
                 after the previous one, which nobody read, was deleted; the next CP applied \
                 (its source sends one when it reconnects) or a restart of this daemon brings \
                 it back; `snapblk replicate status` and the log say why the apply failed"
            )));
        }
        Some(
            r.last_applied_cp
                .map(cp_snapshot)
                .ok_or_else(|| format!("replica {volume} has no consistency point yet")),
        )
    }

    /// Why replica `volume` is broken, if it is (see [`Replica::recover`]).
    pub fn broken(&self, volume: &str) -> Option<String> {
        lock(&self.replicas).get(volume)?.broken()
    }

    pub fn status(&self, volume: Option<&str>) -> Vec<serde_json::Value> {
        lock(&self.replicas)
            .iter()
            .filter(|(n, _)| volume.is_none_or(|v| v == n.as_str()))
            .map(|(n, r)| r.status(n))
            .collect()
    }

    /// `replicate promote`: the replica becomes a normal volume whose live
    /// image is its last applied CP.
    pub fn promote(&self, volume: &str) -> Result<serde_json::Value, String> {
        let replica = lock(&self.replicas)
            .get(volume)
            .cloned()
            .ok_or_else(|| format!("volume {volume} is not a replica on this daemon"))?;
        if let Some(why) = replica.broken() {
            return Err(format!("replica {volume} is broken: {why}"));
        }
        let _applying = lock(&replica.apply);
        let mut record = replica.record();
        if record.promoted {
            return Err(format!("volume {volume} was already promoted"));
        }
        record.promoted = true;
        let last = record.last_applied_cp;
        replica.save(record).map_err(|e| e.to_string())?;
        if let Some(a) = lock(&replica.session).as_ref() {
            let _ = a.cut.shutdown(std::net::Shutdown::Both);
        }
        if let Err(e) = replica.staging.reset(false) {
            log::warn!("cannot remove {}: {e}", replica.staging.dir().display());
        }
        log::info!(
            "replica {volume} promoted at consistency point {last:?}; it is a normal volume now"
        );
        Ok(serde_json::json!({ "volume": volume, "promoted": true, "last_cp": last }))
    }

    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(l) = &self.listener {
            // shutdown(2) on a listening socket wakes a thread blocked in accept.
            // SAFETY: plain syscall on a descriptor we own.
            unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(l), libc::SHUT_RDWR) };
        }
        for r in lock(&self.replicas).values() {
            if let Some(a) = lock(&r.session).as_ref() {
                let _ = a.cut.shutdown(std::net::Shutdown::Both);
            }
            // A connection waiting to take a replica over gives up.
            r.released.notify_all();
        }
        for s in lock(&self.unpaired).values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Takes a connection off [`Receiver::unpaired`] when it is paired or ends.
struct Unpaired<'a>(&'a Mutex<HashMap<u64, TcpStream>>, u64);

impl Drop for Unpaired<'_> {
    fn drop(&mut self) {
        lock(self.0).remove(&self.1);
    }
}

/// A connection counted against the limits until it ends.
struct Counted {
    all: Arc<AtomicUsize>,
    handshaking: Option<Arc<AtomicUsize>>,
}

impl Counted {
    fn new(all: &Arc<AtomicUsize>, handshaking: &Arc<AtomicUsize>) -> Counted {
        all.fetch_add(1, Ordering::AcqRel);
        handshaking.fetch_add(1, Ordering::AcqRel);
        Counted {
            all: all.clone(),
            handshaking: Some(handshaking.clone()),
        }
    }

    /// The peer proved the key: it no longer counts as handshaking.
    fn authenticated(&mut self) {
        if let Some(h) = self.handshaking.take() {
            h.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.authenticated();
        self.all.fetch_sub(1, Ordering::AcqRel);
    }
}

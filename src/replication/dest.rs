//! The destination end: the listener, one thread per authenticated source
//! connection, the staging area and the atomic application of CPs.
//!
//! Per replica volume `DEST` (all under `DATA_DIR/replication/dest/`):
//! - `DEST.json`: the pairing (source identity and volume; a replica paired
//!   with one source refuses every other), the last applied CP, whether it
//!   was promoted;
//! - `DEST.staging/t-<tid>`: one file per transfer (crc32c + payload),
//!   acknowledged once written; the file's piece table is the transfer ID ->
//!   block location map, rebuilt from the files at start (a file failing its
//!   check is dropped: no durable CP record refers to it);
//! - `DEST.staging/cp-<n>.rec`: a CP's block set, made durable together
//!   with every transfer staged before it (one sync per CP, not per
//!   transfer) before it is applied. References are trusted within one
//!   session only, so a transfer lost in a crash before its CP record was
//!   durable is never referred to: the source resyncs from its dirty map.
//!
//! Applying CP n writes every block of its set into the replica's live
//! volume, flushes, takes snapshot `cp-n`, then records n as applied. Readers
//! never see the live volume: NBD exports of `DEST` serve the newest `cp-n`
//! snapshot until promotion, so they see exactly one CP. A crash mid-apply
//! leaves `cp-n.rec` and the transfers it references; the restart applies
//! it again from the start (each block is simply rewritten), before any
//! export is served.
//!
//! Test hooks (never set them outside tests): with
//! `SNAPBLK_TEST_PAUSE_APPLY=N` in its environment the daemon stops halfway
//! through applying CP N (it logs "pausing in the middle of applying") and
//! waits there forever, so a test can kill it at that instant; with
//! `SNAPBLK_TEST_STAGE_DELAY_MS=N` it waits N ms before acknowledging each
//! transfer, a slow link that any writer outpaces.

use super::wire::{self, CpEntry, Kind, Piece};
use crate::control::registry::validate_name;
use crate::control::Registry;
use crate::engine::Volume;
use crate::runtime::{block_on, AlignedBuf};
use futures::future::try_join_all;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

const PAUSE_KNOB: &str = "SNAPBLK_TEST_PAUSE_APPLY";
const STAGE_DELAY_KNOB: &str = "SNAPBLK_TEST_STAGE_DELAY_MS";
/// CP entries applied concurrently, and the bytes they may hold in memory.
const APPLY_BATCH: usize = 128;
const APPLY_BATCH_BYTES: u64 = 16 << 20;

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
}

pub struct Replica {
    staging: PathBuf,
    record_path: PathBuf,
    record: Mutex<ReplicaRecord>,
    /// Held while a CP is applied (promote waits for it).
    apply: Mutex<()>,
    /// Transfer id -> its pieces (offsets into the staged payload).
    index: Mutex<BTreeMap<u64, Vec<Piece>>>,
    /// Transfers staged since the last CP record, not yet synced.
    unsynced: Mutex<Vec<fs::File>>,
    session: Mutex<Option<(String, TcpStream)>>,
    bytes_received: AtomicU64,
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
    /// The last refusal logged per source address: a source retries every
    /// second, and one line per outage is enough.
    refusals: Mutex<HashMap<IpAddr, String>>,
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

/// Writes `crc32c(payload) | payload` to `path`; returns the file, to make
/// durable with [`sync_staged`].
fn write_staged(path: &Path, payload: &[u8]) -> io::Result<fs::File> {
    let mut f = fs::File::create(path)?;
    f.write_all(&crc32c::crc32c(payload).to_le_bytes())?;
    f.write_all(payload)?;
    Ok(f)
}

/// Makes staged files and their names in `staging` durable.
fn sync_staged(staging: &Path, files: &[fs::File]) -> io::Result<()> {
    for f in files {
        f.sync_data()?;
    }
    fs::File::open(staging)?.sync_all()
}

/// Reads a staged file back; `None` if it fails its check.
fn read_staged(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let bytes = fs::read(path)?;
    if bytes.len() < 4 {
        return Ok(None);
    }
    let (crc, payload) = bytes.split_at(4);
    if crc32c::crc32c(payload) != u32::from_le_bytes(crc.try_into().unwrap()) {
        return Ok(None);
    }
    Ok(Some(payload.to_vec()))
}

fn transfer_file(staging: &Path, tid: u64) -> PathBuf {
    staging.join(format!("t-{tid:016x}"))
}

fn cp_file(staging: &Path, cp: u64) -> PathBuf {
    staging.join(format!("cp-{cp:016x}.rec"))
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

impl Replica {
    fn record(&self) -> ReplicaRecord {
        lock(&self.record).clone()
    }

    fn save(&self, record: ReplicaRecord) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&record).expect("records serialize");
        crate::backend::file::replace_atomically(&self.record_path, &bytes)?;
        *lock(&self.record) = record;
        Ok(())
    }

    /// Loads the staged transfers (dropping any that fail their check) and
    /// returns the staged CP records not applied yet, oldest first.
    fn load_staging(&self) -> io::Result<Vec<wire::CpCommit>> {
        let record = self.record();
        let mut pending = Vec::new();
        for entry in fs::read_dir(&self.staging)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let parsed = read_staged(&path)?;
            let keep = if let Some(hex) = name.strip_prefix("t-") {
                let tid = u64::from_str_radix(hex, 16).ok();
                match (tid, parsed.map(|p| wire::decode_transfer(&p, record.size))) {
                    (Some(tid), Some(Ok((id, pieces))))
                        if id == tid && tid >= record.keep_from_tid =>
                    {
                        lock(&self.index).insert(tid, pieces);
                        true
                    }
                    _ => false,
                }
            } else if name.starts_with("cp-") {
                match parsed.map(|p| wire::decode_cp(&p)) {
                    Some(Ok(cp)) if record.last_applied_cp.is_none_or(|a| cp.cp > a) => {
                        pending.push(cp);
                        true
                    }
                    _ => false,
                }
            } else {
                false
            };
            if !keep {
                log::info!(
                    "replication: dropping stale staging file {}",
                    path.display()
                );
                fs::remove_file(&path)?;
            }
        }
        pending.sort_by_key(|c| c.cp);
        Ok(pending)
    }

    fn next_tid(&self) -> u64 {
        let staged = lock(&self.index).keys().next_back().map_or(0, |t| t + 1);
        staged.max(self.record().keep_from_tid)
    }

    /// Checks and stages a transfer; returns its id. It is made durable
    /// with the next CP record ([`Replica::stage_cp`]), the first thing that
    /// can refer to it after a crash: one sync per CP, not per transfer.
    fn store_transfer(&self, payload: &[u8]) -> io::Result<u64> {
        let (tid, pieces) = wire::decode_transfer(payload, self.record().size)?;
        let f = write_staged(&transfer_file(&self.staging, tid), payload)?;
        lock(&self.unsynced).push(f);
        lock(&self.index).insert(tid, pieces);
        Ok(tid)
    }

    /// Makes every staged transfer durable, then CP record `cp`: a crash
    /// after this applies the CP again from staging.
    fn stage_cp(&self, cp: u64, payload: &[u8]) -> io::Result<()> {
        let mut files = std::mem::take(&mut *lock(&self.unsynced));
        files.push(write_staged(&cp_file(&self.staging, cp), payload)?);
        sync_staged(&self.staging, &files)
    }

    /// Checks that every entry of `cp` lies inside the volume and every
    /// reference names a staged piece that covers its blocks.
    fn check_cp(&self, cp: &wire::CpCommit) -> io::Result<()> {
        let size = self.record().size;
        let bs = cp.block_size as u64;
        let blocks = size.div_ceil(bs);
        let index = lock(&self.index);
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
                let piece = index
                    .get(&tid)
                    .and_then(|p| p.get(i as usize))
                    .ok_or_else(|| {
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

    /// Reads the bytes of piece `i` of transfer `tid` that belong at
    /// `start..end` of the volume; `files` keeps staged files open across
    /// one apply.
    fn read_piece(
        &self,
        files: &mut HashMap<u64, fs::File>,
        tid: u64,
        i: u32,
        (start, end): (u64, u64),
    ) -> io::Result<AlignedBuf> {
        let piece = lock(&self.index)[&tid][i as usize].clone();
        let f = match files.entry(tid) {
            std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(fs::File::open(transfer_file(&self.staging, tid))?)
            }
        };
        // Aligned: the replica's origin may be opened with O_DIRECT.
        let mut data = AlignedBuf::zeroed((end - start) as usize);
        f.read_exact_at(&mut data, 4 + (piece.at as u64) + (start - piece.offset))?;
        Ok(data)
    }

    /// Applies a staged CP to `volume` (see the module doc); idempotent.
    fn apply(&self, volume: &Arc<Volume>, cp: &wire::CpCommit) -> io::Result<()> {
        let _applying = lock(&self.apply);
        let mut record = self.record();
        if record.promoted {
            return Err(io::Error::other("the replica was promoted"));
        }
        let bs = cp.block_size as u64;
        let view = volume.live();
        let mut files = HashMap::new();
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
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            let mut rest = entries;
            while !rest.is_empty() {
                let mut writes = Vec::new();
                let mut zeroes = Vec::new();
                let mut bytes = 0;
                let mut taken = 0;
                for e in rest.iter().take(APPLY_BATCH) {
                    if bytes >= APPLY_BATCH_BYTES {
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
                            writes.push((run.0, self.read_piece(&mut files, tid, index, run)?));
                        }
                        CpEntry::Zero { block, count } => {
                            let (start, end) = run_bytes(block, count, bs, record.size);
                            zeroes.push((start, end - start));
                        }
                    }
                }
                rest = &rest[taken..];
                block_on(async {
                    try_join_all(writes.iter().map(|(o, d)| view.write(*o, d, false))).await?;
                    try_join_all(zeroes.iter().map(|&(o, l)| view.write_zeroes(o, l, false))).await
                })
                .map_err(engine)?;
            }
        }
        drop(files);
        block_on(view.flush()).map_err(engine)?;
        let name = cp_snapshot(cp.cp);
        if !volume.list_snapshots().iter().any(|s| s.name == name) {
            block_on(volume.create_snapshot(&name)).map_err(engine)?;
        }
        record.last_applied_cp = Some(cp.cp);
        record.applied_unix_ms = crate::engine::now_unix_ms();
        record.keep_from_tid = record.keep_from_tid.max(cp.keep_from_tid);
        let keep_cps = record.keep_cps.max(1) as usize;
        let keep_from = record.keep_from_tid;
        self.save(record)?;
        fs::remove_file(cp_file(&self.staging, cp.cp))?;
        let dropped: Vec<u64> = {
            let mut index = lock(&self.index);
            let old: Vec<u64> = index.range(..keep_from).map(|(t, _)| *t).collect();
            old.iter().for_each(|t| {
                index.remove(t);
            });
            old
        };
        for tid in dropped {
            fs::remove_file(transfer_file(&self.staging, tid))?;
        }
        let mut cps: Vec<(u64, String)> = volume
            .list_snapshots()
            .into_iter()
            .filter_map(|s| {
                let n = s.name.strip_prefix("cp-")?.parse().ok()?;
                Some((n, s.name))
            })
            .collect();
        cps.sort();
        let excess = cps.len().saturating_sub(keep_cps);
        for (_, name) in cps.into_iter().take(excess) {
            block_on(volume.delete_snapshot(&name)).map_err(engine)?;
        }
        Ok(())
    }

    fn status(&self, name: &str) -> serde_json::Value {
        let r = self.record();
        let session = lock(&self.session).as_ref().map(|(peer, _)| peer.clone());
        let state = if r.promoted {
            "promoted"
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
            "peer": session,
            "last_cp": r.last_applied_cp,
            "last_cp_unix_ms": r.last_applied_cp.map(|_| r.applied_unix_ms),
            "lag_seconds": r.last_applied_cp.map(|_| crate::engine::now_unix_ms().saturating_sub(r.applied_unix_ms) as f64 / 1000.0),
            "keep_cps": r.keep_cps,
            "block_size": r.block_size,
            "staged_transfers": lock(&self.index).len(),
            "bytes_received": self.bytes_received.load(Ordering::Relaxed),
        })
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
            let record: ReplicaRecord = match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    log::error!(
                        "replication: cannot read {}: {e}; ignoring it",
                        path.display()
                    );
                    continue;
                }
            };
            let name = record.volume.clone();
            let replica = Arc::new(Replica {
                staging: dir.join(format!("{name}.staging")),
                record_path: path.clone(),
                record: Mutex::new(record),
                apply: Mutex::new(()),
                index: Mutex::new(BTreeMap::new()),
                unsynced: Mutex::new(Vec::new()),
                session: Mutex::new(None),
                bytes_received: AtomicU64::new(0),
            });
            fs::create_dir_all(&replica.staging)?;
            let pending = replica.load_staging()?;
            if !pending.is_empty() && !replica.record().promoted {
                match registry.volume(&name) {
                    Ok(vol) => {
                        for cp in pending {
                            log::info!(
                                "replica {name}: applying consistency point {} again (an apply was cut short)",
                                cp.cp
                            );
                            replica.check_cp(&cp)?;
                            replica.apply(&vol, &cp)?;
                        }
                    }
                    Err(e) => log::error!("replica {name}: {}", e.message),
                }
            }
            replicas.insert(name, replica);
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
            refusals: Mutex::new(HashMap::new()),
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

    fn accept(self: Arc<Self>, listener: TcpListener) {
        for conn in listener.incoming() {
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            let Ok(stream) = conn else { continue };
            let r = self.clone();
            let spawned = std::thread::Builder::new()
                .name("repl-recv".into())
                .spawn(move || r.serve(stream));
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

    fn serve(&self, mut stream: TcpStream) {
        let addr = stream.peer_addr().ok();
        let ip = addr.map(|a| a.ip());
        let peer = addr.map_or_else(|| "?".to_string(), |a| a.to_string());
        let key = self.key.as_ref().expect("listening needs a key");
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = stream.set_nodelay(true);
        if let Err(e) = wire::authenticate_source(&mut stream, key) {
            let why = if e.kind() == io::ErrorKind::PermissionDenied {
                format!("refused the connection: {e}; nothing was written")
            } else {
                format!("handshake failed: {e}")
            };
            return self.refused(ip, &peer, why);
        }
        let open: wire::Open =
            match wire::expect(&mut stream, Kind::Open).and_then(|p| wire::from_json(&p)) {
                Ok(o) => o,
                Err(e) => return self.refused(ip, &peer, e.to_string()),
            };
        let cut = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("replication: {peer}: {e}");
                return;
            }
        };
        let replica = match self.pair(&open, &peer, cut) {
            Ok(r) => r,
            Err(msg) => {
                let _ = wire::write_frame(&mut stream, Kind::Refused, msg.as_bytes());
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
        let result = self.session(&replica, &name, &peer, &mut stream);
        *lock(&replica.session) = None;
        match result {
            Ok(()) => log::info!("replica {name}: {peer} disconnected"),
            Err(e) => {
                log::warn!("replica {name}: dropping the connection from {peer}: {e}");
                if e.kind() == io::ErrorKind::InvalidData {
                    let _ = wire::write_frame(&mut stream, Kind::Error, e.to_string().as_bytes());
                }
            }
        }
    }

    fn session(
        &self,
        replica: &Arc<Replica>,
        name: &str,
        peer: &str,
        stream: &mut TcpStream,
    ) -> io::Result<()> {
        let record = replica.record();
        let opened = wire::Opened {
            last_applied_cp: record.last_applied_cp,
            next_tid: replica.next_tid(),
        };
        wire::write_frame(stream, Kind::Opened, &wire::to_json(&opened))?;
        stream.set_read_timeout(None)?;
        let stage_delay = std::env::var(STAGE_DELAY_KNOB)
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        log::info!(
            "replica {name}: receiving from {} of {} at {peer} (last applied CP {:?})",
            record.source_volume,
            record.source_id,
            record.last_applied_cp
        );
        loop {
            let (kind, payload) = match wire::read_frame(stream) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                r => r?,
            };
            if self.stopping.load(Ordering::Acquire) {
                return Ok(());
            }
            if replica.record().promoted {
                let msg = format!("volume {name} was promoted; it accepts no more replication");
                wire::write_frame(stream, Kind::Error, msg.as_bytes())?;
                return Err(io::Error::other(msg));
            }
            replica
                .bytes_received
                .fetch_add((payload.len() + wire::HEADER) as u64, Ordering::Relaxed);
            match kind {
                Kind::Transfer => {
                    let tid = replica.store_transfer(&payload)?;
                    if let Some(ms) = stage_delay {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                    wire::write_frame(stream, Kind::TransferAck, &wire::u64_payload(tid))?;
                }
                Kind::CpCommit => {
                    let cp = wire::decode_cp(&payload)?;
                    let applied = replica.record().last_applied_cp;
                    if applied.is_none_or(|a| cp.cp > a) {
                        replica.check_cp(&cp)?;
                        replica.stage_cp(cp.cp, &payload)?;
                        let vol = self
                            .registry
                            .volume(name)
                            .map_err(|e| io::Error::other(e.message))?;
                        replica.apply(&vol, &cp)?;
                        log::info!("replica {name}: consistency point {} applied", cp.cp);
                    }
                    wire::write_frame(stream, Kind::CpAck, &wire::u64_payload(cp.cp))?;
                }
                k => return Err(invalid(format!("unexpected {k:?} frame"))),
            }
        }
    }

    /// Finds or creates the replica `open` asks for, enforcing the pairing.
    /// `cut` is a handle on the connection, to end it (promote, shutdown).
    fn pair(&self, open: &wire::Open, peer: &str, cut: TcpStream) -> Result<Arc<Replica>, String> {
        let name = &open.dest_volume;
        validate_name("volume", name).map_err(|e| e.message)?;
        let mut replicas = lock(&self.replicas);
        let replica = match replicas.get(name) {
            Some(r) => {
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
                };
                let replica = Arc::new(Replica {
                    staging: self.dir.join(format!("{name}.staging")),
                    record_path: self.dir.join(format!("{name}.json")),
                    record: Mutex::new(record.clone()),
                    apply: Mutex::new(()),
                    index: Mutex::new(BTreeMap::new()),
                    unsynced: Mutex::new(Vec::new()),
                    session: Mutex::new(None),
                    bytes_received: AtomicU64::new(0),
                });
                fs::create_dir_all(&replica.staging).map_err(|e| e.to_string())?;
                replica.save(record).map_err(|e| e.to_string())?;
                replicas.insert(name.clone(), replica.clone());
                replica
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
        {
            let mut session = lock(&replica.session);
            if session.is_some() {
                return Err(format!(
                    "volume {name} is already receiving from another connection"
                ));
            }
            *session = Some((peer.to_string(), cut));
        }
        let mut rec = replica.record();
        if rec.keep_cps != open.keep_cps || rec.block_size != open.block_size {
            rec.keep_cps = open.keep_cps;
            rec.block_size = open.block_size;
            replica.save(rec).map_err(|e| e.to_string())?;
        }
        Ok(replica)
    }

    /// The snapshot NBD clients read for `volume` if it is an unpromoted
    /// replica: `Some(Ok(cp-N))`, or `Some(Err)` before its first CP.
    pub fn export_snapshot(&self, volume: &str) -> Option<Result<String, String>> {
        let replica = lock(&self.replicas).get(volume).cloned()?;
        let r = replica.record();
        if r.promoted {
            return None;
        }
        Some(
            r.last_applied_cp
                .map(cp_snapshot)
                .ok_or_else(|| format!("replica {volume} has no consistency point yet")),
        )
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
        let _applying = lock(&replica.apply);
        let mut record = replica.record();
        if record.promoted {
            return Err(format!("volume {volume} was already promoted"));
        }
        record.promoted = true;
        let last = record.last_applied_cp;
        replica.save(record).map_err(|e| e.to_string())?;
        if let Some((_, s)) = lock(&replica.session).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        lock(&replica.index).clear();
        if let Err(e) = fs::remove_dir_all(&replica.staging) {
            log::warn!("cannot remove {}: {e}", replica.staging.display());
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
            if let Some((_, s)) = lock(&r.session).as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

//! Replication: a crash-consistent mirror of a volume on another daemon that
//! receives each written block once (seed 003).
//!
//! Owns: replication links from this daemon's volumes ([`source`]: the write
//! hook, the bounded write log, the persistent dirty map in [`dirty`], the
//! sender thread), replicas on this daemon ([`dest`]: the listener, staging,
//! CP application, promotion), the wire protocol, key handshake and sealed
//! session ([`wire`]), the shared CPs of a replicated consistency group
//! ([`group`]), and `DATA_DIR/replication/`.
//!
//! Seed 003, as built:
//! - every write to a source volume is appended, after it reached the
//!   origin, to the link's log and shipped in transfers with increasing IDs;
//!   the destination stages each transfer, keeps transfer ID -> piece
//!   locations, and makes the staged transfers durable with the next CP's
//!   record (the first thing that refers to them);
//! - at each consistency point (CP: every `--cp-interval`, after a user's
//!   `snapshot create` of the source, on `replicate cp`) the source takes the
//!   internal snapshot `.repl-cp-N` and sends the CP's block set: a reference
//!   (transfer ID, piece index) for each block last written wholly by a piece
//!   already shipped, the block's content read from the CP snapshot for the
//!   others; the destination resolves references from staging. A block is
//!   a setting of the link (default 4 KiB, at most the volume's chunk), so
//!   small writes are whole blocks.
//!   Deviation that saves bandwidth: only the whole-block part of a write is
//!   logged. A partial block can never be referenced, so shipping it in the
//!   log as well would send its bytes twice;
//! - the destination applies a CP to its replica volume, then takes snapshot
//!   `cp-N`: readers (NBD exports of the replica) see that snapshot only, so
//!   they see exactly one CP; a crash mid-apply redoes it from staging;
//! - the first CP of a pair copies every allocated block from a
//!   point-in-time snapshot; a persistent write-intent dirty map (set before
//!   the first write to a clean block, cleared when a CP covering it is
//!   acknowledged) makes resync after a broken link, a full log or a kill -9
//!   of the source send only the changed blocks;
//! - failback (`replicate start --resync`, issue 13 part 6): a promoted
//!   replica replicates back to its old source, sending only what either
//!   side changed since the last CP both hold, agreed by identity and
//!   generation ([`Replication::failback_base`] on the new primary,
//!   [`dest::OldSource`] on the old source, which keeps its own image as a
//!   `failback-<time>` snapshot and becomes the replica).
//!
//! Must never: let a client write wait on the network (the log is bounded;
//! a write it cannot take goes whole at the next CP and `status` says
//! `log-overflow`); let a due CP wait for writes logged after it fell due; write anything on the destination before the peer proved
//! the shared key, or anything a frame that fails authentication carries;
//! write into a replica from a source it is not paired with;
//! let a reader of a replica see a mix of two CPs; log or show the key;
//! resync from a base either side cannot prove, or overwrite an old
//! source's changes before they are kept in a snapshot.

pub mod dest;
mod dirty;
mod group;
pub mod source;
mod staging;
pub mod wire;
mod write_log;

use crate::engine::WriteHook;
use crate::runtime::block_on;
use crate::volumes::{validate_name, ErrorKind, Registry, VolumeError};
use group::GroupCps;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use source::{FailbackBase, Link, LinkRecord};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// `replicate.start`'s fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicateStart {
    /// Empty with `group`.
    #[serde(default)]
    pub volume: String,
    /// Replicate every member of this consistency group with shared CPs;
    /// `to` is then `HOST:PORT` and each member goes to a destination
    /// volume of its own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `HOST:PORT/DESTVOL` (`HOST:PORT` with `group`)
    pub to: String,
    #[serde(default)]
    pub cp_interval_ms: Option<u64>,
    /// Absolute path of the shared key; default `DATA_DIR/replication.key`.
    #[serde(default)]
    pub key_file: Option<String>,
    /// CP snapshots the destination keeps; default 1.
    #[serde(default)]
    pub keep_cps: Option<u32>,
    /// Bytes of writes the log holds before falling back to the dirty map.
    #[serde(default)]
    pub max_log_bytes: Option<u64>,
    /// The replication block (tracking and shipping unit); default
    /// 4 KiB, at most the volume's chunk.
    #[serde(default)]
    pub block_size: Option<u64>,
    /// Failback: `volume` is a promoted replica and the target its old
    /// source; send only what either side changed since the last CP both
    /// hold (see [`Replication::failback_base`]).
    #[serde(default)]
    pub resync: bool,
}

pub const DEFAULT_CP_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_KEEP_CPS: u32 = 1;
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 20;
/// The replication block unless `--block-size` says otherwise (capped at
/// the volume's chunk). 4 KiB, by measurement (README, replication
/// benchmark): 4k random writes then ship 4K once by reference instead of
/// a whole chunk read from the CP snapshot at every CP.
pub const DEFAULT_BLOCK_SIZE: u64 = 4096;
/// The key both sides use when no key file is given.
pub const DEFAULT_KEY_FILE: &str = "replication.key";

/// The daemon's replication settings.
#[derive(Clone, Debug, Default)]
pub struct ReplicationConfig {
    /// Accept sources on this TCP address.
    pub listen: Option<String>,
    /// The shared key for incoming links [default: DATA_DIR/replication.key].
    pub key_file: Option<PathBuf>,
}

/// A running link and its hook in the volume's write path.
type Links = BTreeMap<String, (Arc<Link>, Arc<dyn WriteHook>)>;

pub struct Replication {
    registry: Arc<Registry>,
    dir: PathBuf,
    data_dir: PathBuf,
    source_id: String,
    links: Mutex<Links>,
    /// The rendezvous of each group replicated from here.
    groups: Mutex<BTreeMap<String, Arc<GroupCps>>>,
    receiver: Arc<dest::Receiver>,
}

/// This daemon's identity as a source (`DATA_DIR/replication/source-id`).
fn source_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("source-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id: String = wire::nonce()[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            crate::backend::file::replace_atomically(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

impl Replication {
    /// Loads replicas (finishing interrupted applies), starts the listener
    /// and resumes every link recorded in `DATA_DIR/replication/`. Call
    /// before any write can reach a volume.
    pub fn start(
        registry: Arc<Registry>,
        config: &ReplicationConfig,
    ) -> anyhow::Result<Arc<Replication>> {
        let data_dir = registry.data_dir().to_path_buf();
        let dir = data_dir.join("replication");
        std::fs::create_dir_all(&dir)?;
        let source_id = source_id(&dir)?;
        let key = match (&config.key_file, config.listen.is_some()) {
            (Some(path), _) => Some(wire::read_key(path).map_err(anyhow::Error::msg)?),
            (None, true) if data_dir.join(DEFAULT_KEY_FILE).exists() => {
                Some(wire::read_key(&data_dir.join(DEFAULT_KEY_FILE)).map_err(anyhow::Error::msg)?)
            }
            _ => None,
        };
        let receiver =
            dest::Receiver::open(registry.clone(), &data_dir, config.listen.as_deref(), key)?;
        let repl = Arc::new(Replication {
            registry,
            dir,
            data_dir,
            source_id,
            links: Mutex::new(BTreeMap::new()),
            groups: Mutex::new(BTreeMap::new()),
            receiver,
        });
        for entry in std::fs::read_dir(&repl.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<LinkRecord>(&b).map_err(|e| e.to_string()));
            if let Ok(r) = &record {
                if repl.receiver.export_snapshot(&r.volume).is_some() {
                    // A failback made the volume a replica and stopped
                    // before dropping its old link.
                    log::info!(
                        "volume {} is a replica after a failback; dropping its old link",
                        r.volume
                    );
                    for p in [path.clone(), path.with_extension("dirty")] {
                        let _ = std::fs::remove_file(p);
                    }
                    continue;
                }
            }
            let resumed = record.and_then(|r| repl.open_link(r).map_err(|e| e.message));
            match resumed {
                Ok(v) => log::info!("replication of {v} resumed"),
                Err(e) => log::error!(
                    "replication link {} cannot be resumed: {e}; fix it or drop it with \
                     `snapblk replicate stop VOL`",
                    path.display()
                ),
            }
        }
        let old: Weak<dyn dest::OldSource> = Arc::downgrade(&repl) as _;
        repl.receiver.set_old_source(old);
        Ok(repl)
    }

    fn links(&self) -> MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open_link(&self, record: LinkRecord) -> Result<String, VolumeError> {
        let name = record.volume.clone();
        let volume = self.registry.volume(&name)?;
        let group = record.group.as_ref().map(|g| {
            self.groups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(g.clone())
                .or_insert_with(|| GroupCps::new(g, &record.group_members))
                .clone()
        });
        let (link, hook) = Link::open(volume, record, &self.dir, &self.source_id, group.clone())?;
        if let Some(g) = group {
            g.register(&name, &link);
        }
        link.start()?;
        self.links().insert(name.clone(), (link, hook));
        Ok(name)
    }

    fn link(&self, volume: &str) -> Result<Arc<Link>, VolumeError> {
        self.links()
            .get(volume)
            .map(|(l, _)| l.clone())
            .ok_or_else(|| {
                VolumeError::not_found(format!(
                    "volume {volume} is not replicated from here; start with \
                     `snapblk replicate start {volume} --to HOST:PORT/DESTVOL`"
                ))
            })
    }

    /// `replicate.start`: a new link from this daemon's volume, or one per
    /// member of a group, sharing their CPs.
    pub fn start_link(&self, req: ReplicateStart) -> Result<Value, VolumeError> {
        let Some(group) = req.group.clone() else {
            let (host, dest_volume) = parse_target(&req.to)?;
            let record = self.new_record(&req, &req.volume, host, dest_volume)?;
            self.open_link(record)?;
            log::info!("replication of {} to {} started", req.volume, req.to);
            return Ok(self.link(&req.volume)?.status());
        };
        if !req.volume.is_empty() {
            return Err(VolumeError::invalid(
                "give a volume or --group GROUP, not both",
            ));
        }
        if req.resync {
            return Err(VolumeError::invalid(
                "--resync fails back one volume; start a group's replication without it",
            ));
        }
        let host = parse_host(&req.to)?;
        let members = self.registry.groups().members(&group)?;
        let mut records = Vec::new();
        for m in &members {
            let mut record = self.new_record(&req, m, host.clone(), m.clone())?;
            record.group = Some(group.clone());
            record.group_members = members.clone();
            records.push(record);
        }
        self.groups().remove(&group);
        for (i, record) in records.into_iter().enumerate() {
            if let Err(e) = self.open_link(record) {
                for m in &members[..i] {
                    let _ = self.stop_one(m);
                }
                self.groups().remove(&group);
                return Err(e);
            }
        }
        log::info!(
            "replication of group {group} ({}) to {} started",
            members.join(", "),
            req.to
        );
        self.status_of(|l| l.group().as_deref() == Some(&group), None)
    }

    fn groups(&self) -> MutexGuard<'_, BTreeMap<String, Arc<GroupCps>>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks `req`'s settings for `volume` and makes its link's record.
    fn new_record(
        &self,
        req: &ReplicateStart,
        volume: &str,
        host: String,
        dest_volume: String,
    ) -> Result<LinkRecord, VolumeError> {
        if self.links().contains_key(volume) {
            return Err(VolumeError::new(
                ErrorKind::AlreadyExists,
                format!("volume {volume} is already replicated; `snapblk replicate stop {volume}` first"),
            ));
        }
        let chunk_size = self.registry.volume(volume)?.chunk_size() as u64;
        let block_size = req.block_size.unwrap_or(DEFAULT_BLOCK_SIZE.min(chunk_size));
        if !block_size.is_power_of_two()
            || block_size < source::MIN_BLOCK
            || block_size > chunk_size
        {
            return Err(VolumeError::invalid(format!(
                "block size {block_size} is not a power of two between {} and volume \
                 {volume}'s chunk size {chunk_size}; pick one such as 4K",
                source::MIN_BLOCK
            )));
        }
        if self.receiver.export_snapshot(volume).is_some() {
            return Err(VolumeError::invalid(format!(
                "volume {volume} is a replica; promote it first with `snapblk replicate promote {volume}`"
            )));
        }
        let cp_interval_ms = req.cp_interval_ms.unwrap_or(DEFAULT_CP_INTERVAL_MS);
        if cp_interval_ms < 100 {
            return Err(VolumeError::invalid(format!(
                "cp interval {cp_interval_ms} ms is too short; use at least 100 ms"
            )));
        }
        let key_file = req
            .key_file
            .clone()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.data_dir.join(DEFAULT_KEY_FILE));
        if !key_file.is_absolute() {
            return Err(VolumeError::invalid(format!(
                "key file {} must be an absolute path",
                key_file.display()
            )));
        }
        wire::read_key(&key_file).map_err(VolumeError::invalid)?;
        let resync = if req.resync {
            Some(self.failback_base(volume, &dest_volume)?)
        } else {
            None
        };
        // A previous pair's dirty map would hide nothing (a full copy
        // follows), but start from a clean one.
        let _ = std::fs::remove_file(self.dir.join(format!("{volume}.dirty")));
        Ok(LinkRecord {
            volume: volume.to_string(),
            host,
            dest_volume,
            cp_interval_ms,
            key_file,
            keep_cps: req.keep_cps.unwrap_or(DEFAULT_KEEP_CPS).max(1),
            max_log_bytes: req.max_log_bytes.unwrap_or(DEFAULT_MAX_LOG_BYTES),
            block_size: Some(block_size),
            // A failback resumes the CP numbers at its base.
            last_acked_cp: resync.as_ref().map(|f| f.base.cp),
            last_acked_unix_ms: 0,
            dest_replica_id: None,
            resync,
            group: None,
            group_members: Vec::new(),
        })
    }

    /// The base of a failback from promoted replica `volume` to its old
    /// source `dest_volume`: the last CP it applied, by its snapshot's name
    /// and engine generation, with the identities the old source checks.
    /// Anything else has no common base: refused, saying to sync in full.
    fn failback_base(&self, volume: &str, dest_volume: &str) -> Result<FailbackBase, VolumeError> {
        let no_base = |why: String| {
            VolumeError::invalid(format!(
                "cannot resync volume {volume} with {dest_volume}: {why}, so the two share no \
                 consistency point; run a full sync instead: `snapblk replicate start {volume} \
                 --to HOST:PORT/NEWVOL` without --resync (it copies the whole volume)"
            ))
        };
        let rec = self
            .receiver
            .record(volume)
            .ok_or_else(|| no_base(format!("{volume} was never a replica on this daemon")))?;
        if rec.source_volume != dest_volume {
            return Err(no_base(format!(
                "{volume} was the replica of volume {} of source {}, not of {dest_volume}",
                rec.source_volume, rec.source_id
            )));
        }
        let cp = rec
            .last_applied_cp
            .ok_or_else(|| no_base(format!("{volume} never applied a consistency point")))?;
        let snapshot = dest::cp_snapshot(cp);
        let held = self
            .registry
            .volume(volume)?
            .list_snapshots()
            .into_iter()
            .find(|s| s.name == snapshot)
            .map(|s| s.generation);
        let generation = match (held, rec.cp_generation) {
            (Some(g), Some(applied)) if g == applied && !rec.replica_id.is_empty() => g,
            (None, _) => {
                return Err(no_base(format!(
                    "snapshot {volume}@{snapshot}, the last consistency point it applied, was \
                     deleted"
                )))
            }
            _ => {
                return Err(no_base(format!(
                    "snapshot {volume}@{snapshot} is not the consistency point it applied \
                     (taken again under that name, or applied by a snapblk without failback)"
                )))
            }
        };
        Ok(FailbackBase {
            base: wire::ResyncBase {
                cp,
                source_id: rec.source_id,
                source_volume: rec.source_volume,
                replica_id: rec.replica_id,
            },
            snapshot,
            generation,
        })
    }

    /// `replicate.stop` of a volume, or of every member of `group`.
    pub fn stop_link(&self, volume: &str, group: Option<&str>) -> Result<Value, VolumeError> {
        if let Some(group) = group {
            let members: Vec<String> = self
                .links()
                .iter()
                .filter(|(_, (l, _))| l.group().as_deref() == Some(group))
                .map(|(n, _)| n.clone())
                .collect();
            if members.is_empty() {
                return Err(VolumeError::not_found(format!(
                    "group {group} is not replicated from here"
                )));
            }
            for m in &members {
                self.stop_one(m)?;
            }
            self.groups().remove(group);
            log::info!("replication of group {group} stopped");
            return Ok(json!({ "group": group, "volumes": members, "stopped": true }));
        }
        if let Some(g) = self.link(volume).ok().and_then(|l| l.group()) {
            return Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "volume {volume} is replicated with its group {g} (shared consistency \
                     points); stop the group's with `snapblk replicate stop --group {g}`"
                ),
            ));
        }
        self.stop_one(volume)?;
        Ok(json!({ "volume": volume, "stopped": true }))
    }

    fn stop_one(&self, volume: &str) -> Result<(), VolumeError> {
        let (link, hook) = self.links().remove(volume).ok_or_else(|| {
            VolumeError::not_found(format!("volume {volume} is not replicated from here"))
        })?;
        link.remove(&hook);
        log::info!("replication of {volume} stopped");
        Ok(())
    }

    /// `replicate.status`: every link and replica here, `volume`'s, or the
    /// links of `group`'s members.
    pub fn status(&self, volume: Option<&str>, group: Option<&str>) -> Result<Value, VolumeError> {
        if let Some(g) = group {
            let waiting = self.groups().get(g).map(|c| c.waiting_for());
            let Some(waiting) = waiting else {
                return Err(VolumeError::not_found(format!(
                    "group {g} is not replicated from here; start with `snapblk replicate \
                     start --group {g} --to HOST:PORT`"
                )));
            };
            let mut v = self.status_of(|l| l.group().as_deref() == Some(g), None)?;
            v["group"] = json!(g);
            v["waiting_for"] = json!(waiting);
            return Ok(v);
        }
        self.status_of(|l| volume.is_none_or(|v| v == l.volume().name()), volume)
    }

    /// The links `which` picks and, for `replica` (or every one if none),
    /// the replicas here.
    fn status_of(
        &self,
        which: impl Fn(&Link) -> bool,
        volume: Option<&str>,
    ) -> Result<Value, VolumeError> {
        let mut list: Vec<Value> = self
            .links()
            .values()
            .filter(|(l, _)| which(l))
            .map(|(l, _)| l.status())
            .collect();
        list.extend(self.receiver.status(volume));
        if let (Some(v), true) = (volume, list.is_empty()) {
            return Err(VolumeError::not_found(format!(
                "volume {v} is neither replicated from nor a replica on this daemon"
            )));
        }
        Ok(json!({
            "listen": self.receiver.local_addr().map(|a| a.to_string()),
            "links": list,
        }))
    }

    /// Links from here and replicas here: what `replicate.status` lists.
    pub fn link_count(&self) -> usize {
        self.links().len() + self.receiver.status(None).len()
    }

    /// `replicate.cp`: takes a CP now (on every member of `group`: one
    /// shared CP) and waits until the destination applied it.
    pub fn cp_now(&self, volume: &str, group: Option<&str>) -> Result<Value, VolumeError> {
        let links: Vec<Arc<Link>> = match group {
            Some(g) => self
                .links()
                .values()
                .filter(|(l, _)| l.group().as_deref() == Some(g))
                .map(|(l, _)| l.clone())
                .collect(),
            None => vec![self.link(volume)?],
        };
        if links.is_empty() {
            return Err(VolumeError::not_found(format!(
                "group {} is not replicated from here",
                group.unwrap_or_default()
            )));
        }
        let tickets: Vec<u64> = links.iter().map(|l| l.request_cp()).collect();
        let mut cps = Vec::new();
        for (l, t) in links.iter().zip(tickets) {
            let cp = l
                .wait_cp(t)
                .map_err(|m| VolumeError::new(ErrorKind::IoError, m))?;
            cps.push(json!({ "volume": l.volume().name(), "cp": cp }));
        }
        match group {
            Some(g) => Ok(json!({ "group": g, "members": cps })),
            None => Ok(cps.swap_remove(0)),
        }
    }

    /// `replicate.promote`: makes a replica here a normal writable volume.
    pub fn promote(&self, volume: &str) -> Result<Value, VolumeError> {
        self.receiver.promote(volume).map_err(VolumeError::invalid)
    }

    /// A user snapshot of `volume` was taken: replicate it as a CP too.
    pub fn snapshot_taken(&self, volume: &str) {
        if let Ok(link) = self.link(volume) {
            link.request_cp();
        }
    }

    /// Refuses deleting a group replicated from here: its links share CPs
    /// by its membership.
    pub fn check_group_delete(&self, group: &str) -> Result<(), VolumeError> {
        if self.groups().contains_key(group) {
            return Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "group {group} is being replicated; stop that first with \
                     `snapblk replicate stop --group {group}`"
                ),
            ));
        }
        Ok(())
    }

    /// Refuses deleting a volume replicated from here: the link would keep
    /// writing a dirty map and sending for a volume that is gone.
    pub fn check_volume_delete(&self, volume: &str) -> Result<(), VolumeError> {
        if self.links().contains_key(volume) {
            return Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "volume {volume} is being replicated; stop that first with \
                     `snapblk replicate stop {volume}`"
                ),
            ));
        }
        Ok(())
    }

    /// Refuses deleting (or detaching) a replica whose source is connected:
    /// the source would create it again at once and send the whole volume.
    pub fn check_replica_delete(&self, volume: &str) -> Result<(), VolumeError> {
        self.refuse_while_receiving(
            volume,
            "deleted now, it would be created again and sent in full",
            &format!(", or make this a normal volume with `snapblk replicate promote {volume}`"),
        )
    }

    /// Refuses reopening a replica whose source is connected: the receiver
    /// holds the volume open to apply what the source sends.
    pub fn check_replica_reopen(&self, volume: &str) -> Result<(), VolumeError> {
        self.refuse_while_receiving(
            volume,
            "the receiver holds it open",
            ", reopen, then start the link again",
        )
    }

    fn refuse_while_receiving(
        &self,
        volume: &str,
        why: &str,
        then: &str,
    ) -> Result<(), VolumeError> {
        if let Some((peer, source_volume)) = self.receiver.receiving_from(volume) {
            return Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "volume {volume} is a replica that the source at {peer} is replicating \
                     into (its volume {source_volume}); {why}. Stop the link on the source \
                     first with `snapblk replicate stop {source_volume}`{then}"
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a writable device on an unpromoted replica (its live image is
    /// where CPs are applied, half-written between CPs and not to be
    /// written by anyone else) and deleting the CP snapshot its readers see.
    pub fn check_replica_use(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        deleting: bool,
    ) -> Result<(), VolumeError> {
        let Some(newest) = self.receiver.export_snapshot(volume) else {
            return Ok(());
        };
        if let Some(why) = self.receiver.broken(volume) {
            return Err(VolumeError::new(
                ErrorKind::IoError,
                format!("volume {volume} is a broken replica: {why}"),
            ));
        }
        match (snapshot, newest) {
            (None, newest) => Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "volume {volume} is a replica: consistency points are applied to it. Serve \
                     its newest one read-only with `snapblk device start {volume} --snapshot {}`, \
                     or make it a normal volume with `snapblk replicate promote {volume}`",
                    newest.unwrap_or_else(|_| "cp-N".to_string())
                ),
            )),
            (Some(snap), Ok(newest)) if deleting && snap == newest => Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "snapshot {snap} is replica {volume}'s newest consistency point, the image \
                     its readers see; it can be deleted once a newer one is applied"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// See [`dest::Receiver::export_snapshot`].
    pub fn export_snapshot(&self, volume: &str) -> Option<Result<String, String>> {
        self.receiver.export_snapshot(volume)
    }

    /// See [`dest::Receiver::open_export`].
    pub fn open_export<T>(
        &self,
        volume: &str,
        open: impl FnOnce(Result<String, String>) -> T,
    ) -> Option<T> {
        self.receiver.open_export(volume, open)
    }

    /// Stops every sender and the listener; links resume at next start.
    pub fn shutdown(&self) {
        let links: Vec<Arc<Link>> = self.links().values().map(|(l, _)| l.clone()).collect();
        for link in links {
            link.stop();
        }
        self.receiver.shutdown();
    }
}

/// `HOST:PORT/DESTVOL` -> (`HOST:PORT`, `DESTVOL`).
fn parse_target(to: &str) -> Result<(String, String), VolumeError> {
    let Some((host, vol)) = to.rsplit_once('/') else {
        return Err(bad_target(
            to,
            "no /DESTVOL",
            "HOST:PORT/DESTVOL, e.g. 127.0.0.1:10810/disk0",
        ));
    };
    let host = parse_host(host).map_err(|_| {
        bad_target(
            to,
            "no HOST:PORT",
            "HOST:PORT/DESTVOL, e.g. 127.0.0.1:10810/disk0",
        )
    })?;
    validate_name("volume", vol)?;
    Ok((host, vol.to_string()))
}

/// `HOST:PORT` (a group's target: each member keeps its name there).
fn parse_host(to: &str) -> Result<String, VolumeError> {
    match to.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(to.to_string()),
        _ => Err(bad_target(
            to,
            "not HOST:PORT",
            "HOST:PORT for a group (each member goes to a volume of its own name), e.g. 127.0.0.1:10810",
        )),
    }
}

fn bad_target(to: &str, why: &str, want: &str) -> VolumeError {
    VolumeError::invalid(format!("invalid target {to:?}: {why}; use {want}"))
}

impl dest::OldSource for Replication {
    fn failback_prepare(
        &self,
        volume: &str,
        base: &wire::ResyncBase,
    ) -> Result<(Vec<(u64, u64)>, String), String> {
        let no_base = |why: String| {
            format!(
                "no common base for a failback resync onto volume {volume}: {why}; run a full \
                 sync instead (`snapblk replicate start` without --resync, to a new volume)"
            )
        };
        let link = self.link(volume).map_err(|_| {
            no_base(format!(
                "this daemon has no replication link of {volume} (stopped, or never started), \
                 so it cannot tell what changed here since consistency point {}",
                base.cp
            ))
        })?;
        link.check_failback_base(&self.source_id, base)
            .map_err(no_base)?;
        // The link holds the volume too.
        self.registry
            .check_no_users(volume, 1)
            .map_err(|e| format!("{}; it becomes a replica in a failback", e.message))?;
        let vol = link.volume().clone();
        let snapshot = failback_snapshot_name(&vol);
        block_on(vol.create_snapshot(&snapshot))
            .map_err(|e| format!("cannot keep volume {volume}'s image as {snapshot}: {e}"))?;
        let changed = link.stop_for_failback();
        log::info!(
            "volume {volume}: failback from consistency point {}: its image is kept in \
             snapshot {snapshot}; {} changed range(s) since then will be overwritten",
            base.cp,
            changed.len()
        );
        Ok((changed, snapshot))
    }

    fn failback_done(&self, volume: &str) {
        if let Some((link, hook)) = self.links().remove(volume) {
            link.remove(&hook);
        }
    }
}

/// `failback-YYYYMMDD-HHMMSS` (UTC), with `-N` added if taken.
fn failback_snapshot_name(volume: &crate::engine::Volume) -> String {
    let stamp: String = crate::cli::output::format_unix_ms(crate::engine::now_unix_ms())
        .trim_end_matches(" UTC")
        .chars()
        .filter_map(|c| match c {
            '-' | ':' => None,
            ' ' => Some('-'),
            c => Some(c),
        })
        .collect();
    let taken: Vec<String> = volume
        .list_snapshots()
        .into_iter()
        .map(|s| s.name)
        .collect();
    let base = format!("failback-{stamp}");
    (1..)
        .map(|n| {
            if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            }
        })
        .find(|n| !taken.contains(n))
        .expect("a free name")
}

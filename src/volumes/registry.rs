//! The registry: every volume the daemon serves, persisted as directories.
//!
//! Layout: `DATA_DIR/volumes/NAME/` is one volume (one
//! [`Storage::Dir`]); the directory listing *is* the registry, so a restart
//! (also after `kill -9`) rebuilds it by opening every directory found there,
//! and the engine's [`Volume::open`] does the crash recovery (seed 002:
//! "registry rebuilt on restart").
//!
//! Crash safety of the two mutations:
//! - create builds the volume in `volumes/.creating-NAME/`, shuts it down and
//!   renames it to `volumes/NAME/` (atomic), then opens it there. A crash
//!   leaves either nothing or a leftover `.creating-*` directory.
//! - delete refuses (`busy`) while an NBD connection holds a view of the
//!   volume; otherwise it removes the volume from the map (no new exports),
//!   shuts it down, renames the directory to `volumes/.deleting-NAME/`
//!   (atomic) and removes that. A crash leaves either the volume or a
//!   `.deleting-*` directory.
//!
//! Leftover `.creating-*` / `.deleting-*` directories are removed at start.
//!
//! Devices (`/dev/ublkbN`, see [`super::devices`]): at most one per `VOL` and
//! one per `VOL@SNAP`, run in memory and listed in `DATA_DIR/devices.json`,
//! which is rewritten on every start and stop. At daemon start
//! [`Registry::restore_devices`] starts every listed device again; one that
//! fails stays listed (in the file and in `device list`, with its error) so
//! that a later `device start` retries it and `device stop` drops it. A
//! volume with a running device, or a snapshot with one, cannot be deleted
//! (`busy`). Shutdown stops every device before it flushes the volumes and
//! leaves `devices.json` as it is, so the devices come back at next start.
//!
//! A volume that fails to open (corrupt metadata, missing file) does not stop
//! the daemon: it stays in the registry as [`Slot::Broken`], is logged, shows
//! in `volume list` with state `error: <message>`, is never exported, and can
//! be deleted, or opened again once fixed (`volume reopen`, which also closes
//! and reopens a served volume, e.g. after its journal failed).
//!
//! Concurrency: the map lock is only held for lookups and inserts; create and
//! delete are serialized by a separate lock; snapshot work runs on the
//! caller's thread (each control client has one) through
//! [`crate::runtime::block_on`]. A read/write gate lets shutdown wait for
//! every in-flight request and refuse new ones.

use super::devices::{self, DeviceSpec, Driver, RunningDevice};
use super::error::{ErrorKind, VolumeError};
use super::flatten::Flattens;
use super::groups::Groups;
use super::json_file;
use super::quota::Quotas;
use crate::backend::{CephSpec, Claim as CephClaim, Storage};
use crate::engine::WriteBackConfig;
use crate::engine::{AccessRecord, CacheMode, EngineError, View, Volume, VolumeConfig};
use crate::engine::{CONTAINER, DEFAULT_CHUNK_SIZE, DEFAULT_PARTITIONS};
use crate::runtime::block_on;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

const CREATING: &str = ".creating-";
/// In a Ceph volume's directory: where the volume lives ([`CephSpec`]);
/// everything else about it is in the pool.
const CEPH_POINTER: &str = "ceph.json";
const DELETING: &str = ".deleting-";
/// How many volumes close at once at shutdown.
const SHUTDOWN_THREADS: usize = 16;

/// A device the operator asked for, in one of its states. Slow kernel
/// calls (start, stop: up to a minute each on a struggling kernel) run
/// without the registry's `mutate` lock; `Starting` and `Stopping` hold the
/// entry's place meanwhile, so the volume or snapshot cannot be deleted and
/// no second start or stop of the same key runs.
enum DeviceState {
    /// A `device.start` is asking the kernel for it.
    Starting,
    Running(Box<dyn RunningDevice>),
    /// A `device.stop` has it out, stopping it.
    Stopping,
    /// A stop failed (the kernel timed out): `device.stop` tries again.
    StopFailed(Box<dyn RunningDevice>, String),
    /// Not running: its start failed (at restore, or a retry); why.
    Failed(String),
}

/// What a started device is, as the kernel granted it; kept while it is
/// out being stopped.
#[derive(Clone)]
struct Shown {
    id: u32,
    path: String,
    read_only: bool,
    queues: u16,
    depth: u16,
    recovery: bool,
    buffers: &'static str,
}

impl Shown {
    fn of(dev: &dyn RunningDevice) -> Shown {
        Shown {
            id: dev.id(),
            path: dev.path(),
            read_only: dev.read_only(),
            queues: dev.queues(),
            depth: dev.depth(),
            recovery: dev.recovery(),
            buffers: dev.buffers(),
        }
    }
}

struct DeviceEntry {
    spec: DeviceSpec,
    /// Set once the device ran; cleared when its start is retried.
    shown: Option<Shown>,
    state: DeviceState,
    /// Whether `devices.json` lists it (false for a first start still in
    /// progress, and for a device being stopped).
    persisted: bool,
}

impl DeviceEntry {
    /// The kernel device's path, while it exists (running, or being stopped).
    fn path(&self) -> Option<String> {
        match &self.state {
            DeviceState::Running(_) | DeviceState::Stopping | DeviceState::StopFailed(..) => {
                self.shown.as_ref().map(|s| s.path.clone())
            }
            DeviceState::Starting | DeviceState::Failed(_) => None,
        }
    }

    /// Why this entry keeps its volume (or snapshot) from being deleted:
    /// anything but a device that is not running.
    fn in_use(&self) -> Option<String> {
        match &self.state {
            DeviceState::Failed(_) => None,
            DeviceState::Starting => Some("a device being started".to_string()),
            _ => Some(format!(
                "device {}",
                self.path().unwrap_or_else(|| "?".to_string())
            )),
        }
    }

    fn json(&self) -> Value {
        let s = &self.spec;
        let state = match &self.state {
            DeviceState::Starting => "starting".to_string(),
            DeviceState::Running(_) => "running".to_string(),
            DeviceState::Stopping => "stopping".to_string(),
            DeviceState::StopFailed(_, m) => format!(
                "error: stop failed: {m}; retry with `snapblk device stop {}`",
                s.key()
            ),
            DeviceState::Failed(m) => format!("error: {m}"),
        };
        let shown = match self.state {
            DeviceState::Starting | DeviceState::Failed(_) => None,
            _ => self.shown.as_ref(),
        };
        // What the kernel granted where a device exists; else what was asked.
        let (id, path, read_only, queues, depth, recovery) = match shown {
            Some(g) => (
                json!(g.id),
                json!(g.path),
                g.read_only,
                g.queues,
                g.depth,
                g.recovery,
            ),
            None => (
                Value::Null,
                Value::Null,
                s.snapshot.is_some(),
                s.queues,
                s.depth,
                s.recovery,
            ),
        };
        let (requests, ring_ops) = match &self.state {
            DeviceState::Running(dev) => (
                json!(dev.requests_per_queue()),
                json!(dev.ring_ops_per_queue()),
            ),
            _ => (Value::Null, Value::Null),
        };
        json!({
            "id": id,
            "path": path,
            "volume": s.volume,
            "snapshot": s.snapshot,
            "read_only": read_only,
            "queues": queues,
            "depth": depth,
            "recovery": recovery,
            "state": state,
            "requests_per_queue": requests,
            "ring_ops_per_queue": ring_ops,
            "buffers": shown.map(|g| g.buffers),
        })
    }
}

/// One registry entry.
#[derive(Clone)]
pub enum Slot {
    Ready(Arc<Volume>),
    /// The volume's directory exists but it could not be opened; the message says why.
    Broken(String),
}

pub struct Registry {
    data_dir: PathBuf,
    volumes_dir: PathBuf,
    map: Mutex<BTreeMap<String, Slot>>,
    /// Serializes create and delete.
    mutate: Mutex<()>,
    /// `true` once shutdown began; requests hold it shared while they run.
    closing: RwLock<bool>,
    /// Devices by `VOL` / `VOL@SNAP`. Entries are added and removed only
    /// under `mutate`, except that a start or stop in progress (its entry
    /// `Starting` / `Stopping`, which nothing else touches) finishes
    /// without it.
    devices: Mutex<BTreeMap<String, DeviceEntry>>,
    /// Serializes writes of `devices.json`.
    save_lock: Mutex<()>,
    /// Volumes a `restore` writes: nothing else may take them (see
    /// [`Registry::claim_for_restore`]). Changed under the `map` lock.
    restoring: Mutex<BTreeMap<String, Claim>>,
    /// Flatten jobs of clones (see [`super::flatten`]).
    flattens: Flattens,
    /// Consistency groups (see [`super::groups`]); changed under `mutate`.
    groups: Groups,
    /// Owners' space budgets (see [`super::quota`]).
    quotas: Quotas,
    driver: Box<dyn Driver>,
}

/// A volume held for a restore; dropping it gives the volume back.
pub struct RestoreClaim<'a> {
    registry: &'a Registry,
    pub volume: Arc<Volume>,
}

impl Drop for RestoreClaim<'_> {
    fn drop(&mut self) {
        let _map = self.registry.lock_map();
        self.registry.lock_restoring().remove(self.volume.name());
    }
}

/// `busy` if anything but the registry's map, `vol`, its clones (each holds
/// its parent) and `holders` more references holds volume `name`.
fn check_no_holders(name: &str, vol: &Arc<Volume>, holders: usize) -> Result<(), VolumeError> {
    let users = Arc::strong_count(vol).saturating_sub(2 + vol.clones().len() + holders);
    if users > 0 {
        return Err(VolumeError::new(
            ErrorKind::Busy,
            format!(
                "volume {name} is in use by {users} open NBD connection(s) or requests; \
                 disconnect its NBD clients first"
            ),
        ));
    }
    Ok(())
}

/// Checks a volume or snapshot name: `[A-Za-z0-9._-]{1,64}`, not starting with '.'.
pub fn validate_name(kind: &str, name: &str) -> Result<(), VolumeError> {
    let bad = |why: &str| {
        Err(VolumeError::invalid(format!(
            "invalid {kind} name {name:?}: {why}; use 1-64 characters from A-Z a-z 0-9 . _ - \
             (not starting with '.')"
        )))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 64 {
        return bad("it is longer than 64 characters");
    }
    if name.starts_with('.') {
        return bad("it starts with '.'");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!("it contains {c:?}"));
    }
    Ok(())
}

fn not_found(name: &str) -> VolumeError {
    VolumeError::not_found(format!("volume {name} not found"))
}

/// What holds a volume claimed (see [`Registry::claim_for_restore`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    Restore,
    Revert,
}

fn restoring(name: &str, claim: Claim) -> VolumeError {
    let what = match claim {
        Claim::Restore => {
            "is being restored from a backup stream; wait for `snapblk restore` \
                           to finish"
        }
        Claim::Revert => {
            "is being reverted to a snapshot; wait for `snapblk snapshot revert` \
                          to finish"
        }
    };
    VolumeError::new(ErrorKind::Busy, format!("volume {name} {what}"))
}

fn volume_json(vol: &Volume) -> Result<Value, VolumeError> {
    let info = vol.info()?;
    let mut v = serde_json::to_value(&info)
        .map_err(|e| VolumeError::new(ErrorKind::IoError, e.to_string()))?;
    // Engine-internal snapshots (a copy job's) are not the user's to count.
    v["snapshots"] = json!(user_snapshots(vol).len());
    v["owner"] = json!(crate::security::user_name(vol.access().owner));
    v["state"] = json!("ok");
    match vol.storage().ceph_status() {
        Some(ceph) => {
            if ceph["fenced"] == json!(true) {
                v["state"] = json!(
                    "fenced: another daemon broke this daemon's lock and serves the volume; \
                     delete it here"
                );
            }
            v["backend"] = json!("ceph");
            v["ceph"] = ceph;
        }
        None => v["backend"] = json!("local"),
    }
    Ok(v)
}

/// What removing a volume does to a Ceph volume's pool data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// Removes it (the origin image included, an imported one too).
    Delete,
    /// Leaves it; only this daemon forgets the volume.
    Detach,
}

/// What a Ceph volume's directory asks for.
pub enum CephPlacement {
    /// A new RBD image of `size` bytes.
    Create { size: u64 },
    /// An existing RBD image with data, made a volume.
    Import,
    /// A volume another daemon served, taken over (`--break-lock`: even
    /// from a holder that is alive or dead without releasing the lock).
    Attach { break_lock: bool },
}

/// The storage of the volume in directory `dir`: the directory itself, or
/// the Ceph pool its pointer names (locked for this daemon).
fn storage_of(dir: &Path) -> io::Result<Storage> {
    match ceph_pointer(dir)? {
        Some(spec) => {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            Storage::connect_ceph(&spec, CephClaim::Open)
                .map_err(|e| with_takeover_hint(e, &name, &spec, true))
        }
        None => Ok(Storage::Dir(dir.to_path_buf())),
    }
}

/// Where the volume in directory `dir` lives in Ceph; `None` for a local
/// volume.
fn ceph_pointer(dir: &Path) -> io::Result<Option<CephSpec>> {
    match fs::read(dir.join(CEPH_POINTER)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not valid: {e}", dir.join(CEPH_POINTER).display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A Ceph image locked by another client (`WouldBlock`) gets the steps
/// that take volume `name` over; other errors pass unchanged. A daemon that
/// `listed` the volume already must forget it first: `attach` alone would
/// find the name taken.
fn with_takeover_hint(e: io::Error, name: &str, spec: &CephSpec, listed: bool) -> io::Error {
    if e.kind() != io::ErrorKind::WouldBlock {
        return e;
    }
    let attach = format!(
        "`snapblk volume attach {name} --ceph {}/{} --break-lock`",
        spec.pool, spec.image
    );
    let steps = if listed {
        format!(
            "forget it here with `snapblk volume detach {name}`, then take it over with {attach}"
        )
    } else {
        format!("take it over with {attach}")
    };
    io::Error::new(
        e.kind(),
        format!("{e}; if that daemon is dead or must give it up, {steps}"),
    )
}

/// Flushes and closes `vol` at shutdown; whether it closed cleanly (a Ceph
/// volume: and gave up its lock). A Ceph volume whose last flush failed
/// leaves its cluster without waiting on it again.
fn close_volume(name: &str, vol: &Volume) -> bool {
    if let Err(e) = block_on(vol.shutdown()) {
        log::error!("volume {name}: shutdown failed: {e}");
        if vol.storage().abandon_ceph() {
            log::error!(
                "volume {name}: its RBD image stays locked by this daemon, whose last flush \
                 was not confirmed: the next daemon to serve it takes it over with \
                 `--break-lock` (its start says how)"
            );
        }
        return false;
    }
    log::info!("volume {name} flushed and closed");
    if let Err(e) = vol.storage().release_ceph_lock() {
        log::error!(
            "volume {name}: could not release the lock on its RBD image: {e}; the next \
             daemon to serve it takes it over with `--break-lock` (its start says how)"
        );
        return false;
    }
    true
}

/// Opens volume `name` from its directory (a clone on its open `parent`).
fn open_volume(
    volumes_dir: &Path,
    name: &str,
    parent: Option<Arc<Volume>>,
) -> Result<Arc<Volume>, EngineError> {
    let storage = storage_of(&volumes_dir.join(name))?;
    block_on(Volume::open_layered(
        name,
        storage,
        WriteBackConfig::daemon_default(),
        parent,
    ))
}

/// A volume that could not open: its name, the error and, for one in Ceph
/// (its pointer readable), where it lives, so that `volume list` can say so.
fn broken_json(dir: &Path, name: &str, message: &str) -> Value {
    let mut v = json!({ "name": name, "state": format!("error: {message}") });
    if let Ok(Some(spec)) = ceph_pointer(&dir.join(name)) {
        v["backend"] = json!("ceph");
        v["ceph"] = json!({ "pool": spec.pool, "image": spec.image });
    }
    v
}

impl Registry {
    /// Opens the registry in `data_dir` (created if missing): removes leftovers
    /// of interrupted creates/deletes and opens every volume found. Devices
    /// are started with `driver`, by [`Registry::restore_devices`] and
    /// `device.start`.
    pub fn open(data_dir: &Path, driver: Box<dyn Driver>) -> io::Result<Registry> {
        let volumes_dir = data_dir.join("volumes");
        fs::create_dir_all(&volumes_dir)?;
        let mut map = BTreeMap::new();
        let mut names = Vec::new();
        for entry in fs::read_dir(&volumes_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(CREATING) || name.starts_with(DELETING) {
                log::info!(
                    "removing leftover {} of an interrupted create/delete",
                    path.display()
                );
                if let Err(e) = fs::remove_dir_all(&path) {
                    log::error!("cannot remove {}: {e}", path.display());
                }
                continue;
            }
            if !entry.file_type()?.is_dir() {
                continue;
            }
            if validate_name("volume", &name).is_err() {
                log::warn!("ignoring {}: not a valid volume name", path.display());
                continue;
            }
            names.push(name);
        }
        names.sort();
        // Parents before their clones: each round opens the volumes whose
        // parent is open (or broken: then the clone is too, saying why).
        let mut waiting: Vec<(String, Option<String>)> = names
            .into_iter()
            .map(|name| {
                let parent = Volume::parent_of(&Storage::Dir(volumes_dir.join(&name)))
                    .ok()
                    .flatten();
                (name, parent)
            })
            .collect();
        while !waiting.is_empty() {
            let (ready, later): (Vec<_>, Vec<_>) = waiting
                .into_iter()
                .partition(|(_, p)| p.as_ref().is_none_or(|p| map.contains_key(p)));
            if ready.is_empty() {
                for (name, parent) in later {
                    let why = format!(
                        "its parent volume {} is missing (or its clones form a cycle)",
                        parent.unwrap_or_default()
                    );
                    log::error!("volume {name} cannot be opened: {why}");
                    map.insert(name, Slot::Broken(why));
                }
                break;
            }
            for (name, parent) in ready {
                let parent = match parent.map(|p| map.get(&p).cloned()) {
                    Some(Some(Slot::Ready(v))) => Some(v),
                    Some(_) => {
                        map.insert(
                            name,
                            Slot::Broken("its parent volume cannot be opened".to_string()),
                        );
                        continue;
                    }
                    None => None,
                };
                match open_volume(&volumes_dir, &name, parent) {
                    Ok(vol) => {
                        log::info!("opened volume {name} ({} bytes)", vol.size());
                        map.insert(name, Slot::Ready(vol));
                    }
                    Err(e) => {
                        log::error!(
                            "volume {name} cannot be opened and will not be served: {e} \
                             (directory {}); once fixed, serve it with `snapblk volume reopen {name}`, or \
                             delete it with `snapblk volume delete {name}`",
                            volumes_dir.join(&name).display()
                        );
                        map.insert(name, Slot::Broken(e.to_string()));
                    }
                }
            }
            waiting = later;
        }
        let registry = Registry {
            data_dir: data_dir.to_path_buf(),
            volumes_dir,
            map: Mutex::new(map),
            mutate: Mutex::new(()),
            closing: RwLock::new(false),
            devices: Mutex::new(BTreeMap::new()),
            save_lock: Mutex::new(()),
            restoring: Mutex::new(BTreeMap::new()),
            flattens: Flattens::default(),
            groups: Groups::load(data_dir)?,
            quotas: Quotas::load(data_dir)?,
            driver,
        };
        // Every volume's writes count against its owner's quota before
        // anything can write it.
        registry.quotas.refresh(&registry.ready_volumes());
        registry.finish_group_snapshots();
        for (name, slot) in registry.entries() {
            match slot {
                Slot::Ready(vol) if vol.flattening() => {
                    if let Err(e) = registry.flattens.start(&vol) {
                        log::error!("cannot resume the flatten of {name}: {}", e.message);
                    }
                }
                _ => {}
            }
        }
        Ok(registry)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Measures every volume's allocation for its owner's quota every
    /// [`super::quota::REFRESH`], on a thread of its own, until the
    /// registry is gone or shutting down.
    pub fn start_quota_refresher(self: &Arc<Self>) -> io::Result<()> {
        let registry = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("quota-refresh".into())
            .spawn(move || loop {
                std::thread::sleep(super::quota::REFRESH);
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                let Ok(_g) = registry.gate() else {
                    return;
                };
                registry.quotas.refresh(&registry.ready_volumes());
            })?;
        Ok(())
    }

    /// Every volume that is open (not broken).
    pub fn ready_volumes(&self) -> Vec<Arc<Volume>> {
        self.lock_map()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(v) => Some(v.clone()),
                Slot::Broken(_) => None,
            })
            .collect()
    }

    /// Volume `name`'s owner and access list. A broken volume's cannot be
    /// read: it counts as root's (only superusers may act on it).
    pub fn access_of(&self, name: &str) -> Result<AccessRecord, VolumeError> {
        match self.lock_map().get(name) {
            Some(Slot::Ready(v)) => Ok(v.access()),
            Some(Slot::Broken(_)) => Ok(AccessRecord::default()),
            None => Err(not_found(name)),
        }
    }

    /// Replaces volume `name`'s owner and access list (durable on return);
    /// its writes then count against the new owner's quota.
    pub fn set_access(&self, name: &str, access: AccessRecord) -> Result<(), VolumeError> {
        let _g = self.gate()?;
        let vol = self.volume(name)?;
        block_on(vol.set_access(access))?;
        self.quotas.attach(&vol);
        Ok(())
    }

    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// Serializes changes of what exists: volumes, groups, group snapshots.
    pub(super) fn lock_mutate(&self) -> std::sync::MutexGuard<'_, ()> {
        self.mutate.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn gate(&self) -> Result<std::sync::RwLockReadGuard<'_, bool>, VolumeError> {
        let g = self.closing.read().unwrap_or_else(|e| e.into_inner());
        if *g {
            return Err(VolumeError::new(
                ErrorKind::Busy,
                "the daemon is shutting down",
            ));
        }
        Ok(g)
    }

    fn lock_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Slot>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of the registry's entries, in name order.
    pub fn entries(&self) -> Vec<(String, Slot)> {
        self.lock_map()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn lock_restoring(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Claim>> {
        self.restoring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The claim a restore or revert holds on volume `name`, if any.
    fn claimed(&self, name: &str) -> Option<Claim> {
        self.lock_restoring().get(name).copied()
    }

    /// `busy` while a device serves volume `name` or one of its snapshots.
    fn check_no_device(&self, name: &str) -> Result<(), VolumeError> {
        self.check_devices(name, false)
    }

    /// `busy` while a device serves volume `name` itself (its writer).
    fn check_live_device_stopped(&self, name: &str) -> Result<(), VolumeError> {
        self.check_devices(name, true)
    }

    fn check_devices(&self, name: &str, live_only: bool) -> Result<(), VolumeError> {
        if let Some((key, what)) = self
            .lock_devices()
            .values()
            .filter(|e| e.spec.volume == name && !(live_only && e.spec.snapshot.is_some()))
            .find_map(|e| e.in_use().map(|w| (e.spec.key(), w)))
        {
            return Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "volume {name} is in use by {what} ({key}); stop it first with \
                     `snapblk device stop {key}`"
                ),
            ));
        }
        Ok(())
    }

    /// Takes volume `name` for a restore: refused (`busy`, naming the user)
    /// while a device serves it (or one of its snapshots) or anything else
    /// (an NBD connection, a request) holds it. Until the claim is dropped no
    /// device, export, copy job or delete can take the volume. The caller
    /// checks copy jobs and replication first, for their clearer messages.
    pub fn claim_for_restore(&self, name: &str) -> Result<RestoreClaim<'_>, VolumeError> {
        self.claim(name, Claim::Restore)
    }

    /// [`Registry::claim_for_restore`] for `claim`; a revert leaves the
    /// volume's snapshots served (it does not change them).
    fn claim(&self, name: &str, claim: Claim) -> Result<RestoreClaim<'_>, VolumeError> {
        let _g = self.gate()?;
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        match claim {
            Claim::Restore => self.check_no_device(name)?,
            Claim::Revert => self.check_live_device_stopped(name)?,
        }
        let map = self.lock_map();
        let vol = match map.get(name) {
            Some(Slot::Ready(_)) if self.claimed(name).is_some() => {
                return Err(restoring(name, self.claimed(name).unwrap()))
            }
            Some(Slot::Ready(v)) => v.clone(),
            Some(Slot::Broken(msg)) => {
                return Err(VolumeError::new(
                    ErrorKind::IoError,
                    format!("volume {name} is not available: {msg}"),
                ))
            }
            None => return Err(not_found(name)),
        };
        // A revert leaves snapshots alone: their readers may stay (a
        // clone's view of its snapshot is counted with the clones).
        let readers = match claim {
            Claim::Restore => 0,
            Claim::Revert => vol.snapshot_views().saturating_sub(vol.clones().len()),
        };
        check_no_holders(name, &vol, readers)?;
        self.lock_restoring().insert(name.to_string(), claim);
        Ok(RestoreClaim {
            registry: self,
            volume: vol,
        })
    }

    /// `busy` while a device serves volume `name` (or one of its snapshots)
    /// or anything but the caller's `holders` references (an NBD connection,
    /// a request) holds it.
    pub fn check_no_users(&self, name: &str, holders: usize) -> Result<(), VolumeError> {
        self.check_no_device(name)?;
        let vol = self.volume(name)?;
        check_no_holders(name, &vol, holders)
    }

    /// The healthy volume `name` (`busy` while a restore writes it).
    pub fn volume(&self, name: &str) -> Result<Arc<Volume>, VolumeError> {
        match self.lock_map().get(name) {
            Some(Slot::Ready(_)) if self.claimed(name).is_some() => {
                Err(restoring(name, self.claimed(name).unwrap()))
            }
            Some(Slot::Ready(v)) => Ok(v.clone()),
            Some(Slot::Broken(msg)) => Err(VolumeError::new(
                ErrorKind::IoError,
                format!("volume {name} is not available: {msg}"),
            )),
            None => Err(not_found(name)),
        }
    }

    pub fn len(&self) -> usize {
        self.lock_map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        chunk_size: Option<u32>,
        partitions: Option<u32>,
        backing: Option<String>,
        cache: Option<CacheMode>,
    ) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        validate_name("volume", name)?;
        if size == 0 {
            return Err(VolumeError::invalid("size must be greater than 0"));
        }
        let backing = match backing {
            Some(b) if !Path::new(&b).is_absolute() => {
                return Err(VolumeError::invalid(format!(
                    "backing path {b:?} must be absolute"
                )))
            }
            b => b.map(PathBuf::from),
        };
        let config = VolumeConfig {
            size,
            chunk_size: chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
            partitions: partitions.unwrap_or(DEFAULT_PARTITIONS),
            backing,
            cache: cache.unwrap_or(CacheMode::FOR_NEW_VOLUMES),
        };
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        self.install(name, None, |tmp_dir| {
            block_on(async {
                let storage = Storage::Dir(tmp_dir.to_path_buf());
                let vol = match Volume::create(name, storage.clone(), &config).await {
                    // The default asks for O_DIRECT; where the file system
                    // refuses it the volume is made buffered instead, and says so.
                    Err(EngineError::Io(e))
                        if cache.is_none() && e.kind() == std::io::ErrorKind::Unsupported =>
                    {
                        log::info!("volume {name}: {e}; it is created with cache mode writeback");
                        let buffered = VolumeConfig {
                            cache: CacheMode::Writeback,
                            ..config.clone()
                        };
                        Volume::create(name, storage, &buffered).await?
                    }
                    other => other?,
                };
                vol.shutdown().await?;
                Ok(None)
            })
        })
    }

    /// `volume.clone`: a writable volume `name` whose unwritten chunks read
    /// from `volume@snapshot`; it costs the same for any size.
    pub fn clone_volume(
        &self,
        volume: &str,
        snapshot: &str,
        name: &str,
    ) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        validate_name("volume", name)?;
        if snapshot.starts_with('.') {
            return Err(VolumeError::not_found(format!(
                "snapshot {snapshot} of volume {volume} not found"
            )));
        }
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        let parent = self.volume(volume)?;
        let started = std::time::Instant::now();
        let mut out = self.install(name, Some(parent.clone()), |tmp_dir| {
            block_on(async {
                let storage = Storage::Dir(tmp_dir.to_path_buf());
                let writeback = WriteBackConfig::daemon_default();
                let clone =
                    Volume::create_clone(name, storage, &parent, snapshot, writeback).await?;
                clone.shutdown().await?;
                Ok(None)
            })
        })?;
        out["create_us"] = json!(started.elapsed().as_micros() as u64);
        log::info!("created volume {name}, a clone of {volume}@{snapshot}");
        Ok(out)
    }

    /// A volume whose data lives in a Ceph pool (see [`CephPlacement`]);
    /// its directory here holds only the pointer to it.
    pub fn create_ceph_volume(
        &self,
        name: &str,
        spec: CephSpec,
        placement: CephPlacement,
        chunk_size: Option<u32>,
        partitions: Option<u32>,
    ) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        validate_name("volume", name)?;
        if spec.pool.is_empty() || spec.image.is_empty() {
            return Err(VolumeError::invalid(
                "a Ceph volume needs a pool and an image name",
            ));
        }
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        self.install(name, None, |tmp_dir| {
            json_file::save(&tmp_dir.join(CEPH_POINTER), &spec)?;
            let claim = match placement {
                CephPlacement::Create { size: 0 } => {
                    return Err(VolumeError::invalid("size must be greater than 0"))
                }
                CephPlacement::Create { size } => CephClaim::Create(size),
                CephPlacement::Import | CephPlacement::Attach { break_lock: false } => {
                    CephClaim::Open
                }
                CephPlacement::Attach { break_lock: true } => CephClaim::BreakLock,
            };
            let storage = Storage::connect_ceph(&spec, claim)
                .map_err(|e| with_takeover_hint(e, name, &spec, false))?;
            let vol = block_on(async {
                if let CephPlacement::Attach { .. } = placement {
                    return Volume::open(name, storage).await;
                }
                let size = storage.open(CONTAINER, false)?.size()?;
                let config = VolumeConfig {
                    size,
                    chunk_size: chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
                    partitions: partitions.unwrap_or(DEFAULT_PARTITIONS),
                    backing: None,
                    // RBD has no page cache here; librbd's cache is off.
                    cache: CacheMode::Writeback,
                };
                Volume::create(name, storage, &config).await
            })?;
            Ok(Some(vol))
        })
    }

    /// Builds a volume in `volumes/.creating-NAME/` with `build` and moves
    /// it to `volumes/NAME/` (atomic: a crash leaves no half volume).
    /// `build` returns the volume to serve, or `None` when it closed it and
    /// it must be opened at its final place (over `parent` for a clone).
    /// Under `mutate`.
    fn install(
        &self,
        name: &str,
        parent: Option<Arc<Volume>>,
        build: impl FnOnce(&Path) -> Result<Option<Arc<Volume>>, VolumeError>,
    ) -> Result<Value, VolumeError> {
        let final_dir = self.volumes_dir.join(name);
        if self.lock_map().contains_key(name) || final_dir.exists() {
            return Err(VolumeError::new(
                ErrorKind::AlreadyExists,
                format!("volume {name} already exists"),
            ));
        }
        let tmp_dir = self.volumes_dir.join(format!("{CREATING}{name}"));
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir)?;
        }
        fs::create_dir(&tmp_dir)?;
        let built = match build(&tmp_dir) {
            Ok(built) => built,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp_dir);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp_dir, &final_dir).and_then(|_| sync_dir(&self.volumes_dir)) {
            let _ = fs::remove_dir_all(&tmp_dir);
            return Err(e.into());
        }
        let vol = match built {
            Some(vol) => vol,
            None => match block_on(Volume::open_layered(
                name,
                Storage::Dir(final_dir.clone()),
                WriteBackConfig::daemon_default(),
                parent,
            )) {
                Ok(v) => v,
                Err(e) => {
                    // Keep what is on disk (the operator may want it) but show it.
                    let msg = e.to_string();
                    self.lock_map()
                        .insert(name.to_string(), Slot::Broken(msg.clone()));
                    return Err(VolumeError::new(
                        ErrorKind::IoError,
                        format!("volume {name} was created but cannot be opened: {msg}"),
                    ));
                }
            },
        };
        log::info!("volume {name} ({} bytes) is served", vol.size());
        self.quotas.attach(&vol);
        let out = volume_json(&vol);
        self.lock_map().insert(name.to_string(), Slot::Ready(vol));
        out
    }

    pub fn list_volumes(&self) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let mut out = Vec::new();
        for (name, slot) in self.entries() {
            out.push(match slot {
                Slot::Ready(v) => match volume_json(&v) {
                    Ok(j) => j,
                    Err(e) => broken_json(&self.volumes_dir, &name, &e.message),
                },
                Slot::Broken(msg) => broken_json(&self.volumes_dir, &name, &msg),
            });
        }
        Ok(Value::Array(out))
    }

    pub fn volume_info(&self, name: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let slot = self.lock_map().get(name).cloned();
        match slot {
            Some(Slot::Ready(v)) => {
                let mut j = volume_json(&v)?;
                if let Some(flatten) = self.flattens.status(&v) {
                    j["flatten"] = flatten;
                }
                j["snapshot_list"] = serde_json::to_value(user_snapshots(&v))
                    .map_err(|e| VolumeError::new(ErrorKind::IoError, e.to_string()))?;
                self.attributes(&v, &mut j);
                Ok(j)
            }
            Some(Slot::Broken(msg)) => Ok(broken_json(&self.volumes_dir, name, &msg)),
            None => Err(not_found(name)),
        }
    }

    /// Seed 002's attributes in `volume info`: owner, access list, quota
    /// use, free space within the quota, bytes only snapshots hold.
    fn attributes(&self, vol: &Volume, j: &mut Value) {
        let access = vol.access();
        let budget = self.quotas.budget(access.owner);
        j["access"] = super::access::to_json(&access);
        j["snapshot_bytes"] = json!(vol.snapshot_bytes());
        j["quota"] = match budget.limit() {
            Some(limit) => {
                let room = limit.saturating_sub(budget.used());
                if let Some(free) = j["free_bytes"].as_u64() {
                    j["free_bytes"] = json!(free.min(room));
                }
                json!({ "limit": limit, "used": budget.used(), "room": room })
            }
            None => json!({ "limit": null, "used": budget.used() }),
        };
    }

    /// Deletes a volume and its snapshots; for a Ceph volume, also its
    /// images and objects in the pool (see [`Registry::remove_volume`]).
    pub fn delete_volume(&self, name: &str) -> Result<Value, VolumeError> {
        self.remove_volume(name, Removal::Delete)
    }

    /// Forgets a Ceph volume here and releases its lock, leaving everything
    /// in the pool for `volume attach` (here or on another daemon).
    pub fn detach_volume(&self, name: &str) -> Result<Value, VolumeError> {
        self.remove_volume(name, Removal::Detach)
    }

    /// A Ceph volume's pool data is removed only by the daemon that holds
    /// its lock: one whose lock was broken (fenced) or cannot be taken
    /// (another daemon serves it) is refused before anything changes, and
    /// an interrupted removal keeps the volume listed (broken) so that
    /// `delete` can run again.
    fn remove_volume(&self, name: &str, removal: Removal) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        let dir = self.volumes_dir.join(name);
        let in_ceph = dir.join(CEPH_POINTER).exists();
        if removal == Removal::Detach && !in_ceph {
            if !self.lock_map().contains_key(name) {
                return Err(not_found(name));
            }
            return Err(VolumeError::invalid(format!(
                "volume {name} is not in Ceph: detach forgets a Ceph volume and leaves its \
                 data in the pool; `snapblk volume delete {name}` deletes a local volume"
            )));
        }
        self.check_not_grouped(name)?;
        self.check_closable(name, "delete them")?;
        let slot = {
            let mut map = self.lock_map();
            let slot = map.get(name).ok_or_else(|| not_found(name))?;
            self.check_unused(name, slot)?;
            if let Slot::Ready(v) = slot {
                if v.storage().ceph_fenced() && removal == Removal::Delete {
                    return Err(VolumeError::new(
                        ErrorKind::Busy,
                        format!(
                            "volume {name}: another daemon broke this daemon's lock on its RBD \
                             image and serves it now, so its pool data is not this daemon's to \
                             delete; delete it on that daemon, or forget it here with \
                             `snapblk volume detach {name}`"
                        ),
                    ));
                }
            }
            map.remove(name).expect("present")
        };
        self.flattens.stop(name);
        let storage = match slot {
            Slot::Ready(vol) => {
                if let Err(e) = block_on(vol.shutdown()) {
                    log::warn!("volume {name}: flush before delete failed: {e}");
                }
                Some(vol.storage().clone())
            }
            Slot::Broken(_) => None,
        };
        if in_ceph && removal == Removal::Delete {
            // A broken volume's lock is taken again, or the delete refused.
            let destroyed = storage
                .map_or_else(|| storage_of(&dir), Ok)
                .and_then(Storage::destroy_pool_data);
            if let Err(e) = destroyed {
                let message = format!(
                    "cannot delete the pool data of Ceph volume {name}: {e}; if another \
                     daemon serves it, delete it there, or forget it here and leave the pool \
                     as it is with `snapblk volume detach {name}`"
                );
                self.lock_map()
                    .insert(name.to_string(), Slot::Broken(message.clone()));
                return Err(VolumeError::new(ErrorKind::Busy, message));
            }
        }
        let doomed = self.volumes_dir.join(format!("{DELETING}{name}"));
        if doomed.exists() {
            fs::remove_dir_all(&doomed)?;
        }
        fs::rename(&dir, &doomed)?;
        sync_dir(&self.volumes_dir)?;
        fs::remove_dir_all(&doomed)?;
        self.forget_devices(|s| s.volume == name);
        match removal {
            Removal::Delete => {
                log::info!("deleted volume {name}");
                Ok(json!({ "name": name, "deleted": true }))
            }
            Removal::Detach => {
                log::info!("detached volume {name}; its data stays in the Ceph pool");
                Ok(json!({ "name": name, "detached": true }))
            }
        }
    }

    /// Refuses closing volume `name` (to delete or reopen it) while a
    /// device serves it or clones read from its snapshots (`clones_then`
    /// says what to do with them besides flattening).
    fn check_closable(&self, name: &str, clones_then: &str) -> Result<(), VolumeError> {
        self.check_no_device(name)?;
        if let Ok(vol) = self.volume(name) {
            let clones = vol.clones();
            if !clones.is_empty() {
                return Err(VolumeError::new(
                    ErrorKind::Busy,
                    format!(
                        "volume {name} has clones that read from its snapshots: {}; {clones_then}, \
                         or make them independent first with `snapblk volume flatten CLONE`",
                        clones.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses taking `slot` out of the map while a restore or revert holds
    /// it or anything but the registry holds the volume. Called with the
    /// map locked: exports are resolved under that lock, so none can appear
    /// between this check and the caller's change of the slot.
    fn check_unused(&self, name: &str, slot: &Slot) -> Result<(), VolumeError> {
        if let Some(claim) = self.claimed(name) {
            return Err(restoring(name, claim));
        }
        match slot {
            // The registry holds one reference; every NBD connection's
            // view (and any request in progress) holds another.
            Slot::Ready(v) if Arc::strong_count(v) > 1 => Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "volume {name} is in use by {} open export connection(s) or requests; \
                     disconnect its NBD clients first",
                    Arc::strong_count(v) - 1
                ),
            )),
            _ => Ok(()),
        }
    }

    /// `volume.reopen`: closes volume `name` and opens it again from its
    /// storage, as a daemon restart would, without stopping the others: a
    /// volume whose metadata journal failed refuses copy-on-write writes
    /// until then, and one that could not open (a Ceph cluster that was
    /// down at start, a file fixed by hand) is tried again. Writes not yet
    /// flushed may be lost if the final flush fails, as after a crash.
    pub fn reopen_volume(&self, name: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        self.check_closable(name, "stop their use first")?;
        let parent = match Volume::parent_of(&Storage::Dir(self.volumes_dir.join(name))) {
            Ok(Some(parent)) => Some(self.volume(&parent).map_err(|e| {
                VolumeError::new(
                    ErrorKind::Busy,
                    format!(
                        "volume {name} is a clone of {parent}, which is not available ({}); \
                         reopen {parent} first",
                        e.message
                    ),
                )
            })?),
            _ => None,
        };
        let old = {
            let mut map = self.lock_map();
            let slot = map.get(name).ok_or_else(|| not_found(name))?;
            self.check_unused(name, slot)?;
            let reopening = Slot::Broken("being reopened".to_string());
            map.insert(name.to_string(), reopening).expect("present")
        };
        self.flattens.stop(name);
        if let Slot::Ready(vol) = old {
            if let Err(e) = block_on(vol.shutdown()) {
                log::warn!("volume {name}: flush before reopening failed: {e}");
            }
            if let Err(e) = vol.storage().release_ceph_lock() {
                log::warn!("volume {name}: cannot release its RBD image's lock: {e}");
            }
        }
        match open_volume(&self.volumes_dir, name, parent) {
            Ok(vol) => {
                log::info!("reopened volume {name} ({} bytes)", vol.size());
                self.lock_map()
                    .insert(name.to_string(), Slot::Ready(vol.clone()));
                if vol.flattening() {
                    if let Err(e) = self.flattens.start(&vol) {
                        log::error!("cannot resume the flatten of {name}: {}", e.message);
                    }
                }
                self.quotas.refresh(&self.ready_volumes());
                volume_json(&vol)
            }
            Err(e) => {
                let message = format!("cannot reopen volume {name}: {e}");
                self.lock_map()
                    .insert(name.to_string(), Slot::Broken(e.to_string()));
                Err(VolumeError::new(ErrorKind::IoError, message))
            }
        }
    }

    /// `volume.flatten`: starts copying into clone `name` every chunk it
    /// still reads from its parent (progress in `volume.info`).
    pub fn flatten_volume(&self, name: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let vol = self.volume(name)?;
        self.flattens.start(&vol)?;
        let mut j = json!({ "name": name });
        if let Some(flatten) = self.flattens.status(&vol) {
            j["flatten"] = flatten;
        }
        Ok(j)
    }

    /// `snapshot.revert`: the live volume's content becomes snapshot
    /// `name`'s. Refused while a device serves the live volume (or anything
    /// else holds it: an NBD connection, a request); `force` stops its
    /// device first. The caller checks (or, forced, stops) copy jobs and
    /// replication. The volume stays claimed while the revert runs.
    pub fn revert(&self, volume: &str, name: &str, force: bool) -> Result<Value, VolumeError> {
        if name.starts_with('.') {
            return Err(VolumeError::not_found(format!(
                "snapshot {name} of volume {volume} not found"
            )));
        }
        if force {
            let live = self.lock_devices().contains_key(volume);
            if live {
                self.stop_device(volume)?;
            }
        }
        let claim = self.claim(volume, Claim::Revert)?;
        let _g = self.gate()?;
        let started = std::time::Instant::now();
        let reverted = block_on(claim.volume.revert(name))?;
        let mut j = serde_json::to_value(&reverted)
            .map_err(|e| VolumeError::new(ErrorKind::IoError, e.to_string()))?;
        j["volume"] = json!(volume);
        j["elapsed_us"] = json!(started.elapsed().as_micros() as u64);
        Ok(j)
    }

    pub fn create_snapshot(&self, volume: &str, name: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        validate_name("snapshot", name)?;
        let vol = self.volume(volume)?;
        self.quotas.check_snapshot(vol.access().owner, volume)?;
        let created = block_on(vol.create_snapshot(name))?;
        log::info!("volume {volume}: created snapshot {name}");
        let mut j = serde_json::to_value(&created)
            .map_err(|e| VolumeError::new(ErrorKind::IoError, e.to_string()))?;
        j["volume"] = json!(volume);
        Ok(j)
    }

    pub fn list_snapshots(&self, volume: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let vol = self.volume(volume)?;
        serde_json::to_value(user_snapshots(&vol))
            .map_err(|e| VolumeError::new(ErrorKind::IoError, e.to_string()))
    }

    /// `snapshot.diff`: the changed extents between snapshot `from` and
    /// `to` (the live volume if `None`), from the engine's generations.
    pub fn diff_snapshots(
        &self,
        volume: &str,
        from: &str,
        to: Option<&str>,
    ) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let vol = self.volume(volume)?;
        for name in std::iter::once(from).chain(to) {
            if name.starts_with('.') {
                return Err(VolumeError::not_found(format!(
                    "snapshot {name} of volume {volume} not found"
                )));
            }
        }
        let changed = vol.changed_extents(from, to, 0, vol.size())?;
        let extents: Vec<Value> = changed
            .iter()
            .map(|r| json!({"offset": r.start, "length": r.end - r.start}))
            .collect();
        Ok(json!({
            "volume": volume,
            "from": from,
            "to": to,
            "size": vol.size(),
            "chunk_size": vol.chunk_size(),
            "changed_bytes": changed.iter().map(|r| r.end - r.start).sum::<u64>(),
            "extents": extents,
        }))
    }

    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        if name.starts_with('.') {
            // Engine-internal (a copy job's): users cannot see or delete it.
            return Err(VolumeError::not_found(format!(
                "snapshot {name} of volume {volume} not found"
            )));
        }
        self.check_not_group_snapshot(volume, name)?;
        self.check_snapshot_unused(volume, name)?;
        let vol = self.volume(volume)?;
        block_on(vol.delete_snapshot(name)).map_err(|e| match e {
            EngineError::NotFound(_) => {
                VolumeError::not_found(format!("snapshot {name} of volume {volume} not found"))
            }
            e => e.into(),
        })?;
        log::info!("volume {volume}: deleted snapshot {name}");
        self.forget_snapshot_devices(volume, name);
        Ok(json!({ "volume": volume, "name": name, "deleted": true }))
    }

    /// `busy` while a device serves snapshot `volume@name`.
    pub(super) fn check_snapshot_unused(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<(), VolumeError> {
        let key = format!("{volume}@{name}");
        if let Some(what) = self.lock_devices().get(&key).and_then(DeviceEntry::in_use) {
            return Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "snapshot {name} of volume {volume} is in use by {what}; stop it first with \
                     `snapblk device stop {key}`"
                ),
            ));
        }
        Ok(())
    }

    /// Drops the (not running) device entries of a deleted snapshot.
    pub(super) fn forget_snapshot_devices(&self, volume: &str, name: &str) {
        let key = format!("{volume}@{name}");
        self.forget_devices(|s| s.key() == key);
    }

    /// Waits for in-flight requests, refuses new ones, stops every device
    /// (`devices.json` stays as it is: they come back at next start), and
    /// flushes and closes every volume. Returns how many volumes failed to
    /// shut down cleanly.
    pub fn shutdown(&self) -> usize {
        let mut closing = self.closing.write().unwrap_or_else(|e| e.into_inner());
        *closing = true;
        self.flattens.shutdown();
        let running = std::mem::take(&mut *self.lock_devices());
        for (key, entry) in running {
            if let DeviceState::Running(mut dev) | DeviceState::StopFailed(mut dev, _) = entry.state
            {
                let path = dev.path();
                match dev.stop() {
                    Ok(()) => log::info!("device {path} ({key}) stopped"),
                    Err(e) => log::error!("device {path} ({key}): stop failed: {e}"),
                }
            }
        }
        // Out of the map, so that each is dropped (its Ceph images closed)
        // by the thread that closed it, not one after another later.
        let ready: Vec<(String, Arc<Volume>)> = std::mem::take(&mut *self.lock_map())
            .into_iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Ready(vol) => Some((name, vol)),
                _ => None,
            })
            .collect();
        // In parallel: a volume whose storage stopped answering (a Ceph
        // cluster that is down waits out its op timeouts) must not hold up
        // the flush of the others until the service manager kills us.
        let threads = ready.len().min(SHUTDOWN_THREADS);
        let failed = AtomicUsize::new(0);
        let queue = Mutex::new(ready.into_iter());
        let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).next();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    while let Some((name, vol)) = next() {
                        if !close_volume(&name, &vol) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        failed.into_inner()
    }

    fn lock_devices(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DeviceEntry>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The specs of every device `devices.json` lists, in key order.
    fn device_specs(&self) -> Vec<DeviceSpec> {
        self.lock_devices()
            .values()
            .filter(|e| e.persisted)
            .map(|e| e.spec.clone())
            .collect()
    }

    fn save_devices(&self) -> Result<(), VolumeError> {
        let _s = self.save_lock.lock().unwrap_or_else(|e| e.into_inner());
        devices::save(&self.data_dir, &self.device_specs()).map_err(VolumeError::from)
    }

    /// Drops the (not running) device entries `doomed` selects, after their
    /// volume or snapshot was deleted; called under `mutate`.
    fn forget_devices(&self, doomed: impl Fn(&DeviceSpec) -> bool) {
        let before = {
            let mut map = self.lock_devices();
            let before = map.len();
            map.retain(|_, e| !doomed(&e.spec));
            before - map.len()
        };
        if before > 0 {
            if let Err(e) = self.save_devices() {
                log::error!("{}", e.message);
            }
        }
    }

    /// The view a device for `spec` serves.
    fn device_view(&self, spec: &DeviceSpec) -> Result<View, VolumeError> {
        let vol = self.volume(&spec.volume)?;
        match &spec.snapshot {
            None => Ok(vol.live()),
            Some(snap) => vol.snapshot_view(snap).map_err(|e| match e {
                EngineError::NotFound(_) | EngineError::SnapshotGone(_) => VolumeError::not_found(
                    format!("snapshot {snap} of volume {} not found", spec.volume),
                ),
                e => e.into(),
            }),
        }
    }

    /// Starts the kernel device for `spec` serving `view` (slow: no lock held).
    fn start_kernel_device(
        &self,
        view: View,
        spec: &DeviceSpec,
    ) -> Result<Box<dyn RunningDevice>, VolumeError> {
        self.driver.start(view, spec).map_err(|e| {
            VolumeError::new(
                ErrorKind::IoError,
                format!("cannot start a ublk device for {}: {e}", spec.key()),
            )
        })
    }

    /// Starts every device listed in `devices.json` (at daemon start, before
    /// the control socket opens). A device that fails is logged and kept as
    /// failed; the daemon goes on. Returns how many failed.
    pub fn restore_devices(&self) -> usize {
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        let specs = match devices::load(&self.data_dir) {
            Ok(s) => s,
            Err(e) => {
                log::error!("{e}");
                return 1;
            }
        };
        let mut failed = 0;
        let mut changed = false;
        for mut spec in specs {
            let key = spec.key();
            if self.lock_devices().contains_key(&key) {
                log::warn!(
                    "{}: device {key} is listed twice; starting it once",
                    devices::DEVICES_FILE
                );
                continue;
            }
            let started = self
                .device_view(&spec)
                .and_then(|view| self.start_kernel_device(view, &spec));
            let (shown, state) = match started {
                Ok(dev) => {
                    log::info!("device {} ({key}) restored", dev.path());
                    changed |= spec.last_id != Some(dev.id());
                    spec.last_id = Some(dev.id());
                    (Some(Shown::of(&*dev)), DeviceState::Running(dev))
                }
                Err(e) => {
                    failed += 1;
                    log::error!(
                        "device for {key} could not be restored: {}; it stays listed: retry with \
                         `snapblk device start {}{}` or drop it with `snapblk device stop {key}`",
                        e.message,
                        spec.volume,
                        spec.snapshot
                            .as_ref()
                            .map(|s| format!(" --snapshot {s}"))
                            .unwrap_or_default(),
                    );
                    (None, DeviceState::Failed(e.message))
                }
            };
            self.lock_devices().insert(
                key,
                DeviceEntry {
                    spec,
                    shown,
                    state,
                    persisted: true,
                },
            );
        }
        if changed {
            if let Err(e) = self.save_devices() {
                log::error!("{}", e.message);
            }
        }
        failed
    }

    /// `device.start`. The kernel call runs without the `mutate` lock, so
    /// volume and snapshot operations go on meanwhile.
    pub fn start_device(
        &self,
        volume: &str,
        snapshot: Option<String>,
        queues: Option<u16>,
        depth: Option<u16>,
        recovery: Option<bool>,
        zero_copy: Option<bool>,
    ) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        validate_name("volume", volume)?;
        if let Some(s) = &snapshot {
            validate_name("snapshot", s)?;
        }
        let queues = queues.unwrap_or(devices::DEFAULT_QUEUES);
        let depth = depth.unwrap_or(devices::DEFAULT_DEPTH);
        if !(1..=devices::MAX_QUEUES).contains(&queues) {
            return Err(VolumeError::invalid(format!(
                "queues {queues} must be between 1 and {}",
                devices::MAX_QUEUES
            )));
        }
        if !(1..=devices::MAX_DEPTH).contains(&depth) {
            return Err(VolumeError::invalid(format!(
                "depth {depth} must be between 1 and {}",
                devices::MAX_DEPTH
            )));
        }
        let mut spec = DeviceSpec {
            volume: volume.to_string(),
            snapshot,
            queues,
            depth,
            last_id: None,
            recovery: recovery.unwrap_or(true),
            zero_copy: zero_copy.unwrap_or(true),
        };
        let key = spec.key();
        // Under `mutate`: claim the key (Starting) and take the view.
        let (view, retry) = {
            let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
            let retry = match self.lock_devices().get(&key) {
                None => false,
                Some(entry) => match &entry.state {
                    // Retrying an entry whose start failed: the same kernel device.
                    DeviceState::Failed(_) => {
                        spec.last_id = entry.spec.last_id;
                        true
                    }
                    DeviceState::Starting => {
                        return Err(VolumeError::new(
                            ErrorKind::Busy,
                            format!("a device for {key} is being started; wait for it"),
                        ))
                    }
                    _ => {
                        return Err(VolumeError::new(
                            ErrorKind::AlreadyExists,
                            format!(
                            "{key} already has {}; stop it first with `snapblk device stop {key}`",
                            entry.in_use().unwrap_or_default()
                        ),
                        ))
                    }
                },
            };
            let view = match self.device_view(&spec) {
                Ok(v) => v,
                Err(e) => {
                    if let Some(entry) = self.lock_devices().get_mut(&key) {
                        entry.state = DeviceState::Failed(e.message.clone());
                    }
                    return Err(e);
                }
            };
            let mut map = self.lock_devices();
            match map.get_mut(&key) {
                Some(entry) => entry.state = DeviceState::Starting,
                None => {
                    map.insert(
                        key.clone(),
                        DeviceEntry {
                            spec: spec.clone(),
                            shown: None,
                            state: DeviceState::Starting,
                            persisted: false,
                        },
                    );
                }
            }
            (view, retry)
        };
        let dev = match self.start_kernel_device(view, &spec) {
            Ok(d) => d,
            Err(e) => {
                let mut map = self.lock_devices();
                if retry {
                    // A device restore failed for: keep it listed, with the new reason.
                    if let Some(entry) = map.get_mut(&key) {
                        entry.state = DeviceState::Failed(e.message.clone());
                    }
                } else {
                    map.remove(&key);
                }
                return Err(e);
            }
        };
        let path = dev.path();
        spec.last_id = Some(dev.id());
        let old_spec = {
            let mut map = self.lock_devices();
            let entry = map.get_mut(&key).expect("a Starting entry stays");
            let old = std::mem::replace(&mut entry.spec, spec.clone());
            entry.shown = Some(Shown::of(&*dev));
            entry.state = DeviceState::Running(dev);
            entry.persisted = true;
            old
        };
        if let Err(e) = self.save_devices() {
            // Not persisted: do not leave a device that would not come back.
            let dev = {
                let mut map = self.lock_devices();
                let entry = map.get_mut(&key).expect("present");
                let state = if retry {
                    entry.spec = old_spec;
                    std::mem::replace(&mut entry.state, DeviceState::Failed(e.message.clone()))
                } else {
                    map.remove(&key).expect("present").state
                };
                match state {
                    DeviceState::Running(dev) => Some(dev),
                    _ => None,
                }
            };
            if let Some(mut dev) = dev {
                if let Err(se) = dev.stop() {
                    log::error!("device {path} ({key}): stop failed: {se}");
                }
            }
            return Err(e);
        }
        let map = self.lock_devices();
        let entry = &map[&key];
        let g = entry.shown.as_ref().expect("set above");
        log::info!(
            "device {path} started for {key} ({} queue(s), depth {}, {}, buffers: {})",
            g.queues,
            g.depth,
            if g.recovery {
                "USER_RECOVERY"
            } else {
                "no recovery: it dies with the daemon"
            },
            g.buffers
        );
        Ok(entry.json())
    }

    /// `device.stop`: `device` is `VOL`, `VOL@SNAP` or `/dev/ublkbN`. The
    /// kernel calls run without the `mutate` lock. A stop that fails (the
    /// kernel timed out) leaves the entry listed, and a second `device.stop`
    /// tries again.
    pub fn stop_device(&self, device: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let (key, mut dev) = {
            let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
            let mut map = self.lock_devices();
            let key = if device.starts_with('/') {
                map.iter()
                    .find(|(_, e)| e.path().as_deref() == Some(device))
                    .map(|(k, _)| k.clone())
                    .ok_or_else(|| {
                        VolumeError::not_found(format!(
                            "no device {device} is running here; list them with `snapblk device list`"
                        ))
                    })?
            } else {
                if !map.contains_key(device) {
                    return Err(VolumeError::not_found(format!(
                        "no device for {device}; list them with `snapblk device list`"
                    )));
                }
                device.to_string()
            };
            let entry = map.get_mut(&key).expect("present");
            match std::mem::replace(&mut entry.state, DeviceState::Stopping) {
                DeviceState::Running(dev) | DeviceState::StopFailed(dev, _) => {
                    entry.persisted = false;
                    (key, dev)
                }
                DeviceState::Failed(m) => {
                    entry.state = DeviceState::Failed(m);
                    let entry = map.remove(&key).expect("present");
                    drop(map);
                    let mut out = entry.json();
                    out["stopped"] = json!(true);
                    out["state"] = json!("stopped");
                    log::info!("device entry for {key} dropped (it was not running)");
                    self.save_devices()?;
                    return Ok(out);
                }
                other => {
                    let what = if matches!(other, DeviceState::Starting) {
                        "being started"
                    } else {
                        "being stopped already"
                    };
                    entry.state = other;
                    return Err(VolumeError::new(
                        ErrorKind::Busy,
                        format!("the device for {key} is {what}; wait for it"),
                    ));
                }
            }
        };
        // Out of devices.json first: a stopped device must not come back.
        let saved = self.save_devices();
        let path = dev.path();
        if let Err(e) = dev.stop() {
            log::error!("device {path} ({key}): stop failed: {e}");
            if let Some(entry) = self.lock_devices().get_mut(&key) {
                entry.state = DeviceState::StopFailed(dev, e.to_string());
            }
            return Err(VolumeError::new(
                ErrorKind::IoError,
                format!(
                    "device {path} ({key}) did not stop: {e}; it stays listed (and will not come \
                     back at restart): retry with `snapblk device stop {key}`"
                ),
            ));
        }
        log::info!("device {path} ({key}) stopped");
        let entry = self
            .lock_devices()
            .remove(&key)
            .expect("a Stopping entry stays");
        let mut out = entry.json();
        out["stopped"] = json!(true);
        out["state"] = json!("stopped");
        saved?;
        Ok(out)
    }

    /// `device.list`: every device, in `VOL` / `VOL@SNAP` order.
    pub fn list_devices(&self) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        Ok(Value::Array(
            self.lock_devices()
                .values()
                .map(DeviceEntry::json)
                .collect(),
        ))
    }

    /// Paths of the kernel devices serving `volume` or one of its snapshots.
    pub fn device_paths_of(&self, volume: &str) -> Vec<PathBuf> {
        self.paths_of_devices(|s| s.volume == volume)
    }

    /// Paths of the kernel devices serving `volume` itself (writable; a
    /// filesystem on them is what a quiesce freezes).
    pub fn live_device_paths_of(&self, volume: &str) -> Vec<PathBuf> {
        self.paths_of_devices(|s| s.volume == volume && s.snapshot.is_none())
    }

    fn paths_of_devices(&self, which: impl Fn(&DeviceSpec) -> bool) -> Vec<PathBuf> {
        self.lock_devices()
            .values()
            .filter(|d| which(&d.spec))
            .filter_map(|d| d.path().map(PathBuf::from))
            .collect()
    }

    /// How many devices are asked for (running or failed).
    pub fn device_count(&self) -> usize {
        self.lock_devices().len()
    }

    /// `features`: what the kernel's ublk driver offers.
    pub fn features(&self) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        self.driver
            .features()
            .map_err(|e| VolumeError::new(ErrorKind::IoError, e.to_string()))
    }

    /// Names the NBD server exports: every healthy volume and `VOL@SNAP`.
    pub fn export_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, slot) in self.entries() {
            if let Slot::Ready(vol) = slot {
                out.push(name.clone());
                for s in user_snapshots(&vol) {
                    out.push(format!("{name}@{}", s.name));
                }
            }
        }
        out
    }

    /// Resolves an export name: `VOL` is the live volume (read-write),
    /// `VOL@SNAP` a snapshot (read-only).
    pub fn resolve_export(&self, export: &str) -> Result<View, EngineError> {
        let (vol, snap) = match export.split_once('@') {
            Some((v, s)) => (v, Some(s)),
            None => (export, None),
        };
        let slot = self.lock_map().get(vol).cloned();
        let vol = match slot {
            // A revert leaves snapshots served (they do not change).
            Some(Slot::Ready(_))
                if self
                    .claimed(vol)
                    .is_some_and(|c| c == Claim::Restore || snap.is_none()) =>
            {
                return Err(EngineError::InvalidArgument(
                    restoring(vol, self.claimed(vol).unwrap()).message,
                ))
            }
            Some(Slot::Ready(v)) => v,
            Some(Slot::Broken(msg)) => {
                return Err(EngineError::Corrupt(format!("volume {vol}: {msg}")))
            }
            None => return Err(EngineError::NotFound(format!("volume {vol}"))),
        };
        match snap {
            None => Ok(vol.live()),
            Some(s) if s.starts_with('.') => Err(EngineError::NotFound(format!("snapshot {s}"))),
            Some(s) => vol.snapshot_view(s),
        }
    }

    /// The export for the empty name: the only volume, if there is exactly one.
    pub fn default_export_name(&self) -> Option<String> {
        let map = self.lock_map();
        if map.len() == 1 {
            map.keys().next().cloned()
        } else {
            None
        }
    }
}

/// A volume's snapshots without the engine-internal ones (names starting
/// with '.', which users cannot create: copy jobs' point-in-time images).
fn user_snapshots(vol: &Volume) -> Vec<crate::engine::SnapshotInfo> {
    let mut list = vol.list_snapshots();
    list.retain(|s| !s.name.starts_with('.'));
    list
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::validate_name;
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::mpsc;

    /// Signals that a start began, then waits for the go.
    type StartGate = (mpsc::Sender<()>, mpsc::Receiver<()>);

    /// A driver that runs no kernel device: ids count up, stops are
    /// recorded, at most 2 queues are granted (a 2-CPU machine), and a
    /// `gate` makes starts wait until the test lets them go on.
    #[derive(Clone, Default)]
    struct FakeDriver {
        next_id: Arc<AtomicU32>,
        stopped: Arc<Mutex<Vec<String>>>,
        fail: Arc<Mutex<Option<String>>>,
        /// Stops fail (time out) while set.
        fail_stop: Arc<AtomicBool>,
        /// `Some((entered, go))`: a start sends on `entered`, then waits on `go`.
        gate: Arc<Mutex<Option<StartGate>>>,
    }

    struct FakeDevice {
        id: u32,
        read_only: bool,
        queues: u16,
        depth: u16,
        recovery: bool,
        stopped: Arc<Mutex<Vec<String>>>,
        fail_stop: Arc<AtomicBool>,
    }

    impl RunningDevice for FakeDevice {
        fn id(&self) -> u32 {
            self.id
        }
        fn path(&self) -> String {
            format!("/dev/ublkb{}", self.id)
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn queues(&self) -> u16 {
            self.queues
        }
        fn depth(&self) -> u16 {
            self.depth
        }
        fn recovery(&self) -> bool {
            self.recovery
        }
        fn requests_per_queue(&self) -> Vec<u64> {
            vec![0; self.queues as usize]
        }
        fn ring_ops_per_queue(&self) -> Vec<crate::frontend::ublk::RingOps> {
            vec![Default::default(); self.queues as usize]
        }
        fn buffers(&self) -> &'static str {
            "copy"
        }
        fn stop(&mut self) -> io::Result<()> {
            if self.fail_stop.load(Ordering::SeqCst) {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "kernel timed out"));
            }
            self.stopped.lock().unwrap().push(self.path());
            Ok(())
        }
    }

    impl Driver for FakeDriver {
        fn start(&self, view: View, spec: &DeviceSpec) -> io::Result<Box<dyn RunningDevice>> {
            if let Some((entered, go)) = &*self.gate.lock().unwrap() {
                entered.send(()).unwrap();
                go.recv().unwrap();
            }
            if let Some(m) = self.fail.lock().unwrap().clone() {
                return Err(io::Error::other(m));
            }
            Ok(Box::new(FakeDevice {
                id: self.next_id.fetch_add(1, Ordering::SeqCst),
                read_only: view.read_only(),
                queues: spec.queues.min(2),
                depth: spec.depth,
                recovery: spec.recovery,
                stopped: self.stopped.clone(),
                fail_stop: self.fail_stop.clone(),
            }))
        }
        fn features(&self) -> io::Result<Value> {
            Ok(json!({"driver_features": 0, "names": []}))
        }
    }

    fn code(r: Result<Value, VolumeError>) -> ErrorKind {
        r.unwrap_err().kind
    }

    #[test]
    fn devices_start_stop_persist_and_guard_deletes() {
        let t = tempfile::tempdir().unwrap();
        let driver = FakeDriver::default();
        let reg = Registry::open(t.path(), Box::new(driver.clone())).unwrap();
        reg.create_volume("v", 1 << 20, None, Some(1), None, None)
            .unwrap();
        reg.create_snapshot("v", "s").unwrap();

        let d = reg.start_device("v", None, None, None, None, None).unwrap();
        assert_eq!(d["path"], "/dev/ublkb0");
        assert_eq!(d["read_only"], false);
        assert_eq!(
            (d["queues"].clone(), d["depth"].clone()),
            (json!(1), json!(64))
        );
        let d = reg
            .start_device("v", Some("s".into()), Some(2), Some(128), None, None)
            .unwrap();
        assert_eq!(d["path"], "/dev/ublkb1");
        assert_eq!(d["read_only"], true);
        assert_eq!(d["snapshot"], "s");
        // What the kernel granted (2 of the 2 queues asked), not what was asked.
        assert_eq!(
            (d["queues"].clone(), d["recovery"].clone()),
            (json!(2), json!(true))
        );

        assert_eq!(
            code(reg.start_device("v", None, None, None, None, None)),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            code(reg.start_device("w", None, None, None, None, None)),
            ErrorKind::NotFound
        );
        assert_eq!(
            code(reg.start_device("v", Some("x".into()), None, None, None, None)),
            ErrorKind::NotFound
        );
        for (q, dp) in [(0, 64), (1, 0), (1, 4097), (65, 64)] {
            assert_eq!(
                code(reg.start_device("v", None, Some(q), Some(dp), None, None)),
                ErrorKind::InvalidArgument
            );
        }

        let e = reg.delete_volume("v").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy);
        assert!(e.message.contains("/dev/ublkb"), "{}", e.message);
        assert!(e.message.contains("stop it first"), "{}", e.message);
        let e = reg.delete_snapshot("v", "s").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy);
        assert!(e.message.contains("/dev/ublkb1"), "{}", e.message);

        let saved = devices::load(t.path()).unwrap();
        assert_eq!(saved.len(), 2);
        assert_eq!(saved[1].key(), "v@s");
        assert_eq!((saved[0].last_id, saved[1].last_id), (Some(0), Some(1)));
        assert_eq!((saved[1].queues, saved[1].depth), (2, 128));

        // Stop by path, then by name.
        reg.stop_device("/dev/ublkb1").unwrap();
        assert_eq!(code(reg.stop_device("/dev/ublkb1")), ErrorKind::NotFound);
        assert_eq!(devices::load(t.path()).unwrap().len(), 1);
        reg.delete_snapshot("v", "s").unwrap();
        let listed = reg.list_devices().unwrap();
        assert_eq!(listed.as_array().unwrap().len(), 1);

        // Shutdown stops the device but keeps devices.json; a new registry
        // starts it again.
        assert_eq!(reg.shutdown(), 0);
        assert_eq!(
            *driver.stopped.lock().unwrap(),
            ["/dev/ublkb1", "/dev/ublkb0"]
        );
        drop(reg);
        assert_eq!(devices::load(t.path()).unwrap().len(), 1);
        let reg = Registry::open(t.path(), Box::new(driver.clone())).unwrap();
        assert_eq!(reg.restore_devices(), 0);
        let listed = reg.list_devices().unwrap();
        assert_eq!(listed[0]["path"], "/dev/ublkb2");
        assert_eq!(listed[0]["state"], "running");
        assert_eq!(devices::load(t.path()).unwrap()[0].last_id, Some(2));
        reg.stop_device("v").unwrap();
        assert!(devices::load(t.path()).unwrap().is_empty());
        reg.delete_volume("v").unwrap();
        reg.shutdown();
    }

    #[test]
    fn failed_restores_stay_listed_and_never_stop_the_registry() {
        let t = tempfile::tempdir().unwrap();
        let driver = FakeDriver::default();
        let reg = Registry::open(t.path(), Box::new(driver.clone())).unwrap();
        reg.create_volume("v", 1 << 20, None, Some(1), None, None)
            .unwrap();
        reg.shutdown();
        drop(reg);
        devices::save(
            t.path(),
            &[
                DeviceSpec {
                    volume: "v".into(),
                    snapshot: None,
                    queues: 1,
                    depth: 32,
                    last_id: Some(7),
                    recovery: true,
                    zero_copy: true,
                },
                DeviceSpec {
                    volume: "gone".into(),
                    snapshot: None,
                    queues: 1,
                    depth: 64,
                    last_id: None,
                    recovery: false,
                    zero_copy: true,
                },
            ],
        )
        .unwrap();
        *driver.fail.lock().unwrap() = Some("no ublk here".into());
        let reg = Registry::open(t.path(), Box::new(driver.clone())).unwrap();
        assert_eq!(reg.restore_devices(), 2);
        let listed = reg.list_devices().unwrap();
        assert_eq!(listed.as_array().unwrap().len(), 2);
        assert_eq!(listed[1]["volume"], "v");
        assert!(listed[1]["path"].is_null());
        assert!(listed[1]["state"]
            .as_str()
            .unwrap()
            .contains("no ublk here"));
        assert!(listed[0]["state"].as_str().unwrap().contains("not found"));
        // A failed retry keeps the entry; a successful one runs it.
        let e = reg
            .start_device("v", None, None, Some(32), None, None)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::IoError);
        assert!(e.message.contains("no ublk here"), "{}", e.message);
        *driver.fail.lock().unwrap() = None;
        let failed_id = devices::load(t.path())
            .unwrap()
            .iter()
            .find(|s| s.volume == "v")
            .unwrap()
            .last_id;
        assert_eq!(failed_id, Some(7), "a failed restore keeps the last id");
        reg.start_device("v", None, None, Some(32), None, None)
            .unwrap();
        assert_eq!(devices::load(t.path()).unwrap().len(), 2);
        // Dropping a failed entry by name.
        let out = reg.stop_device("gone").unwrap();
        assert!(out["path"].is_null());
        assert_eq!(devices::load(t.path()).unwrap().len(), 1);
        reg.stop_device("v").unwrap();
        reg.shutdown();
    }

    #[test]
    fn devices_report_what_the_kernel_granted_and_persist_no_recovery() {
        let t = tempfile::tempdir().unwrap();
        let reg = Registry::open(t.path(), Box::new(FakeDriver::default())).unwrap();
        reg.create_volume("v", 1 << 20, None, Some(1), None, None)
            .unwrap();
        let d = reg
            .start_device("v", None, Some(4), Some(256), Some(false), None)
            .unwrap();
        assert_eq!(
            (
                d["queues"].clone(),
                d["depth"].clone(),
                d["recovery"].clone()
            ),
            (json!(2), json!(256), json!(false))
        );
        assert_eq!(reg.list_devices().unwrap()[0]["queues"], 2);
        // devices.json keeps what was asked: a bigger machine grants more.
        let saved = devices::load(t.path()).unwrap();
        assert_eq!((saved[0].queues, saved[0].recovery), (4, false));
        let text = fs::read_to_string(t.path().join(devices::DEVICES_FILE)).unwrap();
        assert!(text.contains("\"recovery\": false"), "{text}");
        reg.stop_device("v").unwrap();
        reg.shutdown();
    }

    #[test]
    fn a_stop_that_failed_stays_listed_and_can_be_retried() {
        let t = tempfile::tempdir().unwrap();
        let driver = FakeDriver::default();
        let reg = Registry::open(t.path(), Box::new(driver.clone())).unwrap();
        reg.create_volume("v", 1 << 20, None, Some(1), None, None)
            .unwrap();
        reg.start_device("v", None, None, None, None, None).unwrap();
        driver.fail_stop.store(true, Ordering::SeqCst);
        let e = reg.stop_device("/dev/ublkb0").unwrap_err();
        assert_eq!(e.kind, ErrorKind::IoError);
        assert!(
            e.message.contains("retry with `snapblk device stop v`"),
            "{}",
            e.message
        );
        let listed = reg.list_devices().unwrap();
        assert_eq!(listed[0]["path"], "/dev/ublkb0");
        assert!(listed[0]["state"]
            .as_str()
            .unwrap()
            .starts_with("error: stop failed: kernel timed out"));
        // Asked to stop: it does not come back at restart, and it still
        // holds its volume.
        assert!(devices::load(t.path()).unwrap().is_empty());
        assert_eq!(code(reg.delete_volume("v")), ErrorKind::Busy);
        assert_eq!(
            code(reg.start_device("v", None, None, None, None, None)),
            ErrorKind::AlreadyExists
        );
        driver.fail_stop.store(false, Ordering::SeqCst);
        let out = reg.stop_device("/dev/ublkb0").unwrap();
        assert_eq!(out["state"], "stopped");
        assert_eq!(*driver.stopped.lock().unwrap(), ["/dev/ublkb0"]);
        assert!(reg.list_devices().unwrap().as_array().unwrap().is_empty());
        reg.delete_volume("v").unwrap();
        reg.shutdown();
    }

    #[test]
    fn a_restore_claim_needs_an_unused_volume_and_excludes_every_other_use() {
        let t = tempfile::tempdir().unwrap();
        let reg = Registry::open(t.path(), Box::new(FakeDriver::default())).unwrap();
        reg.create_volume("v", 1 << 20, None, Some(1), None, None)
            .unwrap();
        reg.create_snapshot("v", "s").unwrap();
        let msg = |r: Result<RestoreClaim<'_>, VolumeError>| {
            let e = r.err().expect("refused");
            assert_eq!(e.kind, ErrorKind::Busy, "{}", e.message);
            e.message
        };
        for snap in [None, Some("s".to_string())] {
            let out = reg.start_device("v", snap, None, None, None, None).unwrap();
            let path = out["path"].as_str().unwrap().to_string();
            let m = msg(reg.claim_for_restore("v"));
            assert!(
                m.contains(&format!("in use by device {path}"))
                    && m.contains("`snapblk device stop v"),
                "{m}"
            );
            reg.stop_device(&path).unwrap();
        }
        let export = reg.resolve_export("v").ok();
        let m = msg(reg.claim_for_restore("v"));
        assert!(m.contains("1 open NBD connection(s)"), "{m}");
        drop(export);

        let claim = reg.claim_for_restore("v").unwrap();
        let restoring = "is being restored from a backup stream";
        assert!(msg(reg.claim_for_restore("v")).contains(restoring));
        assert!(reg
            .volume("v")
            .err()
            .expect("refused")
            .message
            .contains(restoring));
        assert!(reg
            .delete_volume("v")
            .unwrap_err()
            .message
            .contains(restoring));
        let e = reg
            .start_device("v", None, None, None, None, None)
            .unwrap_err();
        assert!(e.message.contains(restoring), "{}", e.message);
        let e = reg.resolve_export("v@s").err().expect("refused");
        assert!(e.to_string().contains(restoring), "{e}");
        // Information about it still works.
        reg.volume_info("v").unwrap();
        drop(claim);
        assert!(reg.resolve_export("v").is_ok());
        reg.delete_volume("v").unwrap();
        reg.shutdown();
    }

    #[test]
    fn a_slow_device_start_does_not_hold_up_volume_operations() {
        let t = tempfile::tempdir().unwrap();
        let driver = FakeDriver::default();
        let reg = Registry::open(t.path(), Box::new(driver.clone())).unwrap();
        reg.create_volume("v", 1 << 20, None, Some(1), None, None)
            .unwrap();
        let (entered_tx, entered) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        *driver.gate.lock().unwrap() = Some((entered_tx, go_rx));
        std::thread::scope(|scope| {
            let starting = scope.spawn(|| reg.start_device("v", None, None, None, None, None));
            entered.recv().unwrap();
            // The kernel call is in progress: other volumes come and go...
            reg.create_volume("w", 1 << 20, None, Some(1), None, None)
                .unwrap();
            reg.delete_volume("w").unwrap();
            // ...while this key and its volume are held.
            let listed = reg.list_devices().unwrap();
            assert_eq!(listed[0]["state"], "starting");
            assert!(listed[0]["path"].is_null());
            assert_eq!(code(reg.delete_volume("v")), ErrorKind::Busy);
            assert_eq!(code(reg.stop_device("v")), ErrorKind::Busy);
            assert_eq!(
                code(reg.start_device("v", None, None, None, None, None)),
                ErrorKind::Busy
            );
            assert!(devices::load(t.path()).unwrap().is_empty());
            go.send(()).unwrap();
            let d = starting.join().unwrap().unwrap();
            assert_eq!(d["state"], "running");
        });
        *driver.gate.lock().unwrap() = None;
        assert_eq!(devices::load(t.path()).unwrap().len(), 1);
        reg.stop_device("v").unwrap();
        reg.delete_volume("v").unwrap();
        reg.shutdown();
    }

    #[test]
    fn names() {
        for ok in ["a", "disk0", "A.b_c-d", &"x".repeat(64)] {
            validate_name("volume", ok).unwrap();
        }
        for bad in ["", ".hidden", "a@b", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(validate_name("volume", bad).is_err(), "{bad}");
        }
    }
}

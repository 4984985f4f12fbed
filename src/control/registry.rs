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
//! be deleted.
//!
//! Concurrency: the map lock is only held for lookups and inserts; create and
//! delete are serialized by a separate lock; snapshot work runs on the
//! caller's thread (each control client has one) through
//! [`crate::runtime::block_on`]. A read/write gate lets shutdown wait for
//! every in-flight request and refuse new ones.

use super::devices::{self, DeviceSpec, Driver, RunningDevice};
use super::protocol::{ControlError, ErrorCode};
use crate::backend::Storage;
use crate::engine::{EngineError, View, Volume, VolumeConfig};
use crate::engine::{DEFAULT_CHUNK_SIZE, DEFAULT_PARTITIONS};
use crate::runtime::block_on;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

const CREATING: &str = ".creating-";
const DELETING: &str = ".deleting-";

/// A device the operator asked for: running, or not (its start failed at
/// restore; the message says why).
enum DeviceState {
    Running(Box<dyn RunningDevice>),
    Failed(String),
}

struct DeviceEntry {
    spec: DeviceSpec,
    state: DeviceState,
}

impl DeviceEntry {
    fn path(&self) -> Option<String> {
        match &self.state {
            DeviceState::Running(d) => Some(d.path()),
            DeviceState::Failed(_) => None,
        }
    }

    fn json(&self) -> Value {
        let s = &self.spec;
        let (id, path, read_only, state) = match &self.state {
            DeviceState::Running(d) => (
                json!(d.id()),
                json!(d.path()),
                d.read_only(),
                "running".to_string(),
            ),
            DeviceState::Failed(m) => (
                Value::Null,
                Value::Null,
                s.snapshot.is_some(),
                format!("error: {m}"),
            ),
        };
        json!({
            "id": id,
            "path": path,
            "volume": s.volume,
            "snapshot": s.snapshot,
            "read_only": read_only,
            "queues": s.queues,
            "depth": s.depth,
            "state": state,
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
    /// Devices by `VOL` / `VOL@SNAP`. Changed only under `mutate`.
    devices: Mutex<BTreeMap<String, DeviceEntry>>,
    driver: Box<dyn Driver>,
}

/// Checks a volume or snapshot name: `[A-Za-z0-9._-]{1,64}`, not starting with '.'.
pub fn validate_name(kind: &str, name: &str) -> Result<(), ControlError> {
    let bad = |why: &str| {
        Err(ControlError::invalid(format!(
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

fn not_found(name: &str) -> ControlError {
    ControlError::not_found(format!("volume {name} not found"))
}

fn volume_json(vol: &Volume) -> Result<Value, ControlError> {
    let info = vol.info()?;
    let mut v = serde_json::to_value(&info)
        .map_err(|e| ControlError::new(ErrorCode::IoError, e.to_string()))?;
    v["state"] = json!("ok");
    Ok(v)
}

/// A volume's snapshots without the engine-internal ones (names starting
/// with '.', e.g. replication's `.repl-cp-N`), which users neither see nor delete.
fn visible_snapshots(vol: &Volume) -> Vec<crate::engine::SnapshotInfo> {
    let mut list = vol.list_snapshots();
    list.retain(|s| !s.name.starts_with('.'));
    list
}

fn broken_json(name: &str, message: &str) -> Value {
    json!({ "name": name, "state": format!("error: {message}") })
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
        for name in names {
            let storage = Storage::Dir(volumes_dir.join(&name));
            match block_on(Volume::open(&name, storage)) {
                Ok(vol) => {
                    log::info!("opened volume {name} ({} bytes)", vol.size());
                    map.insert(name, Slot::Ready(vol));
                }
                Err(e) => {
                    log::error!(
                        "volume {name} cannot be opened and will not be served: {e} \
                         (directory {}); fix or delete it with `snapblk volume delete {name}`",
                        volumes_dir.join(&name).display()
                    );
                    map.insert(name, Slot::Broken(e.to_string()));
                }
            }
        }
        Ok(Registry {
            data_dir: data_dir.to_path_buf(),
            volumes_dir,
            map: Mutex::new(map),
            mutate: Mutex::new(()),
            closing: RwLock::new(false),
            devices: Mutex::new(BTreeMap::new()),
            driver,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn gate(&self) -> Result<std::sync::RwLockReadGuard<'_, bool>, ControlError> {
        let g = self.closing.read().unwrap_or_else(|e| e.into_inner());
        if *g {
            return Err(ControlError::new(
                ErrorCode::Busy,
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

    /// The healthy volume `name`.
    pub fn volume(&self, name: &str) -> Result<Arc<Volume>, ControlError> {
        match self.lock_map().get(name) {
            Some(Slot::Ready(v)) => Ok(v.clone()),
            Some(Slot::Broken(msg)) => Err(ControlError::new(
                ErrorCode::IoError,
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
    ) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        validate_name("volume", name)?;
        if size == 0 {
            return Err(ControlError::invalid("size must be greater than 0"));
        }
        let backing = match backing {
            Some(b) if !Path::new(&b).is_absolute() => {
                return Err(ControlError::invalid(format!(
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
        };
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        let final_dir = self.volumes_dir.join(name);
        if self.lock_map().contains_key(name) || final_dir.exists() {
            return Err(ControlError::new(
                ErrorCode::AlreadyExists,
                format!("volume {name} already exists"),
            ));
        }
        let tmp_dir = self.volumes_dir.join(format!("{CREATING}{name}"));
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir)?;
        }
        fs::create_dir(&tmp_dir)?;
        let built = block_on(async {
            let vol = Volume::create(name, Storage::Dir(tmp_dir.clone()), &config).await?;
            vol.shutdown().await?;
            drop(vol);
            Ok::<(), EngineError>(())
        });
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&tmp_dir);
            return Err(e.into());
        }
        if let Err(e) = fs::rename(&tmp_dir, &final_dir).and_then(|_| sync_dir(&self.volumes_dir)) {
            let _ = fs::remove_dir_all(&tmp_dir);
            return Err(e.into());
        }
        let vol = match block_on(Volume::open(name, Storage::Dir(final_dir.clone()))) {
            Ok(v) => v,
            Err(e) => {
                // Keep what is on disk (the operator may want it) but show it.
                let msg = e.to_string();
                self.lock_map()
                    .insert(name.to_string(), Slot::Broken(msg.clone()));
                return Err(ControlError::new(
                    ErrorCode::IoError,
                    format!("volume {name} was created but cannot be opened: {msg}"),
                ));
            }
        };
        log::info!("created volume {name} ({size} bytes)");
        let out = volume_json(&vol);
        self.lock_map().insert(name.to_string(), Slot::Ready(vol));
        out
    }

    pub fn list_volumes(&self) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        let mut out = Vec::new();
        for (name, slot) in self.entries() {
            out.push(match slot {
                Slot::Ready(v) => match volume_json(&v) {
                    Ok(j) => j,
                    Err(e) => broken_json(&name, &e.message),
                },
                Slot::Broken(msg) => broken_json(&name, &msg),
            });
        }
        Ok(Value::Array(out))
    }

    pub fn volume_info(&self, name: &str) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        let slot = self.lock_map().get(name).cloned();
        match slot {
            Some(Slot::Ready(v)) => {
                let mut j = volume_json(&v)?;
                j["snapshot_list"] = serde_json::to_value(visible_snapshots(&v))
                    .map_err(|e| ControlError::new(ErrorCode::IoError, e.to_string()))?;
                Ok(j)
            }
            Some(Slot::Broken(msg)) => Ok(broken_json(name, &msg)),
            None => Err(not_found(name)),
        }
    }

    pub fn delete_volume(&self, name: &str) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((key, path)) = self
            .lock_devices()
            .values()
            .filter(|e| e.spec.volume == name)
            .find_map(|e| e.path().map(|p| (e.spec.key(), p)))
        {
            return Err(ControlError::new(
                ErrorCode::Busy,
                format!(
                    "volume {name} is in use by device {path} ({key}); stop it first with \
                     `snapblk device stop {path}`"
                ),
            ));
        }
        let slot = {
            let mut map = self.lock_map();
            match map.get(name) {
                None => return Err(not_found(name)),
                // The registry holds one reference; every NBD connection's
                // view (and any request in progress) holds another. Exports
                // are resolved under this lock, so none can appear between
                // this check and the removal.
                Some(Slot::Ready(v)) if Arc::strong_count(v) > 1 => {
                    return Err(ControlError::new(
                        ErrorCode::Busy,
                        format!(
                            "volume {name} is in use by {} open export connection(s) or requests; \
                             disconnect its NBD clients first",
                            Arc::strong_count(v) - 1
                        ),
                    ));
                }
                Some(_) => map.remove(name).expect("present"),
            }
        };
        if let Slot::Ready(vol) = slot {
            if let Err(e) = block_on(vol.shutdown()) {
                log::warn!("volume {name}: flush before delete failed: {e}");
            }
        }
        let dir = self.volumes_dir.join(name);
        let doomed = self.volumes_dir.join(format!("{DELETING}{name}"));
        if doomed.exists() {
            fs::remove_dir_all(&doomed)?;
        }
        fs::rename(&dir, &doomed)?;
        sync_dir(&self.volumes_dir)?;
        fs::remove_dir_all(&doomed)?;
        log::info!("deleted volume {name}");
        self.forget_devices(|s| s.volume == name);
        Ok(json!({ "name": name, "deleted": true }))
    }

    pub fn create_snapshot(&self, volume: &str, name: &str) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        validate_name("snapshot", name)?;
        let vol = self.volume(volume)?;
        let created = block_on(vol.create_snapshot(name))?;
        log::info!("volume {volume}: created snapshot {name}");
        let mut j = serde_json::to_value(&created)
            .map_err(|e| ControlError::new(ErrorCode::IoError, e.to_string()))?;
        j["volume"] = json!(volume);
        Ok(j)
    }

    pub fn list_snapshots(&self, volume: &str) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        let vol = self.volume(volume)?;
        serde_json::to_value(visible_snapshots(&vol))
            .map_err(|e| ControlError::new(ErrorCode::IoError, e.to_string()))
    }

    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        validate_name("snapshot", name)?;
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        let key = format!("{volume}@{name}");
        if let Some(path) = self.lock_devices().get(&key).and_then(DeviceEntry::path) {
            return Err(ControlError::new(
                ErrorCode::Busy,
                format!(
                    "snapshot {name} of volume {volume} is in use by device {path}; stop it \
                     first with `snapblk device stop {path}`"
                ),
            ));
        }
        let vol = self.volume(volume)?;
        block_on(vol.delete_snapshot(name)).map_err(|e| match e {
            EngineError::NotFound(_) => {
                ControlError::not_found(format!("snapshot {name} of volume {volume} not found"))
            }
            e => e.into(),
        })?;
        log::info!("volume {volume}: deleted snapshot {name}");
        self.forget_devices(|s| s.key() == key);
        Ok(json!({ "volume": volume, "name": name, "deleted": true }))
    }

    /// Waits for in-flight requests, refuses new ones, stops every device
    /// (`devices.json` stays as it is: they come back at next start), and
    /// flushes and closes every volume. Returns how many volumes failed to
    /// shut down cleanly.
    pub fn shutdown(&self) -> usize {
        let mut closing = self.closing.write().unwrap_or_else(|e| e.into_inner());
        *closing = true;
        let running = std::mem::take(&mut *self.lock_devices());
        for (key, entry) in running {
            if let DeviceState::Running(dev) = entry.state {
                let path = dev.path();
                match dev.stop() {
                    Ok(()) => log::info!("device {path} ({key}) stopped"),
                    Err(e) => log::error!("device {path} ({key}): stop failed: {e}"),
                }
            }
        }
        let mut failed = 0;
        for (name, slot) in self.entries() {
            if let Slot::Ready(vol) = slot {
                match block_on(vol.shutdown()) {
                    Ok(()) => log::info!("volume {name} flushed and closed"),
                    Err(e) => {
                        failed += 1;
                        log::error!("volume {name}: shutdown failed: {e}");
                    }
                }
            }
        }
        failed
    }

    fn lock_devices(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DeviceEntry>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The specs of every device asked for, in key order (what
    /// `devices.json` holds).
    fn device_specs(&self) -> Vec<DeviceSpec> {
        self.lock_devices()
            .values()
            .map(|e| e.spec.clone())
            .collect()
    }

    fn save_devices(&self) -> Result<(), ControlError> {
        devices::save(&self.data_dir, &self.device_specs()).map_err(ControlError::from)
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
    fn device_view(&self, spec: &DeviceSpec) -> Result<View, ControlError> {
        let vol = self.volume(&spec.volume)?;
        match &spec.snapshot {
            None => Ok(vol.live()),
            Some(snap) => vol.snapshot_view(snap).map_err(|e| match e {
                EngineError::NotFound(_) | EngineError::SnapshotGone(_) => ControlError::not_found(
                    format!("snapshot {snap} of volume {} not found", spec.volume),
                ),
                e => e.into(),
            }),
        }
    }

    /// Starts the kernel device for `spec`.
    fn start_kernel_device(
        &self,
        spec: &DeviceSpec,
    ) -> Result<Box<dyn RunningDevice>, ControlError> {
        let view = self.device_view(spec)?;
        self.driver
            .start(view, spec.queues, spec.depth, spec.last_id)
            .map_err(|e| {
                ControlError::new(
                    ErrorCode::IoError,
                    format!("cannot start a ublk device for {}: {e}", spec.key()),
                )
            })
    }

    /// Starts every device listed in `devices.json` (at daemon start). A
    /// device that fails is logged and kept as failed; the daemon goes on.
    /// Returns how many failed.
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
            let state = match self.start_kernel_device(&spec) {
                Ok(dev) => {
                    log::info!("device {} ({key}) restored", dev.path());
                    changed |= spec.last_id != Some(dev.id());
                    spec.last_id = Some(dev.id());
                    DeviceState::Running(dev)
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
                    DeviceState::Failed(e.message)
                }
            };
            self.lock_devices().insert(key, DeviceEntry { spec, state });
        }
        if changed {
            if let Err(e) = self.save_devices() {
                log::error!("{}", e.message);
            }
        }
        failed
    }

    /// `device.start`.
    pub fn start_device(
        &self,
        volume: &str,
        snapshot: Option<String>,
        queues: Option<u16>,
        depth: Option<u16>,
    ) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        validate_name("volume", volume)?;
        if let Some(s) = &snapshot {
            validate_name("snapshot", s)?;
        }
        let queues = queues.unwrap_or(devices::DEFAULT_QUEUES);
        let depth = depth.unwrap_or(devices::DEFAULT_DEPTH);
        if !(1..=devices::MAX_QUEUES).contains(&queues) {
            return Err(ControlError::invalid(format!(
                "queues {queues} must be between 1 and {}",
                devices::MAX_QUEUES
            )));
        }
        if !(1..=devices::MAX_DEPTH).contains(&depth) {
            return Err(ControlError::invalid(format!(
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
        };
        let key = spec.key();
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = self.lock_devices().get(&key) {
            // Retrying an entry whose restore failed: the same kernel device.
            spec.last_id = entry.spec.last_id;
        }
        if let Some(path) = self.lock_devices().get(&key).and_then(DeviceEntry::path) {
            return Err(ControlError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "{key} already has device {path}; stop it first with `snapblk device stop {path}`"
                ),
            ));
        }
        let dev = match self.start_kernel_device(&spec) {
            Ok(d) => d,
            Err(e) => {
                // A device restore failed for: keep it listed, with the new reason.
                if let Some(entry) = self.lock_devices().get_mut(&key) {
                    entry.state = DeviceState::Failed(e.message.clone());
                }
                return Err(e);
            }
        };
        let path = dev.path();
        spec.last_id = Some(dev.id());
        let previous = self.lock_devices().insert(
            key.clone(),
            DeviceEntry {
                spec: spec.clone(),
                state: DeviceState::Running(dev),
            },
        );
        if let Err(e) = self.save_devices() {
            // Not persisted: do not leave a device that would not come back.
            let entry = {
                let mut map = self.lock_devices();
                let entry = map.remove(&key);
                if let Some(p) = previous {
                    map.insert(key.clone(), p);
                }
                entry
            };
            if let Some(DeviceEntry {
                state: DeviceState::Running(dev),
                ..
            }) = entry
            {
                if let Err(se) = dev.stop() {
                    log::error!("device {path} ({key}): stop failed: {se}");
                }
            }
            return Err(e);
        }
        log::info!("device {path} started for {key} ({queues} queue(s), depth {depth})");
        Ok(self.lock_devices()[&key].json())
    }

    /// `device.stop`: `device` is `VOL`, `VOL@SNAP` or `/dev/ublkbN`.
    pub fn stop_device(&self, device: &str) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        let _m = self.mutate.lock().unwrap_or_else(|e| e.into_inner());
        let entry = {
            let mut map = self.lock_devices();
            let key = if device.starts_with('/') {
                map.iter()
                    .find(|(_, e)| e.path().as_deref() == Some(device))
                    .map(|(k, _)| k.clone())
                    .ok_or_else(|| {
                        ControlError::not_found(format!(
                            "no device {device} is running here; list them with `snapblk device list`"
                        ))
                    })?
            } else {
                if !map.contains_key(device) {
                    return Err(ControlError::not_found(format!(
                        "no device for {device}; list them with `snapblk device list`"
                    )));
                }
                device.to_string()
            };
            map.remove(&key).expect("present")
        };
        let key = entry.spec.key();
        let saved = self.save_devices();
        let mut out = entry.json();
        out["stopped"] = json!(true);
        out["state"] = json!("stopped");
        if let DeviceState::Running(dev) = entry.state {
            let path = dev.path();
            if let Err(e) = dev.stop() {
                log::error!("device {path} ({key}): stop failed: {e}");
                return Err(ControlError::new(
                    ErrorCode::IoError,
                    format!(
                        "device {path} ({key}) did not stop cleanly: {e}; it is no longer listed, \
                         check `ls /dev/ublkb*` and the kernel log"
                    ),
                ));
            }
            log::info!("device {path} ({key}) stopped");
        } else {
            log::info!("device entry for {key} dropped (it was not running)");
        }
        saved?;
        Ok(out)
    }

    /// `device.list`: every device, in `VOL` / `VOL@SNAP` order.
    pub fn list_devices(&self) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        Ok(Value::Array(
            self.lock_devices()
                .values()
                .map(DeviceEntry::json)
                .collect(),
        ))
    }

    /// How many devices are asked for (running or failed).
    pub fn device_count(&self) -> usize {
        self.lock_devices().len()
    }

    /// `features`: what the kernel's ublk driver offers.
    pub fn features(&self) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        self.driver
            .features()
            .map_err(|e| ControlError::new(ErrorCode::IoError, e.to_string()))
    }

    /// Names the NBD server exports: every healthy volume and `VOL@SNAP`.
    pub fn export_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, slot) in self.entries() {
            if let Slot::Ready(vol) = slot {
                out.push(name.clone());
                for s in visible_snapshots(&vol) {
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

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::validate_name;
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A driver that runs no kernel device: ids count up, stops are recorded.
    #[derive(Clone, Default)]
    struct FakeDriver {
        next_id: Arc<AtomicU32>,
        stopped: Arc<Mutex<Vec<String>>>,
        fail: Arc<Mutex<Option<String>>>,
    }

    struct FakeDevice {
        id: u32,
        read_only: bool,
        stopped: Arc<Mutex<Vec<String>>>,
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
        fn stop(self: Box<Self>) -> io::Result<()> {
            self.stopped.lock().unwrap().push(self.path());
            Ok(())
        }
    }

    impl Driver for FakeDriver {
        fn start(
            &self,
            view: View,
            _q: u16,
            _d: u16,
            _previous: Option<u32>,
        ) -> io::Result<Box<dyn RunningDevice>> {
            if let Some(m) = self.fail.lock().unwrap().clone() {
                return Err(io::Error::other(m));
            }
            Ok(Box::new(FakeDevice {
                id: self.next_id.fetch_add(1, Ordering::SeqCst),
                read_only: view.read_only(),
                stopped: self.stopped.clone(),
            }))
        }
        fn features(&self) -> io::Result<Value> {
            Ok(json!({"driver_features": 0, "names": []}))
        }
    }

    fn code(r: Result<Value, ControlError>) -> ErrorCode {
        r.unwrap_err().code
    }

    #[test]
    fn devices_start_stop_persist_and_guard_deletes() {
        let t = tempfile::tempdir().unwrap();
        let driver = FakeDriver::default();
        let reg = Registry::open(t.path(), Box::new(driver.clone())).unwrap();
        reg.create_volume("v", 1 << 20, None, Some(1), None)
            .unwrap();
        reg.create_snapshot("v", "s").unwrap();

        let d = reg.start_device("v", None, None, None).unwrap();
        assert_eq!(d["path"], "/dev/ublkb0");
        assert_eq!(d["read_only"], false);
        assert_eq!(
            (d["queues"].clone(), d["depth"].clone()),
            (json!(1), json!(64))
        );
        let d = reg
            .start_device("v", Some("s".into()), Some(2), Some(128))
            .unwrap();
        assert_eq!(d["path"], "/dev/ublkb1");
        assert_eq!(d["read_only"], true);
        assert_eq!(d["snapshot"], "s");

        assert_eq!(
            code(reg.start_device("v", None, None, None)),
            ErrorCode::AlreadyExists
        );
        assert_eq!(
            code(reg.start_device("w", None, None, None)),
            ErrorCode::NotFound
        );
        assert_eq!(
            code(reg.start_device("v", Some("x".into()), None, None)),
            ErrorCode::NotFound
        );
        for (q, dp) in [(0, 64), (1, 0), (1, 4097), (65, 64)] {
            assert_eq!(
                code(reg.start_device("v", None, Some(q), Some(dp))),
                ErrorCode::InvalidArgument
            );
        }

        let e = reg.delete_volume("v").unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
        assert!(e.message.contains("/dev/ublkb"), "{}", e.message);
        assert!(e.message.contains("stop it first"), "{}", e.message);
        let e = reg.delete_snapshot("v", "s").unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
        assert!(e.message.contains("/dev/ublkb1"), "{}", e.message);

        let saved = devices::load(t.path()).unwrap();
        assert_eq!(saved.len(), 2);
        assert_eq!(saved[1].key(), "v@s");
        assert_eq!((saved[0].last_id, saved[1].last_id), (Some(0), Some(1)));
        assert_eq!((saved[1].queues, saved[1].depth), (2, 128));

        // Stop by path, then by name.
        reg.stop_device("/dev/ublkb1").unwrap();
        assert_eq!(code(reg.stop_device("/dev/ublkb1")), ErrorCode::NotFound);
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
        reg.create_volume("v", 1 << 20, None, Some(1), None)
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
                },
                DeviceSpec {
                    volume: "gone".into(),
                    snapshot: None,
                    queues: 1,
                    depth: 64,
                    last_id: None,
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
        let e = reg.start_device("v", None, None, Some(32)).unwrap_err();
        assert_eq!(e.code, ErrorCode::IoError);
        assert!(e.message.contains("no ublk here"), "{}", e.message);
        *driver.fail.lock().unwrap() = None;
        let failed_id = devices::load(t.path())
            .unwrap()
            .iter()
            .find(|s| s.volume == "v")
            .unwrap()
            .last_id;
        assert_eq!(failed_id, Some(7), "a failed restore keeps the last id");
        reg.start_device("v", None, None, Some(32)).unwrap();
        assert_eq!(devices::load(t.path()).unwrap().len(), 2);
        // Dropping a failed entry by name.
        let out = reg.stop_device("gone").unwrap();
        assert!(out["path"].is_null());
        assert_eq!(devices::load(t.path()).unwrap().len(), 1);
        reg.stop_device("v").unwrap();
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

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

fn broken_json(name: &str, message: &str) -> Value {
    json!({ "name": name, "state": format!("error: {message}") })
}

impl Registry {
    /// Opens the registry in `data_dir` (created if missing): removes leftovers
    /// of interrupted creates/deletes and opens every volume found.
    pub fn open(data_dir: &Path) -> io::Result<Registry> {
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
                j["snapshot_list"] = serde_json::to_value(v.list_snapshots())
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
        serde_json::to_value(vol.list_snapshots())
            .map_err(|e| ControlError::new(ErrorCode::IoError, e.to_string()))
    }

    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<Value, ControlError> {
        let _g = self.gate()?;
        let vol = self.volume(volume)?;
        block_on(vol.delete_snapshot(name)).map_err(|e| match e {
            EngineError::NotFound(_) => {
                ControlError::not_found(format!("snapshot {name} of volume {volume} not found"))
            }
            e => e.into(),
        })?;
        log::info!("volume {volume}: deleted snapshot {name}");
        Ok(json!({ "volume": volume, "name": name, "deleted": true }))
    }

    /// Waits for in-flight requests, refuses new ones, and flushes and closes
    /// every volume. Returns how many volumes failed to shut down cleanly.
    pub fn shutdown(&self) -> usize {
        let mut closing = self.closing.write().unwrap_or_else(|e| e.into_inner());
        *closing = true;
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

    /// Names the NBD server exports: every healthy volume and `VOL@SNAP`.
    pub fn export_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, slot) in self.entries() {
            if let Slot::Ready(vol) = slot {
                out.push(name.clone());
                for s in vol.list_snapshots() {
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

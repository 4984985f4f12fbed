//! Consistency groups: volumes whose snapshots are taken at one instant
//! (seed 004's overall snapshot made of the partition snapshots of every
//! part, one level up: a database's data and log on separate volumes).
//!
//! `DATA_DIR/groups.json` holds every group: its member volumes and its
//! group snapshots. It is replaced atomically on every change. A group
//! snapshot is one snapshot of each member, all named alike (each readable
//! as `VOL@SNAP`), taken by [`Volume::create_snapshots_together`] under one
//! write barrier. It is created and deleted as a unit:
//! - create records the snapshot as `creating` first, then takes the
//!   members' snapshots, then records it done. A daemon that dies between
//!   finds `creating` at start and deletes the members' snapshots of that
//!   name, so a half-taken group snapshot never survives;
//! - delete removes the members' snapshots (one already gone is fine, so a
//!   delete cut short is finished by the next), then the record.
//!
//! A volume belongs to at most one group (its snapshots and schedules then
//! have one meaning); it cannot be deleted while it does, and a member's
//! snapshot that is part of a group snapshot cannot be deleted alone.
//!
//! Must never: leave a group snapshot that some member lacks without saying
//! so, or delete a snapshot a user took by hand.

use super::error::{ErrorKind, VolumeError};
use super::registry::{validate_name, Registry};
use crate::engine::{now_unix_ms, EngineError, Volume};
use crate::runtime::block_on;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The file, in the data directory, that lists the groups.
pub const GROUPS_FILE: &str = "groups.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupRecord {
    volumes: Vec<String>,
    #[serde(default)]
    snapshots: Vec<GroupSnapshot>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupSnapshot {
    name: String,
    created_unix_ms: u64,
    /// Recorded before the members' snapshots are taken; cleared after.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    creating: bool,
}

/// The groups, as `groups.json` has them.
pub struct Groups {
    path: PathBuf,
    map: Mutex<BTreeMap<String, GroupRecord>>,
}

impl Groups {
    /// Reads `DATA_DIR/groups.json` (none yet: no groups).
    pub fn load(data_dir: &Path) -> io::Result<Groups> {
        let path = data_dir.join(GROUPS_FILE);
        let map = super::json_file::load(&path, "groups")?;
        Ok(Groups {
            path,
            map: Mutex::new(map),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, GroupRecord>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces `groups.json` with `map`, then makes it the groups in memory.
    fn save(
        &self,
        current: &mut MutexGuard<'_, BTreeMap<String, GroupRecord>>,
        map: BTreeMap<String, GroupRecord>,
    ) -> Result<(), VolumeError> {
        super::json_file::save(&self.path, &map)?;
        **current = map;
        Ok(())
    }

    /// Changes a copy of the groups with `f`, saves it, and keeps it.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, GroupRecord>) -> Result<T, VolumeError>,
    ) -> Result<T, VolumeError> {
        let mut current = self.lock();
        let mut map = current.clone();
        let out = f(&mut map)?;
        self.save(&mut current, map)?;
        Ok(out)
    }

    /// The group volume `volume` belongs to, if any.
    pub fn group_of(&self, volume: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, g)| g.volumes.iter().any(|v| v == volume))
            .map(|(n, _)| n.clone())
    }

    /// The group whose snapshot `snapshot` of `volume` is part of, if any.
    pub fn group_snapshot_of(&self, volume: &str, snapshot: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, g)| {
                g.volumes.iter().any(|v| v == volume)
                    && g.snapshots.iter().any(|s| s.name == snapshot)
            })
            .map(|(n, _)| n.clone())
    }

    /// Group `name`'s member volumes.
    pub fn members(&self, name: &str) -> Result<Vec<String>, VolumeError> {
        self.lock()
            .get(name)
            .map(|g| g.volumes.clone())
            .ok_or_else(|| group_not_found(name))
    }
}

fn group_not_found(name: &str) -> VolumeError {
    VolumeError::not_found(format!(
        "group {name} not found; `snapblk group list` shows the groups"
    ))
}

fn snapshot_not_found(group: &str, name: &str) -> VolumeError {
    VolumeError::not_found(format!(
        "group {group} has no snapshot {name}; `snapblk group info {group}` lists them"
    ))
}

impl Registry {
    /// Rolls back the group snapshots a daemon died in the middle of
    /// taking (see the module docs); called once the volumes are open.
    pub(super) fn finish_group_snapshots(&self) {
        let pending: Vec<(String, Vec<String>, String)> = self
            .groups()
            .lock()
            .iter()
            .flat_map(|(g, r)| {
                r.snapshots
                    .iter()
                    .filter(|s| s.creating)
                    .map(|s| (g.clone(), r.volumes.clone(), s.name.clone()))
            })
            .collect();
        for (group, volumes, snap) in pending {
            log::warn!(
                "group {group}: snapshot {snap} was being taken when the daemon stopped; \
                 removing the part of it that was taken"
            );
            match self.drop_member_snapshots(&volumes, &snap) {
                Ok(()) => {
                    if let Err(e) = self.groups().update(|map| {
                        if let Some(g) = map.get_mut(&group) {
                            g.snapshots.retain(|s| s.name != snap);
                        }
                        Ok(())
                    }) {
                        log::error!("group {group}: {e}");
                    }
                }
                Err(e) => log::error!(
                    "group {group}: cannot remove the half-taken snapshot {snap}: {e}; \
                     `snapblk snapshot delete --group {group} {snap}` retries"
                ),
            }
        }
    }

    /// Deletes snapshot `snap` of each of `volumes` that has it.
    fn drop_member_snapshots(&self, volumes: &[String], snap: &str) -> Result<(), VolumeError> {
        for v in volumes {
            let vol = match self.volume(v) {
                Ok(vol) => vol,
                Err(e) if e.kind == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            match block_on(vol.delete_snapshot(snap)) {
                Ok(()) | Err(EngineError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    pub fn create_group(&self, name: &str, volumes: &[String]) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let _m = self.lock_mutate();
        validate_name("group", name)?;
        if volumes.is_empty() {
            return Err(VolumeError::invalid(format!(
                "group {name} needs at least one volume: `snapblk group create {name} VOL...`"
            )));
        }
        for (i, v) in volumes.iter().enumerate() {
            if volumes[..i].contains(v) {
                return Err(VolumeError::invalid(format!(
                    "volume {v} is named twice; name each member once"
                )));
            }
            self.volume(v)?;
            if let Some(other) = self.groups().group_of(v) {
                return Err(VolumeError::new(
                    ErrorKind::Busy,
                    format!(
                        "volume {v} already belongs to group {other}; a volume is in one group \
                         at most (`snapblk group delete {other}` first)"
                    ),
                ));
            }
        }
        self.groups().update(|map| {
            if map.contains_key(name) {
                return Err(VolumeError::new(
                    ErrorKind::AlreadyExists,
                    format!("group {name} already exists"),
                ));
            }
            map.insert(
                name.to_string(),
                GroupRecord {
                    volumes: volumes.to_vec(),
                    snapshots: Vec::new(),
                },
            );
            Ok(())
        })?;
        log::info!("created group {name} of {}", volumes.join(", "));
        Ok(json!({ "name": name, "volumes": volumes }))
    }

    pub fn list_groups(&self) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let list: Vec<Value> = self
            .groups()
            .lock()
            .iter()
            .map(|(name, g)| {
                json!({
                    "name": name,
                    "volumes": g.volumes,
                    "snapshots": g.snapshots.iter().map(|s| &s.name).collect::<Vec<_>>(),
                })
            })
            .collect();
        Ok(Value::Array(list))
    }

    /// A group, its members and its snapshots, each with what every member
    /// holds of it (a member that lacks it says so).
    pub fn group_info(&self, name: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let record = self
            .groups()
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| group_not_found(name))?;
        let member_snapshots: Vec<(String, Option<Vec<crate::engine::SnapshotInfo>>)> = record
            .volumes
            .iter()
            .map(|v| {
                (
                    v.clone(),
                    self.volume(v).ok().map(|vol| vol.list_snapshots()),
                )
            })
            .collect();
        let snapshots: Vec<Value> = record
            .snapshots
            .iter()
            .map(|s| {
                let members: Vec<Value> = member_snapshots
                    .iter()
                    .map(|(v, list)| {
                        let held = list
                            .as_ref()
                            .and_then(|l| l.iter().find(|i| i.name == s.name));
                        json!({
                            "volume": v,
                            "generation": held.map(|i| i.generation),
                            "exclusive_bytes": held.map(|i| i.exclusive_bytes),
                        })
                    })
                    .collect();
                let complete = members.iter().all(|m| !m["generation"].is_null());
                json!({
                    "name": s.name,
                    "created_unix_ms": s.created_unix_ms,
                    "state": if s.creating { "creating" } else if complete { "ready" } else { "incomplete" },
                    "members": members,
                })
            })
            .collect();
        Ok(json!({ "name": name, "volumes": record.volumes, "snapshots": snapshots }))
    }

    pub fn delete_group(&self, name: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let _m = self.lock_mutate();
        self.groups().update(|map| {
            let g = map.get(name).ok_or_else(|| group_not_found(name))?;
            if let Some(s) = g.snapshots.first() {
                return Err(VolumeError::new(
                    ErrorKind::Busy,
                    format!(
                        "group {name} has {} snapshot(s); delete them first with \
                         `snapblk snapshot delete --group {name} {}`",
                        g.snapshots.len(),
                        s.name
                    ),
                ));
            }
            map.remove(name);
            Ok(())
        })?;
        log::info!("deleted group {name}");
        Ok(json!({ "name": name, "deleted": true }))
    }

    /// Takes snapshot `snap` of every member of `group` at one instant.
    pub fn create_group_snapshot(&self, group: &str, snap: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let _m = self.lock_mutate();
        validate_name("snapshot", snap)?;
        let members = self.groups().members(group)?;
        let volumes: Vec<Arc<Volume>> = members
            .iter()
            .map(|v| self.volume(v))
            .collect::<Result<_, _>>()?;
        for v in &volumes {
            self.quotas().check_snapshot(v.access().owner, v.name())?;
        }
        if let Some(v) = volumes
            .iter()
            .find(|v| v.list_snapshots().iter().any(|s| s.name == snap))
        {
            return Err(VolumeError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "volume {} of group {group} already has a snapshot {snap}; choose another name",
                    v.name()
                ),
            ));
        }
        let created_unix_ms = now_unix_ms();
        self.groups().update(|map| {
            let g = map.get_mut(group).ok_or_else(|| group_not_found(group))?;
            g.snapshots.push(GroupSnapshot {
                name: snap.to_string(),
                created_unix_ms,
                creating: true,
            });
            Ok(())
        })?;
        let pairs: Vec<(&Volume, &str)> = volumes.iter().map(|v| (&**v, snap)).collect();
        let taken = block_on(Volume::create_snapshots_together(&pairs));
        let finish = |done: bool| {
            self.groups().update(|map| {
                if let Some(g) = map.get_mut(group) {
                    if done {
                        g.snapshots
                            .iter_mut()
                            .filter(|s| s.name == snap)
                            .for_each(|s| s.creating = false);
                    } else {
                        g.snapshots.retain(|s| s.name != snap);
                    }
                }
                Ok(())
            })
        };
        let created = match taken {
            Ok(created) => created,
            Err(e) => {
                // The engine took none of them (it rolls back its own).
                finish(false)?;
                return Err(e.into());
            }
        };
        finish(true)?;
        log::info!(
            "group {group}: created snapshot {snap} of {}",
            members.join(", ")
        );
        let stall_us = created.iter().map(|c| c.stall_us).max().unwrap_or(0);
        let members: Vec<Value> = created
            .iter()
            .zip(&members)
            .map(|(c, v)| json!({ "volume": v, "generation": c.snapshot.generation }))
            .collect();
        Ok(json!({
            "group": group,
            "name": snap,
            "created_unix_ms": created_unix_ms,
            "stall_us": stall_us,
            "members": members,
        }))
    }

    /// Deletes group snapshot `snap`: every member's, then the record.
    pub fn delete_group_snapshot(&self, group: &str, snap: &str) -> Result<Value, VolumeError> {
        let _g = self.gate()?;
        let _m = self.lock_mutate();
        let members = self.groups().members(group)?;
        let known = self
            .groups()
            .lock()
            .get(group)
            .is_some_and(|g| g.snapshots.iter().any(|s| s.name == snap));
        if !known {
            return Err(snapshot_not_found(group, snap));
        }
        for v in &members {
            self.check_snapshot_unused(v, snap)?;
        }
        self.drop_member_snapshots(&members, snap)?;
        for v in &members {
            self.forget_snapshot_devices(v, snap);
        }
        self.groups().update(|map| {
            if let Some(g) = map.get_mut(group) {
                g.snapshots.retain(|s| s.name != snap);
            }
            Ok(())
        })?;
        log::info!("group {group}: deleted snapshot {snap}");
        Ok(json!({ "group": group, "name": snap, "deleted": true }))
    }

    /// `busy` while volume `name` belongs to a group.
    pub(super) fn check_not_grouped(&self, name: &str) -> Result<(), VolumeError> {
        match self.groups().group_of(name) {
            Some(g) => Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "volume {name} belongs to group {g}; delete the group first \
                     (`snapblk group delete {g}`)"
                ),
            )),
            None => Ok(()),
        }
    }

    /// `busy` for a member's snapshot that is part of a group snapshot.
    pub(super) fn check_not_group_snapshot(
        &self,
        volume: &str,
        snap: &str,
    ) -> Result<(), VolumeError> {
        match self.groups().group_snapshot_of(volume, snap) {
            Some(g) => Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "snapshot {snap} of volume {volume} is part of group {g}'s snapshot; \
                     delete it as a unit with `snapblk snapshot delete --group {g} {snap}`"
                ),
            )),
            None => Ok(()),
        }
    }
}

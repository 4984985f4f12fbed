//! The space guard (issue 13 part 5): when the filesystem that holds a
//! local volume's origin and change logs passes a threshold of used space,
//! it deletes the oldest snapshot a schedule took among the volumes on that
//! filesystem, one at a time, until the filesystem is below the threshold
//! or no scheduled snapshot is left, so scheduled snapshots give way before
//! writes start failing with ENOSPC.
//!
//! It owns one thread that checks every [`CHECK_EVERY`] with statvfs on each
//! local volume's directory (Ceph volumes are skipped: their space is the
//! pool's, which `ceph df` and the pool's own quotas govern). Each prune is
//! logged with the volume, the snapshot, the bytes freed and the
//! filesystem's use before and after; a filesystem over the threshold with
//! nothing to prune is warned about once per crossing, naming the snapshots
//! that hold its space.
//!
//! Must never: delete a snapshot no schedule took (a user's manual one, a
//! copy job's or replication's internal ones), or one a clone depends on or
//! a copy job reads (the registry and the copy jobs refuse those, and the
//! guard moves on to the next candidate).

use super::Schedules;
use crate::engine::now_unix_ms;
use crate::volumes::{Registry, Slot};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The default threshold, in percent of the filesystem used.
pub const DEFAULT_PERCENT: u8 = 90;
/// How often the guard looks at the filesystems.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// One prune, as logged and shown by `status` and `volume info`.
#[derive(Clone, Debug, Serialize)]
pub struct Prune {
    pub at_unix_ms: u64,
    pub volume: String,
    pub snapshot: String,
    pub schedule: u64,
    pub bytes_freed: u64,
    pub used_percent_before: f64,
    pub used_percent_after: f64,
    pub filesystem: PathBuf,
}

#[derive(Default)]
struct State {
    stop: bool,
    prunes: u64,
    last: Option<Prune>,
    last_by_volume: BTreeMap<String, Prune>,
    /// Filesystems (by device) over the threshold already warned about.
    warned: BTreeSet<u64>,
}

pub struct SpaceGuard {
    /// Percent used that triggers pruning; 0: off.
    percent: u8,
    registry: Arc<Registry>,
    schedules: Arc<Schedules>,
    state: Mutex<State>,
    wake: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A filesystem's use as `df` counts it: the root-reserved blocks are
/// neither used nor available.
#[derive(Clone, Copy, Debug)]
struct FsUse {
    used: u64,
    size: u64,
}

impl FsUse {
    fn of(dir: &Path) -> io::Result<FsUse> {
        let st = crate::backend::file::statvfs(dir)?;
        let used = (st.f_blocks - st.f_bfree) * st.f_frsize;
        Ok(FsUse {
            used,
            size: used + st.f_bavail * st.f_frsize,
        })
    }

    fn percent(&self) -> f64 {
        if self.size == 0 {
            return 0.0;
        }
        (self.used as f64 * 1000.0 / self.size as f64).round() / 10.0
    }
}

/// The local volumes on one filesystem.
struct Filesystem {
    dir: PathBuf,
    volumes: Vec<String>,
}

impl SpaceGuard {
    /// Starts the guard at `percent` used (0: a guard that is off and says so).
    pub fn start(
        percent: u8,
        registry: Arc<Registry>,
        schedules: Arc<Schedules>,
    ) -> io::Result<Arc<SpaceGuard>> {
        let g = Arc::new(SpaceGuard {
            percent,
            registry,
            schedules,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            thread: Mutex::new(None),
        });
        if percent == 0 {
            log::info!("space guard off: scheduled snapshots are never pruned for space");
            return Ok(g);
        }
        log::info!(
            "space guard: pruning the oldest scheduled snapshots when a volume's filesystem \
             passes {percent}% used"
        );
        let runner = g.clone();
        let handle = std::thread::Builder::new()
            .name("space-guard".into())
            .spawn(move || runner.run())?;
        *g.thread.lock().unwrap() = Some(handle);
        Ok(g)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn shutdown(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
        if let Some(h) = self.thread.lock().unwrap().take() {
            let _ = h.join();
        }
    }

    /// For `status`: the threshold and the last prune.
    pub fn status(&self) -> Value {
        let state = self.lock();
        json!({
            "enabled": self.percent > 0,
            "threshold_percent": (self.percent > 0).then_some(self.percent),
            "check_every_ms": CHECK_EVERY.as_millis() as u64,
            "prunes": state.prunes,
            "last_prune": state.last,
        })
    }

    /// For `volume info`: the threshold, its filesystem's use and the last
    /// prune of one of its snapshots.
    pub fn volume_status(&self, volume: &str) -> Value {
        let dir = self
            .registry
            .volume(volume)
            .ok()
            .and_then(|v| v.storage().path().map(Path::to_path_buf));
        let used = dir.as_deref().and_then(|d| FsUse::of(d).ok());
        json!({
            "enabled": self.percent > 0 && dir.is_some(),
            "threshold_percent": (self.percent > 0).then_some(self.percent),
            "filesystem_used_percent": used.map(|u| u.percent()),
            "last_prune": self.lock().last_by_volume.get(volume),
        })
    }

    fn run(&self) {
        loop {
            {
                let state = self.lock();
                if state.stop {
                    return;
                }
                let (state, _) = self
                    .wake
                    .wait_timeout(state, CHECK_EVERY)
                    .unwrap_or_else(|e| e.into_inner());
                if state.stop {
                    return;
                }
            }
            self.check();
        }
    }

    /// The local volumes grouped by the filesystem their directory is on.
    fn filesystems(&self) -> BTreeMap<u64, Filesystem> {
        let mut out: BTreeMap<u64, Filesystem> = BTreeMap::new();
        for (name, slot) in self.registry.entries() {
            let Slot::Ready(vol) = slot else { continue };
            let Some(dir) = vol.storage().path() else {
                continue;
            };
            let Ok(dev) = std::fs::metadata(dir).map(|m| m.dev()) else {
                continue;
            };
            out.entry(dev)
                .or_insert_with(|| Filesystem {
                    dir: dir.to_path_buf(),
                    volumes: Vec::new(),
                })
                .volumes
                .push(name);
        }
        out
    }

    fn over(&self, u: &FsUse) -> bool {
        u.percent() >= self.percent as f64
    }

    fn check(&self) {
        for (dev, fs) in self.filesystems() {
            let Ok(mut usage) = FsUse::of(&fs.dir) else {
                continue;
            };
            if !self.over(&usage) {
                self.lock().warned.remove(&dev);
                continue;
            }
            // Candidates that could not be deleted (a clone's parent, read
            // by a copy job), with why: skipped for the rest of this check.
            let mut refused = BTreeMap::new();
            while self.over(&usage) {
                let Some((schedule, volume, snapshot)) = self.oldest(&fs.volumes, &refused) else {
                    break;
                };
                if let Err(e) = self.schedules.prune(schedule, &snapshot) {
                    refused.insert((schedule, snapshot), format!("{volume}: {e}"));
                    continue;
                }
                let Ok(after) = FsUse::of(&fs.dir) else { break };
                let prune = Prune {
                    at_unix_ms: now_unix_ms(),
                    volume,
                    snapshot,
                    schedule,
                    bytes_freed: usage.used.saturating_sub(after.used),
                    used_percent_before: usage.percent(),
                    used_percent_after: after.percent(),
                    filesystem: fs.dir.clone(),
                };
                log::warn!(
                    "space guard: pruned snapshot {} of volume {} (schedule {}): freed {} bytes; \
                     the filesystem of {} went from {}% to {}% used (threshold {}%)",
                    prune.snapshot,
                    prune.volume,
                    prune.schedule,
                    prune.bytes_freed,
                    prune.filesystem.display(),
                    prune.used_percent_before,
                    prune.used_percent_after,
                    self.percent
                );
                let mut state = self.lock();
                state.prunes += 1;
                state
                    .last_by_volume
                    .insert(prune.volume.clone(), prune.clone());
                state.last = Some(prune);
                usage = after;
            }
            if self.over(&usage) && self.lock().warned.insert(dev) {
                log::warn!(
                    "space guard: the filesystem of {} is {}% used (threshold {}%) and no \
                     scheduled snapshot can be pruned{}; the space is held by {}. Delete \
                     snapshots (`snapblk snapshot delete VOL SNAP`) or volumes, or grow the \
                     filesystem, before writes fail",
                    fs.dir.display(),
                    usage.percent(),
                    self.percent,
                    refused
                        .iter()
                        .map(|((_, snap), why)| format!(" ({snap} of {why})"))
                        .collect::<String>(),
                    self.holders(&fs.volumes)
                );
            }
        }
    }

    /// The oldest snapshot a schedule took of one of `volumes` and not in
    /// `refused`: (schedule, volume, snapshot); a group schedule's snapshot
    /// is named by a member on this filesystem (it is deleted on all).
    fn oldest(
        &self,
        volumes: &[String],
        refused: &BTreeMap<(u64, String), String>,
    ) -> Option<(u64, String, String)> {
        let mut created: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
        for v in volumes {
            if let Ok(vol) = self.registry.volume(v) {
                let snaps = vol.list_snapshots();
                created.insert(
                    v,
                    snaps
                        .into_iter()
                        .map(|s| (s.name, s.created_unix_ms))
                        .collect(),
                );
            }
        }
        self.schedules
            .kept_snapshots()
            .into_iter()
            .filter(|k| !refused.contains_key(&(k.schedule, k.snapshot.clone())))
            .filter_map(|k| {
                let (volume, at) = k.volumes.iter().find_map(|v| {
                    let at = created.get(v.as_str())?.get(&k.snapshot)?;
                    Some((v.clone(), *at))
                })?;
                Some((at, k.schedule, volume, k.snapshot))
            })
            .min_by_key(|(at, ..)| *at)
            .map(|(_, schedule, volume, snapshot)| (schedule, volume, snapshot))
    }

    /// What holds the space of `volumes`: each one's snapshots and the bytes
    /// only they hold.
    fn holders(&self, volumes: &[String]) -> String {
        let parts: Vec<String> = volumes
            .iter()
            .filter_map(|v| {
                let snaps = self.registry.volume(v).ok()?.list_snapshots();
                let held: u64 = snaps.iter().map(|s| s.exclusive_bytes).sum();
                let names: Vec<&str> = snaps
                    .iter()
                    .map(|s| s.name.as_str())
                    .filter(|n| !n.starts_with('.'))
                    .collect();
                Some(if names.is_empty() {
                    format!("volume {v} (no snapshots: its own data)")
                } else {
                    format!(
                        "volume {v} (snapshots {} holding {held} bytes only they need)",
                        names.join(", ")
                    )
                })
            })
            .collect();
        parts.join("; ")
    }
}

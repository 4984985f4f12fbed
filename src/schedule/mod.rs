//! Scheduled snapshots with retention (seed 004: "a snapshot layer created
//! periodically").
//!
//! A schedule takes a snapshot of one volume, or a group snapshot of a
//! consistency group, every `every` (optionally on a daily grid: `at`
//! HH:MM UTC, then every `every` from there), named `PREFIX` plus its run
//! number, and keeps the newest `keep` of the snapshots *it* took: it
//! records their names, so retention never deletes a snapshot a user took
//! by hand, even one whose name looks alike.
//!
//! `DATA_DIR/schedules.json` holds every schedule with its last run and
//! result, replaced atomically after every change and every run, so the
//! schedules survive restarts (also `kill -9`). A run falls due at the
//! first grid instant after the last run; a daemon that was down past one
//! or more due instants takes the missed run once, at start, and goes on
//! from there (never a burst of catch-up snapshots).
//!
//! One thread runs the schedules: it sleeps until the earliest due run (or
//! a change wakes it), takes the due snapshots on its own thread (never on
//! a client's), then prunes. A failed run is recorded with its error in
//! `schedule list` and retried at the next due instant.
//!
//! The space guard ([`guard`]) prunes the oldest of these snapshots when a
//! volume's filesystem fills, through [`Schedules::prune`].
//!
//! Must never: delete a snapshot it did not take, delete one a copy job
//! reads (it asks the copy jobs, as `snapshot delete` does), or stop the
//! daemon over a failed run.

pub mod guard;
pub use guard::SpaceGuard;

use crate::copy::Jobs;
use crate::engine::now_unix_ms;
use crate::quiesce::Quiesce;
use crate::replication::Replication;
use crate::volumes::{json_file, validate_name, ErrorKind, Registry, VolumeError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The file, in the data directory, that lists the schedules.
pub const SCHEDULES_FILE: &str = "schedules.json";
/// The shortest interval (tests use one second).
pub const MIN_EVERY_MS: u64 = 1000;
/// Most snapshots one schedule keeps.
pub const MAX_KEEP: u32 = 10_000;
const DAY_MS: u64 = 86_400_000;

/// `schedule.add`'s fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleAdd {
    /// The volume to snapshot; or `group`.
    #[serde(default)]
    pub volume: Option<String>,
    /// The consistency group to snapshot; or `volume`.
    #[serde(default)]
    pub group: Option<String>,
    pub every_ms: u64,
    /// `HH:MM` (UTC): runs fall on this time of day plus multiples of `every_ms`.
    #[serde(default)]
    pub at: Option<String>,
    /// How many of its own snapshots the schedule keeps.
    pub keep: u32,
    /// Snapshot names are this plus the run number; default `auto<ID>-`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Hooks and a timer around every run's snapshot.
    #[serde(default)]
    pub quiesce: Option<Quiesce>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    every_ms: u64,
    /// Minutes after midnight UTC of the grid's anchor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at_minute: Option<u32>,
    keep: u32,
    prefix: String,
    #[serde(default)]
    paused: bool,
    created_unix_ms: u64,
    /// The number in the name of its latest snapshot (names taken by hand
    /// are skipped, so it may exceed the count of runs).
    #[serde(default)]
    runs: u64,
    #[serde(default)]
    last_run_unix_ms: Option<u64>,
    #[serde(default)]
    last_result: Option<RunResult>,
    /// The snapshots this schedule took and has not pruned, oldest first.
    #[serde(default)]
    snapshots: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quiesce: Option<Quiesce>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunResult {
    at_unix_ms: u64,
    #[serde(default)]
    snapshot: Option<String>,
    #[serde(default)]
    pruned: Vec<String>,
    #[serde(default)]
    error: Option<String>,
}

impl Record {
    fn target(&self) -> String {
        match (&self.volume, &self.group) {
            (Some(v), _) => format!("volume {v}"),
            (_, Some(g)) => format!("group {g}"),
            _ => "nothing".to_string(),
        }
    }

    /// When the next run falls due: the first grid instant after the last
    /// run (or after the schedule was added).
    fn next_run(&self) -> u64 {
        let base = self.last_run_unix_ms.unwrap_or(self.created_unix_ms);
        match self.at_minute {
            None => base + self.every_ms,
            Some(minute) => {
                let anchor = base / DAY_MS * DAY_MS + minute as u64 * 60_000;
                if anchor > base {
                    // The grid before today's anchor: step back from it.
                    let steps = (anchor - base - 1) / self.every_ms;
                    anchor - steps * self.every_ms
                } else {
                    anchor + ((base - anchor) / self.every_ms + 1) * self.every_ms
                }
            }
        }
    }

    fn json(&self) -> Value {
        let last = self.last_result.as_ref().map(|r| {
            json!({
                "at_unix_ms": r.at_unix_ms,
                "ok": r.error.is_none(),
                "snapshot": r.snapshot,
                "pruned": r.pruned,
                "error": r.error,
            })
        });
        json!({
            "id": self.id,
            "volume": self.volume,
            "group": self.group,
            "every_ms": self.every_ms,
            "at": self.at_minute.map(|m| format!("{:02}:{:02}", m / 60, m % 60)),
            "keep": self.keep,
            "prefix": self.prefix,
            "paused": self.paused,
            "next_run_unix_ms": (!self.paused).then(|| self.next_run()),
            "runs": self.runs,
            "last_run_unix_ms": self.last_run_unix_ms,
            "last_result": last,
            "snapshots": self.snapshots,
        })
    }
}

/// `HH:MM` -> minutes after midnight.
fn parse_at(text: &str) -> Result<u32, VolumeError> {
    let parsed = text.split_once(':').and_then(|(h, m)| {
        let (h, m) = (h.parse::<u32>().ok()?, m.parse::<u32>().ok()?);
        (h < 24 && m < 60 && text.len() == 5).then_some(h * 60 + m)
    });
    parsed.ok_or_else(|| {
        VolumeError::invalid(format!(
            "invalid time {text:?}; use HH:MM (24-hour, UTC), e.g. 02:30"
        ))
    })
}

/// A snapshot a schedule took and keeps.
pub struct Kept {
    pub schedule: u64,
    /// Its volume, or every member of its group.
    pub volumes: Vec<String>,
    pub snapshot: String,
}

struct State {
    map: BTreeMap<u64, Record>,
    stop: bool,
}

pub struct Schedules {
    path: PathBuf,
    registry: Arc<Registry>,
    jobs: Arc<Jobs>,
    replication: Arc<Replication>,
    state: Mutex<State>,
    /// Wakes the runner: a schedule changed, or shutdown.
    changed: Condvar,
    runner: Mutex<Option<JoinHandle<()>>>,
}

impl Schedules {
    /// Loads `DATA_DIR/schedules.json` and starts the runner, which takes
    /// any run missed while the daemon was down at once.
    pub fn start(
        data_dir: &Path,
        registry: Arc<Registry>,
        jobs: Arc<Jobs>,
        replication: Arc<Replication>,
    ) -> io::Result<Arc<Schedules>> {
        let path = data_dir.join(SCHEDULES_FILE);
        let map: BTreeMap<u64, Record> = json_file::load(&path, "schedules")?;
        let s = Arc::new(Schedules {
            path,
            registry,
            jobs,
            replication,
            state: Mutex::new(State { map, stop: false }),
            changed: Condvar::new(),
            runner: Mutex::new(None),
        });
        let runner = s.clone();
        let handle = std::thread::Builder::new()
            .name("schedules".into())
            .spawn(move || runner.run())?;
        *s.runner.lock().unwrap() = Some(handle);
        Ok(s)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes a copy of the schedules with `f`, saves it, keeps it and
    /// wakes the runner.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<u64, Record>) -> Result<T, VolumeError>,
    ) -> Result<T, VolumeError> {
        let mut state = self.lock();
        let mut map = state.map.clone();
        let out = f(&mut map)?;
        // Under the state lock, so writes never cross.
        json_file::save(&self.path, &map)?;
        state.map = map;
        self.changed.notify_all();
        Ok(out)
    }

    pub fn add(&self, req: ScheduleAdd) -> Result<Value, VolumeError> {
        match (&req.volume, &req.group) {
            (Some(v), None) => {
                self.registry.volume(v)?;
            }
            (None, Some(g)) => {
                self.registry.groups().members(g)?;
            }
            _ => {
                return Err(VolumeError::invalid(
                    "a schedule snapshots one volume or one group: name exactly one \
                     (`schedule add VOL ...` or `schedule add --group GROUP ...`)",
                ))
            }
        }
        if req.every_ms < MIN_EVERY_MS {
            return Err(VolumeError::invalid(format!(
                "interval {} ms is too short; use at least 1s",
                req.every_ms
            )));
        }
        if req.keep == 0 || req.keep > MAX_KEEP {
            return Err(VolumeError::invalid(format!(
                "keep {} is out of range; keep 1 to {MAX_KEEP} snapshots",
                req.keep
            )));
        }
        let at_minute = req.at.as_deref().map(parse_at).transpose()?;
        let rec = self.update(|map| {
            let id = map.keys().next_back().map_or(1, |k| k + 1);
            let prefix = req.prefix.clone().unwrap_or_else(|| format!("auto{id}-"));
            // The name of its first snapshot must be a valid one.
            validate_name("snapshot prefix", &format!("{prefix}000001"))?;
            let rec = Record {
                id,
                volume: req.volume.clone(),
                group: req.group.clone(),
                every_ms: req.every_ms,
                at_minute,
                keep: req.keep,
                prefix,
                paused: false,
                created_unix_ms: now_unix_ms(),
                runs: 0,
                last_run_unix_ms: None,
                last_result: None,
                snapshots: Vec::new(),
                quiesce: req.quiesce.clone(),
            };
            map.insert(id, rec.clone());
            Ok(rec)
        })?;
        log::info!(
            "schedule {}: snapshots of {} every {} ms, keeping {}",
            rec.id,
            rec.target(),
            rec.every_ms,
            rec.keep
        );
        Ok(rec.json())
    }

    pub fn list(&self) -> Value {
        Value::Array(self.lock().map.values().map(Record::json).collect())
    }

    /// Removes a schedule; the snapshots it took stay, as ordinary ones.
    pub fn remove(&self, id: u64) -> Result<Value, VolumeError> {
        let rec = self.update(|map| map.remove(&id).ok_or_else(|| not_found(id)))?;
        log::info!("schedule {id} removed");
        Ok(json!({ "id": id, "removed": true, "snapshots_kept": rec.snapshots }))
    }

    /// Pauses (`true`) or resumes a schedule; a resumed one whose run fell
    /// due meanwhile takes it at once.
    pub fn set_paused(&self, id: u64, paused: bool) -> Result<Value, VolumeError> {
        let rec = self.update(|map| {
            let rec = map.get_mut(&id).ok_or_else(|| not_found(id))?;
            rec.paused = paused;
            Ok(rec.clone())
        })?;
        Ok(rec.json())
    }

    /// `busy` while a schedule snapshots volume `volume` (`group`: a
    /// group): deleting it would make every run fail.
    pub fn check_unscheduled(
        &self,
        volume: Option<&str>,
        group: Option<&str>,
    ) -> Result<(), VolumeError> {
        let state = self.lock();
        let hit = state.map.values().find(|r| {
            (volume.is_some() && r.volume.as_deref() == volume)
                || (group.is_some() && r.group.as_deref() == group)
        });
        match hit {
            Some(r) => Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "schedule {} snapshots {}; remove it first with `snapblk schedule remove {}`",
                    r.id,
                    r.target(),
                    r.id
                ),
            )),
            None => Ok(()),
        }
    }

    /// Stops the runner (a run in progress finishes first).
    pub fn shutdown(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
        if let Some(h) = self.runner.lock().unwrap().take() {
            let _ = h.join();
        }
    }

    fn run(&self) {
        loop {
            let due: Vec<Record> = {
                let mut state = self.lock();
                if state.stop {
                    return;
                }
                let now = now_unix_ms();
                let active = state.map.values().filter(|r| !r.paused);
                let due: Vec<Record> = active
                    .clone()
                    .filter(|r| r.next_run() <= now)
                    .cloned()
                    .collect();
                if due.is_empty() {
                    let wait = active
                        .map(|r| r.next_run().saturating_sub(now))
                        .min()
                        .unwrap_or(DAY_MS);
                    let (guard, _) = self
                        .changed
                        .wait_timeout(state, Duration::from_millis(wait.max(1)))
                        .unwrap_or_else(|e| e.into_inner());
                    state = guard;
                    drop(state);
                    continue;
                }
                due
            };
            for rec in due {
                self.run_one(rec);
            }
        }
    }

    /// Takes one due snapshot, prunes past `keep`, records the result.
    fn run_one(&self, rec: Record) {
        let started = now_unix_ms();
        // A name someone took by hand is skipped, not fought over.
        let mut run = rec.runs + 1;
        while self.taken(&rec, &format!("{}{run:06}", rec.prefix)) {
            run += 1;
        }
        let name = format!("{}{run:06}", rec.prefix);
        let take = || match (&rec.volume, &rec.group) {
            (Some(v), _) => self.registry.create_snapshot(v, &name).inspect(|_| {
                self.replication.snapshot_taken(v);
            }),
            (_, Some(g)) => self.registry.create_group_snapshot(g, &name).and_then(|r| {
                for v in self.registry.groups().members(g)? {
                    self.replication.snapshot_taken(&v);
                }
                Ok(r)
            }),
            _ => Err(VolumeError::invalid(
                "the schedule names no volume or group",
            )),
        };
        let taken = match &rec.quiesce {
            Some(q) => {
                let volumes = match (&rec.volume, &rec.group) {
                    (Some(v), _) => Ok(vec![v.clone()]),
                    (_, Some(g)) => self.registry.groups().members(g),
                    _ => Ok(Vec::new()),
                };
                volumes.and_then(|volumes| {
                    crate::quiesce::around(q, &self.registry, &rec.target(), &volumes, &name, take)
                })
            }
            None => take(),
        };
        // Quiesce trouble around a snapshot taken anyway (crash-consistent,
        // or a failed post-hook) is this run's error.
        let quiesce_error = taken.as_ref().ok().and_then(|r| {
            let q = &r["quiesce"];
            q["error"]
                .as_str()
                .or(q["thaw_error"].as_str())
                .or(q["post_hook_error"].as_str())
                .map(str::to_string)
        });
        let mut result = RunResult {
            at_unix_ms: started,
            snapshot: None,
            pruned: Vec::new(),
            error: None,
        };
        let mut kept = rec.snapshots.clone();
        match taken {
            Ok(_) => {
                result.error = quiesce_error;
                log::info!(
                    "schedule {}: took snapshot {name} of {}",
                    rec.id,
                    rec.target()
                );
                result.snapshot = Some(name);
                kept.push(result.snapshot.clone().unwrap());
                while kept.len() > rec.keep as usize {
                    let oldest = kept[0].clone();
                    match self.delete(&rec, &oldest) {
                        Ok(()) => {
                            result.pruned.push(oldest);
                            kept.remove(0);
                        }
                        // Deleted by hand: nothing left to prune.
                        Err(e) if e.kind == ErrorKind::NotFound => {
                            kept.remove(0);
                        }
                        Err(e) => {
                            result.error = Some(format!(
                                "snapshot taken, but pruning {oldest} failed (retried at the \
                                 next run): {e}"
                            ));
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                log::error!(
                    "schedule {}: snapshot {name} of {} failed: {e}",
                    rec.id,
                    rec.target()
                );
                result.error = Some(e.message);
            }
        }
        if let Some(e) = &result.error {
            log::warn!("schedule {}: {e}", rec.id);
        }
        let saved = self.update(|map| {
            // Removed while it ran: nothing to record.
            if let Some(r) = map.get_mut(&rec.id) {
                if result.snapshot.is_some() {
                    r.runs = run;
                }
                r.last_run_unix_ms = Some(now_unix_ms());
                // Those the space guard pruned while this run went on stay gone.
                let new = result.snapshot.as_ref();
                r.snapshots = kept
                    .into_iter()
                    .filter(|n| r.snapshots.contains(n) || Some(n) == new)
                    .collect();
                r.last_result = Some(result);
            }
            Ok(())
        });
        if let Err(e) = saved {
            log::error!("schedule {}: {e}", rec.id);
        }
    }

    /// Every snapshot the schedules took and keep.
    pub fn kept_snapshots(&self) -> Vec<Kept> {
        let records: Vec<Record> = self.lock().map.values().cloned().collect();
        records
            .into_iter()
            .flat_map(|r| {
                let volumes = self.volumes_of(&r);
                r.snapshots.into_iter().map(move |snapshot| Kept {
                    schedule: r.id,
                    volumes: volumes.clone(),
                    snapshot,
                })
            })
            .collect()
    }

    /// Deletes snapshot `name` that schedule `id` took and forgets it, as
    /// its retention would (for the space guard).
    pub fn prune(&self, id: u64, name: &str) -> Result<(), VolumeError> {
        let rec = self
            .lock()
            .map
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found(id))?;
        match self.delete(&rec, name) {
            // Deleted by hand meanwhile: forget it all the same.
            Err(e) if e.kind != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.update(|map| {
            if let Some(r) = map.get_mut(&id) {
                r.snapshots.retain(|n| n != name);
            }
            Ok(())
        })
    }

    /// The volume a schedule snapshots, or its group's members.
    fn volumes_of(&self, rec: &Record) -> Vec<String> {
        match (&rec.volume, &rec.group) {
            (Some(v), _) => vec![v.clone()],
            (_, Some(g)) => self.registry.groups().members(g).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Whether `name` is already a snapshot of the schedule's volume (of
    /// any member of its group).
    fn taken(&self, rec: &Record, name: &str) -> bool {
        self.volumes_of(rec).iter().any(|v| {
            self.registry
                .volume(v)
                .is_ok_and(|vol| vol.list_snapshots().iter().any(|s| s.name == name))
        })
    }

    /// Deletes snapshot `name` that schedule `rec` took, as `snapshot
    /// delete` would (refused while a copy job reads it).
    fn delete(&self, rec: &Record, name: &str) -> Result<(), VolumeError> {
        match (&rec.volume, &rec.group) {
            (Some(v), _) => self
                .jobs
                .unless_used(v, Some(name), || self.registry.delete_snapshot(v, name)),
            (_, Some(g)) => {
                let members = self.registry.groups().members(g)?;
                self.jobs.unless_snapshot_used(&members, name, || {
                    self.registry.delete_group_snapshot(g, name)
                })
            }
            _ => Ok(Value::Null),
        }
        .map(|_| ())
    }
}

fn not_found(id: u64) -> VolumeError {
    VolumeError::not_found(format!(
        "schedule {id} not found; `snapblk schedule list` shows the schedules"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(every_ms: u64, at_minute: Option<u32>, last: Option<u64>) -> Record {
        Record {
            id: 1,
            volume: Some("v".into()),
            group: None,
            every_ms,
            at_minute,
            keep: 1,
            prefix: "p".into(),
            paused: false,
            created_unix_ms: 1_000,
            runs: 0,
            last_run_unix_ms: last,
            last_result: None,
            snapshots: Vec::new(),
            quiesce: None,
        }
    }

    #[test]
    fn the_next_run_is_the_first_grid_instant_after_the_last() {
        assert_eq!(rec(500_000, None, None).next_run(), 501_000);
        assert_eq!(rec(500_000, None, Some(7_000)).next_run(), 507_000);
        let hour = 3_600_000;
        let day0 = 20_000 * DAY_MS;
        // Every 6 h from 02:30: 02:30, 08:30, 14:30, 20:30.
        let at = Some(150);
        let at_0230 = day0 + 150 * 60_000;
        assert_eq!(rec(6 * hour, at, Some(day0)).next_run(), at_0230);
        assert_eq!(
            rec(6 * hour, at, Some(at_0230)).next_run(),
            at_0230 + 6 * hour
        );
        assert_eq!(
            rec(6 * hour, at, Some(at_0230 + 1)).next_run(),
            at_0230 + 6 * hour
        );
        // Before the anchor, the grid reaches back: 20:30 of the day before.
        assert_eq!(
            rec(6 * hour, at, Some(day0 - 4 * hour)).next_run(),
            at_0230 - 6 * hour
        );
        // Daily at 02:30, last run at 23:00: the next morning.
        assert_eq!(rec(24 * hour, at, Some(day0 - hour)).next_run(), at_0230);
    }

    #[test]
    fn times_of_day_parse_strictly() {
        assert_eq!(parse_at("02:30").unwrap(), 150);
        assert_eq!(parse_at("23:59").unwrap(), 1439);
        for bad in ["24:00", "2:30", "02:60", "0230", "ab:cd", ""] {
            assert!(parse_at(bad).is_err(), "{bad}");
        }
    }
}

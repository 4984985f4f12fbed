//! Space quotas per user (issue 13 part 4): a user may hold at most their
//! limit in the volumes they own, counted as the bytes those volumes'
//! origins and change logs have allocated (st_blocks; journals are
//! metadata and not counted).
//!
//! Keeping the per-write check cheap: every owner has one [`Budget`], shared
//! by all their volumes as the engine's [`SpaceBudget`]. Its use is an
//! atomic: the allocated bytes last measured (every [`REFRESH`] by the
//! refresher thread, which stats each volume's files) plus the worst-case
//! growth of every write admitted since. A write is admitted only if that
//! sum plus its own worst case (see the engine's `admit_growth`) stays
//! within the limit, so a burst between two measurements cannot overshoot;
//! the next measurement brings the use back down to what is really
//! allocated (overwrites of allocated blocks cost nothing in the end). No
//! write ever stats a file.
//!
//! Limits persist in `DATA_DIR/quotas.json` (uid -> bytes), replaced
//! atomically.
//!
//! Must never: refuse a request that cannot allocate (a trim, a read), so
//! an owner over quota can always read and free space.

use super::error::{ErrorKind, VolumeError};
use super::json_file;
use crate::engine::{SpaceBudget, Volume};
use crate::security::user_name;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const QUOTAS_FILE: &str = "quotas.json";
/// How often each volume's allocation is measured.
pub const REFRESH: Duration = Duration::from_secs(1);
const NO_LIMIT: u64 = u64::MAX;

/// One owner's limit and use.
pub struct Budget {
    uid: u32,
    limit: AtomicU64,
    /// Worst-case bytes admitted, ever (wraps harmlessly).
    grown: AtomicU64,
    /// Measured use minus `grown` at the measurement's start (wrapping):
    /// use = `grown + offset`, one atomic to replace at a refresh.
    offset: AtomicU64,
}

impl Budget {
    fn new(uid: u32, limit: u64) -> Budget {
        Budget {
            uid,
            limit: AtomicU64::new(limit),
            grown: AtomicU64::new(0),
            offset: AtomicU64::new(0),
        }
    }

    /// Bytes counted against the limit now.
    pub fn used(&self) -> u64 {
        self.grown
            .load(Ordering::Acquire)
            .wrapping_add(self.offset.load(Ordering::Acquire))
    }

    pub fn limit(&self) -> Option<u64> {
        Some(self.limit.load(Ordering::Acquire)).filter(|&l| l != NO_LIMIT)
    }

    /// Replaces the use with `measured`, which was measured after `grown`
    /// read `before`: what was admitted meanwhile counts on top (at worst
    /// twice, until the next refresh).
    fn measured(&self, before: u64, measured: u64) {
        self.offset
            .store(measured.wrapping_sub(before), Ordering::Release);
    }
}

impl SpaceBudget for Budget {
    fn admit(&self, bytes: u64) -> Result<(), String> {
        let limit = self.limit.load(Ordering::Acquire);
        if bytes == 0 || limit == NO_LIMIT {
            return Ok(());
        }
        let offset = self.offset.load(Ordering::Acquire);
        self.grown
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                let used = g.wrapping_add(offset);
                (used.saturating_add(bytes) <= limit).then_some(g.wrapping_add(bytes))
            })
            .map(|_| ())
            .map_err(|g| {
                format!(
                    "quota exceeded: user {} may use {} bytes and uses {}; this request could \
                     need {bytes} more. Delete snapshots or data (trim), or ask root for more \
                     (`snapblk quota set {} SIZE`)",
                    user_name(self.uid),
                    limit,
                    g.wrapping_add(offset),
                    user_name(self.uid)
                )
            })
    }

    fn unlimited(&self) -> bool {
        self.limit.load(Ordering::Acquire) == NO_LIMIT
    }
}

/// Every owner's budget and the persisted limits.
pub struct Quotas {
    path: PathBuf,
    /// Serializes changes of the limits and their file.
    limits: Mutex<BTreeMap<u32, u64>>,
    budgets: Mutex<HashMap<u32, Arc<Budget>>>,
}

/// One user's line of `snapblk quota`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Usage {
    pub user: String,
    pub uid: u32,
    /// None: no limit.
    pub limit: Option<u64>,
    pub used: u64,
    pub volumes: Vec<String>,
}

impl Quotas {
    /// Reads `DATA_DIR/quotas.json` (none: no limits).
    pub fn load(data_dir: &Path) -> std::io::Result<Quotas> {
        let path = data_dir.join(QUOTAS_FILE);
        let limits: BTreeMap<u32, u64> = json_file::load(&path, "quotas")?;
        let budgets = limits
            .iter()
            .map(|(&uid, &limit)| (uid, Arc::new(Budget::new(uid, limit))))
            .collect();
        Ok(Quotas {
            path,
            limits: Mutex::new(limits),
            budgets: Mutex::new(budgets),
        })
    }

    /// The budget of `uid`'s volumes (made on first use, without a limit).
    pub fn budget(&self, uid: u32) -> Arc<Budget> {
        self.budgets
            .lock()
            .unwrap()
            .entry(uid)
            .or_insert_with(|| Arc::new(Budget::new(uid, NO_LIMIT)))
            .clone()
    }

    /// Makes `vol`'s writes count against its owner's budget.
    pub fn attach(&self, vol: &Volume) {
        let budget: Arc<dyn SpaceBudget> = self.budget(vol.access().owner);
        if !vol.has_budget(&budget) {
            vol.set_budget(Some(budget));
        }
    }

    /// Sets (`None`: removes) `uid`'s limit, durably.
    pub fn set(&self, uid: u32, limit: Option<u64>) -> Result<(), VolumeError> {
        let mut limits = self.limits.lock().unwrap();
        let mut next = limits.clone();
        match limit {
            Some(l) => next.insert(uid, l),
            None => next.remove(&uid),
        };
        json_file::save(&self.path, &next)?;
        *limits = next;
        self.budget(uid)
            .limit
            .store(limit.unwrap_or(NO_LIMIT), Ordering::Release);
        Ok(())
    }

    /// Measures every volume in `volumes` and replaces each owner's use
    /// (owners without volumes use nothing); attaches budgets on the way.
    pub fn refresh(&self, volumes: &[Arc<Volume>]) {
        let budgets: Vec<Arc<Budget>> = self.budgets.lock().unwrap().values().cloned().collect();
        let before: HashMap<u32, u64> = budgets
            .iter()
            .map(|b| (b.uid, b.grown.load(Ordering::Acquire)))
            .collect();
        let mut measured: HashMap<u32, u64> = HashMap::new();
        for vol in volumes {
            self.attach(vol);
            *measured.entry(vol.access().owner).or_default() += vol.quota_bytes();
        }
        for b in self.budgets.lock().unwrap().values() {
            let start = before.get(&b.uid).copied().unwrap_or(0);
            b.measured(start, measured.get(&b.uid).copied().unwrap_or(0));
        }
    }

    /// `uid`'s limit and use, refusing a snapshot when at or over it.
    pub fn check_snapshot(&self, uid: u32, volume: &str) -> Result<(), VolumeError> {
        let budget = self.budget(uid);
        match budget.limit() {
            Some(limit) if budget.used() >= limit => Err(VolumeError::new(
                ErrorKind::NoSpace,
                format!(
                    "snapshot of volume {volume} refused: its owner {} is at the space quota \
                     (uses {} of {limit} bytes), and a snapshot makes every overwrite keep the \
                     old data too. Delete snapshots or data, or ask root for more (`snapblk \
                     quota set {} SIZE`)",
                    user_name(uid),
                    budget.used(),
                    user_name(uid)
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Per user with a limit or a volume: limit, use and volumes, by uid.
    /// `owners` maps each volume name to its owner.
    pub fn usage(&self, owners: &[(String, u32)]) -> Vec<Usage> {
        let mut users: BTreeMap<u32, Vec<String>> = self
            .limits
            .lock()
            .unwrap()
            .keys()
            .map(|&u| (u, Vec::new()))
            .collect();
        for (name, uid) in owners {
            users.entry(*uid).or_default().push(name.clone());
        }
        users
            .into_iter()
            .map(|(uid, volumes)| {
                let budget = self.budget(uid);
                Usage {
                    user: user_name(uid),
                    uid,
                    limit: budget.limit(),
                    used: budget.used(),
                    volumes,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_within_the_limit_and_refresh_brings_use_back() {
        let b = Budget::new(4242, 100);
        assert!(b.admit(60).is_ok());
        assert_eq!(b.used(), 60);
        let e = b.admit(41).unwrap_err();
        assert!(e.contains("quota exceeded") && e.contains("uses 60"), "{e}");
        // A request that cannot allocate always goes through.
        assert!(b.admit(0).is_ok());
        // Measured: the 60 were overwrites of allocated blocks, 10 in all.
        let before = b.grown.load(Ordering::Acquire);
        assert!(b.admit(5).is_ok()); // admitted during the measurement
        b.measured(before, 10);
        assert_eq!(b.used(), 15);
        assert!(b.admit(85).is_ok());
        assert!(b.admit(1).is_err());
    }

    #[test]
    fn limits_persist() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quotas::load(dir.path()).unwrap();
        q.set(4242, Some(8 << 20)).unwrap();
        q.set(4243, Some(1)).unwrap();
        q.set(4243, None).unwrap();
        let q = Quotas::load(dir.path()).unwrap();
        assert_eq!(q.budget(4242).limit(), Some(8 << 20));
        assert_eq!(q.budget(4243).limit(), None);
        let usage = q.usage(&[("v".to_string(), 4242)]);
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].volumes, ["v"]);
        assert!(q.check_snapshot(4242, "v").is_ok());
    }
}

//! Freezing the filesystems mounted on the volumes' ublk devices
//! (`snapshot create --quiesce`), with a timer and a guaranteed thaw.
//!
//! Finding them: the daemon runs in a private mount namespace of its own
//! (see `control::daemon::private_mount_namespace`), so its own mount table
//! never shows what people mount on its devices. The host's table is PID 1's:
//! `/proc/1/mountinfo` lists each mount with its device's `major:minor`, and
//! a mount point is opened through `/proc/1/root/MOUNTPOINT`, which resolves
//! the path in PID 1's root and mount namespace. Each device's filesystem is
//! frozen once (a superblock freezes as a whole; a bind mount of it is the
//! same filesystem). When PID 1's table cannot be read (a daemon that is
//! not root lacks the ptrace-read right on PID 1, and could not freeze
//! anyway: FIFREEZE needs CAP_SYS_ADMIN), the freeze fails with an error
//! that says so and points at `--pre-hook 'fsfreeze -f MNT'`, and
//! `--on-timeout` decides whether a crash-consistent snapshot is taken. A
//! daemon in a container sees its container's PID 1: filesystems mounted
//! only outside the container are not found (the report lists what was
//! frozen, so an empty list shows it).
//!
//! The timer: FIFREEZE syncs the filesystem first and can block for long (a
//! lot of dirty data, a slow device), so a worker thread freezes while the
//! caller waits at most the timeout. On expiry, or when one mount fails, the
//! caller asks the worker to thaw everything it froze; a FIFREEZE still
//! blocked is thawed by the worker as soon as it returns.
//!
//! Thaw is guaranteed: before the first FIFREEZE the worker writes and
//! fsyncs `DATA_DIR/freeze-ID.json` naming every mount it is about to
//! freeze, and removes it once all are thawed. A daemon killed in between
//! finds the record at its next start ([`thaw_leftovers`], after its devices
//! are back, so the thaw's superblock write can be served) and thaws them.
//! A thaw of a filesystem that is not frozen fails with EINVAL, which is
//! taken as done, so a record left by a crash after the thaw is harmless.
//!
//! Must never: freeze before the record is durable, return with a filesystem
//! of ours still frozen without saying so, or remove a record while a
//! filesystem it names may still be frozen by us.

use crate::volumes::Registry;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
/// Record files are `DATA_DIR/freeze-ID.json`.
const RECORD_PREFIX: &str = "freeze-";
/// Test hook: with this set (milliseconds) in the daemon's environment, the
/// worker holds the filesystems frozen that long before reporting them
/// frozen, inside the timer: a guest test kills the daemon while frozen, or
/// lets the timer expire, with it.
const HOLD_KNOB: &str = "SNAPBLK_TEST_FREEZE_HOLD_MS";
/// The host's mount table and the root its mount points are relative to.
const HOST_MOUNTINFO: &str = "/proc/1/mountinfo";
const HOST_ROOT: &str = "/proc/1/root";

/// One filesystem to freeze.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Mount {
    /// `major:minor` of the ublk device.
    device: String,
    /// As PID 1 sees it.
    mount_point: String,
    /// What the daemon opens: the mount point under [`HOST_ROOT`].
    open_path: PathBuf,
}

/// `DATA_DIR/freeze-ID.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    target: String,
    snapshot: String,
    mounts: Vec<Mount>,
}

/// Filesystems held frozen by a worker until [`Frozen::thaw`].
pub struct Frozen {
    mount_points: Vec<String>,
    worker: Option<Worker>,
    timeout: Duration,
}

/// The caller's end of a freeze worker: ask it to thaw, hear when it did.
struct Worker {
    thaw: Sender<()>,
    done: Receiver<Result<(), String>>,
}

impl Worker {
    /// Asks the worker to thaw and waits up to `timeout` for it.
    fn thaw(self, timeout: Duration) -> Result<(), String> {
        let _ = self.thaw.send(());
        match self.done.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "a FIFREEZE has not returned after {} ms more; its filesystem is thawed as soon \
                 as it does (and at the daemon's next start otherwise)",
                timeout.as_millis()
            )),
            Err(RecvTimeoutError::Disconnected) => Err(
                "the freeze worker ended without thawing; the daemon's next start thaws \
                     what its record names"
                    .to_string(),
            ),
        }
    }
}

impl Frozen {
    /// The mount points frozen (as the host sees them).
    pub fn mount_points(&self) -> &[String] {
        &self.mount_points
    }

    /// Thaws everything; `Err` says what could not be thawed.
    pub fn thaw(mut self) -> Result<(), String> {
        self.worker.take().map_or(Ok(()), |w| w.thaw(self.timeout))
    }
}

impl Drop for Frozen {
    /// A caller that unwinds past its freeze still thaws.
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.thaw.send(());
        }
    }
}

/// Freezes every filesystem mounted on a ublk device of `volumes`, within
/// `timeout`. On `Err` nothing of ours stays frozen (or the error says it
/// is being thawed).
pub fn freeze(
    registry: &Registry,
    volumes: &[String],
    target: &str,
    snapshot: &str,
    timeout: Duration,
) -> Result<Frozen, String> {
    let data_dir = registry.data_dir();
    if let Err(e) = thaw_leftovers(data_dir) {
        return Err(format!("{e}; no new freeze until it is thawed"));
    }
    let mut devices = Vec::new();
    for v in volumes {
        for path in registry.live_device_paths_of(v) {
            let rdev = std::fs::metadata(&path)
                .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
                .rdev();
            devices.push(format!("{}:{}", libc::major(rdev), libc::minor(rdev)));
        }
    }
    let table = std::fs::read_to_string(HOST_MOUNTINFO).map_err(|e| {
        format!(
            "cannot read the host's mount table {HOST_MOUNTINFO}: {e}; freezing needs a daemon \
             running as root in the host's PID namespace; freeze from where the filesystem is \
             mounted with --pre-hook 'fsfreeze -f MNT' --post-hook 'fsfreeze -u MNT' instead"
        )
    })?;
    let mounts = mounts_on(&table, &devices, Path::new(HOST_ROOT));
    let mount_points: Vec<String> = mounts.iter().map(|m| m.mount_point.clone()).collect();
    if mounts.is_empty() {
        log::info!("{target}: snapshot {snapshot}: no filesystem is mounted on its devices; nothing to freeze");
        return Ok(Frozen {
            mount_points,
            worker: None,
            timeout,
        });
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let record_path = data_dir.join(format!(
        "{RECORD_PREFIX}{}-{}.json",
        crate::engine::now_unix_ms(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let record = Record {
        target: target.to_string(),
        snapshot: snapshot.to_string(),
        mounts,
    };
    let hold = std::env::var(HOLD_KNOB)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let (thaw_tx, thaw_rx) = mpsc::channel();
    let (frozen_tx, frozen_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("freeze".into())
        .spawn(move || {
            let done = work(&record_path, &record, hold, &thaw_rx, &frozen_tx);
            let _ = done_tx.send(done);
        })
        .map_err(|e| format!("cannot start the freeze thread: {e}"))?;
    let worker = Worker {
        thaw: thaw_tx,
        done: done_rx,
    };
    let failed = match frozen_rx.recv_timeout(timeout) {
        Ok(Ok(())) => {
            return Ok(Frozen {
                mount_points,
                worker: Some(worker),
                timeout,
            });
        }
        Ok(Err(e)) => e,
        Err(_) => format!(
            "freezing {} did not finish within {} ms; raise --quiesce-timeout or find what \
             holds the filesystem up",
            mount_points.join(", "),
            timeout.as_millis()
        ),
    };
    Err(match worker.thaw(timeout) {
        Ok(()) => format!("{failed}; everything was thawed"),
        Err(t) => format!("{failed}; {t}"),
    })
}

/// The worker: record, freeze, hold until asked (or the caller is gone),
/// thaw, remove the record. Tells `frozen` once everything is frozen (or
/// what failed); returns how the thaw went.
fn work(
    record_path: &Path,
    record: &Record,
    hold: Option<Duration>,
    thaw: &Receiver<()>,
    frozen: &Sender<Result<(), String>>,
) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
    if let Err(e) = crate::backend::file::replace_atomically(record_path, &bytes) {
        let _ = frozen.send(Err(format!(
            "cannot record the freeze in {} ({e}), so nothing was frozen",
            record_path.display()
        )));
        return Ok(());
    }
    let mut held: Vec<(&Mount, File)> = Vec::new();
    let mut result = Ok(());
    for m in &record.mounts {
        match File::open(&m.open_path).and_then(|f| ioctl(&f, FIFREEZE).map(|()| f)) {
            Ok(f) => held.push((m, f)),
            Err(e) => {
                result = Err(format!(
                    "cannot freeze {} (device {}): {e}{}",
                    m.mount_point,
                    m.device,
                    if e.raw_os_error() == Some(libc::EBUSY) {
                        " (it is frozen already, by someone else)"
                    } else {
                        ""
                    }
                ));
                break;
            }
        }
    }
    if result.is_ok() {
        let points: Vec<&str> = held.iter().map(|(m, _)| &*m.mount_point).collect();
        log::info!(
            "{}: snapshot {}: froze {}",
            record.target,
            record.snapshot,
            points.join(", ")
        );
    }
    let asked_early = match (&result, hold) {
        (Ok(()), Some(h)) => thaw.recv_timeout(h).is_ok(),
        _ => false,
    };
    if !asked_early {
        let ok = result.is_ok();
        let _ = frozen.send(result);
        if ok {
            // A caller that is gone (disconnected) also means thaw.
            let _ = thaw.recv();
        }
    }
    let mut failures = Vec::new();
    for (m, f) in held.iter().rev() {
        if let Err(e) = ioctl(f, FITHAW) {
            failures.push(format!("cannot thaw {}: {e}", m.mount_point));
        }
    }
    finish(record_path, failures)
}

/// After a thaw: the record goes if every thaw worked; else it stays for
/// the next start, and the failures are the error.
fn finish(record_path: &Path, failures: Vec<String>) -> Result<(), String> {
    if failures.is_empty() {
        return std::fs::remove_file(record_path).map_err(|e| {
            format!(
                "thawed, but cannot remove {} ({e}); the next start thaws again, harmlessly",
                record_path.display()
            )
        });
    }
    let message = format!(
        "{}; {} keeps them for `fsfreeze -u MNT` by hand or the daemon's next start",
        failures.join("; "),
        record_path.display()
    );
    log::error!("{message}");
    Err(message)
}

fn ioctl(f: &File, request: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: FIFREEZE and FITHAW take an int argument they ignore; the fd
    // is open for the call's duration.
    if unsafe { libc::ioctl(f.as_raw_fd(), request, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Thaws whatever a daemon that stopped while freezing left frozen (the
/// records in `data_dir`); a record goes once all its mounts are thawed.
pub fn thaw_leftovers(data_dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(data_dir)
        .map_err(|e| format!("cannot read {}: {e}", data_dir.display()))?;
    let mut errors = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(RECORD_PREFIX) || !name.ends_with(".json") {
            continue;
        }
        let path = entry.path();
        let record: Record = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                // A torn record was never durable, so nothing was frozen
                // after it: FIFREEZE waits for the fsync.
                log::warn!("{}: {e}; removing it", path.display());
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        let mut failures = Vec::new();
        for m in &record.mounts {
            match File::open(&m.open_path).and_then(|f| ioctl(&f, FITHAW)) {
                Ok(()) => log::warn!(
                    "thawed {} (device {}), frozen for snapshot {} of {} by a daemon that \
                     stopped before thawing it",
                    m.mount_point,
                    m.device,
                    record.snapshot,
                    record.target
                ),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => log::info!(
                    "{} (frozen for snapshot {} of {}) is not frozen any more",
                    m.mount_point,
                    record.snapshot,
                    record.target
                ),
                // Unmounted meanwhile: a filesystem that is gone is not frozen.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => log::info!(
                    "{} (frozen for snapshot {} of {}) is no longer mounted",
                    m.mount_point,
                    record.snapshot,
                    record.target
                ),
                Err(e) => failures.push(format!("cannot thaw {}: {e}", m.mount_point)),
            }
        }
        if let Err(e) = finish(&path, failures) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The mounts in `table` (mountinfo format) of `devices` (`major:minor`),
/// one per device, opened under `root`.
fn mounts_on(table: &str, devices: &[String], root: &Path) -> Vec<Mount> {
    let mut found: Vec<Mount> = Vec::new();
    for line in table.lines() {
        // ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS ...
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(device), Some(point)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        if !devices.iter().any(|d| d == device) || found.iter().any(|m| m.device == *device) {
            continue;
        }
        let mount_point = unescape_mount_field(point);
        found.push(Mount {
            device: device.to_string(),
            open_path: root.join(mount_point.trim_start_matches('/')),
            mount_point,
        });
    }
    found
}

/// The kernel's mount tables write space, tab, newline and backslash in a
/// path as `\NNN` (octal).
pub fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .all(|c| (b'0'..=b'7').contains(c))
                .then(|| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok())
                .flatten()
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
40 1 259:3 / /mnt/data\\040dir rw,relatime - ext4 /dev/ublkb3 rw
41 1 259:3 /sub /srv/bind rw,relatime - ext4 /dev/ublkb3 rw
42 1 259:4 / /mnt/other rw - ext4 /dev/ublkb4 rw
43 1 259:30 / /mnt/not-ours rw - ext4 /dev/ublkb30 rw";

    #[test]
    fn mounts_are_found_by_device_once_each_and_opened_under_the_root() {
        let found = mounts_on(
            TABLE,
            &["259:3".into(), "259:4".into()],
            Path::new("/proc/1/root"),
        );
        let got: Vec<(&str, &str, &Path)> = found
            .iter()
            .map(|m| (&*m.device, &*m.mount_point, &*m.open_path))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "259:3",
                    "/mnt/data dir",
                    Path::new("/proc/1/root/mnt/data dir")
                ),
                ("259:4", "/mnt/other", Path::new("/proc/1/root/mnt/other")),
            ]
        );
        assert!(mounts_on(TABLE, &["8:1".into()], Path::new("/")).is_empty());
    }

    #[test]
    fn mount_fields_unescape_octal_only() {
        assert_eq!(unescape_mount_field("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape_mount_field("/a\\9b\\04"), "/a\\9b\\04");
    }

    #[test]
    fn a_leftover_record_of_an_unmounted_filesystem_is_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("freeze-1-0.json");
        let record = Record {
            target: "volume v".into(),
            snapshot: "s".into(),
            mounts: vec![Mount {
                device: "259:3".into(),
                mount_point: "/gone".into(),
                open_path: dir.path().join("gone"),
            }],
        };
        std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
        std::fs::write(dir.path().join("freeze-2-0.json"), b"{torn").unwrap();
        thaw_leftovers(dir.path()).unwrap();
        assert!(!path.exists());
        assert!(!dir.path().join("freeze-2-0.json").exists());
    }
}

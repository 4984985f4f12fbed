//! Application quiesce around a snapshot, bounded by a timer (seed 002:
//! sync and suspend the applications before a snapshot, an error logged
//! when they do not answer in time, resume always).
//!
//! What is built: user hooks. `pre_hook` (say, a database's "begin backup"
//! or an `fsfreeze -f` the operator runs where the filesystem is mounted)
//! runs before the snapshot, `post_hook` after it, each as `sh -c CMD` with
//! `SNAPBLK_SNAPSHOT` and `SNAPBLK_TARGET` (`volume NAME` / `group NAME`)
//! in its environment, in a process group of its own, as the owner of the
//! data directory (the only non-root user the control socket admits, so a
//! hook never runs with more rights than the one who asked for it).
//!
//! The timer (`timeout_ms`, default [`DEFAULT_TIMEOUT_MS`]) bounds the
//! pre-hook: one that has not finished by then is killed (its whole process
//! group), the error is logged and reported, and the post-hook runs: the
//! post-hook runs whenever the pre-hook was started, whatever happened, so
//! the application is always resumed. A pre-hook that fails or times out
//! means no snapshot (`on_timeout: fail`, the default) or a crash-consistent
//! one taken after the post-hook (`crash-consistent`); the result says which.
//! The post-hook has its own timer of the same length; its failure is
//! logged and reported, and the snapshot stays.
//!
//! `freeze` (`--quiesce`) freezes the filesystems mounted on the volumes'
//! ublk devices between the hooks ([`freeze`]): pre-hook, freeze, snapshot,
//! thaw, post-hook, so a database's own backup mode is on while its
//! filesystem freezes. The freeze has its own timer of the same length; a
//! freeze that fails or outlives it is thawed, logged and reported like a
//! pre-hook's failure, and `on_timeout` decides in the same way. A freeze is
//! recorded durably before it happens, so a daemon killed while a
//! filesystem is frozen thaws it at its next start.
//!
//! Must never: leave a pre-hook running past its timer, skip the post-hook
//! of a pre-hook that started, take the snapshot while a freeze it waited
//! for is unfinished, leave a filesystem frozen without saying so, or run a hook as a more privileged user
//! than the data directory's owner.

pub mod freeze;

use crate::volumes::{ErrorKind, Registry, VolumeError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the pre-hook (and, separately, the post-hook) may take.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// The most of a failed hook's stderr quoted in the error.
const STDERR_TAIL: usize = 500;

/// What to do when the pre-hook fails or outlives its timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnTimeout {
    /// No snapshot; the request fails with the hook's error.
    #[default]
    Fail,
    /// A snapshot anyway, crash-consistent, after the post-hook resumed
    /// the application.
    CrashConsistent,
}

/// The `quiesce` member of `snapshot.create` and `group.snapshot.create`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quiesce {
    /// Freeze the filesystems mounted on the volumes' ublk devices.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze: bool,
    #[serde(default)]
    pub pre_hook: Option<String>,
    #[serde(default)]
    pub post_hook: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub on_timeout: Option<OnTimeout>,
}

/// Runs `take` (the snapshot) between the hooks of `q`, with the
/// filesystems on `volumes`' devices frozen if `q.freeze`. `target` and
/// `snapshot` name what is taken, for the hooks and the messages; the data
/// directory's owner runs the hooks. Returns `take`'s result with a
/// `quiesce` report: `{"quiesced": bool, "error": ..., "frozen": [mount
/// points], "thaw_error": ..., "post_hook_error": ...}`.
pub fn around(
    q: &Quiesce,
    registry: &Registry,
    target: &str,
    volumes: &[String],
    snapshot: &str,
    take: impl FnOnce() -> Result<Value, VolumeError>,
) -> Result<Value, VolumeError> {
    let data_dir = registry.data_dir();
    let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS));
    let owner = std::fs::metadata(data_dir)
        .map(|m| (m.uid(), m.gid()))
        .map_err(|e| {
            VolumeError::new(
                ErrorKind::IoError,
                format!("cannot read the owner of {}: {e}", data_dir.display()),
            )
        })?;
    let hook = |which: &str, cmd: &Option<String>| -> Result<(), String> {
        match cmd {
            Some(cmd) => run_hook(which, cmd, owner, target, snapshot, timeout),
            None => Ok(()),
        }
    };
    // The filesystems freeze once the application is quiet, so what it
    // flushed for its backup mode is in them.
    let frozen = hook("pre-hook", &q.pre_hook).and_then(|()| {
        q.freeze
            .then(|| freeze::freeze(registry, volumes, target, snapshot, timeout))
            .transpose()
    });
    let quiet = frozen.as_ref().map(|_| ()).map_err(Clone::clone);
    if let Err(e) = &quiet {
        log::error!("{target}: snapshot {snapshot}: {e}; resuming with the post-hook");
    }
    let (taken, mount_points, thawed, post) = match (frozen, q.on_timeout.unwrap_or_default()) {
        (Ok(frozen), _) => {
            let taken = take();
            let mount_points = frozen.as_ref().map(|f| f.mount_points().to_vec());
            let thawed = frozen.map_or(Ok(()), freeze::Frozen::thaw);
            (taken, mount_points, thawed, hook("post-hook", &q.post_hook))
        }
        (Err(e), OnTimeout::Fail) => {
            let post = hook("post-hook", &q.post_hook);
            let mut message =
                format!("snapshot {snapshot} of {target} was not taken: {e}; the post-hook ");
            message += &match &post {
                Ok(()) => "ran".to_string(),
                Err(p) => format!("failed too: {p}"),
            };
            return Err(VolumeError::new(ErrorKind::Busy, message));
        }
        (Err(_), OnTimeout::CrashConsistent) => {
            let post = hook("post-hook", &q.post_hook);
            (take(), None, Ok(()), post)
        }
    };
    for e in [&thawed, &post]
        .into_iter()
        .filter_map(|r| r.as_ref().err())
    {
        log::error!("{target}: snapshot {snapshot}: {e}");
    }
    let mut result = taken?;
    result["quiesce"] = json!({
        "quiesced": quiet.is_ok(),
        "error": quiet.err(),
        "frozen": mount_points,
        "thaw_error": thawed.err(),
        "post_hook_error": post.err(),
    });
    Ok(result)
}

/// Runs one hook to its end or its timer; `Err` says what went wrong.
fn run_hook(
    which: &str,
    cmd: &str,
    (uid, gid): (u32, u32),
    target: &str,
    snapshot: &str,
    timeout: Duration,
) -> Result<(), String> {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .env("SNAPBLK_SNAPSHOT", snapshot)
        .env("SNAPBLK_TARGET", target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != uid {
        c.uid(uid).gid(gid);
    }
    let mut child = c
        .spawn()
        .map_err(|e| format!("{which} `{cmd}` could not start: {e}"))?;
    // Read on the side, so a chatty hook never blocks on a full pipe.
    let (tx, stderr) = std::sync::mpsc::channel();
    if let Some(mut pipe) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = tx.send(text);
        });
    }
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= timeout => {
                // The whole group: a shell's children must not outlive it.
                // SAFETY: signalling a process group we created.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return Err(format!(
                    "{which} `{cmd}` did not finish within {} ms and was killed; raise \
                     --quiesce-timeout or fix the hook",
                    timeout.as_millis()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("{which} `{cmd}`: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    // A child the hook left behind may hold the pipe open: wait only a little.
    let stderr = stderr
        .recv_timeout(Duration::from_millis(200))
        .unwrap_or_default();
    let tail: String = stderr
        .trim()
        .chars()
        .rev()
        .take(STDERR_TAIL)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(format!("{which} `{cmd}` failed ({status}): {tail}"))
}

//! A copy job whose target stops taking data (a FIFO nobody reads) must not
//! block the volume: under `hold`, a write waiting for the job fails the
//! job after the hold timeout and goes through, with a clear error in
//! `copy status`; and `copy cancel` returns however stuck the job thread is.

mod common;

use common::*;
use serde_json::Value;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Only a guard against hanging forever.
const SAFETY: Duration = Duration::from_secs(120);

/// A daemon with volume `v` (16 MiB) full of 0x5a.
fn daemon(test: &str) -> Option<(tempfile::TempDir, Daemon)> {
    if skip_without(test, &["qemu-io"]) {
        return None;
    }
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "16M"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x5a 0 16M"]);
    Some((t, d))
}

/// A FIFO at `path`, opened read-write (so opening does not wait for a
/// reader) and never read.
fn fifo(path: &Path) -> std::fs::File {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo on a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// `snapblk copy start v --format stream --to - --policy hold ...` with its
/// standard output on `out`; returns the CLI process and the job id.
fn start_stalled(d: &Daemon, out: std::fs::File, hold_timeout: &str) -> (Child, String) {
    let child = Command::new(BIN)
        .arg("--control")
        .arg(d.control())
        .args(["copy", "start", "v", "--format", "stream", "--to", "-"])
        .args(["--policy", "hold", "--hold-timeout", hold_timeout])
        .stdout(out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..(SAFETY.as_millis() / 20) {
        if let Some(j) = d.json(&["copy", "list"]).as_array().unwrap().first() {
            return (child, j["id"].to_string());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
    panic!("the job never started; log:\n{}", d.log());
}

fn status(d: &Daemon, id: &str) -> Value {
    d.json(&["copy", "status", id])
}

#[test]
fn a_stalled_hold_target_fails_the_job_and_writes_go_on() {
    let Some((t, mut d)) = daemon("a_stalled_hold_target_fails_the_job_and_writes_go_on") else {
        return;
    };
    let (cli, id) = start_stalled(&d, fifo(&t.path().join("fifo")), "1");
    // The FIFO holds 64 KiB: the job is stuck in its first 1 MiB segment,
    // long before the last one, which this write must wait for.
    qemu_io_ok(
        &d.uri("v"),
        false,
        &["write -P 0x33 15M 1M", "read -P 0x33 15M 1M"],
    );
    let s = status(&d, &id);
    assert_eq!(s["state"], "failed", "{s}");
    let error = s["error"].as_str().unwrap();
    assert!(
        error.contains("took no data") && error.contains("hold timeout"),
        "unclear error: {error}"
    );
    let out = cli.wait_with_output().unwrap();
    assert!(!out.status.success(), "the CLI reported success");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("took no data"),
        "{out:?}"
    );
    // Nothing lost, and later writes do not wait at all.
    qemu_io_ok(
        &d.uri("v"),
        false,
        &[
            "read -P 0x5a 0 15M",
            "read -P 0x33 15M 1M",
            "write -P 0x44 0 1M",
            "read -P 0x44 0 1M",
        ],
    );
    assert!(d.alive());
    // The failure is durable.
    assert!(d.signal(libc::SIGTERM).success(), "{}", d.log());
    d.restart();
    assert_eq!(status(&d, &id)["state"], "failed");
}

#[test]
fn cancel_returns_while_the_target_is_stalled_and_held_writes_proceed() {
    let Some((t, mut d)) =
        daemon("cancel_returns_while_the_target_is_stalled_and_held_writes_proceed")
    else {
        return;
    };
    // A hold timeout far beyond the test: only the cancel can free the write.
    let (cli, id) = start_stalled(&d, fifo(&t.path().join("fifo")), "100000");
    let mut held = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x66 15M 1M"])
        .arg(d.uri("v"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The write waits for the job (it cannot finish while the FIFO is full).
    std::thread::sleep(Duration::from_millis(300));
    assert!(held.try_wait().unwrap().is_none(), "the write was not held");
    let out = d.ok(&["copy", "cancel", &id]);
    assert!(out.contains("cancelled"), "{out}");
    assert_eq!(status(&d, &id)["state"], "cancelled");
    assert!(d.log_shows("abandoning its I/O"), "{}", d.log());
    let w = held.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(qemu_io_clean(w.status.success(), &text), "{text}");
    qemu_io_ok(
        &d.uri("v"),
        false,
        &["read -P 0x5a 0 15M", "read -P 0x66 15M 1M"],
    );
    let _ = cli.wait_with_output();
    assert!(d.alive());
}

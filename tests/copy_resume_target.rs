//! A copy job resumed after a restart reopens exactly the file it was
//! writing: a symlink swapped in for its target, or another file put in its
//! place, fails the job with a clear error, and nothing is written there.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// For `test` (None where qemu-io is missing): a daemon with a slow copy
/// job to `copy.img` in a temporary directory, stopped half-way by a daemon
/// shutdown; returns the directory, the daemon, the target and the job id.
fn stopped(test: &str) -> Option<(tempfile::TempDir, Daemon, PathBuf, String)> {
    if skip_without(test, &["qemu-io"]) {
        return None;
    }
    let (t, dir) = tempdir();
    let mut d = Daemon::start(&dir);
    let target = t.path().join("copy.img");
    let id = stopped_job(&mut d, &target);
    Some((t, d, target, id))
}

/// A daemon with volume `v` (8 MiB of data) and a slow copy job to
/// `target` that is stopped half-way by a daemon shutdown; returns the id.
fn stopped_job(d: &mut Daemon, target: &Path) -> String {
    d.ok(&["volume", "create", "v", "--size", "8M"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x3c 0 8M"]);
    let id = d
        .ok(&[
            "copy",
            "start",
            "v",
            "--to",
            target.to_str().unwrap(),
            "--rate",
            "256K",
        ])
        .trim()
        .to_string();
    assert!(d.signal(libc::SIGTERM).success(), "{}", d.log());
    id
}

fn assert_refused(d: &Daemon, id: &str, needle: &str, victim: &Path, victim_bytes: &[u8]) {
    let s = d.json(&["copy", "status", id]);
    assert_eq!(s["state"], "failed", "{s}");
    let e = s["error"].as_str().unwrap();
    assert!(e.contains(needle), "unclear error: {e}");
    assert_eq!(
        std::fs::read(victim).unwrap(),
        victim_bytes,
        "the job wrote elsewhere"
    );
}

#[test]
fn a_symlink_swapped_in_for_the_target_is_not_followed() {
    let Some((t, mut d, target, id)) =
        stopped("a_symlink_swapped_in_for_the_target_is_not_followed")
    else {
        return;
    };
    let victim = t.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::remove_file(&target).unwrap();
    std::os::unix::fs::symlink(&victim, &target).unwrap();
    d.restart();
    assert_refused(&d, &id, "symbolic link", &victim, b"precious");
    assert!(d.alive());
}

#[test]
fn another_file_in_the_targets_place_is_not_written() {
    let Some((t, mut d, target, id)) = stopped("another_file_in_the_targets_place_is_not_written")
    else {
        return;
    };
    // Same name, same size, another inode: written beside it and renamed
    // over it, so the old inode still exists when the new one is made (a
    // remove then create may get the freed inode number back).
    let replaced = vec![0x77u8; 8 << 20];
    let beside = t.path().join("copy.img.new");
    std::fs::write(&beside, &replaced).unwrap();
    std::fs::rename(&beside, &target).unwrap();
    d.restart();
    assert_refused(&d, &id, "no longer the file", &target, &replaced);
}

#[test]
fn the_same_target_resumes() {
    let Some((_t, mut d, _target, id)) = stopped("the_same_target_resumes") else {
        return;
    };
    d.restart();
    d.ok(&["copy", "pause", &id]);
    let s = d.json(&["copy", "status", &id]);
    assert_eq!(s["state"], "paused", "{s}");
    assert!(s["target_id"].is_array(), "{s}");
}

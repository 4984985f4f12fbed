//! The space guard (`snapblk daemon --space-guard PERCENT`): a daemon whose
//! data directory is a small tmpfs, a schedule snapshotting every second and
//! a qemu-io writer overwriting the volume over NBD, so every scheduled
//! snapshot holds a volume's worth of old data. Without the guard the
//! tmpfs fills and the writes fail; with it the oldest scheduled snapshots
//! are pruned and a manual snapshot survives. Needs root (the tmpfs) and
//! qemu-io; skipped otherwise.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// The `space guard: pruned snapshot NAME of volume VOL ...` lines of the
/// log: (snapshot, volume, bytes freed).
fn prunes(log: &str) -> Vec<(String, String, u64)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split_once("space guard: pruned snapshot ")?.1;
            let words: Vec<&str> = rest.split_whitespace().collect();
            let freed = rest.split_once("freed ")?.1.split_whitespace().next()?;
            Some((
                words[0].to_string(),
                words[3].to_string(),
                freed.parse().ok()?,
            ))
        })
        .collect()
}

/// Polls until `done` holds of the daemon's log (a generous bound that only
/// keeps a broken build from hanging).
fn wait_log(d: &Daemon, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done(&d.log()) {
        assert!(
            Instant::now() < deadline,
            "never saw {what}; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write_all(uri: &str, pattern: u64, size: u64) {
    let out = qemu_io_ok(uri, false, &[format!("write -P {pattern} 0 {size}")]);
    assert!(out.contains("wrote"), "{out}");
}

fn check_all(uri: &str, pattern: u64, size: u64) {
    qemu_io_ok(uri, true, &[format!("read -P {pattern} 0 {size}")]);
}

fn guarded_daemon(test: &str, t: &Path, percent: &str) -> Option<(Mount, Daemon)> {
    if skip_without(test, &["qemu-io"]) {
        return None;
    }
    let data = t.join("data");
    let mount = mount_tmpfs(test, &data, "96M")?;
    // Sockets and the log off the tmpfs: only volumes fill it.
    let d = Daemon::start_with(&data, &t.join("d"), &["--space-guard", percent], &[]);
    Some((mount, d))
}

#[test]
fn a_filling_filesystem_prunes_the_oldest_scheduled_snapshots_and_keeps_manual_ones() {
    let (_t, t) = tempdir();
    // Declared before the daemon, so the daemon is dropped (killed) first
    // and the tmpfs unmounted after it, also when an assertion fails.
    let Some((_mount, d)) = guarded_daemon("space_guard_prunes", &t, "50") else {
        return;
    };
    let size = 8 * MIB;
    d.ok(&["volume", "create", "v", "--size", "8M"]);
    let uri = d.uri("v");
    write_all(&uri, 0xaa, size);
    d.ok(&["snapshot", "create", "v", "manual"]);
    d.ok(&[
        "schedule", "add", "v", "--every", "1s", "--keep", "1000", "--prefix", "s-",
    ]);

    // Every round overwrites the whole volume: every scheduled snapshot
    // keeps 8 MiB, so the 96 MiB tmpfs would fill after about ten of them.
    // Writing goes on until the guard pruned 4 and the schedule took 12
    // (more than fit), each write checked.
    let mut round = 0;
    loop {
        round += 1;
        write_all(&uri, round % 100 + 1, size);
        let taken = d.json(&["schedule", "list"])[0]["runs"].as_u64().unwrap();
        if prunes(&d.log()).len() >= 4 && taken >= 12 {
            break;
        }
        assert!(round < 100_000, "the guard never pruned:\n{}", d.log());
    }
    check_all(&uri, round % 100 + 1, size);
    check_all(&d.uri("v@manual"), 0xaa, size);

    let pruned = prunes(&d.log());
    eprintln!("{round} write rounds; pruned (snapshot, volume, bytes freed): {pruned:?}");
    for (i, (snap, vol, freed)) in pruned.iter().enumerate() {
        // Oldest first: the schedule's snapshots in the order it took them.
        assert_eq!(snap, &format!("s-{:06}", i + 1), "{pruned:?}");
        assert_eq!(vol, "v");
        // Punched out of the change logs: the filesystem got the space back.
        assert!(*freed >= MIB, "{snap} freed only {freed} bytes: {pruned:?}");
    }
    let snaps = d.names(&["snapshot", "list", "v"]);
    assert!(snaps.contains(&"manual".to_string()), "{snaps:?}");
    for (snap, ..) in &pruned {
        assert!(!snaps.contains(snap), "{snap} pruned but listed: {snaps:?}");
    }
    let kept = d.json(&["schedule", "list"])[0]["snapshots"].clone();
    assert!(
        !kept.as_array().unwrap().contains(&Value::from("s-000001")),
        "the schedule forgot what the guard pruned: {kept}"
    );

    let status = d.json(&["status"]);
    let guard = &status["space_guard"];
    assert_eq!(guard["threshold_percent"], 50, "{status}");
    assert!(guard["prunes"].as_u64().unwrap() >= 4, "{status}");
    assert_eq!(guard["last_prune"]["volume"], "v", "{status}");
    let last = guard["last_prune"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let before = guard["last_prune"]["used_percent_before"].as_f64().unwrap();
    let after = guard["last_prune"]["used_percent_after"].as_f64().unwrap();
    assert!(before >= 50.0 && after < before, "{status}");
    let info = d.json(&["volume", "info", "v"]);
    assert_eq!(info["space_guard"]["last_prune"]["snapshot"], last.as_str());
    let text = d.ok(&["volume", "info", "v"]);
    assert!(
        text.contains("space guard") && text.contains(&format!("last prune: {last} of v")),
        "{text}"
    );
    assert!(d.ok(&["status"]).contains("at 50% used"));
}

#[test]
fn with_only_manual_snapshots_and_a_clone_parent_it_warns_once_and_deletes_nothing() {
    let (_t, t) = tempdir();
    // 40% of the 96 MiB tmpfs: crossed only by the third 16 MiB write,
    // when m1 and m2 both exist (after the second, about 34% is used; at
    // 25% the check every 2 s could fire before m2 was taken).
    let Some((_mount, d)) = guarded_daemon("space_guard_warns", &t, "40") else {
        return;
    };
    let size = 16 * MIB;
    d.ok(&["volume", "create", "v", "--size", "16M"]);
    let uri = d.uri("v");
    // One scheduled snapshot, made the parent of a clone: the guard may
    // not take it either.
    let id = d.json(&[
        "schedule", "add", "v", "--every", "1s", "--keep", "1000", "--prefix", "s-",
    ])["id"]
        .as_u64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while d.json(&["schedule", "list"])[0]["runs"].as_u64().unwrap() == 0 {
        assert!(Instant::now() < deadline, "no run:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    d.ok(&["schedule", "pause", &id.to_string()]);
    let parent = d.json(&["schedule", "list"])[0]["snapshots"][0]
        .as_str()
        .unwrap()
        .to_string();
    d.ok(&["volume", "clone", &format!("v@{parent}"), "c"]);

    write_all(&uri, 0x11, size);
    d.ok(&["snapshot", "create", "v", "m1"]);
    write_all(&uri, 0x22, size);
    d.ok(&["snapshot", "create", "v", "m2"]);
    write_all(&uri, 0x33, size);

    let warning = "no scheduled snapshot can be pruned";
    wait_log(&d, "the warning", |log| log.contains(warning));
    // A few more checks go by (every 2 s): still one warning per crossing.
    std::thread::sleep(Duration::from_secs(7));
    let log = d.log();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    let line = log.lines().find(|l| l.contains(warning)).unwrap();
    assert!(
        line.contains(&format!("{parent} of v: ")) && line.contains("clone"),
        "the warning says why the scheduled one stays: {line}"
    );
    assert!(line.contains("m1") && line.contains("m2"), "{line}");
    assert!(prunes(&log).is_empty(), "{log}");

    let mut snaps = d.names(&["snapshot", "list", "v"]);
    snaps.sort();
    let mut want = vec!["m1".to_string(), "m2".to_string(), parent.clone()];
    want.sort();
    assert_eq!(snaps, want);
    check_all(&d.uri("v@m1"), 0x11, size);
    check_all(&d.uri("v@m2"), 0x22, size);
    check_all(&uri, 0x33, size);
    let status = d.json(&["status"]);
    assert_eq!(status["space_guard"]["prunes"], 0, "{status}");
    assert!(status["space_guard"]["last_prune"].is_null(), "{status}");
}

#[test]
fn the_threshold_is_checked_and_can_be_turned_off() {
    let (_t, dir) = tempdir();
    let out = std::process::Command::new(BIN)
        .args(["daemon", "--space-guard", "100", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 to 99") && err.contains("off"), "{err}");

    let d = Daemon::start_with(&dir, &dir, &["--space-guard", "off"], &[]);
    let status = d.json(&["status"]);
    assert_eq!(status["space_guard"]["enabled"], false, "{status}");
    let text = d.ok(&["status"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("space guard") && l.trim_end().ends_with("off")),
        "{text}"
    );
    d.ok(&["volume", "create", "v", "--size", "1M"]);
    assert!(d.ok(&["volume", "info", "v"]).contains("space guard"));
}

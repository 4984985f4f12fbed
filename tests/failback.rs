//! Failback after a failover (issue 13 part 6, issue 12 part 5): two real
//! daemons on loopback, each listening for replication. Volume `v` on A
//! replicates to `v` on B; B is promoted; both are written (apart and
//! overlapping); `replicate start v --to A/v --resync` on B sends only what
//! either side changed since the last consistency point both hold. Both end
//! equal to B's image (qemu-img compare through the NBD exports), A's own
//! image is kept in a `failback-*` snapshot, the bytes on the wire are
//! reported and far below the volume; a resync without a common base is
//! refused; one cut short by kill -9 of either side completes after restart.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The volume: big enough that a full copy would dwarf what changed.
const SIZE: u64 = 64 * MIB;

struct Site {
    d: Daemon,
    /// Its replication listener, `HOST:PORT`.
    addr: String,
}

struct Sites {
    _t: tempfile::TempDir,
    t: PathBuf,
    key: PathBuf,
    a: Site,
    b: Site,
}

fn site(t: &Path, name: &str, key: &Path) -> Site {
    let (d, addr) = replication_destination(&t.join(name), key, &[]);
    Site { d, addr }
}

/// Two daemons sharing a key, or `None` (the test is skipped) without
/// the clients the tests use.
fn sites(test: &str) -> Option<Sites> {
    if skip_without(test, &["qemu-img", "qemu-io", "nbdcopy"]) {
        return None;
    }
    let t = tempfile::tempdir().unwrap();
    let key = key_file(t.path(), "key", "correct horse battery staple\n");
    let a = site(t.path(), "a", &key);
    let b = site(t.path(), "b", &key);
    Some(Sites {
        t: t.path().to_path_buf(),
        _t: t,
        key,
        a,
        b,
    })
}

/// `replicate start v --to TO --key-file KEY --cp-interval 1h EXTRA...`.
fn start_args<'a>(s: &'a Sites, to: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "replicate",
        "start",
        "v",
        "--to",
        to,
        "--key-file",
        s.key.to_str().unwrap(),
        // CPs only when asked: writes on the old source after the failover
        // must not be shipped by a timed CP before the promotion.
        "--cp-interval",
        "1h",
    ];
    args.extend_from_slice(extra);
    args
}

/// `replicate start` of `v` on `from` to `v` on `to`.
fn start(s: &Sites, from: &Site, to: &Site, extra: &[&str]) -> String {
    let to = format!("{}/v", to.addr);
    from.d.ok(&start_args(s, &to, extra))
}

fn link(d: &Daemon) -> Value {
    d.json(&["replicate", "status", "v"])["links"][0].clone()
}

/// Waits until the source link of `v` on `d` says `state` with no error
/// pending, or fails with its log.
fn wait_link(d: &Daemon, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let l = link(d);
        if pred(&l) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened: {l}\nlog:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The whole image behind an NBD export, copied with nbdcopy.
fn read_all(uri: &str, to: &Path) {
    run_ok(Command::new("nbdcopy").args([uri, to.to_str().unwrap()]));
}

/// A volume filled on A, replicated to B, a CP applied; then B promoted
/// (failover) and both written: A at 8M (its own) and 20M (overlapped by
/// B), B at 40M (its own) and 20.5M. Returns A's image after its writes
/// (what its failback snapshot must hold) and the CP both hold.
fn failover(s: &Sites) -> (PathBuf, u64) {
    let (a, b) = (&s.a.d, &s.b.d);
    a.ok(&["volume", "create", "v", "--size", "64M"]);
    qemu_io_ok(&a.uri("v"), false, &["write -P 1 0 64M"]);
    start(s, &s.a, &s.b, &["--keep-cps", "2"]);
    let cp = a.json(&["replicate", "cp", "v"])["cp"].as_u64().unwrap();
    qemu_io_ok(&a.uri("v"), false, &["write -P 2 4M 1M"]);
    let cp2 = a.json(&["replicate", "cp", "v"])["cp"].as_u64().unwrap();
    assert!(cp2 > cp);
    // Failover: B's image is now its last CP.
    b.ok(&["replicate", "promote", "v"]);
    qemu_io_ok(
        &a.uri("v"),
        false,
        &["write -P 0xa1 8M 1M", "write -P 0xa2 20M 1M"],
    );
    qemu_io_ok(
        &b.uri("v"),
        false,
        &["write -P 0xb1 40M 1M", "write -P 0xb2 21495808 512k"],
    );
    let a_image = s.t.join("a-before-failback.raw");
    read_all(&a.uri("v"), &a_image);
    (a_image, cp2)
}

/// The failback snapshot on `d`'s `v`.
fn failback_snapshot(d: &Daemon) -> String {
    let snaps: Vec<String> = d
        .names(&["snapshot", "list", "v"])
        .into_iter()
        .filter(|n| n.starts_with("failback-"))
        .collect();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    snaps[0].clone()
}

/// Checks the end of a failback from `new` (the promoted side) onto `old`:
/// both equal `new`'s image, `old`'s own image is kept, the resync's
/// progress and wire bytes are reported: the resync covers at most about
/// `changed` bytes, and the new source sent at most about `budget`.
fn check_failback(
    new: &Daemon,
    old: &Daemon,
    old_image: &Path,
    changed: u64,
    budget: u64,
) -> Value {
    wait_link(
        new,
        |l| l["state"] == "replicating" && l["failback_base_cp"].is_null(),
        "the end of the resync",
    );
    let sent = link(new)["bytes_sent"].as_u64().unwrap();
    let applied = new.json(&["replicate", "cp", "v"])["cp"].as_u64().unwrap();
    let l = link(new);
    assert!(
        same_image(&new.uri("v"), &old.uri("v")),
        "after the failback the old source differs from the new primary"
    );
    assert!(same_image(
        &new.uri("v"),
        &old.uri(&format!("v@cp-{applied}"))
    ));
    let snap = failback_snapshot(old);
    assert!(
        same_image(old_image.to_str().unwrap(), &old.uri(&format!("v@{snap}"))),
        "snapshot {snap} does not hold the old source's own image"
    );
    let (done, total) = (
        l["sync_done_bytes"].as_u64().unwrap(),
        l["sync_total_bytes"].as_u64().unwrap(),
    );
    eprintln!(
        "failback: {sent} bytes sent for {changed} bytes changed on either side \
         ({total} bytes resynced, volume {SIZE} bytes)"
    );
    assert_eq!(done, total, "{l}");
    assert!(total <= changed + MIB / 4, "{l}");
    assert!(sent < budget * 11 / 10 + MIB / 4, "{l}");
    assert!(sent < SIZE / 10, "{l}");
    assert!(
        new.ok(&["replicate", "status", "v"])
            .contains("sync progress"),
        "human status shows the progress"
    );
    l
}

#[test]
fn failback_sends_only_what_changed_and_keeps_the_old_sources_changes() {
    let Some(s) = sites("failback") else { return };
    let (a_image, cp) = failover(&s);
    let (a, b) = (&s.a.d, &s.b.d);
    let out = start(&s, &s.b, &s.a, &["--resync"]);
    assert!(out.contains("failback"), "{out}");
    // A's 8M and 20M, B's 40M (its 20.5M lies inside A's 20M).
    let changed = 3 * MIB;
    let l = check_failback(b, a, &a_image, changed, changed);
    assert!(l["last_cp"].as_u64().unwrap() > cp, "CP numbers go on: {l}");
    assert!(l["sync_total_bytes"].as_u64().unwrap() >= changed, "{l}");
    assert!(l["bytes_sent"].as_u64().unwrap() >= changed, "{l}");
    // A's own writes are in the snapshot, and gone from its image.
    let snap = failback_snapshot(a);
    qemu_io_ok(
        &a.uri(&format!("v@{snap}")),
        true,
        &["read -P 0xa1 8M 1M", "read -P 0xa2 20M 1M"],
    );
    qemu_io_ok(
        &a.uri("v"),
        true,
        &[
            "read -P 1 8M 1M",
            "read -P 1 20M 512k",
            "read -P 0xb2 21495808 512k",
            "read -P 0xb1 40M 1M",
        ],
    );
    let dst = link(a);
    assert_eq!(dst["role"], "destination", "{dst}");
    assert!(
        !a.dir.join("replication/v.json").exists(),
        "A's old link is gone"
    );

    // And back again (the old source is primary again): promote A, write
    // there, resync onto B. B's link to A is its base, so it stays.
    a.ok(&["replicate", "promote", "v"]);
    qemu_io_ok(&a.uri("v"), false, &["write -P 0xc1 60M 1M"]);
    let b_image = s.t.join("b-before.raw");
    read_all(&b.uri("v"), &b_image);
    start(&s, &s.a, &s.b, &["--resync"]);
    check_failback(a, b, &b_image, MIB, MIB);
    qemu_io_ok(&b.uri("v"), true, &["read -P 0xc1 60M 1M"]);
}

#[test]
fn a_resync_without_a_common_base_is_refused() {
    let Some(s) = sites("failback_refused") else {
        return;
    };
    let b = &s.b.d;
    // Never a replica: nothing to start from.
    b.ok(&["volume", "create", "v", "--size", "64M"]);
    let to = format!("{}/v", s.a.addr);
    let args = start_args(&s, &to, &["--resync"]);
    let e = b.fails(&args);
    assert!(
        e.contains("never a replica") && e.contains("full sync"),
        "{e}"
    );
    b.ok(&["volume", "delete", "v"]);

    let (_, cp) = failover(&s);
    // The base snapshot deleted on B: refused at once.
    b.ok(&["snapshot", "delete", "v", &format!("cp-{cp}")]);
    let e = b.fails(&args);
    assert!(
        e.contains(&format!("cp-{cp}")) && e.contains("deleted") && e.contains("full sync"),
        "{e}"
    );
    // Taken again under the same name: not the base either (by generation).
    b.ok(&["snapshot", "create", "v", &format!("cp-{cp}")]);
    let e = b.fails(&args);
    assert!(
        e.contains("not the consistency point") && e.contains("full sync"),
        "{e}"
    );
}

#[test]
fn the_old_source_refuses_a_resync_it_cannot_base() {
    let Some(s) = sites("failback_old_source") else {
        return;
    };
    let (a, b) = (&s.a.d, &s.b.d);
    failover(&s);
    // The old source forgot what it changed: its link is gone.
    a.ok(&["replicate", "stop", "v"]);
    start(&s, &s.b, &s.a, &["--resync"]);
    let l = wait_link(
        b,
        |l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("no common base"))
        },
        "the refusal",
    );
    let e = l["error"].as_str().unwrap();
    assert!(e.contains("full sync"), "{e}");
    assert!(
        a.names(&["snapshot", "list", "v"])
            .iter()
            .all(|n| !n.starts_with("failback-")),
        "nothing happened to A's volume"
    );
    qemu_io_ok(&a.uri("v"), true, &["read -P 0xa1 8M 1M"]);
}

#[test]
fn a_resync_cut_short_by_kill_9_completes_after_restart() {
    // A stops in the middle of applying the resync's CP; B ships slowly.
    let Some(mut s) = sites("failback_kill") else {
        return;
    };
    let (a_image, cp) = failover(&s);
    let resync_cp = cp + 1;
    s.a.d.env = vec![
        ("SNAPBLK_TEST_PAUSE_APPLY".into(), resync_cp.to_string()),
        ("SNAPBLK_TEST_STAGE_DELAY_MS".into(), "300".into()),
    ];
    s.a.d.signal(libc::SIGTERM);
    s.a.d.restart();
    start(&s, &s.b, &s.a, &["--resync"]);
    // Kill the new source mid-transfer, then restart it.
    wait_link(
        &s.b.d,
        |l| l["sync_done_bytes"].as_u64().unwrap_or(0) > 0,
        "resync progress",
    );
    s.b.d.kill9_and_restart();
    // Kill the old source mid-apply, then restart it without the hooks.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !s.a.d.log().contains("pausing in the middle of applying") {
        assert!(Instant::now() < deadline, "{}", s.a.d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    s.a.d.env.clear();
    s.a.d.kill9_and_restart();
    // After its restart B sent the resync once more, then (the old source
    // having applied it meanwhile) its own changes once more.
    check_failback(&s.b.d, &s.a.d, &a_image, 3 * MIB, 6 * MIB);
}

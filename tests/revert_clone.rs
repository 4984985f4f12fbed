//! Rollback and clones end to end (issue 12 parts 1-2), against the real
//! daemon and real clients (qemu-io writes, qemu-img compare checks):
//! `snapshot revert` refused while a copy job or a read-write NBD client
//! (libnbd) uses the volume and allowed with --force, which disconnects the
//! NBD writer but not a reader of the snapshot, the live image equal to the snapshot afterwards and newer
//! snapshots intact; `volume clone` reading the snapshot, writing
//! independently of its parent, cloned again, surviving restarts, pinning
//! the parent snapshot until `volume flatten` (which resumes after a
//! kill -9); and 100 clones of a filled 1 GiB volume.

mod common;

use common::{qemu_io_ok, run, run_ok, skip_without, tempdir, Daemon};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `qemu-img compare` of two exports (raw): true if identical.
fn same(d: &Daemon, a: &str, b: &str) -> bool {
    let (ok, o, e) = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &d.uri(a),
        &d.uri(b),
    ]));
    assert!(
        ok || o.contains("differ"),
        "qemu-img compare failed: {o}{e}"
    );
    ok
}

/// An export's content in a local file, through qemu-img.
fn save(d: &Daemon, export: &str, path: &Path) {
    let _ = std::fs::remove_file(path);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(d.uri(export))
            .arg(path),
    );
}

/// `qemu-img compare` of an export against a local raw file.
fn equals_file(d: &Daemon, export: &str, path: &Path) -> bool {
    let (ok, _, _) = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &d.uri(export),
        path.to_str().unwrap(),
    ]));
    ok
}

/// A daemon with volume `v` of `size` (64 KiB chunks), written by the
/// qemu-io command `fill`, and snapshot `snap` of that.
fn snapshotted(size: &str, fill: &str, snap: &str) -> (tempfile::TempDir, Daemon) {
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&[
        "volume",
        "create",
        "v",
        "--size",
        size,
        "--chunk-size",
        "64K",
    ]);
    qemu_io_ok(&d.uri("v"), false, &[fill]);
    d.ok(&["snapshot", "create", "v", snap]);
    (t, d)
}

fn wait_flattened(d: &Daemon, clone: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info = d.json(&["volume", "info", clone]);
        if info.get("parent").is_none() {
            return info;
        }
        let state = info["flatten"]["state"].as_str().unwrap_or("").to_string();
        assert!(!state.starts_with("failed"), "{info}");
        assert!(Instant::now() < deadline, "flatten never ended: {info}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn revert_refuses_writers_rewrites_only_changes_and_keeps_newer_snapshots() {
    if skip_without("revert", &["qemu-img", "qemu-io"]) {
        return;
    }
    let (t, d) = snapshotted("16M", "write -P 0x11 0 16M", "s1");
    qemu_io_ok(
        &d.uri("v"),
        false,
        &["write -P 0x22 1M 512K", "discard 4M 1M", "write -z 9M 64K"],
    );
    d.ok(&["snapshot", "create", "v", "s2"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x33 12M 100K"]);
    let s2 = t.path().join("s2.img");
    save(&d, "v@s2", &s2);
    let before = t.path().join("before.img");
    save(&d, "v", &before);

    // A copy job reading the volume is a user: refused, naming it.
    let target = t.path().join("copy.img");
    let id = d
        .ok(&[
            "copy",
            "start",
            "v",
            "--to",
            target.to_str().unwrap(),
            "--rate",
            "256K",
            "--block-size",
            "64K",
        ])
        .trim()
        .to_string();
    let e = d.fails(&["snapshot", "revert", "v", "s1"]);
    assert!(e.contains(&format!("copy job {id}")), "{e}");
    assert!(
        equals_file(&d, "v", &before),
        "a refused revert changed the volume"
    );

    // --force cancels it and reverts.
    let r = d.json(&["snapshot", "revert", "v", "s1", "--force"]);
    let job = d.json(&["copy", "status", &id]);
    assert_eq!(job["state"], "cancelled", "{job}");
    assert!(
        same(&d, "v", "v@s1"),
        "the live volume differs from s1 after revert"
    );
    assert!(
        equals_file(&d, "v@s2", &s2),
        "the newer snapshot s2 changed"
    );
    // Only the changed chunks: 512K + 1M + 64K + 100K rounded to 64K chunks.
    let changed = r["changed_bytes"].as_u64().unwrap();
    assert_eq!(changed, (8 + 16 + 1 + 2) * 65536, "{r}");
    println!(
        "revert of {changed} changed bytes of 16 MiB took {} us",
        r["elapsed_us"]
    );
    // The rewritten chunks count as changed since s1 (a later diff or
    // incremental backup must carry them).
    let diff = d.json(&["snapshot", "diff", "v", "s1"]);
    assert_eq!(diff["changed_bytes"].as_u64(), Some(changed), "{diff}");

    let e = d.fails(&["snapshot", "revert", "v", "nope"]);
    assert!(e.contains("snapshot v@nope not found"), "{e}");

    // Without users, no --force needed; forward to the newer snapshot too.
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x44 0 64K"]);
    d.ok(&["snapshot", "revert", "v", "s2"]);
    assert!(equals_file(&d, "v", &s2));
    let human = d.ok(&["snapshot", "revert", "v", "s1"]);
    assert!(
        human.contains("reverted volume v to snapshot s1"),
        "{human}"
    );
    assert!(same(&d, "v", "v@s1"));
}

/// A libnbd client holding export `sys.argv[1]` open: it reads once (so
/// the server is past negotiation), prints `connected`, then per stdin line
/// `w` writes 64 KiB of 0x55 at 0, `r` reads the first byte, and prints
/// `ok BYTE` or `err`.
const HOLD: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(512, 0)
print("connected", flush=True)
for line in sys.stdin:
    try:
        if line.strip() == "w":
            h.pwrite(b"\x55" * 65536, 0)
            h.flush()
            print("ok", flush=True)
        else:
            print("ok %02x" % h.pread(512, 0)[0], flush=True)
    except Exception as e:
        print("err", e, flush=True)
"#;

/// Starts [`HOLD`] on `uri` and waits until it is connected.
fn hold(
    uri: String,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    use std::io::BufRead;
    let mut c = common::py_spawn(HOLD, &[uri], true);
    let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected", "{}", common::read_stderr(&mut c));
    (c, out)
}

/// Sends one command to a [`hold`] client; returns its answer.
fn ask(
    c: &mut (
        std::process::Child,
        std::io::BufReader<std::process::ChildStdout>,
    ),
    cmd: &str,
) -> String {
    use std::io::{BufRead, Write};
    writeln!(c.0.stdin.as_mut().unwrap(), "{cmd}").unwrap();
    let mut line = String::new();
    c.1.read_line(&mut line).unwrap();
    line.trim().to_string()
}

#[test]
fn forced_revert_disconnects_nbd_writers_and_keeps_snapshot_readers() {
    if skip_without("revert_nbd", &["qemu-img", "qemu-io"]) || common::python().is_none() {
        return;
    }
    let (_t, d) = snapshotted("16M", "write -P 0x11 0 16M", "s1");
    let mut writer = hold(d.uri("v"));
    let mut reader = hold(d.uri("v@s1"));
    assert_eq!(ask(&mut writer, "w"), "ok");
    qemu_io_ok(&d.uri("v"), true, &["read -P 0x55 0 64K"]);

    // Refused, naming the client and the way out; nothing changes.
    let e = d.fails(&["snapshot", "revert", "v", "s1"]);
    assert!(
        e.contains("written by NBD client(s): connection")
            && e.contains("disconnect them")
            && e.contains("--force"),
        "{e}"
    );
    assert_eq!(
        ask(&mut writer, "r"),
        "ok 55",
        "a refused revert cut the writer"
    );

    // Forced: the writer is disconnected, the volume reverted, the reader
    // of s1 stays connected and reads on.
    let r = d.json(&["snapshot", "revert", "v", "s1", "--force"]);
    assert_eq!(r["changed_bytes"], 65536, "{r}");
    assert!(
        ask(&mut writer, "w").starts_with("err"),
        "the NBD writer still writes after a forced revert"
    );
    assert!(
        same(&d, "v", "v@s1"),
        "the live volume differs from s1 after a forced revert"
    );
    assert_eq!(ask(&mut reader, "r"), "ok 11", "the reader of v@s1 was cut");
    // The volume takes writers again.
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x66 0 64K"]);
    assert_eq!(ask(&mut reader, "r"), "ok 11");
    for mut c in [writer, reader] {
        drop(c.0.stdin.take());
        c.0.wait().unwrap();
    }
}

#[test]
fn clones_read_the_snapshot_write_alone_pin_the_parent_until_flattened() {
    if skip_without("clones", &["qemu-img", "qemu-io"]) {
        return;
    }
    let (t, mut d) = snapshotted("8M", "write -P 0x11 0 6M", "base");
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x99 0 1M"]);

    let e = d.fails(&["volume", "clone", "v", "c"]);
    assert!(e.contains("VOL@SNAP"), "{e}");
    let e = d.fails(&["volume", "clone", "v@nope", "c"]);
    assert!(e.contains("nope"), "{e}");
    let r = d.json(&["volume", "clone", "v@base", "c"]);
    println!(
        "clone of an 8 MiB snapshot created in {} us",
        r["create_us"]
    );
    assert_eq!(r["parent"], "v@base", "{r}");
    assert_eq!(r["owned_bytes"], 0, "{r}");
    assert!(
        same(&d, "c", "v@base"),
        "a new clone must read as its snapshot"
    );

    // Writes to the clone and to the parent stay apart.
    qemu_io_ok(
        &d.uri("c"),
        false,
        &["write -P 0x77 2M 1M", "discard 5M 64K"],
    );
    qemu_io_ok(
        &d.uri("c"),
        true,
        &[
            "read -P 0x77 2M 1M",
            "read -P 0 5M 64K",
            "read -P 0x11 0 1M",
        ],
    );
    qemu_io_ok(
        &d.uri("v"),
        true,
        &["read -P 0x11 2M 1M", "read -P 0x99 0 1M"],
    );
    qemu_io_ok(&d.uri("v@base"), true, &["read -P 0x11 0 6M"]);
    let info = d.json(&["volume", "info", "c"]);
    assert_eq!(info["owned_bytes"], (1 << 20) + 65536, "{info}");
    assert_eq!(d.json(&["volume", "info", "v"])["clones"][0], "c");
    let human = d.ok(&["volume", "info", "c"]);
    assert!(
        human.contains("parent") && human.contains("v@base"),
        "{human}"
    );

    // The parent snapshot and volume are pinned, with errors naming the clone.
    let e = d.fails(&["snapshot", "delete", "v", "base"]);
    assert!(
        e.contains("clone(s) c") && e.contains("volume flatten"),
        "{e}"
    );
    let e = d.fails(&["volume", "delete", "v"]);
    assert!(e.contains("clones") && e.contains(" c"), "{e}");

    // A clone is snapshotted and cloned again; everything survives a restart.
    d.ok(&["snapshot", "create", "c", "cs"]);
    d.ok(&["volume", "clone", "c@cs", "cc"]);
    qemu_io_ok(&d.uri("cc"), false, &["write -P 0x55 0 64K"]);
    qemu_io_ok(&d.uri("c"), false, &["write -P 0x66 7M 64K"]);
    qemu_io_ok(
        &d.uri("cc"),
        true,
        &[
            "read -P 0x55 0 64K",
            "read -P 0x77 2M 1M",
            "read -P 0 7M 64K",
        ],
    );
    let c_img = t.path().join("c.img");
    save(&d, "c", &c_img);
    let cc_img = t.path().join("cc.img");
    save(&d, "cc", &cc_img);
    d.kill9_and_restart();
    assert!(
        equals_file(&d, "c", &c_img),
        "clone c changed across a restart"
    );
    assert!(
        equals_file(&d, "cc", &cc_img),
        "clone cc changed across a restart"
    );
    assert_eq!(d.json(&["volume", "info", "cc"])["parent"], "c@cs");

    // A clone can be copied like any volume.
    let copy = t.path().join("copy.img");
    let id = d
        .ok(&["copy", "start", "c", "--to", copy.to_str().unwrap()])
        .trim()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    while d.json(&["copy", "status", &id])["state"] != "done" {
        assert!(Instant::now() < deadline, "copy of the clone never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&c_img).unwrap()
    );

    // Flatten: progress, then the parent snapshot may go.
    let out = d.ok(&["--json", "volume", "flatten", "c", "--wait"]);
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "done", "{out}");
    assert_eq!(last["copied_chunks"], last["total_chunks"], "{out}");
    assert!(d.json(&["volume", "info", "c"]).get("parent").is_none());
    d.ok(&["snapshot", "delete", "v", "base"]);
    assert!(equals_file(&d, "c", &c_img), "flatten changed the clone");
    // c's own snapshot still pins it for cc.
    let e = d.fails(&["snapshot", "delete", "c", "cs"]);
    assert!(e.contains("clone(s) cc"), "{e}");
    d.ok(&["volume", "delete", "cc"]);
    d.ok(&["snapshot", "delete", "c", "cs"]);
    d.ok(&["volume", "delete", "v"]);
    d.kill9_and_restart();
    assert!(
        equals_file(&d, "c", &c_img),
        "the flattened clone needs its parent"
    );
}

#[test]
fn flatten_resumes_after_kill9() {
    if skip_without("flatten_resume", &["qemu-img", "qemu-io"]) {
        return;
    }
    let (t, mut d) = snapshotted("256M", "write -P 0x3c 0 256M", "base");
    d.ok(&["volume", "clone", "v@base", "c"]);
    qemu_io_ok(&d.uri("c"), false, &["write -P 0x5a 100M 1M"]);
    let img = t.path().join("c.img");
    save(&d, "c", &img);
    let started = d.json(&["volume", "flatten", "c"]);
    d.kill9_and_restart();
    let info = d.json(&["volume", "info", "c"]);
    println!(
        "flatten at the kill: {}; after restart: {}",
        started["flatten"], info["flatten"]
    );
    let done = wait_flattened(&d, "c");
    assert!(
        done.get("flatten").is_none_or(|f| f["state"] == "done"),
        "{done}"
    );
    assert!(
        !t.path().join("data/volumes/c/owned.map").exists(),
        "the flattened clone kept its ownership map"
    );
    d.ok(&["snapshot", "delete", "v", "base"]);
    d.ok(&["volume", "delete", "v"]);
    assert!(equals_file(&d, "c", &img), "the flattened clone differs");
}

#[test]
fn a_hundred_clones_of_a_filled_1g_volume() {
    if skip_without("hundred_clones", &["qemu-img", "qemu-io"]) {
        return;
    }
    const CLONES: usize = 100;
    let (_t, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "1G"]);
    let fill: Vec<String> = (0..16)
        .map(|i| format!("write -P {} {}M 64M", 0x20 + i, i * 64))
        .collect();
    qemu_io_ok(&d.uri("v"), false, &fill);
    d.ok(&["snapshot", "create", "v", "base"]);
    let used_before = du(&dir);
    let started = Instant::now();
    let mut slowest = 0u64;
    for i in 0..CLONES {
        let r = d.json(&["volume", "clone", "v@base", &format!("c{i}")]);
        slowest = slowest.max(r["create_us"].as_u64().unwrap());
    }
    let total = started.elapsed();
    let used_after = du(&dir);
    let clone_bytes: u64 = d
        .json(&["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] != "v")
        .map(|v| v["used_bytes"].as_u64().unwrap())
        .sum();
    println!(
        "{CLONES} clones of a filled 1 GiB snapshot: {:.1} ms in all through the CLI \
         ({:.2} ms each), slowest in the daemon {:.2} ms; their space {} KiB in all \
         (data directory {} -> {} KiB)",
        total.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3 / CLONES as f64,
        slowest as f64 / 1e3,
        clone_bytes / 1024,
        used_before / 1024,
        used_after / 1024
    );
    // Each clone reads as the snapshot: a piece of every 64 MiB stripe,
    // and two of them compared whole.
    for i in 0..CLONES {
        let reads: Vec<String> = (0..16)
            .map(|s| format!("read -P {} {}M 64K", 0x20 + s, s * 64 + (i as u64 * 7) % 64))
            .collect();
        qemu_io_ok(&d.uri(&format!("c{i}")), true, &reads);
    }
    assert!(same(&d, "c0", "v@base"));
    assert!(same(&d, &format!("c{}", CLONES - 1), "v@base"));
    // Nothing of the 1 GiB: each clone holds its empty journals (with the
    // 1 MiB each keeps reserved for a full disk) and no data.
    assert!(
        clone_bytes <= CLONES as u64 * (5 << 20),
        "clones cost {clone_bytes} bytes"
    );
    let owned: u64 = (0..CLONES)
        .map(|i| {
            d.json(&["volume", "info", &format!("c{i}")])["owned_bytes"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(owned, 0, "unwritten clones own no data");
}

/// Bytes allocated under `dir`.
fn du(dir: &Path) -> u64 {
    let out = run_ok(Command::new("du").args(["-s", "-B1"]).arg(dir));
    out.split_whitespace().next().unwrap().parse().unwrap()
}

/// Issue 12 part 2, "a clone can be ... copied, replicated ... and cloned
/// again": a clone's replica holds the chunks it never wrote (read from its
/// parent snapshot) too; a copy of a clone's snapshot, and a clone of that
/// snapshot, read as it.
#[test]
fn a_clone_is_replicated_copied_from_its_snapshot_and_cloned_again() {
    if skip_without("clone_uses", &["qemu-img", "qemu-io"]) {
        return;
    }
    let (t, d) = snapshotted("8M", "write -P 0x11 0 8M", "s1");
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x99 0 8M"]);
    d.ok(&["volume", "clone", "v@s1", "c"]);
    qemu_io_ok(
        &d.uri("c"),
        false,
        &["write -P 0x22 1M 64K", "write -z 5M 128K"],
    );

    // Replicated to a second daemon: the replica's CP is the clone's image,
    // parent chunks included (0x11 where the clone never wrote).
    let key = common::key_file(t.path(), "key", "clone replication key\n");
    let (dst, addr) = common::replication_destination(&t.path().join("dst"), &key, &[]);
    d.ok(&[
        "replicate",
        "start",
        "c",
        "--to",
        &format!("{addr}/r"),
        "--key-file",
        key.to_str().unwrap(),
    ]);
    let cp = d.json(&["replicate", "cp", "c"])["cp"].as_u64().unwrap();
    let replica = dst.uri(&format!("r@cp-{cp}"));
    assert!(
        common::same_image(&d.uri("c"), &replica),
        "the replica's cp-{cp} differs from the clone"
    );
    qemu_io_ok(
        &replica,
        true,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 64K",
            "read -P 0 5M 128K",
        ],
    );
    // Later writes follow, on top of the parent's chunks.
    qemu_io_ok(&d.uri("c"), false, &["write -P 0x33 6M 4K"]);
    let cp = d.json(&["replicate", "cp", "c"])["cp"].as_u64().unwrap();
    assert!(
        common::same_image(&d.uri("c"), &dst.uri(&format!("r@cp-{cp}"))),
        "the replica's cp-{cp} differs from the clone after more writes"
    );
    d.ok(&["replicate", "stop", "c"]);

    // A copy job of the clone's snapshot equals it; so does a clone of it.
    d.ok(&["snapshot", "create", "c", "cs"]);
    qemu_io_ok(&d.uri("c"), false, &["write -P 0x44 0 8M"]);
    let copy = t.path().join("cs.img");
    let id = d
        .ok(&["copy", "start", "c@cs", "--to", copy.to_str().unwrap()])
        .trim()
        .to_string();
    let job = common::wait_job_ended(&d, &id);
    assert_eq!(job["state"], "done", "{job}");
    assert!(
        equals_file(&d, "c@cs", &copy),
        "the copy of the clone's snapshot differs from it"
    );
    d.ok(&["volume", "clone", "c@cs", "cc"]);
    assert!(same(&d, "cc", "c@cs"), "a clone of a clone reads wrong");
    qemu_io_ok(
        &d.uri("cc"),
        true,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 64K",
            "read -P 0x33 6M 4K",
        ],
    );
}

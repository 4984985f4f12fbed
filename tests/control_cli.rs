//! End-to-end tests of the control plane: the real `snapblk` binary, a real
//! daemon on a temporary data directory, the CLI and raw protocol lines.
//!
//! Each daemon serves NBD only on a UNIX socket inside its own data directory
//! (no fixed TCP port), so these tests run in parallel.

mod common;

use common::{assert_error, have, names, qemu_io_ok, tempdir, Daemon, Raw, BIN};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn volume_lifecycle_human_and_json() {
    let (_t, dir) = tempdir();
    let d = Daemon::start_in_data_dir(&dir);

    assert!(d.ok(&["volume", "list"]).contains("no volumes"));
    assert_eq!(d.json(&["volume", "list"]), Value::Array(vec![]));

    let out = d.ok(&["volume", "create", "alpha", "--size", "1G"]);
    assert_eq!(
        out.trim(),
        "created volume alpha: 1 GiB, chunk size 64 KiB, 4 partitions, cache writearound"
    );

    let v = d.json(&[
        "volume",
        "create",
        "beta",
        "--size",
        "1.5GiB",
        "--chunk-size",
        "128K",
        "--partitions",
        "2",
    ]);
    assert_eq!(v["name"], "beta");
    assert_eq!(v["capacity"], 1610612736u64);
    assert_eq!(v["chunk_size"], 131072);
    assert_eq!(v["partitions"], 2);
    assert_eq!(v["state"], "ok");

    let v = d.json(&["volume", "create", "gamma", "--size", "8388608"]);
    assert_eq!(v["capacity"], 8 << 20);
    assert_eq!(v["chunk_size"], 65536);

    // Human list: an aligned table, sizes humanized.
    let table = d.ok(&["volume", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("NAME "), "{table}");
    for col in ["SIZE", "USED", "CHUNK", "PARTITIONS", "SNAPSHOTS", "STATE"] {
        let at = lines[0].find(col).unwrap();
        for l in &lines[1..] {
            assert!(
                l.len() > at && &l[at - 2..at] == "  ",
                "column {col} misaligned:\n{table}"
            );
        }
    }
    assert!(
        lines[1].starts_with("alpha ") && lines[1].contains("1 GiB") && lines[1].ends_with("ok")
    );
    assert!(
        lines[2].starts_with("beta ")
            && lines[2].contains("1.5 GiB")
            && lines[2].contains("128 KiB")
    );
    assert!(lines[3].starts_with("gamma ") && lines[3].contains("8 MiB"));

    // JSON list: raw bytes.
    let list = d.json(&["volume", "list"]);
    assert_eq!(names(&list), ["alpha", "beta", "gamma"]);
    assert_eq!(list[0]["capacity"], 1u64 << 30);

    // Info: key: value, humanized with raw bytes.
    let info = d.ok(&["volume", "info", "alpha"]);
    assert!(info.contains("name:"), "{info}");
    assert!(
        info.lines()
            .any(|l| l.starts_with("capacity:") && l.ends_with("1 GiB (1073741824 bytes)")),
        "{info}"
    );
    assert!(
        info.lines()
            .any(|l| l.starts_with("chunk size:") && l.contains("64 KiB")),
        "{info}"
    );
    assert!(
        info.lines()
            .any(|l| l.starts_with("state:") && l.ends_with("ok")),
        "{info}"
    );
    let info = d.json(&["volume", "info", "beta"]);
    assert_eq!(info["capacity"], 1610612736u64);
    assert_eq!(info["partitions"], 2);

    // Duplicates are refused.
    let err = d.fails(&["volume", "create", "alpha", "--size", "1G"]);
    assert!(err.contains("alpha already exists"), "{err}");

    // Delete.
    assert_eq!(
        d.ok(&["volume", "delete", "beta"]).trim(),
        "deleted volume beta"
    );
    let v = d.json(&["volume", "delete", "gamma"]);
    assert_eq!(v["deleted"], true);
    assert_eq!(names(&d.json(&["volume", "list"])), ["alpha"]);
    assert!(!dir.join("volumes/beta").exists());
    assert!(!dir.join("volumes/.deleting-beta").exists());
    let err = d.fails(&["volume", "info", "beta"]);
    assert!(err.contains("volume beta not found; "), "{err}");
    let err = d.fails(&["volume", "delete", "beta"]);
    assert!(err.contains("not found"), "{err}");

    // A deleted name can be reused.
    d.ok(&["volume", "create", "beta", "--size", "64M"]);
    assert_eq!(d.json(&["volume", "info", "beta"])["capacity"], 64u64 << 20);
}

#[test]
fn bad_sizes_and_names_are_rejected() {
    let (_t, dir) = tempdir();
    let d = Daemon::start_in_data_dir(&dir);
    for size in [
        "10X",
        "abc",
        "",
        "-1",
        "1.5.5G",
        "0.1K",
        "99999999999999999999T",
        "1e9",
    ] {
        let err = d.fails(&["volume", "create", "v", "--size", size]);
        assert!(err.contains("invalid size"), "{size}: {err}");
        assert!(
            err.contains("; use bytes or a number with a K, M, G or T suffix"),
            "{err}"
        );
    }
    let err = d.fails(&["volume", "create", "v", "--size", "0"]);
    assert!(err.contains("invalid size"), "{err}");
    let err = d.fails(&[
        "volume",
        "create",
        "v",
        "--size",
        "1G",
        "--chunk-size",
        "3K",
    ]);
    assert!(err.contains("chunk"), "{err}");
    let long = "x".repeat(65);
    for name in ["a@b", ".hidden", "a/b", "sp ace", long.as_str(), "é"] {
        let err = d.fails(&["volume", "create", name, "--size", "1G"]);
        assert!(err.contains("invalid volume name"), "{name}: {err}");
        assert!(err.contains("; use 1-64 characters"), "{err}");
    }
    d.ok(&["volume", "create", "ok", "--size", "1M"]);
    let err = d.fails(&["snapshot", "create", "ok", "bad@snap"]);
    assert!(err.contains("invalid snapshot name"), "{err}");
    // Nothing half-created is left behind.
    assert_eq!(names(&d.json(&["volume", "list"])), ["ok"]);

    // The daemon checks too (clients other than the CLI).
    let mut raw = Raw::connect(&d.control());
    let r = raw.send(r#"{"op":"volume.create","name":"a@b","size":1048576}"#);
    assert_error(&r, "invalid_argument", "invalid volume name");
    let r = raw.send(r#"{"op":"volume.create","name":"z","size":0}"#);
    assert_error(&r, "invalid_argument", "size");
    let r = raw.send(r#"{"op":"volume.create","name":"z","size":1048576,"chunk_size":3000}"#);
    assert_eq!(r["ok"], false, "{r}");
    let r = raw.send(r#"{"op":"snapshot.create","volume":"ok","name":".x"}"#);
    assert_error(&r, "invalid_argument", "invalid snapshot name");
}

#[test]
fn a_daemon_that_cannot_start_says_why_and_what_to_do() {
    let (_t, dir) = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    let start = |data_dir: &Path| {
        let out = Command::new(BIN)
            .arg("daemon")
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        err.lines().last().unwrap_or_default().to_string()
    };
    // A data directory below a regular file cannot be created.
    let file = dir.join("file");
    std::fs::write(&file, b"").unwrap();
    assert_eq!(
        start(&file.join("data")),
        format!(
            "snapblk: error: cannot create the data directory {}: Not a directory; give one this \
             user may create with --data-dir DIR (or $SNAPBLK_DATA_DIR)",
            file.join("data").display()
        )
    );
    // One data directory, one daemon.
    let d = Daemon::start(&dir.join("d"));
    let err = start(&dir.join("d"));
    assert!(
        err.contains("another snapblk daemon is already using") && err.contains("stop it first"),
        "{err}"
    );
    drop(d);
}

#[test]
fn daemon_not_running_is_a_clear_error() {
    let (_t, dir) = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("control.sock");
    // A stale socket file nobody listens on: connection refused.
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    let out = Command::new(BIN)
        .arg("--control")
        .arg(&control)
        .args(["volume", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim_end().split("; ").next().unwrap(),
        format!(
            "snapblk: error: cannot reach the daemon at {}: connection refused",
            control.display()
        )
    );
    assert!(
        err.contains(&format!(
            "start it with `snapblk daemon --data-dir {}`",
            dir.display()
        )),
        "{err}"
    );

    // $SNAPBLK_CONTROL is used when --control is not given.
    let out = Command::new(BIN)
        .args(["volume", "list"])
        .env("SNAPBLK_CONTROL", dir.join("nothing.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("nothing.sock"), "{err}");
}

#[test]
fn snapshots_create_list_delete() {
    let (_t, dir) = tempdir();
    let d = Daemon::start_in_data_dir(&dir);
    d.ok(&["volume", "create", "vol", "--size", "16M"]);
    assert!(d
        .ok(&["snapshot", "list", "vol"])
        .contains("has no snapshots"));
    let out = d.ok(&["snapshot", "create", "vol", "s1"]);
    assert!(
        out.starts_with("created snapshot s1 of volume vol"),
        "{out}"
    );
    let s2 = d.json(&["snapshot", "create", "vol", "s2"]);
    assert_eq!(s2["name"], "s2");
    assert_eq!(s2["volume"], "vol");
    assert!(s2["generation"].is_u64() && s2["stall_us"].is_u64(), "{s2}");

    let err = d.fails(&["snapshot", "create", "vol", "s1"]);
    assert!(err.contains("already exists"), "{err}");
    let err = d.fails(&["snapshot", "create", "novol", "s1"]);
    assert!(err.contains("volume novol not found"), "{err}");

    let table = d.ok(&["snapshot", "list", "vol"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("NAME")
            && lines[0].contains("GENERATION")
            && lines[0].contains("CREATED")
    );
    assert!(
        lines[1].starts_with("s1 ") && lines[1].contains(" UTC"),
        "{table}"
    );
    assert!(lines[2].starts_with("s2 "), "{table}");
    let list = d.json(&["snapshot", "list", "vol"]);
    assert_eq!(names(&list), ["s1", "s2"]);
    assert!(list[0]["created_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(d.json(&["volume", "info", "vol"])["snapshots"], 2);

    assert_eq!(
        d.ok(&["snapshot", "delete", "vol", "s1"]).trim(),
        "deleted snapshot s1 of volume vol"
    );
    assert_eq!(names(&d.json(&["snapshot", "list", "vol"])), ["s2"]);
    let err = d.fails(&["snapshot", "delete", "vol", "s1"]);
    assert!(err.contains("snapshot s1 of volume vol not found"), "{err}");
    assert_eq!(
        d.json(&["snapshot", "delete", "vol", "s2"])["deleted"],
        true
    );
    assert_eq!(d.json(&["snapshot", "list", "vol"]), Value::Array(vec![]));
}

#[test]
fn malformed_lines_get_errors_and_the_connection_goes_on() {
    let (_t, dir) = tempdir();
    let d = Daemon::start_in_data_dir(&dir);
    let mut raw = Raw::connect(&d.control());
    assert_error(&raw.send("garbage"), "bad_request", "not valid JSON");
    assert_error(&raw.send("[1,2,3]"), "bad_request", "JSON object");
    assert_error(&raw.send("{}"), "bad_request", "missing field `op`");
    assert_error(
        &raw.send(r#"{"op":"volume.explode"}"#),
        "bad_request",
        "unknown op `volume.explode`",
    );
    assert_error(
        &raw.send(r#"{"op":"volume.info"}"#),
        "bad_request",
        "missing field `name`",
    );
    assert_error(
        &raw.send(r#"{"op":"volume.create","name":"v","size":"big"}"#),
        "bad_request",
        "invalid type",
    );
    assert_error(
        &raw.send(r#"{"op":"volume.list","bogus":1}"#),
        "bad_request",
        "unknown field",
    );
    let long = format!(r#"{{"op":"volume.list","x":"{}"}}"#, "a".repeat(100_000));
    assert_error(&raw.send(&long), "bad_request", "longer than");
    assert_error(
        &raw.send("\u{1}\u{2}\u{3}"),
        "bad_request",
        "not valid JSON",
    );

    // The same connection still answers good requests.
    let r = raw.send(r#"{"op":"volume.create","name":"v","size":1073741824,"chunk_size":65536,"partitions":4,"backing":null}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["capacity"], 1u64 << 30);
    let r = raw.send(r#"{"op":"volume.list"}"#);
    assert_eq!(r["ok"], true);
    assert_eq!(names(&r["result"]), ["v"]);
    assert_error(
        &raw.send(r#"{"op":"volume.info","name":"nope"}"#),
        "not_found",
        "volume nope not found",
    );
    let r = raw.send(r#"{"op":"daemon.status"}"#);
    assert_eq!(r["result"]["volumes"], 1, "{r}");

    // Invalid UTF-8 and a client vanishing mid-line do not hurt the daemon.
    let mut s = UnixStream::connect(d.control()).unwrap();
    s.write_all(b"\xff\xfe{\"op\n").unwrap();
    s.write_all(b"{\"op\":\"volume.li").unwrap();
    drop(s);
    assert_eq!(names(&d.json(&["volume", "list"])), ["v"]);
}

#[test]
fn restart_after_sigterm_and_kill9_keeps_volumes_and_snapshots() {
    let (_t, dir) = tempdir();
    let mut d = Daemon::start_in_data_dir(&dir);
    d.ok(&["volume", "create", "a", "--size", "32M"]);
    d.ok(&[
        "volume",
        "create",
        "b",
        "--size",
        "64M",
        "--partitions",
        "2",
    ]);
    let have_qemu = have("qemu-io");
    if have_qemu {
        qemu_io_ok(&d.uri("a"), false, &["write -P 0x5a 0 1M", "flush"]);
    }
    d.ok(&["snapshot", "create", "a", "before"]);
    if have_qemu {
        qemu_io_ok(&d.uri("a"), false, &["write -P 0x11 0 64k", "flush"]);
    }
    d.ok(&["snapshot", "create", "a", "after"]);

    let status = d.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0; log:\n{}", d.log());
    assert!(!d.control().exists(), "control socket removed at shutdown");
    assert!(d.log().contains("stopped cleanly"));

    let mut d = Daemon::start_in_data_dir(&dir);
    assert_eq!(names(&d.json(&["volume", "list"])), ["a", "b"]);
    assert_eq!(
        names(&d.json(&["snapshot", "list", "a"])),
        ["before", "after"]
    );
    assert_eq!(d.json(&["volume", "info", "b"])["partitions"], 2);
    d.ok(&["snapshot", "create", "b", "third"]);
    d.ok(&["snapshot", "delete", "a", "before"]);

    // kill -9: no shutdown at all; a stale control socket stays behind.
    let status = d.signal(libc::SIGKILL);
    assert!(!status.success());
    assert!(d.control().exists());

    let mut d = Daemon::start_in_data_dir(&dir);
    assert_eq!(names(&d.json(&["volume", "list"])), ["a", "b"]);
    assert_eq!(names(&d.json(&["snapshot", "list", "a"])), ["after"]);
    assert_eq!(names(&d.json(&["snapshot", "list", "b"])), ["third"]);
    assert_eq!(d.json(&["volume", "info", "a"])["capacity"], 32u64 << 20);
    if have_qemu {
        // The data came back too: the origin and the surviving snapshot.
        qemu_io_ok(
            &d.uri("a"),
            true,
            &["read -P 0x11 0 64k", "read -P 0x5a 64k 960k"],
        );
        qemu_io_ok(&d.uri("a@after"), true, &["read -P 0x11 0 64k"]);
    }

    // SIGINT is a clean stop too.
    assert_eq!(d.signal(libc::SIGINT).code(), Some(0));
    assert!(!d.control().exists());
}

#[test]
fn interrupted_create_and_delete_are_cleaned_up_at_start() {
    let (_t, dir) = tempdir();
    let mut d = Daemon::start_in_data_dir(&dir);
    d.ok(&["volume", "create", "keep", "--size", "1M"]);
    d.signal(libc::SIGTERM);
    std::fs::create_dir_all(dir.join("volumes/.deleting-old/junk")).unwrap();
    std::fs::create_dir_all(dir.join("volumes/.creating-new")).unwrap();
    let d = Daemon::start_in_data_dir(&dir);
    assert_eq!(names(&d.json(&["volume", "list"])), ["keep"]);
    assert!(!dir.join("volumes/.deleting-old").exists());
    assert!(!dir.join("volumes/.creating-new").exists());
}

#[test]
fn corrupt_volume_is_reported_not_fatal() {
    let (_t, dir) = tempdir();
    let mut d = Daemon::start_in_data_dir(&dir);
    d.ok(&["volume", "create", "bad", "--size", "8M"]);
    d.ok(&["volume", "create", "good", "--size", "8M"]);
    d.ok(&["snapshot", "create", "good", "s1"]);
    d.signal(libc::SIGTERM);

    std::fs::write(
        dir.join("volumes/bad/volume.json"),
        b"{ this is not a manifest",
    )
    .unwrap();

    let d = Daemon::start_in_data_dir(&dir);
    assert!(
        d.log().contains("volume bad cannot be opened"),
        "log:\n{}",
        d.log()
    );

    let list = d.json(&["volume", "list"]);
    assert_eq!(names(&list), ["bad", "good"]);
    let state = list[0]["state"].as_str().unwrap();
    assert!(state.starts_with("error: "), "{state}");
    assert!(state.contains("corrupt"), "{state}");
    assert_eq!(list[1]["state"], "ok");
    // Nothing is known of the broken one but its state: its BACKEND column
    // must not guess `local` (it may be a Ceph volume that cannot open).
    let table = d.ok(&["volume", "list"]);
    assert!(
        table.lines().any(|l| l.starts_with("bad ")
            && l.contains("error: ")
            && l.split_whitespace().nth(6) == Some("-")),
        "{table}"
    );
    let info = d.ok(&["volume", "info", "bad"]);
    assert!(info.contains("error: "), "{info}");

    // The broken one is refused with a clear error; the good one works.
    let err = d.fails(&["snapshot", "create", "bad", "x"]);
    assert!(err.contains("volume bad is not available"), "{err}");
    assert_eq!(names(&d.json(&["snapshot", "list", "good"])), ["s1"]);
    d.ok(&["snapshot", "create", "good", "s2"]);
    d.ok(&["volume", "create", "other", "--size", "1M"]);

    // The operator can delete it.
    d.ok(&["volume", "delete", "bad"]);
    assert_eq!(names(&d.json(&["volume", "list"])), ["good", "other"]);
}

/// `volume reopen` retries a volume that could not open, once what broke it
/// is fixed, and closes and opens a served one again, without a restart
/// and without touching the other volumes; it is refused while anything
/// uses the volume.
#[test]
fn a_volume_reopens_without_a_restart() {
    let (_t, dir) = tempdir();
    let mut d = Daemon::start_in_data_dir(&dir);
    d.ok(&["volume", "create", "v", "--size", "8M"]);
    d.ok(&["volume", "create", "other", "--size", "8M"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x5a 0 64k", "flush"]);
    d.ok(&["snapshot", "create", "v", "s1"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x6b 0 4k", "flush"]);
    d.signal(libc::SIGTERM);

    let manifest = dir.join("volumes/v/volume.json");
    let good = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, b"{ this is not a manifest").unwrap();
    let d = Daemon::start_in_data_dir(&dir);
    let err = d.fails(&["volume", "reopen", "v"]);
    assert!(
        err.contains("cannot reopen volume v") && err.contains("volume.json"),
        "{err}"
    );
    let state = d.json(&["volume", "info", "v"])["state"].to_string();
    assert!(state.contains("volume.json"), "{state}");

    std::fs::write(&manifest, good).unwrap();
    assert_eq!(d.ok(&["volume", "reopen", "v"]), "reopened volume v\n");
    let check = |d: &Daemon| {
        qemu_io_ok(
            &d.uri("v"),
            false,
            &["read -P 0x6b 0 4k", "read -P 0x5a 4k 60k"],
        );
        qemu_io_ok(&d.uri("v@s1"), true, &["read -P 0x5a 0 64k"]);
    };
    check(&d);

    // A served volume is refused while a client holds it, then reopens.
    let mut client = common::nbd_client_connected(&d.uri("v"));
    let err = d.fails(&["volume", "reopen", "v"]);
    assert!(err.contains("in use by 1 open export connection"), "{err}");
    drop(client.stdin.take());
    client.wait().unwrap();
    let reopened = d.json(&["volume", "reopen", "v"]);
    assert_eq!(reopened["state"], "ok");
    assert_eq!(reopened["snapshots"], 1);
    check(&d);
    qemu_io_ok(&d.uri("other"), false, &["write 0 64k", "flush"]);
    let err = d.fails(&["volume", "reopen", "nope"]);
    assert!(err.contains("volume nope not found"), "{err}");
}

/// A journal write that fails (here: the files made immutable) leaves the
/// volume refusing copy-on-write writes, with an error that names `volume
/// reopen`; once the storage works again, a reopen brings the volume back
/// without a daemon restart, its snapshot exact.
#[test]
fn a_failed_journal_comes_back_with_reopen() {
    let (_t, dir) = tempdir();
    let d = Daemon::start_in_data_dir(&dir);
    d.ok(&["volume", "create", "v", "--size", "8M"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x11 0 1M", "flush"]);
    d.ok(&["snapshot", "create", "v", "s1"]);
    let parts: Vec<String> = std::fs::read_dir(dir.join("volumes/v"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("part-")
        })
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let chattr = |flag: &str| {
        Command::new("chattr")
            .arg(flag)
            .args(&parts)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !chattr("+i") {
        common::skip(
            "a_failed_journal_comes_back_with_reopen",
            "chattr +i needs root and a file system with the immutable flag",
        );
        return;
    }
    let (ok, text) = common::qemu_io(&d.uri("v"), false, &["write -P 0x22 0 64k", "flush"]);
    let err = d.fails(&["snapshot", "create", "v", "s2"]);
    assert!(chattr("-i"));
    assert!(
        !ok,
        "a write whose journal record cannot be written must fail: {text}"
    );
    assert!(
        err.contains("metadata journal write failed") && err.contains("snapblk volume reopen"),
        "{err}"
    );
    // The storage works again, but the volume stays refusing until reopened.
    let (ok, text) = common::qemu_io(&d.uri("v"), false, &["write -P 0x33 0 64k", "flush"]);
    assert!(!ok, "{text}");

    assert_eq!(d.ok(&["volume", "reopen", "v"]), "reopened volume v\n");
    qemu_io_ok(
        &d.uri("v"),
        false,
        &["write -P 0x33 0 64k", "flush", "read -P 0x33 0 64k"],
    );
    qemu_io_ok(&d.uri("v@s1"), true, &["read -P 0x11 0 1M"]);
    d.ok(&["snapshot", "create", "v", "s2"]);
    qemu_io_ok(&d.uri("v@s2"), true, &["read -P 0x33 0 64k"]);
}

#[test]
fn control_socket_permissions() {
    let (t, dir) = tempdir();
    let d = Daemon::start_in_data_dir(&dir);
    let mode = std::fs::metadata(d.control()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "control socket mode {mode:o}");

    // SO_PEERCRED: a uid that neither owns the data directory nor is root is
    // refused, even if it can connect. Needs root to run a client as nobody.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(
            "control_socket_permissions",
            "its SO_PEERCRED part needs root to run a client as nobody",
        );
        return;
    }
    d.ok(&["volume", "create", "v", "--size", "1M"]);
    for p in [t.path(), dir.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(d.control(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new(BIN)
        .arg("--control")
        .arg(d.control())
        .args(["volume", "list"])
        .uid(65534)
        .gid(65534)
        .output();
    use std::os::unix::process::CommandExt as _;
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            common::skip(
                "control_socket_permissions",
                &format!("its SO_PEERCRED part cannot run the CLI as nobody ({e})"),
            );
            return;
        }
    };
    if out.status.code() == Some(126)
        || String::from_utf8_lossy(&out.stderr).contains("Permission denied (os")
    {
        common::skip(
            "control_socket_permissions",
            "its SO_PEERCRED part needs a binary that nobody may execute",
        );
        return;
    }
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("snapblk: error: permission denied"),
        "{err}"
    );
    assert!(
        err.contains("may not use the control socket")
            && err.contains("ask an administrator to add you to that group"),
        "{err}"
    );
    // Root (us) still works.
    assert_eq!(names(&d.json(&["volume", "list"])), ["v"]);
}

/// Starts `snapblk serve ARGS --data-dir DIR` and reads what it prints up
/// to its last hint; the daemon is adopted by the returned [`Daemon`].
fn serve_and_read_hints(dir: &Path, args: &[&str]) -> (Daemon, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    while !text.contains("More:") {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        text.push_str(&line);
    }
    let mut d = Daemon::in_data_dir(dir);
    d.adopt(child);
    (d, text)
}

/// The first word of `text` that starts with `prefix`, without quotes.
fn uri_in(text: &str, prefix: &str) -> String {
    text.split_whitespace()
        .map(|w| w.trim_matches('\''))
        .find(|w| w.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} URI in:\n{text}"))
        .to_string()
}

/// `qemu-img info URI` works and sees `size` bytes, if qemu-img is installed.
fn qemu_img_sees(uri: &str, size: u64) {
    if let Ok(o) = Command::new("qemu-img")
        .args(["info", "--output=json", uri])
        .output()
    {
        assert!(
            o.status.success(),
            "qemu-img info {uri} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let info: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(info["virtual-size"], size);
    }
}

#[test]
fn serve_creates_disk0_and_prints_how_to_connect() {
    // The safe default: the UNIX socket only, no TCP.
    let (_t, dir) = tempdir();
    let (mut d, text) = serve_and_read_hints(&dir, &["--size", "64M"]);
    assert!(text.contains("serving volume disk0 (64 MiB)"), "{text}");
    assert!(!text.contains("nbd://"), "no TCP by default:\n{text}");
    assert!(text.contains("add --nbd-listen"), "{text}");
    let unix = format!(
        "nbd+unix:///disk0?socket={}",
        dir.canonicalize().unwrap().join("nbd.sock").display()
    );
    assert!(text.contains(&format!("qemu-img info '{unix}'")), "{text}");
    assert!(text.contains(&format!("nbdinfo '{unix}'")), "{text}");
    assert_eq!(d.json(&["status"])["nbd_tcp"], serde_json::json!([]));
    let v = d.json(&["volume", "info", "disk0"]);
    assert_eq!(v["capacity"], 64u64 << 20);
    // The printed URI works with a real NBD client.
    qemu_img_sees(&uri_in(&text, "nbd+unix://"), 64 << 20);
    assert_eq!(d.signal(libc::SIGTERM).code(), Some(0));

    // A second serve keeps the existing disk0 (no re-create, same size);
    // asked for TCP on loopback, it serves and prints that too.
    let (mut d, text) = serve_and_read_hints(&dir, &["--nbd-listen", "127.0.0.1:0"]);
    let uri = uri_in(&text, "nbd://127.0.0.1:");
    assert!(uri.ends_with("/disk0"), "{uri}");
    assert!(text.contains(&format!("qemu-img info '{uri}'")), "{text}");
    assert!(text.contains(&unix), "{text}");
    assert_eq!(
        d.json(&["volume", "info", "disk0"])["capacity"],
        64u64 << 20
    );
    qemu_img_sees(&uri, 64 << 20);
    assert_eq!(d.signal(libc::SIGTERM).code(), Some(0));
}

#[test]
fn nbd_exports_follow_the_registry() {
    // The registry is the NBD server's export list: volumes and VOL@SNAP.
    let Ok(o) = Command::new("nbdinfo").arg("--version").output() else {
        eprintln!("nbdinfo not installed: skipping");
        return;
    };
    assert!(o.status.success());
    let (_t, dir) = tempdir();
    let d = Daemon::start_in_data_dir(&dir);
    d.ok(&["volume", "create", "v", "--size", "4M"]);
    d.ok(&["snapshot", "create", "v", "s"]);
    let sock = d.nbd_sock();
    let o = Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("export=\"v\""), "{text}");
    assert!(text.contains("export=\"v@s\""), "{text}");
    d.ok(&["volume", "delete", "v"]);
    let o = Command::new("nbdinfo").arg(d.uri("v")).output().unwrap();
    assert!(
        !o.status.success(),
        "a deleted volume is no longer exported"
    );
}

#[test]
fn deleting_a_volume_in_use_is_refused() {
    // An NBD client holds the volume open: delete says busy, and works once
    // the client has gone.
    if Command::new("qemu-io").arg("--version").output().is_err() {
        eprintln!("qemu-io not installed: skipping");
        return;
    }
    let (_t, dir) = tempdir();
    let d = Daemon::start_in_data_dir(&dir);
    d.ok(&["volume", "create", "v", "--size", "4M"]);
    let uri = d.uri("v");
    let mut qio = Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = qio.stdin.take().unwrap();
    let mut stdout = BufReader::new(qio.stdout.take().unwrap());
    stdin.write_all(b"write -P 0xab 0 4096\n").unwrap();
    let mut seen = String::new();
    while !seen.contains("wrote 4096/4096") {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "qemu-io: {seen}");
        seen.push_str(&line);
    }
    let err = d.fails(&["volume", "delete", "v"]);
    assert!(err.contains("volume v is in use"), "{err}");
    assert!(err.contains("disconnect its NBD clients first"), "{err}");
    assert_eq!(names(&d.json(&["volume", "list"])), ["v"]);

    stdin.write_all(b"quit\n").unwrap();
    drop(stdin);
    qio.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = d.cli(&["volume", "delete", "v"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.json(&["volume", "list"]), Value::Array(vec![]));
}

#[test]
fn systemd_unit_matches_the_contract() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/snapblk.service"
    ))
    .unwrap();
    for line in [
        "Type=simple",
        "ExecStart=/usr/local/bin/snapblk daemon --data-dir /var/lib/snapblk",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.lines().any(|l| l.trim() == line), "missing {line}");
    }
}

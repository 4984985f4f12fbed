//! End-to-end tests of the ublk device control plane: `device start/stop/
//! list`, `features` and `devices.json`, against the real binary and daemon.
//!
//! This build host has no ublk driver, so these tests pin down what happens
//! without one: clear errors, a daemon that keeps serving, validation before
//! any kernel call, and devices listed in `devices.json` that fail to come
//! back without stopping the daemon. Real devices are tested in the QEMU
//! guest (`scripts/vm/guest/`). A test whose assertion needs a host without
//! ublk prints SKIP where `/dev/ublk-control` exists.

mod common;

use common::{assert_error, tempdir, Daemon, Raw};
use serde_json::{json, Value};
use std::os::unix::net::UnixStream;
use std::path::Path;

const NO_UBLK: &str =
    "this kernel has no ublk: /dev/ublk-control is missing; load it with `modprobe ublk_drv` (kernel 6.0+)";

/// True (after printing SKIP) when this host has ublk, so the no-ublk
/// assertions of `test` do not apply.
fn skip_with_ublk(test: &str) -> bool {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("SKIP {test}: /dev/ublk-control exists on this host");
        return true;
    }
    false
}

/// A daemon on a fresh data directory with volume `v` (1 GiB) and its
/// snapshot `s`.
fn daemon_with_volume() -> (tempfile::TempDir, Daemon) {
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "1G"]);
    d.ok(&["snapshot", "create", "v", "s"]);
    (t, d)
}

#[test]
fn features_without_ublk_is_a_clear_error() {
    let (_t, d) = daemon_with_volume();
    if skip_with_ublk("features_without_ublk_is_a_clear_error") {
        let f = d.json(&["features"]);
        assert!(f["driver_features"].is_u64(), "{f}");
        assert!(f["names"].is_array(), "{f}");
        return;
    }
    for args in [&["features"][..], &["--json", "features"]] {
        let out = d.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err, format!("snapblk: error: {NO_UBLK}\n"));
    }
    let mut raw = Raw::connect(&d.control());
    assert_error(&raw.send(r#"{"op":"features"}"#), "io_error", NO_UBLK);
    // The daemon goes on.
    assert_eq!(d.names(&["volume", "list"]), ["v"]);
}

#[test]
fn device_start_without_ublk_fails_clearly_and_the_daemon_keeps_serving() {
    let (_t, d) = daemon_with_volume();
    if skip_with_ublk("device_start_without_ublk_fails_clearly_and_the_daemon_keeps_serving") {
        return;
    }
    for args in [
        &["device", "start", "v"][..],
        &["device", "start", "v", "--snapshot", "s", "--queues", "2"],
        &["--json", "device", "start", "v", "--depth", "128"],
    ] {
        let err = d.fails(args);
        assert!(
            err.contains("cannot start a ublk device for v") && err.contains(NO_UBLK),
            "{args:?}: {err}"
        );
    }
    let mut raw = Raw::connect(&d.control());
    let r = raw.send(r#"{"op":"device.start","volume":"v"}"#);
    assert_error(&r, "io_error", "/dev/ublk-control is missing");
    // Nothing was started or persisted, and everything else still works.
    assert_eq!(d.json(&["device", "list"]), json!([]));
    assert!(!d.dir.join("devices.json").exists());
    assert_eq!(d.names(&["volume", "list"]), ["v"]);
    assert_eq!(d.names(&["snapshot", "list", "v"]), ["s"]);
    d.ok(&["snapshot", "delete", "v", "s"]);
    d.ok(&["volume", "delete", "v"]);
    assert_eq!(d.json(&["status"])["devices"], 0);
}

#[test]
fn unknown_volume_or_snapshot_is_not_found() {
    let (_t, d) = daemon_with_volume();
    let err = d.fails(&["device", "start", "nope"]);
    assert!(err.contains("volume nope not found"), "{err}");
    let err = d.fails(&["device", "start", "v", "--snapshot", "nope"]);
    assert!(err.contains("snapshot nope of volume v not found"), "{err}");
    let mut raw = Raw::connect(&d.control());
    assert_error(
        &raw.send(r#"{"op":"device.start","volume":"nope"}"#),
        "not_found",
        "volume nope not found",
    );
    assert_error(
        &raw.send(r#"{"op":"device.start","volume":"v","snapshot":"nope"}"#),
        "not_found",
        "snapshot nope of volume v not found",
    );
    // Stopping what does not run.
    for dev in ["v", "v@s", "/dev/ublkb0"] {
        let err = d.fails(&["device", "stop", dev]);
        assert!(err.contains("device list"), "{dev}: {err}");
        let line = json!({"op": "device.stop", "device": dev}).to_string();
        assert_eq!(raw.send(&line)["error"]["code"], "not_found", "{dev}");
    }
}

#[test]
fn malformed_device_requests_are_refused() {
    let (_t, d) = daemon_with_volume();
    let mut raw = Raw::connect(&d.control());
    for (line, code, needle) in [
        (
            r#"{"op":"device.start"}"#,
            "bad_request",
            "missing field `volume`",
        ),
        (
            r#"{"op":"device.start","volume":7}"#,
            "bad_request",
            "invalid type",
        ),
        (
            r#"{"op":"device.start","volume":"v","depth":70000}"#,
            "bad_request",
            "invalid value",
        ),
        (
            r#"{"op":"device.start","volume":"v","queues":-1}"#,
            "bad_request",
            "invalid value",
        ),
        (
            r#"{"op":"device.start","volume":"v","nonsense":1}"#,
            "bad_request",
            "unknown field",
        ),
        (
            r#"{"op":"device.stop"}"#,
            "bad_request",
            "missing field `device`",
        ),
        (
            r#"{"op":"device.list","x":1}"#,
            "bad_request",
            "unknown field",
        ),
        (r#"{"op":"features","x":1}"#, "bad_request", "unknown field"),
        (
            r#"{"op":"device.start","volume":"v","depth":0}"#,
            "invalid_argument",
            "depth 0 must be between 1 and 4096",
        ),
        (
            r#"{"op":"device.start","volume":"v","depth":4097}"#,
            "invalid_argument",
            "depth 4097 must be between 1 and 4096",
        ),
        (
            r#"{"op":"device.start","volume":"v","queues":0}"#,
            "invalid_argument",
            "queues 0 must be between 1",
        ),
        (
            r#"{"op":"device.start","volume":"v","queues":65}"#,
            "invalid_argument",
            "queues 65 must be between 1 and 64",
        ),
        (
            r#"{"op":"device.start","volume":"a@b"}"#,
            "invalid_argument",
            "invalid volume name",
        ),
        (
            r#"{"op":"device.start","volume":"v","snapshot":""}"#,
            "invalid_argument",
            "invalid snapshot name",
        ),
    ] {
        assert_error(&raw.send(line), code, needle);
    }
    // The CLI: values the daemon refuses, and values clap refuses (exit 2).
    for (args, needle) in [
        (&["device", "start", "v", "--depth", "0"][..], "depth 0"),
        (&["device", "start", "v", "--depth", "5000"], "depth 5000"),
        (&["device", "start", "v", "--queues", "0"], "queues 0"),
        (&["device", "start", "a@b"], "invalid volume name"),
        (&["device", "stop", "a@b@c"], "invalid snapshot name"),
    ] {
        let err = d.fails(args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = d.cli(&["device", "start", "v", "--depth", "70000"]);
    assert_eq!(out.status.code(), Some(2));
    let out = d.cli(&["device", "start"]);
    assert_eq!(out.status.code(), Some(2));
    // All of it left the daemon serving.
    assert_eq!(d.names(&["volume", "list"]), ["v"]);
}

#[test]
fn device_list_is_empty_table_and_array() {
    let (_t, d) = daemon_with_volume();
    assert_eq!(
        d.ok(&["device", "list"]),
        "DEVICE  VOLUME  SNAPSHOT  MODE  QUEUES  DEPTH  RECOVERY  BUFFERS  STATE\n"
    );
    assert_eq!(d.ok(&["device", "ls"]), d.ok(&["device", "list"]));
    assert_eq!(d.json(&["device", "list"]), json!([]));
    let mut raw = Raw::connect(&d.control());
    assert_eq!(
        raw.send(r#"{"op":"device.list"}"#),
        json!({"ok": true, "result": []})
    );
    assert_eq!(d.json(&["status"])["devices"], 0);
}

/// Writes `devices.json` by hand.
fn write_devices(dir: &Path, devices: Value) {
    std::fs::write(
        dir.join("devices.json"),
        serde_json::to_string_pretty(&json!({ "devices": devices })).unwrap(),
    )
    .unwrap();
}

#[test]
fn devices_json_is_restored_at_start_and_failures_never_stop_the_daemon() {
    let (_t, mut d) = daemon_with_volume();
    let st = d.signal(libc::SIGTERM);
    assert!(st.success());
    write_devices(
        &d.dir,
        json!([
            {"volume": "v", "snapshot": null, "queues": 2, "depth": 128, "recovery": false},
            {"volume": "v", "snapshot": "s"},
            {"volume": "ghost"}
        ]),
    );
    d.restart();
    let log = d.log();
    assert!(
        log.contains("device for v could not be restored"),
        "log:\n{log}"
    );
    assert!(
        log.contains("device for v@s could not be restored"),
        "log:\n{log}"
    );
    assert!(
        log.contains("device for ghost could not be restored: volume ghost not found"),
        "log:\n{log}"
    );
    if !Path::new("/dev/ublk-control").exists() {
        assert!(log.contains(NO_UBLK), "log:\n{log}");
    }
    assert!(log.contains("3 device(s) listed in"), "log:\n{log}");

    // The volume is served: control and NBD.
    assert_eq!(d.names(&["volume", "list"]), ["v"]);
    assert!(UnixStream::connect(d.nbd_sock()).is_ok());
    if common::have("qemu-io") {
        common::qemu_io_ok(&d.uri("v"), false, &["write -P 0x5a 0 64k"]);
        common::qemu_io_ok(&d.uri("v"), true, &["read -P 0x5a 0 64k"]);
    }

    // The failed devices stay listed, with their error, and in the file.
    let list = d.json(&["device", "list"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3, "{list:?}");
    let keys: Vec<(Value, Value)> = list
        .iter()
        .map(|e| (e["volume"].clone(), e["snapshot"].clone()))
        .collect();
    assert_eq!(
        keys,
        [
            (json!("ghost"), Value::Null),
            (json!("v"), Value::Null),
            (json!("v"), json!("s"))
        ]
    );
    assert!(list
        .iter()
        .all(|e| e["path"].is_null() && e["id"].is_null()));
    assert_eq!(
        (list[1]["queues"].clone(), list[1]["depth"].clone()),
        (json!(2), json!(128))
    );
    assert_eq!(list[1]["read_only"], false);
    assert_eq!(
        (list[1]["recovery"].clone(), list[2]["recovery"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(
        (list[2]["queues"].clone(), list[2]["depth"].clone()),
        (json!(1), json!(64))
    );
    assert_eq!(list[2]["read_only"], true);
    assert!(list[0]["state"]
        .as_str()
        .unwrap()
        .starts_with("error: volume ghost not found"));
    let table = d.ok(&["device", "list"]);
    assert!(table.starts_with("DEVICE"), "{table}");
    assert!(table.contains("(failed)  v       s         ro"), "{table}");
    assert!(
        table.contains("ghost: not running: volume ghost not found"),
        "{table}"
    );
    assert_eq!(d.json(&["status"])["devices"], 3);

    // A failed device does not make its snapshot or volume busy, and goes
    // away with them; `device stop` drops one by name.
    d.ok(&["snapshot", "delete", "v", "s"]);
    let out = d.ok(&["device", "stop", "ghost"]);
    assert_eq!(
        out,
        "dropped the device entry for ghost (it was not running)\n"
    );
    let file: Value =
        serde_json::from_slice(&std::fs::read(d.dir.join("devices.json")).unwrap()).unwrap();
    assert_eq!(
        file,
        json!({"devices": [
            {"volume": "v", "snapshot": null, "queues": 2, "depth": 128, "recovery": false}
        ]})
    );

    // kill -9 keeps the list; it is tried again at start.
    d.kill9_and_restart();
    assert!(
        d.log()
            .matches("device for v could not be restored")
            .count()
            >= 2
    );
    assert_eq!(d.json(&["device", "list"]).as_array().unwrap().len(), 1);
    d.ok(&["volume", "delete", "v"]);
    assert_eq!(d.json(&["device", "list"]), json!([]));
    let file: Value =
        serde_json::from_slice(&std::fs::read(d.dir.join("devices.json")).unwrap()).unwrap();
    assert_eq!(file, json!({"devices": []}));
}

#[test]
fn unreadable_devices_json_is_moved_aside_and_the_daemon_serves() {
    let (t, dir) = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("devices.json"), "{ not json").unwrap();
    let d = Daemon::start(&dir);
    let log = d.log();
    assert!(log.contains("devices.json cannot be read"), "log:\n{log}");
    assert_eq!(
        std::fs::read_to_string(dir.join("devices.json.bad")).unwrap(),
        "{ not json"
    );
    assert!(!dir.join("devices.json").exists());
    assert_eq!(d.json(&["device", "list"]), json!([]));
    d.ok(&["volume", "create", "v", "--size", "1M"]);
    drop(t);
}

#[test]
fn sigterm_leaves_devices_json_as_it_is() {
    let (_t, mut d) = daemon_with_volume();
    d.signal(libc::SIGTERM);
    write_devices(
        &d.dir,
        json!([{"volume": "v", "snapshot": "s", "queues": 1, "depth": 8}]),
    );
    let before = std::fs::read(d.dir.join("devices.json")).unwrap();
    d.restart();
    let st = d.signal(libc::SIGTERM);
    assert!(st.success(), "a failed restore does not fail the shutdown");
    assert_eq!(std::fs::read(d.dir.join("devices.json")).unwrap(), before);
}

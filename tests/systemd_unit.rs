//! The systemd unit, `systemd/snapblk.service`, checked against the binary:
//! `systemd-analyze verify` (where the host has it), and its `ExecStart` run
//! as written, with only the data directory moved to a temporary one: the
//! daemon serves NBD on its UNIX socket only (the safe default: no TCP, so
//! nothing on a network address), stops cleanly on the unit's `KillSignal`,
//! and the same command line brings back the volumes and the `devices.json`
//! entries after a clean stop and after `kill -9` (which
//! `Restart=on-failure` answers with a restart).
//!
//! A real boot under systemd is not tested: the guest of `scripts/vm` boots
//! an initramfs with no systemd in it.
//!
//! Its verify test, which needs `systemd-analyze`, also serves as the
//! subject of the check that `scripts/test`'s strict mode turns a test
//! that cannot run into a failure.

mod common;

use common::{tempdir, Daemon, BIN};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = "systemd/snapblk.service";
/// Where the unit installs the binary and keeps the data.
const UNIT_BIN: &str = "/usr/local/bin/snapblk";
const UNIT_DATA_DIR: &str = "/var/lib/snapblk";

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(UNIT);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every value of `key` in the unit's `[section]`.
fn values(unit: &str, section: &str, key: &str) -> Vec<String> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line.to_string();
        } else if current == format!("[{section}]") {
            if let Some(v) = line.strip_prefix(&format!("{key}=")) {
                out.push(v.to_string());
            }
        }
    }
    out
}

fn one(unit: &str, section: &str, key: &str) -> String {
    let v = values(unit, section, key);
    assert_eq!(
        v.len(),
        1,
        "{UNIT}: expected one {key}= in [{section}], found {v:?}"
    );
    v[0].clone()
}

/// The strict mode of `scripts/test` itself (tests/common `skip`): this
/// test binary run again for `unit_passes_systemd_analyze_verify` alone,
/// with nothing on PATH, fails under `SNAPBLK_TESTS_STRICT=1` and naming
/// the test and the reason, and passes with a SKIP line under `=0`.
#[test]
fn a_test_that_cannot_run_fails_in_strict_mode_and_skips_otherwise() {
    // Whether the rerun passed, and all it printed.
    let rerun = |strict: &str| {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "unit_passes_systemd_analyze_verify",
                "--nocapture",
            ])
            .env("PATH", "/nonexistent")
            .env("SNAPBLK_TESTS_STRICT", strict)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text.into_owned())
    };
    let (passed, text) = rerun("1");
    assert!(!passed, "strict mode let it pass:\n{text}");
    assert!(
        text.contains(
            "unit_passes_systemd_analyze_verify cannot run: no systemd-analyze on this host"
        ),
        "{text}"
    );
    let (passed, text) = rerun("0");
    assert!(passed, "{text}");
    assert!(
        text.contains("SKIP unit_passes_systemd_analyze_verify: no systemd-analyze"),
        "{text}"
    );
    assert!(text.contains("1 passed"), "{text}");
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !common::installed("systemd-analyze") {
        common::skip(
            "unit_passes_systemd_analyze_verify",
            "no systemd-analyze on this host",
        );
        return;
    }
    // verify insists that ExecStart's binary exists: point it at the one
    // just built, in a copy of the unit with the same name.
    let (_t, dir) = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    let unit = unit_text().replace(UNIT_BIN, BIN);
    let path = dir.join("snapblk.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{err}"
    );
    // Warnings about the unit name its file; other units' noise does not.
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("snapblk.service"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns:\n{}",
        ours.join("\n")
    );
}

#[test]
fn the_units_settings_fit_the_cli() {
    let unit = unit_text();
    let exec = one(&unit, "Service", "ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv, [UNIT_BIN, "daemon", "--data-dir", UNIT_DATA_DIR]);
    // StateDirectory=snapblk is /var/lib/snapblk, the data directory.
    assert_eq!(one(&unit, "Service", "StateDirectory"), "snapblk");
    // SIGTERM is the signal the daemon drains and exits 0 on.
    assert_eq!(one(&unit, "Service", "KillSignal"), "SIGTERM");
    assert_eq!(one(&unit, "Service", "Restart"), "on-failure");
    assert_eq!(one(&unit, "Install", "WantedBy"), "multi-user.target");
}

/// The unit's ExecStart with `data_dir` for /var/lib/snapblk and nothing
/// else changed, its Environment= applied; adopted by a [`Daemon`] that
/// waits until it serves.
fn start_as_the_unit_does(data_dir: &Path) -> Daemon {
    let unit = unit_text();
    let exec = one(&unit, "Service", "ExecStart");
    let mut argv = exec.split_whitespace().map(|a| {
        if a == UNIT_DATA_DIR {
            data_dir.to_string_lossy().into_owned()
        } else {
            a.to_string()
        }
    });
    assert_eq!(argv.next().as_deref(), Some(UNIT_BIN));
    let mut cmd = Command::new(BIN);
    cmd.args(argv);
    for env in values(&unit, "Service", "Environment") {
        let (k, v) = env.split_once('=').expect("Environment=KEY=VALUE");
        cmd.env(k, v);
    }
    let mut d = Daemon::in_data_dir(data_dir);
    d.spawn(cmd);
    d
}

fn device_entries(d: &Daemon) -> Vec<(Value, Value)> {
    d.json(&["device", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["volume"].clone(), e["snapshot"].clone()))
        .collect()
}

#[test]
fn exec_start_serves_and_restores_volumes_and_devices() {
    let (_t, root) = tempdir();
    let dir: PathBuf = root.join("var-lib-snapblk");
    std::fs::create_dir_all(&dir).unwrap();
    let mut d = start_as_the_unit_does(&dir);
    // Safe defaults: NBD on DATA_DIR/nbd.sock, no TCP, no TLS needed there.
    let st = d.json(&["status"]);
    assert_eq!(st["nbd_tcp"], json!([]));
    assert_eq!(st["nbd_unix"], json!([dir.join("nbd.sock")]));
    assert_eq!(st["nbd_tls"], "off");
    d.ok(&["volume", "create", "v", "--size", "16M"]);
    d.ok(&["snapshot", "create", "v", "s"]);
    assert!(d.signal(libc::SIGTERM).success(), "log:\n{}", d.log());

    // A device entry, as `device start` leaves it (on this host there may be
    // no ublk: then it is listed as failed, but listed).
    std::fs::write(
        dir.join("devices.json"),
        json!({"devices": [{"volume": "v", "snapshot": "s", "queues": 1, "depth": 64}]})
            .to_string(),
    )
    .unwrap();
    let mut d = start_as_the_unit_does(&dir);
    assert_eq!(common::names(&d.json(&["volume", "list"])), ["v"]);
    assert_eq!(device_entries(&d), [(json!("v"), json!("s"))]);
    assert!(
        d.log().contains("snapblk") && d.log().contains(" INFO "),
        "Environment=RUST_LOG=info takes effect; log:\n{}",
        d.log()
    );

    // kill -9: Restart=on-failure runs the same command line again.
    let st = d.signal(libc::SIGKILL);
    assert!(!st.success());
    let mut d = start_as_the_unit_does(&dir);
    assert_eq!(common::names(&d.json(&["volume", "list"])), ["v"]);
    assert_eq!(device_entries(&d), [(json!("v"), json!("s"))]);
    let running = d.json(&["device", "list"])[0]["path"]
        .as_str()
        .map(str::to_string);
    if let Some(path) = running {
        // A host with ublk really started it: leave nothing behind.
        d.ok(&["device", "stop", &path]);
    }
    assert!(d.signal(libc::SIGTERM).success(), "log:\n{}", d.log());
}

//! `snapblk copy status --watch` end to end: plain lines when stdout is not
//! a terminal, the indicatif bar on one (a pty from `script`), one JSON
//! object a line with `--json`, and the exit status of the job's end.

mod common;

use common::{qemu_io_ok, skip_without, tempdir, Daemon};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

/// A daemon with a filled 4 MiB volume `v`, unless a tool is missing.
fn daemon_with_data(test: &str, tools: &[&str]) -> Option<(tempfile::TempDir, Daemon)> {
    if skip_without(test, tools) {
        return None;
    }
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "4M"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x5a 0 4M"]);
    Some((t, d))
}

/// A copy of `v` slowed to 1 MiB/s (a few seconds); returns its id.
fn slow_copy(d: &Daemon, t: &tempfile::TempDir, name: &str) -> String {
    let target = t.path().join(name);
    let target = target.to_str().unwrap();
    let id = d.ok(&["copy", "start", "v", "--to", target, "--rate", "1M"]);
    id.trim().to_string()
}

fn watch(d: &Daemon, id: &str) -> Command {
    let mut c = Command::new(common::BIN);
    c.arg("--control")
        .arg(d.control())
        .args(["copy", "status", id, "--watch"]);
    c
}

#[test]
fn watch_without_a_terminal_prints_lines_until_done() {
    let Some((t, d)) = daemon_with_data("watch_lines", &["qemu-io"]) else {
        return;
    };
    let id = slow_copy(&d, &t, "c.img");
    let out = watch(&d, &id).output().unwrap();
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(out.status.success(), "{text}\n{:?}", out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    let running = lines
        .iter()
        .filter(|l| l.starts_with(&format!("job {id}: running ")) && l.contains(" ETA "))
        .count();
    assert!(running >= 2, "at least two progress lines: {text}");
    assert_eq!(
        *lines.last().unwrap(),
        format!("job {id}: done 100.0% (4 MiB of 4 MiB)"),
        "{text}"
    );

    // --json: one object a line, the last one done.
    let id = slow_copy(&d, &t, "c2.img");
    let out = Command::new(common::BIN)
        .arg("--control")
        .arg(d.control())
        .args(["--json", "copy", "status", &id, "--watch"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let objects: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert!(objects.len() >= 2, "{objects:?}");
    assert_eq!(objects.last().unwrap()["state"], "done");
    assert_eq!(objects[0]["id"].to_string(), id);
}

#[test]
fn watch_exits_nonzero_with_the_error_of_a_cancelled_or_failed_job() {
    let Some((t, d)) = daemon_with_data("watch_failures", &["qemu-io"]) else {
        return;
    };
    // Cancelled while watched.
    let id = slow_copy(&d, &t, "c.img");
    let mut w = watch(&d, &id)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(w.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with(&format!("job {id}: running")), "{first}");
    d.ok(&["copy", "cancel", &id]);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = w.wait().unwrap();
    let mut err = String::new();
    w.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success());
    assert!(
        rest.lines().last().unwrap().contains(": cancelled "),
        "{rest}"
    );
    assert!(err.contains(&format!("copy job {id} cancelled")), "{err}");

    // Failed: a stream to a pipe whose reader went away.
    let mut streaming = Command::new(common::BIN)
        .arg("--control")
        .arg(d.control())
        .args(["copy", "start", "v", "--format", "stream", "--to", "-"])
        .args(["--rate", "256K"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pipe = streaming.stdout.take().unwrap();
    let mut header = [0u8; 8];
    pipe.read_exact(&mut header).unwrap();
    assert_eq!(&header, b"SBLKSTRM");
    drop(pipe);
    assert!(!streaming.wait().unwrap().success());
    let list = d.json(&["copy", "list"]);
    let failed = list.as_array().unwrap().last().unwrap();
    assert_eq!(failed["state"], "failed", "{failed}");
    let out = watch(&d, &failed["id"].to_string()).output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("copy job {} failed: ", failed["id"]))
            && err.contains(failed["error"].as_str().unwrap()),
        "{err}"
    );
}

/// On a terminal (a pty from util-linux `script`): the indicatif bar with
/// bytes, throughput and ETA, ending done.
#[test]
fn watch_on_a_terminal_draws_a_bar_with_throughput_and_eta() {
    let Some((t, d)) = daemon_with_data("watch_bar", &["qemu-io", "script"]) else {
        return;
    };
    let id = slow_copy(&d, &t, "c.img");
    let cmd = format!(
        "{} --control {} copy status {id} --watch",
        common::BIN,
        d.control().display()
    );
    let (ok, text) = common::on_terminal(&cmd);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("job {id} [#"))
            && text.contains("/4.00 MiB")
            && text.contains("iB/s ETA ")
            && text.contains("running")
            && text.contains("done"),
        "{text}"
    );
}

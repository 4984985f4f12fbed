//! Scheduled snapshots: `schedule add|list|remove|pause|resume` against the
//! real daemon, with one-second intervals.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

fn schedule(d: &Daemon, id: u64) -> Value {
    d.json(&["schedule", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("schedule {id} is not listed"))
}

/// Polls until `done` holds for schedule `id` (a generous bound that only
/// keeps a broken build from hanging).
fn wait_for(d: &Daemon, id: u64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = schedule(d, id);
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "schedule {id} never got to {what}: {s}\nlog:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kept(s: &Value) -> Vec<String> {
    s["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_schedule_keeps_its_newest_snapshots_and_never_a_manual_one() {
    let (_t, dir) = tempdir();
    let mut d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "1M"]);
    d.ok(&["snapshot", "create", "v", "manual"]);
    // Looks like the schedule's own: still never pruned, and skipped.
    d.ok(&["snapshot", "create", "v", "s-000002"]);
    let added = d.json(&[
        "schedule", "add", "v", "--every", "1s", "--keep", "2", "--prefix", "s-",
    ]);
    let id = added["id"].as_u64().unwrap();
    assert!(added["next_run_unix_ms"].as_u64().is_some());
    let s = wait_for(&d, id, "5 runs", |s| s["runs"].as_u64().unwrap() >= 5);
    assert_eq!(s["last_result"]["ok"], true, "{s}");
    let runs = s["runs"].as_u64().unwrap();

    // Restart in the middle: the schedule goes on from where it was.
    d.signal(libc::SIGTERM);
    d.restart();
    let s = wait_for(&d, id, "2 more runs", |s| {
        s["runs"].as_u64().unwrap() >= runs + 2
    });
    assert!(d.log().contains(&format!("schedule {id}: took snapshot")));

    d.ok(&["schedule", "pause", &id.to_string()]);
    let s_paused = schedule(&d, id);
    assert_eq!(s_paused["paused"], true);
    assert!(s_paused["next_run_unix_ms"].is_null());
    let mine = kept(&s_paused);
    assert_eq!(mine.len(), 2, "keeps 2: {s}");
    let mut all = d.names(&["snapshot", "list", "v"]);
    all.sort();
    let mut want = vec!["manual".to_string(), "s-000002".to_string()];
    want.extend(mine.clone());
    want.sort();
    assert_eq!(all, want, "only its own oldest snapshots were pruned");
    assert!(!mine.contains(&"s-000002".to_string()));
    // The newest: its last two numbers.
    let n = s_paused["runs"].as_u64().unwrap();
    assert_eq!(mine, [format!("s-{:06}", n - 1), format!("s-{n:06}")]);

    let e = d.fails(&["volume", "delete", "v"]);
    assert!(e.contains(&format!("schedule remove {id}")), "{e}");
    d.ok(&["schedule", "remove", &id.to_string()]);
    assert_eq!(d.json(&["schedule", "list"]), serde_json::json!([]));
    assert_eq!(
        d.names(&["snapshot", "list", "v"]).len(),
        4,
        "its snapshots stay"
    );
}

#[test]
fn a_run_missed_while_the_daemon_was_down_is_taken_once_at_start() {
    let (_t, dir) = tempdir();
    let mut d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "1M"]);
    let id = d.json(&["schedule", "add", "v", "--every", "1h", "--keep", "10"])["id"]
        .as_u64()
        .unwrap();
    d.signal(libc::SIGKILL);
    // Five hourly runs fell due while it was down.
    let file = dir.join("schedules.json");
    let mut all: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    all[id.to_string()]["created_unix_ms"] = (now_ms - 5 * 3_600_000 - 60_000).into();
    std::fs::write(&file, serde_json::to_vec(&all).unwrap()).unwrap();
    d.restart();
    let s = wait_for(&d, id, "its missed run", |s| s["runs"] == 1);
    assert_eq!(kept(&s), [format!("auto{id}-000001")]);
    let next = s["next_run_unix_ms"].as_u64().unwrap();
    assert!(next > now_ms + 3_500_000, "the next run is an hour on: {s}");
    // Once, not five times: the runner now sleeps until the next hour.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(schedule(&d, id)["runs"], 1);
    assert_eq!(d.names(&["snapshot", "list", "v"]).len(), 1);
}

#[test]
fn a_group_schedule_takes_group_snapshots_and_keeps_them_as_units() {
    let (_t, dir) = tempdir();
    let d = Daemon::start(&dir);
    for v in ["a", "b"] {
        d.ok(&["volume", "create", v, "--size", "1M"]);
    }
    d.ok(&["group", "create", "g", "a", "b"]);
    let usage = d.cli(&[
        "schedule", "add", "a", "--group", "g", "--every", "1s", "--keep", "1",
    ]);
    assert!(!usage.status.success());
    assert!(String::from_utf8_lossy(&usage.stderr).contains("cannot be used with"));
    let e = d.fails(&["schedule", "add", "a", "--every", "1s", "--keep", "0"]);
    assert!(e.contains("keep 1 to"), "{e}");
    let e = d.fails(&[
        "schedule", "add", "a", "--every", "1s", "--keep", "1", "--at", "25:00",
    ]);
    assert!(e.contains("HH:MM"), "{e}");
    let id = d.json(&[
        "schedule", "add", "--group", "g", "--every", "1s", "--keep", "1",
    ])["id"]
        .as_u64()
        .unwrap();
    let s = wait_for(&d, id, "3 runs", |s| s["runs"].as_u64().unwrap() >= 3);
    let info = d.json(&["group", "info", "g"]);
    let snaps = info["snapshots"].as_array().unwrap();
    assert!(
        !snaps.is_empty() && snaps.len() <= 2,
        "keep 1 (a run may be under way): {info}"
    );
    for snap in snaps {
        for m in snap["members"].as_array().unwrap() {
            assert!(!m["generation"].is_null(), "every member holds it: {info}");
        }
    }
    assert_eq!(s["last_result"]["ok"], true, "{s}");
    assert!(!s["last_result"]["pruned"].as_array().unwrap().is_empty());
    let e = d.fails(&["group", "delete", "g"]);
    assert!(e.contains(&format!("schedule {id}")), "{e}");
    let out = d.ok(&["schedule", "list"]);
    assert!(out.contains("group g") && out.contains("ok: auto"), "{out}");
}

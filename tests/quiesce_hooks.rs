//! Quiesce hooks around snapshots: `snapshot create ... --pre-hook CMD
//! --post-hook CMD --quiesce-timeout DUR --on-timeout fail|crash-consistent`,
//! against the real daemon, and `--quiesce` where nothing is mounted.
//! (Freezing filesystems on ublk devices needs the guest VM:
//! scripts/vm/guest/80-ublk-quiesce.sh.)

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn events(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A daemon with volume `v`, and the file the hooks below append to.
fn with_volume_v() -> (tempfile::TempDir, Daemon, PathBuf) {
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "1M"]);
    (t, d, dir.join("events"))
}

fn post_hook(log: &Path) -> String {
    format!("echo post >> {}", log.display())
}

#[test]
fn hooks_run_around_the_snapshot_in_order() {
    let (_t, d, log) = with_volume_v();
    let pre = format!(
        "echo \"pre $SNAPBLK_SNAPSHOT $SNAPBLK_TARGET\" >> {}",
        log.display()
    );
    let post = post_hook(&log);
    let r = d.json(&[
        "snapshot",
        "create",
        "v",
        "s1",
        "--pre-hook",
        &pre,
        "--post-hook",
        &post,
    ]);
    assert_eq!(r["quiesce"]["quiesced"], true, "{r}");
    assert_eq!(events(&log), ["pre s1 volume v", "post"]);
    assert_eq!(d.names(&["snapshot", "list", "v"]), ["s1"]);

    // A group: the same, once for the whole.
    d.ok(&["volume", "create", "w", "--size", "1M"]);
    d.ok(&["group", "create", "g", "v", "w"]);
    std::fs::remove_file(&log).unwrap();
    d.ok(&[
        "snapshot",
        "create",
        "--group",
        "g",
        "s2",
        "--pre-hook",
        &pre,
        "--post-hook",
        &post,
    ]);
    assert_eq!(events(&log), ["pre s2 group g", "post"]);
}

#[test]
fn a_pre_hook_past_its_timer_is_killed_the_post_hook_still_runs() {
    let (_t, d, log) = with_volume_v();
    // The sleeper would write "late" if it were not killed with its group.
    let pre = format!("sleep 60; echo late >> {}", log.display());
    let post = post_hook(&log);
    let e = d.fails(&[
        "snapshot",
        "create",
        "v",
        "s1",
        "--pre-hook",
        &pre,
        "--post-hook",
        &post,
        "--quiesce-timeout",
        "1s",
    ]);
    assert!(
        e.contains("was not taken") && e.contains("did not finish within 1000 ms"),
        "{e}"
    );
    assert_eq!(events(&log), ["post"], "thawed");
    let (alive, _, _) = run(std::process::Command::new("pgrep").args(["-f", &pre]));
    assert!(!alive, "the pre-hook's shell was killed");
    assert!(d.names(&["snapshot", "list", "v"]).is_empty());
    assert!(
        d.log_shows("did not finish within 1000 ms"),
        "the error is logged"
    );

    // crash-consistent: the snapshot is taken after the post-hook.
    let r = d.json(&[
        "snapshot",
        "create",
        "v",
        "s2",
        "--pre-hook",
        "exit 3",
        "--post-hook",
        &post,
        "--on-timeout",
        "crash-consistent",
    ]);
    assert_eq!(r["quiesce"]["quiesced"], false, "{r}");
    assert!(
        r["quiesce"]["error"].as_str().unwrap().contains("failed"),
        "{r}"
    );
    assert_eq!(events(&log), ["post", "post"]);
    assert_eq!(d.names(&["snapshot", "list", "v"]), ["s2"]);

    // A failing post-hook is reported; the snapshot stays.
    let r = d.json(&[
        "snapshot",
        "create",
        "v",
        "s3",
        "--post-hook",
        "echo oops >&2; exit 1",
    ]);
    assert!(
        r["quiesce"]["post_hook_error"]
            .as_str()
            .unwrap()
            .contains("oops"),
        "{r}"
    );
    assert_eq!(d.names(&["snapshot", "list", "v"]), ["s2", "s3"]);
}

/// `--quiesce` on a volume without a ublk device (this host has none):
/// nothing to freeze, the snapshot is taken between the hooks and says so;
/// `--quiesce-timeout` alone is refused.
#[test]
fn quiesce_with_nothing_mounted_freezes_nothing_and_takes_the_snapshot() {
    let (_t, d, log) = with_volume_v();
    let post = post_hook(&log);
    let r = d.json(&[
        "snapshot",
        "create",
        "v",
        "q1",
        "--quiesce",
        "--post-hook",
        &post,
    ]);
    assert_eq!(r["quiesce"]["quiesced"], true, "{r}");
    assert_eq!(r["quiesce"]["frozen"], serde_json::json!([]), "{r}");
    assert_eq!(events(&log), ["post"]);
    let out = d.ok(&["snapshot", "create", "v", "q2", "--quiesce"]);
    assert!(out.contains("nothing frozen"), "{out}");
    assert_eq!(d.names(&["snapshot", "list", "v"]), ["q1", "q2"]);
    let e = d.fails(&["snapshot", "create", "v", "q3", "--quiesce-timeout", "1s"]);
    assert!(e.contains("add --quiesce"), "{e}");
    // No freeze record is left in the data directory.
    let dir = std::fs::read_dir(d.control().parent().unwrap()).unwrap();
    assert!(!dir
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("freeze-")));
}

//! Consistency groups: `group create|list|info|delete` and
//! `snapshot create|list|delete --group`, against the real daemon with
//! libnbd clients.

mod common;

use common::*;
use serde_json::Value;

/// Two writers, one NBD connection each to its own volume, share one
/// global sequence: write n+1 is issued only after write n was
/// acknowledged, odd numbers on `a`, even on `b`, each number in a block of
/// its own. While they write, a third thread takes group snapshots with the
/// CLI (one every `step` writes), noting the highest number acknowledged
/// before each request and the highest issued after its answer. The
/// writers stop `step` writes after the last answer, and never run more
/// than `window` writes past a request before its answer (so a slow answer
/// cannot use up the blocks). Prints one JSON line per snapshot, then the
/// number of writes.
const WRITERS: &str = r#"
import nbd, os, sys, threading, subprocess, json, struct, traceback
sock, cli, capacity, step, snaps = (sys.argv[1], sys.argv[2:-3], int(sys.argv[-3]),
                                    int(sys.argv[-2]), sys.argv[-1].split(","))
BLOCK = 4096
WINDOW = 3000
cond = threading.Condition()
state = {"acked": 0, "issued": 0, "stop": None, "limit": None}

def my_turn(n):
    limit = state["limit"]
    return state["acked"] == n - 1 and (limit is None or n <= limit)

def writer(export, parity):
    try:
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///%s?socket=%s" % (export, sock))
        n = parity or 2
        while True:
            with cond:
                cond.wait_for(lambda: my_turn(n) or state["stop"] is not None)
                if state["stop"] is not None and n > state["stop"]:
                    break
                assert n <= capacity, "no block left"
                state["issued"] = n
            h.pwrite(struct.pack("<Q", n) + b"\xab" * (BLOCK - 8), (n // 2) * BLOCK)
            with cond:
                state["acked"] = n
                cond.notify_all()
            n += 2
        h.shutdown()
    except BaseException:
        traceback.print_exc()
        os._exit(1)

threads = [threading.Thread(target=writer, args=(e, p)) for e, p in (("a", 1), ("b", 0))]
for t in threads:
    t.start()
after = 0
for i, snap in enumerate(snaps):
    with cond:
        cond.wait_for(lambda: state["acked"] >= after + step)
        before = state["acked"]
        state["limit"] = before + WINDOW
    # @ACTION@ is cp: a shared replication CP of the group instead of a snapshot.
    action = (["replicate", "cp", "--group", "g"] if "@ACTION@" == "cp"
              else ["snapshot", "create", "--group", "g", snap])
    r = subprocess.run(cli + ["--json"] + action, capture_output=True, text=True)
    with cond:
        after = state["issued"]
        state["limit"] = None
        cond.notify_all()
    if r.returncode != 0:
        print("snapshot failed:", r.stderr, file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"snap": snap, "acked_before": before, "issued_after": after,
                      "created": json.loads(r.stdout)}))
    sys.stdout.flush()
with cond:
    cond.wait_for(lambda: state["acked"] >= after + step)
    # The write in flight, if any, is the last.
    state["stop"] = state["issued"]
    cond.notify_all()
for t in threads:
    t.join()
print(json.dumps({"total": state["stop"]}))
print("PASS")
"#;

/// Prints, for export `VOL@SNAP`, the sequence numbers it holds (one JSON list).
const READ_SEQS: &str = r#"
import nbd, sys, struct, json
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
seqs = []
CHUNK = 4 << 20
for base in range(0, size, CHUNK):
    data = h.pread(min(CHUNK, size - base), base)
    for off in range(0, len(data), 4096):
        (n,) = struct.unpack_from("<Q", data, off)
        if n:
            seqs.append(n)
print(json.dumps(seqs))
print("PASS")
"#;

fn seqs(d: &Daemon, export: &str) -> Vec<u64> {
    let out = py_ok(READ_SEQS, &[d.uri(export)]);
    serde_json::from_str(out.lines().next().unwrap()).unwrap()
}

/// Runs [`WRITERS`] against `d`'s volumes `a` and `b` (group `g`), one
/// group action (`snapshot` or `cp`) per name in `snaps`; returns each action's line and the
/// number of writes.
fn write_while(d: &Daemon, snaps: &[&str], action: &str) -> (Vec<Value>, u64) {
    // 16384 blocks a volume, so every number has a block of its own.
    let capacity = 2 * 16384 - 1;
    let mut args: Vec<String> = vec![d.nbd_sock().display().to_string()];
    args.extend(d.cli_prefix());
    args.push(capacity.to_string());
    args.push("500".to_string());
    args.push(snaps.join(","));
    let out = py_ok(&WRITERS.replace("@ACTION@", action), &args);
    let mut runs: Vec<Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total = runs.pop().unwrap()["total"].as_u64().unwrap();
    assert_eq!(runs.len(), snaps.len(), "{out}");
    (runs, total)
}

/// `in_a` and `in_b` (the writes two images of `a` and `b` hold) are one
/// instant between `run`'s request and its answer.
fn assert_one_instant(what: &str, run: &Value, in_a: &[u64], in_b: &[u64], total: u64) {
    let (before, after) = (
        run["acked_before"].as_u64().unwrap(),
        run["issued_after"].as_u64().unwrap(),
    );
    assert!(in_a.iter().all(|n| n % 2 == 1) && in_b.iter().all(|n| n % 2 == 0));
    let mut all: Vec<u64> = in_a.iter().chain(in_b).copied().collect();
    all.sort_unstable();
    // One instant across both volumes: the union is the numbers 1..=k
    // with no gap, as each was issued only after the one before it was
    // acknowledged (on the other volume).
    let k = all.len() as u64;
    if let Some(gap) = (1..=k).find(|n| all.binary_search(n).is_err()) {
        panic!(
            "{what}: not one instant: holds {k} writes up to {}, but not write {gap} \
             (acknowledged before a write it holds was issued)",
            all.last().unwrap()
        );
    }
    assert!(
        before <= k && k <= after,
        "{what}: holds 1..={k}, but {before} were acknowledged before the request and \
         at most {after} issued by its answer"
    );
    assert!(k < total, "{what} lacks the writes issued after it");
    eprintln!("{what}: holds writes 1..={k} (acknowledged before: {before}, issued by the answer: {after})");
}

#[test]
fn group_snapshots_hold_exactly_the_writes_acknowledged_before_the_barrier() {
    if skip_without("group snapshots", &["python3-nbd"]) {
        return;
    }
    let (_t, dir) = tempdir();
    let d = Daemon::start(&dir);
    for v in ["a", "b"] {
        d.ok(&["volume", "create", v, "--size", "64M"]);
    }
    d.ok(&["group", "create", "g", "a", "b"]);
    let snaps = ["s1", "s2", "s3"];
    let (runs, total) = write_while(&d, &snaps, "snapshot");
    for run in &runs {
        let snap = run["snap"].as_str().unwrap();
        let members: Vec<&str> = run["created"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["volume"].as_str().unwrap())
            .collect();
        assert_eq!(members, ["a", "b"]);
        let (in_a, in_b) = (
            seqs(&d, &format!("a@{snap}")),
            seqs(&d, &format!("b@{snap}")),
        );
        assert_one_instant(snap, run, &in_a, &in_b, total);
    }
    // The live volumes hold every write.
    assert_eq!(seqs(&d, "a").len() + seqs(&d, "b").len(), total as usize);
}

#[test]
fn groups_are_listed_persisted_and_deleted_as_units() {
    if skip_without("groups", &["qemu-io"]) {
        return;
    }
    let (_t, dir) = tempdir();
    let mut d = Daemon::start(&dir);
    for v in ["a", "b", "c"] {
        d.ok(&["volume", "create", v, "--size", "1M"]);
    }
    let e = d.fails(&["group", "create", "g", "a", "nope"]);
    assert!(e.contains("volume nope not found"), "{e}");
    let e = d.fails(&["group", "create", "g", "a", "a"]);
    assert!(e.contains("named twice"), "{e}");
    d.ok(&["group", "create", "g", "a", "b"]);
    let e = d.fails(&["group", "create", "h", "b", "c"]);
    assert!(e.contains("already belongs to group g"), "{e}");
    let e = d.fails(&["group", "create", "g", "c"]);
    assert!(e.contains("already exists"), "{e}");

    d.ok(&["snapshot", "create", "--group", "g", "s1"]);
    d.ok(&["snapshot", "create", "a", "manual"]);
    assert_eq!(d.names(&["snapshot", "list", "a"]), ["s1", "manual"]);
    assert_eq!(d.names(&["snapshot", "list", "b"]), ["s1"]);
    let e = d.fails(&["snapshot", "create", "--group", "g", "manual"]);
    assert!(e.contains("already has a snapshot manual"), "{e}");
    assert_eq!(
        d.names(&["snapshot", "list", "b"]),
        ["s1"],
        "all or nothing"
    );

    // Each member's part reads as VOL@SNAP.
    qemu_io_ok(&d.uri("b@s1"), true, &["read -P 0 0 4k"]);

    // A unit: no member's part alone, no member volume, no group with snapshots.
    let e = d.fails(&["snapshot", "delete", "a", "s1"]);
    assert!(e.contains("snapshot delete --group g s1"), "{e}");
    let e = d.fails(&["volume", "delete", "b"]);
    assert!(e.contains("belongs to group g"), "{e}");
    let e = d.fails(&["group", "delete", "g"]);
    assert!(e.contains("snapshot delete --group g s1"), "{e}");

    let list = d.json(&["group", "list"]);
    assert_eq!(list[0]["name"], "g");
    assert_eq!(list[0]["volumes"], serde_json::json!(["a", "b"]));
    assert_eq!(list[0]["snapshots"], serde_json::json!(["s1"]));
    assert!(d.ok(&["snapshot", "list", "--group", "g"]).contains("s1"));

    // Groups and their snapshots survive a kill -9.
    d.kill9_and_restart();
    let info = d.json(&["group", "info", "g"]);
    assert_eq!(info["snapshots"][0]["name"], "s1");
    assert_eq!(info["snapshots"][0]["state"], "ready");
    assert_eq!(info["snapshots"][0]["members"].as_array().unwrap().len(), 2);

    d.ok(&["snapshot", "delete", "--group", "g", "s1"]);
    assert_eq!(d.names(&["snapshot", "list", "a"]), ["manual"]);
    assert!(d.names(&["snapshot", "list", "b"]).is_empty());
    let e = d.fails(&["snapshot", "delete", "--group", "g", "s1"]);
    assert!(e.contains("has no snapshot s1"), "{e}");
    d.ok(&["group", "delete", "g"]);
    assert_eq!(d.json(&["group", "list"]), serde_json::json!([]));
    d.ok(&["volume", "delete", "b"]);
    let e = d.fails(&["group", "info", "g"]);
    assert!(e.contains("group g not found"), "{e}");
}

/// A group snapshot the daemon died in the middle of taking is removed at
/// the next start, from the members that had it.
#[test]
fn a_half_taken_group_snapshot_is_rolled_back_at_start() {
    let (_t, dir) = tempdir();
    let mut d = Daemon::start(&dir);
    for v in ["a", "b"] {
        d.ok(&["volume", "create", v, "--size", "1M"]);
    }
    d.ok(&["group", "create", "g", "a", "b"]);
    // What a daemon killed between two members' commits leaves: `a` has
    // the snapshot, `b` not, and the record says `creating`.
    d.ok(&["snapshot", "create", "a", "s1"]);
    d.signal(libc::SIGKILL);
    let file = dir.join("groups.json");
    let mut groups: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    groups["g"]["snapshots"] =
        serde_json::json!([{"name": "s1", "created_unix_ms": 1, "creating": true}]);
    std::fs::write(&file, serde_json::to_vec(&groups).unwrap()).unwrap();
    d.restart();
    assert!(d.names(&["snapshot", "list", "a"]).is_empty());
    assert_eq!(
        d.json(&["group", "info", "g"])["snapshots"],
        serde_json::json!([])
    );
    assert!(d.log().contains("was being taken when the daemon stopped"));
}

/// `replicate start --group`: the replica's cp-N of both members, taken by
/// `replicate cp --group` while two clients write, hold exactly the writes
/// acknowledged before the shared barrier (as group snapshots do), with one
/// number for both; `replicate status --group` lists both links; a member's
/// link cannot be stopped alone, nor the group deleted; `replicate stop
/// --group` stops both.
#[test]
fn a_replicated_group_has_shared_consistency_points() {
    if skip_without("group replication", &["python3-nbd"]) {
        return;
    }
    let (_t, dir) = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    let key = key_file(&dir, "key", "correct horse battery staple\n");
    let src = Daemon::start_with(&dir.join("src"), &dir.join("src"), &[], &[]);
    let dst = Daemon::start_with(
        &dir.join("dst"),
        &dir.join("dst"),
        &[
            "--replication-listen",
            "127.0.0.1:0",
            "--replication-key-file",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let addr = dst.json(&["replicate", "status"])["listen"]
        .as_str()
        .unwrap()
        .to_string();
    for v in ["a", "b"] {
        src.ok(&["volume", "create", v, "--size", "64M"]);
    }
    src.ok(&["group", "create", "g", "a", "b"]);
    let e = src.fails(&[
        "replicate",
        "start",
        "--group",
        "g",
        "--to",
        &format!("{addr}/x"),
    ]);
    assert!(e.contains("HOST:PORT for a group"), "{e}");
    src.ok(&[
        "replicate",
        "start",
        "--group",
        "g",
        "--to",
        &addr,
        "--key-file",
        key.to_str().unwrap(),
        "--cp-interval",
        "1h",
        "--keep-cps",
        "50",
    ]);
    let status = src.json(&["replicate", "status", "--group", "g"]);
    let linked: Vec<&str> = status["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["volume"].as_str().unwrap())
        .collect();
    assert_eq!(linked, ["a", "b"], "{status}");
    for refused in [&["replicate", "stop", "a"][..], &["group", "delete", "g"]] {
        let e = src.fails(refused);
        assert!(e.contains("replicate stop --group g"), "{refused:?}: {e}");
    }

    let cps = ["c1", "c2", "c3"];
    let (runs, total) = write_while(&src, &cps, "cp");
    let mut numbers = Vec::new();
    for run in &runs {
        let members = run["created"]["members"].as_array().unwrap();
        let got: Vec<(&str, u64)> = members
            .iter()
            .map(|m| (m["volume"].as_str().unwrap(), m["cp"].as_u64().unwrap()))
            .collect();
        let n = got[0].1;
        assert_eq!(got, [("a", n), ("b", n)], "one number for both members");
        numbers.push(n);
        let (in_a, in_b) = (
            seqs(&dst, &format!("a@cp-{n}")),
            seqs(&dst, &format!("b@cp-{n}")),
        );
        assert_one_instant(&format!("cp-{n}"), run, &in_a, &in_b, total);
    }
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    // Every cp-N the replica holds is one instant, and each member has it.
    let held = |v: &str| -> Vec<String> {
        dst.names(&["snapshot", "list", v])
            .into_iter()
            .filter(|s| s.starts_with("cp-"))
            .collect()
    };
    assert_eq!(held("a"), held("b"));
    src.ok(&["replicate", "stop", "--group", "g"]);
    assert!(src.json(&["replicate", "status"])["links"]
        .as_array()
        .unwrap()
        .is_empty());
}

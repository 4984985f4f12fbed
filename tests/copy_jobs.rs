//! Live copy jobs end to end: the real daemon, a libnbd writer writing
//! random data the whole time, and the CLI. Each test fails if its feature
//! breaks: point-in-time images per policy, hold ordering, kill -9 and
//! resume, stream round trip and corruption, ENOSPC on the target.

mod common;

use common::{
    assert_error, assert_same, first_diff, mount_tmpfs, mount_xfs, py_spawn, qemu_io_ok,
    random_bytes, read_stderr, run_ok, skip_without, tempdir, wait_job_ended, Daemon, Raw,
};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// Writes random 4 KiB blocks at random slots until told otherwise.
/// stdin: `pause` (flush, print PAUSED, wait), `go`, `stop` (flush, read
/// every slot back and compare with the last write: PASS/FAIL, and how
/// many writes followed the last `go`). Exits quietly if the daemon dies.
const WRITER: &str = r#"
import nbd, os, random, select, sys
uri, nslots = sys.argv[1], int(sys.argv[2])
h = nbd.NBD(); h.connect_uri(uri)
last = {}
since_go = 0
print("READY", flush=True)
try:
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 0)
        if r:
            cmd = sys.stdin.readline().strip()
            if cmd == "pause":
                h.flush(); print("PAUSED", flush=True)
                cmd = sys.stdin.readline().strip()
                since_go = 0
            if cmd == "stop":
                h.flush()
                for slot, data in last.items():
                    if h.pread(4096, slot * 4096) != data:
                        print("FAIL slot", slot, flush=True); sys.exit(1)
                print("PASS", len(last), "WROTE", since_go, flush=True)
                sys.exit(0)
        slot = random.randrange(nslots)
        data = os.urandom(4096)
        h.pwrite(data, slot * 4096)
        last[slot] = data
        since_go += 1
except nbd.Error as e:
    print("DEAD", e, flush=True)
"#;

struct Writer {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Writer {
    fn start(d: &Daemon, volume: &str, nslots: u64) -> Writer {
        let mut child = py_spawn(WRITER, &[d.uri(volume), nslots.to_string()], true);
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut w = Writer {
            child,
            stdin,
            lines,
        };
        w.expect("READY");
        w
    }

    fn expect(&mut self, prefix: &str) -> String {
        match self.lines.recv_timeout(Duration::from_secs(300)) {
            Ok(l) if l.starts_with(prefix) => l,
            other => {
                let _ = self.child.kill();
                panic!(
                    "writer: expected {prefix}, got {other:?}; stderr: {}",
                    read_stderr(&mut self.child)
                )
            }
        }
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Stops the writer; asserts the live volume holds every write and
    /// returns how many writes followed the last `go`.
    fn stop(&mut self) -> u64 {
        self.send("stop");
        let l = self.expect("PASS");
        let _ = self.child.wait();
        l.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon with volume `v` of `size`, unless a tool is missing.
fn daemon_with_v(test: &str, tools: &[&str], size: &str) -> Option<(tempfile::TempDir, Daemon)> {
    if skip_without(test, tools) {
        return None;
    }
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", size]);
    Some((t, d))
}

/// `copy start v --to TARGET ...`; returns the job id.
fn start_job(
    d: &Daemon,
    target: &Path,
    policy: &str,
    block_size: &str,
    rate: &str,
    verify: bool,
) -> String {
    let mut args = vec!["copy", "start", "v", "--to", target.to_str().unwrap()];
    args.extend([
        "--policy",
        policy,
        "--block-size",
        block_size,
        "--rate",
        rate,
    ]);
    if verify {
        args.push("--verify");
    }
    d.ok(&args).trim().to_string()
}

/// `copy start SOURCE --to TARGET --rate 256K` (slow enough to act on it
/// while it runs); returns what it printed (the job id).
fn start_slow(d: &Daemon, source: &str, target: &Path) -> String {
    d.ok(&[
        "copy",
        "start",
        source,
        "--to",
        target.to_str().unwrap(),
        "--rate",
        "256K",
    ])
}

/// The export's whole content, via qemu-img.
fn image(d: &Daemon, export: &str, path: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(path);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(d.uri(export))
            .arg(path),
    );
    std::fs::read(path).unwrap()
}

fn fill(d: &Daemon, volume: &str, size: u64) {
    // Data in most places, a hole in the middle (skipped as zeros).
    let cmds: Vec<String> = (0..size / (1 << 20))
        .filter(|i| i % 4 != 2)
        .map(|i| format!("write -P {} {}M 1M", 0x10 + i, i))
        .collect();
    qemu_io_ok(&d.uri(volume), false, &cmds);
}

/// A filled 16 MiB volume `v`, a writer writing to it, and a copy job
/// started with no write between it and snapshot `s` (the writer paused
/// around both), so `s` is the image the target must equal. The writer is
/// writing again on return.
struct PausedStart {
    t: tempfile::TempDir,
    d: Daemon,
    w: Writer,
    id: String,
    target: std::path::PathBuf,
}

/// Fills the 16 MiB volume `v`, starts a writer on it and takes snapshot
/// `s` with the writer paused; send it `go` once the job started.
fn paused_writer_and_snapshot(d: &Daemon) -> Writer {
    fill(d, "v", 16 << 20);
    let mut w = Writer::start(d, "v", 4096);
    std::thread::sleep(Duration::from_millis(200));
    w.send("pause");
    w.expect("PAUSED");
    d.ok(&["snapshot", "create", "v", "s"]);
    w
}

fn start_copy_under_writes(test: &str, policy: &str, rate: &str) -> Option<PausedStart> {
    let (t, d) = daemon_with_v(test, &["python3-nbd", "qemu-img", "qemu-io"], "16M")?;
    let mut w = paused_writer_and_snapshot(&d);
    let target = t.path().join("copy.img");
    // --verify reads the data (for its checksums); without it a cow job
    // lets the kernel copy origin ranges (copy_file_range): test both.
    let id = start_job(&d, &target, policy, "256K", rate, policy != "cow");
    w.send("go");
    Some(PausedStart {
        t,
        d,
        w,
        id,
        target,
    })
}

/// Asserts the target holds exactly snapshot `s`.
fn assert_target_is_snapshot(p: &PausedStart, what: &str) {
    let want = image(&p.d, "v@s", &p.t.path().join("snap.img"));
    let got = std::fs::read(&p.target).unwrap();
    assert_same(what, &got, &want);
}

/// The image at `copy start` is exactly the target, while a writer writes
/// throughout the job, under `policy`; the live volume keeps every write.
fn copy_under_writes(policy: &str) {
    let test = format!("copy_under_writes_{policy}");
    let Some(mut p) = start_copy_under_writes(&test, policy, "8M") else {
        return;
    };
    let end = wait_job_ended(&p.d, &p.id);
    assert_eq!(end["state"], "done", "{end}");
    let wrote = p.w.stop();
    assert!(wrote > 0, "the writer wrote nothing during the job");
    assert_target_is_snapshot(&p, &format!("{policy} copy vs snapshot at start"));
    // The job's own snapshot is gone; users never saw it.
    assert_eq!(p.d.json(&["volume", "info", "v"])["snapshots"], 1);
}

#[test]
fn cow_copy_under_writes_is_the_image_at_start() {
    copy_under_writes("cow");
}

#[test]
fn hold_copy_under_writes_is_the_image_at_start() {
    copy_under_writes("hold");
}

#[test]
fn direct_copy_under_writes_is_the_image_at_start() {
    copy_under_writes("direct");
}

/// hold and direct: a write to a segment the job has not reached yet
/// completes only once that segment's old data is in the target (the job
/// is slowed by --rate so it cannot have got there on its own).
#[test]
fn hold_and_direct_copy_a_segment_before_its_write_completes() {
    let Some((t, d)) = daemon_with_v("hold_ordering", &["qemu-io"], "4M") else {
        return;
    };
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x11 0 4M"]);
    for policy in ["hold", "direct"] {
        let target = t.path().join(format!("{policy}.img"));
        let id = start_job(&d, &target, policy, "64K", "128K", false);
        let id = id.trim();
        let last = (4 << 20) - (64 << 10);
        qemu_io_ok(&d.uri("v"), false, &[format!("write -P 0x22 {last} 64K")]);
        // The write completed: its segment's old data is already copied.
        let got = std::fs::read(&target).unwrap();
        let seg = &got[last as usize..];
        assert!(
            seg.iter().all(|&b| b == 0x11),
            "{policy}: the target lacks the old data of the written segment"
        );
        let v = d.json(&["copy", "status", id]);
        assert!(
            v["bytes_done"].as_u64().unwrap() < 4 << 20,
            "{policy}: the job finished first; the test proves nothing: {v}"
        );
        let v = d.json(&["copy", "cancel", id]);
        assert_eq!(v["state"], "cancelled");
        qemu_io_ok(&d.uri("v"), true, &[format!("read -P 0x22 {last} 64K")]);
        qemu_io_ok(&d.uri("v"), false, &["write -P 0x11 0 4M"]);
    }
    // Ended jobs cannot be paused, resumed or cancelled again.
    let e = d.fails(&["copy", "pause", "1"]);
    assert!(e.contains("already ended"), "{e}");
    let e = d.fails(&["copy", "status", "99"]);
    assert!(e.contains("not found"), "{e}");
}

/// kill -9 in the middle of a job; after the restart the job resumes (its
/// hook in place before NBD serves) and, with a new writer writing, still
/// produces exactly the image at start.
fn kill9_mid_job(policy: &str) {
    let test = format!("kill9_mid_job_{policy}");
    let Some(mut p) = start_copy_under_writes(&test, policy, "4M") else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let v = p.d.json(&["copy", "status", &p.id]);
        if v["bytes_done"].as_u64().unwrap() >= 4 << 20 {
            assert_eq!(v["state"], "running", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    p.d.kill9_and_restart();
    let v = p.d.json(&["copy", "status", &p.id]);
    assert!(
        matches!(v["state"].as_str(), Some("running" | "done")),
        "{v}"
    );
    p.w = Writer::start(&p.d, "v", 4096);
    let end = wait_job_ended(&p.d, &p.id);
    assert_eq!(end["state"], "done", "{end}");
    p.w.stop();
    assert_target_is_snapshot(&p, &format!("{policy} copy across kill -9"));
}

#[test]
fn cow_job_survives_kill9() {
    kill9_mid_job("cow");
}

#[test]
fn hold_job_survives_kill9() {
    kill9_mid_job("hold");
}

/// A stream to a file and to the CLI's stdout both restore to the image;
/// one flipped byte and a cut stream fail restore, naming the offset.
#[test]
fn stream_round_trip_and_corruption() {
    let Some((t, d)) = daemon_with_v("stream_round_trip", &["qemu-img", "qemu-io"], "8M") else {
        return;
    };
    let data = random_bytes(7, 3 << 20);
    let src = t.path().join("src.img");
    std::fs::write(&src, &data).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(d.uri("v")),
    );
    let want = image(&d, "v", &t.path().join("live.img"));

    let stream = t.path().join("v.stream");
    let id = d.ok(&[
        "copy",
        "start",
        "v",
        "--to",
        stream.to_str().unwrap(),
        "--format",
        "stream",
        "--block-size",
        "512K",
        "--verify",
    ]);
    assert_eq!(wait_job_ended(&d, id.trim())["state"], "done");
    let restored = t.path().join("restored.img");
    let out = d.ok(&[
        "restore",
        stream.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert!(out.contains("restored 8 MiB"), "{out}");
    assert_same("restored stream", &std::fs::read(&restored).unwrap(), &want);

    // To the CLI's standard output (passed to the daemon), into restore's stdin.
    let piped = t.path().join("piped.stream");
    let status = Command::new(common::BIN)
        .arg("--control")
        .arg(d.control())
        .args(["copy", "start", "v", "--format", "stream", "--to", "-"])
        .stdout(std::fs::File::create(&piped).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let restored2 = t.path().join("restored2.img");
    let out = Command::new(common::BIN)
        .args(["restore", "-", "--to", restored2.to_str().unwrap()])
        .stdin(std::fs::File::open(&piped).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_same("stdout stream", &std::fs::read(&restored2).unwrap(), &want);

    let bytes = std::fs::read(&stream).unwrap();
    let mut flipped = bytes.clone();
    let at = bytes.len() / 2;
    flipped[at] ^= 0x01;
    let bad = t.path().join("flipped.stream");
    std::fs::write(&bad, &flipped).unwrap();
    let e = d.fails(&[
        "restore",
        bad.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert!(
        e.contains("corrupt at byte") && e.contains("volume offset"),
        "{e}"
    );

    let cut = t.path().join("cut.stream");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = d.fails(&[
        "restore",
        cut.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert!(
        e.contains(&format!("truncated: it ends at byte {}", bytes.len() - 100)),
        "{e}"
    );
    assert!(first_diff(&bytes, &flipped).is_some());
}

/// Copies to another volume, and of a snapshot (VOL@SNAP); bad requests
/// get clear errors and the daemon goes on; the job's snapshot is hidden.
#[test]
fn volume_targets_snapshot_sources_and_bad_requests() {
    let Some((t, d)) = daemon_with_v("volume_targets", &["qemu-img", "qemu-io"], "4M") else {
        return;
    };
    d.ok(&["volume", "create", "w", "--size", "8M"]);
    d.ok(&["volume", "create", "small", "--size", "1M"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x33 0 4M"]);
    qemu_io_ok(&d.uri("w"), false, &["write -P 0x44 0 8M"]);
    d.ok(&["snapshot", "create", "v", "s"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x55 0 1M"]);
    let id = d.ok(&[
        "copy",
        "start",
        "v@s",
        "--to",
        "vol:w",
        "--block-size",
        "100K",
    ]);
    let end = wait_job_ended(&d, id.trim());
    assert_eq!(end["state"], "done", "{end}");
    assert_eq!(end["block_size"], 128 << 10, "rounded to the chunk size");
    qemu_io_ok(
        &d.uri("w"),
        true,
        &["read -P 0x33 0 4M", "read -P 0x44 4M 4M"],
    );

    let e = d.fails(&["copy", "start", "v", "--to", "vol:small"]);
    assert!(e.contains("create a volume at least as large"), "{e}");
    let e = d.fails(&["copy", "start", "v", "--to", "vol:v"]);
    assert!(e.contains("onto itself"), "{e}");
    let e = d.fails(&["copy", "start", "nope", "--to", "/tmp/x"]);
    assert!(e.contains("volume nope not found"), "{e}");
    let existing = t.path().join("exists.img");
    std::fs::write(&existing, b"keep me").unwrap();
    let e = d.fails(&["copy", "start", "v", "--to", existing.to_str().unwrap()]);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    let nowhere = t.path().join("no-such-dir/x.img");
    let e = d.fails(&["copy", "start", "v", "--to", nowhere.to_str().unwrap()]);
    assert!(
        e.contains("does not exist; create it first") && !e.contains("volume list"),
        "{e}"
    );
    let e = d.fails(&["copy", "start", "v", "--to", "-"]);
    assert!(e.contains("--format stream"), "{e}");

    // A slow cow job: its snapshot is neither listed nor deletable.
    let id = start_slow(&d, "v", &t.path().join("slow.img"));
    let id = id.trim();
    let snaps = d.names(&["snapshot", "list", "v"]);
    assert_eq!(snaps, ["s"]);
    // Counts show the user's snapshots only, not the job's `.copy-N`.
    assert_eq!(d.json(&["volume", "info", "v"])["snapshots"], 1);
    let listed = d.json(&["volume", "list"]);
    let v_row = listed.as_array().unwrap().iter().find(|r| r["name"] == "v");
    assert_eq!(v_row.unwrap()["snapshots"], 1, "{listed}");
    let e = d.fails(&["snapshot", "delete", "v", &format!(".copy-{id}")]);
    assert!(e.contains("not found"), "{e}");
    let v = d.json(&["copy", "pause", id]);
    assert_eq!(v["state"], "paused");
    let e = d.fails(&["volume", "delete", "v"]);
    assert!(e.contains(&format!("in use by copy job {id}")), "{e}");
    let listed = d.json(&["copy", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    d.json(&["copy", "resume", id]);
    assert_eq!(d.json(&["copy", "cancel", id])["state"], "cancelled");
    assert_eq!(d.json(&["volume", "info", "v"])["snapshots"], 1);
    let out = d.ok(&["copy", "list"]);
    assert!(out.contains("cancelled") && out.contains("done"), "{out}");
    let ended = d.json(&["copy", "status", id]);
    assert!(ended["bytes_done"].as_u64().unwrap() > 0, "{ended}");

    // A job reading v@s keeps s: deleting it is refused while the job
    // runs (paused too) and works once the job ended.
    let id = start_slow(&d, "v@s", &t.path().join("from-s.img"));
    let id = id.trim();
    d.json(&["copy", "pause", id]);
    let e = d.fails(&["snapshot", "delete", "v", "s"]);
    assert!(
        e.contains(&format!("being read by copy job {id}"))
            && e.contains(&format!("snapblk copy cancel {id}")),
        "{e}"
    );
    d.json(&["copy", "resume", id]);
    assert_eq!(d.names(&["snapshot", "list", "v"]), ["s"]);
    assert_eq!(d.json(&["copy", "cancel", id])["state"], "cancelled");
    d.ok(&["snapshot", "delete", "v", "s"]);
}

/// A target file system that fills up fails the job with a clear error;
/// the volume and its writer are unaffected.
#[test]
fn full_target_fails_the_job_not_the_volume() {
    if skip_without("full_target", &["python3-nbd", "qemu-io"]) {
        return;
    }
    let (t, dir) = tempdir();
    let mnt = t.path().join("mnt");
    let Some(_mount) = mount_tmpfs("full_target", &mnt, "4M") else {
        return;
    };
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "16M"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x66 0 16M"]);
    for policy in ["cow", "direct"] {
        let mut w = Writer::start(&d, "v", 4096);
        let target = mnt.join(format!("{policy}.img"));
        let id = d.ok(&[
            "copy",
            "start",
            "v",
            "--to",
            target.to_str().unwrap(),
            "--policy",
            policy,
        ]);
        let end = wait_job_ended(&d, id.trim());
        assert_eq!(end["state"], "failed", "{end}");
        let msg = end["error"].as_str().unwrap();
        assert!(
            msg.contains("is full") && msg.contains(target.to_str().unwrap()),
            "{msg}"
        );
        assert!(msg.contains("free space"), "{msg}");
        w.stop();
        std::fs::remove_file(&target).unwrap();
    }
    assert_eq!(d.json(&["volume", "info", "v"])["snapshots"], 0);
    let out = d.ok(&["copy", "status", "1"]);
    assert!(out.contains("failed") && out.contains("is full"), "{out}");
}

/// A stream job killed with -9 resumes: the stream is cut back to its last
/// committed frame, continues, and restores to the image at start.
#[test]
fn stream_job_survives_kill9() {
    let Some((t, mut d)) = daemon_with_v("stream_kill9", &["qemu-img", "qemu-io"], "8M") else {
        return;
    };
    fill(&d, "v", 8 << 20);
    d.ok(&["snapshot", "create", "v", "s"]);
    let stream = t.path().join("v.stream");
    let target = stream.to_str().unwrap();
    let args = ["copy", "start", "v", "--to", target, "--format", "stream"];
    let id = d.ok(&[&args[..], &["--rate", "2M", "--block-size", "256K"]].concat());
    let id = id.trim();
    let deadline = Instant::now() + Duration::from_secs(300);
    while d.json(&["copy", "status", id])["bytes_done"]
        .as_u64()
        .unwrap()
        < 2 << 20
    {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9_and_restart();
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x77 0 8M"]);
    assert_eq!(wait_job_ended(&d, id)["state"], "done");
    let restored = t.path().join("restored.img");
    let nowhere = t.path().join("no-such-dir/restored.img");
    let e = d.fails(&["restore", target, "--to", nowhere.to_str().unwrap()]);
    assert!(e.contains("does not exist; create it first"), "{e}");
    d.ok(&["restore", target, "--to", restored.to_str().unwrap()]);
    let want = image(&d, "v@s", &t.path().join("snap.img"));
    assert_same(
        "stream across kill -9",
        &std::fs::read(&restored).unwrap(),
        &want,
    );
}

/// Sends `a` and `b` on two control connections at once (`b` a little
/// later when `delay_us` > 0); returns both replies.
fn race(d: &Daemon, a: &str, b: &str, delay_us: u64) -> (Value, Value) {
    let (mut ca, mut cb) = (Raw::connect(&d.control()), Raw::connect(&d.control()));
    let go = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let ta = s.spawn(|| {
            go.wait();
            ca.send(a)
        });
        let tb = s.spawn(|| {
            go.wait();
            std::thread::sleep(Duration::from_micros(delay_us));
            cb.send(b)
        });
        (ta.join().unwrap(), tb.join().unwrap())
    })
}

/// `copy start VOL@SNAP` racing `snapshot delete VOL SNAP` (and `copy start
/// VOL` racing `volume delete VOL`): exactly one wins, every time. Either
/// the job starts and the delete is refused as busy, or the delete wins and
/// the start fails with "not found"; every job that started copies exactly
/// its source, which still exists until the job ends.
#[test]
fn copy_start_and_delete_race_one_wins() {
    let Some((t, d)) = daemon_with_v("start_delete_race", &["qemu-img", "qemu-io"], "1M") else {
        return;
    };
    // Slow jobs (~2 s each): a delete can only succeed before the start.
    let copy = |source: &str, snapshot: Option<&str>, target: &Path| {
        serde_json::json!({
            "op": "copy.start", "volume": source, "snapshot": snapshot,
            "target": target, "rate": 512 << 10, "block_size": 64 << 10,
        })
        .to_string()
    };
    let mut started = Vec::new();
    for i in 0..24u64 {
        qemu_io_ok(&d.uri("v"), false, &[format!("write -P {} 0 1M", i + 1)]);
        let snap = format!("s{i}");
        d.ok(&["snapshot", "create", "v", &snap]);
        let target = t.path().join(format!("{snap}.img"));
        let delete = format!(r#"{{"op":"snapshot.delete","volume":"v","name":"{snap}"}}"#);
        let (st, del) = race(&d, &copy("v", Some(&snap), &target), &delete, (i % 4) * 300);
        match (st["ok"].as_bool(), del["ok"].as_bool()) {
            (Some(true), Some(false)) => {
                assert_error(&del, "busy", "being read by copy job");
                started.push((st["result"]["id"].to_string(), format!("v@{snap}"), target));
            }
            (Some(false), Some(true)) => {
                assert_error(&st, "not_found", &format!("snapshot {snap} of volume v"));
            }
            _ => panic!("start and delete of v@{snap} both won or both lost: {st} {del}"),
        }

        let vol = format!("w{i}");
        d.ok(&["volume", "create", &vol, "--size", "1M"]);
        qemu_io_ok(&d.uri(&vol), false, &[format!("write -P {} 0 1M", i + 1)]);
        let target = t.path().join(format!("{vol}.img"));
        let delete = format!(r#"{{"op":"volume.delete","name":"{vol}"}}"#);
        let (st, del) = race(&d, &copy(&vol, None, &target), &delete, (i % 4) * 300);
        match (st["ok"].as_bool(), del["ok"].as_bool()) {
            (Some(true), Some(false)) => {
                // (or by qemu-io's NBD connection, still closing)
                assert_error(&del, "busy", &format!("volume {vol} is in use by"));
                started.push((st["result"]["id"].to_string(), vol, target));
            }
            (Some(false), Some(true)) => {
                assert_error(&st, "not_found", &format!("volume {vol} not found"));
            }
            _ => panic!("start and delete of {vol} both won or both lost: {st} {del}"),
        }
    }
    eprintln!("{} of 48 starts won their race", started.len());
    for (id, source, target) in &started {
        let end = wait_job_ended(&d, id);
        assert_eq!(end["state"], "done", "{end}");
        let want = image(&d, source, &t.path().join("want.img"));
        assert_same(source, &std::fs::read(target).unwrap(), &want);
    }
    // Every source is still there and can go now; the daemon still serves.
    for (_, source, _) in &started {
        match source.split_once('@') {
            Some((v, s)) => d.ok(&["snapshot", "delete", v, s]),
            None => d.ok(&["volume", "delete", source]),
        };
    }
    assert_eq!(d.names(&["snapshot", "list", "v"]), Vec::<String>::new());
}

/// A write's hook that cannot copy its segment first (the target is full)
/// fails the job durably before the write goes through: the job shows
/// failed with that error after kill -9 and after a clean restart, and does
/// not resume (it would copy what the write put there).
#[test]
fn hook_failure_survives_restarts() {
    if skip_without("hook_failure_restart", &["qemu-io"]) {
        return;
    }
    let (t, dir) = tempdir();
    let mnt = t.path().join("mnt");
    let Some(_mount) = mount_tmpfs("hook_failure_restart", &mnt, "4M") else {
        return;
    };
    let mut d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "16M"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x66 0 16M"]);
    let target = mnt.join("direct.img");
    let id = start_job(&d, &target, "direct", "64K", "256K", false);
    let id = id.as_str();
    d.json(&["copy", "pause", id]);
    // Paused (once a batch in flight is in): only writes copy (first).
    let done = || d.json(&["copy", "status", id])["bytes_done"].clone();
    let mut last = done();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = done();
        if now == last {
            break;
        }
        last = now;
    }
    // Fill the target's file system.
    let ballast = std::fs::write(mnt.join("ballast"), vec![1u8; 5 << 20]);
    assert!(ballast.is_err(), "the ballast should fill the tmpfs");
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x77 15M 64K"]);
    let check = |d: &Daemon, when: &str| {
        let v = d.json(&["copy", "status", id]);
        assert_eq!(v["state"], "failed", "{when}: {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(
            msg.contains("is full") && msg.contains("before a write"),
            "{when}: {msg}"
        );
    };
    check(&d, "at once");
    d.kill9_and_restart();
    check(&d, "after kill -9");
    d.signal(libc::SIGTERM);
    d.restart();
    check(&d, "after SIGTERM");
    qemu_io_ok(
        &d.uri("v"),
        true,
        &["read -P 0x77 15M 64K", "read -P 0x66 0 15M"],
    );
}

/// A loop device for a test; detached on drop.
struct LoopDev(String);

impl LoopDev {
    /// Attaches a loop device to a new file of `size` bytes; None, with a
    /// SKIP line for `test`, where that is not allowed (needs root).
    fn attach(test: &str, img: &Path, size: u64) -> Option<LoopDev> {
        std::fs::File::create(img).unwrap().set_len(size).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(img)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                Some(LoopDev(String::from_utf8(o.stdout).unwrap().trim().into()))
            }
            other => {
                common::skip(
                    test,
                    &format!("cannot attach a loop device here: {other:?}"),
                );
                None
            }
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A block device as the target: a `cow` copy of a volume being written
/// is the image at start (the device is larger: the rest stays as it was);
/// a device smaller than the volume is refused, saying so.
#[test]
fn block_device_target() {
    let Some((t, d)) = daemon_with_v(
        "block_device_target",
        &["python3-nbd", "qemu-img", "qemu-io"],
        "16M",
    ) else {
        return;
    };
    let Some(dev) = LoopDev::attach("block_device_target", &t.path().join("dev.img"), 17 << 20)
    else {
        return;
    };
    let Some(small) = LoopDev::attach("block_device_target", &t.path().join("small.img"), 8 << 20)
    else {
        return;
    };
    let e = d.fails(&["copy", "start", "v", "--to", &small.0]);
    assert!(
        e.contains(&format!(
            "target {} holds {} bytes but the copy needs {}",
            small.0,
            8 << 20,
            16 << 20
        )) && e.contains("larger device"),
        "{e}"
    );
    let mut w = paused_writer_and_snapshot(&d);
    let id = start_job(&d, Path::new(&dev.0), "cow", "256K", "8M", false);
    w.send("go");
    let end = wait_job_ended(&d, &id);
    assert_eq!(end["state"], "done", "{end}");
    assert!(w.stop() > 0, "the writer wrote nothing during the job");
    let want = image(&d, "v@s", &t.path().join("snap.img"));
    let got = std::fs::read(&dev.0).unwrap();
    assert_eq!(got.len(), 17 << 20);
    assert_same("block device vs snapshot at start", &got[..16 << 20], &want);
    assert!(
        got[16 << 20..].iter().all(|&b| b == 0),
        "past the volume's end"
    );
}

/// `--rate R`: a job of N bytes takes at least about N/R (a lower bound
/// only: the machine may be slower), and the throughput `copy status`
/// shows stays near R once past the first batch (R bytes at once).
#[test]
fn rate_limits_the_job() {
    let Some((t, d)) = daemon_with_v("rate_limit", &["qemu-io"], "8M") else {
        return;
    };
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x5a 0 8M"]);
    let (n, rate) = (8u64 << 20, 2u64 << 20);
    let t0 = Instant::now();
    let id = start_job(&d, &t.path().join("rate.img"), "cow", "256K", "2M", false);
    let mut samples = Vec::new();
    let end = loop {
        let v = d.json(&["copy", "status", &id]);
        if v["state"] != "running" {
            break v;
        }
        samples.push((t0.elapsed(), v["throughput_bps"].as_u64().unwrap()));
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = t0.elapsed();
    assert_eq!(end["state"], "done", "{end}");
    let least = Duration::from_secs_f64(0.8 * n as f64 / rate as f64);
    assert!(took >= least, "{n} bytes at {rate} B/s took {took:?}");
    // After t seconds at most R * (t + 1) bytes moved.
    for (at, bps) in &samples {
        if *at >= Duration::from_secs(2) {
            assert!(*bps <= rate * 8 / 5, "{bps} B/s at {at:?}: {samples:?}");
        }
    }
    eprintln!("rate {rate} B/s: {n} bytes took {took:?}; status samples {samples:?}");
}

/// `--verify` re-reads the target: a target changed behind the job's back
/// after its first segment was copied fails the job, naming the offset.
#[test]
fn verify_catches_a_changed_target() {
    let Some((t, d)) = daemon_with_v("verify_changed", &["qemu-io"], "4M") else {
        return;
    };
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x3c 0 4M"]);
    let target = t.path().join("verify.img");
    let id = start_job(&d, &target, "cow", "256K", "1M", true);
    let deadline = Instant::now() + Duration::from_secs(300);
    while d.json(&["copy", "status", &id])["bytes_done"]
        .as_u64()
        .unwrap()
        < 512 << 10
    {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    f.write_all_at(&[0xee; 4096], 256 << 10).unwrap();
    f.sync_all().unwrap();
    let end = wait_job_ended(&d, &id);
    assert_eq!(end["state"], "failed", "{end}");
    let msg = end["error"].as_str().unwrap();
    assert!(
        msg.contains("verify") && msg.contains(&format!("at offset {}", 256 << 10)),
        "{msg}"
    );
}

/// How a job moved its data is reported, and each path produces the same
/// image: a volume target, and a file target on ext4, go through the job
/// thread's registered arena (READ_FIXED / WRITE_FIXED: every data byte is
/// read and written there); a file beside the origin on XFS is cloned with
/// `copy_file_range` (its extents are shared with the origin's); with
/// registration switched off (`SNAPBLK_COPY_TUNING`, the benchmark's
/// switch) plain buffers carry it.
#[test]
fn data_paths_are_reported_and_give_the_same_image() {
    if skip_without("data_paths", &["qemu-img", "qemu-io", "filefrag"]) {
        return;
    }
    let data = 6u64 << 20; // `fill` leaves 2 of 8 MiB unwritten
    let check = |d: &Daemon, t: &Path, target: &str, want: [(&str, u64); 2]| {
        let id = d.ok(&["copy", "start", "v", "--to", target]);
        let end = wait_job_ended(d, id.trim());
        assert_eq!(end["state"], "done", "{end}");
        assert_eq!(end["bytes_copied"], data, "{end}");
        for (field, n) in want {
            assert_eq!(end[field], n, "{field} after a copy to {target}: {end}");
        }
        let want = image(d, "v", &t.join("want.img"));
        let got = match target.strip_prefix("vol:") {
            Some(name) => image(d, name, &t.join("got.img")),
            None => std::fs::read(target).unwrap(),
        };
        assert_same(target, &got, &want);
    };
    let start = |dir: &Path, env: &[(&str, &str)]| {
        let d = Daemon::start_with(dir, dir, &[], env);
        d.ok(&["volume", "create", "v", "--size", "8M"]);
        fill(&d, "v", 8 << 20);
        d
    };
    let arena = [
        ("registered_buffer_io_bytes", 2 * data),
        ("bytes_kernel_copied", 0),
    ];

    let (t, dir) = tempdir();
    let d = start(&dir, &[]);
    d.ok(&["volume", "create", "w", "--size", "8M"]);
    check(&d, t.path(), "vol:w", arena);
    let beside = t.path().join("beside.img");
    check(&d, t.path(), beside.to_str().unwrap(), arena);
    drop(d);

    let (t, dir) = tempdir();
    let switch = ("SNAPBLK_COPY_TUNING", "no-registered-buffers");
    let d = start(&dir, &[switch]);
    let plain = t.path().join("plain.img");
    let none = [
        ("registered_buffer_io_bytes", 0),
        ("bytes_kernel_copied", 0),
    ];
    check(&d, t.path(), plain.to_str().unwrap(), none);
    drop(d);

    let (t, _) = tempdir();
    let mnt = t.path().join("xfs");
    let Some(_mount) = mount_xfs("data_paths", &t.path().join("xfs.img"), &mnt) else {
        return;
    };
    let d = start(&mnt.join("data"), &[]);
    let clone = mnt.join("clone.img");
    let kernel = [
        ("registered_buffer_io_bytes", 0),
        ("bytes_kernel_copied", data),
    ];
    check(&d, t.path(), clone.to_str().unwrap(), kernel);
    drop(d);
    let extents = run_ok(Command::new("filefrag").arg("-v").arg(&clone));
    assert!(
        extents.contains("shared"),
        "not a clone of the origin:\n{extents}"
    );
}

/// A job no write waits for yields the CPU and the disk to foreground I/O:
/// its thread runs at nice 10 in the idle I/O class; a `hold` job, which
/// writes wait for, keeps the daemon's priorities.
#[test]
fn background_jobs_run_at_low_cpu_and_io_priority() {
    let Some((t, d)) = daemon_with_v("job_priority", &["qemu-io", "ionice"], "4M") else {
        return;
    };
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x61 0 4M"]);
    let thread = |id: &str| {
        let tasks = format!("/proc/{}/task", d.pid());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for task in std::fs::read_dir(&tasks).unwrap().flatten() {
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                if comm.trim() == format!("copy-{id}") {
                    return task.file_name().into_string().unwrap();
                }
            }
            assert!(Instant::now() < deadline, "no thread copy-{id}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let priorities = |tid: &str| {
        let stat = std::fs::read_to_string(format!("/proc/{}/task/{tid}/stat", d.pid())).unwrap();
        // Field 19 is the nice value; the command name before it is in parentheses.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let nice = after.split(' ').nth(16).unwrap().to_string();
        let class = run_ok(Command::new("ionice").args(["-p", tid]));
        (nice, class.trim().to_string())
    };
    let id = start_slow(&d, "v", &t.path().join("cow.img"));
    let tid = thread(id.trim());
    // The thread has its name from birth and sets its priorities as its
    // first step: wait for that step, not for a moment. Both at once: the
    // nice value is read before the I/O class, so one look can see the
    // class set and the nice value from before.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (nice, class) = loop {
        let now = priorities(&tid);
        if (now.0.as_str(), now.1.as_str()) == ("10", "idle") || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        (nice.as_str(), class.as_str()),
        ("10", "idle"),
        "cow job {tid}"
    );
    d.ok(&["copy", "cancel", id.trim()]);

    let held = t.path().join("hold.img");
    let args = [
        "copy",
        "start",
        "v",
        "--to",
        held.to_str().unwrap(),
        "--policy",
        "hold",
    ];
    let id = d.ok(&[&args[..], &["--rate", "256K"]].concat());
    let tid = thread(id.trim());
    let (nice, class) = priorities(&tid);
    assert_ne!(class, "idle", "a hold job that writes wait for, {tid}");
    assert_eq!(nice, "0");
    d.ok(&["copy", "cancel", id.trim()]);
}

/// A job's end is saved before its progress map goes: when the state cannot
/// be saved (here the record's temporary file is blocked by a directory),
/// the map stays, so the next start finds the job as it was, with its map,
/// exactly as after a crash before the save.
#[test]
fn an_ended_job_keeps_its_map_until_its_state_is_saved() {
    let Some((t, mut d)) = daemon_with_v("job_end_order", &["qemu-io"], "4M") else {
        return;
    };
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x61 0 4M"]);
    let id = start_slow(&d, "v", &t.path().join("slow.img"));
    let id = id.trim();
    let jobs = d.dir.join("jobs");
    let map = jobs.join(format!("{id}.map"));
    assert!(map.exists(), "a running job has its map {map:?}");
    let blocker = jobs.join(format!("{id}.tmp"));
    std::fs::create_dir(&blocker).unwrap();
    d.ok(&["copy", "cancel", id]);
    let ended = format!("copy job {id} ended");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.log().contains(&ended) {
        assert!(
            Instant::now() < deadline,
            "the job did not end:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        d.log_shows("cannot save its state"),
        "the failed save is logged:\n{}",
        d.log()
    );
    assert!(
        map.exists(),
        "the map went although the cancelled state could not be saved"
    );
    std::fs::remove_dir(&blocker).unwrap();
    // The next start (after a crash) finds the job as it was saved last
    // (running), with its map. Its internal snapshot went before the failed
    // save, so it cannot resume: it ends failed, saying why, and only then
    // is its map removed.
    d.kill9_and_restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = d.json(&["copy", "status", id]);
        if status["state"] != "running" || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status["state"], "failed", "{status}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot resume"), "{status}");
    assert!(!map.exists(), "a job whose end was saved keeps its map");
}

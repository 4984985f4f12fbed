//! Replication between two real daemons on loopback: consistency points
//! equal the source's image, references save the wire, the key is checked,
//! crashes and broken links resume without a full copy, promotion.

mod common;

use common::*;
use serde_json::Value;
use snapblk::replication::wire::{self, Kind};
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The chunk size of the tests' volumes.
const BLOCK: u64 = 64 * 1024;
/// The default replication block, and how many fit in a chunk.
const SMALL: u64 = 4096;
const PER_CHUNK: u64 = BLOCK / SMALL;

struct Pair {
    _t: tempfile::TempDir,
    src: Daemon,
    dst: Daemon,
    key: PathBuf,
    addr: String,
}

/// A source and a destination daemon sharing a key; `dst_env` goes to the
/// destination (test hooks), `src_env` to the source.
fn pair(src_env: &[(&str, &str)], dst_env: &[(&str, &str)]) -> Pair {
    let t = tempfile::tempdir().unwrap();
    let key = key_file(t.path(), "key", "correct horse battery staple\n");
    let src = Daemon::start_with(&t.path().join("src"), &t.path().join("src"), &[], src_env);
    let (dst, _) = replication_destination(&t.path().join("dst"), &key, dst_env);
    let addr = dst.json(&["replicate", "status"])["listen"]
        .as_str()
        .unwrap()
        .to_string();
    Pair {
        _t: t,
        src,
        dst,
        key,
        addr,
    }
}

/// The arguments of `replicate start VOL --to TO --key-file KEY EXTRA...`.
fn start_args<'a>(vol: &'a str, to: &'a str, key: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "replicate",
        "start",
        vol,
        "--to",
        to,
        "--key-file",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

impl Pair {
    fn start(&self, vol: &str, dest: &str, extra: &[&str]) {
        self.start_via(&self.addr, vol, dest, extra);
    }

    /// Like [`Pair::start`], through `addr` (a proxy) instead.
    fn start_via(&self, addr: &str, vol: &str, dest: &str, extra: &[&str]) {
        let to = format!("{addr}/{dest}");
        self.src.ok(&start_args(vol, &to, &self.key, extra));
    }

    fn status(&self, vol: &str) -> Value {
        self.src.json(&["replicate", "status", vol])["links"][0].clone()
    }

    /// `replicate cp`: the number of the CP the destination applied.
    fn cp(&self, vol: &str) -> u64 {
        self.src.json(&["replicate", "cp", vol])["cp"]
            .as_u64()
            .unwrap()
    }

    fn wait_state(&self, vol: &str, want: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.status(vol);
            if s["state"] == want {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "link never became {want}: {s}\nsource log:\n{}",
                self.src.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Each replica snapshot `r@cp-N` in `cps` equals the source's `v@repl-cp-N`
/// (kept by `SNAPBLK_TEST_KEEP_SOURCE_CPS`).
fn assert_cps_equal_the_source(p: &Pair, cps: &[String]) {
    for cp in cps {
        let n = &cp[3..];
        assert!(
            same_image(
                &p.src.uri(&format!("v@repl-cp-{n}")),
                &p.dst.uri(&format!("r@{cp}"))
            ),
            "CP {n} differs from the source's image at that point"
        );
    }
}

/// Random writes through NBD: whole chunks, 4K pieces, 1.5K pieces (partial
/// at any block size) and zeroes.
const WRITER: &str = r#"
import nbd, random, sys, time
uri, seed, n, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
for i in range(n):
    op = r.random()
    if op < 0.5:
        off = r.randrange(size // block) * block
        h.pwrite(r.randbytes(block), off)
    elif op < 0.8:
        off = r.randrange(size // 4096) * 4096
        h.pwrite(r.randbytes(4096), off)
    elif op < 0.9:
        off = r.randrange(size // 512 - 3) * 512
        h.pwrite(r.randbytes(1536), off)
    else:
        off = r.randrange(size // block) * block
        h.zero(block, off)
    if i % 16 == 0:
        time.sleep(0.005)
h.flush()
print("PASS")
"#;

#[test]
fn every_consistency_point_equals_the_source_image_at_that_point() {
    if skip_without("cp_equals_source", &["qemu-img", "python3-nbd"]) {
        return;
    }
    let p = pair(&[("SNAPBLK_TEST_KEEP_SOURCE_CPS", "1")], &[]);
    p.src.ok(&["volume", "create", "v", "--size", "4M"]);
    qemu_io_ok(
        &p.src.uri("v"),
        false,
        &["write -P 7 0 1M", "write -P 9 3M 64k"],
    );
    p.start("v", "r", &["--cp-interval", "200ms", "--keep-cps", "1000"]);
    // Writes run while CPs are taken every 200 ms.
    let writer = py_spawn(
        WRITER,
        &[p.src.uri("v"), "1".into(), "3000".into(), BLOCK.to_string()],
        false,
    );
    let out = writer.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("PASS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = p.cp("v");
    let cps: Vec<String> = p
        .dst
        .names(&["snapshot", "list", "r"])
        .into_iter()
        .filter(|n| n.starts_with("cp-"))
        .collect();
    assert!(cps.len() >= 3, "only {cps:?} were taken");
    assert!(cps.contains(&format!("cp-{last}")));
    assert_cps_equal_the_source(&p, &cps);
    // The replica's own export is its latest CP, read-only.
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
    let (ok, text) = qemu_io(&p.dst.uri("r"), false, &["write 0 4k"]);
    assert!(
        !ok || text.contains("failed"),
        "a replica must be read-only: {text}"
    );
    let s = p.status("v");
    assert_eq!(s["state"], "replicating", "{s}");
    assert_eq!(s["full_syncs"], 1, "{s}");
    assert!(
        s["bytes_saved"].as_u64().unwrap() > 0,
        "references were used: {s}"
    );
    // Internal snapshots never show on the source (only the test-visible ones).
    assert!(p
        .src
        .names(&["snapshot", "list", "v"])
        .iter()
        .all(|n| !n.starts_with('.')));
}

/// Writes random aligned blocks of `bs` bytes as fast as it can until the
/// file `stop` exists, then says STOPPED; says EXHAUSTED if it reached
/// `limit` writes first.
const NONSTOP_WRITER: &str = r#"
import nbd, os, random, sys
uri, stop, limit, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = random.Random(5)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
data = [r.randbytes(bs) for _ in range(8)]
n = 0
while n % 16 or not os.path.exists(stop):
    if n >= limit:
        print("EXHAUSTED", n)
        sys.exit(0)
    h.pwrite(data[n % 8], r.randrange(size // bs) * bs)
    n += 1
h.flush()
print("STOPPED", n)
"#;

/// Runs [`NONSTOP_WRITER`] (`bs`-byte writes, at most `limit`) on `v` until
/// four CPs and one requested with `replicate cp` were applied at `r`,
/// failing if the writer ends first (CPs waiting for the writer); then
/// stops it. Returns the source's link status.
fn cps_keep_coming_while(p: &Pair, bs: u64, limit: u64) -> Value {
    let stop = p._t.path().join("stop-writer");
    let mut writer = py_spawn(
        NONSTOP_WRITER,
        &[
            p.src.uri("v"),
            stop.to_str().unwrap().into(),
            limit.to_string(),
            bs.to_string(),
        ],
        false,
    );
    let applied = || {
        p.dst.json(&["replicate", "status", "r"])["links"][0]["last_cp"]
            .as_u64()
            .unwrap()
    };
    let first = applied();
    let mut requested_cp = None;
    loop {
        assert!(
            writer.try_wait().unwrap().is_none(),
            "the writer ended ({} writes done or failed) before 4 CPs and a requested one \
             were applied: CPs wait for the writer\n{}",
            limit,
            read_stderr(&mut writer)
        );
        let n = applied() - first;
        if n >= 1 && requested_cp.is_none() {
            // `replicate cp` returns while the writer still writes.
            requested_cp = Some(p.cp("v"));
            assert!(writer.try_wait().unwrap().is_none());
        }
        if n >= 4 && requested_cp.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(&stop, b"").unwrap();
    let out = writer.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("STOPPED"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.status("v")
}

#[test]
fn consistency_points_keep_coming_under_a_writer_that_never_pauses() {
    if skip_without("cp_on_time", &["qemu-img", "python3-nbd"]) {
        return;
    }
    // A slow link (each transfer acknowledged after 50 ms or more, so at
    // most 20 MiB/s) that the writer outpaces: the log never empties while
    // it writes, and a sender that shipped whatever keeps arriving before
    // taking a due CP would take none until the writer stops.
    let p = pair(&[], &[("SNAPBLK_TEST_STAGE_DELAY_MS", "50")]);
    p.src.ok(&["volume", "create", "v", "--size", "4M"]);
    p.start("v", "r", &["--cp-interval", "200ms", "--max-log", "2M"]);
    p.wait_state("v", "replicating");
    // 64 GiB: far more than a few CPs need (each moves at most 6 MiB: the
    // 2 MiB log and the 4 MiB volume).
    let s = cps_keep_coming_while(&p, BLOCK, 1 << 20);
    assert!(
        s["log_overflows"].as_u64().unwrap() > 0,
        "the writer never outpaced the link, so this proves nothing: {s}"
    );
    assert!(s["max_cp_delay_ms"].is_u64(), "{s}");
    p.cp("v");
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
}

/// A CP whose blocks were all logged whole reads nothing from its
/// snapshot: no write after it may copy a chunk for that snapshot, not even
/// the writes that waited at the CP's barrier (bench-repl's 4k random writes
/// at QD128 made some 300 chunk copies per CP before the chunks were
/// released ahead of the barrier), and no write that prepared again under a
/// new epoch may leave its blocks marked as changed in an unknown way.
#[test]
fn writes_after_a_cp_of_whole_logged_blocks_preserve_no_chunk() {
    if skip_without("cp_no_preserve", &["qemu-img", "fio"]) {
        return;
    }
    let p = pair(&[], &[]);
    p.src.ok(&["volume", "create", "v", "--size", "16M"]);
    p.start("v", "r", &["--cp-interval", "100ms", "--block-size", "4K"]);
    p.wait_state("v", "replicating");
    let preserved = || {
        p.src.json(&["volume", "info", "v"])["preserved_chunks"]
            .as_u64()
            .unwrap()
    };
    let (before, cps) = (preserved(), p.status("v")["cps"].as_u64().unwrap());
    // Many writes in flight, so that some wait at every CP's barrier.
    run_ok(Command::new("fio").current_dir(p._t.path()).args([
        "--name=cp",
        "--ioengine=nbd",
        &format!("--uri={}", p.src.uri("v")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--numjobs=4",
        // Slow enough for the link to log every write on a loaded machine.
        "--rate_iops=2500",
        "--time_based",
        "--runtime=3",
    ]));
    let s = p.status("v");
    assert!(
        s["cps"].as_u64().unwrap() >= cps + 3,
        "too few CPs to prove anything: {s}"
    );
    assert_eq!(s["log_overflows"], 0, "every write must be logged: {s}");
    assert_eq!(
        preserved() - before,
        0,
        "chunks were copied for CP snapshots: {s}\n{}",
        p.src.log()
    );
    p.cp("v");
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
}

/// Writes smaller than the replication block are not logged: the link
/// has nothing to ship, and its sender waits for the writes' wakeups
/// rather than for transfers. While the destination applies a CP, that
/// wait must still notice its acknowledgement, however often writes come.
#[test]
fn consistency_points_keep_coming_under_a_writer_of_partial_blocks() {
    if skip_without("cp_partial_writer", &["qemu-img", "python3-nbd"]) {
        return;
    }
    let p = pair(&[], &[]);
    p.src.ok(&["volume", "create", "v", "--size", "4M"]);
    p.start("v", "r", &["--cp-interval", "200ms", "--block-size", "64K"]);
    p.wait_state("v", "replicating");
    // 4k writes, each a partial 64K block; at most about 2 GiB.
    let s = cps_keep_coming_while(&p, SMALL, 1 << 19);
    assert_eq!(s["log_overflows"], 0, "partial writes are not logged: {s}");
    p.cp("v");
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
}

#[test]
fn with_4k_blocks_on_64k_chunks_only_the_written_4k_blocks_are_shipped() {
    if skip_without("small_blocks", &["qemu-img", "qemu-io"]) {
        return;
    }
    let p = pair(&[], &[]);
    p.src.ok(&["volume", "create", "v", "--size", "8M"]);
    qemu_io_ok(&p.src.uri("v"), false, &["write -P 1 0 8M"]);
    p.start("v", "r", &["--cp-interval", "1h", "--block-size", "4K"]);
    p.cp("v");
    let before = p.status("v");
    assert_eq!(
        (before["block_size"].as_u64(), before["chunk_size"].as_u64()),
        (Some(SMALL), Some(BLOCK)),
        "{before}"
    );
    // 4K writes into 16 different chunks, and one 1K write: a partial 4K
    // block, read whole from the CP snapshot.
    let mut cmds: Vec<String> = (0..16u64)
        .map(|b| format!("write -P {} {} 4k", b + 2, b * 5 * BLOCK + 8192))
        .collect();
    cmds.push(format!("write -P 99 {} 1k", 100 * BLOCK + 512));
    qemu_io_ok(&p.src.uri("v"), false, &cmds);
    p.cp("v");
    let after = p.status("v");
    let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(d("bytes_written"), 16 * SMALL + 1024);
    assert_eq!(after["last_cp_ref_blocks"], 16, "{after}");
    assert_eq!(after["last_cp_full_blocks"], 1, "{after}");
    // 17 4K blocks and their headers, not 17 64K chunks.
    let sent = d("bytes_sent");
    assert!(
        (17 * SMALL..18 * SMALL).contains(&sent),
        "{sent} bytes sent for 17 written 4K blocks: {after}"
    );
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
}

fn write_blocks(uri: &str, blocks: impl IntoIterator<Item = u64>, pattern: u64) {
    let cmds: Vec<String> = blocks
        .into_iter()
        .map(|b| format!("write -P {} {} 64k", (b + pattern) % 251, b * BLOCK))
        .collect();
    for chunk in cmds.chunks(64) {
        qemu_io_ok(uri, false, chunk);
    }
}

#[test]
fn whole_block_overwrites_ship_each_block_once_and_partial_writes_send_blocks_at_cps() {
    if skip_without("wire_accounting", &["qemu-io"]) {
        return;
    }
    let p = pair(&[], &[]);
    p.src.ok(&["volume", "create", "v", "--size", "8M"]);
    // Blocks as large as the chunk: 4K writes are partial blocks.
    p.start("v", "r", &["--cp-interval", "1h", "--block-size", "64K"]);
    p.cp("v");
    let before = p.status("v");
    // Each of the 128 blocks overwritten wholly, twice, with a CP after each round.
    for round in 0..2 {
        write_blocks(&p.src.uri("v"), 0..128, round);
        p.cp("v");
    }
    let after = p.status("v");
    let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    let written = d("bytes_written");
    assert_eq!(written, 2 * 128 * BLOCK);
    let ratio = d("bytes_sent") as f64 / written as f64;
    assert!(
        ratio <= 1.03,
        "wire bytes per byte written {ratio:.4}: {after}"
    );
    assert_eq!(
        d("bytes_saved"),
        written,
        "every block went by reference at its CP"
    );
    assert_eq!(after["last_cp_full_blocks"], 0, "{after}");
    assert_eq!(after["last_cp_ref_blocks"], 128, "{after}");
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));

    // Partial writes: 4K pieces in 16 blocks go whole, once, at the CP.
    let before = p.status("v");
    let cmds: Vec<String> = (0..16u64)
        .flat_map(|b| {
            [
                format!("write -P 3 {} 4k", b * 5 * BLOCK + 8192),
                format!("write -P 4 {} 4k", b * 5 * BLOCK + 32768),
            ]
        })
        .collect();
    qemu_io_ok(&p.src.uri("v"), false, &cmds);
    p.cp("v");
    let after = p.status("v");
    assert_eq!(after["last_cp_full_blocks"], 16, "{after}");
    assert_eq!(after["last_cp_ref_blocks"], 0, "{after}");
    let sent = after["bytes_sent"].as_u64().unwrap() - before["bytes_sent"].as_u64().unwrap();
    assert!(
        (16 * BLOCK..16 * BLOCK + 16 * 1024).contains(&sent),
        "partial writes should cost their whole blocks once: {sent} bytes"
    );
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
}

#[test]
fn a_wrong_key_is_refused_and_writes_nothing() {
    let p = pair(&[], &[]);
    p.src.ok(&["volume", "create", "v", "--size", "1M"]);
    let wrong = key_file(p._t.path(), "wrong", "not the right key at all\n");
    let to = format!("{}/r", p.addr);
    p.src.ok(&[
        "replicate",
        "start",
        "v",
        "--to",
        &to,
        "--key-file",
        wrong.to_str().unwrap(),
    ]);
    let s = p.wait_state("v", "disconnected");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.dst.log().contains("refused the connection") {
        assert!(Instant::now() < deadline, "{}", p.dst.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = if s["error"].is_null() {
        p.status("v")
    } else {
        s
    };
    assert!(
        s["error"]
            .as_str()
            .unwrap_or_default()
            .contains("authentication failed"),
        "{s}"
    );
    let e = p.src.fails(&["replicate", "cp", "v"]);
    assert!(e.contains("not reachable"), "{e}");
    assert!(
        p.dst.names(&["volume", "list"]).is_empty(),
        "nothing is written"
    );
    for log in [p.src.log(), p.dst.log()] {
        assert!(!log.contains("not the right key") && !log.contains("correct horse"));
    }
    // The source retries every second: the destination says it once.
    p.src.ok(&["replicate", "stop", "v"]);
    for _ in 0..3 {
        let mut s = TcpStream::connect(&p.addr).unwrap();
        assert!(wire::authenticate_to_destination(&mut s, b"still wrong", wire::VERSION).is_err());
        drop(s);
    }
    let refusals = p.dst.log().matches("refused the connection").count();
    assert_eq!(refusals, 1, "{}", p.dst.log());
    assert!(!p
        .src
        .ok(&["replicate", "status"])
        .contains("not the right key"));
}

/// A source spoken by hand: authenticated with a key, sealed frames.
struct RawSource {
    s: TcpStream,
    sealed: wire::Session,
    /// The first transfer id this session may use (from `Opened`).
    next_tid: u64,
}

impl RawSource {
    /// Authenticates with `key` and opens replica `dest` like a source would.
    fn open(addr: &str, key: &[u8], dest: &str) -> RawSource {
        let mut s = TcpStream::connect(addr).unwrap();
        let (sealed, _) = wire::authenticate_to_destination(&mut s, key, wire::VERSION).unwrap();
        let mut raw = RawSource {
            s,
            sealed,
            next_tid: 0,
        };
        let open = wire::Open {
            source_id: "raw-test".into(),
            source_volume: "v".into(),
            dest_volume: dest.into(),
            size: 1 << 20,
            chunk_size: BLOCK as u32,
            block_size: BLOCK as u32,
            keep_cps: 1,
            resync: None,
        };
        raw.send(Kind::Open, &wire::to_json(&open));
        let opened: wire::Opened = wire::from_json(&raw.expect(Kind::Opened)).unwrap();
        assert_eq!(opened.last_applied_cp, None);
        raw.next_tid = opened.next_tid;
        raw
    }

    /// The bytes of the next sealed frame, to send (or not) by hand.
    fn seal(&mut self, kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        self.sealed.send(&mut frame, kind, payload).unwrap();
        frame
    }

    fn send(&mut self, kind: Kind, payload: &[u8]) {
        self.sealed.send(&mut self.s, kind, payload).unwrap();
    }

    fn recv(&mut self) -> std::io::Result<(Kind, Vec<u8>)> {
        self.sealed.recv(&mut self.s)
    }

    fn expect(&mut self, kind: Kind) -> Vec<u8> {
        self.sealed.expect(&mut self.s, kind).unwrap()
    }
}

#[test]
fn malformed_and_truncated_transfers_are_rejected_before_staging() {
    let p = pair(&[], &[]);
    let key = std::fs::read(&p.key).unwrap();
    let key = key.trim_ascii();
    let data = vec![5u8; BLOCK as usize];
    let good = wire::encode_transfer(0, &[(0, &data)]);

    // A flipped bit: the frame fails authentication, the connection is
    // dropped.
    let mut s = RawSource::open(&p.addr, key, "r");
    let mut frame = s.seal(Kind::Transfer, &good);
    frame[100] ^= 1;
    s.s.write_all(&frame).unwrap();
    let (kind, msg) = s.recv().unwrap();
    assert_eq!(kind, Kind::Error);
    assert!(
        String::from_utf8_lossy(&msg).contains("fails authentication"),
        "{msg:?}"
    );
    drop(s);

    // A piece beyond the volume, properly sealed.
    let mut s = RawSource::open(&p.addr, key, "r");
    let beyond = wire::encode_transfer(0, &[(1 << 20, &data)]);
    s.send(Kind::Transfer, &beyond);
    let (kind, msg) = s.recv().unwrap();
    assert_eq!(kind, Kind::Error);
    assert!(String::from_utf8_lossy(&msg).contains("beyond"), "{msg:?}");
    drop(s);

    // A CP that refers to a transfer the replica never got.
    let mut s = RawSource::open(&p.addr, key, "r");
    let cp = wire::CpCommit {
        cp: 0,
        keep_from_tid: 0,
        block_size: BLOCK as u32,
        entries: vec![wire::CpEntry::Ref {
            block: 0,
            count: 1,
            tid: 7,
            index: 0,
        }],
    };
    s.send(Kind::CpCommit, &wire::encode_cp(&cp));
    let (kind, _) = s.recv().unwrap();
    assert_eq!(kind, Kind::Error);
    drop(s);

    // Truncated: the header announces more than arrives.
    let mut s = RawSource::open(&p.addr, key, "r");
    let frame = s.seal(Kind::Transfer, &good);
    s.s.write_all(&frame[..frame.len() / 2]).unwrap();
    drop(s);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = &p.dst.json(&["replicate", "status", "r"])["links"][0];
        if st["state"] == "waiting" {
            assert_eq!(st["staged_transfers"], 0, "{st}");
            assert!(st["last_cp"].is_null(), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(p.dst.log_shows("fails authentication"), "{}", p.dst.log());
    assert!(p.dst.log_shows("truncated"), "{}", p.dst.log());
    // No CP was ever applied: the replica has no readable image.
    assert!(p.dst.names(&["snapshot", "list", "r"]).is_empty());
    // A reference to more blocks than its piece holds.
    let mut s = RawSource::open(&p.addr, key, "r");
    s.send(Kind::Transfer, &good);
    s.expect(Kind::TransferAck);
    let cp = wire::CpCommit {
        cp: 0,
        keep_from_tid: 0,
        block_size: SMALL as u32,
        entries: vec![wire::CpEntry::Ref {
            block: 0,
            count: PER_CHUNK + 1,
            tid: 0,
            index: 0,
        }],
    };
    s.send(Kind::CpCommit, &wire::encode_cp(&cp));
    let (kind, msg) = s.recv().unwrap();
    assert_eq!(kind, Kind::Error);
    assert!(
        String::from_utf8_lossy(&msg).contains("does not cover"),
        "{msg:?}"
    );
    drop(s);
    assert!(p.dst.names(&["snapshot", "list", "r"]).is_empty());

    // Transfer 0 is staged: a session may not use its id again.
    let mut s = RawSource::open(&p.addr, key, "r");
    assert_eq!(s.next_tid, 1);
    s.send(Kind::Transfer, &good);
    let (kind, msg) = s.recv().unwrap();
    assert_eq!(kind, Kind::Error);
    assert!(
        String::from_utf8_lossy(&msg).contains("not after the last one staged"),
        "{msg:?}"
    );
    drop(s);

    // A proper transfer and CP still work on the same replica.
    let mut s = RawSource::open(&p.addr, key, "r");
    let good = wire::encode_transfer(s.next_tid, &[(0, &data)]);
    s.send(Kind::Transfer, &good);
    assert_eq!(wire::parse_u64(&s.expect(Kind::TransferAck)).unwrap(), 1);
    // 4K blocks: the first four from part of the 64K piece, zeros after.
    let cp = wire::CpCommit {
        cp: 0,
        keep_from_tid: 2,
        block_size: SMALL as u32,
        entries: vec![
            wire::CpEntry::Ref {
                block: 0,
                count: 4,
                tid: 1,
                index: 0,
            },
            wire::CpEntry::Zero {
                block: 4,
                count: (1 << 20) / SMALL - 4,
            },
        ],
    };
    s.send(Kind::CpCommit, &wire::encode_cp(&cp));
    assert_eq!(wire::parse_u64(&s.expect(Kind::CpAck)).unwrap(), 0);
    qemu_io_ok(
        &p.dst.uri("r"),
        true,
        &["read -P 5 0 16k", "read -P 0 16k 1008k"],
    );
}

/// A CP may follow any number of transfers: staging holds them in a few
/// segment files, not a file (and a descriptor) each. The destination here
/// may open 64 files; 500 transfers wait for one CP, which then applies,
/// and after a restart of the destination they are gone from its disk
/// (before, their segment waits as a spare for the next ones).
#[test]
fn a_cp_after_more_transfers_than_the_destination_may_open_files() {
    if skip_without("many_transfers", &["qemu-io", "prlimit"]) {
        return;
    }
    let mut p = pair(&[], &[]);
    let limited = Command::new("prlimit")
        .args(["--pid", &p.dst.pid().to_string(), "--nofile=64:64"])
        .status()
        .unwrap();
    assert!(limited.success());
    let key = std::fs::read(&p.key).unwrap();
    let key = key.trim_ascii();
    let mut s = RawSource::open(&p.addr, key, "r");
    let first = s.next_tid;
    const TRANSFERS: u64 = 500;
    for i in 0..TRANSFERS {
        // Transfer i holds the 4K block i % 256 filled with its number.
        let data = vec![(i % 251) as u8 + 1; SMALL as usize];
        let t = wire::encode_transfer(first + i, &[((i % 256) * SMALL, &data)]);
        s.send(Kind::Transfer, &t);
        assert_eq!(
            wire::parse_u64(&s.expect(Kind::TransferAck)).unwrap(),
            first + i
        );
    }
    // Each block refers to the last transfer that wrote it.
    let entries = (0..256u64)
        .map(|b| {
            let last = if b + 256 < TRANSFERS { b + 256 } else { b };
            wire::CpEntry::Ref {
                block: b,
                count: 1,
                tid: first + last,
                index: 0,
            }
        })
        .collect();
    let cp = wire::CpCommit {
        cp: 0,
        keep_from_tid: first + TRANSFERS,
        block_size: SMALL as u32,
        entries,
    };
    s.send(Kind::CpCommit, &wire::encode_cp(&cp));
    assert_eq!(wire::parse_u64(&s.expect(Kind::CpAck)).unwrap(), 0);
    drop(s);
    let mut reads = Vec::new();
    for b in 0..256u64 {
        let last = if b + 256 < TRANSFERS { b + 256 } else { b };
        reads.push(format!("read -P {} {} 4k", (last % 251) + 1, b * SMALL));
    }
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    qemu_io_ok(&p.dst.uri("r"), true, &reads);
    let staging = p._t.path().join("dst/replication/dest/r.staging");
    let left = || -> Vec<String> {
        std::fs::read_dir(&staging)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    // The applied segment waits as a spare for the next transfers.
    let staged = left();
    assert!(
        staged.len() == 1 && staged[0].starts_with("spare-"),
        "applied transfers stay staged: {staged:?}"
    );
    p.dst.kill9_and_restart();
    qemu_io_ok(&p.dst.uri("r"), true, &reads);
    assert!(left().is_empty(), "a start drops spares: {:?}", left());
}

/// Waits until the destination's log says it paused in CP `n`'s apply.
fn wait_apply_paused(p: &Pair, n: u64) {
    let want = format!("pausing in the middle of applying CP {n}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !p.dst.log().contains(&want) {
        assert!(Instant::now() < deadline, "{}", p.dst.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pair replicating a 4M volume `v` to `r` (`dst_env` for the
/// destination), one CP kept: CP 1 applied, then every chunk rewritten and
/// snapshot `s2` taken, which makes CP 2 fall due.
fn pair_at_cp_2_of_every_chunk(dst_env: &[(&str, &str)]) -> Pair {
    let p = pair(&[("SNAPBLK_TEST_KEEP_SOURCE_CPS", "1")], dst_env);
    p.src.ok(&["volume", "create", "v", "--size", "4M"]);
    p.start("v", "r", &["--cp-interval", "1h"]);
    p.wait_state("v", "replicating");
    write_blocks(&p.src.uri("v"), 0..64, 1);
    assert_eq!(p.cp("v"), 1);
    write_blocks(&p.src.uri("v"), 0..64, 2);
    p.src.ok(&["snapshot", "create", "v", "s2"]);
    p
}

/// With one CP kept (the default) and nobody reading the replica, an apply
/// first drops the previous CP snapshot, so it copies nothing for it; a
/// crash in between is redone from staging; an export opened meanwhile
/// waits for the new CP; a reader keeps its CP, preserved as before.
#[test]
fn an_apply_copies_no_chunk_for_a_cp_nobody_reads() {
    if skip_without("unread_cp_apply", &["qemu-img", "qemu-io", "python3-nbd"]) {
        return;
    }
    let flags = tempfile::tempdir().unwrap();
    let resume = flags.path().join("resume");
    let preserved = |d: &Daemon| {
        d.json(&["volume", "info", "r"])["preserved_chunks"]
            .as_u64()
            .unwrap()
    };
    // CP 2's apply stops halfway, cp-1 already gone.
    let mut p = pair_at_cp_2_of_every_chunk(&[("SNAPBLK_TEST_PAUSE_APPLY", "2")]);
    wait_apply_paused(&p, 2);
    assert!(p.dst.names(&["snapshot", "list", "r"]).is_empty());
    assert_eq!(preserved(&p.dst), 0);
    // Killed there, the daemon redoes CP 2 from staging at start.
    p.dst.signal(libc::SIGKILL);
    p.dst.env = vec![
        ("SNAPBLK_TEST_PAUSE_APPLY".into(), "4".into()),
        (
            "SNAPBLK_TEST_RESUME_APPLY".into(),
            resume.display().to_string(),
        ),
    ];
    p.dst.restart();
    assert!(p.dst.log().contains("applying consistency point 2 again"));
    assert!(same_image(&p.src.uri("v@s2"), &p.dst.uri("r")));
    assert_eq!(p.dst.names(&["snapshot", "list", "r"]), ["cp-2"]);
    assert_eq!(preserved(&p.dst), 0);
    // The source reconnects (its resync is CP 3). An export opened while
    // CP 4 is applied waits, then reads CP 4 (an error at once, without
    // the wait: cp-3 is gone).
    p.wait_state("v", "replicating");
    write_blocks(&p.src.uri("v"), 0..64, 3);
    p.src.ok(&["snapshot", "create", "v", "s3"]);
    wait_apply_paused(&p, 4);
    let mut reader = py_spawn(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\nprint(h.pread(512, 0)[0])\n",
        &[p.dst.uri("r")],
        false,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "{}",
        read_stderr(&mut reader)
    );
    std::fs::write(&resume, b"").unwrap();
    let out = reader.wait_with_output().unwrap();
    let first = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        first.trim(),
        "3",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(same_image(&p.src.uri("v@s3"), &p.dst.uri("r")));
    assert_eq!(preserved(&p.dst), 0);
    // A connected reader keeps cp-4 through CP 5's apply, which preserves
    // every chunk it overwrites for it.
    let mut client = nbd_client_connected(&p.dst.uri("r"));
    write_blocks(&p.src.uri("v"), 0..64, 4);
    assert_eq!(p.cp("v"), 5);
    assert_eq!(preserved(&p.dst), 64);
    drop(client.stdin.take());
    client.wait().unwrap();
    assert!(same_image(&p.src.uri("v@repl-cp-5"), &p.dst.uri("r")));
}

/// An apply that fails after it deleted the unread previous CP leaves the
/// replica without an image: readers are told why, and the next CP the
/// source sends (it reconnects) brings the image back.
#[test]
fn readers_of_a_replica_whose_apply_failed_are_told_why_until_the_next_cp() {
    if skip_without("failed_apply", &["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let flags = tempfile::tempdir().unwrap();
    let resume = flags.path().join("resume");
    std::fs::write(&resume, "fail").unwrap();
    let resume_env = resume.display().to_string();
    let p = pair_at_cp_2_of_every_chunk(&[
        ("SNAPBLK_TEST_PAUSE_APPLY", "2"),
        ("SNAPBLK_TEST_RESUME_APPLY", &resume_env),
    ]);
    wait_until(
        "the apply of CP 2 failing",
        || p.dst.log(),
        || p.dst.log().contains("the apply fails here"),
    );
    // libnbd shows the server's message only in its debug output.
    let (ok, _, err) = run(Command::new("nbdinfo")
        .env("LIBNBD_DEBUG", "1")
        .arg(p.dst.uri("r")));
    assert!(!ok && err.contains("applying CP 2 failed"), "{err}");
    // The source reconnects and resends what CP 2 held; that apply succeeds.
    std::fs::write(&resume, "").unwrap();
    wait_until(
        "a CP applied after the failure",
        || p.dst.log(),
        || !p.dst.names(&["snapshot", "list", "r"]).is_empty(),
    );
    assert!(same_image(&p.src.uri("v@s2"), &p.dst.uri("r")));
}

#[test]
fn a_destination_killed_mid_apply_comes_back_with_exactly_one_cp() {
    if skip_without("kill_mid_apply", &["qemu-img", "qemu-io"]) {
        return;
    }
    let mut p = pair(
        &[("SNAPBLK_TEST_KEEP_SOURCE_CPS", "1")],
        &[("SNAPBLK_TEST_PAUSE_APPLY", "2")],
    );
    p.src.ok(&["volume", "create", "v", "--size", "4M"]);
    p.start("v", "r", &["--cp-interval", "1h", "--keep-cps", "2"]);
    p.wait_state("v", "replicating"); // CP 0, the first copy
    write_blocks(&p.src.uri("v"), 0..64, 1);
    assert_eq!(p.cp("v"), 1);
    // CP 2 (taken after snapshot s2) changes every block; its apply stops halfway.
    write_blocks(&p.src.uri("v"), 0..64, 2);
    p.src.ok(&["snapshot", "create", "v", "s2"]);
    wait_apply_paused(&p, 2);
    // Readers still see CP 1 while CP 2 is half applied.
    assert!(same_image(&p.src.uri("v@repl-cp-1"), &p.dst.uri("r")));
    // The link keeps shipping while the destination applies: writes made
    // now are staged (acknowledged transfers) before CP 2 is applied.
    let before = p.status("v")["transfers"].as_u64().unwrap();
    write_blocks(&p.src.uri("v"), 0..8, 4);
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.status("v")["transfers"].as_u64().unwrap() < before + 1 {
        assert!(Instant::now() < deadline, "{}", p.status("v"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = p.status("v");
    assert_eq!(s["cps"], 2, "CP 2 is not applied yet: {s}");
    p.dst.signal(libc::SIGKILL);
    p.dst.env.clear();
    p.dst.restart();
    assert!(p.dst.log().contains("applying consistency point 2 again"));
    assert!(same_image(&p.src.uri("v@s2"), &p.dst.uri("r")));
    assert!(same_image(&p.src.uri("v@repl-cp-1"), &p.dst.uri("r@cp-1")));
    // The source reconnects and goes on without a full copy.
    p.wait_state("v", "replicating");
    write_blocks(&p.src.uri("v"), [3], 3);
    p.cp("v");
    let s = p.status("v");
    assert_eq!(s["full_syncs"], 1, "{s}");
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
}

#[test]
fn a_killed_source_and_a_cut_link_resync_only_the_changed_blocks() {
    if skip_without("resync", &["qemu-img", "qemu-io"]) {
        return;
    }
    let mut p = pair(&[], &[]);
    p.src.ok(&["volume", "create", "v", "--size", "8M"]);
    qemu_io_ok(&p.src.uri("v"), false, &["write -P 1 0 8M"]);
    p.start("v", "r", &["--cp-interval", "1h"]);
    p.cp("v");
    assert_eq!(p.status("v")["dirty_blocks"], 0);

    // kill -9 of the source after writes to 5 chunks the destination lacks
    // (a 64K region of the dirty map is 16 4K blocks).
    write_blocks(&p.src.uri("v"), [2, 3, 50, 51, 127], 4);
    assert_eq!(p.status("v")["dirty_blocks"], 5 * PER_CHUNK);
    p.src.kill9_and_restart();
    p.wait_state("v", "replicating");
    p.cp("v");
    let s = p.status("v");
    assert_eq!(s["full_syncs"], 0, "no full copy after a restart: {s}");
    assert_eq!(s["resync_blocks"], 5 * PER_CHUNK, "{s}");
    assert_eq!(s["dirty_blocks"], 0, "{s}");
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));

    // Cut the link (the destination goes away) under writes to 9 blocks.
    p.dst.signal(libc::SIGTERM);
    p.wait_state("v", "disconnected");
    let retries_logged = || p.src.log().matches("; retrying ").count();
    let before = retries_logged();
    // Several 1 s retries fail meanwhile; the outage is logged once (plus,
    // at most, the dropped session's own error if it lands after `before`).
    std::thread::sleep(Duration::from_millis(3500));
    write_blocks(&p.src.uri("v"), [0, 10, 20, 30, 40, 60, 80, 100, 120], 5);
    write_blocks(&p.src.uri("v"), [10, 20], 6);
    let s = p.status("v");
    assert_eq!(s["dirty_blocks"], 9 * PER_CHUNK, "{s}");
    // Disconnected, the dirty map alone keeps what changed: no per-block
    // map grows with what is written during an outage.
    assert_eq!(s["tracked_blocks"], 0, "{s}");
    assert!(retries_logged() - before <= 2, "{}", p.src.log());
    p.dst.restart();
    p.wait_state("v", "replicating");
    p.cp("v");
    let s = p.status("v");
    assert_eq!(s["full_syncs"], 0, "{s}");
    assert_eq!(
        s["resync_blocks"],
        (5 + 9) * PER_CHUNK,
        "only the changed blocks: {s}"
    );
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
}

#[test]
fn with_small_blocks_the_dirty_map_tracks_64k_regions() {
    if skip_without("dirty_regions", &["qemu-img", "qemu-io"]) {
        return;
    }
    let mut p = pair(&[], &[]);
    p.src.ok(&[
        "volume",
        "create",
        "v",
        "--size",
        "1M",
        "--chunk-size",
        "4K",
    ]);
    qemu_io_ok(&p.src.uri("v"), false, &["write -P 1 0 1M"]);
    p.start("v", "r", &["--cp-interval", "1h"]);
    p.cp("v");
    // 4K writes are whole 4K blocks: shipped once, referenced at the CP.
    qemu_io_ok(
        &p.src.uri("v"),
        false,
        &["write -P 2 20k 4k", "write -P 3 400k 8k"],
    );
    assert_eq!(
        p.status("v")["dirty_blocks"],
        32,
        "two 64K regions of 16 blocks"
    );
    p.cp("v");
    let s = p.status("v");
    assert_eq!(
        (
            s["last_cp_ref_blocks"].as_u64(),
            s["last_cp_full_blocks"].as_u64()
        ),
        (Some(3), Some(0)),
        "{s}"
    );
    // After a kill -9 the two regions are resent whole: 32 blocks, no full copy.
    qemu_io_ok(
        &p.src.uri("v"),
        false,
        &["write -P 4 20k 4k", "write -P 5 400k 8k"],
    );
    p.src.kill9_and_restart();
    p.wait_state("v", "replicating");
    let s = p.status("v");
    assert_eq!(
        (s["full_syncs"].as_u64(), s["resync_blocks"].as_u64()),
        (Some(0), Some(32)),
        "{s}"
    );
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
}

#[test]
fn a_full_log_falls_back_to_sending_changed_blocks_at_the_cp() {
    if skip_without("log_overflow", &["qemu-img", "qemu-io"]) {
        return;
    }
    let p = pair(&[], &[]);
    p.src.ok(&["volume", "create", "v", "--size", "2M"]);
    // A log smaller than one block: every whole-block write overflows it.
    p.start("v", "r", &["--cp-interval", "1h", "--max-log", "4K"]);
    p.wait_state("v", "replicating");
    write_blocks(&p.src.uri("v"), [1, 2, 3], 7);
    let s = p.status("v");
    assert_eq!(s["state"], "log-overflow", "{s}");
    assert!(s["log_overflows"].as_u64().unwrap() >= 3, "{s}");
    assert_eq!(s["transfers"], 0, "{s}");
    p.cp("v");
    let s = p.status("v");
    assert_eq!(s["state"], "replicating", "{s}");
    assert_eq!(s["last_cp_full_blocks"], 3 * PER_CHUNK, "{s}");
    assert_eq!(s["resync_blocks"], 3 * PER_CHUNK, "{s}");
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
    assert_eq!(p.src.log().matches("the write log is full").count(), 1);
}

#[test]
fn a_promoted_replica_is_a_normal_writable_volume() {
    if skip_without("promote", &["qemu-img", "qemu-io"]) {
        return;
    }
    let p = pair(&[], &[]);
    p.src.ok(&["volume", "create", "v", "--size", "2M"]);
    qemu_io_ok(&p.src.uri("v"), false, &["write -P 6 0 2M"]);
    p.start("v", "r", &["--cp-interval", "1h"]);
    p.cp("v");
    // Before promotion: the replica's live image and newest CP are guarded,
    // and the source cannot be deleted under its link.
    let e = p.src.fails(&["volume", "delete", "v"]);
    assert!(e.contains("snapblk replicate stop v"), "{e}");
    // Nor the replica while its source is connected (it would be sent again
    // in full); the error names the source's volume and both ways out.
    let e = p.dst.fails(&["volume", "delete", "r"]);
    assert!(
        e.contains("is a replica that the source at")
            && e.contains("`snapblk replicate stop v`")
            && e.contains("`snapblk replicate promote r`"),
        "{e}"
    );
    // A reopen is refused naming the link, not as a generic open connection.
    let e = p.dst.fails(&["volume", "reopen", "r"]);
    assert!(
        e.contains("is a replica that the source at")
            && e.contains("the receiver holds it open")
            && e.contains("`snapblk replicate stop v`"),
        "{e}"
    );
    let e = p.dst.fails(&["device", "start", "r"]);
    assert!(
        e.contains("is a replica") && e.contains("--snapshot cp-"),
        "{e}"
    );
    let snaps = p.dst.json(&["snapshot", "list", "r"]);
    let newest = snaps
        .as_array()
        .and_then(|a| a.last())
        .expect("a CP snapshot")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let e = p.dst.fails(&["snapshot", "delete", "r", &newest]);
    assert!(e.contains("newest consistency point"), "{e}");
    let e = p.dst.fails(&["replicate", "promote", "nope"]);
    assert!(e.contains("not a replica"), "{e}");
    let out = p.dst.ok(&["replicate", "promote", "r"]);
    assert!(out.contains("normal writable volume"), "{out}");
    qemu_io_ok(
        &p.dst.uri("r"),
        false,
        &["read -P 6 0 2M", "write -P 8 4k 4k"],
    );
    qemu_io_ok(
        &p.dst.uri("r"),
        true,
        &["read -P 8 4k 4k", "read -P 6 64k 64k"],
    );
    // The old source is refused from now on.
    write_blocks(&p.src.uri("v"), [1], 1);
    let s = p.wait_state("v", "disconnected");
    let s = if s["error"].is_null() {
        p.status("v")
    } else {
        s
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = s;
    while !s["error"].as_str().unwrap_or_default().contains("promoted") {
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(100));
        s = p.status("v");
    }
    let st = &p.dst.json(&["replicate", "status", "r"])["links"][0];
    assert_eq!(st["state"], "promoted");
}

#[test]
fn replicate_requests_check_their_arguments() {
    let p = pair(&[], &[]);
    p.src.ok(&["volume", "create", "v", "--size", "1M"]);
    for (args, needle) in [
        (
            vec!["replicate", "start", "v", "--to", "nowhere"],
            "HOST:PORT/DESTVOL",
        ),
        (
            vec!["replicate", "start", "v", "--to", "127.0.0.1:1/.x"],
            "invalid volume name",
        ),
        (
            vec!["replicate", "start", "nope", "--to", "127.0.0.1:1/r"],
            "not found",
        ),
        (
            vec![
                "replicate",
                "start",
                "v",
                "--to",
                "127.0.0.1:1/r",
                "--cp-interval",
                "5q",
            ],
            "invalid duration",
        ),
        (
            vec!["replicate", "start", "v", "--to", "127.0.0.1:1/r"],
            "does not exist; create it, with the same key on the source and the destination",
        ),
        (
            vec![
                "replicate",
                "start",
                "v",
                "--to",
                "127.0.0.1:1/r",
                "--block-size",
                "128K",
            ],
            "power of two between 4096 and volume v's chunk size 65536",
        ),
        (
            vec![
                "replicate",
                "start",
                "v",
                "--to",
                "127.0.0.1:1/r",
                "--block-size",
                "6K",
            ],
            "power of two",
        ),
        (vec!["replicate", "stop", "v"], "not replicated"),
        (vec!["replicate", "cp", "v"], "not replicated"),
        (vec!["replicate", "status", "v"], "neither"),
    ] {
        let e = p.src.fails(&args);
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    p.start("v", "r", &[]);
    let e = p.src.fails(&[
        "replicate",
        "start",
        "v",
        "--to",
        "127.0.0.1:1/r",
        "--key-file",
        p.key.to_str().unwrap(),
    ]);
    assert!(e.contains("already replicated"), "{e}");
    p.cp("v");
    let out = p.src.ok(&["replicate", "status"]);
    for needle in [
        "role:",
        "source",
        "state:",
        "replicating",
        "saved by references:",
        "last cp:",
    ] {
        assert!(out.contains(needle), "{out}");
    }
    assert!(!out.contains("correct horse"));
    p.src.ok(&["replicate", "stop", "v"]);
    assert!(p.src.json(&["replicate", "status"])["links"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(p.dst.ok(&["replicate", "status"]).contains("waiting"));
}

// ---- a hostile network and hostile peers ----

/// What the man in the middle does to the next frame of a kind it sees
/// from the source, once.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    /// Forwards it, then the same bytes again.
    Replay,
    /// Flips one bit of its sealed payload.
    Flip,
    /// Swallows it.
    Drop,
    /// Holds it back and forwards it after the next frame.
    Swap,
    /// Closes the source's side and keeps the destination's open, silent:
    /// to the destination the source lost power (a half-open connection).
    HalfOpen,
}

#[derive(Default)]
struct ProxyState {
    armed: Option<(Attack, Kind)>,
    done: Vec<Attack>,
    /// Every byte the source sent, as seen on the wire.
    wire: Vec<u8>,
    connections: usize,
}

/// A TCP proxy on loopback between the source and the destination that
/// reads the source's frames (headers are in the clear) and tampers with
/// them on demand.
struct Proxy {
    addr: String,
    state: Arc<Mutex<ProxyState>>,
    /// Destination-side sockets kept open by `HalfOpen`.
    _held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(dest: &str) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (st, hd, dest) = (state.clone(), held.clone(), dest.to_string());
        std::thread::spawn(move || {
            for src in listener.incoming() {
                let Ok(src) = src else { return };
                let Ok(dst) = TcpStream::connect(&dest) else {
                    continue;
                };
                st.lock().unwrap().connections += 1;
                let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
                // Destination -> source: copied as is.
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &dst2, &mut &src2);
                    let _ = src2.shutdown(std::net::Shutdown::Both);
                });
                let (st, hd) = (st.clone(), hd.clone());
                std::thread::spawn(move || Proxy::forward(src, dst, &st, &hd));
            }
        });
        Proxy {
            addr,
            state,
            _held: held,
        }
    }

    /// Source -> destination, frame by frame.
    fn forward(
        mut src: TcpStream,
        mut dst: TcpStream,
        state: &Mutex<ProxyState>,
        held: &Mutex<Vec<TcpStream>>,
    ) {
        use std::io::Read;
        let mut swapped: Option<Vec<u8>> = None;
        loop {
            let mut frame = vec![0u8; wire::HEADER];
            if src.read_exact(&mut frame).is_err() {
                break;
            }
            let len = u32::from_le_bytes(frame[8..12].try_into().unwrap()) as usize;
            frame.resize(wire::HEADER + len, 0);
            if src.read_exact(&mut frame[wire::HEADER..]).is_err() {
                break;
            }
            let mut s = state.lock().unwrap();
            s.wire.extend_from_slice(&frame);
            let attack = match s.armed {
                Some((a, k)) if k as u8 == frame[4] => {
                    s.armed = None;
                    s.done.push(a);
                    Some(a)
                }
                _ => None,
            };
            drop(s);
            let mut out = Vec::new();
            match attack {
                Some(Attack::Replay) => {
                    out.extend_from_slice(&frame);
                    out.extend_from_slice(&frame);
                }
                Some(Attack::Flip) => {
                    frame[wire::HEADER + len / 2] ^= 0x10;
                    out = frame;
                }
                Some(Attack::Drop) => {}
                Some(Attack::Swap) => swapped = Some(frame),
                Some(Attack::HalfOpen) => {
                    let _ = src.shutdown(std::net::Shutdown::Both);
                    held.lock().unwrap().push(dst);
                    return;
                }
                None => {
                    out = frame;
                    if let Some(earlier) = swapped.take() {
                        out.extend_from_slice(&earlier);
                    }
                }
            }
            if dst.write_all(&out).is_err() {
                break;
            }
        }
        let _ = dst.shutdown(std::net::Shutdown::Both);
    }

    fn arm(&self, attack: Attack, kind: Kind) {
        self.state.lock().unwrap().armed = Some((attack, kind));
    }

    fn done(&self, attack: Attack) -> bool {
        self.state.lock().unwrap().done.contains(&attack)
    }

    fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }
}

/// Waits (generously) until `cond` holds; `what` and `log` explain a hang.
fn wait_until(what: &str, log: impl Fn() -> String, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} never happened:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes 64K blocks of recognizable text (never on the wire in the clear).
const PLAIN: &[u8] = b"PLAINTEXT-ON-THE-WIRE? ";
const TEXT_WRITER: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
first, n, tag = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for b in range(first, first + n):
    line = (b"PLAINTEXT-ON-THE-WIRE? " + tag.encode() + b" %d\n" % b) * 3000
    h.pwrite(line[:65536], b * 65536)
h.flush()
print("PASS")
"#;

fn write_text(uri: &str, first: u64, n: u64, tag: &str) {
    py_ok(
        TEXT_WRITER,
        &[uri.into(), first.to_string(), n.to_string(), tag.into()],
    );
}

/// `replicate cp` until it succeeds (the link may be reconnecting).
fn cp_when_back(p: &Pair, vol: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = p.src.cli(&["--json", "replicate", "cp", vol]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            return v["cp"].as_u64().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "replicate cp never succeeded: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            p.src.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_man_in_the_middle_can_neither_read_nor_replay_reorder_alter_or_drop_frames() {
    if skip_without("mitm", &["qemu-img", "python3-nbd"]) {
        return;
    }
    let p = pair(&[("SNAPBLK_TEST_KEEP_SOURCE_CPS", "1")], &[]);
    let proxy = Proxy::start(&p.addr);
    p.src.ok(&["volume", "create", "v", "--size", "4M"]);
    let extra = [
        "--cp-interval",
        "1h",
        "--keep-cps",
        "1000",
        "--block-size",
        "64K",
    ];
    p.start_via(&proxy.addr, "v", "r", &extra);
    p.wait_state("v", "replicating");
    let refused = || p.dst.log().matches("fails authentication").count();
    // Transfers carry data; pings are what an idle source sends, and it
    // sends the next frame without waiting for an answer, so a dropped or
    // held-back ping shows in the frame after it.
    let scenarios = [
        (Attack::Replay, Kind::Transfer),
        (Attack::Flip, Kind::Transfer),
        (Attack::Drop, Kind::Ping),
        (Attack::Swap, Kind::Ping),
    ];
    for (round, (attack, kind)) in scenarios.into_iter().enumerate() {
        let before = refused();
        let connections = proxy.connections();
        proxy.arm(attack, kind);
        let tag = format!("{attack:?}");
        if kind == Kind::Transfer {
            write_text(&p.src.uri("v"), round as u64 * 8, 8, &tag);
        }
        wait_until(
            &format!("{attack:?}"),
            || p.dst.log(),
            || proxy.done(attack),
        );
        if kind == Kind::Ping {
            // The frame after the ping (the next one, or a transfer).
            write_text(&p.src.uri("v"), round as u64 * 8, 8, &tag);
        }
        wait_until(
            &format!("the destination refusing the {attack:?} frame"),
            || p.dst.log(),
            || refused() > before,
        );
        // The source reconnects and converges.
        cp_when_back(&p, "v");
        assert!(
            proxy.connections() > connections,
            "{attack:?}: no reconnect"
        );
        assert!(
            same_image(&p.src.uri("v"), &p.dst.uri("r")),
            "{attack:?}: the replica did not converge"
        );
    }
    // Every image the replica ever showed is the source's at that CP:
    // nothing of a tampered frame got in.
    assert_cps_equal_the_source(&p, &p.dst.names(&["snapshot", "list", "r"]));
    // Confidential: megabytes of text crossed, none of it readable.
    let wire = std::mem::take(&mut proxy.state.lock().unwrap().wire);
    assert!(wire.len() > 1 << 20, "only {} bytes crossed", wire.len());
    assert!(
        !wire.windows(PLAIN.len()).any(|w| w == PLAIN),
        "block content crossed the wire in the clear"
    );
}

#[test]
fn a_half_open_source_connection_is_taken_over_by_its_reconnection() {
    if skip_without("half_open", &["qemu-img", "python3-nbd"]) {
        return;
    }
    let p = pair(&[], &[]);
    let proxy = Proxy::start(&p.addr);
    p.src.ok(&["volume", "create", "v", "--size", "4M"]);
    p.start_via(&proxy.addr, "v", "r", &["--cp-interval", "1h"]);
    p.wait_state("v", "replicating");
    // The next transfer never arrives and the destination's side of the
    // connection stays open and silent, as when a source loses power.
    proxy.arm(Attack::HalfOpen, Kind::Transfer);
    write_text(&p.src.uri("v"), 0, 4, "half-open");
    wait_until(
        "the half-open cut",
        || p.src.log(),
        || proxy.done(Attack::HalfOpen),
    );
    // The source reconnects at once; its new connection takes the replica
    // over instead of being refused as "already receiving".
    cp_when_back(&p, "v");
    assert!(same_image(&p.src.uri("v"), &p.dst.uri("r")));
    let log = p.dst.log();
    assert!(log.contains("connects again while"), "{log}");
    assert!(!log.contains("already receiving"), "{log}");
}

#[test]
fn a_silent_destination_never_blocks_stop_or_shutdown() {
    let t = tempfile::tempdir().unwrap();
    let key = key_file(t.path(), "key", "correct horse battery staple\n");
    // Accepts every connection and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let acc = accepted.clone();
    std::thread::spawn(move || {
        for c in silent.incoming().flatten() {
            acc.lock().unwrap().push(c);
        }
    });
    let mut src = Daemon::start(&t.path().join("src"));
    src.ok(&["volume", "create", "v", "--size", "1M"]);
    let start = |src: &Daemon| {
        let before = accepted.lock().unwrap().len();
        src.ok(&start_args("v", &format!("{addr}/r"), &key, &[]));
        // The sender is now waiting for the handshake's answer.
        wait_until(
            "a connection",
            || src.log(),
            || accepted.lock().unwrap().len() > before,
        );
    };
    let link = |src: &Daemon| src.json(&["replicate", "status", "v"])["links"][0].clone();
    start(&src);
    // Never connected yet, and nothing failed: the first connection is
    // still being made, which is not a broken link.
    let s = link(&src);
    assert_eq!(
        (s["state"].as_str(), s["error"].as_null()),
        (Some("connecting"), Some(())),
        "{s}"
    );
    src.ok(&["replicate", "stop", "v"]);
    // The handshake times out and is retried meanwhile.
    start(&src);
    wait_until(
        "the handshake timing out",
        || src.log(),
        || {
            link(&src)["error"]
                .as_str()
                .is_some_and(|e| e.contains("did not complete the handshake in time"))
        },
    );
    assert_eq!(link(&src)["state"], "disconnected");
    wait_until(
        "a retry",
        || src.log(),
        || accepted.lock().unwrap().len() >= 3,
    );
    let status = src.signal(libc::SIGTERM);
    assert!(status.success(), "{status}: {}", src.log());
}

#[test]
fn the_destination_bounds_unauthenticated_connections() {
    let p = pair(&[], &[]);
    // A Hello announcing 64 MiB is refused unread.
    let mut big = TcpStream::connect(&p.addr).unwrap();
    let mut header = wire::encode_frame(Kind::Hello, &[])[..wire::HEADER].to_vec();
    header[8..12].copy_from_slice(&(64u32 << 20).to_le_bytes());
    big.write_all(&header).unwrap();
    assert_closed(&mut big);
    // 16 connections that never speak fill the handshake slots: the next
    // is closed at once, and each idle one when its deadline passes.
    let idle: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(&p.addr).unwrap())
        .collect();
    wait_until(
        "the next connection refused",
        || p.dst.log(),
        || {
            let mut extra = TcpStream::connect(&p.addr).unwrap();
            extra
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let closed = match std::io::Read::read(&mut extra, &mut [0u8; 1]) {
                Ok(n) => n == 0,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            };
            closed && p.dst.log().contains("connections are in their handshake")
        },
    );
    for mut c in idle {
        assert_closed(&mut c);
    }
    let log = p.dst.log();
    assert!(log.contains("exceeds the 1024-byte limit"), "{log}");
    assert!(
        log.contains("did not complete the handshake in time"),
        "{log}"
    );
    // And a real source gets through.
    p.src.ok(&["volume", "create", "v", "--size", "1M"]);
    p.start("v", "r", &[]);
    p.wait_state("v", "replicating");
}

/// Waits (generously) for the peer to close `s`.
fn assert_closed(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match std::io::Read::read(s, &mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the destination did not close the connection: {e}"),
        }
    }
}

#[test]
fn a_world_readable_key_file_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let key = key_file(t.path(), "key", "correct horse battery staple\n");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, err) = run(Command::new(BIN).args([
        "daemon",
        "--data-dir",
        t.path().join("dst").to_str().unwrap(),
        "--control",
        t.path().join("dst.sock").to_str().unwrap(),
        "--nbd-socket",
        t.path().join("dst.nbd").to_str().unwrap(),
        "--replication-listen",
        "127.0.0.1:0",
        "--replication-key-file",
        key.to_str().unwrap(),
    ]));
    assert!(!ok);
    assert!(
        err.contains("permissions 0644 for the replication key file") && err.contains("chmod 600"),
        "{err}"
    );
    let src = Daemon::start(&t.path().join("src"));
    src.ok(&["volume", "create", "v", "--size", "1M"]);
    let start = start_args("v", "127.0.0.1:1/r", &key, &[]);
    let e = src.fails(&start);
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    src.ok(&start);
}

#[test]
fn a_replica_that_cannot_be_recovered_is_broken_and_the_others_are_served() {
    if skip_without("broken_replica", &["qemu-img", "qemu-io"]) {
        return;
    }
    let mut p = pair(&[], &[]);
    for v in ["a", "b", "c"] {
        p.src.ok(&["volume", "create", v, "--size", "1M"]);
        qemu_io_ok(&p.src.uri(v), false, &["write -P 3 0 1M"]);
        p.start(v, v, &["--cp-interval", "1h"]);
        p.cp(v);
    }
    for v in ["a", "b", "c"] {
        p.src.ok(&["replicate", "stop", v]);
    }
    p.dst.signal(libc::SIGTERM);
    let dest = p.dst.dir.join("replication/dest");
    // a: a staged CP record that refers to a transfer it does not hold.
    let last = p.dst_last_cp(&dest, "a");
    let cp = wire::encode_cp(&wire::CpCommit {
        cp: last + 1,
        keep_from_tid: 0,
        block_size: 4096,
        entries: vec![wire::CpEntry::Ref {
            block: 0,
            count: 1,
            tid: 999,
            index: 0,
        }],
    });
    let mut rec = crc32c::crc32c(&cp).to_le_bytes().to_vec();
    rec.extend_from_slice(&cp);
    std::fs::write(
        dest.join(format!("a.staging/cp-{:016x}.rec", last + 1)),
        rec,
    )
    .unwrap();
    // b: an unreadable record.
    std::fs::write(dest.join("b.json"), "{ not json").unwrap();
    p.dst.restart();
    let st = p.dst.json(&["replicate", "status"]);
    let state = |v: &str| {
        st["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["volume"] == v)
            .unwrap_or_else(|| panic!("{v} missing: {st}"))
            .clone()
    };
    assert_eq!(state("a")["state"], "broken", "{st}");
    assert!(
        state("a")["error"]
            .as_str()
            .unwrap()
            .contains("transfer 999"),
        "{st}"
    );
    assert_eq!(state("b")["state"], "broken", "{st}");
    assert!(
        state("b")["error"].as_str().unwrap().contains("b.json"),
        "{st}"
    );
    // c is served; a and b are not exported at all, nor startable as devices.
    assert!(same_image(&p.src.uri("c"), &p.dst.uri("c")));
    for v in ["a", "b"] {
        let (ok, text) = qemu_io(&p.dst.uri(v), false, &["write -P 9 0 4k"]);
        assert!(
            !ok || text.contains("error") || text.contains("fail"),
            "{v}: {text}"
        );
        let e = p.dst.fails(&["device", "start", v]);
        assert!(e.contains("broken replica"), "{e}");
    }
    // Its source is refused with the reason.
    p.start("a", "a", &["--cp-interval", "1h"]);
    wait_until(
        "the source seeing the refusal",
        || p.src.log(),
        || {
            p.status("a")["error"]
                .as_str()
                .is_some_and(|e| e.contains("is broken"))
        },
    );
}

impl Pair {
    /// The last CP replica `vol` applied, from its record.
    fn dst_last_cp(&self, dest: &Path, vol: &str) -> u64 {
        let rec: Value =
            serde_json::from_slice(&std::fs::read(dest.join(format!("{vol}.json"))).unwrap())
                .unwrap();
        rec["last_applied_cp"].as_u64().unwrap()
    }
}

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

/// A key file readable by its owner only, as the daemon insists.
fn write_key(dir: &Path, name: &str, key: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A source and a destination daemon sharing a key; `dst_env` goes to the
/// destination (test hooks), `src_env` to the source.
fn pair(src_env: &[(&str, &str)], dst_env: &[(&str, &str)]) -> Pair {
    let t = tempfile::tempdir().unwrap();
    let key = write_key(t.path(), "key", "correct horse battery staple\n");
    let src = Daemon::start_with(&t.path().join("src"), &t.path().join("src"), &[], src_env);
    // A fixed port (found free just now) so that restarts keep it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let dst = Daemon::start_with(
        &t.path().join("dst"),
        &t.path().join("dst"),
        &[
            "--replication-listen",
            &listen,
            "--replication-key-file",
            key.to_str().unwrap(),
        ],
        dst_env,
    );
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

impl Pair {
    fn start(&self, vol: &str, dest: &str, extra: &[&str]) {
        let to = format!("{}/{dest}", self.addr);
        let mut args = vec![
            "replicate",
            "start",
            vol,
            "--to",
            &to,
            "--key-file",
            self.key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.src.ok(&args);
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

/// `qemu-img compare` of two exports; true if identical.
fn same_image(a: &str, b: &str) -> bool {
    let (ok, o, e) =
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]));
    assert!(
        ok || o.contains("differ"),
        "qemu-img compare failed: {o}{e}"
    );
    ok
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
    for cp in &cps {
        let n = &cp[3..];
        assert!(
            same_image(
                &p.src.uri(&format!("v@repl-cp-{n}")),
                &p.dst.uri(&format!("r@{cp}"))
            ),
            "CP {n} differs from the source's image at that point"
        );
    }
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

/// Writes random 64K blocks as fast as it can until the file `stop` exists,
/// then says STOPPED; says EXHAUSTED if it reached `limit` writes first.
const NONSTOP_WRITER: &str = r#"
import nbd, os, random, sys
uri, stop, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = random.Random(5)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
data = [r.randbytes(65536) for _ in range(8)]
n = 0
while n % 16 or not os.path.exists(stop):
    if n >= limit:
        print("EXHAUSTED", n)
        sys.exit(0)
    h.pwrite(data[n % 8], r.randrange(size // 65536) * 65536)
    n += 1
h.flush()
print("STOPPED", n)
"#;

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
    let stop = p._t.path().join("stop-writer");
    // 64 GiB: far more than a few CPs need (each moves at most 6 MiB: the
    // 2 MiB log and the 4 MiB volume).
    let limit: u64 = 1 << 20;
    let mut writer = py_spawn(
        NONSTOP_WRITER,
        &[
            p.src.uri("v"),
            stop.to_str().unwrap().into(),
            limit.to_string(),
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
    let s = p.status("v");
    assert!(
        s["log_overflows"].as_u64().unwrap() > 0,
        "the writer never outpaced the link, so this proves nothing: {s}"
    );
    assert!(s["max_cp_delay_ms"].is_u64(), "{s}");
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
    let wrong = write_key(p._t.path(), "wrong", "not the right key at all\n");
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
        assert!(wire::authenticate_to_destination(&mut s, b"still wrong").is_err());
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
}

impl RawSource {
    /// Authenticates with `key` and opens replica `dest` like a source would.
    fn open(addr: &str, key: &[u8], dest: &str) -> RawSource {
        let mut s = TcpStream::connect(addr).unwrap();
        let (sealed, _) = wire::authenticate_to_destination(&mut s, key).unwrap();
        let mut raw = RawSource { s, sealed };
        let open = wire::Open {
            source_id: "raw-test".into(),
            source_volume: "v".into(),
            dest_volume: dest.into(),
            size: 1 << 20,
            chunk_size: BLOCK as u32,
            block_size: BLOCK as u32,
            keep_cps: 1,
        };
        raw.send(Kind::Open, &wire::to_json(&open));
        let opened: wire::Opened = wire::from_json(&raw.expect(Kind::Opened)).unwrap();
        assert_eq!(opened.last_applied_cp, None);
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
    let e = s.recv();
    assert!(e.is_err(), "{e:?}");
    drop(s);

    // A piece beyond the volume, with a valid crc.
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
    assert!(
        p.dst.log().contains("fails authentication"),
        "{}",
        p.dst.log()
    );
    assert!(p.dst.log().contains("truncated"), "{}", p.dst.log());
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

    // A proper transfer and CP still work on the same replica.
    let mut s = RawSource::open(&p.addr, key, "r");
    s.send(Kind::Transfer, &good);
    assert_eq!(wire::parse_u64(&s.expect(Kind::TransferAck)).unwrap(), 0);
    // 4K blocks: the first four from part of the 64K piece, zeros after.
    let cp = wire::CpCommit {
        cp: 0,
        keep_from_tid: 1,
        block_size: SMALL as u32,
        entries: vec![
            wire::CpEntry::Ref {
                block: 0,
                count: 4,
                tid: 0,
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
    let deadline = Instant::now() + Duration::from_secs(120);
    while !p
        .dst
        .log()
        .contains("pausing in the middle of applying CP 2")
    {
        assert!(Instant::now() < deadline, "{}", p.dst.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Readers still see CP 1 while CP 2 is half applied.
    assert!(same_image(&p.src.uri("v@repl-cp-1"), &p.dst.uri("r")));
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
    assert_eq!(p.status("v")["dirty_blocks"], 9 * PER_CHUNK);
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
            "replication key file",
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

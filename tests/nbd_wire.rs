//! NBD server, end to end: a real engine volume served on a UNIX socket and
//! driven by a hand-written raw client (plus nbdinfo/qemu-img/nbdcopy when
//! they are installed).

mod common;

use common::have;
use snapblk::backend::Storage;
use snapblk::engine::{CacheMode, EngineError, View, Volume, VolumeConfig};
use snapblk::frontend::nbd::{proto::*, ExportResolver, NbdServer};
use snapblk::runtime;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const SIZE: u64 = 16 << 20;

struct Resolver(Arc<Volume>);

impl ExportResolver for Resolver {
    fn resolve(&self, name: &str) -> Result<View, EngineError> {
        match name.split_once('@') {
            None if name == "vol" => Ok(self.0.live()),
            None if name == "boom" => panic!("resolver bug (on purpose)"),
            Some(("vol", snap)) => self.0.snapshot_view(snap),
            _ => Err(EngineError::NotFound(format!("export {name}"))),
        }
    }
    fn list(&self) -> Vec<String> {
        let mut v = vec!["vol".to_string()];
        v.extend(
            self.0
                .list_snapshots()
                .into_iter()
                .map(|s| format!("vol@{}", s.name)),
        );
        v
    }
    fn default_export(&self) -> Option<String> {
        Some("vol".into())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    volume: Arc<Volume>,
    server: NbdServer,
}

impl Fixture {
    fn new() -> Fixture {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("vol");
        std::fs::create_dir(&data).unwrap();
        let volume = runtime::block_on(Volume::create(
            "vol",
            Storage::Dir(data),
            &VolumeConfig {
                size: SIZE,
                chunk_size: 65536,
                partitions: 2,
                backing: None,
                cache: CacheMode::Writeback,
            },
        ))
        .unwrap();
        let sock = dir.path().join("nbd.sock");
        let server = NbdServer::new(Arc::new(Resolver(volume.clone())));
        server.listen_unix(&sock).unwrap();
        Fixture {
            _dir: dir,
            sock,
            volume,
            server,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

#[derive(Debug)]
enum Reply {
    Simple {
        cookie: u64,
        error: u32,
    },
    Chunk {
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
    /// The NBD error of a final reply (0 for success).
    fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { kind, payload, .. } if *kind == REPLY_TYPE_ERROR => {
                u32::from_be_bytes(payload[0..4].try_into().unwrap())
            }
            Reply::Chunk { .. } => 0,
        }
    }
}

struct Client {
    s: UnixStream,
    structured: bool,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

impl Client {
    fn connect(path: &Path) -> Client {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&greeting[16..], &[0, 3]); // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Client {
            s,
            structured: false,
        }
    }

    fn opt(&mut self, option: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let mut p = vec![0u8; be32(&h[16..]) as usize];
        self.s.read_exact(&mut p).unwrap();
        (be32(&h[8..]), be32(&h[12..]), p)
    }

    fn structured_replies(&mut self) {
        self.opt(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.opt_reply(), (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
        self.structured = true;
    }

    fn set_meta_context(&mut self, export: &str) {
        let mut p = (export.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(export.as_bytes());
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend_from_slice(&15u32.to_be_bytes());
        p.extend_from_slice(b"base:allocation");
        self.opt(OPT_SET_META_CONTEXT, &p);
        let (o, t, p) = self.opt_reply();
        assert_eq!((o, t), (OPT_SET_META_CONTEXT, REP_META_CONTEXT));
        assert_eq!(&p[4..], b"base:allocation");
        assert_eq!(be32(&p), META_BASE_ALLOCATION_ID);
        assert_eq!(self.opt_reply().1, REP_ACK);
    }

    /// NBD_OPT_GO; returns (size, transmission flags) or the error reply.
    fn go(&mut self, export: &str) -> Result<(u64, u16), (u32, String)> {
        let mut p = (export.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(export.as_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.opt(OPT_GO, &p);
        let mut export_info = None;
        loop {
            let (o, t, p) = self.opt_reply();
            assert_eq!(o, OPT_GO);
            match t {
                REP_INFO => match u16::from_be_bytes([p[0], p[1]]) {
                    INFO_EXPORT => {
                        export_info = Some((
                            u64::from_be_bytes(p[2..10].try_into().unwrap()),
                            u16::from_be_bytes([p[10], p[11]]),
                        ))
                    }
                    INFO_BLOCK_SIZE => {
                        assert_eq!(be32(&p[2..]), 512);
                        assert_eq!(be32(&p[6..]), 65536);
                        assert_eq!(be32(&p[10..]), 32 << 20);
                    }
                    other => panic!("unexpected info {other}"),
                },
                REP_ACK => return Ok(export_info.expect("NBD_INFO_EXPORT before ACK")),
                err => return Err((err, String::from_utf8(p).unwrap())),
            }
        }
    }

    fn open(path: &Path, export: &str) -> Client {
        let mut c = Client::connect(path);
        c.structured_replies();
        c.set_meta_context(export);
        c.go(export).unwrap();
        c
    }

    fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32, data: &[u8]) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        let mut b = r.encode().to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one reply; `simple_read_len` is the data length that follows a
    /// successful simple reply (a READ without structured replies).
    fn reply_with(&mut self, simple_read_len: usize) -> (Reply, Vec<u8>) {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                let error = be32(&h);
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let mut data = Vec::new();
                if error == 0 && simple_read_len > 0 {
                    data = vec![0u8; simple_read_len];
                    self.s.read_exact(&mut data).unwrap();
                }
                (Reply::Simple { cookie, error }, data)
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).unwrap();
                let flags = u16::from_be_bytes([h[0], h[1]]);
                let kind = u16::from_be_bytes([h[2], h[3]]);
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let mut payload = vec![0u8; be32(&h[12..]) as usize];
                self.s.read_exact(&mut payload).unwrap();
                assert_eq!(
                    flags & REPLY_FLAG_DONE,
                    REPLY_FLAG_DONE,
                    "single-chunk replies"
                );
                let data = if kind == REPLY_TYPE_OFFSET_DATA {
                    payload[8..].to_vec()
                } else {
                    Vec::new()
                };
                (
                    Reply::Chunk {
                        kind,
                        cookie,
                        payload,
                    },
                    data,
                )
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    fn reply(&mut self) -> (Reply, Vec<u8>) {
        self.reply_with(0)
    }

    /// One request, one reply.
    fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> (Reply, Vec<u8>) {
        self.send(kind, flags, 77, offset, length, data);
        let read_len = if kind == CMD_READ { length as usize } else { 0 };
        let (r, d) = self.reply_with(read_len);
        assert_eq!(r.cookie(), 77);
        (r, d)
    }

    /// One request that must succeed; returns the data read.
    #[track_caller]
    fn call_ok(&mut self, kind: u16, flags: u16, offset: u64, length: u32, data: &[u8]) -> Vec<u8> {
        let (r, d) = self.call(kind, flags, offset, length, data);
        assert_eq!(r.error(), 0, "{r:?}");
        d
    }

    fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

#[test]
fn negotiation_reports_export_and_multi_conn() {
    let f = Fixture::new();
    let mut c = Client::connect(&f.sock);
    c.opt(OPT_LIST, &[]);
    assert_eq!(
        c.opt_reply(),
        (OPT_LIST, REP_SERVER, b"\0\0\0\x03vol".to_vec())
    );
    assert_eq!(c.opt_reply().1, REP_ACK);
    c.structured_replies();
    let (size, flags) = c.go("vol").unwrap();
    assert_eq!(size, SIZE);
    for want in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_SEND_FAST_ZERO,
        TFLAG_CAN_MULTI_CONN,
    ] {
        assert_eq!(flags & want, want, "flag {want:#x} in {flags:#x}");
    }
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    c.send(CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.is_closed());
}

#[test]
fn unknown_option_and_unknown_export_keep_negotiating() {
    let f = Fixture::new();
    let mut c = Client::connect(&f.sock);
    c.opt(0xdead, b"whatever");
    let (o, t, _) = c.opt_reply();
    assert_eq!((o, t), (0xdead, REP_ERR_UNSUP));
    let (err, msg) = c.go("nosuch").unwrap_err();
    assert_eq!(err, REP_ERR_UNKNOWN);
    assert!(msg.contains("nosuch"), "{msg}");
    // The empty name is the default export.
    assert_eq!(c.go("").unwrap().0, SIZE);
}

#[test]
fn pipelined_writes_and_reads_round_trip() {
    let f = Fixture::new();
    let mut c = Client::open(&f.sock, "vol");
    const N: u64 = 48;
    const LEN: usize = 65536;
    // All writes in flight at once (written from another thread so the
    // socket buffers cannot deadlock us), replies matched by cookie.
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            let mut b = Request {
                flags: if i % 5 == 0 { CMD_FLAG_FUA } else { 0 },
                kind: CMD_WRITE,
                cookie: 1000 + i,
                offset: i * LEN as u64 * 2,
                length: LEN as u32,
            }
            .encode()
            .to_vec();
            b.extend_from_slice(&pattern(i, LEN));
            w.write_all(&b).unwrap();
        }
    });
    let mut seen = HashMap::new();
    for _ in 0..N {
        let (r, _) = c.reply();
        assert_eq!(r.error(), 0, "{r:?}");
        assert!(seen.insert(r.cookie(), ()).is_none());
    }
    writer.join().unwrap();
    assert_eq!(seen.len(), N as usize);

    for i in 0..N {
        c.send(CMD_READ, 0, 2000 + i, i * LEN as u64 * 2, LEN as u32, &[]);
    }
    let mut order = Vec::new();
    for _ in 0..N {
        let (r, data) = c.reply();
        let Reply::Chunk {
            kind, ref payload, ..
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
        let i = r.cookie() - 2000;
        assert_eq!(
            u64::from_be_bytes(payload[..8].try_into().unwrap()),
            i * LEN as u64 * 2
        );
        assert!(data == pattern(i, LEN), "data of request {i}");
        order.push(i);
    }
    order.sort();
    assert_eq!(order, (0..N).collect::<Vec<_>>());

    // Unwritten gaps read as zeros.
    let data = c.call_ok(CMD_READ, 0, LEN as u64, LEN as u32, &[]);
    assert!(data.iter().all(|&b| b == 0));
    c.call_ok(CMD_FLUSH, 0, 0, 0, &[]);
}

#[test]
fn bad_requests_get_errors_and_the_connection_lives() {
    let f = Fixture::new();
    let mut c = Client::open(&f.sock, "vol");
    // Out of range.
    let (r, _) = c.call(CMD_READ, 0, SIZE - 512, 4096, &[]);
    assert_eq!(r.error(), NBD_EINVAL, "{r:?}");
    let Reply::Chunk { kind, payload, .. } = r else {
        panic!()
    };
    assert_eq!(kind, REPLY_TYPE_ERROR);
    let msg_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    assert_eq!(payload.len(), 6 + msg_len);
    // Misaligned write (payload is consumed, connection stays in sync).
    let (r, _) = c.call(CMD_WRITE, 0, 100, 1000, &[1u8; 1000]);
    assert_eq!(r.error(), NBD_EINVAL);
    // Too big a read.
    let (r, _) = c.call(CMD_READ, 0, 0, (32 << 20) + 512, &[]);
    assert_eq!(r.error(), NBD_EINVAL);
    // Unknown flag, unsupported command.
    let (r, _) = c.call(CMD_READ, 0x4000, 0, 512, &[]);
    assert_eq!(r.error(), NBD_EINVAL);
    let (r, _) = c.call(CMD_CACHE, 0, 0, 512, &[]);
    assert_eq!(r.error(), NBD_EINVAL);
    // Still usable.
    c.call_ok(CMD_WRITE, CMD_FLAG_FUA, 4096, 512, &[9u8; 512]);
    let data = c.call_ok(CMD_READ, 0, 4096, 512, &[]);
    assert_eq!(data, vec![9u8; 512]);
    // A WRITE beyond the payload limit cannot be skipped: connection closed.
    c.send(CMD_WRITE, 0, 5, 0, (32 << 20) + 512, &[]);
    assert!(c.is_closed());
}

#[test]
fn bad_magic_closes_only_that_connection() {
    let f = Fixture::new();
    let mut a = Client::open(&f.sock, "vol");
    let mut b = Client::open(&f.sock, "vol");
    b.call_ok(CMD_WRITE, 0, 0, 512, &[5u8; 512]);
    a.s.write_all(&[0xffu8; 28]).unwrap();
    assert!(a.is_closed());
    let data = b.call_ok(CMD_READ, 0, 0, 512, &[]);
    assert_eq!(data, vec![5u8; 512]);
    // And new connections are still welcome.
    let mut c = Client::open(&f.sock, "vol");
    let data = c.call_ok(CMD_READ, 0, 0, 512, &[]);
    assert_eq!(data, vec![5u8; 512]);
}

#[test]
fn zeroes_trim_and_block_status() {
    let f = Fixture::new();
    let mut c = Client::open(&f.sock, "vol");
    let mib = 1u32 << 20;
    c.call_ok(CMD_WRITE, 0, 0, 2 * mib, &vec![0xabu8; 2 << 20]);

    let (r, _) = c.call(CMD_BLOCK_STATUS, 0, 0, 4 * mib, &[]);
    let Reply::Chunk { kind, payload, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(be32(&payload), META_BASE_ALLOCATION_ID);
    let descs: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|d| (be32(d), be32(&d[4..])))
        .collect();
    assert!(!descs.is_empty());
    assert_eq!(descs[0].1, 0, "written data first: {descs:?}");
    assert!(descs[0].0 >= 2 * mib, "{descs:?}");
    let total: u64 = descs.iter().map(|d| d.0 as u64).sum();
    assert!(total <= 4 << 20);
    let mut pos = 0u64;
    let mut saw_hole = false;
    for (len, flags) in &descs {
        if pos >= 2 << 20 && *flags == STATE_HOLE | STATE_ZERO {
            saw_hole = true;
        }
        pos += *len as u64;
    }
    assert!(saw_hole, "unwritten space is a hole: {descs:?}");

    // REQ_ONE: exactly one descriptor.
    let (r, _) = c.call(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4 * mib, &[]);
    let Reply::Chunk { payload, .. } = r else {
        panic!()
    };
    assert_eq!(payload.len(), 12);

    // WRITE_ZEROES (punching and NO_HOLE) and TRIM read back as zeros.
    c.call_ok(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 0, 65536, &[]);
    c.call_ok(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        65536,
        4096,
        &[],
    );
    c.call_ok(CMD_TRIM, 0, mib as u64, mib, &[]);
    let data = c.call_ok(CMD_READ, 0, 0, 2 * mib, &[]);
    assert!(data[..65536 + 4096].iter().all(|&b| b == 0));
    assert!(data[65536 + 4096..mib as usize].iter().all(|&b| b == 0xab));
    // TRIM content is unspecified by NBD; nothing to assert beyond success.
}

#[test]
fn simple_replies_without_structured_negotiation() {
    let f = Fixture::new();
    let mut c = Client::connect(&f.sock);
    let (_, flags) = c.go("vol").unwrap();
    assert_eq!(flags & TFLAG_SEND_DF, 0);
    let (r, _) = c.call(CMD_WRITE, 0, 8192, 4096, &[3u8; 4096]);
    assert!(matches!(r, Reply::Simple { error: 0, .. }));
    let (r, data) = c.call(CMD_READ, 0, 8192, 4096, &[]);
    assert!(matches!(r, Reply::Simple { error: 0, .. }));
    assert_eq!(data, vec![3u8; 4096]);
    // An error is a bare simple reply, no data follows.
    let (r, _) = c.call(CMD_READ, 0, SIZE, 4096, &[]);
    assert!(matches!(r, Reply::Simple { error: 22, .. }), "{r:?}");
    // No meta context: BLOCK_STATUS is invalid.
    let (r, _) = c.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]);
    assert!(matches!(r, Reply::Simple { error: 22, .. }), "{r:?}");
    let data = c.call_ok(CMD_READ, 0, 8192, 512, &[]);
    assert_eq!(data, vec![3u8; 512]);
}

#[test]
fn snapshot_exports_are_read_only() {
    let f = Fixture::new();
    let mut c = Client::open(&f.sock, "vol");
    c.call_ok(CMD_WRITE, CMD_FLAG_FUA, 0, 4096, &[1u8; 4096]);
    runtime::block_on(f.volume.create_snapshot("snap")).unwrap();
    c.call_ok(CMD_WRITE, 0, 0, 4096, &[2u8; 4096]);

    let mut s = Client::connect(&f.sock);
    s.structured_replies();
    let (size, flags) = s.go("vol@snap").unwrap();
    assert_eq!(size, SIZE);
    assert_eq!(flags & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
    assert_eq!(flags & TFLAG_SEND_TRIM, 0);
    let data = s.call_ok(CMD_READ, 0, 0, 4096, &[]);
    assert_eq!(data, vec![1u8; 4096]);
    let (r, _) = s.call(CMD_WRITE, 0, 0, 512, &[0u8; 512]);
    assert_eq!(r.error(), NBD_EPERM);
    let (r, _) = s.call(CMD_TRIM, 0, 0, 512, &[]);
    assert_eq!(r.error(), NBD_EPERM);
    s.call_ok(CMD_FLUSH, 0, 0, 0, &[]);
}

#[test]
fn shutdown_answers_requests_in_flight() {
    let f = Fixture::new();
    let mut c = Client::open(&f.sock, "vol");
    for i in 0..16u64 {
        c.send(CMD_WRITE, 0, i, i * 65536, 65536, &pattern(i, 65536));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    f.server.shutdown();
    // Every request read before shutdown is answered, then the server closes.
    for _ in 0..16 {
        let (r, _) = c.reply();
        assert_eq!(r.error(), 0);
    }
    assert!(c.is_closed());
    assert!(!f.sock.exists());
}

#[test]
fn a_panicking_connection_does_not_disturb_others() {
    let f = Fixture::new();
    let mut a = Client::open(&f.sock, "vol");
    let mut b = Client::connect(&f.sock);
    b.structured_replies();
    let mut p = 4u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"boom\0\0");
    b.opt(OPT_GO, &p);
    assert!(b.is_closed());
    a.call_ok(CMD_WRITE, 0, 0, 512, &[1u8; 512]);
    let mut c = Client::open(&f.sock, "vol");
    let data = c.call_ok(CMD_READ, 0, 0, 512, &[]);
    assert_eq!(data, vec![1u8; 512]);
}

#[test]
fn tcp_listener_and_stale_unix_socket() {
    let f = Fixture::new();
    let addr = f.server.listen_tcp("127.0.0.1:0").unwrap();
    let mut t = std::net::TcpStream::connect(addr).unwrap();
    let mut greeting = [0u8; 18];
    t.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    if have("nbdinfo") {
        let info = run(Command::new("nbdinfo").arg(format!("nbd://{addr}/vol")));
        assert!(info.contains(&format!("export-size: {SIZE}")), "{info}");
    }
    // A live socket is refused, a stale one replaced.
    let second = NbdServer::new(Arc::new(Resolver(f.volume.clone())));
    assert!(second.listen_unix(&f.sock).is_err());
    let stale = f.sock.with_file_name("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    second.listen_unix(&stale).unwrap();
    let mut c = Client::open(&stale, "vol");
    c.call_ok(CMD_FLUSH, 0, 0, 0, &[]);
    drop(c);
    second.shutdown();
    assert!(!stale.exists());
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn real_clients_nbdinfo_qemu_img_nbdcopy() {
    let f = Fixture::new();
    let mut c = Client::open(&f.sock, "vol");
    c.call_ok(CMD_WRITE, CMD_FLAG_FUA, 0, 1 << 20, &vec![0x5au8; 1 << 20]);
    drop(c);

    if have("nbdinfo") {
        let map = run(Command::new("nbdinfo").arg("--map").arg(f.uri("vol")));
        let first = map.lines().next().unwrap();
        let cols: Vec<&str> = first.split_whitespace().collect();
        assert_eq!(cols[0], "0", "{map}");
        assert_eq!(cols[2], "0", "first extent is data: {map}");
        assert!(map.contains("hole,zero"), "{map}");
        let info = run(Command::new("nbdinfo").arg(f.uri("vol")));
        assert!(info.contains("can_multi_conn: true"), "{info}");
        assert!(info.contains("can_fua: true"), "{info}");
        assert!(info.contains(&format!("export-size: {SIZE}")), "{info}");
        let list = run(Command::new("nbdinfo").arg("--list").arg(f.uri("")));
        assert!(
            list.contains("export=\"vol\"") || list.contains("vol"),
            "{list}"
        );
    } else {
        eprintln!("nbdinfo not installed: skipped");
    }
    if have("qemu-img") {
        let info = run(Command::new("qemu-img").arg("info").arg(f.uri("vol")));
        assert!(info.contains(&format!("({SIZE} bytes)")), "{info}");
    } else {
        eprintln!("qemu-img not installed: skipped");
    }
    if have("qemu-io") {
        let out = run(Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x33 2M 1M",
                "-c",
                "read -P 0x33 2M 1M",
                "-c",
                "read -P 0x5a 0 1M",
            ])
            .arg(f.uri("vol")));
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    if have("nbdcopy") {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let back = dir.path().join("back.img");
        let data: Vec<u8> = (0..SIZE as usize / 4096)
            .flat_map(|i| {
                if i % 3 == 0 {
                    vec![0u8; 4096]
                } else {
                    pattern(i as u64, 4096)
                }
            })
            .collect();
        std::fs::write(&src, &data).unwrap();
        run(Command::new("nbdcopy").arg(&src).arg(f.uri("vol")));
        run(Command::new("nbdcopy").arg(f.uri("vol")).arg(&back));
        assert!(std::fs::read(&back).unwrap() == data, "nbdcopy round trip");
    } else {
        eprintln!("nbdcopy not installed: skipped");
    }
}

/// Side-by-side throughput against nbdkit's file plugin (a ratio, not a
/// timed assertion): `cargo test --release --test nbd_wire -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_against_nbdkit() {
    if !have("qemu-img") || !have("nbdkit") {
        eprintln!("qemu-img or nbdkit missing: skipped");
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("plain.img");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    let nbdkit_sock = dir.path().join("nbdkit.sock");
    let mut nbdkit = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&nbdkit_sock)
        .arg("file")
        .arg(&img)
        .spawn()
        .unwrap();
    while !nbdkit_sock.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let nbdkit_uri = format!("nbd+unix:///?socket={}", nbdkit_sock.display());
    for (label, args) in [
        (
            "4k random writes, depth 32",
            vec!["-w", "-s", "4k", "-c", "40000", "-d", "32"],
        ),
        (
            "4k reads, depth 32",
            vec!["-s", "4k", "-c", "40000", "-d", "32"],
        ),
        (
            "1M writes, depth 8",
            vec!["-w", "-s", "1M", "-S", "1M", "-c", "600", "-d", "8"],
        ),
    ] {
        let mut times = Vec::new();
        for uri in [f.uri("vol"), nbdkit_uri.clone()] {
            let start = std::time::Instant::now();
            run(Command::new("qemu-img")
                .args(["bench", "-f", "raw"])
                .args(&args)
                .arg(&uri));
            times.push(start.elapsed().as_secs_f64());
        }
        eprintln!(
            "{label}: snapblk {:.2}s, nbdkit {:.2}s, ratio {:.2}",
            times[0],
            times[1],
            times[0] / times[1]
        );
    }
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
}

//! Seed inputs, made by the code that makes the real thing: the encoders
//! the daemon writes with, a volume's own journal and manifest, and NBD
//! sessions of real clients (nbdinfo, qemu-img, qemu-io) recorded through a
//! proxy in front of the fuzz server. `tests/fuzz_regressions.rs` checks
//! that every seed is accepted by its target and writes them into
//! `fuzz/corpus/` when asked.

use super::files::{template_files, MAP_SEGMENTS};
use super::nbd::server_socket;
use snapblk::control::protocol::{ControlError, Request, Response};
use snapblk::copy::progress::{Format, JobRecord, JobState, Moved, Policy, Since};
use snapblk::copy::stream::{footer, frame_head, frame_tail, zero_frame, Header};
use snapblk::copy::CopyStart;
use snapblk::frontend::nbd::proto::*;
use snapblk::replication::wire::{self, CpCommit, CpEntry, Kind};
use snapblk::replication::ReplicateStart;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

/// (target, seed name, input).
pub type Seed = (&'static str, String, Vec<u8>);

/// Every seed of every target. NBD sessions of real clients are included
/// when the clients are installed.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    seeds.extend(nbd());
    seeds.extend(control());
    seeds.push(("backup_stream", "two-blocks".into(), backup_stream(None)));
    seeds.push((
        "backup_stream",
        "incremental".into(),
        backup_stream(Some((2, 1_700_000_000_000))),
    ));
    seeds.extend(replication());
    let (journal, manifest) = template_files();
    seeds.push((
        "journal",
        "template".into(),
        [&[1u8][..], &journal].concat(),
    ));
    seeds.push(("manifest", "template".into(), manifest));
    seeds.push(("job_record", "running".into(), job_record()));
    seeds
}

fn control() -> Vec<Seed> {
    let requests = [
        Request::VolumeCreate {
            name: "vol".into(),
            size: 1 << 30,
            chunk_size: Some(65536),
            partitions: Some(4),
            backing: None,
            cache: None,
            ceph: None,
        },
        Request::SnapshotCreate {
            quiesce: None,
            volume: "vol".into(),
            name: "s1".into(),
        },
        Request::DeviceStart {
            volume: "vol".into(),
            snapshot: Some("s1".into()),
            queues: Some(2),
            depth: Some(64),
            recovery: Some(true),
            zero_copy: Some(false),
        },
        Request::CopyStart(CopyStart {
            volume: "vol".into(),
            snapshot: None,
            target: "/backup/vol.img".into(),
            policy: Some(Policy::Hold),
            block_size: Some(1 << 20),
            rate: None,
            format: Some(Format::Stream),
            verify: false,
            hold_timeout_ms: Some(10_000),
            since: Some("s1".into()),
        }),
        Request::ReplicateStart(ReplicateStart {
            volume: "vol".into(),
            group: None,
            to: "127.0.0.1:10810/vol".into(),
            cp_interval_ms: Some(1000),
            key_file: None,
            keep_cps: Some(2),
            max_log_bytes: None,
            block_size: Some(4096),
            resync: true,
        }),
        Request::CopyStatus { id: None },
    ];
    let mut seeds: Vec<Seed> = requests
        .iter()
        .map(|r| {
            let line = serde_json::to_vec(r).expect("requests serialize");
            ("control_protocol", r.op().replace('.', "-"), line)
        })
        .collect();
    let failed = Response::from_result(Err(ControlError::not_found("volume x not found")));
    seeds.push((
        "control_protocol",
        "response".into(),
        failed.to_line().into_bytes(),
    ));
    seeds
}

/// A full stream, or with `base` an incremental one (with a ZERO frame).
fn backup_stream(base: Option<(u64, u64)>) -> Vec<u8> {
    let header = Header {
        volume_size: 1 << 20,
        chunk_size: 4096,
        block_size: 4096,
        generation: 3,
        source: "vol@s3".into(),
        volume: "vol".into(),
        stamp: 1_700_000_000_500,
        base,
    };
    let mut s = header.encode();
    for (offset, byte) in [(4096u64, 7u8), (0, 9)] {
        let data = vec![byte; 4096];
        let head = frame_head(offset, data.len() as u32);
        s.extend_from_slice(&head);
        s.extend_from_slice(&data);
        s.extend_from_slice(&frame_tail(&head, &data));
    }
    let mut blocks = 2;
    if base.is_some() {
        s.extend_from_slice(&zero_frame(8192, 8192));
        blocks += 1;
    }
    let whole = crc32c::crc32c(&s);
    s.extend_from_slice(&footer(blocks, whole));
    [&[1u8][..], &s].concat()
}

fn replication() -> Vec<Seed> {
    let hello = [&wire::VERSION.to_le_bytes()[..], &[7; wire::NONCE]].concat();
    let open = wire::Open {
        source_id: "host-a".into(),
        source_volume: "vol".into(),
        dest_volume: "vol-replica".into(),
        size: 1 << 20,
        chunk_size: 65536,
        block_size: 4096,
        keep_cps: 1,
        resync: Some(wire::ResyncBase {
            cp: 3,
            source_id: "host-b".into(),
            source_volume: "vol-replica".into(),
            replica_id: "r-1".into(),
        }),
    };
    let opened = wire::Opened {
        last_applied_cp: Some(3),
        next_tid: 9,
        replica_id: "r-1".into(),
        resync_changed: vec![(0, 65536)],
    };
    // Small: the frames are read as plain frames, at most wire::PRE_AUTH_MAX bytes.
    let data = vec![5u8; 512];
    let cp = CpCommit {
        cp: 4,
        keep_from_tid: 9,
        block_size: 4096,
        entries: vec![
            CpEntry::Ref {
                block: 2,
                count: 2,
                tid: 9,
                index: 0,
            },
            CpEntry::Zero { block: 8, count: 4 },
        ],
    };
    let session = [
        (Kind::Hello, hello.clone()),
        (Kind::Open, wire::to_json(&open)),
        (Kind::Opened, wire::to_json(&opened)),
        (Kind::Transfer, wire::encode_transfer(9, &[(8192, &data)])),
        (Kind::TransferAck, wire::u64_payload(9).to_vec()),
        (Kind::CpCommit, wire::encode_cp(&cp)),
        (Kind::CpAck, wire::u64_payload(4).to_vec()),
    ];
    let frames = |frames: &[(Kind, Vec<u8>)]| {
        let mut b = vec![1u8];
        for (kind, payload) in frames {
            b.extend_from_slice(&wire::encode_frame(*kind, payload));
        }
        b
    };
    vec![
        ("replication_wire", "session".into(), frames(&session)),
        (
            "replication_wire",
            "handshake".into(),
            frames(&[(Kind::Hello, hello), (Kind::Proof, vec![0; 32])]),
        ),
    ]
}

fn job_record() -> Vec<u8> {
    let record = JobRecord {
        id: 1,
        volume: "vol".into(),
        snapshot: None,
        internal_snapshot: Some(".copy-1".into()),
        target: "/backup/vol.img".into(),
        policy: Policy::Cow,
        format: Format::Raw,
        block_size: 65536,
        rate: None,
        verify: true,
        size: MAP_SEGMENTS * 65536,
        chunk_size: 65536,
        generation: 2,
        created_unix_ms: 1_700_000_000_000,
        state: JobState::Running,
        error: None,
        bytes_done: 0,
        moved: Moved::default(),
        hold_timeout_ms: 10_000,
        target_real: Some("/backup/vol.img".into()),
        target_id: Some((2049, 12)),
        since: Some(Since {
            snapshot: "s1".into(),
            generation: 1,
            stamp: 1_699_999_999_000,
        }),
        stamp: 1_700_000_000_000,
    };
    serde_json::to_vec_pretty(&record).expect("records serialize")
}

/// Records what clients send through a UNIX socket proxy in front of the
/// fuzz NBD server: one entry per connection.
struct Recorder {
    listener: UnixListener,
    sessions: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Recorder {
    fn new(path: &Path) -> Recorder {
        Recorder {
            listener: UnixListener::bind(path).expect("the recording proxy listens"),
            sessions: Arc::default(),
        }
    }

    /// Serves connections until `client` returns.
    fn run(&self, client: impl FnOnce()) {
        let listener = self.listener.try_clone().expect("a listener handle");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| loop {
                match listener.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false).expect("a blocking connection");
                        let sessions = self.sessions.clone();
                        scope.spawn(move || sessions.lock().unwrap().push(relay(c)));
                    }
                    Err(_) if done.load(std::sync::atomic::Ordering::Acquire) => return,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            });
            client();
            done.store(true, std::sync::atomic::Ordering::Release);
        });
    }
}

/// Relays one client connection to the server; returns what the client sent.
fn relay(mut client: UnixStream) -> Vec<u8> {
    let mut server = UnixStream::connect(server_socket()).expect("the fuzz server accepts");
    let (mut server_out, mut client_in) = (
        server.try_clone().expect("a server handle"),
        client.try_clone().expect("a client handle"),
    );
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut server_out, &mut client_in);
        let _ = client_in.shutdown(Shutdown::Write);
    });
    let mut sent = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n @ 1..) = client.read(&mut buf) {
        sent.extend_from_slice(&buf[..n]);
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
    let _ = back.join();
    sent
}

/// Splits a recorded session at the end of its NBD_OPT_GO: the
/// transmission target's mode byte (as negotiated) and the requests after.
fn transmission_part(session: &[u8]) -> Option<Vec<u8>> {
    let mut at = 4;
    let mut mode = 0u8;
    loop {
        let option = u32::from_be_bytes(session.get(at + 8..at + 12)?.try_into().ok()?);
        let len = u32::from_be_bytes(session.get(at + 12..at + 16)?.try_into().ok()?) as usize;
        let data = session.get(at + 16..at + 16 + len)?;
        at += 16 + len;
        match option {
            OPT_STRUCTURED_REPLY => mode |= 1,
            OPT_SET_META_CONTEXT => mode |= 4,
            OPT_GO => {
                let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
                if data.get(4..4 + name_len)? == b"vol@snap" {
                    mode |= 2;
                }
                return Some([&[mode][..], &session[at..]].concat());
            }
            _ => {}
        }
    }
}

fn nbd() -> Vec<Seed> {
    let mut seeds = Vec::new();
    // The fixed handshake qemu's oldest clients use: NBD_OPT_EXPORT_NAME.
    let mut export_name = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    export_name.extend_from_slice(&IHAVEOPT.to_be_bytes());
    export_name.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    export_name.extend_from_slice(&3u32.to_be_bytes());
    export_name.extend_from_slice(b"vol");
    seeds.push(("nbd_handshake", "export-name".into(), export_name));
    seeds.push(("nbd_transmission", "every-command".into(), every_command()));

    let dir = tempfile::tempdir().expect("a temporary directory");
    let sock = dir.path().join("proxy.sock");
    let uri = |export: &str| format!("nbd+unix:///{export}?socket={}", sock.display());
    let clients: [(&str, &str, Vec<String>); 5] = [
        ("nbdinfo-list", "nbdinfo", vec!["--list".into(), uri("")]),
        ("nbdinfo-map", "nbdinfo", vec!["--map".into(), uri("vol")]),
        ("qemu-img-info", "qemu-img", vec!["info".into(), uri("vol")]),
        (
            "qemu-io-rw",
            "qemu-io",
            [
                "-f",
                "raw",
                "-c",
                "write -P 0x17 0 4k",
                "-c",
                "read -P 0x17 0 4k",
                "-c",
                "discard 64k 64k",
                "-c",
                "write -z 128k 4k",
                "-c",
                "flush",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([uri("vol")])
            .collect(),
        ),
        (
            "qemu-io-snapshot",
            "qemu-io",
            ["-r", "-f", "raw", "-c", "read 0 4k"]
                .iter()
                .map(|s| s.to_string())
                .chain([uri("vol@snap")])
                .collect(),
        ),
    ];
    for (name, program, args) in clients {
        let recorder = Recorder::new(&sock);
        let mut ran = false;
        recorder.run(|| {
            ran = Command::new(program)
                .args(&args)
                .output()
                .is_ok_and(|o| o.status.success());
        });
        std::fs::remove_file(&sock).expect("the proxy socket is removed");
        if !ran {
            eprintln!("seeds: {program} is missing or failed; no {name} seed");
            continue;
        }
        let sessions = recorder.sessions.lock().unwrap().clone();
        for (i, session) in sessions.into_iter().enumerate() {
            if let Some(t) = transmission_part(&session).filter(|t| t.len() > 1) {
                seeds.push(("nbd_transmission", format!("{name}-{i}"), t));
            }
            seeds.push(("nbd_handshake", format!("{name}-{i}"), session));
        }
    }
    seeds
}

/// One request of every command, with structured replies and
/// base:allocation negotiated.
fn every_command() -> Vec<u8> {
    let mut b = vec![0b101u8];
    let requests = [
        (CMD_WRITE, CMD_FLAG_FUA, 0, 4096),
        (CMD_READ, 0, 0, 8192),
        (CMD_FLUSH, 0, 0, 0),
        (CMD_TRIM, 0, 65536, 65536),
        (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 131072, 4096),
        (CMD_BLOCK_STATUS, 0, 0, 262144),
    ];
    for (cookie, (kind, flags, offset, length)) in requests.into_iter().enumerate() {
        let r = snapblk::frontend::nbd::proto::Request {
            flags,
            kind,
            cookie: cookie as u64 + 1,
            offset,
            length,
        };
        b.extend_from_slice(&r.encode());
        if kind == CMD_WRITE {
            b.extend(std::iter::repeat_n(0x3c, length as usize));
        }
    }
    b
}

//! Hostile NBD clients against a real daemon over real sockets: garbage and
//! truncated handshakes, an oversize option, clients that trickle or go
//! silent while negotiating, a client that sends READs and never reads its
//! replies, idle connections, and one client opening connection after
//! connection. For each, the daemon stays up with bounded memory (VmRSS and
//! VmHWM from /proc) and a second, normal client (qemu-io) keeps writing and
//! reading verified data, with nothing written earlier lost.

mod common;

use common::*;
use snapblk::frontend::nbd::proto::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// Only a guard against hanging forever; no test relies on its length.
const SAFETY: Duration = Duration::from_secs(120);

/// A daemon with `extra` options and a 64 MiB volume `vol`.
fn daemon(extra: &[&str]) -> (tempfile::TempDir, Daemon) {
    let (t, dir) = tempdir();
    let d = Daemon::start_with(&dir, &dir, extra, &[]);
    d.ok(&["volume", "create", "vol", "--size", "64M"]);
    (t, d)
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The normal client: writes MiB number `round` with its own pattern, reads
/// it back, and checks every earlier round's MiB still holds its pattern.
fn normal_client(d: &mut Daemon, uri: &str, round: u64) {
    assert!(d.alive(), "daemon died; log:\n{}", d.log());
    let pattern = |r: u64| 0x11 + r * 7 % 200;
    let mut cmds = vec![
        format!("write -P {} {} 1M", pattern(round), round * MIB),
        format!("read -P {} {} 1M", pattern(round), round * MIB),
    ];
    cmds.extend((0..round).map(|r| format!("read -P {} {} 1M", pattern(r), r * MIB)));
    qemu_io_ok(uri, false, &cmds);
}

/// Reads the server's greeting; panics if there is none.
fn greeting(s: &mut impl Read) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("no NBD greeting");
    assert_eq!(u64::from_be_bytes(g[..8].try_into().unwrap()), NBD_MAGIC);
}

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Client flags and NBD_OPT_GO for `export`, as one buffer.
fn go_bytes(export: &str) -> Vec<u8> {
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut v = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    v.extend(option(OPT_GO, &data));
    v
}

/// Negotiates `export` (simple replies) on a fresh connection.
fn negotiate<S: Read + Write>(s: &mut S, export: &str) {
    greeting(s);
    s.write_all(&go_bytes(export)).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut skip = vec![0u8; len as usize];
        s.read_exact(&mut skip).unwrap();
        if kind == REP_ACK {
            return;
        }
        assert_eq!(kind, REP_INFO, "unexpected option reply {kind:#x}");
    }
}

fn read_request(cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..].copy_from_slice(&len.to_be_bytes());
    r
}

/// True once the server closed the connection (end of stream or reset),
/// discarding whatever it sent before; false if it stayed open for
/// [`SAFETY`].
fn closed_by_server(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(SAFETY)).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                return false
            }
            Err(e) => panic!("reading: {e}"),
        }
    }
}

#[test]
fn a_client_that_never_reads_its_replies_cannot_grow_memory() {
    if skip_without(
        "a_client_that_never_reads_its_replies_cannot_grow_memory",
        &["qemu-io"],
    ) {
        return;
    }
    let (_t, mut d) = daemon(&[]);
    let uri = d.uri("vol");
    normal_client(&mut d, &uri, 0);
    let pid = d.pid();
    let base_kib = status_kib(pid, "VmRSS");

    // 20,000 READs of 32 MiB (625 GiB of replies) from 560 KB of headers.
    const REQUESTS: usize = 20_000;
    let mut s = UnixStream::connect(d.nbd_sock()).unwrap();
    negotiate(&mut s, "vol");
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let mut s = s.try_clone().unwrap();
        let sent = sent.clone();
        std::thread::spawn(move || {
            for i in 0..REQUESTS {
                if s.write_all(&read_request(i as u64, 0, MAX_PAYLOAD))
                    .is_err()
                {
                    return;
                }
                sent.store(i + 1, Ordering::Relaxed);
            }
        })
    };
    // Wait until the daemon stops taking requests (the sender is blocked
    // on a full socket), watching its memory meanwhile.
    let limit_kib = base_kib + 400 * 1024;
    let mut still = 0;
    let mut last = 0;
    for _ in 0..(SAFETY.as_millis() / 50) {
        std::thread::sleep(Duration::from_millis(50));
        let rss = status_kib(pid, "VmRSS");
        assert!(
            rss < limit_kib,
            "daemon RSS grew from {base_kib} to {rss} KiB on unread replies; log:\n{}",
            d.log()
        );
        let now = sent.load(Ordering::Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still >= 40 || now == REQUESTS {
            break;
        }
    }
    assert!(
        last < REQUESTS,
        "the daemon took all {REQUESTS} READs although none of the replies was read"
    );
    // Others are served meanwhile, and memory stays bounded.
    for round in 1..=3 {
        normal_client(&mut d, &uri, round);
    }
    let hwm = status_kib(pid, "VmHWM");
    assert!(
        hwm < limit_kib,
        "daemon peak RSS {hwm} KiB (started at {base_kib} KiB); log:\n{}",
        d.log()
    );
    s.shutdown(std::net::Shutdown::Both).unwrap();
    sender.join().unwrap();
    normal_client(&mut d, &uri, 4);
}

#[test]
fn bad_slow_and_silent_handshakes_are_cut_off() {
    if skip_without("bad_slow_and_silent_handshakes_are_cut_off", &["qemu-io"]) {
        return;
    }
    let (_t, mut d) = daemon(&["--nbd-handshake-limit", "2"]);
    let uri = d.uri("vol");
    let sock = d.nbd_sock();
    let connect = || {
        let mut s = UnixStream::connect(&sock).unwrap();
        greeting(&mut s);
        s
    };
    normal_client(&mut d, &uri, 0);

    // Garbage instead of client flags.
    let mut s = connect();
    s.write_all(&[0xa5; 4096]).unwrap();
    assert!(closed_by_server(&mut s), "garbage: connection left open");
    normal_client(&mut d, &uri, 1);

    // A valid option header announcing 4 GiB - 16 bytes.
    let mut s = connect();
    let mut huge = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    huge.extend_from_slice(&IHAVEOPT.to_be_bytes());
    huge.extend_from_slice(&OPT_GO.to_be_bytes());
    huge.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    s.write_all(&huge).unwrap();
    assert!(
        closed_by_server(&mut s),
        "oversize option: connection left open"
    );
    normal_client(&mut d, &uri, 2);

    // A truncated option (header says 100 bytes, 10 come), then silence.
    let mut s = connect();
    let mut cut = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    cut.extend_from_slice(&option(OPT_GO, &[0u8; 100])[..16 + 10]);
    s.write_all(&cut).unwrap();
    // Silence right after connecting, too.
    let mut silent = connect();
    assert!(closed_by_server(&mut s), "truncated option: left open");
    assert!(closed_by_server(&mut silent), "silent client: left open");
    normal_client(&mut d, &uri, 3);

    // A client trickling a valid negotiation one byte at a time: cut off
    // by the whole-handshake limit although every byte arrives well within
    // any per-read timeout.
    let mut s = connect();
    let bytes = go_bytes("vol");
    let mut trickled = 0;
    for b in &bytes {
        std::thread::sleep(Duration::from_millis(300));
        if s.write_all(std::slice::from_ref(b)).is_err() {
            break;
        }
        trickled += 1;
    }
    assert!(
        trickled < bytes.len() || closed_by_server(&mut s),
        "a trickled negotiation ran past the handshake limit"
    );
    assert!(
        trickled < bytes.len(),
        "all {trickled} bytes were taken over 2 s"
    );
    assert!(d.log_shows("did not finish negotiating"), "{}", d.log());
    normal_client(&mut d, &uri, 4);
}

#[test]
fn idle_connections_are_closed_when_asked() {
    if skip_without("idle_connections_are_closed_when_asked", &["qemu-io"]) {
        return;
    }
    let (_t, mut d) = daemon(&["--nbd-idle-timeout", "1"]);
    let uri = d.uri("vol");
    normal_client(&mut d, &uri, 0);
    let pid = d.pid();
    let base_kib = status_kib(pid, "VmRSS");

    // Negotiated, then nothing.
    let mut idle = UnixStream::connect(d.nbd_sock()).unwrap();
    negotiate(&mut idle, "vol");
    // Sends READs and never reads: its replies stop moving, so it is idle
    // too, and closing it frees what its replies held.
    let mut deaf = UnixStream::connect(d.nbd_sock()).unwrap();
    negotiate(&mut deaf, "vol");
    for i in 0..64 {
        deaf.write_all(&read_request(i, 0, MAX_PAYLOAD)).unwrap();
    }
    assert!(closed_by_server(&mut idle), "idle connection left open");
    // The deaf client's replies were queued; reading them now ends in EOF.
    assert!(closed_by_server(&mut deaf), "a client not reading was kept");
    assert!(d.log_shows("idle for"), "{}", d.log());
    // Active clients are not idle, however long they live.
    normal_client(&mut d, &uri, 1);
    let rss = status_kib(pid, "VmRSS");
    assert!(
        rss < base_kib + 400 * 1024,
        "RSS {rss} KiB after the deaf client left (was {base_kib})"
    );
}

/// The bound TCP address of a daemon started with `--nbd-listen 127.0.0.1:0`.
fn tcp_addr(d: &Daemon) -> SocketAddr {
    d.json(&["status"])["nbd_tcp"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// A TCP connection from source address `from`.
fn tcp_from(from: &str, to: SocketAddr) -> TcpStream {
    // std cannot bind a TCP socket before connecting it.
    // SAFETY: plain socket syscalls on a descriptor we own until wrapped.
    unsafe {
        use std::os::fd::FromRawFd;
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sin(from.parse().unwrap(), 0);
        assert_eq!(
            libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len),
            0
        );
        let SocketAddr::V4(to) = to else {
            panic!("IPv4 expected")
        };
        let remote = sin(*to.ip(), to.port());
        assert_eq!(
            libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len),
            0,
            "connect: {}",
            std::io::Error::last_os_error()
        );
        TcpStream::from_raw_fd(fd)
    }
}

/// True if the server closed `s` without a greeting (refused).
fn refused(s: &mut impl Read) -> bool {
    let mut g = [0u8; 18];
    match s.read(&mut g) {
        Ok(0) => true,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Ok(_) => false,
        Err(e) => panic!("reading a greeting: {e}"),
    }
}

#[test]
fn connections_per_client_are_bounded_and_tcp_has_keepalive() {
    if skip_without(
        "connections_per_client_are_bounded_and_tcp_has_keepalive",
        &["qemu-io", "ss"],
    ) {
        return;
    }
    let (_t, mut d) = daemon(&[
        "--nbd-client-connections",
        "4",
        "--nbd-listen",
        "127.0.0.1:0",
    ]);
    let addr = tcp_addr(&d);
    let tcp_uri = format!("nbd://127.0.0.1:{}/vol", addr.port());
    let unix_uri = d.uri("vol");

    // One TCP peer (127.0.0.2) takes its 4 connections; the 5th is refused;
    // another peer (127.0.0.1) is served.
    let mut held: Vec<TcpStream> = (0..4).map(|_| tcp_from("127.0.0.2", addr)).collect();
    for s in &mut held {
        greeting(s);
    }
    let mut fifth = tcp_from("127.0.0.2", addr);
    fifth.set_read_timeout(Some(SAFETY)).unwrap();
    assert!(
        refused(&mut fifth),
        "a 5th connection from one peer was served"
    );
    normal_client(&mut d, &tcp_uri, 0);

    // The server side of each TCP connection probes with keepalive.
    let ss = run_ok(Command::new("ss").args([
        "-tnoH",
        "state",
        "established",
        &format!("( sport = :{} )", addr.port()),
    ]));
    let conns: Vec<&str> = ss.lines().filter(|l| l.contains("127.0.0.2")).collect();
    assert_eq!(conns.len(), 4, "{ss}");
    assert!(
        conns.iter().all(|l| l.contains("keepalive")),
        "no keepalive timer:\n{ss}"
    );

    // On the UNIX socket, one uid is one client: with 4 raw connections of
    // ours open, qemu-io (same uid) is refused; TCP still serves.
    let mut unix: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(d.nbd_sock()).unwrap())
        .collect();
    for s in &mut unix {
        greeting(s);
    }
    let (ok, text) = qemu_io(&unix_uri, false, &["read 0 4k"]);
    assert!(
        !ok || text.contains("failed"),
        "a 5th UNIX connection served: {text}"
    );
    drop(held);
    normal_client(&mut d, &tcp_uri, 1);
    drop(unix);
    // Closed connections no longer count.
    let mut served = false;
    for _ in 0..(SAFETY.as_millis() / 50) {
        let (ok, text) = qemu_io(&unix_uri, false, &["read -P 0x11 0 1M"]);
        if qemu_io_clean(ok, &text) {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served, "the UNIX client stayed refused; log:\n{}", d.log());
    normal_client(&mut d, &unix_uri, 2);
    assert!(d.log_shows("per-client limit"), "{}", d.log());
}

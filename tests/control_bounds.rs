//! The control socket's bounds against real clients: descriptors passed
//! (SCM_RIGHTS) on a refused connection are closed at once, a permitted
//! connection keeps only a few, and client threads are bounded, with other
//! users unable to crowd out root. Each passed descriptor is a pipe's write
//! end: the pipe's read end sees end of file exactly when the daemon closed
//! its copy.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

/// Python without libnbd is enough here; tests run as root and the script
/// drops to `nobody` itself when asked.
const PY: &str = "/usr/bin/python3";

const HELPERS: &str = r#"
import os, select, socket, sys

def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(path)
    return s

def read_line(s):
    b = b""
    while not b.endswith(b"\n"):
        try:
            c = s.recv(4096)
        except ConnectionResetError:
            c = b""
        if not c:
            return None
        b += c
    return b.decode()

def closed_elsewhere(r):
    # True when every write end of the pipe is closed (EOF), False if one is
    # still open somewhere (nothing to read yet).
    os.set_blocking(r, False)
    try:
        return os.read(r, 1) == b""
    except BlockingIOError:
        return False

def ask(s):
    # A connection turned away may be closed before the request goes out;
    # its one `busy` line is still there to read.
    try:
        s.sendall(b'{"op":"daemon.status"}\n')
    except BrokenPipeError:
        pass
    return read_line(s)

def send_with_pipes(s, n):
    # One request line carrying the write ends of n fresh pipes; returns the read ends.
    pipes = [os.pipe() for _ in range(n)]
    socket.send_fds(s, [b'{"op":"daemon.status"}\n'], [w for _, w in pipes])
    for _, w in pipes:
        os.close(w)
    return [r for r, _ in pipes]
"#;

fn py(d: &Daemon, script: &str, nobody: bool) -> String {
    let drop = if nobody {
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    } else {
        ""
    };
    let src = format!("{HELPERS}\n{drop}path = sys.argv[1]\n{script}\nprint('PASS')\n");
    let out = run_ok(Command::new(PY).arg("-c").arg(src).arg(d.control()));
    assert!(out.lines().any(|l| l == "PASS"), "{out}");
    out
}

/// A daemon whose control socket `nobody` can reach (it is refused by
/// credentials, not by file permissions).
fn daemon() -> (tempfile::TempDir, Daemon) {
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.control(), std::fs::Permissions::from_mode(0o666)).unwrap();
    (t, d)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn threads(pid: u32) -> usize {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn descriptors_passed_on_a_refused_connection_are_closed_at_once() {
    let (_t, mut d) = daemon();
    let fds_before = open_fds(d.pid());
    py(
        &d,
        r#"
s = connect(path)
for round in range(20):
    reads = send_with_pipes(s, 8)
    line = read_line(s)
    assert line and "permission_denied" in line, line
    # The connection is still open, and the daemon holds none of them.
    assert all(closed_elsewhere(r) for r in reads), "the daemon kept a refused peer's descriptor"
    for r in reads:
        os.close(r)
"#,
        true,
    );
    assert!(d.alive());
    assert!(open_fds(d.pid()) <= fds_before + 2, "descriptors leaked");
    d.ok(&["status"]);
}

#[test]
fn a_permitted_connection_keeps_only_a_few_passed_descriptors() {
    let (_t, d) = daemon();
    let pid = d.pid();
    let fds_before = open_fds(pid);
    let script = format!(
        r#"
s = connect(path)
reads = []
for round in range(25):
    reads += send_with_pipes(s, 4)
    line = read_line(s)
    assert line and '"ok":true' in line.replace(" ", ""), line
held = sum(not closed_elsewhere(r) for r in reads)
assert held <= 4, "the daemon holds %d of 100 passed descriptors" % held
fds = len(os.listdir("/proc/{pid}/fd"))
assert fds <= {fds_before} + 4 + 2, "daemon has %d descriptors open (had {fds_before})" % fds
s.close()
"#
    );
    py(&d, &script, false);
    d.ok(&["status"]);
}

#[test]
fn control_client_threads_are_bounded() {
    let (_t, d) = daemon();
    let pid = d.pid();
    let base = threads(pid);
    // Other users: 30 connections, held open while root is served.
    let script = format!(
        r#"
held = [connect(path) for _ in range(30)]
answers = [ask(s) for s in held]
busy = sum(1 for a in answers if a and "busy" in a)
denied = sum(1 for a in answers if a and "permission_denied" in a)
assert busy == 30 - {refused} and denied == {refused}, (busy, denied)
threads = int([l for l in open("/proc/{pid}/status") if l.startswith("Threads:")][0].split()[1])
assert threads <= {base} + {refused} + 2, "daemon runs %d threads (had {base})" % threads
print("HELD", flush=True)
sys.stdin.read()
"#,
        refused = snapblk::control::server::MAX_REFUSED,
    );
    let mut nobody = Command::new(PY)
        .arg("-c")
        .arg(format!(
            "{HELPERS}\nos.setgroups([]); os.setgid(65534); os.setuid(65534)\npath = sys.argv[1]\n{script}"
        ))
        .arg(d.control())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(nobody.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "HELD", "the script failed");
    d.ok(&["status"]);
    drop(nobody.stdin.take());
    assert!(nobody.wait().unwrap().success());

    // Root: the first MAX_CLIENTS are served, the rest turned away.
    let max = snapblk::control::server::MAX_CLIENTS;
    let script = format!(
        r#"
held = [connect(path) for _ in range({max} + 20)]
answers = [ask(s) for s in held]
ok = sum(1 for a in answers if a and '"ok":true' in a.replace(" ", ""))
busy = sum(1 for a in answers if a and "busy" in a)
assert ok == {max} and busy == 20, (ok, busy)
threads = int([l for l in open("/proc/{pid}/status") if l.startswith("Threads:")][0].split()[1])
assert threads <= {base} + {max} + 2, "daemon runs %d threads (had {base})" % threads
for s in held:
    s.close()
"#
    );
    py(&d, &script, false);
    // Closed connections free their slots.
    let mut served = false;
    for _ in 0..2400 {
        if d.cli(&["status"]).status.success() {
            served = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(served, "the control socket stayed busy; log:\n{}", d.log());
}

//! Shared helpers for end-to-end tests that drive the real `snapblk` binary
//! with real NBD clients (`tests/clients.rs`).
//!
//! A [`Daemon`] runs on a temporary data directory and serves NBD only on a
//! UNIX socket inside it, so tests run in parallel without ports.

#![allow(dead_code)]

#[cfg(feature = "ceph")]
pub mod ceph;

use serde_json::Value;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_snapblk");

pub struct Daemon {
    pub dir: PathBuf,
    control: PathBuf,
    nbd: PathBuf,
    log: PathBuf,
    /// The `snapblk` arguments it was started with (for restarts).
    args: Vec<OsString>,
    /// Extra environment for every (re)start.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon on `dir` (created if missing) with its control
    /// socket, NBD socket and log beside it, and waits until both sockets
    /// accept connections.
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_at(dir, dir)
    }

    /// Like [`Daemon::start`], with the sockets and the log at `at` plus
    /// `.control.sock`, `.nbd.sock`, `.log` (e.g. off a small file system
    /// that holds only the data).
    pub fn start_at(dir: &Path, at: &Path) -> Daemon {
        Daemon::start_with(dir, at, &[], &[])
    }

    /// Like [`Daemon::start_at`], with `extra` daemon arguments and `env`.
    pub fn start_with(dir: &Path, at: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let control = at.with_extension("control.sock");
        let nbd = at.with_extension("nbd.sock");
        let args = vec![
            "daemon".into(),
            "--data-dir".into(),
            dir.into(),
            "--control".into(),
            control.clone().into(),
            "--nbd-socket".into(),
            nbd.clone().into(),
        ];
        let mut d = Daemon {
            dir: dir.to_path_buf(),
            control,
            nbd,
            log: at.with_extension("log"),
            args: args
                .into_iter()
                .chain(extra.iter().map(|a| a.into()))
                .collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        d.launch();
        d
    }

    /// Starts a daemon on `dir` with its default control socket
    /// (`DIR/control.sock`, no `--control`) and NBD on `DIR/nbd.sock`.
    pub fn start_in_data_dir(dir: &Path) -> Daemon {
        let mut d = Daemon::in_data_dir(dir);
        d.args = vec![
            "daemon".into(),
            "--data-dir".into(),
            dir.into(),
            "--nbd-socket".into(),
            d.nbd.clone().into(),
        ];
        d.launch();
        d
    }

    /// A daemon not started yet that will use the sockets inside `dir`
    /// (`control.sock`, `nbd.sock`); start it elsewhere and [`Daemon::adopt`] it.
    pub fn in_data_dir(dir: &Path) -> Daemon {
        Daemon {
            dir: dir.to_path_buf(),
            control: dir.join("control.sock"),
            nbd: dir.join("nbd.sock"),
            log: dir.with_extension("log"),
            args: Vec::new(),
            env: Vec::new(),
            child: None,
        }
    }

    /// Takes over a daemon process started by the caller: it is killed on
    /// drop like one started here.
    pub fn adopt(&mut self, child: Child) {
        assert!(self.child.is_none(), "a daemon already runs");
        self.child = Some(child);
    }

    /// Spawns `snapblk ARGS` (logging to the log file) and waits until it
    /// is ready.
    fn launch(&mut self) {
        assert!(
            !self.args.is_empty(),
            "not started here: cannot start again"
        );
        let mut cmd = Command::new(BIN);
        cmd.args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.spawn(cmd);
    }

    /// Spawns `cmd` (a daemon command line for this data directory) with
    /// its stderr appended to the log and no `SNAPBLK_CONTROL`, adopts it
    /// and waits until it is ready.
    pub fn spawn(&mut self, mut cmd: Command) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = cmd
            .env_remove("SNAPBLK_CONTROL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.adopt(child);
        self.wait_ready();
    }

    pub fn control(&self) -> PathBuf {
        self.control.clone()
    }

    pub fn nbd_sock(&self) -> PathBuf {
        self.nbd.clone()
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_sock().display())
    }

    /// Waits until the control socket and the NBD socket accept
    /// connections; panics (with the log) if the daemon exits first.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if UnixStream::connect(&self.control).is_ok() && UnixStream::connect(&self.nbd).is_ok()
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the log shows `needle`, waiting a while for it: a refused
    /// client may see the connection close before the daemon has logged
    /// why. The wait is a bound for a line that should come, not a measure.
    pub fn log_shows(&self, needle: &str) -> bool {
        for _ in 0..500 {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// True while the daemon process runs.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Sends `sig` and waits for the process to end.
    pub fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "daemon ignored signal {sig}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, then start again on the same data directory.
    pub fn kill9_and_restart(&mut self) {
        let st = self.signal(libc::SIGKILL);
        assert!(!st.success());
        self.restart();
    }

    /// Starts the stopped daemon again, as it was started first.
    pub fn restart(&mut self) {
        self.launch();
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--control")
            .arg(self.control())
            .args(args)
            .env_remove("SNAPBLK_CONTROL")
            .output()
            .unwrap()
    }

    /// Runs the CLI, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "snapblk {args:?} failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI with --json, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("--json prints JSON")
    }

    /// Runs the CLI, asserts failure with exactly one line
    /// `snapblk: error: ...` on stderr and nothing on stdout; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "snapblk {args:?} should fail");
        assert!(out.stdout.is_empty(), "a failure prints nothing on stdout");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "one line of error: {err:?}");
        assert!(err.starts_with("snapblk: error: "), "{err}");
        err
    }

    /// The names in a JSON list of volumes or snapshots, in order.
    pub fn names(&self, args: &[&str]) -> Vec<String> {
        names(&self.json(args))
    }

    /// The CLI invocation prefix (`BIN --control PATH`) for scripts.
    pub fn cli_prefix(&self) -> Vec<String> {
        vec![
            BIN.to_string(),
            "--control".to_string(),
            self.control().display().to_string(),
        ]
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A daemon at `dir` accepting replication sources that prove `key` on a
/// free loopback port (fixed, so that restarts keep it); `env` as in
/// [`Daemon::start_with`]. Returns it and its `HOST:PORT`.
pub fn replication_destination(dir: &Path, key: &Path, env: &[(&str, &str)]) -> (Daemon, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--replication-listen",
        &listen,
        "--replication-key-file",
        key.to_str().unwrap(),
    ];
    (Daemon::start_with(dir, dir, &args, env), listen)
}

/// A replication key file `dir/name` holding `key`, readable by its owner
/// only, as the daemon insists.
pub fn key_file(dir: &Path, name: &str, key: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Waits until copy job `id` is done, failed or cancelled; its status.
pub fn wait_job_ended(d: &Daemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let v = d.json(&["copy", "status", id]);
        if matches!(v["state"].as_str(), Some("done" | "failed" | "cancelled")) {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} never ended: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temporary directory and the data directory inside it.
pub fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("data");
    (t, d)
}

/// The `name` fields of a JSON array, in order.
pub fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// Whether a test that cannot run fails instead of skipping
/// (`SNAPBLK_TESTS_STRICT=1`, which `scripts/test`, and so CI, sets). CI
/// installs every tool the tests use and runs as root, so a test that
/// skips there tests nothing; and cargo hides a passing test's output, its
/// SKIP line with it, so only a failure would say so.
fn strict() -> bool {
    std::env::var_os("SNAPBLK_TESTS_STRICT").is_some_and(|v| v == "1")
}

/// Says `test` cannot run here and why: a SKIP line, or in strict mode a
/// failure.
pub fn skip(test: &str, why: &str) {
    assert!(
        !strict(),
        "{test} cannot run: {why} (SNAPBLK_TESTS_STRICT=1, set by scripts/test, \
         allows no skip; scripts/test installs what the tests need)"
    );
    eprintln!("SKIP {test}: {why}");
}

/// True if `tool` can be executed (asks only; see [`have`]).
pub fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// True if `tool` can be executed, for a part of a test that runs only
/// with it; in strict mode a missing tool fails the test (see [`strict`]).
pub fn have(tool: &str) -> bool {
    let ok = installed(tool);
    assert!(
        ok || !strict(),
        "{tool} is not installed (SNAPBLK_TESTS_STRICT=1, set by scripts/test, allows no \
         skipped part; scripts/test installs it)"
    );
    ok
}

/// Returns true (after [`skip`]) if any tool is missing.
pub fn skip_without(test: &str, tools: &[&str]) -> bool {
    for t in tools {
        let ok = if *t == "python3-nbd" {
            python().is_some()
        } else {
            installed(t)
        };
        if !ok {
            skip(test, &format!("{t} is not installed"));
            return true;
        }
    }
    false
}

/// A Python interpreter that can `import nbd` (libnbd's bindings). The
/// first `python3` on PATH may be a pyenv shim without the distribution's
/// packages, so the system interpreter is tried too.
pub fn python() -> Option<String> {
    static PY: OnceLock<Option<String>> = OnceLock::new();
    PY.get_or_init(|| {
        for cand in ["python3", "/usr/bin/python3", "/usr/local/bin/python3"] {
            let ok = Command::new(cand)
                .args(["-c", "import nbd"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Some(cand.to_string());
            }
        }
        None
    })
    .clone()
}

/// Runs a command, returns (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command, asserts exit 0, returns stdout + stderr.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let (ok, o, e) = run(cmd);
    assert!(ok, "{desc} failed:\nstdout:\n{o}\nstderr:\n{e}");
    o + &e
}

/// Runs `qemu-io -f raw` (`-r` if `readonly`) on `uri` with each of `cmds`
/// as a `-c` command; returns (exit 0, stdout + stderr).
pub fn qemu_io<S: AsRef<str>>(uri: &str, readonly: bool, cmds: &[S]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    if readonly {
        c.arg("-r");
    }
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd.as_ref()]);
    }
    c.arg(uri);
    let (ok, o, e) = run(&mut c);
    (ok, o + &e)
}

/// True if a qemu-io run exited 0 and no request or pattern check failed.
pub fn qemu_io_clean(ok: bool, text: &str) -> bool {
    ok && !text.contains("Pattern verification failed") && !text.contains("failed")
}

/// Runs [`qemu_io`], asserts [`qemu_io_clean`], returns its output.
#[track_caller]
pub fn qemu_io_ok<S: AsRef<str>>(uri: &str, readonly: bool, cmds: &[S]) -> String {
    let (ok, text) = qemu_io(uri, readonly, cmds);
    let cmds: Vec<&str> = cmds.iter().map(AsRef::as_ref).collect();
    assert!(qemu_io_clean(ok, &text), "qemu-io {cmds:?}: {text}");
    text
}

/// Starts an inline Python script (with libnbd available) with `args`,
/// stdout and stderr piped, stdin piped if `stdin` (else null).
pub fn py_spawn(script: &str, args: &[String], stdin: bool) -> Child {
    let py = python().expect("python with nbd");
    Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// An NBD client (libnbd in Python) connected to `uri`, returned once the
/// connection is up; it disconnects when its stdin is closed.
pub fn nbd_client_connected(uri: &str) -> Child {
    let mut client = py_spawn(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\nprint('READY', flush=True)\nsys.stdin.readline()\n",
        &[uri.to_string()],
        true,
    );
    let mut line = String::new();
    BufReader::new(client.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "READY");
    client
}

/// Reads all of a child's piped stderr.
pub fn read_stderr(child: &mut Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

/// Runs an inline Python script (with libnbd available) with `args`
/// (`sys.argv[1:]`); asserts exit 0 and that it printed `PASS`; returns stdout.
pub fn py_ok(script: &str, args: &[String]) -> String {
    let py = python().expect("python with nbd");
    let (ok, o, e) = run(Command::new(py).arg("-c").arg(script).args(args));
    assert!(
        ok && o.lines().any(|l| l == "PASS"),
        "python script failed:\nstdout:\n{o}\nstderr:\n{e}"
    );
    o
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Index of the first differing byte, if any (also on length mismatch).
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        return Some(i);
    }
    (a.len() != b.len()).then(|| a.len().min(b.len()))
}

#[track_caller]
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{what}: differs at byte {i} (len got {} want {}): got {:?} want {:?}",
            got.len(),
            want.len(),
            got.get(i..(i + 16).min(got.len())),
            want.get(i..(i + 16).min(want.len()))
        );
    }
}

/// A raw control-protocol connection: one JSON line out, one back.
pub struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Raw { stream, reader }
    }

    pub fn send(&mut self, line: &str) -> Value {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut resp = String::new();
        self.reader.read_line(&mut resp).unwrap();
        assert!(resp.ends_with('\n'), "one response line: {resp:?}");
        serde_json::from_str(&resp).unwrap()
    }
}

/// A control-protocol error reply with `code` whose message mentions `needle`.
pub fn assert_error(v: &Value, code: &str, needle: &str) {
    assert_eq!(v["ok"], Value::Bool(false), "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(needle),
        "message {msg:?} should mention {needle:?}"
    );
}

/// A file system mounted for a test; unmounted (lazily) on drop.
pub struct Mount(pub PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` (e.g. "24M") on `dir` (created); None, with a
/// SKIP line for `test`, where that is not allowed (needs root).
pub fn mount_tmpfs(test: &str, dir: &Path, size: &str) -> Option<Mount> {
    let size = format!("size={size}");
    mount(test, "a tmpfs", dir, &["-t", "tmpfs", "-o", &size, "tmpfs"])
}

/// Mounts a ramfs (a file system that refuses O_DIRECT) on `dir`.
pub fn mount_ramfs(test: &str, dir: &Path) -> Option<Mount> {
    mount(test, "a ramfs", dir, &["-t", "ramfs", "ramfs"])
}

/// Runs the shell command `cmd` on a terminal (a pty from util-linux
/// `script`); whether it succeeded, and what it drew.
pub fn on_terminal(cmd: &str) -> (bool, String) {
    let out = Command::new("script")
        .args(["-qfec", cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Makes a 512 MiB XFS (reflink on, as mkfs.xfs does by default) in the
/// image file `image` and mounts it on `dir` through a loop device; None,
/// with a SKIP line, where mkfs.xfs or loop mounts are missing.
pub fn mount_xfs(test: &str, image: &Path, dir: &Path) -> Option<Mount> {
    if skip_without(test, &["mkfs.xfs"]) {
        return None;
    }
    std::fs::File::create(image)
        .and_then(|f| f.set_len(512 << 20))
        .unwrap();
    run_ok(
        Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(image),
    );
    let image = image.to_str().unwrap();
    mount(test, "an XFS loop image", dir, &["-o", "loop", image])
}

fn mount(test: &str, what: &str, dir: &Path, args: &[&str]) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let mounted = Command::new("mount")
        .args(args)
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        skip(test, &format!("cannot mount {what} here (needs root)"));
        return None;
    }
    Some(Mount(dir.to_path_buf()))
}

/// `qemu-img compare` of two raw images (exports or files); true if identical.
pub fn same_image(a: &str, b: &str) -> bool {
    let (ok, o, e) =
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]));
    assert!(
        ok || o.contains("differ"),
        "qemu-img compare failed: {o}{e}"
    );
    ok
}

pub fn openssl(args: &[&str]) {
    let (ok, out, err) = run(Command::new("openssl").args(args));
    assert!(ok, "openssl {args:?} failed:\n{out}{err}");
}

/// Makes a CA in `dir` (ca-cert.pem, ca-key.pem) and certificates it signs:
/// a server certificate for 127.0.0.1 and localhost, a client certificate.
pub fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    let (ca_key, ca_cert) = (p("ca-key.pem"), p("ca-cert.pem"));
    ca.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_cert,
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca);
    for (who, usage) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, cert, ext) = (
            p(&format!("{who}-key.pem")),
            p(&format!("{who}.csr")),
            p(&format!("{who}-cert.pem")),
            p(&format!("{who}.ext")),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        let subj = format!("/CN={who}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(&req);
        // qemu (gnutls) insists on keyEncipherment in a certificate's usage.
        std::fs::write(
            &ext,
            format!(
                "{usage}keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"
            ),
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            &ext,
        ]);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

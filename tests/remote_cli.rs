//! One CLI over many daemons (issue 13, part 8): `snapblk daemon
//! --control-listen` serves the control protocol over mutual TLS, and
//! `snapblk --remote HOST:PORT` (or `$SNAPBLK_REMOTE`) drives it; `status
//! --all` lists several daemons, with an error line for one that does not
//! answer. Peers without a certificate from the daemon's CA are refused in
//! the handshake; a CLI that does not trust the daemon's certificate says
//! so; garbage gets a clear error and the daemon serves on; the listener
//! refuses to start without `--tls-ca`.
//!
//! The CA and certificates are made by `openssl` in the test (a second CA
//! for the strangers); the raw TLS peers are Python's `ssl` module. Every
//! listener is on 127.0.0.1 with a port the kernel picks.

mod common;

use common::{make_pki, run, tempdir, Daemon, BIN};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn skip(test: &str) -> bool {
    let missing = ["openssl", "python3"]
        .into_iter()
        .find(|t| !common::installed(t));
    if let Some(t) = missing {
        common::skip(test, &format!("{t} is not installed"));
    }
    missing.is_some()
}

struct Setup {
    _t: tempfile::TempDir,
    root: PathBuf,
    /// The CA the daemons trust, their certificate and a client's.
    pki: PathBuf,
    /// Another CA, and a client certificate it signed.
    other: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let (t, root) = tempdir();
        let (pki, other) = (root.join("pki"), root.join("other"));
        make_pki(&pki);
        make_pki(&other);
        Setup {
            _t: t,
            root,
            pki,
            other,
        }
    }

    fn file(dir: &Path, name: &str) -> String {
        dir.join(name).to_string_lossy().into_owned()
    }

    /// A daemon with `--control-listen 127.0.0.1:0` and the server
    /// certificate; returns it and its control address.
    fn daemon(&self, name: &str) -> (Daemon, String) {
        let p = |f| Setup::file(&self.pki, f);
        let args = [
            "--control-listen".to_string(),
            "127.0.0.1:0".into(),
            "--tls-cert".into(),
            p("server-cert.pem"),
            "--tls-key".into(),
            p("server-key.pem"),
            "--tls-ca".into(),
            p("ca-cert.pem"),
            // NBD stays plain text on its UNIX socket: only the control
            // listener is under test.
            "--tls=off".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let d = Daemon::start_with(
            &self.root.join(format!("{name}-data")),
            &self.root.join(name),
            &args,
            &[],
        );
        let addr = d.json(&["status"])["control_tcp"]
            .as_str()
            .expect("status shows the control listener")
            .to_string();
        (d, addr)
    }

    /// `--tls-cert/--tls-key` from `client` (the client certificate in that
    /// directory) and `--tls-ca` from `ca`.
    fn tls(&self, client: &Path, ca: &Path) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            Setup::file(client, "client-cert.pem"),
            "--tls-key".into(),
            Setup::file(client, "client-key.pem"),
            "--tls-ca".into(),
            Setup::file(ca, "ca-cert.pem"),
        ]
    }

    /// `snapblk --remote ADDR` with the good certificates, then `args`; no
    /// local daemon reachable (`--control` points nowhere).
    fn remote(&self, addr: &str, args: &[&str]) -> Output {
        self.remote_with(addr, &self.tls(&self.pki, &self.pki), args)
    }

    fn remote_with(&self, addr: &str, tls: &[String], args: &[&str]) -> Output {
        Command::new(BIN)
            .args(["--remote", addr])
            .args(tls)
            .args(args)
            .env("SNAPBLK_CONTROL", self.root.join("nowhere.sock"))
            .output()
            .unwrap()
    }

    fn remote_ok(&self, addr: &str, args: &[&str]) -> String {
        let out = self.remote(addr, args);
        assert!(
            out.status.success(),
            "snapblk --remote {addr} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn remote_json(&self, addr: &str, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.remote_ok(addr, &a)).expect("--json prints JSON")
    }
}

/// The one error line of a failed CLI run.
fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "should have failed");
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.lines().count(), 1, "one line of error: {err:?}");
    assert!(err.starts_with("snapblk: error: "), "{err}");
    err
}

fn names(v: &Value) -> Vec<String> {
    common::names(v)
}

#[test]
fn one_cli_drives_two_daemons_and_status_all_lists_them() {
    if skip("one_cli_drives_two_daemons_and_status_all_lists_them") {
        return;
    }
    let s = Setup::new();
    let (a, a_addr) = s.daemon("a");
    let (b, b_addr) = s.daemon("b");

    for (d, addr, vol) in [(&a, &a_addr, "va"), (&b, &b_addr, "vb")] {
        s.remote_ok(addr, &["volume", "create", vol, "--size", "16M"]);
        s.remote_ok(addr, &["snapshot", "create", vol, "s1"]);
        assert_eq!(names(&s.remote_json(addr, &["volume", "list"])), [vol]);
        assert_eq!(
            names(&s.remote_json(addr, &["snapshot", "list", vol])),
            ["s1"]
        );
        // The volume is on that daemon: its own socket shows it.
        assert_eq!(d.names(&["volume", "list"]), [vol]);
        assert_eq!(d.names(&["snapshot", "list", vol]), ["s1"]);
    }

    // The same through the environment.
    let tls = s.tls(&s.pki, &s.pki);
    let out = Command::new(BIN)
        .args(["--json", "volume", "list"])
        .env("SNAPBLK_REMOTE", &b_addr)
        .env("SNAPBLK_TLS_CERT", &tls[1])
        .env("SNAPBLK_TLS_KEY", &tls[3])
        .env("SNAPBLK_TLS_CA", &tls[5])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(names(&v), ["vb"]);

    // Daemon errors come back as they would locally.
    let err = failure(&s.remote(&a_addr, &["volume", "info", "nope"]));
    assert!(err.contains("nope") && err.contains("volume list"), "{err}");

    // What needs this machine's files refuses --remote, and says why.
    let err = failure(&s.remote(
        &a_addr,
        &["copy", "start", "va", "--format", "stream", "--to", "-"],
    ));
    assert!(
        err.contains(&format!("the daemon at {a_addr} cannot receive"))
            && err.contains("without --remote"),
        "{err}"
    );
    let stream = s.root.join("stream");
    std::fs::write(&stream, b"x").unwrap();
    let err = failure(&s.remote(
        &a_addr,
        &["restore", stream.to_str().unwrap(), "--to", "vol:va"],
    ));
    assert!(err.contains("run `snapblk restore` there"), "{err}");
    assert!(a.names(&["copy", "list"]).is_empty(), "no job started");

    // status --all: the local daemon (a, by --control), b, and a port
    // nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let all = |json: bool| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--control").arg(a.control()).args(&tls);
        if json {
            cmd.arg("--json");
        }
        cmd.args(["status", "--all", &b_addr, &dead]);
        cmd.output().unwrap()
    };
    let out = all(false);
    let err = failure(&out);
    assert!(err.contains("1 of 3 daemons did not answer"), "{err}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "a header and one line per daemon:\n{text}");
    assert!(lines[0].starts_with("DAEMON") && lines[0].contains("LINKS"));
    let version = env!("CARGO_PKG_VERSION");
    let a_line = format!("{}  ", a.control().display());
    assert!(
        lines[1].starts_with(&a_line) && lines[1].contains(version),
        "{text}"
    );
    assert!(
        lines[2].starts_with(&b_addr) && lines[2].contains(version),
        "{text}"
    );
    assert!(
        lines[3].starts_with(&dead)
            && lines[3].contains(&format!("error: cannot talk to the daemon at {dead}"))
            && lines[3].contains("--control-listen"),
        "{text}"
    );

    let out = all(true);
    assert!(!out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[0]["address"], a.control().display().to_string());
    assert_eq!(list[0]["status"]["volumes"], 1);
    assert_eq!(list[1]["address"], b_addr.as_str());
    for key in ["devices", "replication_links", "copy_jobs"] {
        assert_eq!(list[1]["status"][key], 0, "{key}: {}", list[1]);
    }
    assert!(list[1]["status"]["uptime_s"].is_u64());
    assert_eq!(list[2]["address"], dead.as_str());
    assert!(list[2]["error"].as_str().unwrap().contains("refused"));
    assert!(list[2].get("status").is_none());
}

/// A raw TLS client (Python's ssl): connects to `addr` trusting `ca`,
/// presenting `client` (a directory with client-cert.pem and
/// client-key.pem) if given, sends `payload` and prints each answer line,
/// or `REFUSED` and why.
fn raw_tls(addr: &str, ca: &Path, client: Option<&Path>, payload: &str) -> String {
    const SCRIPT: &str = r#"
import socket, ssl, sys
addr, ca, client, payload = sys.argv[1:5]
host, port = addr.rsplit(":", 1)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
if client != "-":
    ctx.load_cert_chain(client + "/client-cert.pem", client + "/client-key.pem")
sock = socket.create_connection((host, int(port)))
try:
    tls = ctx.wrap_socket(sock, server_hostname=host)
    tls.sendall(payload.encode())
    f = tls.makefile("rb")
    for _ in range(payload.count("\n")):
        line = f.readline()
        if not line:
            print("CLOSED")
            break
        print(line.decode().strip())
except (ssl.SSLError, OSError) as e:
    print("REFUSED", e)
"#;
    let client = client.map_or("-".to_string(), |c| c.to_string_lossy().into_owned());
    let (ok, out, err) = run(Command::new("python3").args([
        "-c",
        SCRIPT,
        addr,
        &Setup::file(ca, "ca-cert.pem"),
        &client,
        payload,
    ]));
    assert!(ok, "python failed: {out}{err}");
    out
}

#[test]
fn strangers_are_refused_in_the_handshake_and_garbage_gets_an_error() {
    if skip("strangers_are_refused_in_the_handshake_and_garbage_gets_an_error") {
        return;
    }
    let s = Setup::new();
    let (d, addr) = s.daemon("d");
    let list = "{\"op\":\"volume.list\"}\n";

    // A certificate the CA signed: served.
    let out = raw_tls(&addr, &s.pki, Some(&s.pki), list);
    assert!(out.contains("\"ok\":true"), "{out}");

    // No certificate, or one another CA signed: refused before any answer.
    for (who, client) in [("none", None), ("another CA", Some(s.other.as_path()))] {
        let out = raw_tls(&addr, &s.pki, client, list);
        assert!(
            out.starts_with("REFUSED") && !out.contains("\"ok\""),
            "{who}: {out}"
        );
    }
    assert!(d.log_shows("remote control: refusing"), "{}", d.log());
    // The CLI with another CA's certificate says what to do.
    let err = failure(&s.remote_with(&addr, &s.tls(&s.other, &s.pki), &["volume", "list"]));
    assert!(
        err.contains("refused this CLI's certificate") && err.contains("--tls-cert"),
        "{err}"
    );
    // A CLI that does not trust the daemon's certificate stops there.
    let err = failure(&s.remote_with(&addr, &s.tls(&s.pki, &s.other), &["volume", "list"]));
    assert!(
        err.contains("has a certificate this CLI does not trust") && err.contains("--tls-ca"),
        "{err}"
    );
    // No certificate files at all: the CLI asks for them.
    let out = Command::new(BIN)
        .args(["--remote", &addr, "volume", "list"])
        .env_remove("SNAPBLK_TLS_CERT")
        .env_remove("SNAPBLK_TLS_KEY")
        .env_remove("SNAPBLK_TLS_CA")
        .output()
        .unwrap();
    let err = failure(&out);
    assert!(
        err.contains("--tls-cert FILE --tls-key FILE --tls-ca FILE"),
        "{err}"
    );

    // Not TLS at all: the connection is closed; the daemon goes on.
    {
        let mut raw = std::net::TcpStream::connect(&addr).unwrap();
        raw.write_all(b"{\"op\":\"volume.list\"}\n\x16\x03\x01garbage\n")
            .unwrap();
        let mut got = Vec::new();
        let _ = raw.read_to_end(&mut got);
        assert!(
            !String::from_utf8_lossy(&got).contains("\"ok\""),
            "plain text got an answer"
        );
    }
    // Garbage inside TLS: a clear error line, and the same connection
    // goes on to serve the next request.
    let out = raw_tls(
        &addr,
        &s.pki,
        Some(&s.pki),
        &format!("\x01not json at all\n{list}"),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let first: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first["ok"], false);
    assert_eq!(first["error"]["code"], "bad_request", "{out}");
    assert!(lines[1].contains("\"ok\":true"), "{out}");

    s.remote_ok(&addr, &["volume", "create", "v", "--size", "1M"]);
    assert_eq!(d.names(&["volume", "list"]), ["v"]);
}

#[test]
fn control_listen_refuses_to_start_without_client_certificates() {
    if skip("control_listen_refuses_to_start_without_client_certificates") {
        return;
    }
    let s = Setup::new();
    let p = |f| Setup::file(&s.pki, f);
    let data = s.root.join("data");
    let start = |extra: &[String]| {
        Command::new(BIN)
            .args(["daemon", "--data-dir"])
            .arg(&data)
            .args(["--control-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let cert_key = [
        "--tls-cert".to_string(),
        p("server-cert.pem"),
        "--tls-key".into(),
        p("server-key.pem"),
    ];
    for (extra, missing) in [
        (&cert_key[..], "add --tls-ca FILE"),
        (&[][..], "add --tls-cert FILE --tls-key FILE --tls-ca FILE"),
    ] {
        let out = start(extra);
        assert_eq!(out.status.code(), Some(1), "started with {extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("only over TLS with client certificates") && err.contains(missing),
            "{err}"
        );
        assert!(!data.join("control.sock").exists(), "nothing is served");
    }
    // --remote is for commands, not for running a daemon.
    let out = Command::new(BIN)
        .args(["--remote", "127.0.0.1:1", "daemon"])
        .output()
        .unwrap();
    assert!(failure(&out).contains("drop --remote"));
}

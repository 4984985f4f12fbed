//! Who may reach a volume over NBD (issue 11, part 1), with real clients:
//! STARTTLS with qemu-img/qemu-io (a `tls-creds-x509` object) and libnbd's
//! nbdinfo/nbdcopy (`nbds://…?tls-certificates=DIR`); client certificates
//! required and checked against `--tls-ca`; `--tls=require` refusing plain
//! text; a private key others can read refused at start; a network address
//! without TLS refused at start; and the UNIX socket's peer check, with a
//! client running as `nobody`.
//!
//! Certificates are made by `openssl` in a temporary directory, named the
//! way qemu and gnutls expect (ca-cert.pem, server-cert.pem,
//! server-key.pem, client-cert.pem, client-key.pem). Every TCP listener is
//! on 127.0.0.1 with a port the kernel picks.

mod common;

use common::{make_pki, run, skip_without, tempdir, Daemon, BIN};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const TOOLS: &[&str] = &["openssl", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy"];

/// A client's certificate directory: the CA, and the client certificate and
/// key from `client_from` (None: no client certificate).
fn client_dir(dir: &Path, ca_from: &Path, client_from: Option<&Path>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(ca_from.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    if let Some(from) = client_from {
        for f in ["client-cert.pem", "client-key.pem"] {
            std::fs::copy(from.join(f), dir.join(f)).unwrap();
        }
    }
    dir.to_path_buf()
}

struct Setup {
    _t: tempfile::TempDir,
    root: PathBuf,
    pki: PathBuf,
}

fn setup(test: &str) -> Option<Setup> {
    if skip_without(test, TOOLS) {
        return None;
    }
    let (t, root) = tempdir();
    let pki = root.join("pki");
    make_pki(&pki);
    Some(Setup { _t: t, root, pki })
}

impl Setup {
    /// `--tls-cert`/`--tls-key` (and `--tls-ca` with `ca`) plus `extra`.
    fn tls_args(&self, ca: bool, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--nbd-listen".into(),
            "127.0.0.1:0".into(),
            "--tls-cert".into(),
            self.pki.join("server-cert.pem").to_string_lossy().into(),
            "--tls-key".into(),
            self.pki.join("server-key.pem").to_string_lossy().into(),
        ];
        if ca {
            a.push("--tls-ca".into());
            a.push(self.pki.join("ca-cert.pem").to_string_lossy().into());
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// A daemon on a fresh data directory with a 64 MiB volume `v`.
    fn daemon(&self, args: &[String]) -> Daemon {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let n = std::fs::read_dir(&self.root).unwrap().count();
        let d = Daemon::start_with(
            &self.root.join(format!("data{n}")),
            &self.root.join(format!("d{n}")),
            &args,
            &[],
        );
        d.ok(&["volume", "create", "v", "--size", "64M"]);
        d
    }
}

/// The daemon's TCP NBD port (it listened on port 0).
fn port(d: &Daemon) -> u16 {
    let st = d.json(&["status"]);
    let addr = st["nbd_tcp"][0].as_str().expect("a TCP listener");
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn qemu_tls_args(dir: &Path, port: u16, export: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0"),
    ]
}

fn nbdinfo(uri: &str) -> (bool, String, String) {
    run(Command::new("nbdinfo").arg(uri))
}

#[test]
fn qemu_and_libnbd_clients_read_and_write_over_tls() {
    let Some(s) = setup("qemu_and_libnbd_clients_read_and_write_over_tls") else {
        return;
    };
    let d = s.daemon(&s.tls_args(true, &[]));
    let p = port(&d);
    let certs = client_dir(&s.root.join("client"), &s.pki, Some(&s.pki));

    let (ok, out, err) = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .args(qemu_tls_args(&certs, p, "v")));
    assert!(
        ok,
        "qemu-img info over TLS failed:\n{out}{err}\nlog:\n{}",
        d.log()
    );
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["virtual-size"], 64u64 << 20);

    // Writes through one TLS connection, verified through another; sizes
    // from one record to many, so that replies and payloads span records.
    let qemu_io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(qemu_tls_args(&certs, p, "v"));
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let (ok, out, err) = run(&mut c);
        assert!(
            ok && !out.contains("Pattern verification failed") && !err.contains("failed"),
            "qemu-io {cmds:?}:\n{out}{err}\nlog:\n{}",
            d.log()
        );
    };
    qemu_io(&[
        "write -P 0xab 0 4k",
        "write -P 0xcd 1M 1M",
        "write -P 0xef 3M 16M",
        "aio_write -P 0x5a 32M 64k",
        "aio_write -P 0xa5 33M 4k",
        "aio_flush",
    ]);
    qemu_io(&[
        "read -P 0xab 0 4k",
        "read -P 0xcd 1M 1M",
        "read -P 0xef 3M 16M",
        "read -P 0x5a 32M 64k",
        "read -P 0xa5 33M 4k",
        "read -P 0 4k 1020k",
    ]);

    // libnbd: nbdinfo on TCP and on the UNIX socket (qemu and libnbd both
    // do TLS over UNIX sockets), nbdcopy of the whole export.
    let (ok, out, err) = nbdinfo(&format!(
        "nbds://127.0.0.1:{p}/v?tls-certificates={}",
        certs.display()
    ));
    assert!(ok, "nbdinfo nbds:// failed:\n{out}{err}");
    assert!(out.contains("with TLS"), "{out}");
    let (ok, out, err) = nbdinfo(&format!(
        "nbds+unix:///v?socket={}&tls-certificates={}",
        d.nbd_sock().display(),
        certs.display()
    ));
    assert!(ok, "nbdinfo nbds+unix:// failed:\n{out}{err}");
    assert!(out.contains("with TLS"), "{out}");
    let copy = s.root.join("copy.img");
    let (ok, out, err) = run(Command::new("nbdcopy")
        .arg(format!(
            "nbds://127.0.0.1:{p}/v?tls-certificates={}",
            certs.display()
        ))
        .arg(&copy));
    assert!(ok, "nbdcopy over TLS failed:\n{out}{err}");
    let bytes = std::fs::read(&copy).unwrap();
    assert_eq!(bytes.len(), 64 << 20);
    let all = |range: std::ops::Range<usize>, v: u8| bytes[range].iter().all(|b| *b == v);
    assert!(all(0..4096, 0xab) && all(4096..1 << 20, 0));
    assert!(all(1 << 20..2 << 20, 0xcd) && all(3 << 20..19 << 20, 0xef));
    assert!(all(32 << 20..(32 << 20) + 65536, 0x5a));
    assert!(all(33 << 20..(33 << 20) + 4096, 0xa5));
}

#[test]
fn client_certificates_are_required_and_checked_against_the_ca() {
    let Some(s) = setup("client_certificates_are_required_and_checked_against_the_ca") else {
        return;
    };
    let other = s.root.join("other-pki");
    make_pki(&other);
    let d = s.daemon(&s.tls_args(true, &[]));
    let p = port(&d);
    let uri = |dir: &Path| format!("nbds://127.0.0.1:{p}/v?tls-certificates={}", dir.display());

    let good = client_dir(&s.root.join("good"), &s.pki, Some(&s.pki));
    let (ok, out, err) = nbdinfo(&uri(&good));
    assert!(ok, "a client with a good certificate:\n{out}{err}");

    let none = client_dir(&s.root.join("none"), &s.pki, None);
    let (ok, out, _) = nbdinfo(&uri(&none));
    assert!(!ok, "a client without a certificate got in:\n{out}");
    assert!(!out.contains("export-size"), "{out}");
    assert!(d.log_shows("peer sent no certificates"), "{}", d.log());

    // A certificate from another CA (the client trusts our server's CA).
    let foreign = client_dir(&s.root.join("foreign"), &s.pki, Some(&other));
    let (ok, out, _) = nbdinfo(&uri(&foreign));
    assert!(!ok, "a client with another CA's certificate got in:\n{out}");
    assert!(d.log_shows("invalid peer certificate"), "{}", d.log());

    // qemu without a client certificate is refused too.
    let (ok, out, err) = run(Command::new("qemu-img")
        .arg("info")
        .args(qemu_tls_args(&none, p, "v")));
    assert!(
        !ok,
        "qemu-img without a client certificate got in:\n{out}{err}"
    );

    // Without --tls-ca, no client certificate is asked for.
    drop(d);
    let d = s.daemon(&s.tls_args(false, &[]));
    let (ok, out, err) = nbdinfo(&format!(
        "nbds://127.0.0.1:{}/v?tls-certificates={}",
        port(&d),
        none.display()
    ));
    assert!(ok, "no --tls-ca: a client without certificate:\n{out}{err}");
}

/// The first option reply a plain-text client gets for NBD_OPT_GO "v":
/// (reply type, message).
fn plain_go_reply(mut sock: impl Read + Write) -> (u32, String) {
    let mut greeting = [0u8; 18];
    sock.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    sock.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(b"v");
    opt.extend_from_slice(&0u16.to_be_bytes());
    sock.write_all(&opt).unwrap();
    let mut head = [0u8; 20];
    sock.read_exact(&mut head).unwrap();
    let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    let mut msg = vec![0u8; len];
    sock.read_exact(&mut msg).unwrap();
    (kind, String::from_utf8_lossy(&msg).into_owned())
}

const NBD_REP_ERR_POLICY: u32 = 0x8000_0002;
const NBD_REP_ERR_TLS_REQD: u32 = 0x8000_0005;

#[test]
fn tls_require_refuses_plain_text_and_tls_on_allows_both() {
    let Some(s) = setup("tls_require_refuses_plain_text_and_tls_on_allows_both") else {
        return;
    };
    let certs = client_dir(&s.root.join("client"), &s.pki, Some(&s.pki));
    // --tls-cert alone means require, as does --tls=require.
    for extra in [&[][..], &["--tls=require"][..]] {
        let d = s.daemon(&s.tls_args(false, extra));
        let p = port(&d);
        assert_eq!(d.json(&["status"])["nbd_tls"], "require");
        let (ok, out, _) = nbdinfo(&format!("nbd://127.0.0.1:{p}/v"));
        assert!(!ok, "a plain-text client got in:\n{out}");
        let (kind, msg) = plain_go_reply(std::net::TcpStream::connect(("127.0.0.1", p)).unwrap());
        assert_eq!(kind, NBD_REP_ERR_TLS_REQD, "{msg}");
        assert!(msg.contains("TLS is required"), "{msg}");
        // The UNIX socket too, as with nbdkit --tls=require.
        let (kind, _) =
            plain_go_reply(std::os::unix::net::UnixStream::connect(d.nbd_sock()).unwrap());
        assert_eq!(kind, NBD_REP_ERR_TLS_REQD);
        let (ok, out, err) = nbdinfo(&format!(
            "nbds://127.0.0.1:{p}/v?tls-certificates={}",
            certs.display()
        ));
        assert!(ok, "{out}{err}");
    }
    let d = s.daemon(&s.tls_args(false, &["--tls=on"]));
    let p = port(&d);
    let (ok, out, err) = nbdinfo(&format!("nbd://127.0.0.1:{p}/v"));
    assert!(ok && out.contains("without TLS"), "{out}{err}");
    let (ok, out, err) = nbdinfo(&format!(
        "nbds://127.0.0.1:{p}/v?tls-certificates={}",
        certs.display()
    ));
    assert!(ok && out.contains("with TLS"), "{out}{err}");
}

/// Runs `snapblk daemon ARGS` that must fail at start; returns stderr.
fn start_fails(s: &Setup, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["daemon", "--data-dir"])
        .arg(s.root.join("data"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the daemon started with {args:?}"
    );
    assert!(
        !s.root.join("data").join("control.sock").exists(),
        "nothing is served"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unsafe_settings_are_refused_at_start() {
    let Some(s) = setup("unsafe_settings_are_refused_at_start") else {
        return;
    };
    let cert = s.pki.join("server-cert.pem");
    let key = s.pki.join("server-key.pem");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());

    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = start_fails(&s, &["--tls-cert", cert, "--tls-key", key]);
    assert!(
        err.contains(&format!(
            "permissions 0644 for the TLS private key {key} are too open"
        )) && err.contains(&format!("chmod 600 {key}")),
        "{err}"
    );
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A network address without TLS (refused before anything is bound).
    let err = start_fails(&s, &["--nbd-listen", "0.0.0.0:0"]);
    assert!(
        err.contains("refusing to serve NBD on 0.0.0.0:0 without TLS")
            && err.contains("--tls-cert FILE --tls-key FILE")
            && err.contains("--nbd-insecure"),
        "{err}"
    );
    // TLS offered but not required is plain text all the same.
    let err = start_fails(
        &s,
        &[
            "--nbd-listen",
            "0.0.0.0:0",
            "--tls=on",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ],
    );
    assert!(err.contains("use --tls=require"), "{err}");
    // Half a TLS configuration.
    let err = start_fails(&s, &["--tls-cert", cert]);
    assert!(err.contains("--tls-key FILE"), "{err}");
    let err = start_fails(&s, &["--tls=require"]);
    assert!(err.contains("--tls-cert FILE"), "{err}");
    let err = start_fails(&s, &["--tls-cert", key, "--tls-key", key]);
    assert!(err.contains("holds no certificate"), "{err}");
}

#[test]
fn unix_socket_peers_are_checked_like_the_control_sockets() {
    if skip_without(
        "unix_socket_peers_are_checked_like_the_control_sockets",
        &["nbdinfo", "setpriv"],
    ) {
        return;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        common::skip(
            "unix_socket_peers_are_checked_like_the_control_sockets",
            "needs root to run a client as nobody",
        );
        return;
    }
    let (_t, root) = tempdir();
    let d = Daemon::start(&root);
    d.ok(&["volume", "create", "v", "--size", "4M"]);
    let sock = d.nbd_sock();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the NBD socket's mode");
    // Open every fence but the credential check: the directory and the
    // socket file itself, so that `nobody` reaches the daemon.
    assert_eq!(sock.parent(), Some(root.parent().unwrap()));
    std::fs::set_permissions(
        sock.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();

    let as_nobody = |prog: &str| {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            prog,
        ]);
        c
    };
    let (ok, out, err) = run(as_nobody("nbdinfo").arg(d.uri("v")));
    assert!(!ok, "nobody read the export:\n{out}");
    assert!(
        !err.contains("connect: Permission denied"),
        "nobody was stopped by file modes, not by the credential check: {err}"
    );
    assert!(
        d.log()
            .contains("may not use the NBD socket (only root, uid 0"),
        "{}",
        d.log()
    );

    // On the wire: the refusal is NBD_REP_ERR_POLICY with the reason.
    let script = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
def read(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise SystemExit("closed")
        b += c
    return b
read(18); s.sendall(struct.pack(">I", 3))
s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 7) + struct.pack(">I", 1) + b"v" + struct.pack(">H", 0))
h = read(20); t, l = struct.unpack(">II", h[12:20])
print(hex(t), read(l).decode())
"#;
    if Path::new("/usr/bin/python3").exists() {
        let (ok, out, err) = run(as_nobody("/usr/bin/python3")
            .args(["-c", script])
            .arg(&sock));
        assert!(ok, "{out}{err}");
        assert!(
            out.starts_with(&format!("{NBD_REP_ERR_POLICY:#x} permission denied: uid ")),
            "{out}"
        );
    }
    // Root still gets in.
    let (ok, out, err) = nbdinfo(&d.uri("v"));
    assert!(ok, "{out}{err}");
}

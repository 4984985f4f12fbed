//! Metrics (README "Metrics"): the Prometheus endpoint scraped with curl
//! while fio writes through NBD, its counters checked against fio's own
//! totals; who may scrape (a bearer token on TCP, the control socket's peer
//! rule on a UNIX socket); and `snapblk top --json`.

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

const TOKEN: &str = "metrics-test-token-0123456789";

/// A free loopback port (bound and released; nothing else here binds).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn token_file(dir: &Path, mode: u32) -> std::path::PathBuf {
    let p = dir.join("metrics.token");
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// `curl` with `args`; returns (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = run_ok(
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
            .args(args),
    );
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

/// The value of the sample `name{labels}` (labels in the order rendered).
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

fn requests(text: &str, op: &str) -> f64 {
    sample(
        text,
        &format!("snapblk_volume_requests_total{{volume=\"vol\",op=\"{op}\"}}"),
    )
    .unwrap_or_else(|| panic!("no {op} request counter in:\n{text}"))
}

#[test]
fn counters_scraped_during_fio_match_fios_totals() {
    if skip_without(
        "counters_scraped_during_fio_match_fios_totals",
        &["fio", "curl"],
    ) {
        return;
    }
    let (t, dir) = tempdir();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let token = token_file(t.path(), 0o600);
    let d = Daemon::start_with(
        &dir,
        &dir,
        &[
            "--metrics-listen",
            &addr,
            "--metrics-token-file",
            token.to_str().unwrap(),
        ],
        &[],
    );
    d.ok(&["volume", "create", "vol", "--size", "64M"]);
    d.ok(&["snapshot", "create", "vol", "s1"]);
    let url = format!("http://{addr}/metrics");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let scrape = || {
        let (code, body) = curl(&["-H", &auth, &url]);
        assert_eq!(code, 200, "{body}");
        body
    };
    let before = scrape();
    assert_eq!(requests(&before, "write"), 0.0, "{before}");

    // A time-based run, so scrapes land while it writes.
    let fio_json = t.path().join("fio.json");
    let mut fio = Command::new("fio")
        .current_dir(t.path())
        .args([
            "--name=m",
            "--ioengine=nbd",
            &format!("--uri={}", d.uri("vol")),
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=4k",
            "--iodepth=8",
            "--size=32M",
            "--time_based",
            "--runtime=4",
            "--output-format=json",
            &format!("--output={}", fio_json.display()),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    while fio.try_wait().unwrap().is_none() {
        seen.push(requests(&scrape(), "write"));
        std::thread::sleep(std::time::Duration::from_millis(700));
    }
    assert!(fio.wait().unwrap().success());
    let during: Vec<f64> = seen.iter().copied().filter(|&w| w > 0.0).collect();
    assert!(
        during.len() >= 2 && during.windows(2).any(|w| w[1] > w[0]),
        "the write counter should move while fio runs; seen {seen:?}"
    );

    let report: Value = serde_json::from_slice(&std::fs::read(&fio_json).unwrap()).unwrap();
    let job = &report["jobs"][0];
    let after = scrape();
    for op in ["read", "write"] {
        let ios = job[op]["total_ios"].as_f64().unwrap();
        let bytes = job[op]["io_bytes"].as_f64().unwrap();
        assert!(ios > 0.0);
        assert_eq!(
            requests(&after, op),
            ios,
            "{op} requests against fio's total"
        );
        let b = sample(
            &after,
            &format!("snapblk_volume_bytes_total{{volume=\"vol\",op=\"{op}\"}}"),
        );
        assert_eq!(b, Some(bytes), "{op} bytes against fio's total");
        let count = sample(
            &after,
            &format!("snapblk_volume_request_latency_seconds_count{{volume=\"vol\",op=\"{op}\"}}"),
        );
        assert_eq!(
            count,
            Some(ios),
            "the {op} latency histogram counts every request"
        );
        let inf = sample(
            &after,
            &format!(
                "snapblk_volume_request_latency_seconds_bucket{{le=\"+Inf\",volume=\"vol\",op=\"{op}\"}}"
            ),
        );
        assert_eq!(inf, Some(ios), "{after}");
    }
    // Writes after the snapshot preserved chunks, and the snapshot is counted.
    let preserved = sample(
        &after,
        "snapblk_volume_preserved_chunks_total{volume=\"vol\"}",
    );
    assert!(preserved.unwrap_or(0.0) > 0.0, "{after}");
    assert_eq!(
        sample(&after, "snapblk_volume_snapshots{volume=\"vol\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&after, "snapblk_volume_capacity_bytes{volume=\"vol\"}"),
        Some((64u64 << 20) as f64)
    );
    assert!(
        after.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );

    // The same counters through the control socket, as `volume info` shows.
    let info = d.json(&["volume", "info", "vol"]);
    assert_eq!(
        info["io"]["write"]["ops"].as_f64(),
        job["write"]["total_ios"].as_f64()
    );

    // Without the token, or with another: refused, and the daemon serves on.
    let (code, body) = curl(&[&url]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("bearer token"), "{body}");
    let (code, _) = curl(&["-H", "Authorization: Bearer not-the-token-at-all", &url]);
    assert_eq!(code, 401);
    let (code, body) = curl(&["-H", &auth, &format!("http://{addr}/other")]);
    assert_eq!(code, 404, "{body}");
    assert_eq!(curl(&["-H", &auth, &url]).0, 200);
}

#[test]
fn tcp_metrics_need_a_private_token_file() {
    let (t, dir) = tempdir();
    let start = |extra: &[&str]| {
        run(Command::new(BIN)
            .args(["daemon", "--data-dir", dir.to_str().unwrap()])
            .args(["--control", dir.join("c.sock").to_str().unwrap()])
            .args(["--nbd-socket", dir.join("n.sock").to_str().unwrap()])
            .args(extra))
    };
    let (ok, _, err) = start(&["--metrics-listen", "127.0.0.1:0"]);
    assert!(!ok);
    assert!(
        err.contains("refusing to serve metrics on 127.0.0.1:0 without a token")
            && err.contains("--metrics-token-file"),
        "{err}"
    );
    let loose = token_file(t.path(), 0o644);
    let with_token = |file: &Path| {
        let (ok, _, err) = start(&[
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-token-file",
            file.to_str().unwrap(),
        ]);
        assert!(!ok);
        err
    };
    let err = with_token(&loose);
    assert!(err.contains("metrics token file"), "{err}");
    std::fs::write(&loose, "short\n").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = with_token(&loose);
    assert!(err.contains("shorter than 16 characters"), "{err}");
}

#[test]
fn a_unix_metrics_socket_admits_the_control_sockets_peers_only() {
    if skip_without(
        "a_unix_metrics_socket_admits_the_control_sockets_peers_only",
        &["curl", "setpriv", "python3"],
    ) {
        return;
    }
    let (t, dir) = tempdir();
    let sock = t.path().join("metrics.sock");
    let d = Daemon::start_with(
        &dir,
        &dir,
        &["--metrics-listen", sock.to_str().unwrap()],
        &[],
    );
    d.ok(&["volume", "create", "vol", "--size", "1M"]);
    let (code, body) = curl(&["--unix-socket", sock.to_str().unwrap(), "http://x/metrics"]);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("snapblk_volume_capacity_bytes{volume=\"vol\"} 1048576"),
        "{body}"
    );

    // Reachable by file permissions, refused by credentials.
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    // (Python, not curl: curl run by setpriv here fails to connect at all.)
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n\
                  s.sendall(b'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n\
                  b=b''\nwhile (c:=s.recv(65536)): b+=c\nprint(b.decode())";
    let out = run_ok(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
            ])
            .args(["-c", script, sock.to_str().unwrap()]),
    );
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.contains("uid 65534 (") && out.contains("may not use the metrics socket"),
        "{out}"
    );
    assert_eq!(
        curl(&["--unix-socket", sock.to_str().unwrap(), "http://x/metrics"]).0,
        200
    );
    let mut d = d;
    assert!(d.signal(libc::SIGTERM).success());
    assert!(!sock.exists(), "the socket is removed at shutdown");
}

#[test]
fn top_reports_rates_while_a_client_writes() {
    if skip_without("top_reports_rates_while_a_client_writes", &["fio"]) {
        return;
    }
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "vol", "--size", "64M"]);
    d.ok(&["volume", "create", "idle", "--size", "1M"]);
    let mut fio = Command::new("fio")
        .current_dir(t.path())
        .args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", d.uri("vol")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--size=32M",
            "--time_based",
            "--runtime=30",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // fio connects, then two views half a second apart.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut args = d.cli_prefix();
    args.extend(["--json", "top", "--interval", "500ms", "--count", "2"].map(String::from));
    let out = run_ok(Command::new(&args[0]).args(&args[1..]));
    let _ = fio.kill();
    let _ = fio.wait();
    let views: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(views.len(), 2, "{out}");
    for v in &views {
        let vols = v["volumes"].as_array().unwrap();
        let vol = vols.iter().find(|x| x["volume"] == "vol").unwrap();
        let idle = vols.iter().find(|x| x["volume"] == "idle").unwrap();
        assert!(vol["write_iops"].as_f64().unwrap() > 0.0, "{v}");
        assert!(vol["write_latency_ms"].as_f64().unwrap() > 0.0, "{v}");
        // Both rates are counts over the same interval; compared with a
        // relative tolerance, as (n * 4096) / t and (n / t) * 4096 may
        // differ in the last bit.
        let (bytes, iops) = (
            vol["write_bytes_per_s"].as_f64().unwrap(),
            vol["write_iops"].as_f64().unwrap(),
        );
        assert!(
            (bytes - iops * 4096.0).abs() <= bytes * 1e-9,
            "4k writes: bytes are 4096 per request: {bytes} B/s, {iops} IOPS"
        );
        assert_eq!(idle["write_iops"].as_f64(), Some(0.0), "{v}");
        assert!(
            idle["write_latency_ms"].is_null(),
            "no writes, no latency: {v}"
        );
    }
    // The human view names the columns and the volumes.
    let mut args = d.cli_prefix();
    args.extend(["top", "--interval", "100ms", "--count", "1"].map(String::from));
    let out = run_ok(Command::new(&args[0]).args(&args[1..]));
    assert!(
        out.starts_with("VOLUME") && out.contains("COW/S") && out.contains("idle"),
        "{out}"
    );
    let prefix = d.cli_prefix();
    let (ok, _, err) =
        run(Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["top", "--interval", "0s"]));
    assert!(!ok && err.contains("invalid --interval"), "{err}");
}

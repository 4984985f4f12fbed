//! The daemon's numbers: one gathering of every volume's request counters,
//! device queues, copy jobs and replication links ([`gather`], the control
//! request `stats` that `snapblk top` polls), and the same numbers as a
//! Prometheus/OpenMetrics text endpoint (`--metrics-listen`, rendered with
//! the `prometheus-client` crate). README "Metrics" documents every metric.
//!
//! The endpoint follows the daemon's rule for network addresses: a TCP
//! listener answers only requests that carry the bearer token of
//! `--metrics-token-file` (Prometheus' `authorization: credentials_file`),
//! a UNIX socket only peers the control socket admits. Every read and write
//! on a scrape connection has a timeout, and a request head is read up to a
//! fixed size, so a silent or hostile client costs one thread for seconds.
//!
//! Must never: take a lock in the I/O path (it reads counters the engine
//! keeps with atomics) or let a scrape disturb anything else.

use crate::copy::Jobs;
use crate::engine::LATENCY_BOUNDS_US;
use crate::replication::Replication;
use crate::security::LocalPeers;
use crate::volumes::Registry;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Everything `stats` returns: what `volume list`, `device list`, `copy
/// list` and `replicate status` say, gathered at one moment.
pub fn gather(registry: &Registry, jobs: &Jobs, replication: &Replication) -> Value {
    json!({
        "volumes": registry.list_volumes().unwrap_or_else(|_| json!([])),
        "devices": registry.list_devices().unwrap_or_else(|_| json!([])),
        "copy_jobs": jobs.list(),
        "replication": replication.status(None, None).map(|s| s["links"].clone()).unwrap_or_else(|_| json!([])),
        "latency_bounds_us": LATENCY_BOUNDS_US,
    })
}

/// The request kinds a volume counts, as `volume info` names them.
const OPS: [&str; 4] = ["read", "write", "flush", "zero"];

/// One scrape's numbers, encoded on demand by the crate's text encoder.
#[derive(Debug)]
struct Scrape(Value);

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Writes one metric family: a descriptor, then each labelled sample.
fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, m) in samples {
        m.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counters<'a>(
    rows: impl IntoIterator<Item = (Labels<'a>, u64)>,
) -> impl Iterator<Item = (Labels<'a>, ConstCounter<u64>)> {
    rows.into_iter().map(|(l, v)| (l, ConstCounter::new(v)))
}

fn gauges<'a>(
    rows: impl IntoIterator<Item = (Labels<'a>, f64)>,
) -> impl Iterator<Item = (Labels<'a>, ConstGauge<f64>)> {
    rows.into_iter().map(|(l, v)| (l, ConstGauge::new(v)))
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let empty = Vec::new();
        let list = |key: &str| s[key].as_array().unwrap_or(&empty).clone();
        let volumes: Vec<Value> = list("volumes")
            .into_iter()
            .filter(|v| v["io"].is_object())
            .collect();
        let name = |v: &Value| v["name"].as_str().unwrap_or("").to_string();
        let names: Vec<String> = volumes.iter().map(name).collect();
        let vol = |i: usize| vec![("volume", names[i].as_str())];
        let per_volume = |field: &str| -> Vec<(Labels, f64)> {
            (0..volumes.len())
                .map(|i| (vol(i), volumes[i][field].as_f64().unwrap_or(0.0)))
                .collect()
        };
        family(
            &mut e,
            "snapblk_volume_capacity_bytes",
            "Size of the volume as clients see it.",
            gauges(per_volume("capacity")),
        )?;
        family(
            &mut e,
            "snapblk_volume_used_bytes",
            "Bytes the volume's origin, change logs and journals take on disk.",
            gauges(per_volume("used_bytes")),
        )?;
        family(
            &mut e,
            "snapblk_volume_free_bytes",
            "Free bytes of the filesystem holding the volume.",
            gauges(per_volume("free_bytes")),
        )?;
        family(
            &mut e,
            "snapblk_volume_snapshots",
            "Snapshots the volume holds (user, schedule, copy job and replication ones).",
            gauges(per_volume("snapshots")),
        )?;
        family(
            &mut e,
            "snapblk_volume_preserved_chunks",
            "Chunks copied out for snapshots (copy-on-write) since the volume opened.",
            counters((0..volumes.len()).map(|i| (vol(i), u(&volumes[i]["preserved_chunks"])))),
        )?;
        family(
            &mut e,
            "snapblk_volume_cloned_chunks",
            "Of the preserved chunks, those whose change-log slot shares the origin's blocks (reflink) instead of a copy.",
            counters((0..volumes.len()).map(|i| (vol(i), u(&volumes[i]["cloned_chunks"])))),
        )?;
        let per_op = |what: &str| -> Vec<(Labels, u64)> {
            let mut rows = Vec::new();
            for (i, v) in volumes.iter().enumerate() {
                for op in OPS {
                    let mut l = vol(i);
                    l.push(("op", op));
                    rows.push((l, u(&v["io"][op][what])));
                }
            }
            rows
        };
        family(
            &mut e,
            "snapblk_volume_requests",
            "Requests served through any view of the volume (ublk, NBD, copy jobs, replication), by kind.",
            counters(per_op("ops")),
        )?;
        family(
            &mut e,
            "snapblk_volume_bytes",
            "Bytes of the requests that succeeded, by kind (zero: discard and write-zeroes).",
            counters(per_op("bytes")),
        )?;
        family(
            &mut e,
            "snapblk_volume_errors",
            "Requests that failed, by kind.",
            counters(per_op("errors")),
        )?;
        let bounds: Vec<f64> = LATENCY_BOUNDS_US
            .iter()
            .map(|&b| b as f64 / 1e6)
            .chain([f64::INFINITY])
            .collect();
        if !volumes.is_empty() {
            let mut metric = e.encode_descriptor(
                "snapblk_volume_request_latency_seconds",
                "Time from a request reaching the engine to its completion, by kind.",
                None,
                MetricType::Histogram,
            )?;
            for (i, v) in volumes.iter().enumerate() {
                for op in OPS {
                    let k = &v["io"][op];
                    // Per bucket: the encoder sums them into `le` counts.
                    let buckets: Vec<(f64, u64)> = bounds
                        .iter()
                        .zip(k["latency_buckets"].as_array().unwrap_or(&empty))
                        .map(|(&b, n)| (b, u(n)))
                        .collect();
                    let mut l = vol(i);
                    l.push(("op", op));
                    metric.encode_family(&l)?.encode_histogram::<NoLabelSet>(
                        k["latency_sum_s"].as_f64().unwrap_or(0.0),
                        u(&k["ops"]),
                        &buckets,
                        None,
                    )?;
                }
            }
        }

        let devices = list("devices");
        let mut queue_rows = Vec::new();
        for d in &devices {
            let path = d["path"].as_str().unwrap_or("");
            for (q, n) in d["requests"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .enumerate()
            {
                queue_rows.push((
                    d["volume"].as_str().unwrap_or(""),
                    path,
                    q.to_string(),
                    u(n),
                ));
            }
        }
        family(
            &mut e,
            "snapblk_device_queue_requests",
            "Requests each ublk queue has served since its device started.",
            queue_rows.iter().map(|(v, p, q, n)| {
                (
                    vec![("volume", *v), ("device", *p), ("queue", q.as_str())],
                    ConstCounter::new(*n),
                )
            }),
        )?;

        let jobs = list("copy_jobs");
        let ids: Vec<String> = jobs.iter().map(|j| u(&j["id"]).to_string()).collect();
        let job = |i: usize| {
            vec![
                ("job", ids[i].as_str()),
                ("volume", jobs[i]["volume"].as_str().unwrap_or("")),
                ("state", jobs[i]["state"].as_str().unwrap_or("")),
            ]
        };
        family(
            &mut e,
            "snapblk_copy_job_done_bytes",
            "Bytes a copy job has copied so far.",
            gauges((0..jobs.len()).map(|i| (job(i), u(&jobs[i]["bytes_done"]) as f64))),
        )?;
        family(
            &mut e,
            "snapblk_copy_job_size_bytes",
            "Bytes a copy job copies in all.",
            gauges((0..jobs.len()).map(|i| (job(i), u(&jobs[i]["size"]) as f64))),
        )?;

        let links = list("replication");
        let link = |i: usize| {
            vec![
                ("volume", links[i]["volume"].as_str().unwrap_or("")),
                ("role", links[i]["role"].as_str().unwrap_or("")),
            ]
        };
        let with = |field: &str| -> Vec<(Labels, f64)> {
            (0..links.len())
                .filter_map(|i| Some((link(i), links[i][field].as_f64()?)))
                .collect()
        };
        family(
            &mut e,
            "snapblk_replication_lag_seconds",
            "Age of the newest consistency point the replica has applied.",
            gauges(with("lag_seconds")),
        )?;
        family(
            &mut e,
            "snapblk_replication_lag_bytes",
            "Bytes written on the source since its newest applied consistency point.",
            gauges(with("lag_bytes")),
        )?;
        family(
            &mut e,
            "snapblk_replication_sent_bytes",
            "Bytes the source has sent to its replica.",
            counters(with("bytes_sent").into_iter().map(|(l, v)| (l, v as u64))),
        )?;
        family(
            &mut e,
            "snapblk_replication_consistency_points",
            "Consistency points the replica acknowledged.",
            counters(with("cps").into_iter().map(|(l, v)| (l, v as u64))),
        )?;
        Ok(())
    }
}

/// `stats` as OpenMetrics text.
pub fn render(stats: Value) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Scrape(stats)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("encoding into a String cannot fail");
    out
}

/// The largest request head a scrape may send.
const MAX_REQUEST_HEAD: usize = 8192;
/// How long a scrape connection may take to send its request or read the
/// answer.
const SCRAPE_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Where `--metrics-listen` serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    /// HOST:PORT; needs a token.
    Tcp(String),
    /// A path (it has a `/`): the peer rule of the control socket.
    Unix(PathBuf),
}

impl MetricsAddr {
    pub fn parse(s: &str) -> MetricsAddr {
        if s.contains('/') {
            MetricsAddr::Unix(PathBuf::from(s))
        } else {
            MetricsAddr::Tcp(s.to_string())
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Who may scrape.
enum Admission {
    Token([u8; 32]),
    Peers(LocalPeers),
}

/// A running metrics endpoint; [`MetricsServer::stop`] ends it.
pub struct MetricsServer {
    listener: Arc<Listener>,
    thread: Option<JoinHandle<()>>,
    /// The address it listens on (a bound port, for `HOST:0`).
    pub bound: String,
}

/// Reads the bearer token: the file's first line, which must not be empty,
/// from a file only its owner can read.
fn read_token(path: &Path) -> anyhow::Result<[u8; 32]> {
    crate::security::check_private_file_mode(path, "metrics token file")?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!("cannot read the metrics token file {}: {e}", path.display())
    })?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < 16 {
        anyhow::bail!(
            "the metrics token in {} is shorter than 16 characters; put a long random one \
             there (e.g. `openssl rand -hex 32 > {}`)",
            path.display(),
            path.display()
        );
    }
    Ok(Sha256::digest(token.as_bytes()).into())
}

impl MetricsServer {
    /// Binds `addr`. A TCP address without `token_file` is refused: nothing
    /// answers on a network address without authenticating the peer.
    pub fn start(
        addr: &MetricsAddr,
        token_file: Option<&Path>,
        peers: LocalPeers,
        stats: impl Fn() -> Value + Send + 'static,
    ) -> anyhow::Result<MetricsServer> {
        let admission = match (addr, token_file) {
            (_, Some(path)) => Admission::Token(read_token(path)?),
            (MetricsAddr::Unix(_), None) => Admission::Peers(peers),
            (MetricsAddr::Tcp(a), None) => anyhow::bail!(
                "refusing to serve metrics on {a} without a token: give --metrics-token-file \
                 FILE (Prometheus sends it with `authorization: {{credentials_file: FILE}}`), \
                 or serve them on a UNIX socket (--metrics-listen /PATH)"
            ),
        };
        let (listener, bound) = match addr {
            MetricsAddr::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(|e| {
                    anyhow::anyhow!("cannot listen for metrics on {a}: {e}; pick another address")
                })?;
                let bound = l.local_addr()?.to_string();
                (Listener::Tcp(l), bound)
            }
            MetricsAddr::Unix(p) => {
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(p);
                    }
                }
                let l = UnixListener::bind(p).map_err(|e| {
                    anyhow::anyhow!("cannot listen for metrics on {}: {e}", p.display())
                })?;
                // As the control socket: the owner and its group may connect
                // (the peer check then decides).
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660))?;
                peers.give_socket_to_group(p);
                (Listener::Unix(l, p.clone()), p.display().to_string())
            }
        };
        let listener = Arc::new(listener);
        let accepting = listener.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&accepting, &admission, &stats))?;
        log::info!("metrics on {bound}");
        Ok(MetricsServer {
            listener,
            thread: Some(thread),
            bound,
        })
    }

    pub fn stop(&mut self) {
        let fd = match &*self.listener {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        // SAFETY: shutdown on a socket we own; it wakes the blocked accept.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Listener::Unix(_, p) = &*self.listener {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One scrape at a time: scrapes are seconds apart, and each is bounded by
/// [`SCRAPE_IO_TIMEOUT`].
fn serve(listener: &Listener, admission: &Admission, stats: &dyn Fn() -> Value) {
    loop {
        let result = match listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_read_timeout(Some(SCRAPE_IO_TIMEOUT));
                let _ = s.set_write_timeout(Some(SCRAPE_IO_TIMEOUT));
                scrape(s, None, admission, stats)
            }),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| {
                let _ = s.set_read_timeout(Some(SCRAPE_IO_TIMEOUT));
                let _ = s.set_write_timeout(Some(SCRAPE_IO_TIMEOUT));
                let fd = s.as_raw_fd();
                scrape(s, Some(fd), admission, stats)
            }),
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::debug!("metrics: a scrape failed: {e}"),
            // Shut down (stop), or the listener is gone.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => {
                log::warn!("metrics: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads a request head up to its blank line, [`MAX_REQUEST_HEAD`] at most.
fn request_head(stream: &mut impl Read) -> io::Result<String> {
    let mut head = Vec::with_capacity(1024);
    let mut byte = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = stream.read(&mut byte[..512.min(MAX_REQUEST_HEAD - head.len())])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&byte[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn respond(stream: &mut impl Write, status: &str, kind: &str, body: &str) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Whether the head carries `Authorization: Bearer TOKEN` with the token.
fn bearer_matches(head: &str, token: &[u8; 32]) -> bool {
    head.lines().any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        let value = value.trim();
        name.trim().eq_ignore_ascii_case("authorization")
            && value.len() > 7
            && value[..7].eq_ignore_ascii_case("bearer ")
            // Digests compared: equal-length inputs, no early exit on the token.
            && Sha256::digest(value[7..].trim().as_bytes()).as_slice() == token
    })
}

fn scrape(
    mut stream: impl Read + Write,
    unix_fd: Option<i32>,
    admission: &Admission,
    stats: &dyn Fn() -> Value,
) -> io::Result<()> {
    const TEXT: &str = "text/plain; charset=utf-8";
    // The head is read first even from a peer about to be refused: closing
    // on unread bytes would reset the connection before it reads why.
    let head = request_head(&mut stream)?;
    if let (Admission::Peers(peers), Some(fd)) = (admission, unix_fd) {
        // Every volume's numbers: for superusers, as the `stats` request.
        let refused = match peers.check(fd, "metrics socket") {
            Ok(c) if c.superuser => None,
            Ok(c) => Some(format!(
                "permission denied: {} may not read every volume's metrics (only root and \
                 the data directory's owner may)",
                c.describe()
            )),
            Err(why) => Some(why),
        };
        if let Some(why) = refused {
            return respond(&mut stream, "403 Forbidden", TEXT, &format!("{why}\n"));
        }
    }
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    if let Admission::Token(token) = admission {
        if !bearer_matches(&head, token) {
            return respond(
                &mut stream,
                "401 Unauthorized",
                TEXT,
                "a bearer token is required: send `Authorization: Bearer TOKEN` with the token of \
                 the daemon's --metrics-token-file\n",
            );
        }
    }
    if method != "GET" || path.split('?').next() != Some("/metrics") {
        return respond(
            &mut stream,
            "404 Not Found",
            TEXT,
            "only GET /metrics is served here\n",
        );
    }
    respond(
        &mut stream,
        "200 OK",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        &render(stats()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_token_is_matched_whatever_the_header_case_and_only_exactly() {
        let token: [u8; 32] = Sha256::digest(b"0123456789abcdef0123").into();
        let head = |h: &str| format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{h}\r\n\r\n");
        assert!(bearer_matches(
            &head("Authorization: Bearer 0123456789abcdef0123"),
            &token
        ));
        assert!(bearer_matches(
            &head("authorization: bearer  0123456789abcdef0123 "),
            &token
        ));
        assert!(!bearer_matches(
            &head("Authorization: Bearer 0123456789abcdef012"),
            &token
        ));
        assert!(!bearer_matches(
            &head("Authorization: Basic 0123456789abcdef0123"),
            &token
        ));
        assert!(!bearer_matches(
            &head("X-Token: 0123456789abcdef0123"),
            &token
        ));
    }

    #[test]
    fn a_request_head_larger_than_the_limit_is_refused_before_it_is_all_read() {
        let big = vec![b'a'; MAX_REQUEST_HEAD * 4];
        let mut r = &big[..];
        let e = request_head(&mut r).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(big.len() - r.len(), MAX_REQUEST_HEAD);
    }
}

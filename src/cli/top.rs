//! `snapblk top`: polls the daemon's `stats` and shows, per volume, what
//! happened between two polls: requests and bytes per second, mean latency,
//! chunks preserved per second (the copy-on-write rate), snapshots held and
//! replication lag. `--json` prints one object per interval, for scripts.

use super::client::{self, CliError, Endpoint};
use super::replicate::parse_duration_ms;
use crate::control::protocol::Request;
use clap::Args;
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};

use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Time between two views (ms, s, m)
    #[arg(long, value_name = "DUR", default_value = "1s")]
    pub interval: String,
    /// Stop after N views (0: until interrupted)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub count: u64,
}

/// One volume's rates over an interval.
fn rates(before: &Value, after: &Value, secs: f64) -> Value {
    let delta = |path: &[&str]| {
        let get = |v: &Value| path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(0.0);
        (get(after) - get(before)).max(0.0)
    };
    let per_s = |path: &[&str]| delta(path) / secs;
    let mean_ms = |op: &str| {
        let ops = delta(&["io", op, "ops"]);
        (ops > 0.0).then(|| delta(&["io", op, "latency_sum_s"]) * 1000.0 / ops)
    };
    let errors: f64 = ["read", "write", "flush", "zero"]
        .iter()
        .map(|op| per_s(&["io", op, "errors"]))
        .sum();
    json!({
        "volume": after["name"],
        "read_iops": per_s(&["io", "read", "ops"]),
        "write_iops": per_s(&["io", "write", "ops"]),
        "flushes_per_s": per_s(&["io", "flush", "ops"]),
        "read_bytes_per_s": per_s(&["io", "read", "bytes"]),
        "write_bytes_per_s": per_s(&["io", "write", "bytes"]) + per_s(&["io", "zero", "bytes"]),
        "read_latency_ms": mean_ms("read"),
        "write_latency_ms": mean_ms("write"),
        "errors_per_s": errors,
        "preserved_chunks_per_s": per_s(&["preserved_chunks"]),
        "snapshots": after["snapshots"],
    })
}

/// Every volume present in both samples, with its replication lag.
fn view(before: &Value, after: &Value, secs: f64) -> Value {
    let empty = Vec::new();
    let list = |v: &Value, k: &str| v[k].as_array().unwrap_or(&empty).clone();
    let old = list(before, "volumes");
    let links = list(after, "replication");
    let volumes: Vec<Value> = list(after, "volumes")
        .iter()
        .filter(|v| v["io"].is_object())
        .filter_map(|v| {
            let prior = old.iter().find(|o| o["name"] == v["name"])?;
            let mut r = rates(prior, v, secs);
            r["replication_lag_s"] = links
                .iter()
                .find(|l| l["volume"] == v["name"] && l["role"] == "source")
                .map_or(Value::Null, |l| l["lag_seconds"].clone());
            Some(r)
        })
        .collect();
    json!({ "interval_s": secs, "volumes": volumes })
}

fn human(view: &Value) -> String {
    let num = |v: &Value, digits: usize| match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "-".to_string(),
    };
    let mb = |v: &Value| format!("{:.1}", v.as_f64().unwrap_or(0.0) / 1e6);
    let rows: Vec<Vec<String>> = view["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                r["volume"].as_str().unwrap_or("?").to_string(),
                num(&r["read_iops"], 0),
                num(&r["write_iops"], 0),
                mb(&r["read_bytes_per_s"]),
                mb(&r["write_bytes_per_s"]),
                num(&r["read_latency_ms"], 2),
                num(&r["write_latency_ms"], 2),
                num(&r["preserved_chunks_per_s"], 0),
                num(&r["snapshots"], 0),
                num(&r["replication_lag_s"], 1),
            ]
        })
        .collect();
    super::output::table(
        &[
            "VOLUME", "R/S", "W/S", "R MB/S", "W MB/S", "R MS", "W MS", "COW/S", "SNAPS", "LAG S",
        ],
        &rows,
    )
}

pub fn run(control: &Endpoint, json: bool, a: TopArgs) -> Result<(), CliError> {
    let interval = parse_duration_ms(&a.interval)
        .ok()
        .filter(|&ms| ms > 0)
        .ok_or_else(|| {
            CliError::plain(format!(
                "invalid --interval {:?}; give a positive duration, e.g. 1s or 500ms",
                a.interval
            ))
        })?;
    let tty = std::io::stdout().is_terminal() && !json;
    let mut before = client::request(control, &Request::Stats {})?;
    let mut taken = Instant::now();
    let mut shown = 0;
    while a.count == 0 || shown < a.count {
        std::thread::sleep(Duration::from_millis(interval));
        let after = client::request(control, &Request::Stats {})?;
        let now = Instant::now();
        let v = view(&before, &after, (now - taken).as_secs_f64());
        let mut out = std::io::stdout().lock();
        if json {
            let _ = writeln!(out, "{v}");
        } else {
            if tty {
                // Home and clear: a live view, like top(1).
                let _ = write!(out, "\x1b[H\x1b[2J");
            }
            let _ = write!(out, "{}", human(&v));
            if !tty {
                let _ = writeln!(out);
            }
        }
        let _ = out.flush();
        (before, taken) = (after, now);
        shown += 1;
    }
    Ok(())
}

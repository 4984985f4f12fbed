//! `snapblk replicate ...`: replication links and replicas (see
//! `src/replication`), and its human output.

use super::client::{CliError, Endpoint};
use super::{name_arg, output, reply, size_arg, strip_os_error};
use crate::control::protocol::Request;
use crate::replication::ReplicateStart;
use clap::Subcommand;
use serde_json::Value;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum ReplicateCmd {
    /// Replicate a volume, or every member of a group with shared consistency points, to another daemon (destination volumes are created there if absent)
    Start {
        /// The volume to replicate (or --group)
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        volume: Option<String>,
        /// Replicate every volume of this consistency group; each goes to a destination volume of its own name
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// Destination daemon's --replication-listen address and volume (HOST:PORT with --group)
        #[arg(long, value_name = "HOST:PORT/DESTVOL")]
        to: String,
        /// Time between consistency points, e.g. 500ms, 10s, 5m [default: 10s]
        #[arg(long, value_name = "DURATION")]
        cp_interval: Option<String>,
        /// The key shared with the destination, a file readable by its owner
        /// only [default: DATA_DIR/replication.key]
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
        /// Consistency-point snapshots (cp-N) the destination keeps [default: 1]
        #[arg(long, value_name = "N")]
        keep_cps: Option<u32>,
        /// Write log size before falling back to dirty-block resync [default: 64M]
        #[arg(long, value_name = "SIZE")]
        max_log: Option<String>,
        /// The unit writes are tracked and shipped in, a power of two from 4K to the volume's chunk size [default: 4K]
        #[arg(long, value_name = "SIZE")]
        block_size: Option<String>,
        /// Failback: VOLUME is a promoted replica and DESTVOL its old source;
        /// send only what either side changed since the last consistency
        /// point both hold (DESTVOL's own changes are kept in a snapshot
        /// `failback-<time>` there, then overwritten)
        #[arg(long)]
        resync: bool,
    },
    /// Stop replicating a volume or a group (the replicas stay at their last consistency point)
    Stop {
        #[command(flatten)]
        of: VolumeOrGroup,
    },
    /// Show links from this daemon and replicas on it (a group's links with --group)
    Status {
        /// Only this volume's link or replica [default: all]
        #[arg(conflicts_with = "group")]
        volume: Option<String>,
        /// The links of this group's members, and which members a shared consistency point waits for
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
    },
    /// Take a consistency point now (one shared by a group's members with --group) and wait until the destination applied it
    Cp {
        #[command(flatten)]
        of: VolumeOrGroup,
    },
    /// On the destination: turn a replica into a normal writable volume (failover)
    Promote {
        /// The replica, on this daemon
        volume: String,
    },
}

/// `VOL` or `--group GROUP`.
#[derive(clap::Args, Debug)]
pub struct VolumeOrGroup {
    /// The replicated volume (or --group)
    #[arg(required_unless_present = "group", conflicts_with = "group")]
    volume: Option<String>,
    /// Every member of this replicated consistency group
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
}

impl VolumeOrGroup {
    /// The request's `volume` (empty with a group) and `group`, and what
    /// the human output calls it.
    fn parts(self) -> (String, Option<String>, String) {
        match self.group {
            Some(g) => (String::new(), Some(g.clone()), format!("group {g}")),
            None => {
                let v = self.volume.expect("clap requires a volume without --group");
                (v.clone(), None, format!("volume {v}"))
            }
        }
    }
}

/// `500ms`, `10s`, `5m`, `1h`, `1d` or plain seconds -> milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let factor = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => 0,
    };
    match num.parse::<u64>() {
        Ok(n) if factor > 0 => n
            .checked_mul(factor)
            .ok_or_else(|| format!("invalid duration {text:?}: too large")),
        _ => Err(format!(
            "invalid duration {text:?}; use a number with ms, s, m, h or d, e.g. 10s"
        )),
    }
}

pub fn run(control: &Endpoint, json: bool, cmd: ReplicateCmd) -> Result<(), CliError> {
    match cmd {
        ReplicateCmd::Start {
            volume,
            group,
            to,
            cp_interval,
            key_file,
            keep_cps,
            max_log,
            block_size,
            resync,
        } => {
            let what = match (&volume, &group) {
                (Some(v), _) => {
                    name_arg("volume", v)?;
                    format!("volume {v}")
                }
                (_, Some(g)) => {
                    name_arg("group", g)?;
                    format!("group {g}")
                }
                _ => unreachable!("clap requires a volume or --group"),
            };
            let cp_interval_ms = cp_interval
                .map(|d| parse_duration_ms(&d).map_err(CliError::plain))
                .transpose()?;
            let key_file = key_file
                .map(|p| {
                    p.canonicalize()
                        .map(|p| p.to_string_lossy().into_owned())
                        .map_err(|e| {
                            CliError::new(
                                format!(
                                    "cannot use {} as the key file: {}",
                                    p.display(),
                                    strip_os_error(&e.to_string())
                                ),
                                "give a file holding the key shared with the destination",
                            )
                        })
                })
                .transpose()?;
            let max_log_bytes = max_log.map(|s| size_arg(&s)).transpose()?;
            let block_size = block_size.map(|s| size_arg(&s)).transpose()?;
            let req = Request::ReplicateStart(ReplicateStart {
                volume: volume.unwrap_or_default(),
                group: group.clone(),
                to: to.clone(),
                cp_interval_ms,
                key_file,
                keep_cps,
                max_log_bytes,
                block_size,
                resync,
            });
            let see = match &group {
                Some(g) => format!("--group {g}"),
                None => what.trim_start_matches("volume ").to_string(),
            };
            let how = if resync {
                " (failback: resyncing what changed on either side)"
            } else {
                ""
            };
            reply(control, json, &req, |_| {
                println!("replicating {what} to {to}{how}; see `snapblk replicate status {see}`")
            })
        }
        ReplicateCmd::Stop { of } => {
            let (volume, group, what) = of.parts();
            let req = Request::ReplicateStop { volume, group };
            reply(control, json, &req, |_| {
                println!("stopped replicating {what}")
            })
        }
        ReplicateCmd::Status { volume, group } => {
            let req = Request::ReplicateStatus { volume, group };
            reply(control, json, &req, |r| {
                if let Some(waiting) = r["waiting_for"].as_array().filter(|w| !w.is_empty()) {
                    let names: Vec<&str> = waiting.iter().filter_map(Value::as_str).collect();
                    println!(
                        "group {}: the next shared consistency point waits for {}",
                        output::str_of(r, "group"),
                        names.join(", ")
                    );
                }
                print!("{}", status(r))
            })
        }
        ReplicateCmd::Cp { of } => {
            let (volume, group, what) = of.parts();
            let req = Request::ReplicateCp { volume, group };
            reply(control, json, &req, |r| {
                let cp = match r["members"].as_array() {
                    Some(m) => m.first().map_or("-".into(), |m| output::str_of(m, "cp")),
                    None => output::str_of(r, "cp"),
                };
                println!("consistency point {cp} of {what} applied on the destination")
            })
        }
        ReplicateCmd::Promote { volume } => {
            let req = Request::ReplicatePromote {
                volume: volume.clone(),
            };
            reply(control, json, &req, |r| {
                println!(
                    "volume {volume} is a normal writable volume now (its image is consistency point {})",
                    output::str_of(r, "last_cp")
                )
            })
        }
    }
}

/// `replicate status` for people: one block of `key: value` per link.
fn status(r: &Value) -> String {
    let mut out = format!("listening: {}\n", output::str_of(r, "listen"));
    let links = r
        .get("links")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if links.is_empty() {
        out.push_str("no replication links or replicas\n");
    }
    for l in &links {
        let when = l
            .get("last_cp_unix_ms")
            .and_then(Value::as_u64)
            .map(output::format_unix_ms)
            .unwrap_or_else(|| "-".into());
        let lag = match l.get("lag_seconds").and_then(Value::as_f64) {
            Some(s) => format!("{s:.1} s"),
            None => "-".into(),
        };
        out.push('\n');
        let mut pairs = vec![
            ("volume", output::str_of(l, "volume")),
            ("role", output::str_of(l, "role")),
            ("state", output::str_of(l, "state")),
        ];
        if output::str_of(l, "role") == "source" {
            pairs.extend([
                ("to", output::str_of(l, "to")),
                (
                    "last cp",
                    format!("{} at {when}", output::str_of(l, "last_cp")),
                ),
                ("lag", format!("{}, {lag}", output::size_of(l, "lag_bytes"))),
                ("bytes written", output::size_with_bytes(l, "bytes_written")),
                ("bytes sent", output::size_with_bytes(l, "bytes_sent")),
                (
                    "saved by references",
                    output::size_with_bytes(l, "bytes_saved"),
                ),
                ("dirty blocks", output::str_of(l, "dirty_blocks")),
                ("resync blocks", output::str_of(l, "resync_blocks")),
                ("sync progress", sync_progress(l)),
                ("failback base cp", output::str_of(l, "failback_base_cp")),
                ("error", output::str_of(l, "error")),
            ]);
        } else {
            pairs.extend([
                ("source", output::str_of(l, "source")),
                (
                    "last cp",
                    format!("{} at {when}", output::str_of(l, "last_cp")),
                ),
                ("since last cp", lag),
                ("failback snapshot", output::str_of(l, "failback_snapshot")),
                (
                    "bytes received",
                    output::size_with_bytes(l, "bytes_received"),
                ),
            ]);
        }
        out.push_str(&output::key_values(&pairs));
    }
    out
}

/// A running (or the last) full copy or resync: `done of total (P%)`.
fn sync_progress(l: &Value) -> String {
    let get = |k: &str| l.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (done, total) = (get("sync_done_bytes"), get("sync_total_bytes"));
    if total == 0 {
        return "-".into();
    }
    format!(
        "{} of {} ({} of {} blocks, {:.0}%)",
        super::size::format_size(done),
        super::size::format_size(total),
        get("sync_done_blocks"),
        get("sync_total_blocks"),
        done as f64 * 100.0 / total as f64
    )
}

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("2"), Ok(2000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert!(parse_duration_ms("5x").is_err());
        assert!(parse_duration_ms("s").is_err());
    }
}

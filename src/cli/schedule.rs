//! `snapblk schedule ...`: snapshots on a schedule with retention (see
//! `src/schedule`), and its human output.

use super::client::{CliError, Endpoint};
use super::output::{format_unix_ms, str_of, table};
use super::replicate::parse_duration_ms;
use super::{name_arg, reply};
use crate::control::protocol::Request;
use crate::schedule::ScheduleAdd;
use clap::Subcommand;
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub enum ScheduleCmd {
    /// Snapshot a volume (VOL) or a group (--group GROUP) every DUR, keeping the newest N
    Add {
        /// The volume to snapshot (or --group)
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        volume: Option<String>,
        /// Take group snapshots of this consistency group
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// Interval: 30s, 15m, 1h, 1d (at least 1s)
        #[arg(long, value_name = "DUR")]
        every: String,
        /// Run on a grid starting at this time of day (HH:MM, UTC)
        #[arg(long, value_name = "HH:MM")]
        at: Option<String>,
        /// How many of this schedule's snapshots to keep (older ones are deleted)
        #[arg(long, value_name = "N")]
        keep: u32,
        /// Snapshot names are PREFIX plus the run number [default: auto<ID>-]
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
        #[command(flatten)]
        hooks: super::HookArgs,
    },
    /// List the schedules with their next run and last result
    #[command(alias = "ls")]
    List,
    /// Remove a schedule (the snapshots it took stay)
    #[command(alias = "rm")]
    Remove {
        /// The schedule's id (`schedule list`)
        id: u64,
    },
    /// Stop taking snapshots until `schedule resume`
    Pause {
        /// The schedule's id (`schedule list`)
        id: u64,
    },
    /// Take snapshots again (a run that fell due meanwhile is taken at once)
    Resume {
        /// The schedule's id (`schedule list`)
        id: u64,
    },
}

pub fn run(control: &Endpoint, json: bool, cmd: ScheduleCmd) -> Result<(), CliError> {
    match cmd {
        ScheduleCmd::Add {
            volume,
            group,
            every,
            at,
            keep,
            prefix,
            hooks,
        } => {
            if let Some(g) = &group {
                name_arg("group", g)?;
            }
            let every_ms = parse_duration_ms(&every).map_err(CliError::plain)?;
            let req = Request::ScheduleAdd(ScheduleAdd {
                volume,
                group,
                every_ms,
                at,
                keep,
                prefix,
                quiesce: hooks.quiesce()?,
            });
            reply(control, json, &req, |r| {
                println!(
                    "schedule {} added: snapshots of {} every {every}, keeping {keep}; next run {}",
                    str_of(r, "id"),
                    target(r),
                    when(&r["next_run_unix_ms"]),
                )
            })
        }
        ScheduleCmd::List => reply(control, json, &Request::ScheduleList {}, |r| {
            print!("{}", list(r))
        }),
        ScheduleCmd::Remove { id } => reply(control, json, &Request::ScheduleRemove { id }, |r| {
            let kept = r["snapshots_kept"].as_array().map_or(0, Vec::len);
            println!("removed schedule {id}; the {kept} snapshot(s) it took stay")
        }),
        ScheduleCmd::Pause { id } => reply(control, json, &Request::SchedulePause { id }, |_| {
            println!("paused schedule {id}")
        }),
        ScheduleCmd::Resume { id } => reply(control, json, &Request::ScheduleResume { id }, |r| {
            println!(
                "resumed schedule {id}; next run {}",
                when(&r["next_run_unix_ms"])
            )
        }),
    }
}

fn target(r: &Value) -> String {
    match r["volume"].as_str() {
        Some(v) => format!("volume {v}"),
        None => format!("group {}", str_of(r, "group")),
    }
}

fn when(ms: &Value) -> String {
    ms.as_u64().map_or_else(|| "-".to_string(), format_unix_ms)
}

fn list(r: &Value) -> String {
    let all = r.as_array().cloned().unwrap_or_default();
    if all.is_empty() {
        return "no schedules; add one with `snapblk schedule add VOL --every 1h --keep 24`\n"
            .to_string();
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            let last = &s["last_result"];
            let result = if last.is_null() {
                "-".to_string()
            } else if last["ok"].as_bool() == Some(true) {
                format!("ok: {}", str_of(last, "snapshot"))
            } else {
                format!("error: {}", str_of(last, "error"))
            };
            let every = s["every_ms"].as_u64().unwrap_or(0);
            let every = match s["at"].as_str() {
                Some(at) => format!("{}s from {at}", every / 1000),
                None => format!("{}s", every / 1000),
            };
            vec![
                str_of(s, "id"),
                target(s),
                every,
                str_of(s, "keep"),
                if s["paused"].as_bool() == Some(true) {
                    "paused".to_string()
                } else {
                    when(&s["next_run_unix_ms"])
                },
                when(&s["last_run_unix_ms"]),
                result,
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "OF",
            "EVERY",
            "KEEP",
            "NEXT RUN",
            "LAST RUN",
            "LAST RESULT",
        ],
        &rows,
    )
}

//! `snapblk group ...` and `snapblk snapshot ... --group`: consistency
//! groups (see `src/volumes/groups.rs`), and their human output.

use super::client::{CliError, Endpoint};
use super::output::{format_unix_ms, str_of, table};
use super::{name_arg, reply};
use crate::control::protocol::Request;
use crate::quiesce::Quiesce;
use clap::Subcommand;
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// Make volumes a consistency group: their snapshots are taken at one instant
    Create {
        /// The group's name
        name: String,
        /// Its volumes (each in one group at most)
        #[arg(required = true, value_name = "VOL")]
        volumes: Vec<String>,
    },
    /// List the groups
    #[command(alias = "ls")]
    List,
    /// Show a group's volumes and snapshots
    Info {
        /// The group
        name: String,
    },
    /// Delete a group (not its volumes); its snapshots must be deleted first
    #[command(alias = "rm")]
    Delete {
        /// The group
        name: String,
    },
}

pub fn run(control: &Endpoint, json: bool, cmd: GroupCmd) -> Result<(), CliError> {
    match cmd {
        GroupCmd::Create { name, volumes } => {
            name_arg("group", &name)?;
            let req = Request::GroupCreate {
                name: name.clone(),
                volumes: volumes.clone(),
            };
            reply(control, json, &req, |_| {
                println!("created group {name} of {}", volumes.join(", "))
            })
        }
        GroupCmd::List => reply(control, json, &Request::GroupList {}, |r| {
            print!("{}", list(r))
        }),
        GroupCmd::Info { name } => reply(control, json, &Request::GroupInfo { name }, |r| {
            print!("{}", info(r))
        }),
        GroupCmd::Delete { name } => {
            let req = Request::GroupDelete { name: name.clone() };
            reply(control, json, &req, |_| println!("deleted group {name}"))
        }
    }
}

/// `snapshot create --group GROUP SNAP`.
pub fn snapshot_create(
    control: &Endpoint,
    json: bool,
    group: &str,
    name: &str,
    quiesce: Option<Quiesce>,
) -> Result<(), CliError> {
    name_arg("snapshot", name)?;
    let req = Request::GroupSnapshotCreate {
        group: group.to_string(),
        name: name.to_string(),
        quiesce,
    };
    reply(control, json, &req, |r| {
        println!(
            "created snapshot {name} of group {group} ({} volumes, writes paused {} µs)",
            r["members"].as_array().map_or(0, Vec::len),
            str_of(r, "stall_us"),
        );
        print!("{}", super::output::quiesce_report(r));
    })
}

/// `snapshot delete --group GROUP SNAP`.
pub fn snapshot_delete(
    control: &Endpoint,
    json: bool,
    group: &str,
    name: &str,
) -> Result<(), CliError> {
    let req = Request::GroupSnapshotDelete {
        group: group.to_string(),
        name: name.to_string(),
    };
    reply(control, json, &req, |_| {
        println!("deleted snapshot {name} of group {group}")
    })
}

fn list(r: &Value) -> String {
    let groups = r.as_array().cloned().unwrap_or_default();
    if groups.is_empty() {
        return "no groups; make one with `snapblk group create GROUP VOL...`\n".to_string();
    }
    let joined = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                str_of(g, "name"),
                joined(&g["volumes"]),
                joined(&g["snapshots"]),
            ]
        })
        .collect();
    table(&["NAME", "VOLUMES", "SNAPSHOTS"], &rows)
}

/// `group info` and `snapshot list --group`: the members, then one row per
/// group snapshot.
pub fn info(r: &Value) -> String {
    let name = str_of(r, "name");
    let volumes: Vec<&str> = r["volumes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = format!("group {name}: volumes {}\n", volumes.join(", "));
    let snaps = r["snapshots"].as_array().cloned().unwrap_or_default();
    if snaps.is_empty() {
        out +=
            &format!("no snapshots; take one with `snapblk snapshot create --group {name} SNAP`\n");
        return out;
    }
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                str_of(s, "name"),
                s["created_unix_ms"]
                    .as_u64()
                    .map(format_unix_ms)
                    .unwrap_or_else(|| "-".into()),
                str_of(s, "state"),
            ]
        })
        .collect();
    out + &table(&["SNAPSHOT", "CREATED", "STATE"], &rows)
}

//! The reference documents name everything the program offers: every CLI
//! command (`README.md`, "CLI reference") and every option (somewhere in
//! the README), walked from the CLI's own definition; every control
//! request (`docs/control-protocol.md`), taken from the protocol's wire
//! names. A command or request added without its documentation fails here.

use clap::CommandFactory;
use snapblk::cli::Cli;
use std::path::Path;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The README's text from heading `from` up to the next `## ` heading.
fn section(text: &str, from: &str) -> String {
    let start = text.find(from).unwrap_or_else(|| panic!("no {from:?}"));
    let rest = &text[start + from.len()..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
}

/// Every command below `cmd` as its words (`["volume", "create"]`), with
/// its long options.
fn walk(cmd: &clap::Command, path: &[String], out: &mut Vec<(Vec<String>, Vec<String>)>) {
    let longs = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "help" && *l != "version")
        .map(str::to_string)
        .collect();
    out.push((path.to_vec(), longs));
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut p = path.to_vec();
        p.push(sub.get_name().to_string());
        walk(sub, &p, out);
    }
}

#[test]
fn every_cli_command_and_option_is_in_the_readme() {
    let readme = read("README.md");
    let reference = section(&readme, "## CLI reference");
    let mut commands = Vec::new();
    walk(&Cli::command(), &[], &mut commands);
    assert!(
        commands.len() > 40,
        "the walk found only {} commands",
        commands.len()
    );
    let mut missing = Vec::new();
    for (path, longs) in &commands {
        // A command is named in the reference as its last word after the
        // one before it (`snapshot create`, `volume flatten NEW`) or, for
        // a family written `remove|pause|resume`, among its alternatives.
        if let Some(last) = path.last() {
            let named = match path.len() {
                1 => reference.contains(&format!("snapblk {last}")),
                _ => {
                    let parent = &path[path.len() - 2];
                    reference.contains(&format!("{parent} {last}"))
                        || reference.contains(&format!("|{last}"))
                        || reference.contains(&format!("\\|{last}"))
                }
            };
            if !named {
                missing.push(format!("command `{}`", path.join(" ")));
            }
        }
        for long in longs {
            if !readme.contains(&format!("--{long}")) {
                missing.push(format!("option --{long} of `snapblk {}`", path.join(" ")));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in README.md (CLI reference): {missing:?}"
    );
}

/// Every argument and option of every command, as `snapblk CMD <ARG>`,
/// that `--help` would show with no words beside it.
fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        if arg.is_hide_set() || arg.get_help().is_some() || arg.get_long_help().is_some() {
            continue;
        }
        out.push(format!("{path} <{}>", arg.get_id()));
    }
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        undocumented(sub, &format!("{path} {}", sub.get_name()), out);
    }
}

#[test]
fn every_argument_says_what_it_is_in_help() {
    let mut missing = Vec::new();
    undocumented(&Cli::command(), "snapblk", &mut missing);
    assert!(missing.is_empty(), "no help text: {missing:#?}");
}

#[test]
fn every_control_request_is_in_the_protocol_reference() {
    let protocol = read("src/control/protocol.rs");
    let doc = read("docs/control-protocol.md");
    let body = &protocol[protocol.find("pub enum Request").expect("no Request enum")..];
    let body = &body[..body.find("\n}\n").expect("Request enum end")];
    let ops: Vec<&str> = body
        .split("#[serde(rename = \"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap()])
        .collect();
    assert!(ops.len() > 40, "found only {} requests", ops.len());
    let missing: Vec<_> = ops
        .iter()
        .filter(|op| !doc.contains(&format!("`{op}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "requests with no section in docs/control-protocol.md: {missing:?}"
    );
}

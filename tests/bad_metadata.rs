//! Decoders validate what they trust: a manifest with impossible geometry
//! and a job record with an impossible block size are clear errors naming
//! the file; the daemon marks that volume broken (ignores that record) and
//! serves everything else.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

/// Rewrites one field of a JSON file.
fn set_field(path: &Path, key: &str, value: Value) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn damaged_manifests_and_job_records_break_only_themselves() {
    if skip_without(
        "damaged_manifests_and_job_records_break_only_themselves",
        &["qemu-io"],
    ) {
        return;
    }
    let (t, dir) = tempdir();
    let mut d = Daemon::start(&dir);
    let damages: [(&str, &str, Value, &str); 4] = [
        ("chunk", "chunk_size", 3000.into(), "chunk size 3000"),
        // 4 GiB does not fit the field: the JSON decoder says so.
        ("big", "chunk_size", (4u64 << 30).into(), "volume.json"),
        ("parts", "partitions", 100000.into(), "100000 partitions"),
        ("odd", "size", 1000.into(), "size 1000"),
    ];
    for (name, ..) in &damages {
        d.ok(&["volume", "create", name, "--size", "4M"]);
    }
    d.ok(&["volume", "create", "good", "--size", "4M"]);
    qemu_io_ok(&d.uri("good"), false, &["write -P 9 0 1M"]);
    let target = t.path().join("copy.img");
    let id = d
        .ok(&[
            "copy",
            "start",
            "good",
            "--to",
            target.to_str().unwrap(),
            "--rate",
            "64K",
        ])
        .trim()
        .to_string();
    assert!(d.signal(libc::SIGTERM).success(), "{}", d.log());

    for (name, key, value, _) in &damages {
        set_field(
            &dir.join("volumes").join(name).join("volume.json"),
            key,
            value.clone(),
        );
    }
    let record = dir.join("jobs").join(format!("{id}.json"));
    set_field(&record, "block_size", 1.into());
    d.restart();

    let list = d.json(&["volume", "list"]);
    for (name, _, _, needle) in &damages {
        let v = list
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == *name)
            .unwrap_or_else(|| panic!("{name} missing: {list}"));
        let state = v["state"].as_str().unwrap();
        assert!(
            state.starts_with("error") && state.contains("volume.json") && state.contains(needle),
            "{name}: {state}"
        );
    }
    qemu_io_ok(
        &d.uri("good"),
        false,
        &["read -P 9 0 1M", "write -P 3 1M 1M"],
    );
    let log = d.log();
    assert!(
        log.contains(&format!("{}", record.display())) && log.contains("block size 1 "),
        "{log}"
    );
    assert!(d.alive());
}

//! `snapblk restore STREAM|- --to vol:NAME` end to end: the real daemon
//! restores a backup stream (passed as a descriptor) into a new or an
//! existing volume, compared with the source snapshot by qemu-img over
//! NBD; bad streams fail naming the offset and leave the daemon serving;
//! volumes in use are refused naming the user.

mod common;

use common::{
    assert_error, nbd_client_connected, qemu_io_ok, run_ok, skip_without, tempdir, Daemon, Raw,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

/// A daemon with volume `v` (8 MiB of data and holes), its snapshot `s`,
/// live data written after `s`, and `s` as a backup stream in `v.stream`.
fn daemon_and_stream(test: &str, tools: &[&str]) -> Option<(tempfile::TempDir, Daemon, PathBuf)> {
    if skip_without(test, tools) {
        return None;
    }
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "8M"]);
    let data: Vec<String> = (0..8)
        .filter(|i| i % 3 != 1)
        .map(|i| format!("write -P {} {}M 1M", 0x30 + i, i))
        .collect();
    qemu_io_ok(&d.uri("v"), false, &data);
    d.ok(&["snapshot", "create", "v", "s"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x99 1M 2M"]);
    let stream = t.path().join("v.stream");
    let status = Command::new(common::BIN)
        .arg("--control")
        .arg(d.control())
        .args(["copy", "start", "v@s", "--format", "stream", "--to", "-"])
        .stdout(std::fs::File::create(&stream).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "streaming v@s failed:\n{}", d.log());
    Some((t, d, stream))
}

/// qemu-img's verdict that two exports hold the same image (the larger's
/// extra bytes must read as zeros).
fn assert_same_image(d: &Daemon, a: &str, b: &str) {
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(d.uri(a))
            .arg(d.uri(b)),
    );
    assert!(out.contains("Images are identical"), "{a} vs {b}: {out}");
}

fn restore_to(stream: &Path, volume: &str) -> Vec<String> {
    vec![
        "restore".into(),
        stream.display().to_string(),
        "--to".into(),
        format!("vol:{volume}"),
    ]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Into a new volume (created with the stream's size and chunk size), an
/// existing larger one (old data and the tail beyond the image zeroed, its
/// snapshot kept) and from standard input: a pipe from `copy start --to -`.
#[test]
fn restore_into_new_and_existing_volumes_is_the_snapshot() {
    let Some((_t, d, stream)) = daemon_and_stream("restore_into_volumes", &["qemu-img", "qemu-io"])
    else {
        return;
    };
    let mut a = vec!["--json".to_string()];
    a.extend(restore_to(&stream, "new"));
    let out: serde_json::Value = serde_json::from_str(&d.ok(&args(&a))).unwrap();
    assert_eq!(out["created"], true, "{out}");
    assert_eq!(out["target"], "vol:new");
    assert_eq!(out["source"], "v@s");
    assert_eq!(out["size"], 8 * MIB);
    assert_eq!(out["bytes"], 5 * MIB, "only the data is in the stream");
    assert_same_image(&d, "v@s", "new");
    let (v, new) = (
        d.json(&["volume", "info", "v"]),
        d.json(&["volume", "info", "new"]),
    );
    assert_eq!(new["size"], v["size"]);
    assert_eq!(new["chunk_size"], v["chunk_size"]);

    d.ok(&["volume", "create", "old", "--size", "12M"]);
    qemu_io_ok(&d.uri("old"), false, &["write -P 0xee 0 12M"]);
    d.ok(&["snapshot", "create", "old", "before"]);
    let out = d.ok(&args(&restore_to(&stream, "old")));
    assert!(
        out.contains("restored 8 MiB") && out.contains("to vol:old") && !out.contains("created"),
        "{out}"
    );
    assert_same_image(&d, "v@s", "old");
    qemu_io_ok(&d.uri("old@before"), true, &["read -P 0xee 0 12M"]);

    // `copy start --to - | restore - --to vol:`, a pipe end to end.
    let mut copy = Command::new(common::BIN)
        .arg("--control")
        .arg(d.control())
        .args(["copy", "start", "v@s", "--format", "stream", "--to", "-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Command::new(common::BIN)
        .arg("--control")
        .arg(d.control())
        .args(["restore", "-", "--to", "vol:piped"])
        .stdin(copy.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(copy.wait().unwrap().success(), "{}", d.log());
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    assert_same_image(&d, "v@s", "piped");
}

/// A flipped byte and a cut stream fail naming the offset; a volume the
/// restore created is deleted again, an existing one keeps the partial
/// image and says so; a volume too small, one an NBD client or a copy job uses, a
/// request without a descriptor are refused; the daemon serves throughout.
#[test]
fn restore_into_volume_refuses_bad_streams_and_volumes_in_use() {
    let Some((t, d, stream)) =
        daemon_and_stream("restore_refusals", &["qemu-img", "qemu-io", "python3-nbd"])
    else {
        return;
    };
    let bytes = std::fs::read(&stream).unwrap();
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x01;
    let bad = t.path().join("flipped.stream");
    std::fs::write(&bad, &flipped).unwrap();
    // Into a volume the restore created: the volume goes again.
    let e = d.fails(&args(&restore_to(&bad, "r")));
    assert!(
        e.contains("corrupt at byte")
            && e.contains("volume offset")
            && e.contains("volume r was created for this restore and is deleted again"),
        "{e}"
    );
    d.fails(&["volume", "info", "r"]);
    // Into an existing volume: it keeps the partial image, and says so.
    d.ok(&["volume", "create", "r", "--size", "8M"]);
    let cut = t.path().join("cut.stream");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = d.fails(&args(&restore_to(&cut, "r")));
    assert!(
        e.contains(&format!("truncated: it ends at byte {}", bytes.len() - 100))
            && e.contains("volume r holds a partial image"),
        "{e}"
    );
    let e = d.fails(&args(&restore_to(&bad, "r")));
    assert!(e.contains("volume r holds a partial image"), "{e}");
    // Not a stream at all: nothing is created.
    let junk = t.path().join("junk");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let e = d.fails(&args(&restore_to(&junk, "none")));
    assert!(e.contains("not a snapblk backup stream") && e.contains("nothing was written"));
    d.fails(&["volume", "info", "none"]);
    // Still serving: the same volume restores fine afterwards.
    d.ok(&args(&restore_to(&stream, "r")));
    assert_same_image(&d, "v@s", "r");

    d.ok(&["volume", "create", "small", "--size", "4M"]);
    let e = d.fails(&args(&restore_to(&stream, "small")));
    assert!(
        e.contains("has 4194304 bytes but the stream's image has 8388608"),
        "{e}"
    );

    // A live NBD client.
    let mut client = nbd_client_connected(&d.uri("r"));
    let e = d.fails(&args(&restore_to(&stream, "r")));
    assert!(
        e.contains("volume r is in use by 1 open NBD connection(s)")
            && e.contains("disconnect its NBD clients first"),
        "{e}"
    );
    drop(client.stdin.take());
    assert!(client.wait().unwrap().success());

    // A running copy job reading it.
    let target = t.path().join("copy.img");
    let id = d.ok(&[
        "copy",
        "start",
        "r",
        "--to",
        target.to_str().unwrap(),
        "--rate",
        "64K",
    ]);
    let id = id.trim();
    let e = d.fails(&args(&restore_to(&stream, "r")));
    assert!(
        e.contains(&format!("volume r is in use by copy job {id}")),
        "{e}"
    );
    d.ok(&["copy", "cancel", id]);
    d.ok(&args(&restore_to(&stream, "r")));

    // The protocol: the stream must come as a descriptor.
    let mut raw = Raw::connect(&d.control());
    assert_error(
        &raw.send(r#"{"op":"restore","volume":"r"}"#),
        "invalid_argument",
        "descriptor passed with the request",
    );
    d.ok(&["volume", "list"]);
}

/// On a terminal (a pty from util-linux `script`), restoring a stream file
/// shows a bar of how far the stream was read, into a volume (the daemon
/// reads the passed descriptor) and into a file (the CLI reads it); it
/// ends full, with the stream's size as its total.
#[test]
fn restore_on_a_terminal_shows_how_far_the_stream_was_read() {
    let Some((t, d, stream)) = daemon_and_stream("restore_bar", &["qemu-img", "qemu-io", "script"])
    else {
        return;
    };
    let len = std::fs::metadata(&stream).unwrap().len();
    let total = format!(
        "{:.2} MiB/{:.2} MiB",
        len as f64 / MIB as f64,
        len as f64 / MIB as f64
    );
    let file = t.path().join("restored.img");
    for to in ["vol:shown".to_string(), file.display().to_string()] {
        let cmd = format!(
            "{} --control {} restore {} --to {to}",
            common::BIN,
            d.control().display(),
            stream.display()
        );
        let (ok, text) = common::on_terminal(&cmd);
        assert!(ok, "{text}\n{}", d.log());
        assert!(
            text.contains("restore [#") && text.contains(&total) && text.contains("restored"),
            "{to}: want a full bar of {total}:\n{text}"
        );
    }
    assert_same_image(&d, "v@s", "shown");
    let want = t.path().join("want.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(d.uri("v@s"))
            .arg(&want),
    );
    assert_eq!(std::fs::read(&file).unwrap(), std::fs::read(&want).unwrap());
}

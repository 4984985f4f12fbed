//! Changed-block maps and incremental backups end to end (issue 12 parts
//! 3-5), against the real daemon and real clients: random writes between
//! snapshots S1..S5 are the model; `snapshot diff` between every pair, the
//! NBD context `qemu:dirty-bitmap:S1` read by nbdinfo and by qemu-img's
//! `x-dirty-bitmap`, must equal its changed chunks; a full stream of S1 and
//! incrementals S1->S2->...->S5 restore each snapshot exactly (qemu-img
//! compare), a wrong base or order is refused before a byte is written, and
//! each incremental's size follows its changed data.

mod common;

use common::{qemu_io_ok, run_ok, skip_without, tempdir, Daemon};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const CHUNK: u64 = 64 << 10;
const SIZE: u64 = 8 << 20;
const SNAPS: usize = 5;

/// A daemon with volume `v` filled with data, snapshots S1..S5 with random
/// writes, zero-writes and discards between them, and more after S5.
/// Returns the chunks written between S(k) and S(k+1) (index k-1) and
/// after S5 (the last).
fn history(test: &str, tools: &[&str]) -> Option<(tempfile::TempDir, Daemon, Vec<BTreeSet<u64>>)> {
    if skip_without(test, tools) {
        return None;
    }
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&[
        "volume",
        "create",
        "v",
        "--size",
        "8M",
        "--chunk-size",
        "64K",
    ]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 0x11 0 8M"]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut written = Vec::new();
    for k in 1..=SNAPS {
        d.ok(&["snapshot", "create", "v", &format!("S{k}")]);
        let mut chunks = BTreeSet::new();
        let mut cmds = Vec::new();
        for _ in 0..rng.gen_range(1..6) {
            let sectors = rng.gen_range(1..=512u64);
            let offset = rng.gen_range(0..SIZE / 512 - sectors) * 512;
            let len = sectors * 512;
            cmds.push(match rng.gen_range(0..4) {
                0 => format!("write -z {offset} {len}"),
                1 => format!("discard {offset} {len}"),
                _ => format!("write -P {} {offset} {len}", rng.gen_range(1..=255)),
            });
            chunks.extend(offset / CHUNK..=(offset + len - 1) / CHUNK);
        }
        qemu_io_ok(&d.uri("v"), false, &cmds);
        written.push(chunks);
    }
    Some((t, d, written))
}

/// The chunks a list of byte extents covers (each must be chunk aligned).
fn chunks_of(extents: impl IntoIterator<Item = (u64, u64)>) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (offset, len) in extents {
        assert!(offset % CHUNK == 0 && len % CHUNK == 0, "{offset}+{len}");
        out.extend(offset / CHUNK..(offset + len) / CHUNK);
    }
    out
}

fn diff(d: &Daemon, from: &str, to: Option<&str>) -> BTreeSet<u64> {
    let mut args = vec!["snapshot", "diff", "v", from];
    args.extend(to);
    let v = d.json(&args);
    let extents = v["extents"].as_array().unwrap();
    let set = chunks_of(
        extents
            .iter()
            .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap())),
    );
    assert_eq!(v["changed_bytes"].as_u64(), Some(set.len() as u64 * CHUNK));
    set
}

/// What the model says changed between S(i) and S(j) (j = SNAPS + 1: live).
fn model(written: &[BTreeSet<u64>], i: usize, j: usize) -> BTreeSet<u64> {
    written[i - 1..j - 1].iter().flatten().copied().collect()
}

#[test]
fn diffs_and_dirty_bitmap_contexts_equal_the_model() {
    let Some((_t, d, written)) = history(
        "diffs_and_dirty_bitmap_contexts_equal_the_model",
        &["qemu-io", "qemu-img", "nbdinfo"],
    ) else {
        return;
    };
    for i in 1..=SNAPS {
        for j in i..=SNAPS + 1 {
            let to = (j <= SNAPS).then(|| format!("S{j}"));
            let got = diff(&d, &format!("S{i}"), to.as_deref());
            assert_eq!(got, model(&written, i, j), "diff S{i} {to:?}");
        }
    }
    let e = d.fails(&["snapshot", "diff", "v", "S3", "S1"]);
    assert!(e.contains("older"), "{e}");
    let e = d.fails(&["snapshot", "diff", "v", "nope"]);
    assert!(e.contains("nope"), "{e}");

    let want = model(&written, 1, 3);
    assert!(!want.is_empty(), "the history changed something");
    let out = run_ok(Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:S1", &d.uri("v@S3")]));
    let mut dirty = Vec::new();
    let mut covered = 0;
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (offset, len, flags): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        assert_eq!(offset, covered, "nbdinfo's map is contiguous: {out}");
        covered += len;
        if flags & 1 != 0 {
            dirty.push((offset, len));
        }
    }
    assert_eq!(covered, SIZE);
    assert_eq!(chunks_of(dirty), want, "nbdinfo --map:\n{out}");
    let contexts = run_ok(Command::new("nbdinfo").arg(d.uri("v@S3")));
    for k in 1..=SNAPS {
        let offered = contexts.contains(&format!("qemu:dirty-bitmap:S{k}"));
        assert_eq!(offered, k < 3, "S{k} in the contexts of v@S3:\n{contexts}");
    }

    // qemu's client reads the context in place of base:allocation:
    // dirty extents show as holes ("data": false).
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=v@S3,\
         x-dirty-bitmap=qemu:dirty-bitmap:S1",
        d.nbd_sock().display()
    );
    let map =
        run_ok(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &opts]));
    let map: Value = serde_json::from_str(
        map.lines()
            .filter(|l| !l.is_empty())
            .collect::<String>()
            .as_str(),
    )
    .unwrap_or_else(|e| panic!("qemu-img map JSON ({e}):\n{map}"));
    let dirty = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()));
    assert_eq!(chunks_of(dirty), want, "qemu-img map: {map}");
}

fn copy(d: &Daemon, args: &[&str]) {
    let mut a = vec!["copy", "start"];
    a.extend_from_slice(args);
    let id = d.ok(&a).trim().to_string();
    d.ok(&["copy", "status", &id, "--watch"]);
}

fn same(d: &Daemon, file: &Path, snapshot: &str) {
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &file.display().to_string(),
        &d.uri(&format!("v@{snapshot}")),
    ]));
}

fn restore(d: &Daemon, streams: &[&Path], to: &Path) -> std::process::Output {
    let mut a: Vec<String> = vec!["restore".into()];
    a.extend(streams.iter().map(|s| s.display().to_string()));
    a.extend(["--to".into(), to.display().to_string()]);
    d.cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn an_incremental_chain_restores_every_snapshot_and_refuses_a_wrong_base() {
    let Some((t, d, written)) = history(
        "an_incremental_chain_restores_every_snapshot_and_refuses_a_wrong_base",
        &["qemu-io", "qemu-img"],
    ) else {
        return;
    };
    let path = |n: &str| t.path().join(n);
    let full = path("S1.full");
    copy(
        &d,
        &[
            "v@S1",
            "--format",
            "stream",
            "--to",
            &full.display().to_string(),
        ],
    );
    let mut chain = vec![full.clone()];
    eprintln!("incremental  changed bytes  stream bytes  ratio");
    for k in 2..=SNAPS {
        let inc = path(&format!("S{k}.inc"));
        let since = format!("S{}", k - 1);
        let source = format!("v@S{k}");
        let to = inc.display().to_string();
        copy(
            &d,
            &[
                &source, "--since", &since, "--format", "stream", "--to", &to,
            ],
        );
        let changed = model(&written, k - 1, k).len() as u64 * CHUNK;
        let len = std::fs::metadata(&inc).unwrap().len();
        eprintln!(
            "S{}->S{k}       {changed:>13}  {len:>12}  {:.3}",
            k - 1,
            len as f64 / changed as f64
        );
        // Frames cost 20 bytes per chunk, the header and footer ~100.
        assert!(
            len <= changed + changed / 10 + 4096,
            "S{k}: {len} for {changed}"
        );
        chain.push(inc);
    }
    let chain_args: Vec<String> = chain.iter().map(|p| p.display().to_string()).collect();
    let mut verify = vec!["restore", "--verify-chain"];
    verify.extend(chain_args.iter().map(String::as_str));
    assert!(d.ok(&verify).contains("complete and intact"));
    let mut out_of_order = vec!["restore", "--verify-chain"];
    out_of_order.extend([chain_args[0].as_str(), chain_args[2].as_str()]);
    let e = d.fails(&out_of_order);
    assert!(e.contains("out of order"), "{e}");

    // One stream at a time, each checked against the snapshot it is.
    let image = path("restored.img");
    for (k, stream) in chain.iter().enumerate() {
        let out = restore(&d, &[stream], &image);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        same(&d, &image, &format!("S{}", k + 1));
    }
    // A wrong base (S3->S4 onto S5), an incremental onto nothing: refused,
    // and the target is untouched.
    let before = std::fs::read(&image).unwrap();
    let out = restore(&d, &[&chain[3]], &image);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("nothing was written"),
        "{e}"
    );
    assert!(e.contains("generation"), "names the images: {e}");
    assert!(
        std::fs::read(&image).unwrap() == before,
        "a refused restore wrote"
    );
    let out = restore(&d, &[&chain[1]], &path("new.img"));
    assert!(!out.status.success(), "an incremental onto a new file");
    // The whole chain at once, into a volume of the daemon.
    let all: Vec<&Path> = chain.iter().map(|p| p.as_path()).collect();
    let vol = Path::new("vol:r");
    assert!(restore(&d, &all, vol).status.success());
    run_ok(Command::new("qemu-img").args(["compare", &d.uri("r"), &d.uri("v@S5")]));
    let out = restore(&d, &[&chain[4]], vol);
    assert!(!out.status.success(), "an incremental applied twice");

    // Raw --since: a file that holds S2 gets only what changed to S5.
    let raw = path("raw.img");
    copy(&d, &["v@S2", "--to", &raw.display().to_string()]);
    let raw_s = raw.display().to_string();
    let e = d.fails(&["copy", "start", "v@S5", "--since", "S3", "--to", &raw_s]);
    assert!(e.contains("generation"), "{e}");
    copy(&d, &["v@S5", "--since", "S2", "--to", &raw_s]);
    same(&d, &raw, "S5");
}

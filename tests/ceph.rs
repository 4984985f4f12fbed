//! Volumes in a Ceph pool (cargo feature `ceph`), against a throwaway
//! one-node cluster that `scripts/ceph-cluster` starts once for this test
//! binary and stops at exit:
//! - the engine against a model on the Ceph backend, with crashes (the
//!   volume abandoned without a flush and taken over with --break-lock);
//! - real clients (qemu-img, nbdcopy, fio verify) on a Ceph volume's export,
//!   and an image rbd wrote, imported with its data;
//! - failover: kill -9 of the serving daemon, another daemon attaches with
//!   --break-lock and finds every flushed write and every snapshot, the old
//!   one restarted is fenced and says so; a live daemon whose lock is broken
//!   stops serving the volume;
//! - snapshots, a copy job and a replication link on a Ceph volume, exact;
//! - snapshots are RBD snapshots of the origin (nothing copied into the
//!   change logs), and diffs, revert and clones work on them as on local
//!   volumes, a snapshot delete removing its RBD snapshot;
//! - `volume delete` removes a volume's images and objects from the pool
//!   (an imported image too), only while this daemon holds its lock and no
//!   client uses it; `volume detach` forgets it and leaves the pool as is;
//! - snapshots taken under concurrent writes while the write-back buffer
//!   holds more than a pause may land hold every acknowledged write.
#![cfg(feature = "ceph")]

mod common;
mod engine_load;

use common::ceph::cluster;
use common::*;
use snapblk::backend::memory::SplitMix;
use snapblk::backend::{CephSpec, Claim, Storage};
use snapblk::engine::{CacheMode, Volume, VolumeConfig, WriteBackConfig};
use snapblk::runtime::block_on;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn spec(conf: &Path, image: &str) -> CephSpec {
    CephSpec {
        pool: "rbd".into(),
        image: image.into(),
        conf: Some(conf.to_path_buf()),
        id: None,
    }
}

const BLOCK: usize = 4096;
const BLOCKS: usize = 48;

fn block_bytes(tag: u64, block: usize) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    if tag != 0 {
        let mut rng = SplitMix(tag * 1000 + block as u64);
        for w in b.chunks_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
    }
    b
}

async fn read_block(view: &snapblk::engine::View, block: usize) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    view.read((block * BLOCK) as u64, &mut buf).await.unwrap();
    buf
}

/// Random writes, flushes, snapshot creates and deletes and crashes on a
/// Ceph volume, checked against a model after every crash: each snapshot
/// reads exactly its image; each block holds its value at the last flush
/// or a value written after it.
#[test]
fn engine_model_with_crashes_on_the_ceph_backend() {
    let Some(conf) = cluster("engine_model_with_crashes_on_the_ceph_backend") else {
        return;
    };
    let writeback = || WriteBackConfig {
        limit_bytes: 16 * 1024,
        commit_delay: Duration::ZERO,
        background: false,
    };
    for seed in 1..=3u64 {
        let image = format!("model{seed}");
        let config = VolumeConfig {
            size: (BLOCKS * BLOCK) as u64,
            chunk_size: BLOCK as u32,
            partitions: 2,
            backing: None,
            cache: CacheMode::Writeback,
        };
        let storage =
            Storage::connect_ceph(&spec(conf, &image), Claim::Create(config.size)).unwrap();
        let mut vol = block_on(Volume::create_with("v", storage, &config, writeback())).unwrap();
        let mut rng = SplitMix(seed);
        let mut next_tag = 1u64;
        // Per block: the value at the last flush, and values written since.
        let mut flushed = vec![0u64; BLOCKS];
        let mut since: Vec<Vec<u64>> = vec![Vec::new(); BLOCKS];
        let mut current = vec![0u64; BLOCKS];
        let mut snaps: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for step in 0..120 {
            match rng.next_u64() % 20 {
                0..=11 => {
                    let first = (rng.next_u64() % BLOCKS as u64) as usize;
                    let n = 1 + (rng.next_u64() % 4) as usize;
                    let n = n.min(BLOCKS - first);
                    let mut data = Vec::new();
                    for b in first..first + n {
                        data.extend(block_bytes(next_tag, b));
                        current[b] = next_tag;
                        since[b].push(next_tag);
                    }
                    next_tag += 1;
                    block_on(vol.live().write((first * BLOCK) as u64, &data, false)).unwrap();
                }
                12..=13 => {
                    block_on(vol.live().flush()).unwrap();
                    flushed.clone_from(&current);
                    since.iter_mut().for_each(Vec::clear);
                }
                14..=15 => {
                    let name = format!("s{step}");
                    block_on(vol.create_snapshot(&name)).unwrap();
                    // Taking a snapshot makes every acknowledged write durable.
                    flushed.clone_from(&current);
                    since.iter_mut().for_each(Vec::clear);
                    snaps.insert(name, current.clone());
                }
                16 => {
                    if let Some(name) = snaps.keys().next().cloned() {
                        block_on(vol.delete_snapshot(&name)).unwrap();
                        snaps.remove(&name);
                    }
                }
                _ => {
                    // The daemon dies: nothing is shut down or flushed, and
                    // the next one breaks its lock.
                    drop(vol);
                    let storage =
                        Storage::connect_ceph(&spec(conf, &image), Claim::BreakLock).unwrap();
                    vol = block_on(Volume::open_with("v", storage, writeback())).unwrap();
                    let live = vol.live();
                    for b in 0..BLOCKS {
                        let got = block_on(read_block(&live, b));
                        let tag = std::iter::once(flushed[b])
                            .chain(since[b].iter().copied())
                            .find(|&t| got == block_bytes(t, b))
                            .unwrap_or_else(|| {
                                panic!(
                                    "seed {seed} step {step}: block {b} holds data never written"
                                )
                            });
                        current[b] = tag;
                    }
                    flushed.clone_from(&current);
                    since.iter_mut().for_each(Vec::clear);
                }
            }
            for (name, image) in &snaps {
                let view = vol.snapshot_view(name).unwrap();
                for (b, &tag) in image.iter().enumerate() {
                    assert!(
                        block_on(read_block(&view, b)) == block_bytes(tag, b),
                        "seed {seed} step {step}: snapshot {name} block {b} changed"
                    );
                }
            }
        }
        block_on(vol.shutdown()).unwrap();
    }
}

fn create(d: &Daemon, conf: &Path, name: &str, size: &str) {
    d.ok(&[
        "volume",
        "create",
        name,
        "--size",
        size,
        "--ceph",
        &format!("rbd/{name}"),
        "--ceph-conf",
        conf.to_str().unwrap(),
    ]);
}

fn file_with(dir: &Path, name: &str, seed: u64, len: usize) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    let data = random_bytes(seed, len);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

/// qemu-img, nbdcopy and fio's verify against a Ceph volume's export.
#[test]
fn real_clients_on_a_ceph_volume() {
    let Some(conf) = cluster("real_clients_on_a_ceph_volume") else {
        return;
    };
    if skip_without(
        "real_clients_on_a_ceph_volume",
        &["qemu-img", "nbdcopy", "fio"],
    ) {
        return;
    }
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    create(&d, conf, "clients", "16M");
    let info = d.json(&["volume", "info", "clients"]);
    assert_eq!(info["backend"], "ceph");
    assert_eq!(info["ceph"]["image"], "clients");
    let (src, data) = file_with(t.path(), "src.img", 7, 16 << 20);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(d.uri("clients")),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(d.uri("clients")),
    );
    let out = t.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(d.uri("clients")).arg(&out));
    assert_same(
        "nbdcopy of the Ceph volume",
        &std::fs::read(&out).unwrap(),
        &data,
    );
    // The RBD image itself holds the data (any RBD client can read it).
    let exported = t.path().join("rbd-export.img");
    run_ok(
        Command::new("rbd")
            .arg("-c")
            .arg(conf)
            .args(["export", "rbd/clients"])
            .arg(&exported),
    );
    assert_same("rbd export", &std::fs::read(&exported).unwrap(), &data);
    // An RBD image written by rbd itself, imported with its data.
    run_ok(
        Command::new("rbd")
            .arg("-c")
            .arg(conf)
            .arg("import")
            .arg(&src)
            .arg("rbd/imported"),
    );
    d.ok(&[
        "volume",
        "import",
        "imp",
        "--ceph",
        "rbd/imported",
        "--ceph-conf",
        conf.to_str().unwrap(),
    ]);
    assert_eq!(d.json(&["volume", "info", "imp"])["capacity"], 16 << 20);
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(d.uri("imp")),
    );
    // In the temporary directory: fio leaves its verify state file there.
    let fio = run_ok(Command::new("fio").current_dir(t.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", d.uri("clients")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // fio would otherwise leave its verify state file in the working directory
        // (the repository, under cargo test).
        "--verify_state_save=0",
    ]));
    assert!(fio.contains("verify"), "{fio}");
}

/// A writer that acknowledges flushed writes, then the daemon is killed;
/// another daemon takes the volume over with --break-lock.
#[test]
fn failover_with_kill9_and_break_lock() {
    let Some(conf) = cluster("failover_with_kill9_and_break_lock") else {
        return;
    };
    if skip_without("failover_with_kill9_and_break_lock", &["qemu-io"]) {
        return;
    }
    let (t, dir) = tempdir();
    let mut a = Daemon::start(&dir);
    create(&a, conf, "fo", "8M");
    // Flushed writes, a snapshot between them.
    qemu_io_ok(
        &a.uri("fo"),
        false,
        &["write -P 1 0 1M", "write -P 2 4M 64k", "flush"],
    );
    a.ok(&["snapshot", "create", "fo", "before"]);
    qemu_io_ok(
        &a.uri("fo"),
        false,
        &["write -P 3 0 64k", "write -P 4 7M 1M", "flush"],
    );
    let _ = a.signal(libc::SIGKILL);

    let b = Daemon::start(&t.path().join("b"));
    let conf_s = conf.to_str().unwrap();
    let e = b.fails(&attach_args(conf_s, false));
    assert!(
        e.contains("is locked by")
            && e.contains(
                "take it over with `snapblk volume attach fo --ceph rbd/fo --break-lock`"
            ),
        "{e}"
    );
    let started = Instant::now();
    b.ok(&attach_args(conf_s, true));
    qemu_io_ok(&b.uri("fo"), false, &["write -P 5 6M 4k", "flush"]);
    eprintln!(
        "failover: attach to first flushed write {:?}",
        started.elapsed()
    );
    qemu_io_ok(
        &b.uri("fo"),
        true,
        &[
            "read -P 3 0 64k",
            "read -P 1 64k 960k",
            "read -P 2 4M 64k",
            "read -P 4 7M 1M",
            "read -P 5 6M 4k",
        ],
    );
    qemu_io_ok(
        &b.uri("fo@before"),
        true,
        &["read -P 1 0 1M", "read -P 2 4M 64k", "read -P 0 7M 1M"],
    );
    let info = b.json(&["volume", "info", "fo"]);
    assert_eq!(info["snapshot_list"][0]["name"], "before");
    let holder = info["ceph"]["lock_holder"].as_str().unwrap().to_string();

    // A comes back: fenced, and it says who holds the volume.
    a.restart();
    let list = a.json(&["volume", "list"]);
    let state = list[0]["state"].as_str().unwrap();
    assert!(
        state.contains("is locked by")
            && state.contains("forget it here with `snapblk volume detach fo`")
            && state.contains("`snapblk volume attach fo --ceph rbd/fo --break-lock`"),
        "{state}"
    );
    let (ok, text) = qemu_io(&a.uri("fo"), false, &["write -P 9 0 4k"]);
    assert!(!ok || text.contains("failed"), "{text}");
    qemu_io_ok(&b.uri("fo"), true, &["read -P 3 0 64k"]);

    // A live holder whose lock is broken stops serving the volume at once.
    let c = Daemon::start(&t.path().join("c"));
    c.ok(&attach_args(conf_s, true));
    assert_ne!(
        c.json(&["volume", "info", "fo"])["ceph"]["lock_holder"],
        holder.as_str()
    );
    let (ok, text) = qemu_io(&b.uri("fo"), false, &["write -P 8 0 4k", "flush"]);
    assert!(
        !ok || text.contains("failed"),
        "the fenced daemon still wrote: {text}"
    );
    assert!(b.log_shows("lost its lock"), "{}", b.log());
    let state = b.json(&["volume", "info", "fo"])["state"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(state.starts_with("fenced"), "{state}");
    qemu_io_ok(&c.uri("fo"), true, &["read -P 3 0 64k", "read -P 5 6M 4k"]);

    // A follows the steps its listing gave: forget the volume, take it over.
    a.ok(&["volume", "detach", "fo"]);
    a.ok(&attach_args(conf_s, true));
    qemu_io_ok(&a.uri("fo"), true, &["read -P 3 0 64k", "read -P 5 6M 4k"]);
    let (ok, text) = qemu_io(&c.uri("fo"), false, &["write -P 7 0 4k", "flush"]);
    assert!(!ok || text.contains("failed"), "{text}");
}

/// `volume attach fo --ceph rbd/fo ...`.
fn attach_args(conf: &str, break_lock: bool) -> Vec<&str> {
    let mut args = vec![
        "volume",
        "attach",
        "fo",
        "--ceph",
        "rbd/fo",
        "--ceph-conf",
        conf,
    ];
    if break_lock {
        args.push("--break-lock");
    }
    args
}

/// Snapshots, a live copy job and a replication link on a Ceph volume,
/// each compared byte for byte.
#[test]
fn snapshots_copy_and_replication_on_a_ceph_volume() {
    let Some(conf) = cluster("snapshots_copy_and_replication_on_a_ceph_volume") else {
        return;
    };
    if skip_without("snapshots_copy_and_replication", &["qemu-img", "nbdcopy"]) {
        return;
    }
    let (t, dir) = tempdir();
    let key = key_file(t.path(), "key", "a replication key for the ceph test\n");
    let mut d = Daemon::start(&dir);
    create(&d, conf, "snaps", "8M");
    let (first, first_data) = file_with(t.path(), "first.img", 11, 8 << 20);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&first)
            .arg(d.uri("snaps")),
    );
    d.ok(&["snapshot", "create", "snaps", "s1"]);
    qemu_io_ok(
        &d.uri("snaps"),
        false,
        &["write -P 0xaa 1M 2M", "write -P 0xbb 7M 64k"],
    );
    // The snapshot reads its image.
    let s1 = t.path().join("s1.img");
    run_ok(Command::new("nbdcopy").arg(d.uri("snaps@s1")).arg(&s1));
    assert_same("snapshot s1", &std::fs::read(&s1).unwrap(), &first_data);
    // A copy job of the live volume while it stays writable.
    let target = t.path().join("copy.img");
    let id = d.ok(&["copy", "start", "snaps", "--to", target.to_str().unwrap()]);
    let job = wait_job_ended(&d, id.trim());
    assert_eq!(job["state"], "done", "{job}");
    let live = t.path().join("live.img");
    run_ok(Command::new("nbdcopy").arg(d.uri("snaps")).arg(&live));
    assert_same(
        "copy job",
        &std::fs::read(&target).unwrap(),
        &std::fs::read(&live).unwrap(),
    );
    // Replication to a local volume on another daemon.
    let (dst, listen) = replication_destination(&t.path().join("dst"), &key, &[]);
    d.ok(&[
        "replicate",
        "start",
        "snaps",
        "--to",
        &format!("{listen}/r"),
        "--key-file",
        key.to_str().unwrap(),
        "--cp-interval",
        "1h",
    ]);
    qemu_io_ok(&d.uri("snaps"), false, &["write -P 0xcc 5M 128k", "flush"]);
    d.json(&["replicate", "cp", "snaps"]);
    same_image(&d.uri("snaps"), &dst.uri("r"));
    // A clean stop gives the lock back even though the link still holds
    // the volume: the restarted daemon serves it without --break-lock.
    assert!(d.signal(libc::SIGTERM).success());
    d.restart();
    let info = d.json(&["volume", "info", "snaps"]);
    assert_eq!(info["state"], "ok", "{info}");
    qemu_io_ok(&d.uri("snaps"), false, &["write -P 0xdd 6M 64k", "flush"]);
    d.json(&["replicate", "cp", "snaps"]);
    same_image(&d.uri("snaps"), &dst.uri("r"));
}

/// `qemu-img compare` of two raw images (NBD URIs or files).
fn same_image(a: &str, b: &str) {
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(a)
            .arg(b),
    );
}

/// What the pool holds of volume `image`: its images (`rbd ls`) and its
/// RADOS objects other than RBD's own (`rados ls`), sorted.
fn pool_data(conf: &Path, image: &str) -> Vec<String> {
    let rbd = run_ok(Command::new("rbd").arg("-c").arg(conf).args(["ls", "rbd"]));
    let rados = run_ok(
        Command::new("rados")
            .arg("-c")
            .arg(conf)
            .args(["-p", "rbd", "ls"]),
    );
    let ours = format!("snapblk.{image}.");
    let mut out: Vec<String> = rbd
        .lines()
        .filter(|l| *l == image || l.starts_with(&format!("{image}.snapblk.")))
        .chain(rados.lines().filter(|l| l.starts_with(&ours)))
        .map(str::to_string)
        .collect();
    out.sort();
    out
}

/// Delete removes a volume's images and objects; it refuses while an NBD
/// client uses the volume and while another daemon holds its lock (live or
/// after a restart), pointing at `volume detach`, which forgets the volume
/// and leaves the pool to the daemon that serves it. An imported image is
/// removed by delete and kept by detach.
#[test]
fn delete_removes_pool_data_and_detach_keeps_it() {
    let Some(conf) = cluster("delete_removes_pool_data_and_detach_keeps_it") else {
        return;
    };
    if skip_without("delete_removes_pool_data", &["qemu-io", "rados"]) || python().is_none() {
        return;
    }
    let conf_s = conf.to_str().unwrap();
    let (t, dir) = tempdir();
    let mut a = Daemon::start(&dir);
    create(&a, conf, "del", "8M");
    qemu_io_ok(&a.uri("del"), false, &["write -P 1 0 1M", "flush"]);
    a.ok(&["snapshot", "create", "del", "s"]);
    qemu_io_ok(&a.uri("del"), false, &["write -P 2 0 1M", "flush"]);
    let before = pool_data(conf, "del");
    for name in [
        "del",
        "del.snapblk.part-000.store",
        "snapblk.del.part-000.journal",
        "snapblk.del.volume.json",
    ] {
        assert!(before.contains(&name.to_string()), "{name}: {before:?}");
    }

    // In use by an NBD client: refused, the pool untouched.
    let mut client = nbd_client_connected(&a.uri("del"));
    let e = a.fails(&["volume", "delete", "del"]);
    assert!(e.contains("in use by 1 open export connection"), "{e}");
    drop(client.stdin.take());
    assert!(client.wait().unwrap().success());
    assert_eq!(pool_data(conf, "del"), before);

    // Another daemon takes it over: A may not delete what B serves.
    let b = Daemon::start(&t.path().join("b"));
    b.ok(&[
        "volume",
        "attach",
        "del",
        "--ceph",
        "rbd/del",
        "--ceph-conf",
        conf_s,
        "--break-lock",
    ]);
    // A notices at its next write that its lock is gone.
    let _ = qemu_io(&a.uri("del"), false, &["write -P 9 0 4k", "flush"]);
    let e = a.fails(&["volume", "delete", "del"]);
    assert!(
        e.contains("not this daemon's to delete") && e.contains("snapblk volume detach del"),
        "{e}"
    );
    // Restarted, A cannot take the lock: still refused, the same way out.
    a.kill9_and_restart();
    let e = a.fails(&["volume", "delete", "del"]);
    assert!(
        e.contains("cannot delete the pool data") && e.contains("snapblk volume detach del"),
        "{e}"
    );
    assert_eq!(pool_data(conf, "del"), before);
    let out = a.json(&["volume", "detach", "del"]);
    assert_eq!(out["detached"], true);
    assert!(a.json(&["volume", "list"]).as_array().unwrap().is_empty());
    assert_eq!(pool_data(conf, "del"), before);
    qemu_io_ok(&b.uri("del"), true, &["read -P 2 0 1M"]);
    qemu_io_ok(&b.uri("del@s"), true, &["read -P 1 0 1M"]);

    // The holder deletes: nothing of the volume is left in the pool.
    let out = b.json(&["volume", "delete", "del"]);
    assert_eq!(out["deleted"], true);
    assert_eq!(pool_data(conf, "del"), Vec::<String>::new());

    // Detach releases the lock: another daemon attaches without breaking it.
    run_ok(
        Command::new("rbd")
            .arg("-c")
            .arg(conf)
            .args(["create", "--size", "4M", "rbd/adopted"]),
    );
    a.ok(&[
        "volume",
        "import",
        "adopted",
        "--ceph",
        "rbd/adopted",
        "--ceph-conf",
        conf_s,
    ]);
    qemu_io_ok(&a.uri("adopted"), false, &["write -P 3 0 64k", "flush"]);
    a.ok(&["volume", "detach", "adopted"]);
    let kept = pool_data(conf, "adopted");
    assert!(kept.contains(&"adopted".to_string()), "{kept:?}");
    // An RBD snapshot that is not snapblk's keeps delete from removing anything.
    run_ok(
        Command::new("rbd")
            .arg("-c")
            .arg(conf)
            .args(["snap", "create", "rbd/adopted@mine"]),
    );
    b.ok(&[
        "volume",
        "attach",
        "adopted",
        "--ceph",
        "rbd/adopted",
        "--ceph-conf",
        conf_s,
    ]);
    qemu_io_ok(&b.uri("adopted"), true, &["read -P 3 0 64k"]);
    let e = b.fails(&["volume", "delete", "adopted"]);
    assert!(
        e.contains("did not take (mine)") && e.contains("rbd snap purge rbd/adopted"),
        "{e}"
    );
    assert_eq!(pool_data(conf, "adopted"), kept);
    run_ok(
        Command::new("rbd")
            .arg("-c")
            .arg(conf)
            .args(["snap", "purge", "rbd/adopted"]),
    );
    // Run again, the delete finishes; an imported image is removed too.
    b.ok(&["volume", "delete", "adopted"]);
    assert_eq!(pool_data(conf, "adopted"), Vec::<String>::new());
    // Detach is for Ceph volumes only.
    b.ok(&["volume", "create", "local", "--size", "1M"]);
    let e = b.fails(&["volume", "detach", "local"]);
    assert!(
        e.contains("not in Ceph") && e.contains("volume delete local"),
        "{e}"
    );
}

/// The origin's RBD snapshots, by name.
fn rbd_snaps(conf: &Path, image: &str) -> Vec<String> {
    let out = run_ok(Command::new("rbd").arg("-c").arg(conf).args([
        "snap",
        "ls",
        "--format",
        "json",
        &format!("rbd/{image}"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut names: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// A Ceph volume's snapshots are RBD snapshots of its origin: a first
/// overwrite copies nothing into the change logs, each snapshot reads its
/// image from its RBD snapshot, and diff, revert and a clone of a snapshot
/// work on them; deleting a snapshot removes its RBD snapshot.
#[test]
fn native_snapshots_serve_diff_revert_and_clones() {
    let Some(conf) = cluster("native_snapshots_serve_diff_revert_and_clones") else {
        return;
    };
    if skip_without("native_snapshots", &["qemu-io", "qemu-img"]) {
        return;
    }
    let (_t, dir) = tempdir();
    let d = Daemon::start(&dir);
    create(&d, conf, "nat", "8M");
    qemu_io_ok(&d.uri("nat"), false, &["write -P 1 0 8M", "flush"]);
    d.ok(&["snapshot", "create", "nat", "s1"]);
    qemu_io_ok(&d.uri("nat"), false, &["write -P 2 1M 128k", "flush"]);
    d.ok(&["snapshot", "create", "nat", "s2"]);
    qemu_io_ok(
        &d.uri("nat"),
        false,
        &["write -P 3 1M 64k", "write -P 4 6M 64k", "flush"],
    );
    assert_eq!(rbd_snaps(conf, "nat"), vec!["snapblk.g1", "snapblk.g2"]);
    // Nothing was copied: every preserved version lives in an RBD snapshot.
    let info = d.json(&["volume", "info", "nat"]);
    for s in info["snapshot_list"].as_array().unwrap() {
        assert_eq!(s["exclusive_bytes"], 0, "{info}");
    }
    // The change-log images never grew (they grow as slots are written).
    for p in 0..4 {
        let image = format!("rbd/nat.snapblk.part-{p:03}.store");
        let info = run_ok(
            Command::new("rbd")
                .arg("-c")
                .arg(conf)
                .args(["info", "--format", "json", &image]),
        );
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["size"], 0, "{image}: {info}");
    }
    qemu_io_ok(&d.uri("nat@s1"), true, &["read -P 1 0 8M"]);
    qemu_io_ok(
        &d.uri("nat@s2"),
        true,
        &[
            "read -P 1 0 1M",
            "read -P 2 1M 128k",
            "read -P 1 1152k 6976k",
        ],
    );
    // Diffs from the preservation records, as on a local volume (64k chunks).
    let diff = d.json(&["snapshot", "diff", "nat", "s1", "s2"]);
    assert_eq!(diff["changed_bytes"], 128 << 10, "{diff}");
    let diff = d.json(&["snapshot", "diff", "nat", "s2"]);
    assert_eq!(diff["changed_bytes"], 128 << 10, "{diff}");
    // Revert to s1 rewrites the changed chunks; s2 keeps its image.
    d.ok(&["snapshot", "revert", "nat", "s1"]);
    qemu_io_ok(&d.uri("nat"), true, &["read -P 1 0 8M"]);
    qemu_io_ok(&d.uri("nat@s2"), true, &["read -P 2 1M 128k"]);
    // A clone of s2 reads it; its writes stay its own.
    d.ok(&["volume", "clone", "nat@s2", "natc"]);
    qemu_io_ok(&d.uri("natc"), false, &["write -P 5 0 64k", "flush"]);
    qemu_io_ok(
        &d.uri("natc"),
        true,
        &["read -P 5 0 64k", "read -P 1 64k 960k", "read -P 2 1M 128k"],
    );
    // Deleting a snapshot removes its RBD snapshot (s2 stays: the clone).
    d.ok(&["volume", "delete", "natc"]);
    d.ok(&["snapshot", "delete", "nat", "s1"]);
    assert_eq!(rbd_snaps(conf, "nat"), vec!["snapblk.g2"]);
    qemu_io_ok(&d.uri("nat@s2"), true, &["read -P 2 1M 128k"]);
}

/// Snapshots of a Ceph volume under concurrent writes while its write-back
/// buffer holds far more than a snapshot's pause may land: the drain before
/// the pause runs with the budget lowered, and each snapshot must still
/// hold, byte for byte, every write acknowledged before `create_snapshot`
/// was called and none started after it returned (then the volume reopens
/// and every snapshot reads the same).
#[test]
fn snapshots_under_load_hold_every_acknowledged_write() {
    use engine_load::{assert_between, start_writers, versions, Progress};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let Some(conf) = cluster("snapshots_under_load_hold_every_acknowledged_write") else {
        return;
    };
    let config = VolumeConfig {
        size: (engine_load::BLOCK * engine_load::BLOCKS) as u64,
        chunk_size: 16 * 1024,
        partitions: 2,
        backing: None,
        cache: CacheMode::Writeback,
    };
    // A long commit delay keeps the buffer full between commits: 8 MiB,
    // more than the pause may land (and what the drain before each
    // snapshot lands in a second or two on the test cluster).
    let writeback = || WriteBackConfig {
        limit_bytes: 8 << 20,
        commit_delay: Duration::from_millis(500),
        background: true,
    };
    let storage =
        Storage::connect_ceph(&spec(conf, "underload"), Claim::Create(config.size)).unwrap();
    let volume = block_on(Volume::create_with("v", storage, &config, writeback())).unwrap();
    // Every first overwrite after a snapshot is held until its record commits.
    block_on(volume.create_snapshot("s0")).unwrap();
    let progress = Progress::starting_at(0);
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&volume, &progress, &stop, 2, 16);
    let mut bounds = Vec::new();
    let mut most_held = 0;
    for i in 1..=4 {
        // Let the buffer fill up again, watching how full it gets: one
        // look at the end of the wait could fall right after a commit.
        let refill = std::time::Instant::now();
        while refill.elapsed() < Duration::from_millis(400) {
            most_held = most_held.max(volume.held_bytes());
            std::thread::sleep(Duration::from_millis(5));
        }
        let low = Progress::snapshot(&progress.acked);
        let name = format!("s{i}");
        block_on(volume.create_snapshot(&name)).unwrap();
        bounds.push((name, low, Progress::snapshot(&progress.started)));
    }
    stop.store(true, Ordering::SeqCst);
    writers.into_iter().for_each(|w| w.join().unwrap());
    assert!(
        most_held > 1 << 20,
        "the buffer never held more than a pause lands ({most_held} bytes): the load proves nothing"
    );
    for (name, low, high) in &bounds {
        assert_between(
            &format!("snapshot {name}"),
            &versions(&volume, Some(name)),
            low,
            high,
        );
    }
    let taken: Vec<Vec<u64>> = bounds
        .iter()
        .map(|(n, _, _)| versions(&volume, Some(n)))
        .collect();
    block_on(volume.shutdown()).unwrap();
    drop(volume);
    let storage = Storage::connect_ceph(&spec(conf, "underload"), Claim::Open).unwrap();
    let volume = block_on(Volume::open_with("v", storage, writeback())).unwrap();
    for ((name, _, _), before) in bounds.iter().zip(&taken) {
        assert_eq!(
            &versions(&volume, Some(name)),
            before,
            "snapshot {name} changed on reopen"
        );
    }
    block_on(volume.shutdown()).unwrap();
}

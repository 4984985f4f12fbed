//! Volumes with `--cache none` and `--cache writearound`: the origin is
//! opened with O_DIRECT (writearound reads through the page cache), real NBD
//! clients (qemu-img, qemu-io, nbdcopy) read and write it, snapshots read
//! their point-in-time image, the mode survives a restart, and the hot paths
//! (NBD payloads, copy-on-write preservation) hand the kernel aligned memory,
//! so no request is bounced.
//!
//! A test whose client is not installed prints `SKIP <test>: <tool> ...` and
//! passes; CI installs all of them.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;
/// O_DIRECT in /proc/PID/fdinfo's octal `flags` (x86-64 and aarch64).
const O_DIRECT_FLAG: u32 = 0o40000;

/// The open flags of every descriptor process `pid` holds on `path`.
fn fd_flags(pid: u32, path: &Path) -> Vec<u32> {
    let want = path.canonicalize().unwrap();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        if std::fs::read_link(entry.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let fd = entry.file_name().to_string_lossy().into_owned();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .expect("fdinfo has flags");
        out.push(u32::from_str_radix(flags.trim(), 8).unwrap());
    }
    out
}

/// Asserts that the daemon holds `path` open, with O_DIRECT iff `direct`.
#[track_caller]
fn assert_direct(d: &Daemon, path: &Path, direct: bool) {
    let flags = fd_flags(d.pid(), path);
    assert!(!flags.is_empty(), "daemon does not hold {path:?} open");
    let has = flags.iter().any(|f| f & O_DIRECT_FLAG != 0);
    assert_eq!(has, direct, "{path:?} open with flags {flags:?} (decimal)");
}

fn bounced(d: &Daemon, vol: &str) -> u64 {
    d.json(&["volume", "info", vol])["bounced_ios"]
        .as_u64()
        .unwrap()
}

/// Copies an export to a local file with nbdcopy and returns its bytes.
fn dump(d: &Daemon, export: &str, path: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(path);
    run_ok(Command::new("nbdcopy").arg(d.uri(export)).arg(path));
    std::fs::read(path).unwrap()
}

/// Runs qemu-io writes `(pattern, offset, length, flags)` and applies them
/// to `model`.
fn write_patterns(uri: &str, model: &mut [u8], writes: &[(u8, u64, u64, &str)]) {
    let cmds: Vec<String> = writes
        .iter()
        .map(|(p, o, l, f)| format!("write {f} -P {p:#x} {o} {l}"))
        .collect();
    qemu_io_ok(uri, false, &cmds);
    for &(p, o, l, _) in writes {
        model[o as usize..(o + l) as usize].fill(p);
    }
}

/// How many of `path`'s pages are in the page cache (mincore).
fn resident_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096;
    // SAFETY: a shared read-only mapping of a file we hold open, only
    // handed to mincore and unmapped before returning.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let mut vec = vec![0u8; len.div_ceil(page)];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }
}

/// Drops `path`'s clean pages from the page cache.
fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: an advice call on a descriptor we hold.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

#[test]
fn cache_none_volume_serves_nbd_clients_without_bouncing() {
    direct_volume_serves_nbd_clients_without_bouncing(
        "cache_none_volume_serves_nbd_clients_without_bouncing",
        "none",
        "none (O_DIRECT; 0 unaligned requests bounced)",
    );
}

#[test]
fn cache_writearound_volume_serves_nbd_clients_without_bouncing() {
    direct_volume_serves_nbd_clients_without_bouncing(
        "cache_writearound_volume_serves_nbd_clients_without_bouncing",
        "writearound",
        "writearound (O_DIRECT writes, cached reads; 0 unaligned requests bounced)",
    );
}

/// A container volume with an O_DIRECT cache `mode` next to a writeback
/// one, through qemu-img, qemu-io and nbdcopy, across a snapshot and a
/// restart; reads fill the page cache exactly when the mode caches reads.
fn direct_volume_serves_nbd_clients_without_bouncing(test: &str, mode: &str, info_text: &str) {
    if skip_without(test, &["qemu-img", "qemu-io", "nbdcopy"]) {
        return;
    }
    let (t, dir) = tempdir();
    let mut d = Daemon::start(&dir);
    // 2 partitions of 16 MiB, 64 KiB chunks.
    let created = d.ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "32M",
        "--partitions",
        "2",
        "--cache",
        mode,
    ]);
    assert!(created.contains(&format!("cache {mode}")), "{created}");
    d.ok(&[
        "volume",
        "create",
        "wb",
        "--size",
        "4M",
        "--cache",
        "writeback",
    ]);
    d.ok(&["volume", "create", "default", "--size", "4M"]);
    assert_eq!(
        d.json(&["volume", "info", "default"])["cache"],
        "writearound",
        "the default for new volumes"
    );
    d.ok(&["volume", "delete", "default"]);

    let info = d.ok(&["volume", "info", "vol"]);
    assert!(info.contains(info_text), "{info}");
    assert!(d.ok(&["volume", "info", "wb"]).contains("writeback"));
    assert_eq!(d.json(&["volume", "info", "vol"])["cache"], mode);
    assert_eq!(d.json(&["volume", "info", "wb"])["cache"], "writeback");
    let list = d.json(&["volume", "list"]);
    let modes: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["cache"])
        .collect();
    assert_eq!(modes, [&Value::from(mode), &Value::from("writeback")]);

    let origin = |v: &str| dir.join("volumes").join(v).join("origin.img");
    assert_direct(&d, &origin("vol"), true);
    assert_direct(&d, &origin("wb"), false);

    // A random image with a zero gap, written with qemu-img convert.
    let uri = d.uri("vol");
    let mut data = random_bytes(7, (32 * MIB) as usize);
    data[(5 * MIB) as usize..(6 * MIB) as usize].fill(0);
    let src = t.path().join("src.img");
    std::fs::write(&src, &data).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    assert!(out.contains("Images are identical"), "{out}");

    // After a snapshot, page-aligned overwrites (each preserves its chunks
    // first), a FUA write, zeroes and a discard.
    d.ok(&["snapshot", "create", "vol", "s1"]);
    let mut model = data.clone();
    write_patterns(
        &uri,
        &mut model,
        &[
            (0x11, 0, 4096, ""),
            (0x22, 64 * 1024 - 8192, 16384, ""),
            (0x33, 16 * MIB - 65536, 3 * 65536, ""),
            (0x44, 20 * MIB + 4096, 1024 * 1024, "-f"),
            (0x55, 32 * MIB - 4096, 4096, ""),
        ],
    );
    qemu_io_ok(
        &uri,
        false,
        &["write -z 9M 256K", "discard 12M 64K", "flush"],
    );
    model[(9 * MIB) as usize..(9 * MIB + 256 * 1024) as usize].fill(0);
    model[(12 * MIB) as usize..(12 * MIB + 65536) as usize].fill(0);

    assert_same("volume", &dump(&d, "vol", &t.path().join("v.img")), &model);
    assert_same(
        "snapshot",
        &dump(&d, "vol@s1", &t.path().join("s.img")),
        &data,
    );
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(d.uri("vol@s1")),
    );
    assert!(out.contains("Images are identical"), "{out}");
    assert_eq!(
        bounced(&d, "vol"),
        0,
        "NBD payloads and preserved chunks must reach O_DIRECT aligned"
    );

    // Sector-aligned writes inside a page: O_DIRECT takes them where the
    // file system's alignment is 512, the page cache where it is larger;
    // either way they read back.
    write_patterns(
        &uri,
        &mut model,
        &[(0x66, 512, 1024, ""), (0x77, 8 * MIB + 1536, 3584, "-f")],
    );
    qemu_io_ok(
        &uri,
        true,
        &["read -P 0x66 512 1024", "read -P 0x77 8390144 3584"],
    );

    // Writes never leave pages behind; reads leave them exactly when the
    // mode caches reads.
    let from_cache = |d: &Daemon| {
        d.json(&["volume", "info", "vol"])["once_reads_from_cache"]
            .as_u64()
            .unwrap()
    };
    let preserved_from_cache = from_cache(&d);
    evict(&origin("vol"));
    assert_eq!(resident_pages(&origin("vol")), 0, "evicted before reading");
    qemu_io_ok(&uri, false, &["write -P 0x99 16M 4M", "flush"]);
    assert_eq!(
        resident_pages(&origin("vol")),
        0,
        "O_DIRECT writes are not cached"
    );
    model[(16 * MIB) as usize..(20 * MIB) as usize].fill(0x99);
    assert_same("volume", &dump(&d, "vol", &t.path().join("c.img")), &model);
    let cached = resident_pages(&origin("vol"));
    assert_eq!(
        from_cache(&d),
        preserved_from_cache,
        "nothing was cached when preserving"
    );
    // Content the cache holds is preserved from it in writearound.
    d.ok(&["snapshot", "create", "vol", "s2"]);
    write_patterns(&uri, &mut model, &[(0xaa, 24 * MIB, 256 * 1024, "")]);
    if mode == "writearound" {
        assert!(
            cached >= (16 * MIB / 4096) as usize,
            "{cached} pages cached"
        );
        // The write's 4 chunks are preserved together: one read.
        assert_eq!(
            from_cache(&d),
            preserved_from_cache + 1,
            "4 chunks preserved from the cache in one read"
        );
        // The daemon caches what it reads in base pages (readahead off), so
        // a 4 KiB direct write drops its own page, not the large folio
        // readahead would have built around it (hundreds of KiB each).
        let before = resident_pages(&origin("vol"));
        let writes: Vec<(u8, u64, u64, &str)> = (0..8)
            .map(|k| (0xbb, k * 2 * MIB + 8192, 4096, ""))
            .collect();
        write_patterns(&uri, &mut model, &writes);
        qemu_io_ok(&uri, false, &["flush"]);
        let dropped = before.saturating_sub(resident_pages(&origin("vol")));
        assert!(
            dropped <= 4 * writes.len(),
            "{} 4 KiB writes dropped {dropped} cached pages",
            writes.len()
        );
    } else {
        assert_eq!(cached, 0, "cache none must not fill the page cache");
        assert_eq!(from_cache(&d), 0, "cache none never reads the cache");
    }

    // The mode is the volume's: it survives a restart, data flushed before.
    d.signal(libc::SIGTERM);
    d.restart();
    assert_eq!(d.json(&["volume", "info", "vol"])["cache"], mode);
    assert_direct(&d, &origin("vol"), true);
    assert_direct(&d, &origin("wb"), false);
    assert_same(
        "after restart",
        &dump(&d, "vol", &t.path().join("r.img")),
        &model,
    );
    assert_same(
        "snapshot after restart",
        &dump(&d, "vol@s1", &t.path().join("rs.img")),
        &data,
    );
}

/// `--cache none --backing FILE` opens the user's file with O_DIRECT, and
/// qemu-io's patterns round-trip through it.
#[test]
fn cache_none_backing_file_round_trips() {
    let test = "cache_none_backing_file_round_trips";
    if skip_without(test, &["qemu-io"]) {
        return;
    }
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    let backing = t.path().join("disk.raw");
    let initial = random_bytes(3, (8 * MIB) as usize);
    std::fs::write(&backing, &initial).unwrap();
    d.ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "8M",
        "--backing",
        backing.to_str().unwrap(),
        "--cache",
        "none",
    ]);
    assert_direct(&d, &backing, true);
    let uri = d.uri("vol");
    qemu_io_ok(
        &uri,
        false,
        &["write -P 0xa1 1M 128K", "write -f -P 0xa2 7M 64K", "flush"],
    );
    qemu_io_ok(&uri, true, &["read -P 0xa1 1M 128K", "read -P 0xa2 7M 64K"]);
    // Flushed: the file itself holds the data, untouched elsewhere.
    let file = std::fs::read(&backing).unwrap();
    let mut want = initial;
    want[(MIB) as usize..(MIB + 128 * 1024) as usize].fill(0xa1);
    want[(7 * MIB) as usize..(7 * MIB + 65536) as usize].fill(0xa2);
    assert_same("backing file", &file, &want);
    assert_eq!(bounced(&d, "vol"), 0);
}

/// Where the file system refuses O_DIRECT, a volume created without a mode
/// is buffered (and says so), and asking for an O_DIRECT mode is refused
/// with the way out.
#[test]
fn default_cache_mode_falls_back_where_o_direct_is_refused() {
    let test = "default_cache_mode_falls_back_where_o_direct_is_refused";
    if skip_without(test, &["qemu-io"]) {
        return;
    }
    let (t, _) = tempdir();
    let dir = t.path().join("ramfs");
    std::fs::create_dir(&dir).unwrap();
    let Some(_mount) = mount_ramfs(
        "default_cache_mode_falls_back_where_o_direct_is_refused",
        &dir,
    ) else {
        return;
    };
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "vol", "--size", "4M"]);
    assert_eq!(d.json(&["volume", "info", "vol"])["cache"], "writeback");
    for mode in ["none", "writearound"] {
        let err = d.fails(&["volume", "create", mode, "--size", "4M", "--cache", mode]);
        assert!(err.contains("refuses O_DIRECT"), "{err}");
        assert!(err.contains("use cache mode writeback"), "{err}");
    }
    let uri = d.uri("vol");
    qemu_io_ok(&uri, false, &["write -P 0x5a 64K 64K", "flush"]);
    qemu_io_ok(&uri, true, &["read -P 0x5a 64K 64K"]);
}

#[test]
fn copy_jobs_and_replication_syncs_leave_the_page_cache_as_they_found_it() {
    // Each passes over the volume once: pages cached by its reads would
    // push out what clients read, and every later direct write of them
    // would have to drop them first (bench-repl: 4k writes after a full
    // sync cost the source 19 us instead of 14).
    let test = "copy_jobs_and_replication_syncs_leave_the_page_cache_as_they_found_it";
    if skip_without(test, &["qemu-io"]) {
        return;
    }
    let (t, dir) = tempdir();
    let key = key_file(t.path(), "key", "correct horse battery staple\n");
    let d = Daemon::start(&dir);
    let (dst, addr) = replication_destination(&t.path().join("dst"), &key, &[]);
    d.ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "8M",
        "--cache",
        "writearound",
    ]);
    let origin = dir.join("volumes").join("vol").join("origin.img");
    qemu_io_ok(&d.uri("vol"), false, &["write -P 0x5a 0 8M"]);
    evict(&origin);
    assert_eq!(resident_pages(&origin), 0);

    let copy = t.path().join("copy.img");
    let id = d.ok(&["copy", "start", "vol", "--to", copy.to_str().unwrap()]);
    let job = wait_job_ended(&d, id.trim());
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(std::fs::read(&copy).unwrap(), vec![0x5a; 8 * MIB as usize]);
    assert_eq!(resident_pages(&origin), 0, "the copy job left pages cached");

    let to = format!("{addr}/vol");
    d.ok(&[
        "replicate",
        "start",
        "vol",
        "--to",
        &to,
        "--key-file",
        key.to_str().unwrap(),
    ]);
    let cp = d.json(&["replicate", "cp", "vol"]);
    assert!(cp["cp"].as_u64().is_some(), "{cp}");
    assert_eq!(
        resident_pages(&origin),
        0,
        "the full sync left pages cached"
    );
    qemu_io_ok(&dst.uri("vol"), true, &["read -P 0x5a 0 8M"]);

    // What a client reads stays cached (the check above can see pages).
    qemu_io_ok(&d.uri("vol"), true, &["read -P 0x5a 0 1M"]);
    assert!(
        resident_pages(&origin) >= 256,
        "a client's read was not cached"
    );
}

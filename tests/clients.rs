//! End-to-end tests of the built `snapblk` binary driven by real NBD clients
//! (qemu-img, qemu-io, nbdinfo, nbdcopy, libnbd's Python bindings, fio's nbd
//! engine) over the daemon's UNIX socket.
//!
//! `tests/nbd_wire.rs` covers the wire protocol with a hand-written client
//! against an in-process server, and `tests/control_cli.rs` the control plane;
//! here every test goes through a real daemon process and a real client, and
//! checks data (byte comparisons, patterns, checksums), exit codes and
//! point-in-time images, including across `kill -9`.
//!
//! A test whose client is not installed prints `SKIP <test>: <tool> ...` and
//! passes; CI installs all of them.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// Unless a tool in `tools` is missing (then `None`, after a SKIP line):
/// a daemon on a temporary directory, with volume `vol` created with
/// `options` (`snapblk volume create vol OPTIONS...`).
fn daemon_with_vol(
    test: &str,
    tools: &[&str],
    options: &[&str],
) -> Option<(tempfile::TempDir, Daemon)> {
    if skip_without(test, tools) {
        return None;
    }
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    let mut args = vec!["volume", "create", "vol"];
    args.extend_from_slice(options);
    d.ok(&args);
    Some((t, d))
}

/// Copies an export to a local file with nbdcopy and returns its bytes.
fn dump(d: &Daemon, export: &str, path: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(path);
    run_ok(Command::new("nbdcopy").arg(d.uri(export)).arg(path));
    std::fs::read(path).unwrap()
}

// ---------------------------------------------------------------------------
// 1. qemu-img
// ---------------------------------------------------------------------------

/// qemu-img reports the size, writes a random image into the export
/// (`convert -n`), `compare` finds it identical (and finds a one-sector change),
/// converting the export (and a snapshot of it) back out gives the same bytes.
#[test]
fn qemu_img_info_convert_compare() {
    let Some((t, d)) = daemon_with_vol(
        "qemu_img_info_convert_compare",
        &["qemu-img", "qemu-io"],
        &["--size", "48M", "--chunk-size", "16K"],
    ) else {
        return;
    };
    let uri = d.uri("vol");

    let info = run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&uri),
    );
    let v: Value = serde_json::from_str(&info[..info.rfind('}').unwrap() + 1]).unwrap();
    assert_eq!(v["virtual-size"], 48 * MIB, "{info}");

    // A random image with a zero gap (convert may send zero requests for it).
    let mut data = random_bytes(1, (48 * MIB) as usize);
    data[(10 * MIB) as usize..(13 * MIB) as usize].fill(0);
    let src = t.path().join("src.img");
    write_file(&src, &data);
    // Pre-fill the volume where the gap goes, so zeroing must really happen.
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0xff 10M 3M"])
            .arg(&uri),
    );

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

    // Convert it back out and compare byte for byte.
    let back = t.path().join("back.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back),
    );
    assert_same(
        "qemu-img convert out",
        &std::fs::read(&back).unwrap(),
        &data,
    );

    // Snapshot, then change one sector: compare now sees the difference on
    // the volume (exit 1), not on the snapshot.
    d.ok(&["snapshot", "create", "vol", "s"]);
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x42 30M 512"])
            .arg(&uri),
    );
    let mut cmp = Command::new("qemu-img");
    cmp.args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri);
    let out = cmp.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare must see the change: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&(30 * MIB).to_string()));
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(d.uri("vol@s")),
    );
    assert!(out.contains("Images are identical"), "{out}");
    let snap_out = t.path().join("snap.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(d.uri("vol@s"))
            .arg(&snap_out),
    );
    assert_same("snapshot out", &std::fs::read(&snap_out).unwrap(), &data);
}

// ---------------------------------------------------------------------------
// 2. qemu-io
// ---------------------------------------------------------------------------

/// Patterns written at unaligned offsets, across chunk and partition
/// boundaries, read back exactly; a wrong pattern is detected (so the check
/// itself works); zeroes and discards read back as zero; a snapshot keeps
/// the old patterns.
#[test]
fn qemu_io_patterns() {
    // 4 partitions of 8 MiB, 64 KiB chunks.
    let Some((_t, d)) = daemon_with_vol(
        "qemu_io_patterns",
        &["qemu-io"],
        &["--size", "32M", "--partitions", "4"],
    ) else {
        return;
    };
    let uri = d.uri("vol");
    // (pattern, offset, length): sector-aligned, chunk-unaligned, crossing a
    // chunk boundary, crossing a partition boundary, the last bytes.
    let writes: [(u8, u64, u64); 6] = [
        (0xab, 0, 4096),
        (0x11, 512, 1024),
        (0x22, 65536 - 1536, 3072),
        (0x33, 8 * MIB - 65536 - 512, 2 * 65536 + 1024),
        (0x44, 20 * MIB + 4096, 300 * 1024),
        (0x55, 32 * MIB - 4096, 4096),
    ];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(p, o, l)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    qemu_io_ok(&uri, false, &cmds);

    // Expected content of the touched ranges, later writes win.
    let check = |uri: &str, writes: &[(u8, u64, u64)]| {
        let mut reads = vec![
            // 0xab survives around the 0x11 write.
            "read -P 0xab 0 512".to_string(),
            "read -P 0xab 1536 2560".to_string(),
            "read -P 0 4096 4096".to_string(),
            "read -P 0 12M 4096".to_string(),
        ];
        for (p, o, l) in &writes[1..] {
            reads.push(format!("read -P {p:#x} {o} {l}"));
        }
        qemu_io_ok(uri, true, &reads);
    };
    check(&uri, &writes);

    // The pattern check itself works: a wrong pattern is reported.
    let (ok, text) = qemu_io(&uri, true, &["read -P 0x12 20M 4096"]);
    assert!(
        !ok || text.contains("Pattern verification failed"),
        "a wrong pattern must be detected: {text}"
    );
    assert!(text.contains("Pattern verification failed"), "{text}");

    // Snapshot, then overwrite, zero and discard on the volume.
    d.ok(&["snapshot", "create", "vol", "s1"]);
    qemu_io_ok(
        &uri,
        false,
        &[
            "write -P 0x99 512 1024",
            "write -z 20M 304K",
            "discard 8M 64K",
            "flush",
        ],
    );
    qemu_io_ok(
        &uri,
        true,
        &[
            "read -P 0x99 512 1024",
            "read -P 0 20M 400K",
            "read -P 0 8M 64K",
            format!("read -P 0x33 {} 65536", 8 * MIB - 65536 - 512).as_str(),
            format!("read -P 0x33 {} 512", 8 * MIB + 65536).as_str(),
        ],
    );
    // The snapshot still has the old image.
    check(&d.uri("vol@s1"), &writes);
    // And refuses writes.
    let (ok, text) = qemu_io(&d.uri("vol@s1"), false, &["write -P 1 0 512"]);
    assert!(
        !ok || text.contains("failed") || text.contains("read-only"),
        "write to a snapshot must fail: {text}"
    );
}

// ---------------------------------------------------------------------------
// 3. nbdinfo
// ---------------------------------------------------------------------------

fn nbdinfo_json(uri: &str) -> Value {
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(uri));
    let v: Value = serde_json::from_str(&out[..out.rfind('}').unwrap() + 1]).unwrap();
    v["exports"][0].clone()
}

/// (offset, length, type) rows of `nbdinfo --map --json`.
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json"]).arg(uri));
    let v: Value = serde_json::from_str(&out[..out.rfind(']').unwrap() + 1]).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Merges adjacent rows of the same type (a server may split extents).
fn merge(map: &[(u64, u64, u64)]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for &(o, l, t) in map {
        match out.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}

#[test]
fn nbdinfo_flags_and_map() {
    let Some((_t, d)) = daemon_with_vol(
        "nbdinfo_flags_and_map",
        &["nbdinfo", "qemu-io"],
        &["--size", "64M"],
    ) else {
        return;
    };
    let uri = d.uri("vol");

    let e = nbdinfo_json(&uri);
    assert_eq!(e["export-size"], 64 * MIB, "{e}");
    assert_eq!(e["is_read_only"], false, "{e}");
    assert_eq!(e["can_multi_conn"], true, "{e}");
    assert_eq!(e["can_flush"], true, "{e}");
    assert_eq!(e["can_trim"], true, "{e}");
    assert_eq!(e["can_zero"], true, "{e}");

    // A fresh sparse volume is one hole.
    assert_eq!(merge(&nbdinfo_map(&uri)), vec![(0, 64 * MIB, 3)]);

    // Two separated 1 MiB regions of data.
    qemu_io_ok(
        &uri,
        false,
        &["write -P 0x61 3M 1M", "write -P 0x62 40M 1M"],
    );
    let want = vec![
        (0, 3 * MIB, 3),
        (3 * MIB, MIB, 0),
        (4 * MIB, 36 * MIB, 3),
        (40 * MIB, MIB, 0),
        (41 * MIB, 23 * MIB, 3),
    ];
    assert_eq!(merge(&nbdinfo_map(&uri)), want);

    d.ok(&["snapshot", "create", "vol", "snap"]);
    let s = nbdinfo_json(&d.uri("vol@snap"));
    assert_eq!(s["export-size"], 64 * MIB, "{s}");
    assert_eq!(s["is_read_only"], true, "{s}");
    assert_eq!(s["can_multi_conn"], true, "{s}");
    // The volume stays writable.
    assert_eq!(nbdinfo_json(&uri)["is_read_only"], false);

    // After more writes (and a discard) on the volume, the snapshot's map is
    // still the old one and the volume's map is the new one.
    qemu_io_ok(&uri, false, &["write -P 0x63 20M 1M", "discard 40M 1M"]);
    assert_eq!(merge(&nbdinfo_map(&d.uri("vol@snap"))), want);
    let m = merge(&nbdinfo_map(&uri));
    assert_eq!(
        m,
        vec![
            (0, 3 * MIB, 3),
            (3 * MIB, MIB, 0),
            (4 * MIB, 16 * MIB, 3),
            (20 * MIB, MIB, 0),
            (21 * MIB, 43 * MIB, 3),
        ]
    );
    // The snapshot's "data" regions hold the data.
    qemu_io_ok(
        &d.uri("vol@snap"),
        true,
        &["read -P 0x61 3M 1M", "read -P 0x62 40M 1M"],
    );
}

// ---------------------------------------------------------------------------
// 4. nbdcopy
// ---------------------------------------------------------------------------

#[test]
fn nbdcopy_volume_file_volume_and_export_to_export() {
    if skip_without(
        "nbdcopy_volume_file_volume_and_export_to_export",
        &["nbdcopy", "qemu-img"],
    ) {
        return;
    }
    let (t, dir) = tempdir();
    let d = Daemon::start(&dir);
    for v in ["a", "b", "c"] {
        d.ok(&["volume", "create", v, "--size", "64M"]);
    }
    // Random content with zero gaps (4 MiB, and a sub-chunk 12 KiB one).
    let mut data = random_bytes(4, (64 * MIB) as usize);
    data[(16 * MIB) as usize..(20 * MIB) as usize].fill(0);
    data[(50 * MIB) as usize + 4096..(50 * MIB) as usize + 16384].fill(0);
    let src = t.path().join("src.img");
    write_file(&src, &data);
    let want = crc32c::crc32c(&data);
    // Fill "a" with another client.
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(d.uri("a")),
    );
    // Targets b and c hold junk first, so nbdcopy's zeroing must work.
    let junk = t.path().join("junk.img");
    write_file(&junk, &vec![0xee; (64 * MIB) as usize]);
    run_ok(Command::new("nbdcopy").arg(&junk).arg(d.uri("b")));
    run_ok(Command::new("nbdcopy").arg(&junk).arg(d.uri("c")));

    // a -> file
    let out = t.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(d.uri("a")).arg(&out));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(crc32c::crc32c(&got), want, "a -> file checksum");
    assert_same("a -> file", &got, &data);

    // file -> b (with a flush at the end)
    run_ok(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(&out)
            .arg(d.uri("b")),
    );
    // a -> c, export to export, several connections and requests in flight.
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16"])
            .arg(d.uri("a"))
            .arg(d.uri("c")),
    );
    for v in ["b", "c"] {
        let got = dump(&d, v, &t.path().join(format!("{v}.img")));
        assert_eq!(crc32c::crc32c(&got), want, "volume {v} checksum");
        assert_same(v, &got, &data);
    }
    // A snapshot of b copied to c: c now equals the snapshot, even after b
    // is overwritten.
    d.ok(&["snapshot", "create", "b", "s"]);
    run_ok(Command::new("nbdcopy").arg(&junk).arg(d.uri("b")));
    run_ok(Command::new("nbdcopy").arg(d.uri("b@s")).arg(d.uri("c")));
    let got = dump(&d, "c", &t.path().join("c2.img"));
    assert_eq!(crc32c::crc32c(&got), want, "b@s -> c checksum");
    let got = dump(&d, "b", &t.path().join("b2.img"));
    assert!(got.iter().all(|&b| b == 0xee), "b was overwritten");
}

// ---------------------------------------------------------------------------
// 5. Python libnbd
// ---------------------------------------------------------------------------

const PY_LIBNBD: &str = r#"
import nbd, errno, sys
uri, snapuri = sys.argv[1], sys.argv[2]
MIB = 1 << 20
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
# Let bad requests reach the server instead of libnbd refusing them itself.
h.set_strict_mode(0)
size = h.get_size()
assert size == 64 * MIB, size
assert h.can_trim() and h.can_zero() and h.can_fua() and h.can_flush()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

def pat(seed, n):
    return bytes(((i * 131 + seed * 17 + (i >> 9)) & 0xff) for i in range(n))

def zeros(n):
    return bytes(n)

def extents(count, offset):
    got = []
    def cb(ctx, off, entries, err):
        assert ctx == nbd.CONTEXT_BASE_ALLOCATION, ctx
        o = off
        for i in range(0, len(entries), 2):
            got.append((o, entries[i], entries[i + 1]))
            o += entries[i]
        return 0
    h.block_status(count, offset, cb)
    return got

def flags_at(offset):
    for (o, l, f) in extents(MIB, offset):
        if o <= offset < o + l:
            return f
    raise AssertionError("no extent covers %d" % offset)

# pwrite / pread, including unaligned offsets inside a chunk.
a = pat(1, 1 * MIB)
h.pwrite(a, 4 * MIB)
assert h.pread(len(a), 4 * MIB) == a
b = pat(2, 1024)
h.pwrite(b, 4 * MIB + 512)
exp = bytearray(a); exp[512:1536] = b
assert h.pread(len(a), 4 * MIB) == bytes(exp)
assert h.pread(4096, 0) == zeros(4096)

# trim a 128 KiB aligned range in the middle, then it reads zeros and the
# rest is intact.
h.trim(128 * 1024, 4 * MIB + 256 * 1024)
exp[256 * 1024:384 * 1024] = zeros(128 * 1024)
assert h.pread(len(a), 4 * MIB) == bytes(exp), "trim"
# A sub-chunk trim (sector-aligned) also reads back zeros.
h.trim(3072, 4 * MIB + 700 * 1024 + 512)
exp[700 * 1024 + 512:700 * 1024 + 3584] = zeros(3072)
assert h.pread(len(a), 4 * MIB) == bytes(exp), "sub-chunk trim"

# zero with NO_HOLE: zeros, still allocated (not a hole).
h.pwrite(pat(3, MIB), 10 * MIB)
h.zero(MIB, 10 * MIB, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(MIB, 10 * MIB) == zeros(MIB), "zero NO_HOLE"
# After a flush the zeroing has surely reached the file (ext4 then holds
# unwritten extents, which SEEK_HOLE calls holes).
h.flush()
f = flags_at(10 * MIB)
assert f & nbd.STATE_HOLE == 0, "NO_HOLE range reported as a hole: %r" % extents(MIB, 10 * MIB)
# zero without NO_HOLE, on a written range: zeros.
h.pwrite(pat(4, MIB), 12 * MIB)
h.zero(MIB, 12 * MIB)
assert h.pread(MIB, 12 * MIB) == zeros(MIB), "zero"

# FUA write.
c = pat(5, 64 * 1024)
h.pwrite(c, 20 * MIB, nbd.CMD_FLAG_FUA)
assert h.pread(len(c), 20 * MIB) == c

# block_status: data where written, a zero hole elsewhere.
assert flags_at(20 * MIB) & nbd.STATE_HOLE == 0
assert flags_at(4 * MIB) & nbd.STATE_HOLE == 0
f = flags_at(40 * MIB)
assert f == nbd.STATE_HOLE | nbd.STATE_ZERO, f
ext = extents(64 * MIB - 20 * MIB, 20 * MIB)
assert ext[0][0] == 20 * MIB and ext[0][2] & nbd.STATE_HOLE == 0 and ext[0][1] >= 64 * 1024, ext
total = 0
for (o, l, fl) in ext:
    total += l
assert total <= 64 * MIB - 20 * MIB

# Out-of-range requests get EINVAL from the server; the handle lives on.
for (n, off) in [(4096, size), (8192, size - 4096), (512, 1 << 62)]:
    try:
        h.pread(n, off)
        raise AssertionError("out-of-range pread(%d, %d) succeeded" % (n, off))
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, (e.errnum, e.string)
try:
    h.pwrite(b"x" * 4096, size - 1024)
    raise AssertionError("out-of-range pwrite succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, (e.errnum, e.string)
# The export's minimum block size is 512: a misaligned write is refused
# with EINVAL and changes nothing.
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
try:
    h.pwrite(b"x" * 1000, 4 * MIB + 513)
    raise AssertionError("misaligned pwrite succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, (e.errnum, e.string)
assert h.pread(len(a), 4 * MIB) == bytes(exp), "misaligned write changed data"
# Nothing was written at the end by the failed request.
assert h.pread(1024, size - 1024) == zeros(1024)
assert h.pread(len(c), 20 * MIB) == c
h.pwrite(b"\x5a" * 4096, size - 4096)
assert h.pread(4096, size - 4096) == b"\x5a" * 4096
h.flush()

# A snapshot export refuses writes with EPERM from the server (libnbd's own
# checks are switched off so the requests are really sent).
s = nbd.NBD()
s.connect_uri(snapuri)
assert s.is_read_only()
s.set_strict_mode(0)
for op in ("pwrite", "trim", "zero"):
    try:
        if op == "pwrite":
            s.pwrite(b"y" * 4096, 0)
        elif op == "trim":
            s.trim(4096, 4 * MIB)
        else:
            s.zero(4096, 4 * MIB)
        raise AssertionError("%s to a snapshot succeeded" % op)
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, (op, e.errnum, e.string)
# The snapshot still reads its data, the handle lives.
assert s.pread(4096, 0) == zeros(4096)
assert s.pread(MIB, 4 * MIB) == bytes(exp)
h.shutdown()
s.shutdown()
print("PASS")
"#;

#[test]
fn libnbd_python_requests() {
    let Some((_t, d)) = daemon_with_vol(
        "libnbd_python_requests",
        &["python3-nbd"],
        &["--size", "64M"],
    ) else {
        return;
    };
    d.ok(&["snapshot", "create", "vol", "empty"]);
    // Snapshot "s" holds, at 4M..5M, exactly what the main script's `exp`
    // is at its end (after its trims), zeros elsewhere; the main script
    // reads it through a second handle and checks writes to it get EPERM.
    let pre = r#"
import nbd, sys
MIB = 1 << 20
def pat(seed, n):
    return bytes(((i * 131 + seed * 17 + (i >> 9)) & 0xff) for i in range(n))
h = nbd.NBD(); h.connect_uri(sys.argv[1])
a = bytearray(pat(1, MIB)); a[512:1536] = pat(2, 1024)
a[256 * 1024:384 * 1024] = bytes(128 * 1024)
a[700 * 1024 + 512:700 * 1024 + 3584] = bytes(3072)
h.pwrite(bytes(a), 4 * MIB)
h.flush()
print("PASS")
"#;
    py_ok(pre, &[d.uri("vol")]);
    d.ok(&["snapshot", "create", "vol", "s"]);
    py_ok(PY_LIBNBD, &[d.uri("vol"), d.uri("vol@s")]);
    // The empty snapshot is still empty.
    let check = r#"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for off in range(0, h.get_size(), 1 << 20):
    assert h.pread(1 << 20, off) == bytes(1 << 20), off
print("PASS")
"#;
    py_ok(check, &[d.uri("vol@empty")]);
}

// ---------------------------------------------------------------------------
// 6. fio
// ---------------------------------------------------------------------------

/// Runs fio in `cwd` (it leaves verify state files there).
fn fio_ok(cwd: &Path, args: &[String]) -> String {
    let (ok, o, e) = run(Command::new("fio").current_dir(cwd).args(args));
    let text = o + &e;
    assert!(ok, "fio {args:?} failed:\n{text}");
    assert!(
        !text.contains("verify:") && !text.contains("bad magic") && !text.contains("crc32c:"),
        "fio reported verify errors:\n{text}"
    );
    assert!(text.contains("err= 0"), "fio job error:\n{text}");
    text
}

#[test]
fn fio_nbd_engine_verify() {
    let Some((t, d)) = daemon_with_vol(
        "fio_nbd_engine_verify",
        &["fio"],
        &["--size", "64M", "--chunk-size", "16K"],
    ) else {
        return;
    };
    let uri = d.uri("vol");
    // Snapshots during the workload make every overwrite copy-on-write.
    d.ok(&["snapshot", "create", "vol", "before"]);
    let out = fio_ok(
        t.path(),
        &[
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ]
        .map(String::from),
    );
    // fio really verified: reads happened (the verify pass) after writes.
    assert!(out.contains("READ:") && out.contains("WRITE:"), "{out}");

    d.ok(&["snapshot", "create", "vol", "mid"]);
    // Two jobs, two connections, disjoint 16 MiB ranges, mixed I/O with
    // unaligned-to-chunk block sizes.
    fio_ok(
        t.path(),
        &[
            "--name=m",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--rwmixread=40",
            "--bsrange=4k-64k",
            "--bs_unaligned=0",
            "--iodepth=8",
            "--numjobs=2",
            "--size=16M",
            "--offset=16M",
            "--offset_increment=24M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--group_reporting",
        ]
        .map(String::from),
    );
    // The snapshot taken before all this is still all zeros.
    if have("qemu-io") {
        qemu_io_ok(
            &d.uri("vol@before"),
            true,
            &["read -P 0 0 32M", "read -P 0 32M 32M"],
        );
    }
}

// ---------------------------------------------------------------------------
// 7 + 10. A numbered-block writer, and point-in-time checks
// ---------------------------------------------------------------------------

const BS: usize = 4096;
/// Multiplier that scatters sequence numbers over the slots (odd, so it is a
/// permutation modulo a power of two).
const SCATTER: u64 = 40503;

fn slot_of(seq: u64, nslots: u64) -> u64 {
    (seq.wrapping_mul(SCATTER)) % nslots
}

/// The block that the writer writes for `seq` (must match `WRITER`).
fn block_of(seq: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BS);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(seq ^ 0x5A5A_5A5A_5A5A_5A5A).to_le_bytes());
    b.resize(BS, (seq.wrapping_mul(7).wrapping_add(1) & 0xff) as u8);
    b
}

/// Decodes an image into one `Option<seq>` per slot; panics on a block
/// that is neither zeros nor exactly the block of a sequence number that
/// belongs to that slot.
fn decode(img: &[u8], nslots: u64, what: &str) -> Vec<Option<u64>> {
    assert_eq!(img.len() as u64, nslots * BS as u64, "{what}: size");
    img.chunks(BS)
        .enumerate()
        .map(|(i, b)| {
            if b.iter().all(|&x| x == 0) {
                return None;
            }
            let seq = u64::from_le_bytes(b[..8].try_into().unwrap());
            assert!(
                b == block_of(seq).as_slice(),
                "{what}: slot {i} holds a torn or foreign block (seq field {seq})"
            );
            assert_eq!(
                slot_of(seq, nslots),
                i as u64,
                "{what}: block of seq {seq} in the wrong slot {i}"
            );
            Some(seq)
        })
        .collect()
}

/// The image after writes `0..k`.
fn image_at(k: u64, nslots: u64) -> Vec<Option<u64>> {
    let mut v = vec![None; nslots as usize];
    for seq in 0..k {
        v[slot_of(seq, nslots) as usize] = Some(seq);
    }
    v
}

/// Checks that `img` is exactly the image after the first `k` writes for
/// some `k` in `lo..=hi`; returns `k`.
fn check_point_in_time(img: &[u8], nslots: u64, lo: u64, hi: u64, what: &str) -> u64 {
    let got = decode(img, nslots, what);
    let k = got.iter().flatten().max().map_or(0, |m| m + 1);
    let want = image_at(k, nslots);
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: not a point-in-time image: newest write is {}, but slot {i} holds {:?} \
             instead of {:?}",
            k as i64 - 1,
            got[i],
            want[i]
        );
    }
    assert!(
        lo <= k && k <= hi,
        "{what}: image holds writes 0..{k}, but writes 0..{lo} were acknowledged before \
         the snapshot was requested and write {hi} started only after it returned"
    );
    k
}

/// The point-in-time checker itself rejects what it must (so the tests
/// below cannot pass vacuously): a missing acknowledged write, a write that
/// started after the snapshot returned, a hole in the prefix, a torn block.
#[test]
fn point_in_time_checker_rejects_bad_images() {
    let n = 64u64;
    let encode = |img: &[Option<u64>]| -> Vec<u8> {
        img.iter()
            .flat_map(|s| s.map_or(vec![0; BS], block_of))
            .collect()
    };
    let good = encode(&image_at(100, n));
    assert_eq!(check_point_in_time(&good, n, 90, 110, "good"), 100);
    let fails = |img: Vec<u8>, lo: u64, hi: u64| {
        std::panic::catch_unwind(|| check_point_in_time(&img, n, lo, hi, "bad")).is_err()
    };
    // Too old / too new for the bounds.
    assert!(fails(good.clone(), 101, 200));
    assert!(fails(good.clone(), 0, 99));
    // An older write in one slot (write 80 lost under write 16).
    let mut img = image_at(100, n);
    img[slot_of(80, n) as usize] = Some(16);
    assert!(fails(encode(&img), 0, 200));
    // A lost write (zeros) in the prefix.
    let mut img = image_at(100, n);
    img[slot_of(70, n) as usize] = None;
    assert!(fails(encode(&img), 0, 200));
    // A torn block.
    let mut bytes = good.clone();
    bytes[5 * BS + 100] ^= 1;
    assert!(fails(bytes, 0, 200));
}

/// A writer of numbered blocks in a thread, and snapshots taken via the CLI
/// from the main thread while it runs.
///
/// argv: URI VOL NSLOTS MODE CLI...; MODE is `live` (stop after the
/// snapshots plus one full pass over the slots, print DONE) or `crash` (flush
/// every 32 writes, print `FLUSHED n` after each acknowledged flush, run
/// until the connection dies).
///
/// Around each `snapshot create` the main thread records `a0` (writes
/// acknowledged before the call) and `s1` (writes started when it returned):
/// the writer sets `started` before it sends write n and `acked` after the
/// reply, and the GIL orders these with the main thread's reads.
const WRITER: &str = r#"
import nbd, sys, struct, threading, subprocess, json, time
uri, vol, nslots, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cli = sys.argv[5:]
BS = 4096
SCATTER = 40503
FLUSH_EVERY = 32
out_lock = threading.Lock()

def emit(line):
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

def block(seq):
    return struct.pack("<QQ", seq, seq ^ 0x5A5A5A5A5A5A5A5A) + bytes([(seq * 7 + 1) & 0xff]) * (BS - 16)

st = {"started": 0, "acked": 0, "stop": False, "error": None}

def writer():
    h = nbd.NBD()
    h.connect_uri(uri)
    seq = 0
    try:
        while not st["stop"]:
            st["started"] = seq + 1
            h.pwrite(block(seq), ((seq * SCATTER) % nslots) * BS)
            st["acked"] = seq + 1
            seq += 1
            if mode == "crash" and seq % FLUSH_EVERY == 0:
                h.flush()
                emit("FLUSHED %d" % seq)
        h.flush()
        h.shutdown()
    except nbd.Error as e:
        st["error"] = str(e)

t = threading.Thread(target=writer)
t.start()

def wait_acked(n):
    deadline = time.time() + 600
    while st["acked"] < n:
        if not t.is_alive():
            emit("FAIL writer died: %s" % st["error"])
            sys.exit(1)
        if time.time() > deadline:
            emit("FAIL writer too slow")
            sys.exit(1)
        time.sleep(0.002)

last_s1 = 0
for i in range(3):
    # Let the writer wrap around the slots between snapshots, so every
    # snapshot boundary is crossed by overwrites (copy-on-write).
    wait_acked(st["acked"] + nslots + 37 * i + 100)
    name = "s%d" % i
    a0 = st["acked"]
    r = subprocess.run(cli + ["snapshot", "create", vol, name], capture_output=True)
    s1 = st["started"]
    if r.returncode != 0:
        emit("FAIL snapshot create: %r" % r.stderr)
        st["stop"] = True
        sys.exit(1)
    last_s1 = s1
    emit("SNAP " + json.dumps({"name": name, "a0": a0, "s1": s1}))

if mode == "live":
    wait_acked(last_s1 + nslots + 10)
    st["stop"] = True
    t.join()
    if st["error"]:
        emit("FAIL " + st["error"])
        sys.exit(1)
    emit("DONE %d" % st["acked"])
    emit("PASS")
else:
    emit("SNAPS_DONE %d" % last_s1)
    t.join()
    emit("WRITER_DEAD started=%d acked=%d error=%s" % (st["started"], st["acked"], st["error"]))
    emit("PASS")
"#;

/// `WRITER`'s arguments for volume `vol` of `d`.
fn writer_args(d: &Daemon, nslots: u64, mode: &str) -> Vec<String> {
    let mut args = vec![
        d.uri("vol"),
        "vol".to_string(),
        nslots.to_string(),
        mode.to_string(),
    ];
    args.extend(d.cli_prefix());
    args
}

#[derive(Debug)]
struct SnapBounds {
    name: String,
    a0: u64,
    s1: u64,
}

fn parse_snap(line: &str) -> Option<SnapBounds> {
    let j = line.strip_prefix("SNAP ")?;
    let v: Value = serde_json::from_str(j).unwrap();
    Some(SnapBounds {
        name: v["name"].as_str().unwrap().to_string(),
        a0: v["a0"].as_u64().unwrap(),
        s1: v["s1"].as_u64().unwrap(),
    })
}

#[test]
fn snapshots_under_concurrent_writes_are_point_in_time() {
    let Some((t, d)) = daemon_with_vol(
        "snapshots_under_concurrent_writes_are_point_in_time",
        &["python3-nbd", "nbdcopy"],
        &["--size", "4M", "--chunk-size", "16K", "--partitions", "4"],
    ) else {
        return;
    };
    let nslots: u64 = 1024; // 4 MiB of 4 KiB blocks, 64 chunks of 16 KiB
    let args = writer_args(&d, nslots, "live");
    let out = py_ok(WRITER, &args);
    let snaps: Vec<SnapBounds> = out.lines().filter_map(parse_snap).collect();
    assert_eq!(snaps.len(), 3, "{out}");
    let total: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("DONE "))
        .unwrap()
        .parse()
        .unwrap();

    // How many writes overlapped each `snapshot create` (informational: a
    // property of the scheduler, not of the product).
    eprintln!("snapshot bounds (acked before, started after): {snaps:?}");
    let mut last_k = 0;
    for s in &snaps {
        assert!(
            s.a0 > last_k,
            "writes happened between snapshots: {snaps:?}"
        );
        let img = dump(&d, &format!("vol@{}", s.name), &t.path().join("snap.img"));
        let k = check_point_in_time(&img, nslots, s.a0, s.s1, &format!("vol@{}", s.name));
        assert!(k >= last_k);
        last_k = k;
    }
    // The live volume has every write.
    let img = dump(&d, "vol", &t.path().join("live.img"));
    check_point_in_time(&img, nslots, total, total, "live volume");

    // The snapshot list agrees, in order of generation.
    let list = d.json(&["snapshot", "list", "vol"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s0", "s1", "s2"]);
}

/// kill -9 while a libnbd writer writes with a flush every 32 writes and
/// snapshots are taken: after restart every write acknowledged before the
/// last acknowledged flush is there (or overwritten by a later write), and
/// every snapshot reads exactly its point-in-time image.
#[test]
fn kill9_under_write_load_keeps_flushed_writes_and_snapshots() {
    let Some((t, mut d)) = daemon_with_vol(
        "kill9_under_write_load_keeps_flushed_writes_and_snapshots",
        &["python3-nbd", "nbdcopy"],
        &["--size", "8M", "--chunk-size", "32K", "--partitions", "3"],
    ) else {
        return;
    };
    let nslots: u64 = 2048; // 8 MiB
    let args = writer_args(&d, nslots, "crash");
    let mut child = py_spawn(WRITER, &args, false);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut lines = Vec::new();
    let mut snaps_done: Option<u64> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    // Kill once the snapshots are taken and the writer has flushed another
    // half pass over the slots (overwrites of snapshotted data).
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("writer stalled; output so far: {lines:?}"));
        assert!(!line.starts_with("FAIL"), "{line}");
        if let Some(n) = line.strip_prefix("SNAPS_DONE ") {
            snaps_done = Some(n.parse().unwrap());
        }
        let flushed = line
            .strip_prefix("FLUSHED ")
            .map(|n| n.parse::<u64>().unwrap());
        lines.push(line);
        if let (Some(s), Some(f)) = (snaps_done, flushed) {
            if f >= s + nslots / 2 {
                break;
            }
        }
    }
    // kill -9 with the writer still writing.
    d.signal(libc::SIGKILL);
    // The writer notices the dead connection and exits.
    for line in rx.iter() {
        lines.push(line);
    }
    reader.join().unwrap();
    let status = child.wait().unwrap();
    let err = read_stderr(&mut child);
    assert!(status.success(), "writer: {status}\n{lines:?}\n{err}");
    let dead = lines
        .iter()
        .find(|l| l.starts_with("WRITER_DEAD"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(
        !dead.contains("error=None"),
        "the writer was still writing at the kill: {dead}"
    );
    let started: u64 = dead
        .split_whitespace()
        .find_map(|w| w.strip_prefix("started="))
        .unwrap()
        .parse()
        .unwrap();
    let last_flushed = lines
        .iter()
        .filter_map(|l| l.strip_prefix("FLUSHED "))
        .map(|n| n.parse::<u64>().unwrap())
        .max()
        .unwrap();
    let snaps: Vec<SnapBounds> = lines.iter().filter_map(|l| parse_snap(l)).collect();
    assert_eq!(snaps.len(), 3, "{lines:?}");

    d.restart();
    // Snapshots survived and read exactly their images.
    for s in &snaps {
        let img = dump(&d, &format!("vol@{}", s.name), &t.path().join("snap.img"));
        check_point_in_time(
            &img,
            nslots,
            s.a0,
            s.s1,
            &format!("vol@{} after kill -9", s.name),
        );
    }
    // The volume: each slot holds the last write to it before the last
    // acknowledged flush, or a later write that had started before the kill.
    let img = dump(&d, "vol", &t.path().join("live.img"));
    let got = decode(&img, nslots, "volume after kill -9");
    let floor = image_at(last_flushed, nslots);
    for (i, g) in got.iter().enumerate() {
        match (floor[i], *g) {
            (None, None) => {}
            (Some(f), None) => panic!(
                "slot {i}: flushed write {f} lost (last flush covered writes 0..{last_flushed})"
            ),
            (f, Some(s)) => {
                assert!(
                    f.is_none_or(|f| s >= f) && s < started,
                    "slot {i}: holds write {s}, but write {f:?} was flushed and only writes \
                     below {started} were started"
                );
            }
        }
    }
    // And the volume accepts writes again.
    if have("qemu-io") {
        qemu_io_ok(
            &d.uri("vol"),
            false,
            &["write -P 0x3c 0 4096", "read -P 0x3c 0 4096"],
        );
    }
}

// ---------------------------------------------------------------------------
// 8. Multi-conn flush visibility
// ---------------------------------------------------------------------------

const MULTI_CONN: &str = r#"
import nbd, sys
uri, phase = sys.argv[1], sys.argv[2]
MIB = 1 << 20
OFFS = [0, 100 * 4096 + 512, 3 * MIB - 2048, 17 * MIB, 33 * MIB + 65536, 63 * MIB - 8192]
def pat(i, n):
    return bytes(((j * 7 + i * 29 + (j >> 8)) & 0xff) or 1 for j in range(n))
if phase == "write":
    a = nbd.NBD(); a.connect_uri(uri)
    b = nbd.NBD(); b.connect_uri(uri)
    assert a.can_multi_conn() and b.can_multi_conn()
    for i, off in enumerate(OFFS):
        a.pwrite(pat(i, 4096 if i % 2 else 65536), off)
    a.pwrite(pat(99, MIB), 40 * MIB)
    # Connection B sees A's completed writes, and its flush covers them.
    for i, off in enumerate(OFFS):
        n = 4096 if i % 2 else 65536
        assert b.pread(n, off) == pat(i, n), off
    b.flush()
    sys.stdout.write("READY\n"); sys.stdout.flush()
    # Keep both connections open until killed.
    sys.stdin.read()
else:
    h = nbd.NBD(); h.connect_uri(uri)
    for i, off in enumerate(OFFS):
        n = 4096 if i % 2 else 65536
        assert h.pread(n, off) == pat(i, n), "write at %d lost" % off
    assert h.pread(MIB, 40 * MIB) == pat(99, MIB), "1 MiB write lost"
    print("PASS")
"#;

#[test]
fn multi_conn_flush_on_other_connection_survives_kill9() {
    let Some((_t, mut d)) = daemon_with_vol(
        "multi_conn_flush_on_other_connection_survives_kill9",
        &["python3-nbd"],
        &["--size", "64M", "--partitions", "4"],
    ) else {
        return;
    };
    let mut child = py_spawn(MULTI_CONN, &[d.uri("vol"), "write".to_string()], true);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.trim() != "READY" {
        let _ = child.kill();
        let err = read_stderr(&mut child);
        panic!("writer failed: {line}{err}");
    }
    // Both connections are still open: no disconnect can trigger a flush.
    d.kill9_and_restart();
    drop(child.stdin.take());
    let _ = child.wait();
    py_ok(MULTI_CONN, &[d.uri("vol"), "read".to_string()]);
}

// ---------------------------------------------------------------------------
// 9. Bad input over real sockets
// ---------------------------------------------------------------------------

const BAD_INPUT: &str = r#"
import nbd, socket, struct, sys, os
uri, path = sys.argv[1], sys.argv[2]
MIB = 1 << 20
h = nbd.NBD(); h.connect_uri(uri)
good = bytes((i * 13 + 5) & 0xff for i in range(MIB))
h.pwrite(good, 2 * MIB)

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9

def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b

def greet():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    m, o, fl = struct.unpack(">QQH", recv_exact(s, 18))
    assert m == NBDMAGIC and o == IHAVEOPT, (hex(m), hex(o))
    return s

def assert_closed(s, what):
    # The server must close the connection (EOF or reset), not hang.
    try:
        while True:
            c = s.recv(65536)
            if not c:
                break
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError("%s: server did not close the connection" % what)
    s.close()

def still_good(what):
    assert h.pread(MIB, 2 * MIB) == good, "data changed after " + what
    x = os.urandom(4096)
    h.pwrite(x, 10 * MIB)
    assert h.pread(4096, 10 * MIB) == x, what

garbage = bytes((i * 37 + 11) & 0xff for i in range(4096))

# 1. Garbage right after the server's greeting (instead of client flags + options).
s = greet(); s.sendall(garbage); assert_closed(s, "garbage after greeting")
still_good("garbage after greeting")

# 2. Valid client flags, then garbage instead of an option.
s = greet(); s.sendall(struct.pack(">I", 3) + garbage); assert_closed(s, "garbage option")
still_good("garbage option")

# 3. Valid option magic with an absurd length, then EOF of our side.
s = greet(); s.sendall(struct.pack(">IQII", 3, IHAVEOPT, 7, 0xFFFFFFF0) + b"abc")
s.shutdown(socket.SHUT_WR); assert_closed(s, "huge option")
still_good("huge option")

# 4. A full handshake (NBD_OPT_GO "vol"), a valid READ (simple reply) that
#    returns the right data, then a request with a bad magic.
s = greet()
name = b"vol"
s.sendall(struct.pack(">IQII", 3, IHAVEOPT, 7, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while True:
    magic, opt, typ, ln = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    data = recv_exact(s, ln)
    if typ == 1:
        break
    assert typ == 3, "unexpected reply type %#x: %r" % (typ, data)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 77, 2 * MIB + 4096, 4096))
magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
assert magic == 0x67446698 and err == 0 and cookie == 77, (hex(magic), err, cookie)
assert recv_exact(s, 4096) == good[4096:8192]
s.sendall(struct.pack(">IHHQQI", 0xdeadbeef, 0, 0, 78, 0, 4096) + garbage)
assert_closed(s, "bad request magic")
still_good("bad request magic")

# 5. A write request whose payload never comes, then EOF: nothing written.
s = greet()
s.sendall(struct.pack(">IQII", 3, IHAVEOPT, 7, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while True:
    magic, opt, typ, ln = struct.unpack(">QIII", recv_exact(s, 20))
    recv_exact(s, ln)
    if typ == 1:
        break
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 79, 2 * MIB, 65536) + b"\x00" * 100)
s.shutdown(socket.SHUT_WR)
assert_closed(s, "truncated write")
still_good("truncated write")

# 6. Many connections that connect and vanish at once.
for i in range(50):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path); s.close()
still_good("connect storm")
h.shutdown()
print("PASS")
"#;

#[test]
fn bad_input_from_real_sockets_and_clients() {
    let Some((_t, mut d)) = daemon_with_vol(
        "bad_input_from_real_sockets_and_clients",
        &["python3-nbd", "qemu-img", "qemu-io"],
        &["--size", "16M"],
    ) else {
        return;
    };
    py_ok(
        BAD_INPUT,
        &[d.uri("vol"), d.nbd_sock().display().to_string()],
    );
    assert!(d.alive(), "daemon died; log:\n{}", d.log());

    // Unknown export names: qemu-img fails to open, with a message naming it.
    for bad in ["nosuch", "vol@nosnap"] {
        let (ok, o, e) = run(Command::new("qemu-img").arg("info").arg(d.uri(bad)));
        assert!(!ok, "qemu-img info {bad} succeeded: {o}");
        assert!(
            e.contains(bad.split('@').next_back().unwrap()) && e.contains("not"),
            "unclear message for export {bad}: {e}"
        );
    }

    // Out-of-range reads through qemu-io fail, and the daemon still serves.
    for cmd in ["read 16M 4096", "read 16773120 8192", "write -P 1 16M 512"] {
        let (ok, text) = qemu_io(&d.uri("vol"), false, &[cmd]);
        assert!(
            !ok || text.contains("failed"),
            "qemu-io {cmd} should fail: {text}"
        );
    }
    qemu_io_ok(
        &d.uri("vol"),
        false,
        &["write -P 0x7e 16773120 4096", "read -P 0x7e 16773120 4096"],
    );
    assert!(d.alive(), "daemon died; log:\n{}", d.log());
    // The control plane still answers.
    assert_eq!(d.json(&["volume", "info", "vol"])["capacity"], 16 * MIB);
}

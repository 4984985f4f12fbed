//! A 4 GiB TRIM and a 4 GiB write-zeroes over NBD while a snapshot exists:
//! the snapshot keeps its data, the live volume reads zeros, and the daemon's
//! memory does not grow with the size of the request (issue 10, part 3: it
//! used to allocate a chunk buffer for every chunk at once, about 4 GiB).

mod common;

use common::*;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resets the daemon's peak RSS (VmHWM) to its current RSS.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

const WHOLE_DEVICE: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
op = sys.argv[2]
# Requests as large as NBD's 32-bit length allows: two cover 4 GiB.
step = (1 << 32) - (1 << 16)
off = 0
while off < size:
    n = min(step, size - off)
    if op == "trim":
        h.trim(n, off)
    else:
        h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)
    off += n
h.flush()
h.shutdown()
print("PASS")
"#;

#[test]
fn a_4g_trim_and_write_zeroes_under_a_snapshot_use_bounded_memory() {
    if skip_without(
        "a_4g_trim_and_write_zeroes_under_a_snapshot_use_bounded_memory",
        &["qemu-io"],
    ) || python().is_none()
    {
        return;
    }
    let (_tmp, dir) = tempdir();
    let d = Daemon::start(&dir);
    d.ok(&["volume", "create", "v", "--size", "4G"]);
    let live = d.uri("v");
    let places = [0, 2 * GIB + 3 * MIB, 4 * GIB - 8 * MIB];
    for (i, at) in places.iter().enumerate() {
        qemu_io_ok(
            &live,
            false,
            &[format!("write -P 0x{:x} {at} 8M", 0x51 + i)],
        );
    }
    d.ok(&["snapshot", "create", "v", "s1"]);
    let pid = d.pid();

    for (op, check) in [("trim", "discard"), ("zero", "write-zeroes")] {
        reset_peak(pid);
        let before = status_kib(pid, "VmRSS:");
        py_ok(WHOLE_DEVICE, &[live.clone(), op.to_string()]);
        let growth_mib = (status_kib(pid, "VmHWM:").saturating_sub(before)) / 1024;
        println!("{check} of 4 GiB under a snapshot: daemon peak RSS grew {growth_mib} MiB");
        assert!(
            growth_mib < 64,
            "a 4 GiB {check} grew the daemon's RSS by {growth_mib} MiB (bound: 64 MiB)"
        );
        for at in places {
            qemu_io_ok(&live, true, &[format!("read -P 0 {at} 8M")]);
        }
    }
    let snap = d.uri("v@s1");
    for (i, at) in places.iter().enumerate() {
        qemu_io_ok(&snap, true, &[format!("read -P 0x{:x} {at} 8M", 0x51 + i)]);
    }
    qemu_io_ok(&snap, true, &["read -P 0 16M 8M"]);
}

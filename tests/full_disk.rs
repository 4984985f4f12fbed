//! A full disk under the data directory: the writes that need space fail with
//! ENOSPC for that request only; the daemon keeps serving, nothing already
//! written (live or snapshot) is lost, and writes work again once space is
//! freed. Needs root (it mounts a small tmpfs); skips loudly otherwise.

mod common;

use common::{mount_tmpfs, qemu_io, qemu_io_clean, qemu_io_ok, Daemon};

#[test]
fn full_disk_fails_only_the_writes_that_need_space() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let Some(_mount) = mount_tmpfs("full_disk", &mnt, "24M") else {
        return;
    };
    let data = mnt.join("data");
    // Sockets and log outside the small file system.
    let d = Daemon::start_at(&data, &tmp.path().join("daemon"));
    d.ok(&["volume", "create", "v", "--size", "64M"]);
    let live = d.uri("v");
    let snap = d.uri("v@s1");

    qemu_io_ok(&live, false, &["write -P 0x11 0 8M"]);
    d.ok(&["snapshot", "create", "v", "s1"]);
    // Overwriting preserves 8 MiB for s1: still fits.
    qemu_io_ok(&live, false, &["write -P 0x22 0 8M"]);

    // 32 MiB more cannot fit in what is left of 24 MiB.
    let (_, w) = qemu_io(&live, false, &["write -P 0x33 8M 32M"]);
    assert!(
        w.contains("No space left on device"),
        "expected ENOSPC, got: {w}"
    );

    // The daemon still serves, and nothing written before is lost.
    let (ok, r) = qemu_io(&live, true, &["read -P 0x22 0 8M"]);
    assert!(qemu_io_clean(ok, &r), "live data damaged after ENOSPC: {r}");
    let (ok, r) = qemu_io(&snap, true, &["read -P 0x11 0 8M"]);
    assert!(qemu_io_clean(ok, &r), "snapshot damaged after ENOSPC: {r}");
    d.json(&["volume", "info", "v"]);

    // A snapshot that cannot preserve its data fails the write, not the volume.
    let (ok, w) = qemu_io(&live, false, &["write -P 0x44 0 8M"]);
    assert!(
        qemu_io_clean(ok, &w) || w.contains("No space left on device"),
        "an overwrite under a snapshot on a full disk must succeed or fail with ENOSPC: {w}"
    );
    let (ok, r) = qemu_io(&snap, true, &["read -P 0x11 0 8M"]);
    assert!(
        qemu_io_clean(ok, &r),
        "snapshot damaged by a failed copy-on-write: {r}"
    );

    // Freeing space makes writes work again: discard the partial region and
    // delete the snapshot (its preserved data is punched out of the store).
    qemu_io_ok(&live, false, &["discard 8M 32M"]);
    d.ok(&["snapshot", "delete", "v", "s1"]);
    let (ok, w) = qemu_io(&live, false, &["write -P 0x55 16M 4M"]);
    assert!(qemu_io_clean(ok, &w), "write after freeing space: {w}");
    qemu_io_ok(&live, true, &["read -P 0x55 16M 4M"]);
}

/// A disk filled to the last byte: deleting a snapshot must still work (its
/// `Free` records go into the journal's preallocated reserve) and give the
/// space back, so the volume can be written again without a restart.
#[test]
fn a_snapshot_delete_frees_space_on_a_disk_filled_to_the_last_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let Some(_mount) = mount_tmpfs("snapshot_delete_on_full_disk", &mnt, "48M") else {
        return;
    };
    let data = mnt.join("data");
    let d = Daemon::start_at(&data, &tmp.path().join("daemon"));
    d.ok(&["volume", "create", "v", "--size", "64M"]);
    let live = d.uri("v");
    qemu_io_ok(&live, false, &["write -P 0x11 0 16M"]);
    d.ok(&["snapshot", "create", "v", "s1"]);
    // 16 MiB preserved for s1 and 16 MiB of new data: 32 of 48 MiB used.
    qemu_io_ok(&live, false, &["write -P 0x22 0 16M", "flush"]);

    // Whatever is left goes to a file beside the volume, to the last byte.
    let filler = mnt.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0x5au8; 64 << 10];
    loop {
        use std::io::Write;
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    drop(f);
    let (_, w) = qemu_io(&live, false, &["write -P 0x33 32M 8M", "flush"]);
    assert!(
        w.contains("No space left on device"),
        "the disk should be full: {w}"
    );

    // The delete needs journal records, and there is no free byte for them
    // but the reserve; it must free s1's 16 MiB of preserved data.
    d.ok(&["snapshot", "delete", "v", "s1"]);
    let (ok, w) = qemu_io(&live, false, &["write -P 0x44 32M 8M", "flush"]);
    assert!(
        qemu_io_clean(ok, &w),
        "a write after the snapshot delete freed space: {w}"
    );
    qemu_io_ok(&live, true, &["read -P 0x22 0 16M", "read -P 0x44 32M 8M"]);
}

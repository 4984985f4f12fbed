//! Files and directories get explicit modes whatever the umask: under
//! umask 000, the data directory and everything in it is closed to others
//! and to the group's writes (volume files at most 0640), and copy targets
//! and restored images are 0600.

mod common;

use common::*;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// `snapblk ARGS` under umask 000 (a shell sets it, then execs).
fn umask0(args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", "umask 000 && exec \"$@\"", "sh", BIN])
        .args(args);
    c
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every directory and file under `dir` (sockets aside), with its mode.
fn walk(dir: &Path, out: &mut Vec<(std::path::PathBuf, bool, u32)>) {
    out.push((dir.to_path_buf(), true, mode(dir)));
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let t = std::fs::symlink_metadata(&p).unwrap().file_type();
        if t.is_dir() {
            walk(&p, out);
        } else if !t.is_socket() {
            out.push((p.clone(), false, mode(&p)));
        }
    }
}

#[test]
fn modes_are_explicit_under_umask_000() {
    if skip_without("modes_are_explicit_under_umask_000", &["qemu-io"]) {
        return;
    }
    let (t, dir) = tempdir();
    let mut d = Daemon::in_data_dir(&dir);
    let nbd = dir.join("nbd.sock");
    d.spawn(umask0(&[
        "daemon",
        "--data-dir",
        dir.to_str().unwrap(),
        "--nbd-socket",
        nbd.to_str().unwrap(),
    ]));
    d.ok(&["volume", "create", "v", "--size", "8M"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 7 0 1M"]);
    d.ok(&["snapshot", "create", "v", "s"]);
    qemu_io_ok(&d.uri("v"), false, &["write -P 8 0 1M"]);
    let raw = t.path().join("copy.img");
    let stream = t.path().join("copy.stream");
    for (target, format) in [(&raw, "raw"), (&stream, "stream")] {
        let id = d.ok(&[
            "copy",
            "start",
            "v@s",
            "--to",
            target.to_str().unwrap(),
            "--format",
            format,
        ]);
        let id = id.trim();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while d.json(&["copy", "status", id])["state"] != "done" {
            assert!(
                std::time::Instant::now() < deadline,
                "copy {id} never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            mode(target),
            0o600,
            "{format} copy target {}",
            target.display()
        );
    }
    let restored = t.path().join("restored.img");
    let out = umask0(&[
        "restore",
        stream.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&restored), 0o600, "restored image");

    let mut all = Vec::new();
    walk(&dir, &mut all);
    assert!(all.len() > 5, "{all:?}");
    for (p, is_dir, m) in &all {
        if *is_dir {
            assert_eq!(m & 0o027, 0, "directory {} is {m:o}", p.display());
        } else {
            assert_eq!(m & 0o137, 0, "file {} is {m:o}", p.display());
        }
    }
    assert_eq!(mode(&dir) & 0o777, 0o750, "the data directory");
}

#[test]
fn an_open_data_directory_is_tightened() {
    let (_t, dir) = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = Daemon::start(&dir);
    assert_eq!(mode(&dir) & 0o777, 0o750);
    assert!(d.log().contains("setting 750"), "{}", d.log());
}

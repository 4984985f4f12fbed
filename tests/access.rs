//! Owners, access lists and quotas (issue 13 part 4), from the outside: a
//! real non-root user (made here with `useradd`, removed at the end even
//! when the test fails) drives the CLI and real NBD clients (nbdinfo,
//! qemu-io, nbdsh) through the daemon's UNIX sockets, under its own uid
//! (`setpriv --reuid --regid --init-groups`).
//!
//! Needs root (to make users and run clients as them); skips otherwise.

mod common;

use common::{qemu_io, run, Daemon, BIN};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// Users and a group made for one test; removed on drop.
struct Accounts {
    group: String,
    users: Vec<String>,
}

impl Accounts {
    /// Group `sbt<tag>g`, user `sbt<tag>m` in it (a member) and user
    /// `sbt<tag>o` outside it.
    fn make(tag: &str) -> Accounts {
        let group = format!("sbt{tag}g");
        let mut acc = Accounts {
            group: group.clone(),
            users: Vec::new(),
        };
        // Leftovers of an earlier run that was killed.
        acc.users = vec![format!("sbt{tag}m"), format!("sbt{tag}o")];
        acc.remove();
        acc.users.clear();
        must(Command::new("groupadd").arg(&group));
        for (user, member) in [(format!("sbt{tag}m"), true), (format!("sbt{tag}o"), false)] {
            let mut c = Command::new("useradd");
            c.args(["-M", "-N", "-s", "/usr/sbin/nologin"]);
            if member {
                c.args(["-G", &group]);
            }
            must(c.arg(&user));
            acc.users.push(user);
        }
        acc
    }

    fn member(&self) -> &str {
        &self.users[0]
    }

    fn outsider(&self) -> &str {
        &self.users[1]
    }

    fn remove(&self) {
        for u in &self.users {
            let _ = Command::new("userdel").arg(u).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        self.remove();
    }
}

fn must(cmd: &mut Command) {
    let (ok, o, e) = run(cmd);
    assert!(ok, "{cmd:?} failed: {o}{e}");
}

fn is_root() -> bool {
    // SAFETY: no failure mode.
    unsafe { libc::geteuid() == 0 }
}

fn skip(test: &str) -> bool {
    if !is_root() {
        common::skip(test, "needs root to create users");
        return true;
    }
    for tool in ["useradd", "setpriv", "nbdinfo", "qemu-io", "nbdsh"] {
        if !common::installed(tool) && !Path::new(&format!("/usr/sbin/{tool}")).exists() {
            common::skip(test, &format!("{tool} is not installed"));
            return true;
        }
    }
    false
}

/// `cmd` run as `user` with its own groups.
fn as_user(user: &str, program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={user}"),
        &format!("--regid={}", primary_gid(user)),
        "--init-groups",
        "--",
        program,
    ]);
    c.env("HOME", "/");
    c
}

fn primary_gid(user: &str) -> String {
    let out = Command::new("id").args(["-g", user]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A daemon whose data directory belongs to `group` (the daemon's group),
/// in a temporary directory others may traverse.
fn daemon_for(acc: &Accounts) -> (tempfile::TempDir, Daemon) {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let dir = t.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    must(Command::new("chgrp").arg(&acc.group).arg(&dir));
    let d = Daemon::start(&dir);
    (t, d)
}

/// The CLI as `user`: (success, stdout, stderr).
fn cli_as(d: &Daemon, user: &str, args: &[&str]) -> (bool, String, String) {
    let mut c = as_user(user, BIN);
    c.arg("--control").arg(d.control()).args(args);
    c.env_remove("SNAPBLK_CONTROL");
    run(&mut c)
}

fn json_as(d: &Daemon, user: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = cli_as(d, user, &all);
    assert!(
        ok,
        "snapblk {args:?} as {user} failed: {err}\nlog:\n{}",
        d.log()
    );
    serde_json::from_str(&out).unwrap()
}

/// The CLI as `user`, expected to fail; its stderr.
fn refused(d: &Daemon, user: &str, args: &[&str]) -> String {
    let (ok, out, err) = cli_as(d, user, args);
    assert!(!ok, "snapblk {args:?} as {user} succeeded: {out}");
    err
}

fn nbdinfo_as(user: &str, uri: &str) -> (bool, String) {
    let (ok, o, e) = run(as_user(user, "nbdinfo").arg(uri));
    (ok, o + &e)
}

/// `qemu-io -f raw` as `user` on `uri`; (exit 0, output).
fn qemu_io_as(user: &str, uri: &str, readonly: bool, cmds: &[&str]) -> (bool, String) {
    let mut c = as_user(user, "qemu-io");
    if readonly {
        c.arg("-r");
    }
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let (ok, o, e) = run(c.arg(uri));
    (ok, o + &e)
}

/// A 512-byte write with libnbd's shell as `user`; (exit 0, output).
fn nbdsh_write_as(user: &str, uri: &str) -> (bool, String) {
    let (ok, o, e) =
        run(as_user(user, "nbdsh").args(["-u", uri, "-c", "h.pwrite(b'\\x42' * 512, 0)"]));
    (ok, o + &e)
}

/// Accounts tagged `tag` and a daemon of their group, or `None` (after a
/// SKIP line) where the test cannot run.
fn setup(test: &str, tag: char) -> Option<(Accounts, tempfile::TempDir, Daemon)> {
    if skip(test) {
        return None;
    }
    let acc = Accounts::make(&format!("{tag}{}", std::process::id() % 100000));
    let (t, d) = daemon_for(&acc);
    Some((acc, t, d))
}

#[test]
fn access_lists_gate_the_control_socket_and_nbd() {
    let Some((acc, _t, d)) = setup("access_lists_gate_the_control_socket_and_nbd", 'a') else {
        return;
    };
    let (user, outsider) = (acc.member(), acc.outsider());
    d.ok(&["volume", "create", "rootvol", "--size", "16M"]);
    let root_uri = d.uri("rootvol");

    // A root-owned volume: refused on the control socket and on NBD.
    let err = refused(&d, user, &["volume", "info", "rootvol"]);
    assert!(
        err.contains("permission denied") && err.contains("no access to volume rootvol"),
        "{err}"
    );
    let listed = json_as(&d, user, &["volume", "list"]);
    assert_eq!(
        listed,
        serde_json::json!([]),
        "a user sees only what they may read"
    );
    // Refused at NBD_OPT_GO with NBD_REP_ERR_POLICY (libnbd shows it as
    // "Operation not supported"); the daemon logs who and why.
    let (ok, out) = nbdinfo_as(user, &root_uri);
    assert!(!ok && out.contains("opt_go"), "{out}");
    assert!(
        d.log_shows("refused export 'rootvol' to uid")
            && d.log_shows(&format!("({user}): permission denied")),
        "the daemon logs who was refused:\n{}",
        d.log()
    );

    // Their own volume: everything.
    let created = json_as(&d, user, &["volume", "create", "mine", "--size", "16M"]);
    assert_eq!(created["owner"], user);
    let info = json_as(&d, user, &["volume", "info", "mine"]);
    assert_eq!(info["access"]["owner"], user);
    assert_eq!(info["owner"], user);
    let mine = d.uri("mine");
    let (ok, out) = qemu_io_as(
        user,
        &mine,
        false,
        &["write -P 0x11 0 64k", "read -P 0x11 0 64k"],
    );
    assert!(ok && !out.contains("failed"), "{out}");
    assert!(cli_as(&d, user, &["snapshot", "create", "mine", "s1"]).0);
    assert_eq!(
        json_as(&d, user, &["volume", "list"])[0]["name"],
        "mine",
        "their own volume is listed"
    );
    // NBD_OPT_LIST names only the exports they may open.
    let socket = root_uri.split_once("socket=").unwrap().1;
    let (ok, listed, e) = run(as_user(user, "nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd+unix:///?socket={socket}"),
    ]));
    assert!(ok, "{e}");
    let names: Vec<String> = serde_json::from_str::<Value>(&listed).unwrap()["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["export-name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"mine".to_string()), "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("mine")), "{names:?}");

    // Shared with them for reading: NBD reads (read-only), writes refused.
    d.ok(&[
        "volume",
        "access",
        "rootvol",
        "--grant",
        &format!("user:{user}=read"),
    ]);
    let (ok, out) = nbdinfo_as(user, &root_uri);
    assert!(ok, "{out}");
    assert!(
        out.contains("read_only: true"),
        "a read grant exports read-only: {out}"
    );
    let (ok, out) = qemu_io_as(user, &root_uri, true, &["read -P 0 0 64k"]);
    assert!(ok && !out.contains("failed"), "{out}");
    let (ok, out) = qemu_io_as(user, &root_uri, false, &["write -P 0x22 0 64k"]);
    assert!(
        !ok || out.contains("failed"),
        "a write with a read grant must fail: {out}"
    );
    let (ok, out) = nbdsh_write_as(user, &root_uri);
    assert!(!ok, "nbdsh wrote with a read grant: {out}");
    let info = json_as(&d, user, &["volume", "info", "rootvol"]);
    assert_eq!(info["access"]["acl"][0]["level"], "read");
    let err = refused(&d, user, &["snapshot", "create", "rootvol", "s"]);
    assert!(
        err.contains("only read access") && err.contains("needs write"),
        "{err}"
    );
    d.ok(&["snapshot", "list", "rootvol"]);
    // Nothing they did reached the volume.
    assert!(qemu_io(&root_uri, true, &["read -P 0 0 64k"]).0);

    // Write: NBD writes and snapshots, but not what needs admin.
    d.ok(&[
        "volume",
        "access",
        "rootvol",
        "--grant",
        &format!("user:{user}=write"),
    ]);
    let (ok, out) = qemu_io_as(user, &root_uri, false, &["write -P 0x33 0 64k"]);
    assert!(ok && !out.contains("failed"), "{out}");
    assert!(qemu_io(&root_uri, true, &["read -P 0x33 0 64k"]).0);
    assert!(cli_as(&d, user, &["snapshot", "create", "rootvol", "by-user"]).0);
    let err = refused(&d, user, &["volume", "delete", "rootvol"]);
    assert!(err.contains("needs admin"), "{err}");
    let err = refused(
        &d,
        user,
        &["volume", "access", "rootvol", "--revoke", "user:root"],
    );
    assert!(err.contains("needs admin"), "{err}");

    // Revoked: refused again; a grant to their group works the same way.
    d.ok(&[
        "volume",
        "access",
        "rootvol",
        "--revoke",
        &format!("user:{user}"),
    ]);
    assert!(!nbdinfo_as(user, &root_uri).0);
    d.ok(&[
        "volume",
        "access",
        "rootvol",
        "--grant",
        &format!("group:{}=read", acc.group),
    ]);
    assert!(nbdinfo_as(user, &root_uri).0);
    let shown = d.json(&["volume", "access", "rootvol"]);
    assert_eq!(shown["owner"], "root");
    assert_eq!(shown["acl"][0]["principal"], format!("group:{}", acc.group));

    // Root only: chown, quotas, daemon-wide requests, backing files.
    let err = refused(&d, user, &["volume", "chown", "mine", "root"]);
    assert!(err.contains("only root"), "{err}");
    assert!(!cli_as(&d, user, &["quota", "set", user, "1G"]).0);
    assert!(!cli_as(&d, user, &["device", "list"]).0);
    let err = refused(
        &d,
        user,
        &[
            "volume",
            "create",
            "b",
            "--size",
            "1M",
            "--backing",
            "/etc/passwd",
        ],
    );
    assert!(err.contains("only root"), "{err}");
    // Root gives their volume away; then it is root's alone.
    d.ok(&["volume", "chown", "mine", "root"]);
    assert!(!nbdinfo_as(user, &mine).0);

    // A user outside the daemon's group cannot connect at all.
    let err = refused(&d, outsider, &["volume", "list"]);
    assert!(err.to_lowercase().contains("permission denied"), "{err}");
    assert!(!nbdinfo_as(outsider, &d.uri("rootvol")).0);
}

#[test]
fn quota_gives_enospc_to_the_writer_and_refuses_snapshots() {
    let Some((acc, _t, d)) = setup(
        "quota_gives_enospc_to_the_writer_and_refuses_snapshots",
        'q',
    ) else {
        return;
    };
    let user = acc.member();
    d.ok(&["quota", "set", user, "8M"]);
    json_as(&d, user, &["volume", "create", "q", "--size", "32M"]);
    let uri = d.uri("q");

    // 1 MiB writes until the quota stops one, then 64 KiB (the chunk) ones:
    // afterwards less than a chunk of room is left.
    let mut at = 0u64;
    let mut crossing = None;
    for step in [1u64 << 20, 64 << 10] {
        loop {
            let cmd = format!("write -P 0x5a {at} {step}");
            let (ok, out) = qemu_io_as(user, &uri, false, &[&cmd]);
            if out.contains("failed") || !ok {
                assert!(out.contains("No space left on device"), "{cmd}: {out}");
                crossing.get_or_insert(cmd);
                break;
            }
            at += step;
            assert!(at <= 8 << 20, "wrote {at} bytes past an 8 MiB quota");
        }
    }
    assert!(at >= 6 << 20, "only {at} bytes fit in an 8 MiB quota");
    // Earlier data reads back exactly; reads keep working.
    let (ok, out) = qemu_io_as(user, &uri, true, &[&format!("read -P 0x5a 0 {at}")]);
    assert!(ok && !out.contains("failed"), "{out}");
    let (ok, out) = qemu_io_as(user, &uri, true, &[&format!("read -P 0 {at} 1M")]);
    assert!(ok && !out.contains("failed"), "{out}");

    let usage = json_as(&d, user, &["quota"]);
    assert_eq!(usage[0]["user"], user);
    assert_eq!(usage[0]["limit"], 8 << 20);
    assert_eq!(usage[0]["volumes"], serde_json::json!(["q"]));
    let info = json_as(&d, user, &["volume", "info", "q"]);
    assert_eq!(info["quota"]["limit"], 8 << 20);
    assert!(info["free_bytes"].as_u64().unwrap() < 64 << 10, "{info}");
    assert_eq!(info["snapshot_bytes"], 0);

    let err = refused(&d, user, &["snapshot", "create", "q", "s1"]);
    assert!(err.contains("quota") && err.contains("8388608"), "{err}");

    // More room: the write that failed succeeds, and so does a snapshot.
    d.ok(&["quota", "set", user, "64M"]);
    let (ok, out) = qemu_io_as(user, &uri, false, &[crossing.as_deref().unwrap()]);
    assert!(ok && !out.contains("failed"), "{out}");
    assert!(cli_as(&d, user, &["snapshot", "create", "q", "s1"]).0);
    // Overwrites after the snapshot keep the old data, counted too.
    let (ok, out) = qemu_io_as(user, &uri, false, &["write -P 0x66 0 1M"]);
    assert!(ok && !out.contains("failed"), "{out}");
    let (ok, out) = qemu_io_as(user, &d.uri("q@s1"), true, &["read -P 0x5a 0 1M"]);
    assert!(ok && !out.contains("failed"), "{out}");
    d.ok(&["quota", "set", user, "none"]);
    assert!(d.json(&["quota", user])[0]["limit"].is_null());
}

/// A 1 MiB volume of 64 KiB chunks in one partition, buffered.
fn small_volume() -> snapblk::engine::VolumeConfig {
    snapblk::engine::VolumeConfig {
        size: 1 << 20,
        chunk_size: 64 << 10,
        partitions: 1,
        backing: None,
        cache: snapblk::engine::CacheMode::Writeback,
    }
}

#[test]
fn an_old_manifest_without_an_owner_opens_as_roots() {
    use snapblk::backend::Storage;
    use snapblk::engine::{AccessRecord, AclEntry, Level, Principal, Volume};
    use snapblk::runtime::block_on;
    let t = tempfile::tempdir().unwrap();
    let storage = Storage::Dir(t.path().to_path_buf());
    let config = small_volume();
    let access = AccessRecord {
        owner: 4242,
        acl: vec![AclEntry {
            kind: Principal::Group,
            id: 77,
            level: Level::Write,
        }],
    };
    block_on(async {
        let v = Volume::create("v", storage.clone(), &config).await.unwrap();
        assert_eq!(
            v.access(),
            AccessRecord::default(),
            "a new volume is root's"
        );
        v.set_access(access.clone()).await.unwrap();
        v.shutdown().await.unwrap();
        drop(v);
        let v = Volume::open("v", storage.clone()).await.unwrap();
        assert_eq!(v.access(), access, "the owner and list survive a reopen");
        v.shutdown().await.unwrap();
    });
    // A manifest from before owners existed: no `access` member at all.
    let path = t.path().join("volume.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(m.as_object_mut().unwrap().remove("access").is_some());
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    block_on(async {
        let v = Volume::open("v", storage).await.unwrap();
        assert_eq!(
            v.access(),
            AccessRecord::default(),
            "owned by root, no list"
        );
        v.shutdown().await.unwrap();
    });
}

/// The engine asks a volume's budget before a write does anything: a
/// refused write is ENOSPC and changes nothing; a trim is always admitted;
/// under a snapshot a write costs a chunk per chunk on top.
#[test]
fn the_engine_asks_the_budget_before_writing() {
    use snapblk::backend::Storage;
    use snapblk::engine::{SpaceBudget, Volume};
    use snapblk::runtime::block_on;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Admits up to `left` bytes, counting what it admitted.
    struct Left(AtomicU64);
    impl SpaceBudget for Left {
        fn admit(&self, bytes: u64) -> Result<(), String> {
            self.0
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                    l.checked_sub(bytes)
                })
                .map(|_| ())
                .map_err(|l| format!("only {l} left"))
        }
        fn unlimited(&self) -> bool {
            false
        }
    }

    let t = tempfile::tempdir().unwrap();
    let config = small_volume();
    block_on(async {
        let v = Volume::create("v", Storage::Dir(t.path().to_path_buf()), &config)
            .await
            .unwrap();
        let budget = Arc::new(Left(AtomicU64::new(100 << 10)));
        v.set_budget(Some(budget.clone()));
        let live = v.live();
        live.write(0, &[1u8; 64 << 10], false).await.unwrap();
        let e = live
            .write(64 << 10, &[2u8; 64 << 10], false)
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
        assert!(e.to_string().contains("only 36864 left"), "{e}");
        let mut back = vec![0u8; 128 << 10];
        live.read(0, &mut back).await.unwrap();
        assert!(back[..64 << 10].iter().all(|&b| b == 1));
        assert!(
            back[64 << 10..].iter().all(|&b| b == 0),
            "a refused write wrote"
        );
        live.discard(0, 64 << 10).await.unwrap();
        // With a snapshot, 4 KiB costs 4 KiB plus the chunk it may preserve.
        v.create_snapshot("s").await.unwrap();
        budget.0.store(64 << 10, Ordering::Release);
        assert!(live.write(0, &[3u8; 4096], false).await.is_err());
        budget.0.store(68 << 10, Ordering::Release);
        live.write(0, &[3u8; 4096], false).await.unwrap();
        v.shutdown().await.unwrap();
    });
}

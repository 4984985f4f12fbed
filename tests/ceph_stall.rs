//! A Ceph cluster that stops answering fails requests instead of hanging
//! them: the daemon bounds every wait on the cluster with librados' client
//! timeouts, its own where ceph.conf sets none (without them librados waits
//! forever, and with it the NBD client, the volume and the daemon's stop).
//!
//! Its own test binary, so its own one-node cluster: the OSD is stopped
//! (SIGSTOP) here, which would stall every other Ceph test sharing it.
#![cfg(feature = "ceph")]

mod common;

use common::ceph::cluster;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Held by each test that stops the cluster's one OSD: the tests share it.
static OSD: Mutex<()> = Mutex::new(());

/// Runs `f` with the cluster's OSD stopped (SIGSTOP), continuing it after.
fn with_osd_stopped<T>(conf: &Path, f: impl FnOnce() -> T) -> T {
    let pid_file = conf.parent().unwrap().join("run/osd.0.pid");
    let osd = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    run_ok(Command::new("kill").args(["-STOP", &osd]));
    let out = f();
    run_ok(Command::new("kill").args(["-CONT", &osd]));
    out
}

/// A copy of the cluster's conf in `dir`, its client timeouts replaced by
/// `timeouts` lines.
fn conf_with(conf: &Path, dir: &Path, name: &str, timeouts: &str) -> String {
    let text: String = std::fs::read_to_string(conf)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("timeout"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = dir.join(name);
    std::fs::write(
        &path,
        text.replace("[client]\n", &format!("[client]\n{timeouts}")),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// qemu-io's output and whether it succeeded (read-only on a `VOL@SNAP`
/// export); a run that is still going
/// after five minutes is killed and fails the test as a hang.
fn qemu_io_bounded(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    if uri.contains('@') {
        c.arg("-r");
    }
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let mut child = c
        .arg(uri)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("qemu-io {cmds:?} hung on a volume whose OSD stopped answering");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (qemu_io_clean(out.status.success(), &text), text)
}

/// Creates Ceph volume `name` (image `stall-NAME`) with `conf`; the daemon
/// must log these op timeouts for it (read back from librados).
fn create_expecting(d: &Daemon, name: &str, conf: &str, osd: &str, mon: &str) {
    let image = format!("rbd/stall-{name}");
    d.ok(&[
        "volume",
        "create",
        name,
        "--size",
        "16M",
        "--ceph",
        &image,
        "--ceph-conf",
        conf,
    ]);
    let expected = format!(
        "Ceph volume {image}: rados_osd_op_timeout {osd}, rados_mon_op_timeout {mon}, \
         client_mount_timeout 30 s"
    );
    assert!(
        d.log().contains(&expected),
        "no {expected:?} in {}",
        d.log()
    );
}

#[test]
fn a_stopped_osd_fails_requests_and_the_volume_serves_again_after() {
    let Some(conf) = cluster("a_stopped_osd_fails_requests_and_the_volume_serves_again_after")
    else {
        return;
    };
    let _osd = OSD.lock().unwrap_or_else(|e| e.into_inner());
    let (_t, dir) = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    let d = Daemon::start(&dir.join("d"));
    // A conf without client timeouts gets the daemon's own.
    let bare = conf_with(conf, &dir, "bare.conf", "");
    create_expecting(&d, "bare", &bare, "60 s", "60 s");
    // One that sets them keeps its own: short here, so the test is quick.
    let short = conf_with(
        conf,
        &dir,
        "short.conf",
        "rados osd op timeout = 3\nrados mon op timeout = 3\n",
    );
    create_expecting(&d, "v", &short, "3 s", "3 s");
    let uri = d.uri("v");
    let (ok, text) = qemu_io_bounded(&uri, &["write -P 0x11 0 64k", "flush"]);
    assert!(ok, "{text}");

    let (ok, text) = with_osd_stopped(conf, || {
        qemu_io_bounded(&uri, &["write -P 0x22 0 64k", "flush"])
    });
    assert!(
        !ok && text.contains("Input/output error"),
        "a write to a stopped OSD must fail: {text}"
    );

    // The cluster back, the same volume takes writes and reads them back.
    let (ok, text) = qemu_io_bounded(
        &uri,
        &["write -P 0x33 0 64k", "flush", "read -P 0x33 0 64k"],
    );
    assert!(ok, "{text}");
    assert_eq!(d.json(&["volume", "info", "v"])["state"], "ok");

    // With a snapshot, a first overwrite needs a journal record: a stall
    // there fails the volume's journal, and writes that need one are
    // refused (not half done) until the volume is reopened (its lock
    // given up and taken again). The snapshot stays exact.
    d.ok(&["snapshot", "create", "v", "s1"]);
    let stalled = with_osd_stopped(conf, || {
        qemu_io_bounded(&uri, &["write -P 0x44 1M 64k", "flush"])
    });
    assert!(
        !stalled.0,
        "a write to a stopped OSD must fail: {}",
        stalled.1
    );
    let (ok, text) = qemu_io_bounded(&uri, &["write -P 0x55 2M 64k", "flush"]);
    assert!(
        !ok,
        "a write that needs a record must fail until the volume is reopened: {text}"
    );
    let err = d.fails(&["snapshot", "create", "v", "s2"]);
    assert!(
        err.contains("metadata journal write failed")
            && err.contains("run `snapblk volume reopen NAME`"),
        "{err}"
    );
    assert_eq!(d.ok(&["volume", "reopen", "v"]), "reopened volume v\n");
    let (ok, text) = qemu_io_bounded(
        &uri,
        &["write -P 0x55 2M 64k", "flush", "read -P 0x55 2M 64k"],
    );
    assert!(ok, "{text}");
    let (ok, text) = qemu_io_bounded(&d.uri("v@s1"), &["read -P 0x33 0 64k", "read -P 0 1M 2M"]);
    assert!(ok, "snapshot s1 after the stall and the reopen: {text}");
}

/// A daemon stopped while its cluster does not answer stops anyway, and
/// its other volumes do not wait for the stalled ones: volumes close side
/// by side, and a Ceph volume whose last flush timed out is not waited on
/// again (releasing its lock and closing its images would each wait out the
/// op timeout once more, volume after volume, past systemd's stop timeout).
/// Its lock stays, so the next start asks for `--break-lock`, which brings
/// back every write flushed before the stall.
#[test]
fn a_daemon_stops_promptly_while_its_cluster_does_not_answer() {
    let Some(conf) = cluster("a_daemon_stops_promptly_while_its_cluster_does_not_answer") else {
        return;
    };
    let _osd = OSD.lock().unwrap_or_else(|e| e.into_inner());
    let (_t, dir) = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    let mut d = Daemon::start(&dir.join("d"));
    let short = conf_with(
        conf,
        &dir,
        "short.conf",
        "rados osd op timeout = 3\nrados mon op timeout = 3\n",
    );
    // Named so that one after another, the local volume would close last.
    for name in ["a-ceph", "b-ceph"] {
        create_expecting(&d, name, &short, "3 s", "3 s");
    }
    d.ok(&["volume", "create", "z-local", "--size", "16M"]);
    for name in ["a-ceph", "b-ceph", "z-local"] {
        let (ok, text) = qemu_io_bounded(&d.uri(name), &["write -P 0x66 0 64k", "flush"]);
        assert!(ok, "{name}: {text}");
        d.ok(&["snapshot", "create", name, "s1"]);
    }

    let status = with_osd_stopped(conf, || {
        // A first overwrite after the snapshot is held in the daemon and
        // acknowledged; its copy-on-write commit waits on the OSD, and so
        // does each Ceph volume's final flush. No flush from the client:
        // qemu-io would send one at exit.
        let uris: Vec<String> = ["a-ceph", "b-ceph"].iter().map(|v| d.uri(v)).collect();
        py_ok(
            "import nbd, sys\n\
             for uri in sys.argv[1:]:\n\
             \x20   h = nbd.NBD(); h.connect_uri(uri)\n\
             \x20   h.pwrite(b'\\x77' * 65536, 0); h.shutdown()\n\
             print('PASS')\n",
            &uris,
        );
        d.signal(libc::SIGTERM)
    });
    assert!(
        !status.success(),
        "unflushed Ceph volumes must fail the stop"
    );
    let log = d.log();
    let local = log
        .find("volume z-local flushed and closed")
        .unwrap_or_else(|| panic!("the local volume was not flushed: {log}"));
    for name in ["a-ceph", "b-ceph"] {
        let stalled = log
            .find(&format!("volume {name}: shutdown failed"))
            .unwrap_or_else(|| panic!("{name}'s final flush did not fail: {log}"));
        assert!(
            local < stalled,
            "the local volume waited for {name} to close: {log}"
        );
        assert!(
            log.contains(&format!(
                "volume {name}: its RBD image stays locked by this daemon"
            )),
            "{log}"
        );
    }
    assert!(!log.contains("could not release the lock"), "{log}");

    d.restart();
    d.wait_ready();
    let state = d.json(&["volume", "info", "a-ceph"])["state"].to_string();
    assert!(
        state.contains("--break-lock") && state.contains("volume detach a-ceph"),
        "{state}"
    );
    // Listed with where it lives, though it could not open.
    let table = d.ok(&["volume", "list"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("a-ceph ") && l.contains("ceph rbd/stall-a-ceph")),
        "{table}"
    );
    // Reopening retries the open, which still finds the lock.
    let err = d.fails(&["volume", "reopen", "a-ceph"]);
    assert!(err.contains("is locked by"), "{err}");
    d.ok(&["volume", "detach", "a-ceph"]);
    d.ok(&[
        "volume",
        "attach",
        "a-ceph",
        "--ceph",
        "rbd/stall-a-ceph",
        "--ceph-conf",
        &short,
        "--break-lock",
    ]);
    for name in ["a-ceph", "z-local"] {
        let (ok, text) = qemu_io_bounded(&d.uri(&format!("{name}@s1")), &["read -P 0x66 0 64k"]);
        assert!(ok, "{name}@s1 after the stop: {text}");
    }

    // A start while the OSD does not answer lists a-ceph with the error;
    // once it answers, a reopen serves it without a restart.
    d.ok(&["volume", "detach", "b-ceph"]);
    assert!(d.signal(libc::SIGTERM).success(), "{}", d.log());
    with_osd_stopped(conf, || {
        d.restart();
        d.wait_ready();
        let state = d.json(&["volume", "info", "a-ceph"])["state"].to_string();
        assert!(state.starts_with("\"error: "), "{state}");
    });
    assert_eq!(
        d.ok(&["volume", "reopen", "a-ceph"]),
        "reopened volume a-ceph\n"
    );
    let (ok, text) = qemu_io_bounded(&d.uri("a-ceph@s1"), &["read -P 0x66 0 64k"]);
    assert!(ok, "a-ceph@s1 after the reopen: {text}");
}

/// A store made with its own exclusive lock (as every store was before)
/// loses it when its volume opens: see
/// [`a_cluster_gone_for_good_fails_io_and_the_daemon_still_stops`] for why.
#[test]
fn a_store_with_its_own_lock_loses_it_when_opened() {
    let Some(conf) = cluster("a_store_with_its_own_lock_loses_it_when_opened") else {
        return;
    };
    let (_t, dir) = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    let d = Daemon::start(&dir.join("d"));
    d.ok(&[
        "volume",
        "create",
        "f",
        "--size",
        "16M",
        "--ceph",
        "rbd/stall-f",
        "--ceph-conf",
        conf.to_str().unwrap(),
    ]);
    let (ok, text) = qemu_io_bounded(&d.uri("f"), &["write -P 0x11 0 1M", "flush"]);
    assert!(ok, "{text}");
    d.ok(&["snapshot", "create", "f", "s1"]);
    d.ok(&["volume", "detach", "f"]);
    let store = "rbd/stall-f.snapblk.part-000.store";
    let rbd = |args: &[&str]| run_ok(Command::new("rbd").arg("-c").arg(conf).args(args));
    assert!(!rbd(&["info", store]).contains("exclusive-lock"));
    rbd(&["feature", "enable", store, "exclusive-lock"]);
    assert!(rbd(&["info", store]).contains("exclusive-lock"));
    d.ok(&[
        "volume",
        "attach",
        "f",
        "--ceph",
        "rbd/stall-f",
        "--ceph-conf",
        conf.to_str().unwrap(),
    ]);
    let info = rbd(&["info", store]);
    assert!(!info.contains("exclusive-lock"), "{info}");
    let (ok, text) = qemu_io_bounded(
        &d.uri("f"),
        &["write -P 0x22 0 64k", "flush", "read -P 0x22 0 64k"],
    );
    assert!(ok, "{text}");
    let (ok, text) = qemu_io_bounded(&d.uri("f@s1"), &["read -P 0x11 0 1M"]);
    assert!(ok, "{text}");
}

/// Stops its own cluster when dropped.
struct OwnCluster(std::path::PathBuf);

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new(common::ceph::script())
            .arg("stop")
            .arg(&self.0)
            .status();
    }
}

/// A cluster gone long enough for the client to lose its watches on the
/// images (here: every daemon of it killed). librbd delayed every store
/// read, write and flush until it could take the store image's own
/// exclusive lock again, which needs the watch back, past every op
/// timeout: the volume's stop, and with it the daemon's, waited forever.
/// Stores carry no lock of their own now; requests fail and the daemon
/// stops. Its own cluster: this one does not come back.
#[test]
fn a_cluster_gone_for_good_fails_io_and_the_daemon_still_stops() {
    if cluster("a_cluster_gone_for_good_fails_io_and_the_daemon_still_stops").is_none() {
        return;
    }
    let (_t, dir) = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    let own = OwnCluster(dir.join("cluster"));
    run_ok(
        Command::new(common::ceph::script())
            .arg("start")
            .arg(&own.0),
    );
    let short = conf_with(
        &own.0.join("ceph.conf"),
        &dir,
        "short.conf",
        "rados osd op timeout = 3\nrados mon op timeout = 3\n",
    );
    let mut d = Daemon::start(&dir.join("d"));
    for name in ["g", "h"] {
        create_expecting(&d, name, &short, "3 s", "3 s");
        let (ok, text) = qemu_io_bounded(&d.uri(name), &["write -P 0x11 0 1M", "flush"]);
        assert!(ok, "{text}");
        d.ok(&["snapshot", "create", name, "s1"]);
    }
    // An image open for each snapshot: with the cluster gone, closing them
    // one after another takes longer than the op timeout bounds.
    for i in 2..=20 {
        d.ok(&["snapshot", "create", "g", &format!("s{i}")]);
    }
    drop(own);
    // Long enough for the watches to time out (3 s op timeouts).
    std::thread::sleep(Duration::from_secs(15));
    let (ok, text) = qemu_io_bounded(&d.uri("h"), &["write -P 0x22 0 64k", "flush"]);
    assert!(
        !ok,
        "a copy-on-write write with the cluster gone must fail: {text}"
    );
    // Volume g has nothing failed yet: its stop flushes its stores.
    let status = d.signal(libc::SIGTERM);
    assert!(!status.success());
    let log = d.log();
    // g's flush found nothing to write; librbd may count its lock as lost
    // with the watch and release it without a word to the cluster.
    assert!(
        log.contains("volume g flushed and closed") || log.contains("volume g: shutdown failed"),
        "{log}"
    );
    // Where g's release went through at once, its 21 images were closed
    // within the op timeout's bound, the rest left open.
    if log.contains("volume g flushed and closed")
        && !log.contains("volume g: could not release the lock")
    {
        assert!(
            log.contains(
                "Ceph volume rbd/stall-g: closing its images did not finish within the op timeout"
            ),
            "{log}"
        );
    }
    assert!(log.contains("volume h: shutdown failed"), "{log}");
    assert!(
        log.contains("volume h: its RBD image stays locked by this daemon"),
        "{log}"
    );
}

//! A throwaway one-node Ceph cluster (`scripts/ceph-cluster`), started
//! once per test binary on first use and stopped when it exits.

use super::run_ok;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

static DIR: OnceLock<PathBuf> = OnceLock::new();
static CONF: OnceLock<Option<PathBuf>> = OnceLock::new();

extern "C" fn stop_cluster() {
    if let Some(dir) = DIR.get() {
        let _ = Command::new(script()).arg("stop").arg(dir).status();
    }
}

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster")
}

/// The cluster's ceph.conf; `None` (and a loud SKIP) without the Ceph
/// binaries, which `scripts/test` installs so that CI never skips.
pub fn cluster(test: &str) -> Option<&'static Path> {
    let conf = CONF.get_or_init(|| {
        if !have_bin("ceph-mon") || !have_bin("ceph-osd") {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("snapblk-ceph-{}", std::process::id()));
        DIR.set(dir.clone()).unwrap();
        // SAFETY: registers a plain function to run at exit.
        unsafe { libc::atexit(stop_cluster) };
        run_ok(Command::new(script()).arg("start").arg(&dir));
        Some(dir.join("ceph.conf"))
    });
    if conf.is_none() {
        super::skip(
            test,
            "the Ceph binaries (ceph-mon, ceph-osd) are not installed; scripts/test installs them",
        );
    }
    conf.as_deref()
}

fn have_bin(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

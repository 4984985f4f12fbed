//! The README's first command, `scripts/serve`, on a machine that lacks
//! what building snapblk needs: it installs the missing Debian packages
//! first (bindgen needs libclang: without it the build stops at libublk's
//! sys crate), then runs the build and the daemon, with the caller's
//! arguments. `apt-get`, `dpkg-query` and `cargo` are stand-ins on PATH
//! that record their calls: the script's own logic is what is checked
//! here, since this machine has every package and no test may remove one.
//! `scripts/test` installs through the same function (`.ci/run` is it).

mod common;

use common::tempdir;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// Writes an executable stand-in `name` into `dir`.
fn stand_in(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs `scripts/serve ARGS` with `installed` as the only packages present;
/// returns the recorded calls, one per line.
fn serve_with(installed: &[&str], args: &[&str]) -> Vec<String> {
    let (tmp, _) = tempdir();
    let dir = tmp.path();
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let calls = dir.join("calls");
    let record = format!("echo \"$(basename \"$0\") $*\" >> {}", calls.display());
    let installed = installed.join(" ");
    stand_in(
        &bin,
        "dpkg-query",
        &format!(
            "{record}\nfor p in {installed}; do [ \"${{@: -1}}\" = \"$p\" ] && \
             {{ echo 'install ok installed'; exit 0; }}; done\nexit 1"
        ),
    );
    stand_in(&bin, "apt-get", &record);
    stand_in(&bin, "sudo", &format!("{record}\n\"$@\""));
    stand_in(&bin, "cargo", &record);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/serve");
    let out = Command::new(&script)
        .args(args)
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/serve failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("dpkg-query") && !l.starts_with("sudo"))
        .map(str::to_string)
        .collect()
}

#[test]
fn serve_installs_the_missing_build_packages_then_builds_and_serves() {
    let calls = serve_with(&["gcc", "libc6-dev"], &["--nbd-listen", "127.0.0.1:10809"]);
    assert_eq!(
        calls,
        [
            "apt-get update -qq",
            "apt-get install -y -qq --no-install-recommends libclang-dev",
            "cargo run --release --quiet -- serve --nbd-listen 127.0.0.1:10809",
        ],
        "scripts/serve must install libclang-dev (bindgen) before it builds"
    );
}

#[test]
fn serve_installs_nothing_when_every_build_package_is_there() {
    let calls = serve_with(&["libclang-dev", "gcc", "libc6-dev"], &[]);
    assert_eq!(calls, ["cargo run --release --quiet -- serve"]);
}

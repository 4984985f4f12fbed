//! Files that hold secrets (the replication key): like ssh with a private
//! key, the daemon refuses one that anyone but its owner may read, so a key
//! left world-readable by a careless `echo ... > FILE` is noticed at once
//! instead of leaking to every local user.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `Ok` if `path` is owned by this process's user (or root) and not
/// accessible by group or others; otherwise a message that says how to fix
/// it. `what` names the file for that message ("the replication key file").
pub fn check_private_file_mode(path: &Path, what: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| {
        format!(
            "cannot read {what} {}: {}",
            path.display(),
            crate::cli::strip_os_error(&e.to_string())
        )
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {} is accessible by group or others (mode {mode:04o}); a secret must be \
             readable by its owner only: run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    // SAFETY: geteuid has no failure mode.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(format!(
            "{what} {} is owned by uid {}, not by this daemon's user (uid {euid}) or root; \
             another user could change it: `chown` it to the daemon's user",
            path.display(),
            meta.uid()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_owner_only_modes_pass() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("k");
        std::fs::write(&p, "secret").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o644, false),
            (0o640, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = check_private_file_mode(&p, "the key file");
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.contains("chmod 600"), "{e}");
            }
        }
        let e = check_private_file_mode(&t.path().join("missing"), "the key file").unwrap_err();
        assert!(e.contains("cannot read the key file"), "{e}");
    }
}

//! Who may reach the daemon, and which files must stay secret.
//!
//! Shared by every door into the daemon, so that each applies the same rule:
//! - [`LocalPeers`]: the rule for UNIX sockets (the control socket and NBD's
//!   UNIX sockets). The kernel tells us the connecting process's uid
//!   (`SO_PEERCRED`); only root and the owner of the data directory are let
//!   in. Socket file modes are a second fence, not the rule: a socket
//!   directory that others can traverse, or a socket passed on to another
//!   process, must not open the volumes to everyone.
//! - [`check_private_file_mode`]: a private key (NBD TLS, replication) that
//!   group or others can read is refused before it is used, as ssh refuses
//!   an unprotected identity file. A key others may have read is a key
//!   others may hold.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Uid, gid, pid of the process at the other end of a UNIX socket.
pub fn peer_credentials(fd: RawFd) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// The rule for local (UNIX socket) peers: root and the data directory's
/// owner may connect, nobody else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPeers {
    pub owner_uid: u32,
}

impl LocalPeers {
    /// The rule for a daemon whose data directory is `data_dir`.
    pub fn of_data_dir(data_dir: &Path) -> io::Result<LocalPeers> {
        Ok(LocalPeers {
            owner_uid: std::fs::metadata(data_dir)?.uid(),
        })
    }

    pub fn admits_uid(&self, uid: u32) -> bool {
        uid == 0 || uid == self.owner_uid
    }

    /// Checks the peer of the connected UNIX socket `fd`. `Err` says, for
    /// the peer and for the log, why it is refused; `door` names the socket
    /// ("control socket", "NBD socket").
    pub fn check(&self, fd: RawFd, door: &str) -> Result<libc::ucred, String> {
        match peer_credentials(fd) {
            Ok(c) if self.admits_uid(c.uid) => Ok(c),
            Ok(c) => Err(format!(
                "permission denied: uid {} may not use the {door} (only root and uid {}, \
                 the owner of the data directory, may)",
                c.uid, self.owner_uid
            )),
            Err(e) => Err(format!(
                "permission denied: cannot read the peer's credentials on the {door}: {e}"
            )),
        }
    }
}

/// Refuses a secret file (a TLS private key, the replication key) that
/// group or others could read or write, that another user owns (they could
/// rewrite it), or that is not a regular file. Follows symlinks, as opening
/// it will. `what` names the file ("the TLS private key"); the error says
/// what is wrong and how to fix it.
pub fn check_private_file_mode(path: &Path, what: &str) -> io::Result<()> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot read {what} {shown}: {}; check the path",
                crate::cli::strip_os_error(&e.to_string())
            ),
        )
    })?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {shown} is not a regular file; give the key file itself"),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "permissions {mode:04o} for {what} {shown} are too open: it must not be \
                 accessible by group or others; run `chmod 600 {shown}`"
            ),
        ));
    }
    // SAFETY: geteuid has no failure mode.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{what} {shown} is owned by uid {}, not by this daemon's user (uid {euid}) \
                 or root, so another user could change it: `chown` it to the daemon's user",
                meta.uid()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_file_modes() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, b"secret").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false)] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = check_private_file_mode(&key, "the key");
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                let msg = e.to_string();
                assert!(
                    msg.contains("too open") && msg.contains("chmod 600"),
                    "{msg}"
                );
            }
        }
        assert!(check_private_file_mode(dir.path(), "the key").is_err());
        let e = check_private_file_mode(&dir.path().join("missing"), "the key").unwrap_err();
        assert!(e.to_string().contains("cannot read the key"), "{e}");
    }

    #[test]
    fn local_peers_rule() {
        let rule = LocalPeers { owner_uid: 1000 };
        assert!(rule.admits_uid(0));
        assert!(rule.admits_uid(1000));
        assert!(!rule.admits_uid(65534));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        let me = unsafe { libc::getuid() };
        let mine = LocalPeers { owner_uid: me };
        assert_eq!(mine.check(a.as_raw_fd(), "test socket").unwrap().uid, me);
        if me != 0 {
            let other = LocalPeers { owner_uid: me + 1 };
            let msg = other.check(a.as_raw_fd(), "test socket").unwrap_err();
            assert!(msg.contains("may not use the test socket"), "{msg}");
        }
    }
}

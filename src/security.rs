//! Who may reach the daemon, and which files must stay secret.
//!
//! Shared by every door into the daemon, so that each applies the same rule:
//! - [`LocalPeers`]: the rule for UNIX sockets (the control socket and NBD's
//!   UNIX sockets). The kernel tells us the connecting process's uid
//!   (`SO_PEERCRED`); root, the owner of the data directory and the members
//!   of its group (the daemon's group) are let in, each as a [`Caller`]
//!   whose groups come from the uid's group list. Only root and the owner
//!   are superusers; what the others may do with each volume is its
//!   access list's to say (`crate::volumes::access`). Socket file modes are
//!   a second fence, not the rule: a socket directory that others can
//!   traverse, or a socket passed on to another process, must not open the
//!   volumes to everyone.
//! - User and group names: looked up through the system's databases
//!   (NSS) by name, uid or gid, for access lists and quotas.
//! - [`check_private_file_mode`]: a private key (NBD TLS, replication) that
//!   group or others can read is refused before it is used, as ssh refuses
//!   an unprotected identity file. A key others may have read is a key
//!   others may hold.

use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
use std::ffi::CString;
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

/// Who sent a request, as far as access lists care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// Its primary group and the groups of the uid's group list.
    pub gids: Vec<u32>,
    /// Root, the data directory's owner, or a TLS peer with a certificate
    /// the CA signed: may do everything.
    pub superuser: bool,
}

impl Caller {
    /// A caller trusted with everything (root, a TLS peer, the daemon itself).
    pub fn superuser() -> Caller {
        Caller {
            uid: 0,
            gids: vec![0],
            superuser: true,
        }
    }

    /// "uid 1001 (alice)", for errors and the log.
    pub fn describe(&self) -> String {
        format!("uid {} ({})", self.uid, user_name(self.uid))
    }
}

/// The rule for local (UNIX socket) peers: root, the data directory's owner
/// and the members of its group may connect, nobody else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPeers {
    pub owner_uid: u32,
    /// The data directory's group: the daemon's group.
    pub group_gid: u32,
}

impl LocalPeers {
    /// The rule for a daemon whose data directory is `data_dir`.
    pub fn of_data_dir(data_dir: &Path) -> io::Result<LocalPeers> {
        let meta = std::fs::metadata(data_dir)?;
        Ok(LocalPeers {
            owner_uid: meta.uid(),
            group_gid: meta.gid(),
        })
    }

    /// The caller with credentials `cred`, if it may connect.
    pub fn admit(&self, cred: &libc::ucred) -> Option<Caller> {
        let superuser = cred.uid == 0 || cred.uid == self.owner_uid;
        let gids = groups_of(cred.uid, cred.gid);
        (superuser || gids.contains(&self.group_gid)).then_some(Caller {
            uid: cred.uid,
            gids,
            superuser,
        })
    }

    /// Puts the socket file at `path` in the daemon's group, so that its
    /// members can connect through mode 0660 (a daemon that may not, e.g.
    /// not root and not in that group, logs why and serves on).
    pub fn give_socket_to_group(&self, path: &Path) {
        if let Err(e) = std::os::unix::fs::chown(path, None, Some(self.group_gid)) {
            log::warn!(
                "cannot give {} to group {}: {e}; only root and the data directory's owner \
                 can connect to it",
                path.display(),
                group_name(self.group_gid)
            );
        }
    }

    /// Checks the peer of the connected UNIX socket `fd`. `Err` says, for
    /// the peer and for the log, why it is refused; `door` names the socket
    /// ("control socket", "NBD socket").
    pub fn check(&self, fd: RawFd, door: &str) -> Result<Caller, String> {
        match peer_credentials(fd) {
            Ok(c) => self.admit(&c).ok_or_else(|| {
                format!(
                    "permission denied: uid {} ({}) may not use the {door} (only root, uid {} \
                     (the owner of the data directory) and members of its group {} may; \
                     ask an administrator to add you to that group)",
                    c.uid,
                    user_name(c.uid),
                    self.owner_uid,
                    group_name(self.group_gid)
                )
            }),
            Err(e) => Err(format!(
                "permission denied: cannot read the peer's credentials on the {door}: {e}"
            )),
        }
    }
}

// User and group lookups go through nix's wrappers of the reentrant NSS
// calls (getpwnam_r and friends, getgrouplist): a failed lookup and an
// unknown name both read as "none", and callers fall back to numbers.

/// The uid of user `name` (or a number given as such).
pub fn user_by_name(name: &str) -> Option<u32> {
    match User::from_name(name) {
        Ok(Some(user)) => Some(user.uid.as_raw()),
        _ => name.parse().ok(),
    }
}

/// The gid of group `name` (or a number given as such).
pub fn group_by_name(name: &str) -> Option<u32> {
    match Group::from_name(name) {
        Ok(Some(group)) => Some(group.gid.as_raw()),
        _ => name.parse().ok(),
    }
}

/// User `uid`'s name, or the number when it has none.
pub fn user_name(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => uid.to_string(),
    }
}

/// Group `gid`'s name, or the number when it has none.
pub fn group_name(gid: u32) -> String {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(Some(group)) => group.name,
        _ => gid.to_string(),
    }
}

/// `gid` and the groups of user `uid`'s group list (just `gid` for a uid
/// without a name).
pub fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let mut gids = vec![gid];
    if let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) {
        if let Ok(name) = CString::new(user.name) {
            if let Ok(list) = getgrouplist(&name, Gid::from_raw(gid)) {
                gids.extend(list.iter().map(|g| g.as_raw()));
            }
        }
    }
    gids.sort_unstable();
    gids.dedup();
    gids
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
        let rule = LocalPeers {
            owner_uid: 1000,
            group_gid: 4242,
        };
        let cred = |uid, gid| libc::ucred { pid: 1, uid, gid };
        assert!(rule.admit(&cred(0, 0)).unwrap().superuser);
        assert!(rule.admit(&cred(1000, 1000)).unwrap().superuser);
        assert!(rule.admit(&cred(65534, 65534)).is_none());
        // A member of the daemon's group (here by its primary gid) gets in,
        // but is no superuser.
        let member = rule.admit(&cred(65534, 4242)).unwrap();
        assert!(!member.superuser && member.gids.contains(&4242));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        let me = unsafe { libc::getuid() };
        let mine = LocalPeers {
            owner_uid: me,
            group_gid: u32::MAX - 1,
        };
        assert_eq!(mine.check(a.as_raw_fd(), "test socket").unwrap().uid, me);
        if me != 0 {
            let other = LocalPeers {
                owner_uid: me + 1,
                group_gid: u32::MAX - 1,
            };
            let msg = other.check(a.as_raw_fd(), "test socket").unwrap_err();
            assert!(msg.contains("may not use the test socket"), "{msg}");
        }
    }

    #[test]
    fn names_resolve_both_ways() {
        assert_eq!(user_by_name("root"), Some(0));
        assert_eq!(user_name(0), "root");
        assert_eq!(group_by_name("root"), Some(0));
        assert_eq!(group_name(0), "root");
        assert_eq!(user_by_name("1234"), Some(1234));
        assert_eq!(user_by_name("no-such-user-here"), None);
        assert_eq!(user_name(4_000_000_000), "4000000000");
        assert!(groups_of(0, 0).contains(&0));
    }
}

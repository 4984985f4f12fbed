//! Owners and access lists (issue 13 part 4, seed 002: "the users permitted
//! to access it with a permission"): what level a caller has on a volume,
//! the grant and revoke edits, and how a list is shown.
//!
//! A volume's [`AccessRecord`] (owner uid, entries of a user or group and a
//! level) lives in its manifest, so it is as durable as the volume and
//! travels with a Ceph volume. Names are resolved to ids when a grant is
//! made and back to names when shown; a user or group deleted later shows
//! as its number.
//!
//! The rule: a superuser (root, the data directory's owner, a TLS peer) and
//! the owner have `admin`; anyone else has the highest level of the entries
//! naming their uid or one of their groups, or nothing.
//!
//! Must never: decide which request needs which level (that is the control
//! protocol's, `control::access`), or look at the caller's socket.

use super::error::{ErrorKind, VolumeError};
use crate::engine::{AccessRecord, AclEntry, Level, Principal};
use crate::security::{group_by_name, group_name, user_by_name, user_name, Caller};
use serde_json::{json, Value};

/// The level `caller` has on a volume with `access` (None: no access).
pub fn level_of(access: &AccessRecord, caller: &Caller) -> Option<Level> {
    if caller.superuser || caller.uid == access.owner {
        return Some(Level::Admin);
    }
    access
        .acl
        .iter()
        .filter(|e| match e.kind {
            Principal::User => e.id == caller.uid,
            Principal::Group => caller.gids.contains(&e.id),
        })
        .map(|e| e.level)
        .max()
}

/// `Ok` if `caller` has at least `need` on `volume`; else a
/// `permission_denied` error naming both levels and how to get access.
pub fn require(
    access: &AccessRecord,
    caller: &Caller,
    volume: &str,
    need: Level,
    what: &str,
) -> Result<(), VolumeError> {
    let has = level_of(access, caller);
    if has >= Some(need) {
        return Ok(());
    }
    let who = caller.describe();
    let has = match has {
        Some(l) => format!("only {} access to", l.as_str()),
        None => "no access to".to_string(),
    };
    Err(VolumeError::new(
        ErrorKind::PermissionDenied,
        format!(
            "permission denied: {who} has {has} volume {volume}; {what} needs {} access: ask \
             its owner ({}) or root to run `snapblk volume access {volume} --grant user:{}={}`",
            need.as_str(),
            user_name(access.owner),
            user_name(caller.uid),
            need.as_str()
        ),
    ))
}

/// Parses `user:NAME` or `group:NAME` (names or numbers) to its id.
pub fn parse_principal(text: &str) -> Result<(Principal, u32), VolumeError> {
    let bad = || {
        VolumeError::invalid(format!(
            "{text:?} names no user or group: write user:NAME or group:NAME"
        ))
    };
    let (kind, name) = text.split_once(':').ok_or_else(bad)?;
    let (kind, id) = match kind {
        "user" => (Principal::User, user_by_name(name)),
        "group" => (Principal::Group, group_by_name(name)),
        _ => return Err(bad()),
    };
    let id = id.ok_or_else(|| {
        VolumeError::not_found(format!(
            "no {kind:?} named {name:?} on the daemon's machine; check the name (`getent {}`)",
            if kind == Principal::User {
                "passwd"
            } else {
                "group"
            }
        ))
    })?;
    Ok((kind, id))
}

/// Parses `user:NAME=LEVEL` / `group:NAME=LEVEL`.
pub fn parse_grant(text: &str) -> Result<AclEntry, VolumeError> {
    let (who, level) = text.rsplit_once('=').ok_or_else(|| {
        VolumeError::invalid(format!(
            "{text:?} is not a grant: write user:NAME=read|write|admin or group:NAME=LEVEL"
        ))
    })?;
    let level = match level {
        "read" => Level::Read,
        "write" => Level::Write,
        "admin" => Level::Admin,
        _ => {
            return Err(VolumeError::invalid(format!(
                "{level:?} is not a level: use read, write or admin"
            )))
        }
    };
    let (kind, id) = parse_principal(who)?;
    Ok(AclEntry { kind, id, level })
}

/// `access` with `entry` in place of any entry for the same user or group.
pub fn granted(mut access: AccessRecord, entry: AclEntry) -> AccessRecord {
    access
        .acl
        .retain(|e| (e.kind, e.id) != (entry.kind, entry.id));
    access.acl.push(entry);
    access.acl.sort_by_key(|e| (e.kind, e.id));
    access
}

/// `access` without the entry for `who`; an error if it has none.
pub fn revoked(
    mut access: AccessRecord,
    who: (Principal, u32),
    volume: &str,
) -> Result<AccessRecord, VolumeError> {
    let before = access.acl.len();
    access.acl.retain(|e| (e.kind, e.id) != who);
    if access.acl.len() == before {
        return Err(VolumeError::not_found(format!(
            "volume {volume}'s access list has no entry for {}; `snapblk volume access {volume}` \
             shows it",
            principal_name(who.0, who.1)
        )));
    }
    Ok(access)
}

/// `user:alice`, `group:staff` (numbers for ids without a name).
pub fn principal_name(kind: Principal, id: u32) -> String {
    match kind {
        Principal::User => format!("user:{}", user_name(id)),
        Principal::Group => format!("group:{}", group_name(id)),
    }
}

/// How `volume access` and `volume info` show it.
pub fn to_json(access: &AccessRecord) -> Value {
    json!({
        "owner": user_name(access.owner),
        "owner_uid": access.owner,
        "acl": access.acl.iter().map(|e| json!({
            "principal": principal_name(e.kind, e.id),
            "id": e.id,
            "level": e.level.as_str(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, gids: &[u32]) -> Caller {
        Caller {
            uid,
            gids: gids.to_vec(),
            superuser: false,
        }
    }

    #[test]
    fn levels_come_from_owner_users_and_groups() {
        let access = AccessRecord {
            owner: 1000,
            acl: vec![
                AclEntry {
                    kind: Principal::User,
                    id: 1001,
                    level: Level::Read,
                },
                AclEntry {
                    kind: Principal::Group,
                    id: 50,
                    level: Level::Write,
                },
            ],
        };
        assert_eq!(
            level_of(&access, &caller(1000, &[1000])),
            Some(Level::Admin)
        );
        assert_eq!(level_of(&access, &caller(1001, &[1001])), Some(Level::Read));
        // The highest of the user's and the group's entries.
        assert_eq!(
            level_of(&access, &caller(1001, &[1001, 50])),
            Some(Level::Write)
        );
        assert_eq!(level_of(&access, &caller(1002, &[1002])), None);
        assert_eq!(level_of(&access, &Caller::superuser()), Some(Level::Admin));
        let e = require(
            &access,
            &caller(1001, &[1001]),
            "db",
            Level::Write,
            "snapshot create",
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied);
        assert!(e.message.contains("only read access to volume db"), "{e}");
        assert!(e.message.contains("needs write access"), "{e}");
    }

    #[test]
    fn grants_replace_and_revokes_remove() {
        let g = parse_grant("user:root=read").unwrap();
        assert_eq!((g.kind, g.id, g.level), (Principal::User, 0, Level::Read));
        let access = granted(AccessRecord::default(), g);
        let access = granted(access, parse_grant("user:0=admin").unwrap());
        assert_eq!(access.acl.len(), 1);
        assert_eq!(access.acl[0].level, Level::Admin);
        assert_eq!(to_json(&access)["acl"][0]["principal"], "user:root");
        let access = revoked(access, (Principal::User, 0), "v").unwrap();
        assert!(access.acl.is_empty());
        assert!(revoked(access, (Principal::Group, 0), "v").is_err());
        for bad in ["root=read", "user:root", "user:root=owner", "host:x=read"] {
            assert!(parse_grant(bad).is_err(), "{bad}");
        }
        let e = parse_grant("user:no-such-user-here=read").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
    }
}

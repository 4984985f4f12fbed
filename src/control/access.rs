//! Which access each control request needs, and the check of a caller
//! against it (issue 13 part 4). README "Access and quotas" lists the
//! same table for people.
//!
//! Volume requests need a level on the volume they name (see
//! [`crate::volumes::access`] for how a caller's level is found): reading
//! it (`volume info`, `snapshot list|diff`, a snapshot's device, cloning
//! from it) needs `read`; changing its content or taking
//! snapshots needs `write`; what destroys or gives away (delete, snapshot
//! delete, revert, restore over it, access list changes) needs `admin`.
//! Anything daemon-wide, or that makes the daemon open a path, run a
//! command or reach the network with its own rights (backing files and
//! devices, copy jobs, hooks, Ceph, replication,
//! groups, schedules, other users' quotas, `chown`), needs a superuser.
//!
//! Must never: run the request (that is `server`'s), or trust anything
//! but the caller the socket vouched for.

use super::protocol::Request;
use crate::engine::Level;
use crate::security::Caller;
use crate::volumes::access::require;
use crate::volumes::{ErrorKind, Registry, VolumeError};

/// What a request needs from a non-superuser.
enum Need<'a> {
    /// Anyone who may connect.
    Anyone,
    /// A level on a volume.
    Volume(&'a str, Level),
    /// Root (or the data directory's owner, or a TLS peer); why, for the error.
    Superuser(&'static str),
}

fn need(req: &Request) -> Need<'_> {
    use Need::*;
    match req {
        Request::VolumeCreate {
            backing: Some(_), ..
        } => Superuser("a backing file or device is opened with the daemon's rights"),
        Request::VolumeCreate { ceph: Some(_), .. }
        | Request::VolumeImport { .. }
        | Request::VolumeAttach { .. } => {
            Superuser("Ceph volumes use the daemon's Ceph credentials")
        }
        Request::VolumeCreate { .. }
        | Request::VolumeList {}
        | Request::DaemonStatus {}
        | Request::Features {}
        | Request::QuotaShow { user: None } => Anyone,
        Request::VolumeInfo { name }
        | Request::VolumeAccess {
            name,
            grant: None,
            revoke: None,
        } => Volume(name, Level::Read),
        Request::SnapshotList { volume } | Request::SnapshotDiff { volume, .. } => {
            Volume(volume, Level::Read)
        }
        Request::VolumeClone { volume, .. } => Volume(volume, Level::Read),
        Request::VolumeFlatten { name } => Volume(name, Level::Write),
        Request::SnapshotCreate {
            quiesce: Some(q), ..
        } if q.pre_hook.is_some() || q.post_hook.is_some() => {
            Superuser("hooks run as the daemon's user")
        }
        Request::SnapshotCreate { volume, .. } => Volume(volume, Level::Write),
        Request::DeviceStart {
            volume, snapshot, ..
        } => Volume(
            volume,
            if snapshot.is_some() {
                Level::Read
            } else {
                Level::Write
            },
        ),
        Request::DeviceStop { device } if !device.starts_with('/') => {
            match device.split_once('@') {
                Some((volume, _)) => Volume(volume, Level::Read),
                None => Volume(device, Level::Write),
            }
        }
        Request::VolumeDelete { name }
        | Request::VolumeReopen { name }
        | Request::VolumeAccess { name, .. }
        | Request::Restore { volume: name }
        | Request::SnapshotDelete { volume: name, .. }
        | Request::SnapshotRevert { volume: name, .. } => Volume(name, Level::Admin),
        Request::VolumeChown { .. } => Superuser("only root gives volumes away"),
        Request::QuotaSet { .. } => Superuser("only root sets quotas"),
        Request::QuotaShow { user: Some(_) } => Superuser("only root sees other users' quotas"),
        Request::DeviceStop { .. } => Superuser("name the device as VOL or VOL@SNAP instead"),
        Request::CopyStart(_) => Superuser(
            "copy jobs write their targets with the daemon's rights and are watched and \
             controlled as the daemon's; read the volume over NBD instead (nbdcopy)",
        ),
        _ => Superuser("it acts on the whole daemon, not on one volume"),
    }
}

/// `Ok` if `caller` may send `req`.
pub fn authorize(req: &Request, caller: &Caller, registry: &Registry) -> Result<(), VolumeError> {
    if caller.superuser {
        return Ok(());
    }
    match need(req) {
        Need::Anyone => Ok(()),
        Need::Volume(name, level) => {
            let access = registry.access_of(name)?;
            require(&access, caller, name, level, req.op())
        }
        Need::Superuser(why) => Err(VolumeError::new(
            ErrorKind::PermissionDenied,
            format!(
                "permission denied: {} may not run {}: only root may ({why})",
                caller.describe(),
                req.op()
            ),
        )),
    }
}

//! The control protocol's wire types: JSON lines over a UNIX socket.
//!
//! One request object per line, one response object per line, in order.
//! `docs/control-protocol.md` is the reference for people; this file is the
//! reference for code (the daemon parses with it, the CLI builds with it).
//!
//! Parsing is two-stage so that every malformed line gets a precise error:
//! first any JSON at all ([`parse_request`] reports "not JSON" / "not an
//! object" / "no op"), then the op's own fields (missing field, wrong type,
//! unknown field).

use crate::backend::CephSpec;
use crate::engine::CacheMode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Every op the daemon understands, in documentation order.
pub const OPS: &[&str] = &[
    "volume.create",
    "volume.list",
    "volume.info",
    "volume.delete",
    "volume.clone",
    "volume.flatten",
    "volume.import",
    "volume.attach",
    "volume.access",
    "volume.chown",
    "volume.detach",
    "volume.reopen",
    "snapshot.create",
    "snapshot.list",
    "snapshot.delete",
    "snapshot.diff",
    "snapshot.revert",
    "daemon.status",
    "device.start",
    "device.stop",
    "device.list",
    "features",
    "stats",
    "copy.start",
    "copy.status",
    "copy.pause",
    "copy.resume",
    "copy.cancel",
    "copy.list",
    "restore",
    "replicate.start",
    "replicate.stop",
    "replicate.status",
    "replicate.cp",
    "replicate.promote",
    "group.create",
    "group.list",
    "group.info",
    "group.delete",
    "group.snapshot.create",
    "group.snapshot.delete",
    "schedule.add",
    "schedule.list",
    "schedule.remove",
    "schedule.pause",
    "schedule.resume",
    "quota.set",
    "quota.show",
];

/// The longest request line the daemon reads; longer lines are refused.
pub const MAX_LINE: usize = 64 * 1024;

/// One control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum Request {
    #[serde(rename = "volume.create")]
    VolumeCreate {
        name: String,
        /// Capacity in bytes.
        size: u64,
        /// Copy-on-write chunk size in bytes; `null` or absent: the engine default.
        #[serde(default)]
        chunk_size: Option<u32>,
        #[serde(default)]
        partitions: Option<u32>,
        /// Absolute path of an existing file or block device to use as the origin.
        #[serde(default)]
        backing: Option<String>,
        /// How the origin is opened; `null` or absent: writeback.
        #[serde(default)]
        cache: Option<CacheMode>,
        /// Create the volume as a new RBD image in a Ceph pool instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ceph: Option<CephSpec>,
    },
    /// An existing RBD image (with data) made a volume.
    #[serde(rename = "volume.import")]
    VolumeImport {
        name: String,
        ceph: CephSpec,
        #[serde(default)]
        chunk_size: Option<u32>,
        #[serde(default)]
        partitions: Option<u32>,
    },
    /// A Ceph volume another daemon served, taken over.
    #[serde(rename = "volume.attach")]
    VolumeAttach {
        name: String,
        ceph: CephSpec,
        /// Break (and blocklist) the current holder of the image's lock.
        #[serde(default)]
        break_lock: bool,
    },
    /// A Ceph volume forgotten here, its pool data and lock left for
    /// `volume.attach`.
    #[serde(rename = "volume.detach")]
    VolumeDetach { name: String },
    /// Closes a volume and opens it again from its storage (after a failed
    /// journal, or to retry one that could not open).
    #[serde(rename = "volume.reopen")]
    VolumeReopen { name: String },
    #[serde(rename = "volume.list")]
    VolumeList {},
    /// Shows a volume's owner and access list; with `grant`
    /// (`user:NAME=LEVEL`, `group:NAME=LEVEL`) or `revoke` (`user:NAME`,
    /// `group:NAME`), changes it first.
    #[serde(rename = "volume.access")]
    VolumeAccess {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grant: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revoke: Option<String>,
    },
    /// Gives a volume to another owner (a user name or uid).
    #[serde(rename = "volume.chown")]
    VolumeChown { name: String, user: String },
    #[serde(rename = "volume.info")]
    VolumeInfo { name: String },
    #[serde(rename = "volume.delete")]
    VolumeDelete { name: String },
    /// A writable volume `name` whose unwritten chunks read from
    /// `volume@snapshot`.
    #[serde(rename = "volume.clone")]
    VolumeClone {
        volume: String,
        snapshot: String,
        name: String,
    },
    /// Starts copying every chunk a clone does not own into it, in the
    /// background (progress in `volume.info`); then it no longer needs
    /// its parent snapshot.
    #[serde(rename = "volume.flatten")]
    VolumeFlatten { name: String },
    #[serde(rename = "snapshot.create")]
    SnapshotCreate {
        volume: String,
        name: String,
        /// Hooks and a timer around the snapshot; see [`crate::quiesce`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quiesce: Option<crate::quiesce::Quiesce>,
    },
    #[serde(rename = "snapshot.list")]
    SnapshotList { volume: String },
    #[serde(rename = "snapshot.delete")]
    SnapshotDelete { volume: String, name: String },
    /// The extents that changed between snapshot `from` and `to` (a later
    /// snapshot, or the live volume when absent).
    #[serde(rename = "snapshot.diff")]
    SnapshotDiff {
        volume: String,
        from: String,
        #[serde(default)]
        to: Option<String>,
    },
    /// Makes the live volume's content equal to snapshot `name`'s.
    /// Refused while anything writes the volume unless `force` stops it.
    #[serde(rename = "snapshot.revert")]
    SnapshotRevert {
        volume: String,
        name: String,
        #[serde(default)]
        force: bool,
    },
    #[serde(rename = "daemon.status")]
    DaemonStatus {},
    /// Every volume's counters, devices, copy jobs and replication links at
    /// one moment (what `snapblk top` polls and `--metrics-listen` serves).
    #[serde(rename = "stats")]
    Stats {},
    /// Starts a ublk device (`/dev/ublkbN`) for the volume, or read-only for
    /// one of its snapshots.
    #[serde(rename = "device.start")]
    DeviceStart {
        volume: String,
        #[serde(default)]
        snapshot: Option<String>,
        /// Hardware queues (one thread and one io_uring each); default 1.
        #[serde(default)]
        queues: Option<u16>,
        /// Requests in flight per queue; default 64.
        #[serde(default)]
        depth: Option<u16>,
        /// Ask for UBLK_F_USER_RECOVERY (default true); `false` makes the
        /// device die with the daemon.
        #[serde(default)]
        recovery: Option<bool>,
        /// Run zero copy where the kernel offers it (default true); `false`
        /// copies every request's data as on older kernels.
        #[serde(default)]
        zero_copy: Option<bool>,
    },
    /// Stops a device: `VOL`, `VOL@SNAP` or its path `/dev/ublkbN`.
    #[serde(rename = "device.stop")]
    DeviceStop { device: String },
    #[serde(rename = "device.list")]
    DeviceList {},
    /// What the running kernel's ublk driver offers.
    #[serde(rename = "features")]
    Features {},
    /// Starts a live copy job; see [`crate::copy::CopyStart`].
    #[serde(rename = "copy.start")]
    CopyStart(crate::copy::CopyStart),
    /// One job's progress, or (no id) every job not yet ended.
    #[serde(rename = "copy.status")]
    CopyStatus {
        #[serde(default)]
        id: Option<u64>,
    },
    #[serde(rename = "copy.pause")]
    CopyPause { id: u64 },
    #[serde(rename = "copy.resume")]
    CopyResume { id: u64 },
    #[serde(rename = "copy.cancel")]
    CopyCancel { id: u64 },
    #[serde(rename = "copy.list")]
    CopyList {},
    /// Writes the backup stream passed with the request (SCM_RIGHTS) into
    /// a volume; see [`crate::copy::restore_vol`].
    #[serde(rename = "restore")]
    Restore { volume: String },
    /// Replicates a volume to a destination daemon (see `src/replication`).
    #[serde(rename = "replicate.start")]
    ReplicateStart(crate::replication::ReplicateStart),
    /// `group` (with `volume` empty): every member of the group.
    #[serde(rename = "replicate.stop")]
    ReplicateStop {
        #[serde(default)]
        volume: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
    },
    #[serde(rename = "replicate.status")]
    ReplicateStatus {
        #[serde(default)]
        volume: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
    },
    /// Takes a consistency point now and waits until the destination applied it.
    #[serde(rename = "replicate.cp")]
    ReplicateCp {
        #[serde(default)]
        volume: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
    },
    /// On the destination: makes a replica a normal writable volume.
    #[serde(rename = "replicate.promote")]
    ReplicatePromote { volume: String },
    /// A consistency group: volumes whose snapshots are taken at one instant.
    #[serde(rename = "group.create")]
    GroupCreate { name: String, volumes: Vec<String> },
    #[serde(rename = "group.list")]
    GroupList {},
    #[serde(rename = "group.info")]
    GroupInfo { name: String },
    #[serde(rename = "group.delete")]
    GroupDelete { name: String },
    /// One snapshot `name` of every member of `group`, under one write barrier.
    #[serde(rename = "group.snapshot.create")]
    GroupSnapshotCreate {
        group: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quiesce: Option<crate::quiesce::Quiesce>,
    },
    #[serde(rename = "group.snapshot.delete")]
    GroupSnapshotDelete { group: String, name: String },
    /// Snapshots on a schedule, with retention; see [`crate::schedule`].
    #[serde(rename = "schedule.add")]
    ScheduleAdd(crate::schedule::ScheduleAdd),
    #[serde(rename = "schedule.list")]
    ScheduleList {},
    #[serde(rename = "schedule.remove")]
    ScheduleRemove { id: u64 },
    #[serde(rename = "schedule.pause")]
    SchedulePause { id: u64 },
    #[serde(rename = "schedule.resume")]
    ScheduleResume { id: u64 },
    /// Sets a user's space quota in bytes; `null`: no quota.
    #[serde(rename = "quota.set")]
    QuotaSet {
        user: String,
        #[serde(default)]
        limit: Option<u64>,
    },
    /// Limit, use and volumes per user (`user` absent: every user the
    /// caller may see).
    #[serde(rename = "quota.show")]
    QuotaShow {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Request::VolumeCreate { .. } => "volume.create",
            Request::VolumeList {} => "volume.list",
            Request::VolumeInfo { .. } => "volume.info",
            Request::VolumeDelete { .. } => "volume.delete",
            Request::VolumeClone { .. } => "volume.clone",
            Request::VolumeFlatten { .. } => "volume.flatten",
            Request::VolumeImport { .. } => "volume.import",
            Request::VolumeAttach { .. } => "volume.attach",
            Request::VolumeAccess { .. } => "volume.access",
            Request::VolumeChown { .. } => "volume.chown",
            Request::VolumeDetach { .. } => "volume.detach",
            Request::VolumeReopen { .. } => "volume.reopen",
            Request::SnapshotCreate { .. } => "snapshot.create",
            Request::SnapshotList { .. } => "snapshot.list",
            Request::SnapshotDelete { .. } => "snapshot.delete",
            Request::SnapshotDiff { .. } => "snapshot.diff",
            Request::SnapshotRevert { .. } => "snapshot.revert",
            Request::DaemonStatus {} => "daemon.status",
            Request::Stats {} => "stats",
            Request::DeviceStart { .. } => "device.start",
            Request::DeviceStop { .. } => "device.stop",
            Request::DeviceList {} => "device.list",
            Request::Features {} => "features",
            Request::CopyStart(_) => "copy.start",
            Request::CopyStatus { .. } => "copy.status",
            Request::CopyPause { .. } => "copy.pause",
            Request::CopyResume { .. } => "copy.resume",
            Request::CopyCancel { .. } => "copy.cancel",
            Request::CopyList {} => "copy.list",
            Request::Restore { .. } => "restore",
            Request::ReplicateStart(_) => "replicate.start",
            Request::ReplicateStop { .. } => "replicate.stop",
            Request::ReplicateStatus { .. } => "replicate.status",
            Request::ReplicateCp { .. } => "replicate.cp",
            Request::ReplicatePromote { .. } => "replicate.promote",
            Request::GroupCreate { .. } => "group.create",
            Request::GroupList {} => "group.list",
            Request::GroupInfo { .. } => "group.info",
            Request::GroupDelete { .. } => "group.delete",
            Request::GroupSnapshotCreate { .. } => "group.snapshot.create",
            Request::GroupSnapshotDelete { .. } => "group.snapshot.delete",
            Request::ScheduleAdd(_) => "schedule.add",
            Request::ScheduleList {} => "schedule.list",
            Request::ScheduleRemove { .. } => "schedule.remove",
            Request::SchedulePause { .. } => "schedule.pause",
            Request::ScheduleResume { .. } => "schedule.resume",
            Request::QuotaSet { .. } => "quota.set",
            Request::QuotaShow { .. } => "quota.show",
        }
    }
}

/// Machine-readable error class; the message says the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not a request (not JSON, unknown op, missing or mistyped field).
    BadRequest,
    NotFound,
    AlreadyExists,
    /// A well-formed request with a value the daemon refuses (bad name, size, ...).
    InvalidArgument,
    /// The object is in use, or the daemon is shutting down.
    Busy,
    NoSpace,
    IoError,
    PermissionDenied,
    /// A code this build does not know (newer daemon).
    #[serde(other)]
    Unknown,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok();
        let s = s.as_ref().and_then(|v| v.as_str()).unwrap_or("unknown");
        f.write_str(s)
    }
}

/// The `error` member of a failed response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    pub code: ErrorCode,
    pub message: String,
}

impl ControlError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ControlError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ControlError {}

impl From<crate::volumes::VolumeError> for ControlError {
    fn from(e: crate::volumes::VolumeError) -> Self {
        use crate::volumes::ErrorKind as K;
        let code = match e.kind {
            K::NotFound => ErrorCode::NotFound,
            K::AlreadyExists => ErrorCode::AlreadyExists,
            K::InvalidArgument => ErrorCode::InvalidArgument,
            K::Busy => ErrorCode::Busy,
            K::NoSpace => ErrorCode::NoSpace,
            K::IoError => ErrorCode::IoError,
            K::PermissionDenied => ErrorCode::PermissionDenied,
        };
        ControlError::new(code, e.message)
    }
}

/// One response line: `{"ok":true,"result":...}` or `{"ok":false,"error":{...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ControlError>,
}

impl Response {
    pub fn from_result(r: Result<Value, ControlError>) -> Response {
        match r {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response {
                ok: false,
                result: None,
                error: Some(e),
            },
        }
    }

    /// Back to a `Result`; a response that is neither is a protocol error.
    pub fn into_result(self) -> Result<Value, ControlError> {
        match (self.ok, self.result, self.error) {
            (true, r, _) => Ok(r.unwrap_or(Value::Null)),
            (false, _, Some(e)) => Err(e),
            (false, _, None) => Err(ControlError::new(
                ErrorCode::Unknown,
                "the daemon reported a failure without an error",
            )),
        }
    }

    /// The response as one line (no trailing newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("responses always serialize")
    }
}

/// Parses one request line. Every failure is a `bad_request` whose message
/// names what is wrong.
pub fn parse_request(line: &[u8]) -> Result<Request, ControlError> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        ControlError::bad_request(format!(
            "request is not valid JSON ({e}); send one JSON object per line"
        ))
    })?;
    let obj = value.as_object().ok_or_else(|| {
        ControlError::bad_request("request must be a JSON object like {\"op\":\"volume.list\"}")
    })?;
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.clone(),
        Some(_) => return Err(ControlError::bad_request("field `op` must be a string")),
        None => {
            return Err(ControlError::bad_request(format!(
                "missing field `op`; known ops: {}",
                OPS.join(", ")
            )))
        }
    };
    if !OPS.contains(&op.as_str()) {
        return Err(ControlError::bad_request(format!(
            "unknown op `{op}`; known ops: {}",
            OPS.join(", ")
        )));
    }
    serde_json::from_value(value)
        .map_err(|e| ControlError::bad_request(format!("bad `{op}` request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_create() {
        let r = parse_request(
            br#"{"op":"volume.create","name":"v","size":1073741824,"chunk_size":65536,"partitions":4,"backing":null,"cache":"none"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::VolumeCreate {
                name: "v".into(),
                size: 1 << 30,
                chunk_size: Some(65536),
                partitions: Some(4),
                backing: None,
                cache: Some(CacheMode::None),
                ceph: None,
            }
        );
        let e = parse_request(br#"{"op":"volume.create","name":"v","size":1,"cache":"direct"}"#)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("expected one of `writeback`, `none`, `writearound`"),
            "{e}"
        );
        let r = parse_request(br#"{"op":"volume.create","name":"v","size":1}"#).unwrap();
        assert_eq!(r.op(), "volume.create");
    }

    #[test]
    fn parses_device_ops() {
        let r = parse_request(br#"{"op":"device.start","volume":"v"}"#).unwrap();
        assert_eq!(
            r,
            Request::DeviceStart {
                volume: "v".into(),
                snapshot: None,
                queues: None,
                depth: None,
                recovery: None,
                zero_copy: None
            }
        );
        let r = parse_request(
            br#"{"op":"device.start","volume":"v","snapshot":"s","queues":2,"depth":128,"recovery":false,"zero_copy":false}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::DeviceStart {
                volume: "v".into(),
                snapshot: Some("s".into()),
                queues: Some(2),
                depth: Some(128),
                recovery: Some(false),
                zero_copy: Some(false)
            }
        );
        assert_eq!(
            parse_request(br#"{"op":"device.stop","device":"/dev/ublkb0"}"#).unwrap(),
            Request::DeviceStop {
                device: "/dev/ublkb0".into()
            }
        );
        assert_eq!(
            parse_request(br#"{"op":"device.list"}"#).unwrap(),
            Request::DeviceList {}
        );
        assert_eq!(
            parse_request(br#"{"op":"features"}"#).unwrap(),
            Request::Features {}
        );
        for line in [
            &br#"{"op":"device.start"}"#[..],
            br#"{"op":"device.start","volume":"v","depth":70000}"#,
            br#"{"op":"device.start","volume":"v","queues":-1}"#,
            br#"{"op":"device.stop"}"#,
        ] {
            let e = parse_request(line).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message);
        }
    }

    #[test]
    fn rejects_malformed() {
        for (line, needle) in [
            (&b"garbage"[..], "not valid JSON"),
            (b"[1,2]", "JSON object"),
            (b"{}", "missing field `op`"),
            (br#"{"op":7}"#, "must be a string"),
            (br#"{"op":"volume.frobnicate"}"#, "unknown op"),
            (br#"{"op":"volume.info"}"#, "missing field `name`"),
            (
                br#"{"op":"volume.create","name":"v","size":"big"}"#,
                "invalid type",
            ),
            (br#"{"op":"volume.list","extra":1}"#, "unknown field"),
        ] {
            let e = parse_request(line).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(
                e.message.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(line),
                e.message
            );
        }
    }

    #[test]
    fn response_shape() {
        let ok = Response::from_result(Ok(serde_json::json!([1])));
        assert_eq!(ok.to_line(), r#"{"ok":true,"result":[1]}"#);
        let err = Response::from_result(Err(ControlError::not_found("volume x not found")));
        assert_eq!(
            err.to_line(),
            r#"{"ok":false,"error":{"code":"not_found","message":"volume x not found"}}"#
        );
    }
}

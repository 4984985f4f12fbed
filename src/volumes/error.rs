//! The error every operation on volumes returns (the registry, copy jobs,
//! replication): a kind a caller can act on and a message a person reads.
//!
//! It knows nothing of the control protocol; `control` maps each kind to the
//! protocol's error code, so this layer never needs to import `control`.

use std::fmt;

/// What went wrong, as far as a caller needs to tell cases apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    /// A value the daemon refuses (bad name, size, path, ...).
    InvalidArgument,
    /// The object is in use, or the daemon is shutting down.
    Busy,
    NoSpace,
    IoError,
    PermissionDenied,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeError {
    pub kind: ErrorKind,
    pub message: String,
}

impl VolumeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        VolumeError {
            kind,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
}

impl fmt::Display for VolumeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for VolumeError {}

impl From<crate::engine::EngineError> for VolumeError {
    fn from(e: crate::engine::EngineError) -> Self {
        use crate::engine::EngineError as E;
        let kind = match &e {
            E::NotFound(_) => ErrorKind::NotFound,
            E::AlreadyExists(_) => ErrorKind::AlreadyExists,
            E::InvalidArgument(_) | E::OutOfRange { .. } | E::Misaligned { .. } | E::ReadOnly => {
                ErrorKind::InvalidArgument
            }
            E::NoSpace | E::QuotaExceeded(_) => ErrorKind::NoSpace,
            E::SnapshotGone(_) => ErrorKind::NotFound,
            E::InUse(_) => ErrorKind::Busy,
            E::Corrupt(_) | E::Io(_) => ErrorKind::IoError,
        };
        VolumeError::new(kind, e.to_string())
    }
}

impl From<std::io::Error> for VolumeError {
    fn from(e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            // A Ceph image locked by another daemon.
            std::io::ErrorKind::WouldBlock => ErrorKind::Busy,
            _ if e.raw_os_error() == Some(libc::ENOSPC) => ErrorKind::NoSpace,
            _ => ErrorKind::IoError,
        };
        VolumeError::new(kind, e.to_string())
    }
}

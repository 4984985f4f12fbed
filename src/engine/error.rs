use std::io;

/// Every failure the engine reports. Each maps to one errno, which is what the
/// frontends hand to the kernel or the NBD client; the message is what a
/// person reads in the CLI.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("request [{offset}, +{len}) is outside the device's {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request [{offset}, +{len}) is not aligned to 512-byte sectors")]
    Misaligned { offset: u64, len: u64 },
    #[error("this view is read-only (a snapshot); write to the volume itself")]
    ReadOnly,
    #[error("no space left on the device that holds the volume's data")]
    NoSpace,
    /// The volume's owner is at its space quota (the message says which).
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("metadata is corrupt: {0}")]
    Corrupt(String),
    /// Something else depends on it (a clone on its parent snapshot).
    #[error("{0}")]
    InUse(String),
    #[error("snapshot {0} was deleted while this view was open")]
    SnapshotGone(String),
    #[error("{0}")]
    Io(io::Error),
}

impl From<io::Error> for EngineError {
    fn from(e: io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            EngineError::NoSpace
        } else {
            EngineError::Io(e)
        }
    }
}

impl EngineError {
    /// The errno a block device client sees for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::OutOfRange { .. } | EngineError::Misaligned { .. } => libc::EINVAL,
            EngineError::InvalidArgument(_) => libc::EINVAL,
            EngineError::ReadOnly => libc::EPERM,
            EngineError::NoSpace | EngineError::QuotaExceeded(_) => libc::ENOSPC,
            EngineError::NotFound(_) => libc::ENOENT,
            EngineError::AlreadyExists(_) => libc::EEXIST,
            EngineError::Corrupt(_) => libc::EIO,
            EngineError::SnapshotGone(_) => libc::ESTALE,
            EngineError::InUse(_) => libc::EBUSY,
            EngineError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

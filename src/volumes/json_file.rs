//! The daemon's small JSON lists beside the volumes (`groups.json`,
//! `schedules.json`): read whole at start, replaced atomically on change.

use super::error::{ErrorKind, VolumeError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;
use std::path::Path;

/// Reads `path`; a missing file is an empty list. `what` names the list
/// in the error a person reads ("groups").
pub fn load<T: DeserializeOwned + Default>(path: &Path, what: &str) -> io::Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a valid list of {what} ({e}); restore it from a backup or \
                     remove it to forget every one",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `value` (temporary file, fsync, rename, fsync of
/// the directory): a crash leaves the old list or the new one.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), VolumeError> {
    let bytes = serde_json::to_vec_pretty(value).expect("lists serialize");
    crate::backend::file::replace_atomically(path, &bytes).map_err(|e| {
        VolumeError::new(
            ErrorKind::IoError,
            format!("cannot save {}: {e}", path.display()),
        )
    })
}

//! Where a copy goes: a file (created sparse), an existing block device,
//! another volume of the daemon (`vol:NAME`), or a backup stream file.
//!
//! File and device targets are written through the job thread's io_uring,
//! with O_DIRECT when the target accepts it (buffers are page aligned); a
//! file system that refuses O_DIRECT (tmpfs) gets buffered I/O instead.

use super::stream;
use crate::engine::{EngineError, View};
use crate::runtime::{self, AlignedBuf, ALIGN};
use futures::lock::Mutex;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Where a stream's next frame goes, and what the stream holds so far.
pub struct StreamPos {
    pub len: u64,
    pub crc: u32,
    pub blocks: u64,
}

pub enum Target {
    /// A regular file or block device; `fresh` when it was created by this
    /// job (it reads as zeros where nothing was written).
    Device {
        file: File,
        fresh: bool,
    },
    Volume(View),
    Stream {
        file: File,
        pos: Mutex<StreamPos>,
        /// An incremental stream: zeroed ranges get ZERO frames (its
        /// target holds older data there).
        zeros: bool,
    },
}

/// A copy holds a whole volume's data: only its owner may read it, unless
/// the operator loosens the file afterwards.
pub const TARGET_MODE: u32 = 0o600;

/// `extra`: more open flags (O_NOFOLLOW when resuming).
fn open_direct(path: &Path, create: bool, extra: i32) -> io::Result<File> {
    let open = |flags: i32| {
        let mut o = OpenOptions::new();
        o.read(true)
            .write(true)
            .mode(TARGET_MODE)
            .custom_flags(flags | extra);
        if create {
            o.create_new(true);
        }
        o.open(path)
    };
    match open(libc::O_DIRECT) {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            if create {
                // create_new made it before O_DIRECT was refused.
                let _ = std::fs::remove_file(path);
            }
            open(0)
        }
        Err(e) => Err(e),
    }
}

fn size_of(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

impl Target {
    /// Opens a file or block device target. `resume`: reopen what an
    /// earlier run of the job created, never through a symlink (one swapped
    /// in meanwhile could point anywhere). `existing`: a raw file that
    /// already holds an older image (`--since`), written in place. Raw
    /// targets need `size` bytes.
    pub fn open_path(
        path: &Path,
        size: u64,
        stream: bool,
        resume: bool,
        existing: bool,
    ) -> io::Result<Target> {
        let nofollow = if resume { libc::O_NOFOLLOW } else { 0 };
        let meta = std::fs::metadata(path);
        let is_dev = meta.as_ref().is_ok_and(|m| m.file_type().is_block_device());
        if stream {
            if is_dev {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is a block device; a stream goes to a file (or `-`)",
                        path.display()
                    ),
                ));
            }
            let mut o = OpenOptions::new();
            o.read(true)
                .write(true)
                .mode(TARGET_MODE)
                .custom_flags(nofollow);
            if !resume {
                o.create_new(true);
            }
            // A resumed stream's file was there: a missing one is no
            // path typo.
            let file = o
                .open(path)
                .map_err(|e| if resume { e } else { new_target_hint(e, path) })?;
            return Ok(Target::stream(file, existing));
        }
        // O_DIRECT needs every I/O aligned; a volume whose size is not a
        // multiple of the page size ends in a short segment.
        let direct_ok = size.is_multiple_of(ALIGN as u64);
        if is_dev || resume || existing {
            let file = if direct_ok {
                open_direct(path, false, nofollow)?
            } else {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(nofollow)
                    .open(path)?
            };
            let have = size_of(&file)?;
            if have < size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "target {} holds {have} bytes but the copy needs {size}; use a larger device",
                        path.display()
                    ),
                ));
            }
            return Ok(Target::Device {
                file,
                fresh: !is_dev && !existing,
            });
        }
        let file = if direct_ok {
            open_direct(path, true, 0)
        } else {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(TARGET_MODE)
                .open(path)
        }
        .map_err(|e| new_target_hint(e, path))?;
        file.set_len(size)?;
        Ok(Target::Device { file, fresh: true })
    }

    /// The (device, inode) of a file or device target.
    pub fn identity(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        match self {
            Target::Device { file, .. } | Target::Stream { file, .. } => {
                file.metadata().ok().map(|m| (m.dev(), m.ino()))
            }
            Target::Volume(_) => None,
        }
    }

    /// A stream target writing to `file` (a file, or a pipe from the CLI);
    /// `incremental`: zeroed ranges get frames.
    pub fn stream(file: File, incremental: bool) -> Target {
        Target::Stream {
            file,
            pos: Mutex::new(StreamPos {
                len: 0,
                crc: 0,
                blocks: 0,
            }),
            zeros: incremental,
        }
    }

    /// Whether ranges that read as zeros can be left unwritten.
    pub fn reads_zero_unwritten(&self) -> bool {
        matches!(
            self,
            Target::Device { fresh: true, .. } | Target::Stream { .. }
        )
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        match self {
            Target::Device { file, .. } => {
                runtime::write_at(file.as_raw_fd(), data, offset, 0).await
            }
            Target::Volume(view) => view.write(offset, data, false).await.map_err(engine_io),
            Target::Stream { file, pos, .. } => {
                let head = stream::frame_head(offset, data.len() as u32);
                let tail = stream::frame_tail(&head, data);
                append_frame(file, pos, &[&head, data, &tail]).await
            }
        }
    }

    /// Writes consecutive blocks of `block` bytes (the last may be short):
    /// one I/O, except in a stream, where each block is its own frame.
    pub async fn write_blocks(&self, offset: u64, data: &[u8], block: u64) -> io::Result<()> {
        if !matches!(self, Target::Stream { .. }) {
            return self.write(offset, data).await;
        }
        for (i, b) in data.chunks(block as usize).enumerate() {
            self.write(offset + i as u64 * block, b).await?;
        }
        Ok(())
    }

    /// Makes `[offset, +len)` read as zeros (targets that do not already).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Target::Device { fresh: true, .. } | Target::Stream { zeros: false, .. } => Ok(()),
            Target::Stream { file, pos, .. } => {
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(stream::MAX_BLOCK as u64);
                    let frame = stream::zero_frame(at, n as u32);
                    append_frame(file, pos, &[&frame]).await?;
                    at += n;
                }
                Ok(())
            }
            Target::Device { file, .. } => {
                let fd = file.as_raw_fd();
                if runtime::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, offset, len)
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
                let zeros = AlignedBuf::zeroed(len as usize);
                runtime::write_at(fd, &zeros, offset, 0).await
            }
            Target::Volume(view) => view
                .write_zeroes(offset, len, false)
                .await
                .map_err(engine_io),
        }
    }

    pub async fn flush(&self) -> io::Result<()> {
        match self {
            Target::Device { file, .. } => runtime::fsync(file.as_raw_fd(), true).await,
            Target::Stream { file, .. } => match runtime::fsync(file.as_raw_fd(), true).await {
                // A pipe or socket: nothing to make durable here.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
                r => r,
            },
            Target::Volume(view) => view.flush().await.map_err(engine_io),
        }
    }

    /// Reads back a raw target (for `--verify`).
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Target::Device { file, .. } => runtime::read_at(file.as_raw_fd(), buf, offset).await,
            Target::Volume(view) => view.read(offset, buf).await.map_err(engine_io),
            Target::Stream { .. } => Err(io::Error::other("a stream is read with its reader")),
        }
    }

    /// The stream's committed length now (after what is written so far).
    pub async fn stream_len(&self) -> Option<u64> {
        match self {
            Target::Stream { pos, .. } => Some(pos.lock().await.len),
            _ => None,
        }
    }
}

/// Appends one frame, given in parts, to a stream.
async fn append_frame(file: &File, pos: &Mutex<StreamPos>, parts: &[&[u8]]) -> io::Result<()> {
    let mut p = pos.lock().await;
    for part in parts {
        runtime::write_at(file.as_raw_fd(), part, p.len, 0).await?;
        p.crc = crc32c::crc32c_append(p.crc, part);
        p.len += part.len() as u64;
    }
    p.blocks += 1;
    Ok(())
}

/// Why a new target file could not be made, with what to do about it.
pub(super) fn new_target_hint(e: io::Error, path: &Path) -> io::Error {
    let why = match e.kind() {
        io::ErrorKind::AlreadyExists => format!(
            "target {} already exists; remove it or choose a new path (a copy never overwrites a file)",
            path.display()
        ),
        io::ErrorKind::NotFound => format!(
            "directory {} does not exist; create it first (snapblk creates the target \
             file, never its directories)",
            path.parent().unwrap_or(path).display()
        ),
        _ => return e,
    };
    io::Error::new(e.kind(), why)
}

/// An engine error as the I/O error it is (ENOSPC stays ENOSPC).
pub fn engine_io(e: EngineError) -> io::Error {
    match e {
        EngineError::Io(e) => e,
        EngineError::NoSpace => io::Error::from_raw_os_error(libc::ENOSPC),
        other => io::Error::other(other.to_string()),
    }
}

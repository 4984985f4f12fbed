//! Regular files and block devices, driven through the thread's io_uring.

use super::Extent;
use crate::runtime;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

pub struct FileBackend {
    file: File,
    block_device: bool,
    /// The same file opened O_DIRECT, for writes of whole aligned blocks
    /// (a partition's change-log store; see [`FileBackend::with_direct_writes`]).
    direct: Option<File>,
}

impl FileBackend {
    pub fn open(path: &Path, create: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(FileBackend {
            file,
            block_device,
            direct: None,
        })
    }

    /// Sends page-aligned writes of whole pages around the page cache.
    /// For the change-log store: its slots are written once and read
    /// rarely, so copying them into the page cache only to flush them at
    /// the next commit cost a memory copy per preserved chunk, and on ext4
    /// io_uring hands every buffered write to a worker thread. Reads stay
    /// buffered (the kernel keeps them coherent with direct writes), so
    /// snapshot reads of any alignment work as before. A filesystem that
    /// refuses O_DIRECT keeps buffered writes.
    pub fn with_direct_writes(mut self, path: &Path) -> Self {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => self.direct = Some(file),
            Err(e) => log::debug!("{}: no O_DIRECT writes ({e})", path.display()),
        }
        self
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn size(&self) -> io::Result<u64> {
        if self.block_device {
            let mut size: u64 = 0;
            // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
            const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
            // SAFETY: the ioctl writes one u64 into `size`.
            if unsafe { libc::ioctl(self.fd(), BLKGETSIZE64, &mut size) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(size)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        runtime::read_at(self.fd(), buf, offset).await
    }

    pub async fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        let flags = if durable { libc::RWF_DSYNC } else { 0 };
        let aligned = |n: usize| n.is_multiple_of(runtime::ALIGN);
        let fd = match &self.direct {
            Some(direct)
                if aligned(buf.as_ptr() as usize)
                    && aligned(offset as usize)
                    && aligned(buf.len()) =>
            {
                direct.as_raw_fd()
            }
            _ => self.fd(),
        };
        runtime::write_at(fd, buf, offset, flags).await
    }

    pub async fn flush(&self) -> io::Result<()> {
        runtime::fsync(self.fd(), true).await
    }

    pub async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match runtime::fallocate(self.fd(), mode, offset, len).await {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zeroes(offset, len).await
            }
            other => other,
        }
    }

    pub async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match runtime::fallocate(self.fd(), mode, offset, len).await {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zeroes(offset, len).await
            }
            other => other,
        }
    }

    /// Fallback for filesystems and devices without fallocate modes.
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; STEP.min(len) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = STEP.min(offset + len - at) as usize;
            self.write_at(&zeros[..n], at, false).await?;
            at += n as u64;
        }
        Ok(())
    }

    pub fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata()?;
        if self.block_device {
            return self.size();
        }
        Ok(meta.blocks() * 512)
    }

    pub fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        if self.block_device {
            return Ok(vec![Extent {
                offset,
                len,
                data: true,
            }]);
        }
        let mut extents = Vec::new();
        let mut at = offset;
        while at < end {
            let data_start = seek(self.fd(), at, libc::SEEK_DATA)?
                .unwrap_or(end)
                .min(end);
            if data_start > at {
                extents.push(Extent {
                    offset: at,
                    len: data_start - at,
                    data: false,
                });
                at = data_start;
                continue;
            }
            let hole_start = seek(self.fd(), at, libc::SEEK_HOLE)?
                .unwrap_or(end)
                .min(end);
            extents.push(Extent {
                offset: at,
                len: hole_start - at,
                data: true,
            });
            at = hole_start;
        }
        Ok(extents)
    }

    pub async fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.flush().await
    }
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` when past the last data (ENXIO).
fn seek(fd: RawFd, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on an fd we own.
    let r = unsafe { libc::lseek(fd, offset as i64, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Write a temporary file, fsync it, rename over `path`, fsync the directory.
pub fn replace_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has NUL"))?;
    // SAFETY: statvfs fills the zeroed struct; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail * st.f_frsize)
}

//! Regular files and block devices, driven through the thread's io_uring.
//!
//! A file opened for direct I/O (a volume's origin in cache mode `none` or
//! `writearound`, a change-log store) takes every request O_DIRECT can take
//! as it is. A request it cannot take
//! still succeeds, slower: a misaligned buffer is copied through an aligned
//! one, a misaligned offset or length goes through the page cache on a
//! second descriptor. Both are counted ([`FileBackend::bounced_ios`]) so the
//! tests can prove the hot paths hand over aligned memory.

use super::{Extent, PageCache};
use crate::runtime::{self, AlignedBuf};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub struct FileBackend {
    file: File,
    block_device: bool,
    /// Present when `file` was opened with O_DIRECT.
    direct: Option<Direct>,
    /// Set once the file system said it cannot share blocks into this file,
    /// so later preservations copy without asking again.
    clone_refused: AtomicBool,
}

/// What O_DIRECT asks of I/O on one file, and the way around it.
struct Direct {
    /// The same file without O_DIRECT, for I/O whose offset or length is not
    /// a multiple of `offset_align`. The kernel keeps both coherent: a direct
    /// write writes back and drops the cached pages of its range, a direct
    /// read first writes back dirty ones; fdatasync on either descriptor
    /// covers the inode, so FLUSH stays one call.
    buffered: File,
    mem_align: usize,
    offset_align: u64,
    bounced: AtomicU64,
    /// Reads go through `buffered` (cache mode `writearound`).
    cached_reads: bool,
    /// Cached pages are dropped before a direct write (see
    /// [`FileBackend::uncache_before_direct_write`]): `cached_reads`, on a
    /// file system whose pages can be dropped (not tmpfs, where the page
    /// cache is the file and the two calls would buy nothing).
    uncache_writes: bool,
    once_reads_from_cache: AtomicU64,
}

/// How one request reaches a direct file.
enum Route {
    Direct,
    /// Misaligned memory: through an aligned copy.
    Bounce,
    /// Misaligned offset or length: through the page cache.
    Buffered(RawFd),
}

impl FileBackend {
    pub fn open(path: &Path, create: bool) -> io::Result<Self> {
        Self::open_with(path, create, PageCache::Use)
    }

    /// With [`PageCache::Bypass`] or [`PageCache::BypassForWrites`] the file
    /// is opened O_DIRECT (a FLUSH still fdatasyncs, for the disk's own
    /// volatile cache).
    pub fn open_with(path: &Path, create: bool, cache: PageCache) -> io::Result<Self> {
        let direct = cache != PageCache::Use;
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .mode(VOLUME_FILE_MODE)
                .custom_flags(libc::O_CLOEXEC | flags)
                .open(path)
        };
        let file = match open(if direct { libc::O_DIRECT } else { 0 }) {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{}: the file system refuses O_DIRECT, which cache modes none and \
                         writearound need; use cache mode writeback for a volume stored here",
                        path.display()
                    ),
                ))
            }
            other => other.map_err(named)?,
        };
        let block_device = file.metadata()?.file_type().is_block_device();
        let direct = if direct {
            let (mem_align, offset_align) = dio_alignment(&file).map_err(named)?;
            let buffered = open(0).map_err(named)?;
            if cache == PageCache::BypassForWrites {
                read_in_small_pages(&buffered);
            }
            Some(Direct {
                buffered,
                mem_align,
                offset_align,
                bounced: AtomicU64::new(0),
                cached_reads: cache == PageCache::BypassForWrites,
                uncache_writes: cache == PageCache::BypassForWrites && !on_tmpfs(&file),
                once_reads_from_cache: AtomicU64::new(0),
            })
        } else {
            None
        };
        Ok(FileBackend {
            file,
            block_device,
            direct,
            clone_refused: AtomicBool::new(false),
        })
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Requests that O_DIRECT could not take as they were (bounced through
    /// an aligned copy or sent through the page cache) since the open.
    pub fn bounced_ios(&self) -> u64 {
        self.direct
            .as_ref()
            .map_or(0, |d| d.bounced.load(Ordering::Relaxed))
    }

    /// How a request must go, counting those that cannot go direct.
    fn route(&self, ptr: *const u8, len: usize, offset: u64) -> Route {
        let route = self.route_quiet(ptr, len, offset);
        if let (Some(d), Route::Buffered(_) | Route::Bounce) = (&self.direct, &route) {
            d.bounced.fetch_add(1, Ordering::Relaxed);
        }
        route
    }

    fn route_quiet(&self, ptr: *const u8, len: usize, offset: u64) -> Route {
        let Some(d) = &self.direct else {
            return Route::Direct;
        };
        // Masks, not `is_multiple_of`: a division costs tens of
        // instructions on every request, and the alignments are powers of two.
        if (offset | len as u64) & (d.offset_align - 1) != 0 {
            Route::Buffered(d.buffered.as_raw_fd())
        } else if ptr as usize & (d.mem_align - 1) != 0 {
            Route::Bounce
        } else {
            Route::Direct
        }
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
        if let Some(d) = self.direct.as_ref().filter(|d| d.cached_reads) {
            return runtime::read_at(d.buffered.as_raw_fd(), buf, offset).await;
        }
        self.read_direct_at(buf, offset).await
    }

    /// Reads data that will not be read again soon (content about to be
    /// overwritten, a replication sync, a copy job: [`super::Reuse::Once`]).
    /// In cache mode writearound it comes from the page cache only when all
    /// of it is there (a memory copy instead of a disk read); otherwise
    /// O_DIRECT, since a buffered miss would cache it, pushing out pages
    /// that are read again, and every later direct write of the range
    /// would first have to drop those pages again
    /// ([`FileBackend::uncache_before_direct_write`]).
    pub async fn read_once(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.direct.as_ref().filter(|d| d.cached_reads) {
            Some(d) if fully_cached(d.buffered.as_raw_fd(), offset, buf.len() as u64) => {
                d.once_reads_from_cache.fetch_add(1, Ordering::Relaxed);
                runtime::read_cached_at(d.buffered.as_raw_fd(), buf, offset).await
            }
            _ => self.read_direct_at(buf, offset).await,
        }
    }

    /// In cache mode writearound, drops the clean cached pages of a range
    /// about to be written direct. The kernel will not start a direct write
    /// without blocking while pages of its range are cached (it must drop
    /// them first), so io_uring hands every such write to an io-wq worker
    /// thread: under 4k random writes over a volume read once before, those
    /// workers took a quarter of the machine's CPU. Dropping the pages here,
    /// in this thread, keeps the write inline (`scripts/bench-nbd` plain 4k
    /// random writes: server CPU per write 7.5-8.9 us -> 6.1-6.2 us). The
    /// cachestat check keeps the common uncached case to one cheap call.
    /// Coherence does not depend on it: a page cached again in between only
    /// sends that write to a worker, as before.
    fn uncache_before_direct_write(&self, offset: u64, len: usize) {
        let Some(d) = self.direct.as_ref().filter(|d| d.uncache_writes) else {
            return;
        };
        if cached_pages(d.buffered.as_raw_fd(), offset, len as u64)
            .is_none_or(|(cached, _)| cached > 0)
        {
            // SAFETY: plain syscall on a descriptor we own. Advice only: a
            // failure leaves the pages to the write itself.
            unsafe {
                libc::posix_fadvise(
                    self.fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
    }

    /// Reads of data read once that the page cache served
    /// (see [`FileBackend::read_once`]).
    pub fn once_reads_from_cache(&self) -> u64 {
        self.direct
            .as_ref()
            .map_or(0, |d| d.once_reads_from_cache.load(Ordering::Relaxed))
    }

    async fn read_direct_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.route(buf.as_ptr(), buf.len(), offset) {
            Route::Direct => runtime::read_at(self.fd(), buf, offset).await,
            Route::Buffered(fd) => runtime::read_at(fd, buf, offset).await,
            Route::Bounce => {
                let mut bounce = AlignedBuf::zeroed(buf.len());
                runtime::read_at(self.fd(), &mut bounce, offset).await?;
                buf.copy_from_slice(&bounce);
                Ok(())
            }
        }
    }

    pub async fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        match self.write_target(buf, offset) {
            Some(fd) => runtime::write_at(fd, buf, offset, rw_flags(durable)).await,
            None => self.write_bounced(buf, offset, durable).await,
        }
    }

    /// Where a write of `buf` at `offset` goes as it is (the descriptor,
    /// its cached pages dropped first where that is the mode), or `None`
    /// when it must go through an aligned copy ([`FileBackend::write_bounced`]).
    /// Apart from `write_at` so that [`super::Backend::write_at`] can await
    /// the runtime's write itself, one future less per write.
    pub(super) fn write_target(&self, buf: &[u8], offset: u64) -> Option<RawFd> {
        match self.route(buf.as_ptr(), buf.len(), offset) {
            Route::Direct => {
                self.uncache_before_direct_write(offset, buf.len());
                Some(self.fd())
            }
            Route::Buffered(fd) => Some(fd),
            Route::Bounce => None,
        }
    }

    /// The descriptor for a read (`write` false) or write of `len` bytes at
    /// `offset` whose memory the daemon cannot address (a ublk request's
    /// pages registered with the ring): as [`FileBackend::read_at`] and
    /// [`FileBackend::write_target`] route, taking the memory as aligned
    /// (the kernel refuses the I/O with EINVAL where it is not, and the
    /// caller then copies).
    pub(super) fn registered_target(&self, write: bool, offset: u64, len: u64) -> RawFd {
        match self.direct.as_ref() {
            Some(d) if !write && d.cached_reads => d.buffered.as_raw_fd(),
            _ => match self.route_quiet(std::ptr::null(), len as usize, offset) {
                Route::Buffered(fd) => fd,
                _ => {
                    if write {
                        self.uncache_before_direct_write(offset, len as usize);
                    }
                    self.fd()
                }
            },
        }
    }

    pub(super) async fn write_bounced(
        &self,
        buf: &[u8],
        offset: u64,
        durable: bool,
    ) -> io::Result<()> {
        let mut bounce = AlignedBuf::zeroed(buf.len());
        bounce.copy_from_slice(buf);
        self.uncache_before_direct_write(offset, buf.len());
        runtime::write_at(self.fd(), &bounce, offset, rw_flags(durable)).await
    }

    /// Writes `bufs` back to back from `offset` in one system call when
    /// they can all go direct (the change log's batched slots), else one
    /// write each.
    pub async fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        let all_direct = bufs.iter().all(|b| {
            let direct = matches!(self.route_quiet(b.as_ptr(), b.len(), at), Route::Direct);
            at += b.len() as u64;
            direct
        });
        let mut written = 0;
        if all_direct && bufs.len() > 1 {
            self.uncache_before_direct_write(offset, (at - offset) as usize);
            written = runtime::writev_at(self.fd(), bufs, offset).await?;
        }
        // What a short (or no) vectored write left, one buffer at a time.
        let mut at = offset;
        for buf in bufs {
            let end = at + buf.len() as u64;
            let done = (offset + written as u64).clamp(at, end);
            if done < end {
                self.write_at(&buf[(done - at) as usize..], done, false)
                    .await?;
            }
            at = end;
        }
        Ok(())
    }

    pub async fn flush(&self) -> io::Result<()> {
        runtime::fsync(self.fd(), true).await
    }

    /// Makes `[dst_offset, +len)` of this file share the blocks that hold
    /// `src`'s `[src_offset, +len)` (FICLONERANGE: XFS with reflink, btrfs),
    /// so a copy costs no data write; durable, like a write, after this
    /// file's next flush. `Ok(false)`: these files cannot share blocks
    /// (another file system, no reflink, a block device, an unaligned
    /// range), and the caller copies instead. The call runs on a
    /// [`runtime::run_blocking`] thread: XFS takes `src`'s inode lock for it
    /// and first waits for every direct I/O in flight on `src`.
    pub async fn clone_range_from(
        &self,
        src: &FileBackend,
        src_offset: u64,
        dst_offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        if self.block_device || src.block_device || self.clone_refused.load(Ordering::Relaxed) {
            return Ok(false);
        }
        // Descriptors of its own: the call may outlive this future.
        let (dst, src) = (self.file.try_clone()?, src.file.try_clone()?);
        let shared = runtime::run_blocking(move || {
            let range = libc::file_clone_range {
                src_fd: i64::from(src.as_raw_fd()),
                src_offset,
                src_length: len,
                dest_offset: dst_offset,
            };
            // SAFETY: the ioctl reads one file_clone_range; both fds are open.
            if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &range) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        })
        .await;
        let Err(e) = shared else {
            return Ok(true);
        };
        match e.raw_os_error() {
            // Unaligned, or past the end of `src`: this range only.
            Some(libc::EINVAL) => Ok(false),
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::ENOTTY | libc::EPERM | libc::ETXTBSY) => {
                self.clone_refused.store(true, Ordering::Relaxed);
                Ok(false)
            }
            _ => Err(e),
        }
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

    pub async fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        runtime::fallocate(self.fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len).await
    }

    /// See [`super::Backend::grow`]; a file already that long is left alone.
    pub async fn grow(&self, len: u64) -> io::Result<()> {
        let size = self.size()?;
        if len <= size {
            return Ok(());
        }
        runtime::fallocate(self.fd(), 0, size, len - size).await
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
        let zeros = AlignedBuf::zeroed(STEP.min(len) as usize);
        let mut at = offset;
        while at < offset + len {
            let n = STEP.min(offset + len - at) as usize;
            self.write_at(&zeros[..n], at, false).await?;
            at += n as u64;
        }
        Ok(())
    }

    pub fn allocated_bytes(&self) -> io::Result<u64> {
        if self.block_device {
            return self.size();
        }
        Ok(self.file.metadata()?.blocks() * 512)
    }

    pub fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        if self.block_device || fully_allocated(&self.file)? {
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
                // ext4 and XFS report allocated but unwritten blocks (what
                // FALLOC_FL_ZERO_RANGE leaves, i.e. NBD's write-zeroes with
                // NO_HOLE) as holes to SEEK_HOLE; they are allocated.
                extents.push(Extent {
                    offset: at,
                    len: data_start - at,
                    data: has_mapped_blocks(self.fd(), at, data_start - at)?,
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

/// A write's `RWF_` flags: FUA is `RWF_DSYNC`.
pub(super) fn rw_flags(durable: bool) -> i32 {
    if durable {
        libc::RWF_DSYNC
    } else {
        0
    }
}

/// (memory, offset) alignment O_DIRECT asks of `file`. Kernels and file
/// systems that do not say (statx without STATX_DIOALIGN) get the page
/// size, which every O_DIRECT implementation accepts.
fn dio_alignment(file: &File) -> io::Result<(usize, u64)> {
    // SAFETY: statx fills the zeroed struct; the empty path with
    // AT_EMPTY_PATH names the descriptor itself.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let page = runtime::ALIGN;
    if r < 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return Ok((page, page as u64));
    }
    let (mem, offset) = (stx.stx_dio_mem_align.max(1), stx.stx_dio_offset_align);
    // Both are block sizes or DMA alignments, powers of two on every Linux
    // file system; `FileBackend::route_quiet` relies on it.
    if !mem.is_power_of_two() || !offset.is_power_of_two() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the file system asks O_DIRECT alignments of {mem} (memory) and {offset} \
                 (offset) bytes, not powers of two; use cache mode writeback for a volume \
                 stored here"
            ),
        ));
    }
    Ok((mem as usize, offset as u64))
}

/// Whether any block of `[offset, offset + len)` is mapped (FIEMAP, counting
/// extents only). A file system without FIEMAP: no.
fn has_mapped_blocks(fd: RawFd, offset: u64, len: u64) -> io::Result<bool> {
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped_extents: u32,
        extent_count: u32,
        reserved: u32,
    }
    // _IOWR('f', 11, struct fiemap)
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    let mut map = Fiemap {
        start: offset,
        length: len,
        flags: 0,
        mapped_extents: 0,
        // 0: only count the extents, return none.
        extent_count: 0,
        reserved: 0,
    };
    // SAFETY: the ioctl reads and writes the header only (extent_count 0).
    if unsafe { libc::ioctl(fd, FS_IOC_FIEMAP, &mut map) } < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(map.mapped_extents > 0)
}

/// Whether every byte of the file has a block: then it has no hole to
/// look for. SEEK_HOLE is not bounded by the range asked about: it walks
/// from the offset to the next hole, which in a filled file is its end,
/// page by page on tmpfs (about 2 ms for a 128 MiB file under emulation,
/// on the I/O thread, once per preservation: 450 first overwrites a second
/// through ublk in the test guest) and extent by extent elsewhere. Data is
/// the answer that is safe wherever it is not exact (blocks that hold
/// metadata can make a file with a hole look full): the chunk is read,
/// not assumed zero.
fn fully_allocated(file: &File) -> io::Result<bool> {
    let meta = file.metadata()?;
    Ok(meta.blocks() * 512 >= meta.len())
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

/// Files of the data directory (volume data, journals, manifests, records)
/// are never readable by others, whatever the umask.
pub const VOLUME_FILE_MODE: u32 = 0o640;

/// The shortest stretch worth sharing by [`FileBackend::clone_range_from`]
/// rather than copying. Why only long ones: on XFS a clone takes the
/// origin's inode lock and waits for all its direct I/O in flight, and the
/// origin's overwrite of shared blocks is a copy-on-write in XFS. For a
/// sequential overwrite that still halves the bytes the disk writes
/// (docs/benchmarks.md, "Preserving by cloning"); for a 4k write into a 64
/// KiB chunk, one clone per write drained the queue (787 IOPS against 3.2k
/// by copy) and left 60 KiB shared for the next writes to copy again; with
/// 4 KiB chunks, cloning 32 KiB runs gave 297-315 MB/s of 32k writes after
/// a snapshot against 357-403 by copy.
pub const CLONE_MIN_BYTES: u64 = 512 << 10;

/// Write a temporary file, fsync it, rename over `path`, fsync the directory.
pub fn replace_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    rename_over(&path.with_extension("tmp"), path, bytes)
}

/// Writes `bytes` into `staged` (existing blocks reused, the rest cut
/// off), fsyncs it, renames it over `path` and fsyncs the directory.
fn rename_over(staged: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(VOLUME_FILE_MODE)
            .open(staged)?;
        file.write_all(bytes)?;
        file.set_len(bytes.len() as u64)?;
        file.sync_all()?;
    }
    std::fs::rename(staged, path)?;
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Unlinks `path` and makes that durable (its directory synced); a file
/// that is not there is fine.
pub fn remove_durably(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// [`replace_atomically`] for a file that must stay replaceable on a full
/// disk (a volume's manifest: deleting a snapshot, the way to free space,
/// replaces it). The new content goes into a spare file whose blocks were
/// allocated by the previous replacement, and a new spare is allocated
/// after the rename, best effort: on a full disk the first replacement
/// still works, and freeing space makes the next spare.
pub fn replace_with_spare(path: &Path, bytes: &[u8]) -> io::Result<()> {
    const SPARE: u64 = 64 << 10;
    let spare = path.with_extension("spare");
    rename_over(&spare, path, bytes)?;
    let len = SPARE.max(2 * bytes.len() as u64);
    let reserved = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(VOLUME_FILE_MODE)
        .open(&spare)
        .and_then(|f| {
            // SAFETY: fallocate on a file we just opened.
            match unsafe {
                libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len as i64)
            } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        });
    if let Err(e) = reserved {
        log::debug!("{}: cannot allocate a spare: {e}", spare.display());
    }
    Ok(())
}

/// Makes reads through `file` cache what they read in base pages, not in
/// large folios, by turning its readahead off (POSIX_FADV_RANDOM: the page
/// cache then reads exactly the pages asked for, at the mapping's smallest
/// folio order). A direct write drops every cached folio it touches whole,
/// so with the large folios readahead builds (up to 2 MiB on ext4 and XFS
/// since Linux 6.x) each 4 KiB write dropped about 544 KiB of cache
/// around it (measured on ext4, Linux 6.18), and a preservation next to it
/// read its chunk from the disk. Clients of a block device do their own
/// readahead (the kernel's block layer, a VM's), so requests arrive large
/// where reading ahead pays.
fn read_in_small_pages(file: &File) {
    // SAFETY: advice on a descriptor this backend owns; no memory involved.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if rc != 0 {
        log::debug!(
            "posix_fadvise(RANDOM): {}",
            io::Error::from_raw_os_error(rc)
        );
    }
}

/// Whether `file` lives on tmpfs.
fn on_tmpfs(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    // SAFETY: fstatfs fills the zeroed struct from a descriptor we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type as i64 == TMPFS_MAGIC
}

/// Whether every page of `len` bytes at `offset` is in the page cache,
/// by cachestat(2) (Linux 6.5); false where the kernel cannot say. Asking
/// costs one syscall that never waits for I/O, against a disk read saved.
fn fully_cached(fd: RawFd, offset: u64, len: u64) -> bool {
    cached_pages(fd, offset, len).is_some_and(|(cached, pages)| cached >= pages)
}

/// Pages of the range in the page cache, and pages in the range; `None`
/// if the kernel cannot say (cachestat needs Linux 6.5).
fn cached_pages(fd: RawFd, offset: u64, len: u64) -> Option<(u64, u64)> {
    cachestat(fd, offset, len).map(|(stat, pages)| (stat.nr_cache, pages))
}

/// Dirty pages of the range (cached, not written back yet).
#[cfg(test)]
pub(crate) fn dirty_pages(fd: RawFd, offset: u64, len: u64) -> Option<u64> {
    cachestat(fd, offset, len).map(|(stat, _)| stat.nr_dirty)
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The page cache's state of a range, and the pages in the range.
fn cachestat(fd: RawFd, offset: u64, len: u64) -> Option<(Cachestat, u64)> {
    #[repr(C)]
    struct CachestatRange {
        off: u64,
        len: u64,
    }
    // Every architecture numbers it from the unified syscall table.
    const SYS_CACHESTAT: libc::c_long = 451;
    // SAFETY: sysconf reads a constant (glibc answers from the aux vector).
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let first = offset / page;
    let pages = (offset + len).div_ceil(page) - first;
    let range = CachestatRange {
        off: first * page,
        len: pages * page,
    };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and fills `stat`, both live here.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd,
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    (rc == 0).then_some((stat, pages))
}

pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let st = statvfs(dir)?;
    Ok(st.f_bavail * st.f_frsize)
}

/// statvfs(3) of the filesystem that holds `dir`.
pub fn statvfs(dir: &Path) -> io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has NUL"))?;
    // SAFETY: statvfs fills the zeroed struct; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::block_on;

    fn flags_of(fd: RawFd) -> i32 {
        // SAFETY: plain fcntl on a descriptor the backend owns.
        unsafe { libc::fcntl(fd, libc::F_GETFL) }
    }

    #[test]
    fn direct_io_takes_aligned_requests_and_bounces_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("origin");
        let f = FileBackend::open_with(&path, true, PageCache::Bypass).unwrap();
        assert!(f.is_direct());
        assert_ne!(flags_of(f.fd()) & libc::O_DIRECT, 0);
        block_on(async {
            f.truncate(1 << 20).await.unwrap();
            // Aligned memory, offset and length: straight to O_DIRECT.
            let mut buf = AlignedBuf::zeroed(8192);
            buf.fill(0x11);
            f.write_at(&buf, 4096, false).await.unwrap();
            let mut back = AlignedBuf::zeroed(8192);
            f.read_at(&mut back, 4096).await.unwrap();
            assert!(back.iter().all(|&b| b == 0x11));
            assert_eq!(f.bounced_ios(), 0);

            // Memory one byte off alignment: copied through an aligned buffer.
            let mut odd = AlignedBuf::zeroed(4096 + 1);
            odd[1..].fill(0x22);
            f.write_at(&odd[1..], 65536, true).await.unwrap();
            odd[1..].fill(0);
            f.read_at(&mut odd[1..], 65536).await.unwrap();
            assert!(odd[1..].iter().all(|&b| b == 0x22));
            assert_eq!(f.bounced_ios(), 2);

            // An offset and length no device sector divides: page cache,
            // coherent with the direct I/O around it.
            f.write_at(&[0x33; 100], 4096 + 10, false).await.unwrap();
            f.read_at(&mut back, 4096).await.unwrap();
            assert!(back[..10].iter().all(|&b| b == 0x11));
            assert!(back[10..110].iter().all(|&b| b == 0x33));
            assert!(back[110..].iter().all(|&b| b == 0x11));
            assert_eq!(f.bounced_ios(), 3);
            f.flush().await.unwrap();
        });
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[4096 + 10..4096 + 110], &[0x33; 100]);
        assert!(on_disk[65536..65536 + 4096].iter().all(|&b| b == 0x22));
    }

    /// How often io_uring's workers for this thread's ring were woken:
    /// the context switches of the threads io-wq names after it.
    fn io_worker_wakeups(tid: libc::pid_t) -> u64 {
        let name = format!("iou-wrk-{tid}");
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let task = task.ok()?.path();
                let comm = std::fs::read_to_string(task.join("comm")).ok()?;
                (comm.trim_end() == name)
                    .then(|| std::fs::read_to_string(task.join("status")).ok())?
            })
            .flat_map(|status| {
                status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches"))
                    .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    #[test]
    fn writes_over_cached_pages_stay_on_the_submitting_thread() {
        const BLOCKS: u64 = 256;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("origin");
        // Blocks written and synced: an overwrite allocates nothing (an
        // allocating direct write goes to a worker whatever is cached).
        std::fs::write(&path, vec![1u8; (BLOCKS as usize + 1) * 4096]).unwrap();
        let written = File::open(&path).unwrap();
        written.sync_all().unwrap();
        // Out of the cache: the write left it there in large folios, which
        // a direct write drops whole at its first touch.
        // SAFETY: advice on a descriptor we own.
        let rc =
            unsafe { libc::posix_fadvise(written.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        let f = FileBackend::open_with(&path, false, PageCache::BypassForWrites).unwrap();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        block_on(async {
            let mut block = AlignedBuf::zeroed(4096);
            block.fill(2);
            // The file's first write updates its times, which a write that
            // must not block leaves to a worker: not what is measured here.
            f.write_at(&block, BLOCKS * 4096, false).await.unwrap();
            // Into the page cache, in base pages (see read_in_small_pages).
            let mut back = AlignedBuf::zeroed(BLOCKS as usize * 4096);
            f.read_at(&mut back, 0).await.unwrap();
            assert!(
                fully_cached(f.fd(), 0, BLOCKS * 4096),
                "the reads left the file cached"
            );
            let woken = io_worker_wakeups(tid);
            for at in (0..BLOCKS * 4096).step_by(4096) {
                f.write_at(&block, at, false).await.unwrap();
            }
            // A time update per clock tick may still go to a worker; a
            // write over cached pages would, every time.
            let woken = io_worker_wakeups(tid) - woken;
            assert!(
                woken < BLOCKS / 8,
                "io-wq workers woken {woken} times for {BLOCKS} writes"
            );
            f.read_at(&mut back, 0).await.unwrap();
            assert!(back.iter().all(|&b| b == 2), "reads see the direct writes");
        });
    }

    #[test]
    fn buffered_files_never_count_bounces() {
        let dir = tempfile::tempdir().unwrap();
        let f = FileBackend::open(&dir.path().join("f"), true).unwrap();
        assert!(!f.is_direct());
        assert_eq!(flags_of(f.fd()) & libc::O_DIRECT, 0);
        block_on(async {
            f.write_at(&[7; 100], 3, false).await.unwrap();
            let mut back = [0u8; 100];
            f.read_at(&mut back, 3).await.unwrap();
            assert_eq!(back, [7; 100]);
        });
        assert_eq!(f.bounced_ios(), 0);
    }
}

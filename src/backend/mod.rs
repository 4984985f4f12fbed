//! Backends: where a volume's bytes live.
//!
//! Owns: byte-addressed files (a volume's origin, each partition's journal and
//! change-log store) and the directory that holds them, with the durability
//! primitives the engine builds on: flush, atomic manifest replacement, hole
//! punching. Two kinds exist: real files or block devices driven through the
//! thread's io_uring ([`file`]), and an in-memory disk that can simulate a
//! power cut by dropping unflushed writes ([`memory`]), used by the crash tests,
//! and with cargo feature `ceph` a volume's files in a Ceph pool ([`rbd`]).
//!
//! Must never: interpret the bytes it stores (that is the engine's job), or
//! report a write as durable before it is.

pub mod file;
pub mod memory;
#[cfg(feature = "ceph")]
pub mod rbd;

use crate::runtime::{self, AlignedBuf};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One file-like object addressed by byte offset.
#[derive(Clone)]
pub enum Backend {
    File(Arc<file::FileBackend>),
    Memory(memory::MemFile),
    #[cfg(feature = "ceph")]
    Ceph(rbd::CephFile),
}

/// Whether what a read brings in is likely to be read again. A reader that
/// passes over data once (the preservation of content about to be
/// overwritten, a replication sync, a copy job) reads with `Once`: it must
/// not push what clients read out of the page cache, nor leave cached pages
/// behind that each later direct write of the range has to drop first
/// ([`file::FileBackend::read_once`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    Again,
    Once,
}

/// A byte range and whether it holds data (false: a hole that reads as zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

impl Backend {
    pub fn size(&self) -> io::Result<u64> {
        match self {
            Backend::File(f) => f.size(),
            Backend::Memory(m) => m.size(),
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => c.size(),
        }
    }

    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Backend::File(f) => f.read_at(buf, offset).await,
            Backend::Memory(m) => m.read_at(buf, offset),
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => c.read_at(buf, offset).await,
        }
    }

    /// A read used as `reuse` says (see [`Reuse`] and
    /// [`file::FileBackend::read_once`]). One match straight to the
    /// storage's own read: going through [`Backend::read_at`] would nest one
    /// more future, polled at the start and at the completion of every read
    /// the engine serves.
    pub async fn read(&self, buf: &mut [u8], offset: u64, reuse: Reuse) -> io::Result<()> {
        match (self, reuse) {
            (Backend::File(f), Reuse::Again) => f.read_at(buf, offset).await,
            (Backend::File(f), Reuse::Once) => f.read_once(buf, offset).await,
            (Backend::Memory(m), _) => m.read_at(buf, offset),
            #[cfg(feature = "ceph")]
            (Backend::Ceph(c), _) => c.read_at(buf, offset).await,
        }
    }

    /// `durable`: the write is on stable storage when this returns (FUA).
    pub async fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        match self {
            // The file's own write_at, flattened: one future less per write.
            Backend::File(f) => match f.write_target(buf, offset) {
                Some(fd) => runtime::write_at(fd, buf, offset, file::rw_flags(durable)).await,
                None => f.write_bounced(buf, offset, durable).await,
            },
            Backend::Memory(m) => m.write_at(buf, offset, durable),
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => c.write_at(buf, offset, durable).await,
        }
    }

    /// As [`Backend::write_at`], from a buffer the storage may keep until
    /// the write completes instead of copying it: worth calling where
    /// [`Backend::takes_write_buffers`] says so (Ceph images, see
    /// [`rbd::CephFile::write_owned_at`]), the same write elsewhere.
    pub async fn write_owned_at(
        &self,
        buf: &Arc<AlignedBuf>,
        offset: u64,
        durable: bool,
    ) -> io::Result<()> {
        match self {
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => c.write_owned_at(buf, offset, durable).await,
            _ => self.write_at(buf, offset, durable).await,
        }
    }

    /// Where a read of `len` bytes at `offset` into memory the daemon
    /// cannot address (a ublk request's pages registered with the ring, see
    /// [`runtime::read_into_registered`]) goes: a file's descriptor; `None`
    /// where the storage is not a file (it needs the bytes in memory).
    pub fn registered_read_target(&self, offset: u64, len: u64) -> Option<RawFd> {
        match self {
            Backend::File(f) => Some(f.registered_target(false, offset, len)),
            _ => None,
        }
    }

    /// As [`Backend::registered_read_target`] for a write; also the
    /// write's `RWF_` flags (`durable`: FUA).
    pub fn registered_write_target(
        &self,
        offset: u64,
        len: u64,
        durable: bool,
    ) -> Option<(RawFd, i32)> {
        match self {
            Backend::File(f) => Some((
                f.registered_target(true, offset, len),
                file::rw_flags(durable),
            )),
            _ => None,
        }
    }

    /// Whether [`Backend::write_owned_at`] saves a copy here.
    pub fn takes_write_buffers(&self) -> bool {
        match self {
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => matches!(c, rbd::CephFile::Image(_)),
            _ => false,
        }
    }

    /// Writes `bufs` back to back from `offset`, as one request where the
    /// storage allows (see [`file::FileBackend::write_vectored_at`]).
    pub async fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        match self {
            Backend::File(f) => f.write_vectored_at(bufs, offset).await,
            Backend::Memory(m) => m.write_at(&bufs.concat(), offset, false),
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => {
                let mut at = offset;
                for buf in bufs {
                    c.write_at(buf, at, false).await?;
                    at += buf.len() as u64;
                }
                Ok(())
            }
        }
    }

    /// Makes `[dst_offset, +len)` share `src`'s blocks at `src_offset`
    /// instead of copying them, where the storage can (reflink; see
    /// [`file::FileBackend::clone_range_from`]); `Ok(false)` where it
    /// cannot, and the caller copies.
    pub async fn clone_range_from(
        &self,
        src: &Backend,
        src_offset: u64,
        dst_offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        match (self, src) {
            (Backend::File(dst), Backend::File(src)) => {
                dst.clone_range_from(src, src_offset, dst_offset, len).await
            }
            (Backend::Memory(dst), Backend::Memory(src)) => {
                dst.clone_range_from(src, src_offset, dst_offset, len)
            }
            _ => Ok(false),
        }
    }

    /// The shortest stretch worth sharing by [`Backend::clone_range_from`]
    /// rather than copying ([`file::CLONE_MIN_BYTES`]); the in-memory disk
    /// takes a shorter one where a test sets it, so small volumes clone.
    pub fn clone_min_bytes(&self) -> u64 {
        match self {
            Backend::File(_) => file::CLONE_MIN_BYTES,
            Backend::Memory(m) => m.clone_min_bytes(),
            #[cfg(feature = "ceph")]
            Backend::Ceph(_) => u64::MAX,
        }
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> io::Result<()> {
        match self {
            Backend::File(f) => f.flush().await,
            Backend::Memory(m) => m.flush(),
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => c.flush().await,
        }
    }

    /// Deallocates a range; it reads back as zeros.
    pub async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Backend::File(f) => f.punch_hole(offset, len).await,
            Backend::Memory(m) => m.punch_hole(offset, len),
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => c.punch_hole(offset, len).await,
        }
    }

    /// Allocates `[offset, +len)` without changing the file's size, so
    /// later writes there need no new space (a journal's reserve for a
    /// full disk). The in-memory disk never runs out and ignores it.
    pub async fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Backend::File(f) => f.reserve(offset, len).await,
            Backend::Memory(_) => Ok(()),
            // Ceph allocates as it writes; a full cluster fails the write.
            #[cfg(feature = "ceph")]
            Backend::Ceph(_) => Ok(()),
        }
    }

    /// Extends the file to at least `len` bytes with allocated, unwritten
    /// blocks (fallocate mode 0), so direct writes there overwrite inside
    /// the file's size: ext4 takes its inode lock shared for those instead
    /// of exclusively, one write at a time, as for writes past the end.
    /// Returns whether it allocated blocks that [`Backend::allocated_bytes`]
    /// counts: the in-memory disk only extends the size, and Ceph allocates
    /// as it writes.
    pub async fn grow(&self, len: u64) -> io::Result<bool> {
        match self {
            Backend::File(f) => f.grow(len).await.map(|()| true),
            Backend::Memory(m) => m.grow(len).map(|()| false),
            #[cfg(feature = "ceph")]
            Backend::Ceph(_) => Ok(false),
        }
    }

    /// Zeroes a range, keeping it allocated.
    pub async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Backend::File(f) => f.zero_range(offset, len).await,
            Backend::Memory(m) => m.zero_range(offset, len),
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => c.zero_range(offset, len).await,
        }
    }

    /// Bytes allocated on the underlying storage.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        match self {
            Backend::File(f) => f.allocated_bytes(),
            Backend::Memory(m) => m.allocated_bytes(),
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => c.allocated_bytes(),
        }
    }

    /// Allocation map of `[offset, offset+len)`, in order, covering it exactly.
    pub fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        match self {
            Backend::File(f) => f.extents(offset, len),
            Backend::Memory(_) => Ok(vec![Extent {
                offset,
                len,
                data: true,
            }]),
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => Ok(c.extents(offset, len)),
        }
    }

    /// See [`file::FileBackend::once_reads_from_cache`].
    pub fn once_reads_from_cache(&self) -> u64 {
        match self {
            Backend::File(f) => f.once_reads_from_cache(),
            Backend::Memory(_) => 0,
            #[cfg(feature = "ceph")]
            Backend::Ceph(_) => 0,
        }
    }

    /// Requests that direct I/O could not take as they were (see
    /// [`file::FileBackend::bounced_ios`]); 0 for anything not direct.
    pub fn bounced_ios(&self) -> u64 {
        match self {
            Backend::File(f) => f.bounced_ios(),
            Backend::Memory(_) => 0,
            #[cfg(feature = "ceph")]
            Backend::Ceph(_) => 0,
        }
    }

    /// Truncates to `len` bytes (journal tails) and makes that durable.
    pub async fn truncate(&self, len: u64) -> io::Result<()> {
        match self {
            Backend::File(f) => f.truncate(len).await,
            Backend::Memory(m) => m.truncate(len),
            #[cfg(feature = "ceph")]
            Backend::Ceph(c) => c.truncate(len).await,
        }
    }
}

/// How a file's I/O meets the kernel's page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageCache {
    /// Buffered reads and writes.
    Use,
    /// O_DIRECT reads and writes.
    Bypass,
    /// O_DIRECT writes, buffered reads. The kernel keeps the two coherent
    /// for a file nobody maps: a direct write writes back and drops the
    /// cached pages of its range before it is issued and drops them again
    /// when it completes, and a read racing it holds its page locked while
    /// it fills, so that second drop waits for it and discards it.
    BypassForWrites,
}

/// The directory of one volume: named files plus atomically replaced manifests.
#[derive(Clone)]
pub enum Storage {
    Dir(PathBuf),
    Memory(Arc<memory::MemDisk>),
    /// A volume in a Ceph pool, its lock held (see [`rbd`]).
    #[cfg(feature = "ceph")]
    Ceph(Arc<rbd::Pool>),
}

impl Storage {
    /// Opens (and with `create`, creates empty) the named file.
    pub fn open(&self, name: &str, create: bool) -> io::Result<Backend> {
        self.open_with(name, create, PageCache::Use)
    }

    /// As [`Storage::open`], meeting the page cache as `cache` says.
    /// The in-memory disk has no page cache and ignores it.
    pub fn open_with(&self, name: &str, create: bool, cache: PageCache) -> io::Result<Backend> {
        match self {
            Storage::Dir(dir) => Ok(Backend::File(Arc::new(file::FileBackend::open_with(
                &dir.join(name),
                create,
                cache,
            )?))),
            Storage::Memory(disk) => Ok(Backend::Memory(disk.open(name, create)?)),
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => Ok(Backend::Ceph(pool.open(name, create)?)),
        }
    }

    /// Opens an existing change-log store with O_DIRECT where the file
    /// system allows it. Its slots are written once and read rarely, so
    /// copying them into the page cache only to flush them at the next
    /// commit cost a memory copy per preserved chunk (and on ext4 io_uring
    /// hands every buffered write to a worker thread); a store where
    /// O_DIRECT is refused stays buffered.
    pub fn open_store(&self, name: &str) -> io::Result<Backend> {
        match self.open_with(name, false, PageCache::Bypass) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => self.open(name, false),
            other => other,
        }
    }

    /// Reads a manifest; `None` if it does not exist.
    pub fn read_manifest(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match self {
            Storage::Dir(dir) => match std::fs::read(dir.join(name)) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            Storage::Memory(disk) => disk.read_manifest(name),
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.read_manifest(name),
        }
    }

    /// Replaces a manifest atomically and durably: after a crash at any point
    /// the old or the new content is there, never a mix.
    pub fn replace_manifest(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        match self {
            Storage::Dir(dir) => file::replace_with_spare(&dir.join(name), bytes),
            Storage::Memory(disk) => disk.replace_manifest(name, bytes),
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.replace(name, bytes),
        }
    }

    /// Replaces a whole file atomically and durably (journal compaction).
    /// Handles opened before keep the old content; reopen after this.
    pub fn replace_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        match self {
            Storage::Dir(dir) => file::replace_atomically(&dir.join(name), bytes),
            Storage::Memory(disk) => disk.replace_file(name, bytes),
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.replace(name, bytes),
        }
    }

    /// Removes the named file durably; one that is not there is fine.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match self {
            Storage::Dir(dir) => file::remove_durably(&dir.join(name)),
            Storage::Memory(disk) => disk.remove(name),
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.remove(name),
        }
    }

    /// Bytes free for new data where this storage lives.
    pub fn free_bytes(&self) -> io::Result<u64> {
        match self {
            Storage::Dir(dir) => file::free_bytes(dir),
            Storage::Memory(_) => Ok(u64::MAX),
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.free_bytes(),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            Storage::Dir(dir) => Some(dir),
            Storage::Memory(_) => None,
            #[cfg(feature = "ceph")]
            Storage::Ceph(_) => None,
        }
    }
}

fn no_native_snapshots(generation: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "snapshot generation {generation} is kept as a native (RBD) snapshot, which this \
             storage does not have; is this a Ceph volume opened without Ceph support?"
        ),
    )
}

/// Where a Ceph volume lives and how to reach it; all a daemon keeps.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CephSpec {
    pub pool: String,
    pub image: String,
    /// ceph.conf; librados' default search when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<PathBuf>,
    /// The cephx user without `client.` (librados' default, admin, when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// How [`Storage::connect_ceph`] treats the origin image and its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Create the image with this many bytes; it must not exist.
    Create(u64),
    /// Open the existing image; refuse if another client holds its lock.
    Open,
    /// Open the existing image, breaking (and blocklisting) any holder.
    BreakLock,
}

impl Storage {
    /// A Ceph volume's storage, its lock taken as `claim` says.
    pub fn connect_ceph(spec: &CephSpec, claim: Claim) -> io::Result<Storage> {
        #[cfg(feature = "ceph")]
        return Ok(Storage::Ceph(Arc::new(rbd::Pool::connect(spec, claim)?)));
        #[cfg(not(feature = "ceph"))]
        {
            let _ = (spec, claim);
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this snapblk was built without Ceph support; build it with \
                 `cargo build --release --features ceph` (needs librbd-dev and librados-dev)",
            ))
        }
    }

    /// Whether the storage keeps point-in-time images of the origin itself
    /// (a Ceph volume: RBD snapshots, which the OSDs keep copy-on-write per
    /// object), so that preserving a chunk for a snapshot copies no data.
    pub fn native_snapshots(&self) -> bool {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(_) => true,
            _ => false,
        }
    }

    /// Takes the native snapshot of the origin for the engine's snapshot of
    /// `generation`: what the origin holds now; [`Storage::open_native_snapshot`]
    /// makes it readable. Storage without native snapshots refuses.
    pub fn take_native_snapshot(&self, generation: u64) -> io::Result<()> {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.take_snapshot(generation),
            _ => Err(no_native_snapshots(generation)),
        }
    }

    /// Opens the native snapshot of `generation` for reads.
    pub fn open_native_snapshot(&self, generation: u64) -> io::Result<()> {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.open_snapshot(generation),
            _ => Err(no_native_snapshots(generation)),
        }
    }

    /// At open: opens the native snapshots of `generations` for reads and
    /// removes any other that snapblk took (left by a crash).
    pub fn open_native_snapshots(&self, generations: &[u64]) -> io::Result<()> {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => {
                pool.prune_snapshots(generations)?;
                generations.iter().try_for_each(|&g| pool.open_snapshot(g))
            }
            _ => match generations.first() {
                Some(&g) => Err(no_native_snapshots(g)),
                None => Ok(()),
            },
        }
    }

    /// Removes the native snapshot of `generation`.
    pub fn drop_native_snapshot(&self, generation: u64) -> io::Result<()> {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.drop_snapshot(generation),
            _ => Err(no_native_snapshots(generation)),
        }
    }

    /// Reads the origin as the native snapshot of `generation` holds it.
    pub async fn read_native_snapshot(
        &self,
        generation: u64,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.read_snapshot(generation, buf, offset).await,
            _ => {
                let _ = (buf, offset);
                Err(no_native_snapshots(generation))
            }
        }
    }

    /// Gives up a Ceph volume's lock at shutdown (see
    /// [`rbd::Pool::release_lock`]); nothing for other storage.
    pub fn release_ceph_lock(&self) -> io::Result<()> {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.release_lock(),
            _ => Ok(()),
        }
    }

    /// Stops waiting on a Ceph volume's cluster at shutdown (see
    /// [`rbd::Pool::abandon`]); whether this was one.
    pub fn abandon_ceph(&self) -> bool {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => {
                pool.abandon();
                true
            }
            _ => false,
        }
    }

    /// Whether this is a Ceph volume whose lock another daemon broke.
    pub fn ceph_fenced(&self) -> bool {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => pool.fenced(),
            _ => false,
        }
    }

    /// Removes what a Ceph volume keeps in its pool (see
    /// [`rbd::Pool::destroy`]); the last handle on the volume's storage.
    /// Other storage is removed with its directory, by the registry.
    pub fn destroy_pool_data(self) -> io::Result<()> {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => rbd::Pool::destroy(pool),
            _ => Ok(()),
        }
    }

    /// Where a Ceph volume lives and who holds it; `None` for other storage.
    pub fn ceph_status(&self) -> Option<serde_json::Value> {
        match self {
            #[cfg(feature = "ceph")]
            Storage::Ceph(pool) => Some(serde_json::json!({
                "pool": pool.spec().pool,
                "image": pool.spec().image,
                "lock_holder": pool.holder(),
                "fenced": pool.fenced(),
            })),
            _ => None,
        }
    }
}

//! Page-aligned buffers, and arenas registered with the thread's io_uring.
//!
//! A registered ("fixed") buffer is pinned and mapped by the kernel once, at
//! registration, instead of at every I/O: READ_FIXED and WRITE_FIXED skip
//! the per-request page pinning that O_DIRECT I/O otherwise pays. The
//! reactor recognises memory inside this thread's registered arena and
//! issues the fixed opcodes for it by itself, so code that does I/O through
//! [`super::read_at`] / [`super::write_at`] (the engine, copy targets) needs
//! no separate API: it only has to be handed a slice of the arena.

use super::reactor;
use std::alloc::{self, Layout};
use std::marker::PhantomData;

/// Page size: the alignment O_DIRECT asks of buffers, offsets and lengths.
pub const ALIGN: usize = 4096;

/// A page-aligned byte buffer (O_DIRECT needs aligned memory). Its length
/// may be set anywhere up to the capacity it was allocated with, so one
/// buffer can be reused for requests of different sizes.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    cap: usize,
    /// Its memory held an earlier buffer's bytes (see `POOL_BYTES`).
    reused: bool,
}

// SAFETY: the buffer owns its allocation exclusively.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

/// Buffers at least this large are mapped from the kernel, not taken from
/// the heap: the heap cuts each aligned block out of a larger free one, and
/// under copy-on-write load (a chunk buffer per preservation) the pieces so
/// cut tripled the daemon's RSS. A mapping goes back to the kernel whole
/// when dropped, and its pages are zero without a memset.
const MAP_MIN: usize = 64 * 1024;

/// Most bytes of dropped buffers larger than a page kept for reuse,
/// process-wide. A mapping made and unmapped per preservation cost its
/// page faults, the zeroing of fresh pages and, at munmap, a TLB shootdown
/// on every CPU (about a tenth of the daemon's CPU time under 4k random
/// writes after a snapshot). It holds what a volume's preservations keep in
/// flight: each partition's change log writes two gathered batches of up
/// to 8 MiB at a time, 64 MiB for the default four partitions. At 16 MiB
/// most buffers were still fresh mappings under that load; at 64 MiB, with
/// the origin cached in base pages (see `backend::file`), the daemon's CPU
/// per write after a snapshot fell from 79-102 us to 26-34 us. Heap buffers between a page and
/// [`MAP_MIN`] pool here too: each write of 8 to 60 KiB the write-back
/// buffer holds (a database's pages) was a `calloc` that cleared it before
/// the copy. Pooled pages count in RSS.
const POOL_BYTES: usize = 64 << 20;

/// Dropped buffers by exact size, waiting to be reused.
struct Pool {
    free: std::collections::BTreeMap<usize, Vec<usize>>,
    bytes: usize,
}

static POOL: std::sync::Mutex<Pool> = std::sync::Mutex::new(Pool {
    free: std::collections::BTreeMap::new(),
    bytes: 0,
});

/// A pooled buffer of exactly `len` bytes, if one waits.
fn reuse_pooled(len: usize) -> Option<*mut u8> {
    let mut pool = POOL.lock().unwrap();
    let addr = pool.free.get_mut(&len)?.pop()?;
    pool.bytes -= len;
    Some(addr as *mut u8)
}

/// Keeps a buffer for reuse; false if the pool is full.
fn pool_buffer(ptr: *mut u8, len: usize) -> bool {
    let mut pool = POOL.lock().unwrap();
    if pool.bytes + len > POOL_BYTES {
        return false;
    }
    pool.bytes += len;
    pool.free.entry(len).or_default().push(ptr as usize);
    true
}

/// Most one-page buffers kept for reuse, process-wide (8 MiB). A write the
/// write-back buffer holds after a snapshot is copied into a buffer of its
/// own, and the thread that applies it later is the one that drops it: the
/// heap's aligned path cut every such page out of a larger free block and
/// merged the pieces back on free (memalign, malloc_consolidate), about a
/// quarter of the heap's share of the daemon's CPU under 4k random writes
/// after a snapshot.
const SPARE_PAGES: usize = 2048;

/// Dropped one-page heap buffers (addresses), waiting to be reused.
static PAGES: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

fn page_layout() -> Layout {
    Layout::from_size_align(ALIGN, ALIGN).expect("page layout")
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        let buf = AlignedBuf::for_overwrite(len);
        if buf.reused {
            // All of it, so what `set_len` shows beyond `len` is zeros too.
            // SAFETY: pooled memory of `cap` bytes only `buf` references.
            unsafe { std::ptr::write_bytes(buf.ptr, 0, buf.cap) };
        }
        buf
    }

    /// A buffer whose bytes are zeros or what an earlier buffer held, for
    /// a caller that overwrites all of them: a reused buffer skips
    /// clearing, which otherwise costs as much as the copy that follows.
    pub fn for_overwrite(len: usize) -> AlignedBuf {
        if len <= ALIGN {
            // One page, whatever the length asked: a capacity every request
            // up to a page fits, so the pages pool.
            let spare = PAGES.lock().unwrap().pop();
            let ptr = match spare {
                Some(addr) => addr as *mut u8,
                // SAFETY: non-zero size layout.
                None => unsafe { alloc::alloc_zeroed(page_layout()) },
            };
            if ptr.is_null() {
                alloc::handle_alloc_error(page_layout());
            }
            return AlignedBuf {
                ptr,
                len,
                cap: ALIGN,
                reused: spare.is_some(),
            };
        }
        if let Some(ptr) = reuse_pooled(len) {
            return AlignedBuf {
                ptr,
                len,
                cap: len,
                reused: true,
            };
        }
        let layout = Layout::from_size_align(len, ALIGN).expect("buffer layout");
        let ptr = if len >= MAP_MIN {
            // SAFETY: a fresh private anonymous mapping, owned by this buffer.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                std::ptr::null_mut()
            } else {
                p.cast::<u8>()
            }
        } else {
            // SAFETY: non-zero size layout.
            unsafe { alloc::alloc_zeroed(layout) }
        };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf {
            ptr,
            len,
            cap: len,
            reused: false,
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Makes the buffer `len` bytes long (at most its capacity). The bytes
    /// are whatever it last held (zeros if never written).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "length {len} beyond capacity {}", self.cap);
        self.len = len;
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid, and initialized (zeroed), for cap >= len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap > ALIGN && pool_buffer(self.ptr, self.cap) {
            return;
        }
        if self.cap >= MAP_MIN {
            // SAFETY: mapped with this length in `for_overwrite`; nothing borrows it.
            unsafe { libc::munmap(self.ptr.cast(), self.cap) };
            return;
        }
        if self.cap == ALIGN {
            let mut pages = PAGES.lock().unwrap();
            if pages.len() < SPARE_PAGES {
                pages.push(self.ptr as usize);
                return;
            }
        }
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("buffer layout");
        // SAFETY: allocated with this layout in `for_overwrite`.
        unsafe { alloc::dealloc(self.ptr, layout) }
    }
}

/// A buffer registered with this thread's io_uring for as long as it
/// lives. Registration can fail (another arena is registered on this ring,
/// or `RLIMIT_MEMLOCK` is too low for an unprivileged daemon): the arena is
/// then an ordinary buffer, I/O on it takes the plain opcodes, and
/// [`FixedArena::is_registered`] says so.
pub struct FixedArena {
    buf: AlignedBuf,
    registered: bool,
    /// The registration belongs to this thread's ring: never Send.
    _thread: PhantomData<*const ()>,
}

impl FixedArena {
    pub fn new(len: usize) -> FixedArena {
        let mut buf = AlignedBuf::zeroed(len);
        let registered = match reactor::with(|r| r.register_fixed(&mut buf)) {
            Ok(()) => true,
            Err(e) => {
                log::info!("io_uring buffer registration refused ({e}); using plain I/O");
                false
            }
        };
        FixedArena {
            buf,
            registered,
            _thread: PhantomData,
        }
    }

    /// An arena that is never registered (to measure what registration
    /// gains).
    pub fn unregistered(len: usize) -> FixedArena {
        FixedArena {
            buf: AlignedBuf::zeroed(len),
            registered: false,
            _thread: PhantomData,
        }
    }

    pub fn is_registered(&self) -> bool {
        self.registered
    }
}

impl std::ops::Deref for FixedArena {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for FixedArena {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for FixedArena {
    fn drop(&mut self) {
        // No I/O into the arena can be in flight: every operation borrows
        // it, and an operation's drop waits for the kernel to let go.
        if self.registered {
            reactor::with(|r| r.unregister_fixed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{block_on, fixed_io_bytes, read_at, write_at};
    use std::os::fd::AsRawFd;

    /// A dropped mapping, or heap buffer of several pages, is handed out
    /// again for the same size: as it was for an overwrite (no clearing),
    /// zeroed otherwise.
    #[test]
    fn dropped_buffers_are_reused_and_come_back_zeroed() {
        // Odd sizes no other test allocates, so nothing else takes them.
        for len in [MAP_MIN * 3 + ALIGN * 7, ALIGN * 3 + 100] {
            let mut buf = AlignedBuf::zeroed(len);
            buf.fill(0xa5);
            let addr = buf.as_ptr() as usize;
            drop(buf);
            let reused = AlignedBuf::for_overwrite(len);
            assert_eq!(reused.as_ptr() as usize, addr, "{len}: not reused");
            assert!(reused.iter().all(|&b| b == 0xa5), "{len}: cleared");
            drop(reused);
            let again = AlignedBuf::zeroed(len);
            assert_eq!(again.as_ptr() as usize, addr, "{len}: not reused");
            assert!(
                again.iter().all(|&b| b == 0),
                "{len}: a reused buffer kept old bytes"
            );
        }
    }

    #[test]
    fn dropped_pages_are_reused_zeroed_and_the_spares_stay_bounded() {
        let dirty: Vec<AlignedBuf> = (0..64)
            .map(|_| {
                let mut b = AlignedBuf::for_overwrite(ALIGN);
                b.fill(0xa5);
                b
            })
            .collect();
        let addrs: std::collections::HashSet<usize> =
            dirty.iter().map(|b| b.as_ptr() as usize).collect();
        drop(dirty);
        // Other tests take pages too, but not all 64 in between.
        let again: Vec<AlignedBuf> = (0..64).map(|_| AlignedBuf::zeroed(100)).collect();
        assert!(
            again.iter().any(|b| addrs.contains(&(b.as_ptr() as usize))),
            "no dropped page was reused"
        );
        for mut b in again {
            assert_eq!(b.capacity(), ALIGN);
            b.set_len(ALIGN);
            assert!(b.iter().all(|&x| x == 0), "a reused page kept old bytes");
        }
        drop(
            (0..SPARE_PAGES + 64)
                .map(|_| AlignedBuf::for_overwrite(1))
                .collect::<Vec<_>>(),
        );
        assert!(PAGES.lock().unwrap().len() <= SPARE_PAGES);
    }

    #[test]
    fn io_on_arena_memory_takes_the_fixed_opcodes() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let fd = file.as_raw_fd();
        block_on(async {
            let mut arena = FixedArena::new(1 << 20);
            assert!(arena.is_registered(), "root may always register buffers");
            assert!(!FixedArena::new(4096).is_registered(), "one arena per ring");
            let before = fixed_io_bytes();
            arena[..8192].fill(0xa5);
            write_at(fd, &arena[..8192], 4096, 0).await.unwrap();
            let (_, back) = arena.split_at_mut(65536);
            read_at(fd, &mut back[..8192], 4096).await.unwrap();
            assert!(back[..8192].iter().all(|&b| b == 0xa5));
            assert_eq!(fixed_io_bytes() - before, 16384);

            let mut plain = vec![0u8; 4096];
            read_at(fd, &mut plain, 4096).await.unwrap();
            assert_eq!(
                fixed_io_bytes() - before,
                16384,
                "plain memory, plain opcode"
            );
            assert!(plain.iter().all(|&b| b == 0xa5));
        });
        block_on(async {
            assert!(
                FixedArena::new(4096).is_registered(),
                "dropping unregisters"
            );
        });
    }
}

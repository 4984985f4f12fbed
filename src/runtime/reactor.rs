//! The thread-local io_uring and the futures of single operations on it.
//!
//! A thread's reactor runs on a ring of its own, or, inside
//! [`super::block_on_hosted`], on a ring that belongs to someone else (a
//! ublk queue's): a [`HostRing`]. Hosted, every entry the reactor submits
//! carries the host's tag bits in its user_data, and the host's completion
//! loop hands those completions back; the thread then has one ring, one
//! wait and one submission per turn for both the host's work and ours.

use io_uring::{opcode, squeue, types, IoUring};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// The low 32 bits of our user_data: an op slot, or one of these tokens.
const TOKEN_MASK: u64 = u32::MAX as u64;
/// The eventfd read that lets other threads wake us.
const WAKE_TOKEN: u64 = TOKEN_MASK;
/// Cancel requests; their own completions carry nothing.
const CANCEL_TOKEN: u64 = TOKEN_MASK - 1;
const RING_ENTRIES: u32 = 256;

/// A ring owned by someone else that this thread's reactor submits to.
///
/// The host keeps driving its own work on the ring; the reactor only adds
/// entries whose user_data carries [`HostRing::tag`], and the host must hand
/// every completion carrying it to the reactor, untouched, and never submit
/// such user_data itself.
pub trait HostRing {
    /// Bits set in the user_data of every entry the reactor submits; none of
    /// the low 32 (the reactor's own), and none the host's own entries carry
    /// all of.
    fn tag(&self) -> u64;
    /// Queues `entry` for submission; false if the submission queue is full.
    fn push(&self, entry: &squeue::Entry) -> bool;
    /// Submits what is queued, waits until at least `want` completions are
    /// there, and reaps every completion: those whose user_data carries
    /// the tag go to `ours` as `(user_data, result)`, the rest to the host.
    fn turn(&self, want: usize, ours: &mut dyn FnMut(u64, i32));
}

// One per thread: its size does not matter, an indirection on every
// submission would.
#[allow(clippy::large_enum_variant)]
enum Ring {
    Own(IoUring),
    /// Valid while the reactor exists: [`with_host`] drops the reactor
    /// before the borrow it was made from ends.
    Hosted(NonNull<dyn HostRing>),
}

enum OpState {
    /// Queued or in the kernel; the waker of the task that awaits it.
    Pending(Waker),
    /// Completed with this `cqe.result()`.
    Done(i32),
    /// Slot free for reuse.
    Free,
}

pub(crate) struct Reactor {
    ring: Ring,
    /// [`HostRing::tag`] when hosted, else 0.
    tag: u64,
    ops: Vec<OpState>,
    free: Vec<usize>,
    /// Shared with the executors' ready queues: a waker on another thread
    /// may still write to it after this reactor is gone.
    eventfd: Arc<OwnedFd>,
    eventfd_buf: Box<[u8; 8]>,
    /// Whether the eventfd read is in the kernel (it reads `eventfd_buf`).
    wake_armed: bool,
    /// Set while a hosted reactor is taken down: a completed eventfd read
    /// is not armed again.
    closing: bool,
    /// Completions reaped and not yet dispatched (kept to reuse its memory).
    reaped: Vec<(u64, i32)>,
}

/// Operations this thread has submitted, by ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubmittedOps {
    /// On the thread's own runtime ring.
    pub own_ring: u64,
    /// On a ring it was hosted on ([`super::block_on_hosted`]).
    pub host_ring: u64,
}

thread_local! {
    static REACTOR: RefCell<Option<Reactor>> = const { RefCell::new(None) };
    /// This thread's registered arena, `(address, length)` (buffer index 0
    /// of its ring; length 0: none). Kept outside the reactor so the check
    /// every read and write makes is one thread-local load, not a borrow.
    static FIXED: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// Bytes moved by READ_FIXED / WRITE_FIXED on this thread's ring.
    static FIXED_BYTES: Cell<u64> = const { Cell::new(0) };
    /// Reads [`read_cached_at`] sent to an io-wq worker.
    static PUNTED_READS: Cell<u64> = const { Cell::new(0) };
    static SUBMITTED: Cell<SubmittedOps> = const {
        Cell::new(SubmittedOps { own_ring: 0, host_ring: 0 })
    };
}

pub(crate) fn with<R>(f: impl FnOnce(&mut Reactor) -> R) -> R {
    REACTOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let reactor = slot.get_or_insert_with(|| Reactor::new().expect("cannot set up io_uring"));
        f(reactor)
    })
}

/// Runs `f` with this thread's reactor on `host`'s ring, then takes that
/// reactor down (waiting for its eventfd read to let go of its buffer) and
/// puts back whatever reactor the thread had.
pub(crate) fn with_host<R>(host: &dyn HostRing, f: impl FnOnce() -> R) -> R {
    struct Restore {
        reactor: Option<Reactor>,
        fixed: (usize, usize),
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            let hosted = REACTOR.with(|c| c.replace(self.reactor.take()));
            FIXED.set(self.fixed);
            drop(hosted);
        }
    }
    let hosted = Reactor::hosted(host).expect("cannot set up the hosted reactor");
    // An arena registered on the thread's own ring means nothing on the
    // host's: while hosted, I/O takes the plain opcodes.
    let _restore = Restore {
        reactor: REACTOR.with(|c| c.replace(Some(hosted))),
        fixed: FIXED.replace((0, 0)),
    };
    f()
}

fn new_eventfd() -> io::Result<Arc<OwnedFd>> {
    // SAFETY: plain syscall.
    let eventfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if eventfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(eventfd) }))
}

impl Reactor {
    fn new() -> io::Result<Self> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        Ok(Reactor::on(Ring::Own(ring), 0, new_eventfd()?))
    }

    fn hosted(host: &dyn HostRing) -> io::Result<Self> {
        let tag = host.tag();
        assert_eq!(
            tag & TOKEN_MASK,
            0,
            "a host's tag overlaps the reactor's tokens"
        );
        let host: NonNull<dyn HostRing + '_> = NonNull::from(host);
        // SAFETY: only the lifetime is erased; `with_host` drops this
        // reactor before its `host` borrow ends.
        let host: NonNull<dyn HostRing> = unsafe { std::mem::transmute(host) };
        Ok(Reactor::on(Ring::Hosted(host), tag, new_eventfd()?))
    }

    fn on(ring: Ring, tag: u64, eventfd: Arc<OwnedFd>) -> Self {
        let mut reactor = Reactor {
            ring,
            tag,
            ops: Vec::new(),
            free: Vec::new(),
            eventfd,
            eventfd_buf: Box::new([0; 8]),
            wake_armed: false,
            closing: false,
            reaped: Vec::new(),
        };
        reactor.arm_wakeup();
        reactor
    }

    pub(crate) fn eventfd(&self) -> Arc<OwnedFd> {
        self.eventfd.clone()
    }

    /// Registers `buf` as this ring's only fixed buffer (index 0).
    pub(crate) fn register_fixed(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let Ring::Own(ring) = &mut self.ring else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this thread's ring belongs to a ublk queue",
            ));
        };
        if FIXED.get().1 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "this thread's ring already has a registered arena",
            ));
        }
        let iovec = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the caller (FixedArena) keeps the memory alive and
        // unregisters it before freeing it.
        unsafe { ring.submitter().register_buffers(&[iovec])? };
        FIXED.set((buf.as_ptr() as usize, buf.len()));
        Ok(())
    }

    pub(crate) fn unregister_fixed(&mut self) {
        if let Ring::Own(ring) = &mut self.ring {
            if let Err(e) = ring.submitter().unregister_buffers() {
                log::warn!("cannot unregister io_uring buffers: {e}");
            }
        }
        FIXED.set((0, 0));
    }

    fn arm_wakeup(&mut self) {
        let fd = types::Fd(self.eventfd.as_raw_fd());
        let entry = opcode::Read::new(fd, self.eventfd_buf.as_mut_ptr(), 8)
            .build()
            .user_data(self.tag | WAKE_TOKEN);
        self.push(entry);
        self.wake_armed = true;
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry's buffers are kept alive by the Op future
            // that owns its slot until the completion is reaped.
            let pushed = match &mut self.ring {
                Ring::Own(ring) => unsafe { ring.submission().push(&entry) }.is_ok(),
                Ring::Hosted(host) => unsafe { host.as_ref() }.push(&entry),
            };
            if pushed {
                return;
            }
            // Submission queue full: hand what we have to the kernel.
            match &mut self.ring {
                Ring::Own(ring) => {
                    if let Err(e) = ring.submit() {
                        if e.raw_os_error() != Some(libc::EBUSY) {
                            panic!("io_uring submit failed: {e}");
                        }
                        self.reap(true);
                    }
                }
                Ring::Hosted(_) => self.turn(false),
            }
        }
    }

    /// Queues `entry` in a free slot, whose completion wakes `waker`.
    fn start(&mut self, entry: squeue::Entry, waker: Waker) -> usize {
        let index = match self.free.pop() {
            Some(i) => {
                self.ops[i] = OpState::Pending(waker);
                i
            }
            None => {
                self.ops.push(OpState::Pending(waker));
                self.ops.len() - 1
            }
        };
        self.push(entry.user_data(self.tag | index as u64));
        let mut submitted = SUBMITTED.get();
        match self.ring {
            Ring::Own(_) => submitted.own_ring += 1,
            Ring::Hosted(_) => submitted.host_ring += 1,
        }
        SUBMITTED.set(submitted);
        index
    }

    /// Submits queued entries and, if `wait`, blocks until at least one
    /// completion (an I/O, a cross-thread wake-up, or the host's own work)
    /// arrives.
    pub(crate) fn turn(&mut self, wait: bool) {
        let want = usize::from(wait);
        match &mut self.ring {
            Ring::Own(ring) => loop {
                match ring.submit_and_wait(want) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                    Err(e) => panic!("io_uring wait failed: {e}"),
                }
            },
            Ring::Hosted(host) => {
                let reaped = &mut self.reaped;
                // SAFETY: see `Ring::Hosted`.
                unsafe { host.as_ref() }
                    .turn(want, &mut |data, result| reaped.push((data, result)));
            }
        }
        self.reap(false);
    }

    /// Dispatches completions: those `turn` got from a host, and whatever
    /// the own ring holds.
    fn reap(&mut self, wait_if_empty: bool) {
        let mut reaped = std::mem::take(&mut self.reaped);
        if let Ring::Own(ring) = &mut self.ring {
            if wait_if_empty && ring.completion().is_empty() {
                let _ = ring.submitter().submit_and_wait(1);
            }
            reaped.extend(ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        }
        for (data, result) in reaped.drain(..) {
            match data & TOKEN_MASK {
                CANCEL_TOKEN => {}
                WAKE_TOKEN => {
                    self.wake_armed = false;
                    if !self.closing {
                        self.arm_wakeup();
                    }
                }
                index => {
                    let index = index as usize;
                    match std::mem::replace(&mut self.ops[index], OpState::Done(result)) {
                        OpState::Pending(waker) => waker.wake(),
                        OpState::Done(_) | OpState::Free => {
                            unreachable!("completion for idle slot")
                        }
                    }
                }
            }
        }
        self.reaped = reaped;
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        // Buffers of in-flight operations belong to futures that have already
        // waited in their own drop; only the eventfd read remains. An own
        // ring goes with the reactor, and the kernel cancels the read with
        // it; a host's ring lives on, so stop the read and wait until the
        // kernel has let go of its buffer. The eventfd closes with its last
        // owner.
        if matches!(self.ring, Ring::Hosted(_)) {
            self.closing = true;
            if self.wake_armed {
                let cancel = opcode::AsyncCancel::new(self.tag | WAKE_TOKEN)
                    .build()
                    .user_data(self.tag | CANCEL_TOKEN);
                self.push(cancel);
            }
            while self.wake_armed {
                self.turn(true);
            }
        }
    }
}

/// One io_uring operation. The borrow `'a` keeps its buffers alive.
pub struct Op<'a> {
    entry: Option<squeue::Entry>,
    index: usize,
    _buffers: std::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> Op<'a> {
    fn new(entry: squeue::Entry) -> Self {
        Op {
            entry: Some(entry),
            index: usize::MAX,
            _buffers: std::marker::PhantomData,
        }
    }
}

impl Future for Op<'_> {
    type Output = io::Result<u32>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(entry) = self.entry.take() {
            // Nothing completes before the next turn of the ring: the first
            // poll only queues the entry.
            let waker = cx.waker().clone();
            self.index = with(|r| r.start(entry, waker));
            return Poll::Pending;
        }
        let index = self.index;
        let result = with(|r| match &mut r.ops[index] {
            OpState::Done(result) => {
                let result = *result;
                r.ops[index] = OpState::Free;
                r.free.push(index);
                Some(result)
            }
            OpState::Pending(waker) => {
                if !waker.will_wake(cx.waker()) {
                    *waker = cx.waker().clone();
                }
                None
            }
            OpState::Free => unreachable!("op polled after completion"),
        });
        let Some(result) = result else {
            return Poll::Pending;
        };
        // Its slot is free: nothing left for the drop to wait for.
        self.index = usize::MAX;
        Poll::Ready(if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else {
            Ok(result as u32)
        })
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        // Never submitted, or completed and its slot freed by `poll`.
        if self.entry.is_some() || self.index == usize::MAX {
            return;
        }
        let index = self.index;
        // The kernel may still write into our buffers: ask it to stop (an
        // op that never completes by itself, like a poll, would otherwise
        // hang us), then wait until it has let go.
        with(|r| {
            if matches!(r.ops[index], OpState::Pending(_)) {
                let cancel = opcode::AsyncCancel::new(r.tag | index as u64)
                    .build()
                    .user_data(r.tag | CANCEL_TOKEN);
                r.push(cancel);
            }
        });
        loop {
            let done = with(|r| match r.ops[index] {
                OpState::Done(_) => {
                    r.ops[index] = OpState::Free;
                    r.free.push(index);
                    true
                }
                OpState::Free => true,
                OpState::Pending(_) => false,
            });
            if done {
                return;
            }
            with(|r| r.turn(true));
        }
    }
}

fn len32(len: usize) -> u32 {
    u32::try_from(len).expect("single I/O larger than 4 GiB")
}

/// Bytes this thread has moved through its registered arena so far.
pub fn fixed_io_bytes() -> u64 {
    FIXED_BYTES.get()
}

/// Reads of [`read_cached_at`] this thread could not do without blocking
/// and handed to an io-wq worker.
pub fn punted_reads() -> u64 {
    PUNTED_READS.get()
}

/// Operations this thread has submitted so far, by ring.
pub fn submitted_ops() -> SubmittedOps {
    SUBMITTED.get()
}

/// Whether `[ptr, +len)` lies inside this thread's registered arena; if so,
/// counts the bytes as moved through it.
fn use_fixed(ptr: *const u8, len: usize) -> bool {
    let (base, size) = FIXED.get();
    let p = ptr as usize;
    let inside = size != 0 && p >= base && p + len <= base + size;
    if inside {
        FIXED_BYTES.set(FIXED_BYTES.get() + len as u64);
    }
    inside
}

/// Reads into all of `buf` at `offset`, resubmitting after short reads.
/// Reading past end of file fills the rest with zeros.
pub async fn read_at(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    read_at_as(fd, buf, offset, ReadMode::Plain).await
}

/// [`read_at`] for a buffered read of pages known to be cached, which must
/// never block this thread. io_uring tries a buffered read without
/// blocking, but when that fails it retries it inline with only page waits
/// made asynchronous: a file system lock the read needs is then waited for
/// in `io_uring_enter`, stalling every request of this thread. XFS holds
/// the file's lock exclusively through a clone ([`crate::backend::Backend::clone_range_from`])
/// from it, which waits for the direct writes in flight on the file:
/// measured, connection threads spent 72-80% of their time blocked there
/// during 1 MiB writes after a snapshot. So the read goes with
/// `RWF_NOWAIT` and, refused, to an io-wq worker (`IOSQE_ASYNC`).
pub async fn read_cached_at(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    read_at_as(fd, buf, offset, ReadMode::NoWait).await
}

/// How [`read_at_as`] submits its next read.
#[derive(Clone, Copy, PartialEq)]
enum ReadMode {
    /// As io_uring sees fit.
    Plain,
    /// With `RWF_NOWAIT`: fails with EAGAIN rather than block.
    NoWait,
    /// Straight to an io-wq worker (`IOSQE_ASYNC`).
    Worker,
}

async fn read_at_as(fd: RawFd, buf: &mut [u8], offset: u64, mut mode: ReadMode) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let at = offset + done as u64;
        // The raw pointer stays inside this block: the future must be Send.
        let entry = {
            let (ptr, len) = (rest.as_mut_ptr(), rest.len());
            let rw_flags = if mode == ReadMode::NoWait {
                libc::RWF_NOWAIT
            } else {
                0
            };
            let entry = if use_fixed(ptr, len) {
                opcode::ReadFixed::new(types::Fd(fd), ptr, len32(len), 0)
                    .offset(at)
                    .rw_flags(rw_flags)
                    .build()
            } else {
                opcode::Read::new(types::Fd(fd), ptr, len32(len))
                    .offset(at)
                    .rw_flags(rw_flags)
                    .build()
            };
            if mode == ReadMode::Worker {
                entry.flags(squeue::Flags::ASYNC)
            } else {
                entry
            }
        };
        let n = match Op::new(entry).await {
            Err(e) if mode == ReadMode::NoWait && e.raw_os_error() == Some(libc::EAGAIN) => {
                mode = ReadMode::Worker;
                PUNTED_READS.set(PUNTED_READS.get() + 1);
                continue;
            }
            // A file system that cannot say "would block" (tmpfs, FUSE):
            // an ordinary read, as before.
            Err(e) if mode == ReadMode::NoWait && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                mode = ReadMode::Plain;
                continue;
            }
            n => n? as usize,
        };
        if n == 0 {
            rest.fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Writes all of `buf` at `offset`; `rw_flags` may carry `RWF_DSYNC` (FUA).
pub async fn write_at(fd: RawFd, buf: &[u8], offset: u64, rw_flags: i32) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        let at = offset + done as u64;
        let entry = {
            let (ptr, len) = (rest.as_ptr(), rest.len());
            if use_fixed(ptr, len) {
                opcode::WriteFixed::new(types::Fd(fd), ptr, len32(len), 0)
                    .offset(at)
                    .rw_flags(rw_flags)
                    .build()
            } else {
                opcode::Write::new(types::Fd(fd), ptr, len32(len))
                    .offset(at)
                    .rw_flags(rw_flags)
                    .build()
            }
        };
        let n = Op::new(entry).await? as usize;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
        done += n;
    }
    Ok(())
}

/// Reads `len` bytes at `offset` of `fd` into the ring's registered buffer
/// `index`, from its start: a buffer the kernel registered with the ring
/// this thread runs on (a ublk request's pages, see
/// [`crate::frontend::ublk`]), which the daemon cannot address. Only for a
/// thread hosted on that ring. End of file is `UnexpectedEof`: a registered
/// buffer cannot be zero-filled from here.
pub async fn read_into_registered(
    fd: RawFd,
    index: u16,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    registered_io(fd, index, len, offset, None).await
}

/// Writes `len` bytes from the start of the ring's registered buffer
/// `index` to `fd` at `offset` (see [`read_into_registered`]); `rw_flags`
/// may carry `RWF_DSYNC` (FUA).
pub async fn write_from_registered(
    fd: RawFd,
    index: u16,
    len: usize,
    offset: u64,
    rw_flags: i32,
) -> io::Result<()> {
    registered_io(fd, index, len, offset, Some(rw_flags)).await
}

/// A read (`write_flags` `None`) or write between `fd` and registered
/// buffer `index`, resubmitted after short transfers.
async fn registered_io(
    fd: RawFd,
    index: u16,
    len: usize,
    offset: u64,
    write_flags: Option<i32>,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        // The address of a kernel-registered buffer is the offset into it.
        let (at, rest) = (offset + done as u64, len32(len - done));
        let entry = match write_flags {
            Some(flags) => opcode::WriteFixed::new(types::Fd(fd), done as *const u8, rest, index)
                .offset(at)
                .rw_flags(flags)
                .build(),
            None => opcode::ReadFixed::new(types::Fd(fd), done as *mut u8, rest, index)
                .offset(at)
                .build(),
        };
        match Op::new(entry).await? as usize {
            0 if write_flags.is_some() => {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"))
            }
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => done += n,
        }
    }
    Ok(())
}

/// The iovecs of one vectored write, held across its await.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the iovecs point only into buffers the caller of `writev_at`
// lends (shared, `&[u8]`) for the whole call.
unsafe impl Send for IoVecs {}
unsafe impl Sync for IoVecs {}

/// One positioned vectored write of `bufs` back to back (files); returns
/// bytes written, which may be fewer than the buffers hold.
pub async fn writev_at(fd: RawFd, bufs: &[&[u8]], offset: u64) -> io::Result<usize> {
    let iovecs = IoVecs(
        bufs.iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect(),
    );
    let entry = opcode::Writev::new(types::Fd(fd), iovecs.0.as_ptr(), len32(iovecs.0.len()))
        .offset(offset)
        .build();
    Op::new(entry).await.map(|n| n as usize)
}

/// fdatasync (or fsync when `!datasync`).
pub async fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    let mut entry = opcode::Fsync::new(types::Fd(fd));
    if datasync {
        entry = entry.flags(types::FsyncFlags::DATASYNC);
    }
    Op::new(entry.build()).await.map(drop)
}

pub async fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let entry = opcode::Fallocate::new(types::Fd(fd), len)
        .offset(offset)
        .mode(mode)
        .build();
    Op::new(entry).await.map(drop)
}

/// One recv; returns bytes received (0 at end of stream).
pub async fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let entry = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), len32(buf.len())).build();
    Op::new(entry).await.map(|n| n as usize)
}

/// One send; returns bytes sent.
pub async fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let entry = opcode::Send::new(types::Fd(fd), buf.as_ptr(), len32(buf.len()))
        .flags(libc::MSG_NOSIGNAL)
        .build();
    Op::new(entry).await.map(|n| n as usize)
}

/// One writev at the current position (sockets, pipes); returns bytes written.
pub async fn writev(fd: RawFd, iovecs: &[libc::iovec]) -> io::Result<usize> {
    let entry = opcode::Writev::new(types::Fd(fd), iovecs.as_ptr(), len32(iovecs.len()))
        .offset(u64::MAX)
        .build();
    Op::new(entry).await.map(|n| n as usize)
}

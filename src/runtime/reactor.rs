//! The thread-local io_uring and the futures of single operations on it.

use io_uring::{opcode, squeue, types, IoUring};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// user_data reserved for the eventfd read that lets other threads wake us.
const WAKE_TOKEN: u64 = u64::MAX;
/// user_data of cancel requests; their own completions carry nothing.
const CANCEL_TOKEN: u64 = u64::MAX - 1;
const RING_ENTRIES: u32 = 256;

enum OpState {
    /// Queued or in the kernel; the waker of the task that awaits it.
    Pending(Option<Waker>),
    /// Completed with this `cqe.result()`.
    Done(i32),
    /// Slot free for reuse.
    Free,
}

pub(crate) struct Reactor {
    ring: IoUring,
    ops: Vec<OpState>,
    free: Vec<usize>,
    eventfd: RawFd,
    eventfd_buf: Box<[u8; 8]>,
}

thread_local! {
    static REACTOR: RefCell<Option<Reactor>> = const { RefCell::new(None) };
    /// This thread's registered arena, `(address, length)` (buffer index 0
    /// of its ring; length 0: none). Kept outside the reactor so the check
    /// every read and write makes is one thread-local load, not a borrow.
    static FIXED: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// Bytes moved by READ_FIXED / WRITE_FIXED on this thread's ring.
    static FIXED_BYTES: Cell<u64> = const { Cell::new(0) };
}

pub(crate) fn with<R>(f: impl FnOnce(&mut Reactor) -> R) -> R {
    REACTOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let reactor = slot.get_or_insert_with(|| Reactor::new().expect("cannot set up io_uring"));
        f(reactor)
    })
}

impl Reactor {
    fn new() -> io::Result<Self> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        // SAFETY: plain syscall; the fd is owned by the reactor until drop.
        let eventfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if eventfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reactor = Reactor {
            ring,
            ops: Vec::new(),
            free: Vec::new(),
            eventfd,
            eventfd_buf: Box::new([0; 8]),
        };
        reactor.arm_wakeup();
        Ok(reactor)
    }

    pub(crate) fn eventfd(&self) -> RawFd {
        self.eventfd
    }

    /// Registers `buf` as this ring's only fixed buffer (index 0).
    pub(crate) fn register_fixed(&mut self, buf: &mut [u8]) -> io::Result<()> {
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
        unsafe { self.ring.submitter().register_buffers(&[iovec])? };
        FIXED.set((buf.as_ptr() as usize, buf.len()));
        Ok(())
    }

    pub(crate) fn unregister_fixed(&mut self) {
        if let Err(e) = self.ring.submitter().unregister_buffers() {
            log::warn!("cannot unregister io_uring buffers: {e}");
        }
        FIXED.set((0, 0));
    }

    fn arm_wakeup(&mut self) {
        let entry = opcode::Read::new(types::Fd(self.eventfd), self.eventfd_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        self.push(entry);
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry's buffers are kept alive by the Op future
            // that owns its slot until the completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Submission queue full: hand what we have to the kernel.
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    panic!("io_uring submit failed: {e}");
                }
                self.reap(true);
            }
        }
    }

    fn start(&mut self, entry: squeue::Entry) -> usize {
        let index = match self.free.pop() {
            Some(i) => {
                self.ops[i] = OpState::Pending(None);
                i
            }
            None => {
                self.ops.push(OpState::Pending(None));
                self.ops.len() - 1
            }
        };
        self.push(entry.user_data(index as u64));
        index
    }

    /// Submits queued entries and, if `wait`, blocks until at least one
    /// completion (an I/O or a cross-thread wake-up) arrives. Returns whether a
    /// cross-thread wake-up was seen.
    pub(crate) fn turn(&mut self, wait: bool) -> bool {
        let want = usize::from(wait);
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.reap(false);
                    break;
                }
                Err(e) => panic!("io_uring wait failed: {e}"),
            }
        }
        self.reap(false)
    }

    fn reap(&mut self, wait_if_empty: bool) -> bool {
        if wait_if_empty && self.ring.completion().is_empty() {
            let _ = self.ring.submitter().submit_and_wait(1);
        }
        let mut woke = false;
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (token, result) in completions {
            if token == CANCEL_TOKEN {
                continue;
            }
            if token == WAKE_TOKEN {
                woke = true;
                self.arm_wakeup();
                continue;
            }
            let index = token as usize;
            match std::mem::replace(&mut self.ops[index], OpState::Done(result)) {
                OpState::Pending(Some(waker)) => waker.wake(),
                OpState::Pending(None) => {}
                OpState::Done(_) | OpState::Free => unreachable!("completion for idle slot"),
            }
        }
        woke
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        // Buffers of in-flight operations belong to futures that have already
        // waited in their own drop; only the eventfd read remains.
        // SAFETY: we own the fd.
        unsafe { libc::close(self.eventfd) };
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
            self.index = with(|r| r.start(entry));
        }
        let index = self.index;
        with(|r| match &mut r.ops[index] {
            OpState::Done(result) => {
                let result = *result;
                r.ops[index] = OpState::Free;
                r.free.push(index);
                Poll::Ready(if result < 0 {
                    Err(io::Error::from_raw_os_error(-result))
                } else {
                    Ok(result as u32)
                })
            }
            OpState::Pending(waker) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            OpState::Free => unreachable!("op polled after completion"),
        })
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if self.entry.is_some() || self.index == usize::MAX {
            return;
        }
        let index = self.index;
        // The kernel may still write into our buffers: ask it to stop (an
        // op that never completes by itself, like a poll, would otherwise
        // hang us), then wait until it has let go.
        with(|r| {
            if matches!(r.ops[index], OpState::Pending(_)) {
                let cancel = opcode::AsyncCancel::new(index as u64)
                    .build()
                    .user_data(CANCEL_TOKEN);
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
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let at = offset + done as u64;
        // The raw pointer stays inside this block: the future must be Send.
        let entry = {
            let (ptr, len) = (rest.as_mut_ptr(), rest.len());
            if use_fixed(ptr, len) {
                opcode::ReadFixed::new(types::Fd(fd), ptr, len32(len), 0)
                    .offset(at)
                    .build()
            } else {
                opcode::Read::new(types::Fd(fd), ptr, len32(len))
                    .offset(at)
                    .build()
            }
        };
        let n = Op::new(entry).await? as usize;
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

/// Waits until `fd` is readable (an eventfd, a socket, another io_uring).
pub async fn poll_readable(fd: RawFd) -> io::Result<()> {
    let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
    // Dropping this future cancels the poll (see `Op`'s drop).
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

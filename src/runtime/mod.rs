//! Per-thread async runtime: a small executor plus an io_uring reactor.
//!
//! Owns: the thread-local io_uring (one per I/O thread, as DESIGN.md's I/O
//! model asks: no hand-off between threads per request), the task queue of that
//! thread, and the futures that wrap single io_uring operations. A thread that
//! already serves a ring of someone else's (a ublk queue's) runs its reactor
//! on that ring instead ([`block_on_hosted`], [`HostRing`]): one ring and one
//! wait per thread either way.
//!
//! Must never: move a task to another thread, or block inside a task. Tasks on
//! one thread cooperate; the only blocking call is the reactor's wait for
//! completions, taken when no task can make progress (a system call that
//! io_uring cannot run goes to [`run_blocking`]'s threads). Wakers are thread-safe:
//! an engine event completed on another thread (a chunk's preservation, the
//! snapshot gate reopening) wakes this thread through an eventfd armed on the
//! ring.
//!
//! A future returned by [`read_at`] and friends borrows its buffer for the
//! kernel's use. If such a future is dropped before completion, its drop waits
//! for the kernel to finish with the buffer, so safe code can never hand the
//! kernel a dangling pointer.

mod blocking;
mod buffer;
mod executor;
mod reactor;

pub use blocking::run_blocking;
pub use buffer::{AlignedBuf, FixedArena, ALIGN};

pub use executor::{block_on, block_on_hosted, spawn};
pub use reactor::{
    fallocate, fixed_io_bytes, fsync, punted_reads, read_at, read_cached_at, read_into_registered,
    recv, send, submitted_ops, write_at, write_from_registered, writev, writev_at, HostRing,
    SubmittedOps,
};

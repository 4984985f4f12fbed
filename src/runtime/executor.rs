//! A single-threaded executor whose idle wait is the reactor's io_uring wait.

use super::reactor::{self, HostRing};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

type Task = Pin<Box<dyn Future<Output = ()>>>;

/// Task ids made runnable, possibly by other threads.
struct ReadyQueue {
    state: Mutex<ReadyState>,
    /// The reactor's wake-up eventfd, kept open for as long as any waker
    /// can write to it, even after the reactor is gone.
    eventfd: Arc<OwnedFd>,
}

struct ReadyState {
    ids: Vec<usize>,
    sleeping: bool,
}

struct TaskWaker {
    id: usize,
    queue: Arc<ReadyQueue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let sleeping = {
            let mut state = self.queue.state.lock().unwrap();
            state.ids.push(self.id);
            // Only the first wake of a sleeping executor writes the eventfd:
            // the ones after it, until the executor has looked at its list
            // (librbd completing a burst of requests on its own thread),
            // find their ids taken on that same wake-up.
            std::mem::replace(&mut state.sleeping, false)
        };
        // A wake on the executor's own thread comes from the reactor's reap,
        // after its wait: the thread runs the task next without being woken.
        let own_thread = DRIVING.with(|d| d.get() == Arc::as_ptr(&self.queue));
        if sleeping && !own_thread {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to an eventfd the
            // queue keeps open.
            unsafe {
                libc::write(
                    self.queue.eventfd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    8,
                )
            };
        }
    }
}

struct Executor {
    tasks: RefCell<Vec<Option<Task>>>,
    /// Each task slot's waker, made on its first poll and kept for the
    /// slot's next tasks (a waker is an allocation; a task is polled at
    /// least twice per I/O). A stale wake of a slot's earlier task only
    /// polls the current one once more, which futures allow.
    wakers: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
    /// The ids [`Executor::run_ready`] is polling (kept for its memory).
    polling: Cell<Vec<usize>>,
    queue: Arc<ReadyQueue>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Executor>>> = const { RefCell::new(None) };
    static RUNNING: Cell<bool> = const { Cell::new(false) };
    /// The ready queue of the executor this thread runs (null: none).
    static DRIVING: Cell<*const ReadyQueue> = const { Cell::new(std::ptr::null()) };
}

impl Executor {
    fn new() -> Rc<Self> {
        let eventfd = reactor::with(|r| r.eventfd());
        Rc::new(Executor {
            tasks: RefCell::new(Vec::new()),
            wakers: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            polling: Cell::new(Vec::new()),
            queue: Arc::new(ReadyQueue {
                state: Mutex::new(ReadyState {
                    ids: Vec::new(),
                    sleeping: false,
                }),
                eventfd,
            }),
        })
    }

    fn spawn(&self, task: Task) {
        let id = match self.free.borrow_mut().pop() {
            Some(id) => {
                self.tasks.borrow_mut()[id] = Some(task);
                id
            }
            None => {
                let mut tasks = self.tasks.borrow_mut();
                tasks.push(Some(task));
                tasks.len() - 1
            }
        };
        self.queue.state.lock().unwrap().ids.push(id);
    }

    /// Polls every runnable task once; returns whether any was runnable.
    fn run_ready(&self) -> bool {
        // Swapped with the queue's, so neither list is ever reallocated.
        let mut ids = self.polling.take();
        std::mem::swap(&mut ids, &mut self.queue.state.lock().unwrap().ids);
        let any = !ids.is_empty();
        for &id in &ids {
            // A task may be woken twice; the second time it may be gone.
            let Some(mut task) = self.tasks.borrow_mut().get_mut(id).and_then(Option::take) else {
                continue;
            };
            let cached = self.wakers.borrow_mut().get_mut(id).and_then(Option::take);
            let waker = cached.unwrap_or_else(|| {
                Waker::from(Arc::new(TaskWaker {
                    id,
                    queue: self.queue.clone(),
                }))
            });
            let done = task.as_mut().poll(&mut Context::from_waker(&waker));
            let mut wakers = self.wakers.borrow_mut();
            if wakers.len() <= id {
                wakers.resize(id + 1, None);
            }
            wakers[id] = Some(waker);
            drop(wakers);
            match done {
                Poll::Ready(()) => self.free.borrow_mut().push(id),
                Poll::Pending => self.tasks.borrow_mut()[id] = Some(task),
            }
        }
        ids.clear();
        self.polling.set(ids);
        any
    }

    /// Sleeps in the reactor until I/O completes or another thread wakes a task.
    fn park(&self) {
        let must_wait = {
            let mut state = self.queue.state.lock().unwrap();
            state.sleeping = state.ids.is_empty();
            state.sleeping
        };
        reactor::with(|r| r.turn(must_wait));
        self.queue.state.lock().unwrap().sleeping = false;
    }
}

/// Runs `future` to completion on this thread, together with every task it
/// spawns. Tasks still pending when `future` completes are dropped.
///
/// Panics if called from inside another `block_on` on the same thread.
pub fn block_on<F: Future>(future: F) -> F::Output {
    assert!(
        !RUNNING.with(|r| r.replace(true)),
        "nested runtime::block_on"
    );
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            RUNNING.with(|r| r.set(false));
            DRIVING.with(|d| d.set(std::ptr::null()));
            CURRENT.with(|c| c.borrow_mut().take());
        }
    }
    let _reset = Reset;

    let executor = Executor::new();
    CURRENT.with(|c| *c.borrow_mut() = Some(executor.clone()));
    DRIVING.with(|d| d.set(Arc::as_ptr(&executor.queue)));
    let output = Rc::new(RefCell::new(None));
    let slot = output.clone();
    // SAFETY of the lifetime extension: the main task is dropped (with all
    // other tasks) before this function returns, so `future` never outlives
    // the borrows it holds.
    let main: Pin<Box<dyn Future<Output = ()> + '_>> = Box::pin(async move {
        *slot.borrow_mut() = Some(future.await);
    });
    let main: Task = unsafe { std::mem::transmute(main) };
    executor.spawn(main);
    loop {
        executor.run_ready();
        if let Some(value) = output.borrow_mut().take() {
            // Drop leftover tasks now, while the reactor can still finish
            // their in-flight operations.
            let leftovers = std::mem::take(&mut *executor.tasks.borrow_mut());
            drop(leftovers);
            return value;
        }
        executor.park();
    }
}

/// [`block_on`] on a ring that belongs to someone else, such as a ublk
/// queue's: every operation of this thread's tasks goes on `host`'s ring,
/// and the executor sleeps in `host`'s wait, which also serves the host's
/// own work. The host's completions wake its tasks through their wakers.
pub fn block_on_hosted<F: Future>(host: &dyn HostRing, future: F) -> F::Output {
    assert!(!RUNNING.with(|r| r.get()), "nested runtime::block_on");
    reactor::with_host(host, || block_on(future))
}

/// Spawns a task onto the executor of the current `block_on`.
///
/// Panics when called outside `block_on`.
pub fn spawn(future: impl Future<Output = ()> + 'static) {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .expect("runtime::spawn outside runtime::block_on")
            .spawn(Box::pin(future))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_wakes_writes_the_eventfd_of_a_sleeping_executor_once() {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the new fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        let queue = Arc::new(ReadyQueue {
            state: Mutex::new(ReadyState {
                ids: Vec::new(),
                sleeping: true,
            }),
            // SAFETY: `fd` was just made and nothing else owns it.
            eventfd: Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }),
        });
        // From a thread that runs no executor, as librbd's callbacks do.
        let wakers: Vec<Waker> = (0..10)
            .map(|id| {
                Waker::from(Arc::new(TaskWaker {
                    id,
                    queue: queue.clone(),
                }))
            })
            .collect();
        std::thread::spawn(move || wakers.iter().for_each(Waker::wake_by_ref))
            .join()
            .unwrap();
        let state = queue.state.lock().unwrap();
        assert_eq!(state.ids, (0..10).collect::<Vec<_>>());
        assert!(!state.sleeping);
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a u64 from an eventfd we own.
        let n = unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(count, 1, "one eventfd write for the whole burst");
    }

    #[test]
    fn spawned_tasks_and_cross_thread_wakeups_complete() {
        let value = block_on(async {
            let (tx, rx) = futures::channel::oneshot::channel::<u32>();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                tx.send(7).unwrap();
            });
            let (tx2, rx2) = futures::channel::oneshot::channel::<u32>();
            spawn(async move {
                tx2.send(rx.await.unwrap() * 6).unwrap();
            });
            rx2.await.unwrap()
        });
        assert_eq!(value, 42);
    }

    /// A ring of someone else's, standing in for a ublk queue's: its own
    /// entries carry user_data without [`TestHost::TAG`], and their
    /// completions go to `seen`, waking whoever waits for them.
    struct TestHost {
        ring: RefCell<io_uring::IoUring>,
        seen: Cell<Option<u64>>,
        signal: RefCell<Option<Waker>>,
        /// Completions of ours it handed back.
        ours: Cell<u64>,
    }

    impl TestHost {
        const TAG: u64 = 1 << 63;
    }

    impl HostRing for TestHost {
        fn tag(&self) -> u64 {
            Self::TAG
        }
        fn push(&self, entry: &io_uring::squeue::Entry) -> bool {
            unsafe { self.ring.borrow_mut().submission().push(entry) }.is_ok()
        }
        fn turn(&self, want: usize, ours: &mut dyn FnMut(u64, i32)) {
            let mut ring = self.ring.borrow_mut();
            ring.submit_and_wait(want).unwrap();
            for cqe in ring.completion() {
                if cqe.user_data() & Self::TAG != 0 {
                    self.ours.set(self.ours.get() + 1);
                    ours(cqe.user_data(), cqe.result());
                } else {
                    self.seen.set(Some(cqe.user_data()));
                    if let Some(w) = self.signal.borrow_mut().take() {
                        w.wake();
                    }
                }
            }
        }
    }

    /// Hosted on another ring, the runtime's I/O goes there and nowhere
    /// else; the host's own completion, a wake-up from another thread and
    /// the cancellation of a dropped operation all arrive through the
    /// host's wait; and nothing of ours is left on the host's ring after.
    #[test]
    fn a_hosted_runtime_runs_on_the_host_ring() {
        use io_uring::{opcode, types};
        use std::os::fd::AsRawFd;
        let host = TestHost {
            ring: RefCell::new(io_uring::IoUring::new(8).unwrap()),
            seen: Cell::new(None),
            signal: RefCell::new(None),
            ours: Cell::new(0),
        };
        let timeout = types::Timespec::new().nsec(20_000_000);
        let entry = opcode::Timeout::new(&timeout).build().user_data(7);
        assert!(host.push(&entry));
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        let (quiet, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let before = super::super::submitted_ops();
        let got = block_on_hosted(&host, async {
            // The own ring's arena would mean nothing on the host's.
            assert!(!super::super::FixedArena::new(4096).is_registered());
            super::super::write_at(fd, b"hosted", 512, 0).await.unwrap();
            let mut back = [0u8; 6];
            super::super::read_at(fd, &mut back, 512).await.unwrap();
            assert_eq!(&back, b"hosted");

            // Polled once, then dropped: the drop must cancel the recv, which
            // would otherwise never complete, and wait for it.
            let mut buf = [0u8; 8];
            let mut recv = Box::pin(super::super::recv(quiet.as_raw_fd(), &mut buf));
            std::future::poll_fn(|cx| {
                assert!(recv.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            drop(recv);

            let (tx, rx) = futures::channel::oneshot::channel::<u64>();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                tx.send(6).unwrap();
            });
            let from_thread = rx.await.unwrap();
            let from_host = std::future::poll_fn(|cx| match host.seen.get() {
                Some(v) => Poll::Ready(v),
                None => {
                    *host.signal.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            from_thread * from_host
        });
        assert_eq!(got, 42);
        let after = super::super::submitted_ops();
        assert_eq!(after.own_ring, before.own_ring, "nothing on an own ring");
        assert_eq!(after.host_ring - before.host_ring, 3, "write, read, recv");
        // The write, the read, the cancelled recv and its cancel; the
        // eventfd read, armed at the start, cancelled at the end, and done
        // once more if the other thread's wake found us asleep. Completions
        // that wake a task on this thread (the write's, the read's, the
        // host's own) must not write the eventfd: nothing more.
        assert!(
            (6..=7).contains(&host.ours.get()),
            "{} completions of ours",
            host.ours.get()
        );
        let mut ring = host.ring.borrow_mut();
        ring.submit().unwrap();
        assert_eq!(
            ring.completion().count(),
            0,
            "nothing of ours left in flight"
        );
    }

    #[test]
    fn file_io_round_trips_through_the_ring() {
        use std::os::fd::AsRawFd;
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        block_on(async {
            super::super::write_at(fd, b"hello ring", 4096, 0)
                .await
                .unwrap();
            super::super::fsync(fd, true).await.unwrap();
            let mut buf = [0u8; 10];
            super::super::read_at(fd, &mut buf, 4096).await.unwrap();
            assert_eq!(&buf, b"hello ring");
            let mut past_end = [1u8; 16];
            super::super::read_at(fd, &mut past_end, 1 << 20)
                .await
                .unwrap();
            assert_eq!(past_end, [0u8; 16]);
        });
    }

    /// A cached read that would block (here: its pages are not cached, on
    /// a disk file system) goes to a worker and still returns the data.
    #[test]
    fn a_cached_read_that_would_block_is_punted_and_completes() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = std::fs::File::create_new(dir.path().join("f")).unwrap();
        let fd = file.as_raw_fd();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        block_on(async {
            super::super::write_at(fd, &data, 0, 0).await.unwrap();
            super::super::fsync(fd, false).await.unwrap();
            let mut cached = vec![0u8; 8192];
            let before = super::super::punted_reads();
            super::super::read_cached_at(fd, &mut cached, 4096)
                .await
                .unwrap();
            assert_eq!(cached, data[4096..12288]);
            assert_eq!(super::super::punted_reads(), before, "cached: inline");
            // SAFETY: plain syscall on a descriptor we own.
            let dropped = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(dropped, 0);
            let mut back = vec![0u8; 1 << 20];
            super::super::read_cached_at(fd, &mut back, 0)
                .await
                .unwrap();
            assert!(back == data, "the punted read returns the file's data");
            assert!(super::super::punted_reads() > before, "uncached: punted");
        });
        // tmpfs refuses RWF_NOWAIT outright: the read goes ahead without it.
        let shm = tempfile::tempfile_in("/dev/shm").unwrap();
        block_on(async {
            let fd = shm.as_raw_fd();
            super::super::write_at(fd, &data, 0, 0).await.unwrap();
            let mut back = vec![0u8; 1 << 20];
            super::super::read_cached_at(fd, &mut back, 0)
                .await
                .unwrap();
            assert!(back == data, "a read on tmpfs returns the file's data");
        });
    }
}

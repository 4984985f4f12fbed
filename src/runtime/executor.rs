//! A single-threaded executor whose idle wait is the reactor's io_uring wait.

use super::reactor;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

type Task = Pin<Box<dyn Future<Output = ()>>>;

/// Task ids made runnable, possibly by other threads.
struct ReadyQueue {
    state: Mutex<ReadyState>,
    eventfd: i32,
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
            state.sleeping
        };
        if sleeping {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own for
            // the executor's lifetime (the waker keeps the queue alive; the
            // reactor outlives every executor on its thread).
            unsafe { libc::write(self.queue.eventfd, (&one as *const u64).cast(), 8) };
        }
    }
}

struct Executor {
    tasks: RefCell<Vec<Option<Task>>>,
    free: RefCell<Vec<usize>>,
    queue: Arc<ReadyQueue>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Executor>>> = const { RefCell::new(None) };
    static RUNNING: Cell<bool> = const { Cell::new(false) };
}

impl Executor {
    fn new() -> Rc<Self> {
        let eventfd = reactor::with(|r| r.eventfd());
        Rc::new(Executor {
            tasks: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
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
        let ids = std::mem::take(&mut self.queue.state.lock().unwrap().ids);
        let any = !ids.is_empty();
        for id in ids {
            // A task may be woken twice; the second time it may be gone.
            let Some(mut task) = self.tasks.borrow_mut().get_mut(id).and_then(Option::take) else {
                continue;
            };
            let waker = Waker::from(Arc::new(TaskWaker {
                id,
                queue: self.queue.clone(),
            }));
            match task.as_mut().poll(&mut Context::from_waker(&waker)) {
                Poll::Ready(()) => self.free.borrow_mut().push(id),
                Poll::Pending => self.tasks.borrow_mut()[id] = Some(task),
            }
        }
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
    block_on_with(|| false, future)
}

/// [`block_on`] for a thread that also serves another event source, such as
/// a ublk queue's own io_uring: `service` runs before every sleep, must not
/// block, and returns whether it woke any task. A task that awaits
/// [`super::poll_readable`] on that source's fd is what wakes the thread
/// when the source has work while it sleeps in this thread's ring.
pub fn block_on_with<F: Future>(mut service: impl FnMut() -> bool, future: F) -> F::Output {
    assert!(
        !RUNNING.with(|r| r.replace(true)),
        "nested runtime::block_on"
    );
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            RUNNING.with(|r| r.set(false));
            CURRENT.with(|c| c.borrow_mut().take());
        }
    }
    let _reset = Reset;

    let executor = Executor::new();
    CURRENT.with(|c| *c.borrow_mut() = Some(executor.clone()));
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
        if service() {
            continue;
        }
        executor.park();
    }
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

    /// A second ring stands in for a ublk queue's: its completion reaches
    /// a task only through the service hook, and the poll on its fd is what
    /// wakes the sleeping executor.
    #[test]
    fn a_foreign_ring_is_served_through_the_hook() {
        use io_uring::{opcode, types, IoUring};
        use std::os::fd::AsRawFd;
        let mut foreign = IoUring::new(8).unwrap();
        let timeout = types::Timespec::new().nsec(20_000_000);
        let entry = opcode::Timeout::new(&timeout).build().user_data(7);
        unsafe { foreign.submission().push(&entry).unwrap() };
        foreign.submit().unwrap();
        let fd = foreign.as_raw_fd();
        let seen = Rc::new(Cell::new(None));
        let signal = Rc::new(RefCell::new(None::<Waker>));
        let (seen2, signal2) = (seen.clone(), signal.clone());
        let service = move || {
            let Some(cqe) = foreign.completion().next() else {
                return false;
            };
            seen2.set(Some(cqe.user_data()));
            if let Some(w) = signal2.borrow_mut().take() {
                w.wake();
            }
            true
        };
        let got = block_on_with(service, async move {
            spawn(async move {
                // Re-armed until block_on drops it: that drop must cancel
                // the poll instead of waiting for it forever.
                while super::super::poll_readable(fd).await.is_ok() {}
            });
            std::future::poll_fn(|cx| match seen.get() {
                Some(v) => Poll::Ready(v),
                None => {
                    *signal.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await
        });
        assert_eq!(got, 7);
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
}

//! A few threads for the system calls io_uring cannot run asynchronously
//! (FICLONERANGE, which takes the source file's inode lock and waits for
//! every direct I/O in flight on it; a copy job's record, replaced with a
//! rename and fsyncs). Called on an I/O thread, such a call would stall
//! every request of that thread for its duration.
//!
//! Owns: a fixed set of worker threads, started at first use, and their
//! queue. Must never: run anything that waits on an I/O thread's progress
//! (a job runs to completion on its own; the caller only awaits it).

use futures::channel::oneshot;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// Jobs run at once; more wait in the queue. Clones of one origin take its
/// inode lock in turn anyway (a partition has at most two store writes in
/// flight), so more workers would only let more of them wait in the kernel;
/// two let one volume's clone proceed while another volume's waits.
const WORKERS: usize = 2;

fn queue() -> &'static Mutex<mpsc::Sender<Job>> {
    static QUEUE: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..WORKERS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("snapblk-blocking-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        // A job that panics drops its result's sender (its
                        // caller sees that); the worker lives on.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        Err(_) => return,
                    }
                })
                .expect("cannot start a thread for blocking calls");
        }
        Mutex::new(tx)
    })
}

/// Runs `f` on a worker thread and awaits its result, leaving the calling
/// thread free to serve other requests meanwhile.
pub async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    queue()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .expect("the blocking-call workers never stop");
    rx.await.expect("a blocking call panicked")
}

#[cfg(test)]
mod tests {
    use super::run_blocking;
    use crate::runtime::block_on;

    #[test]
    fn a_job_that_panics_leaves_the_workers_serving() {
        for _ in 0..super::WORKERS + 1 {
            let panicked = std::thread::spawn(|| block_on(run_blocking(|| panic!("job"))));
            assert!(panicked.join().is_err(), "the caller sees the panic");
        }
        assert_eq!(block_on(run_blocking(|| 7)), 7);
    }
}

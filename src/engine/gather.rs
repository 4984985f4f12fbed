//! Group execution: requests from concurrent callers gathered into batches,
//! at most a fixed number of batches running at once, each run by one of the
//! callers that queued it.
//!
//! Why (issue 10): a first write after a snapshot copies its chunk's old
//! content into the change log. Written one chunk at a time, those are
//! 64 KiB direct writes, and a virtio disk takes several times fewer bytes
//! per second in 64 KiB writes than in megabyte ones (README "The write
//! path"). While a batch is being written the next one gathers, so the
//! busier the volume, the larger its change-log writes; an idle volume
//! writes at once. This is the journal's group commit applied to data.
//!
//! Owns: the queue and the count of running batches. Must never: leave a
//! queued request without a runner (a runner that finishes hands the
//! queue to the oldest waiter, or runs it itself when that waiter is gone),
//! or make one caller run other callers' batches for as long as they keep
//! coming (it runs one batch, then hands over).

use futures::channel::oneshot;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;

pub struct Gather<T, R> {
    /// Batches running at once.
    runners: usize,
    /// A batch takes queued requests up to this weight (at least one).
    batch_weight: usize,
    state: Mutex<State<T, R>>,
}

struct State<T, R> {
    queued: VecDeque<Entry<T, R>>,
    running: usize,
}

struct Entry<T, R> {
    item: T,
    weight: usize,
    reply: oneshot::Sender<Turn<R>>,
}

enum Turn<R> {
    Done(R),
    /// Run the queue (it holds this caller's request), then wait here.
    Run(oneshot::Receiver<Turn<R>>),
}

/// Gives a runner's place back if its caller's future is dropped mid-run.
struct Running<'a, T, R> {
    gather: &'a Gather<T, R>,
    passed: bool,
}

impl<T, R> Drop for Running<'_, T, R> {
    fn drop(&mut self) {
        if !self.passed {
            self.gather.state.lock().unwrap().running -= 1;
        }
    }
}

impl<T, R> Gather<T, R> {
    pub fn new(runners: usize, batch_weight: usize) -> Self {
        Gather {
            runners: runners.max(1),
            batch_weight,
            state: Mutex::new(State {
                queued: VecDeque::new(),
                running: 0,
            }),
        }
    }

    /// Queues `item` and returns its result: `run` takes a batch of items
    /// (this one among them, in queue order) and returns one result per
    /// item, in the same order. None if the caller running this item's
    /// batch vanished before it finished.
    pub async fn submit<F, Fut>(&self, item: T, weight: usize, run: F) -> Option<R>
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<R>>,
    {
        let (reply, mut turn) = oneshot::channel();
        let runs_now = {
            let mut state = self.state.lock().unwrap();
            state.queued.push_back(Entry {
                item,
                weight,
                reply,
            });
            let free = state.running < self.runners;
            state.running += usize::from(free);
            free
        };
        if runs_now {
            self.run_one(&run).await;
        }
        loop {
            match turn.await {
                Ok(Turn::Done(result)) => return Some(result),
                Ok(Turn::Run(next)) => {
                    turn = next;
                    self.run_one(&run).await;
                }
                Err(_) => return None,
            }
        }
    }

    /// Runs the batch at the head of the queue, then hands the runner's
    /// place to the oldest waiter (or gives it back when none waits).
    async fn run_one<F, Fut>(&self, run: &F)
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<R>>,
    {
        let mut running = Running {
            gather: self,
            passed: false,
        };
        loop {
            let batch = self.take_batch();
            if batch.is_empty() {
                return;
            }
            let (items, replies): (Vec<T>, Vec<_>) =
                batch.into_iter().map(|e| (e.item, e.reply)).unzip();
            let results = run(items).await;
            debug_assert_eq!(results.len(), replies.len());
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Turn::Done(result));
            }
            let mut state = self.state.lock().unwrap();
            let Some(oldest) = state.queued.front_mut() else {
                return;
            };
            let (reply, turn) = oneshot::channel();
            let waiter = std::mem::replace(&mut oldest.reply, reply);
            running.passed = true;
            drop(state);
            if waiter.send(Turn::Run(turn)).is_ok() {
                return;
            }
            // That caller is gone (its request stays queued, answered to
            // nobody): run the queue ourselves.
            running.passed = false;
        }
    }

    fn take_batch(&self) -> Vec<Entry<T, R>> {
        let mut state = self.state.lock().unwrap();
        let mut weight = 0;
        let mut batch = Vec::new();
        while let Some(entry) = state.queued.front() {
            if !batch.is_empty() && weight + entry.weight > self.batch_weight {
                break;
            }
            weight += entry.weight;
            batch.push(state.queued.pop_front().expect("front exists"));
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Many callers on several threads: every one gets its own item back,
    /// no more than `runners` batches run at once, and batches form.
    #[test]
    fn every_request_is_answered_by_a_bounded_number_of_runners() {
        let gather = Arc::new(Gather::<u64, u64>::new(2, 8));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let batches = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (gather, running, most, batches) = (
                    gather.clone(),
                    running.clone(),
                    most.clone(),
                    batches.clone(),
                );
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let item = t * 1000 + i;
                        let got = crate::runtime::block_on(gather.submit(item, 1, |items| {
                            let (running, most, batches) = (&running, &most, &batches);
                            async move {
                                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                                most.fetch_max(now, Ordering::SeqCst);
                                batches.fetch_add(1, Ordering::SeqCst);
                                assert!(items.len() <= 8, "a batch over its weight");
                                std::thread::sleep(std::time::Duration::from_micros(200));
                                running.fetch_sub(1, Ordering::SeqCst);
                                items.iter().map(|x| x * 2).collect()
                            }
                        }));
                        assert_eq!(got, Some(item * 2));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(
            most.load(Ordering::SeqCst) <= 2,
            "more runners than allowed"
        );
        assert!(
            batches.load(Ordering::SeqCst) < 1600,
            "no request ever shared a batch"
        );
        assert_eq!(gather.state.lock().unwrap().running, 0);
        assert!(gather.state.lock().unwrap().queued.is_empty());
    }

    /// A caller whose future is dropped while queued does not strand the
    /// requests behind it: the runner that would have handed over to it runs
    /// them itself.
    #[test]
    fn a_vanished_waiter_does_not_strand_the_queue() {
        use futures::FutureExt;
        let gather = Gather::<u64, u64>::new(1, 1);
        let double = |items: Vec<u64>| async move { items.iter().map(|x| x * 2).collect() };
        crate::runtime::block_on(async {
            // Hold the only runner's place so the next requests queue.
            gather.state.lock().unwrap().running = 1;
            let mut kept = Box::pin(gather.submit(2, 1, double));
            assert!((&mut kept).now_or_never().is_none());
            let mut gone = Box::pin(gather.submit(1, 1, double));
            assert!((&mut gone).now_or_never().is_none());
            drop(gone);
            // The place comes free: the next caller runs 2, finds the
            // caller of 1 gone, runs 1 too, then its own 3.
            gather.state.lock().unwrap().running = 0;
            assert_eq!(gather.submit(3, 1, double).await, Some(6));
            assert_eq!(kept.await, Some(4));
        });
        assert_eq!(gather.state.lock().unwrap().running, 0);
    }
}

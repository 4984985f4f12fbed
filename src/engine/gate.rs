//! The write gate: how a snapshot sees a quiet instant without stopping reads.
//!
//! Every write holds a ticket from entering until its origin write is done;
//! the ticket carries the generation it runs in and the set of live snapshot
//! generations it must preserve for. A snapshot (or snapshot delete) pauses
//! the gate: new writes wait, in-flight ones drain, the generation and live
//! set change, and the gate reopens. Nothing slow (no flush, no journal
//! write) happens while paused, which keeps the stall to the drain time.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

struct State {
    generation: u64,
    live: Arc<Vec<u64>>,
    inflight: usize,
    paused: bool,
    entry_waiters: Vec<Waker>,
    drain_waiter: Option<Waker>,
}

pub struct Gate {
    state: Mutex<State>,
}

/// Held by one write for its whole duration.
pub struct Ticket<'a> {
    gate: &'a Gate,
    pub generation: u64,
    /// Sorted generations of the live snapshots.
    pub live: Arc<Vec<u64>>,
}

impl Ticket<'_> {
    /// Whether origin content born in generation `birth` must be preserved
    /// before this write overwrites it: some live snapshot closed a
    /// generation in `[birth, current)`.
    pub fn must_preserve(&self, birth: u64) -> bool {
        let first_at_or_after = self.live.partition_point(|&g| g < birth);
        self.live
            .get(first_at_or_after)
            .is_some_and(|&g| g < self.generation)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().unwrap();
        state.inflight -= 1;
        if state.inflight == 0 {
            if let Some(waker) = state.drain_waiter.take() {
                waker.wake();
            }
        }
    }
}

/// The gate held shut; writes resume when this is dropped.
pub struct Paused<'a> {
    gate: &'a Gate,
    started: std::time::Instant,
}

impl Paused<'_> {
    pub fn generation(&self) -> u64 {
        self.gate.state.lock().unwrap().generation
    }

    pub fn live(&self) -> Arc<Vec<u64>> {
        self.gate.state.lock().unwrap().live.clone()
    }

    pub fn set(&self, generation: u64, live: Vec<u64>) {
        let mut state = self.gate.state.lock().unwrap();
        state.generation = generation;
        state.live = Arc::new(live);
    }

    /// How long writes have been held so far.
    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut state = self.gate.state.lock().unwrap();
            state.paused = false;
            std::mem::take(&mut state.entry_waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }
}

impl Gate {
    pub fn new(generation: u64, live: Vec<u64>) -> Self {
        Gate {
            state: Mutex::new(State {
                generation,
                live: Arc::new(live),
                inflight: 0,
                paused: false,
                entry_waiters: Vec::new(),
                drain_waiter: None,
            }),
        }
    }

    pub fn generation(&self) -> u64 {
        self.state.lock().unwrap().generation
    }

    pub fn live(&self) -> Arc<Vec<u64>> {
        self.state.lock().unwrap().live.clone()
    }

    /// Waits until the gate is open, then registers one in-flight write.
    pub fn enter(&self) -> impl Future<Output = Ticket<'_>> {
        Enter { gate: self }
    }

    /// Closes the gate and waits for in-flight writes to finish. Callers
    /// serialize pauses among themselves (the volume's admin lock).
    pub async fn pause(&self) -> Paused<'_> {
        let started = std::time::Instant::now();
        {
            let mut state = self.state.lock().unwrap();
            assert!(!state.paused, "gate paused twice");
            state.paused = true;
        }
        Drain { gate: self }.await;
        Paused {
            gate: self,
            started,
        }
    }
}

struct Enter<'a> {
    gate: &'a Gate,
}

impl<'a> Future for Enter<'a> {
    type Output = Ticket<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ticket<'a>> {
        let mut state = self.gate.state.lock().unwrap();
        if state.paused {
            state.entry_waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        state.inflight += 1;
        Poll::Ready(Ticket {
            gate: self.gate,
            generation: state.generation,
            live: state.live.clone(),
        })
    }
}

struct Drain<'a> {
    gate: &'a Gate,
}

impl Future for Drain<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.gate.state.lock().unwrap();
        if state.inflight == 0 {
            return Poll::Ready(());
        }
        state.drain_waiter = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn must_preserve_exactly_when_a_live_snapshot_lies_in_birth_to_now() {
        let gate = Gate::new(10, vec![2, 5, 9]);
        let ticket = crate::runtime::block_on(gate.enter());
        assert!(ticket.must_preserve(0));
        assert!(ticket.must_preserve(5));
        assert!(ticket.must_preserve(9));
        assert!(!ticket.must_preserve(10));
        let gate = Gate::new(10, vec![]);
        assert!(!crate::runtime::block_on(gate.enter()).must_preserve(0));
    }
}

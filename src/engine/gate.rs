//! The write gate: how a snapshot sees a quiet instant without stopping reads.
//!
//! The gate publishes an [`Epoch`]: the current generation and the live
//! snapshot generations. A write first preserves what that epoch requires
//! (which may wait for a journal commit, i.e. a flush), then takes a
//! [`Ticket`] for just its origin write; if the epoch changed in between, it
//! preserves again for the new one. A snapshot (or snapshot delete) pauses the
//! gate: new tickets wait, tickets in flight drain, the epoch changes, and the
//! gate reopens. Only origin writes are drained, never journal flushes, which
//! keeps the stall to the time of a few buffered writes.
//!
//! While no write needs preparing (no hooks, no live snapshot) and the gate
//! is open, a write enters through [`Gate::enter_open`]: one atomic counter
//! instead of the state's lock, taken twice per write, and the epoch's
//! reference count. A pause closes that way in before it drains, and the
//! drain waits for both kinds of ticket.

use super::hooks::{ChunkSet, WriteHook};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// The state a write's copy-on-write decisions are made against. Every
/// write takes one, so it is a single shared pointer: cloning it is one
/// atomic increment.
#[derive(Clone)]
pub struct Epoch(Arc<EpochState>);

#[derive(Clone)]
pub struct EpochState {
    /// Changes with every pause that changes the state (never repeats).
    pub id: u64,
    pub generation: u64,
    /// Sorted generations of the live snapshots.
    pub live: Vec<u64>,
    /// Live generations whose only reader has given some chunks back.
    pub released: Vec<(u64, Arc<ChunkSet>)>,
    pub hooks: Vec<Arc<dyn WriteHook>>,
}

impl std::ops::Deref for Epoch {
    type Target = EpochState;
    fn deref(&self) -> &EpochState {
        &self.0
    }
}

impl EpochState {
    /// Whether a write under this epoch has nothing to do before its origin
    /// write: no hook to run, no snapshot to preserve for.
    fn is_plain(&self) -> bool {
        self.hooks.is_empty() && self.live.is_empty()
    }

    /// Whether origin content of `chunk` born in generation `birth` must be
    /// preserved before a write of this epoch overwrites it: some live
    /// snapshot closed a generation in `[birth, current)` and still wants it.
    pub fn must_preserve(&self, chunk: u64, birth: u64) -> bool {
        let first_at_or_after = self.live.partition_point(|&g| g < birth);
        self.live[first_at_or_after..]
            .iter()
            .take_while(|&&g| g < self.generation)
            .any(|&g| !self.was_released(g, chunk))
    }

    fn was_released(&self, generation: u64, chunk: u64) -> bool {
        self.released
            .iter()
            .any(|(g, set)| *g == generation && set.contains(chunk))
    }
}

struct State {
    epoch: Epoch,
    inflight: usize,
    paused: bool,
    entry_waiters: Vec<Waker>,
    drain_waiter: Option<Waker>,
}

impl State {
    /// Wakes a waiting drain once no ticket taken under the lock is left;
    /// the drain checks the open tickets itself when it runs.
    fn wake_drain_if_no_ticket_under_lock(&mut self) {
        if self.inflight == 0 {
            if let Some(waker) = self.drain_waiter.take() {
                waker.wake();
            }
        }
    }
}

pub struct Gate {
    state: Mutex<State>,
    /// [`OpenTicket`]s in flight, plus [`CLOSED`] while the way in without
    /// the lock is shut: the gate is paused, or the epoch has hooks or a
    /// live snapshot. Changed with the state's lock held, except by the
    /// open tickets themselves.
    open: AtomicU64,
}

const CLOSED: u64 = 1 << 63;

/// A write's ticket taken without the state's lock ([`Gate::enter_open`]):
/// its epoch asked nothing of it, and a pause waits for it all the same.
pub struct OpenTicket<'a> {
    gate: &'a Gate,
}

impl Drop for OpenTicket<'_> {
    fn drop(&mut self) {
        self.gate.leave_open();
    }
}

/// Held by one write for the duration of its origin write.
pub struct Ticket<'a> {
    gate: &'a Gate,
    pub epoch_id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().unwrap();
        state.inflight -= 1;
        state.wake_drain_if_no_ticket_under_lock();
    }
}

/// The gate held shut; writes resume when this is dropped.
pub struct Paused<'a> {
    gate: &'a Gate,
    started: std::time::Instant,
}

impl Paused<'_> {
    pub fn epoch(&self) -> Epoch {
        self.gate.state.lock().unwrap().epoch.clone()
    }

    /// Sets the generation and live snapshots; released sets of generations
    /// no longer live go with them.
    pub fn set(&self, generation: u64, live: Vec<u64>) {
        self.change(|epoch| {
            let released = epoch
                .released
                .iter()
                .filter(|(g, _)| live.binary_search(g).is_ok())
                .cloned()
                .collect();
            epoch.generation = generation;
            epoch.live = live;
            epoch.released = released;
        });
    }

    /// Changes the epoch in place; writes that prepared under the old one
    /// prepare again.
    pub fn change(&self, f: impl FnOnce(&mut EpochState)) {
        let mut state = self.gate.state.lock().unwrap();
        let epoch = Arc::make_mut(&mut state.epoch.0);
        f(epoch);
        epoch.id += 1;
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
            if state.epoch.is_plain() {
                self.gate.open.fetch_and(!CLOSED, Ordering::SeqCst);
            }
            std::mem::take(&mut state.entry_waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }
}

impl Gate {
    pub fn new(generation: u64, live: Vec<u64>) -> Self {
        let open = AtomicU64::new(if live.is_empty() { 0 } else { CLOSED });
        Gate {
            open,
            state: Mutex::new(State {
                epoch: Epoch(Arc::new(EpochState {
                    id: 0,
                    generation,
                    live,
                    released: Vec::new(),
                    hooks: Vec::new(),
                })),
                inflight: 0,
                paused: false,
                entry_waiters: Vec::new(),
                drain_waiter: None,
            }),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.state.lock().unwrap().epoch.clone()
    }

    /// The current epoch's id (cheaper than [`Gate::epoch`]).
    pub fn epoch_id(&self) -> u64 {
        self.state.lock().unwrap().epoch.id
    }

    /// The common write's way in, without the state's lock: a ticket if the
    /// gate is open and the epoch asks nothing of a write before its origin
    /// write (no hooks, no live snapshot). `None`: take [`Gate::enter`].
    pub fn enter_open(&self) -> Option<OpenTicket<'_>> {
        // Counted before the check: a pause that closes the gate after this
        // sees the count and waits for the ticket; one that closed it
        // before is seen here, and the count is given back.
        let ticket = OpenTicket { gate: self };
        if self.open.fetch_add(1, Ordering::SeqCst) & CLOSED != 0 {
            return None; // the ticket's drop gives the count back
        }
        Some(ticket)
    }

    fn leave_open(&self) {
        // The last open ticket of a closed gate may be what a drain waits
        // for; the lock orders this against the drain's check.
        if self.open.fetch_sub(1, Ordering::SeqCst) == CLOSED | 1 {
            self.state
                .lock()
                .unwrap()
                .wake_drain_if_no_ticket_under_lock();
        }
    }

    /// Waits until the gate is open, then registers one in-flight origin write.
    pub fn enter(&self) -> impl Future<Output = Ticket<'_>> {
        Enter { gate: self }
    }

    /// Closes the gate and waits for in-flight origin writes to finish.
    /// Callers serialize pauses among themselves (the volume's admin lock).
    pub async fn pause(&self) -> Paused<'_> {
        let started = std::time::Instant::now();
        {
            let mut state = self.state.lock().unwrap();
            assert!(!state.paused, "gate paused twice");
            state.paused = true;
            self.open.fetch_or(CLOSED, Ordering::SeqCst);
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
            epoch_id: state.epoch.id,
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
        if state.inflight == 0 && self.gate.open.load(Ordering::SeqCst) == CLOSED {
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
        let epoch = Gate::new(10, vec![2, 5, 9]).epoch();
        assert!(epoch.must_preserve(0, 0));
        assert!(epoch.must_preserve(0, 5));
        assert!(epoch.must_preserve(0, 9));
        assert!(!epoch.must_preserve(0, 10));
        assert!(!Gate::new(10, vec![]).epoch().must_preserve(0, 0));
    }

    #[test]
    fn a_released_chunk_is_preserved_only_for_snapshots_that_still_want_it() {
        let gate = Gate::new(10, vec![5, 9]);
        let set = Arc::new(ChunkSet::new(8));
        set.insert(3);
        crate::runtime::block_on(async {
            let paused = gate.pause().await;
            paused.change(|e| e.released = vec![(9, set.clone())]);
        });
        let epoch = gate.epoch();
        assert!(
            !epoch.must_preserve(3, 6),
            "only 9 needs it, and 9 gave it back"
        );
        assert!(epoch.must_preserve(4, 6), "9 still wants chunk 4");
        assert!(epoch.must_preserve(3, 0), "5 still wants chunk 3");
        crate::runtime::block_on(async { gate.pause().await.set(10, vec![5]) });
        assert!(gate.epoch().released.is_empty(), "9 is gone, so is its set");
    }

    #[test]
    fn the_lock_free_entry_is_only_for_an_open_gate_with_nothing_to_prepare() {
        struct Nothing;
        impl WriteHook for Nothing {
            fn before_write(
                &self,
                _: u64,
                _: u64,
            ) -> futures::future::BoxFuture<
                '_,
                crate::engine::Result<super::super::hooks::WriteGuard>,
            > {
                unreachable!()
            }
            fn after_write(
                &self,
                _: &mut super::super::hooks::WriteGuard,
                _: u64,
                _: super::super::hooks::Change<'_>,
            ) {
            }
        }
        let gate = Gate::new(1, vec![]);
        crate::runtime::block_on(async {
            let ticket = gate.enter_open().expect("open, nothing to prepare");
            // Its ticket counts: a pause waits for it, and so does one that
            // also waits for a ticket taken under the lock.
            let locked = gate.enter().await;
            let mut pause = Box::pin(gate.pause());
            assert!(futures::poll!(pause.as_mut()).is_pending());
            drop(locked);
            assert!(futures::poll!(pause.as_mut()).is_pending());
            assert!(gate.enter_open().is_none(), "a pause closed the way in");
            assert!(futures::poll!(pause.as_mut()).is_pending());
            drop(ticket);
            let paused = pause.await;
            assert!(gate.enter_open().is_none(), "the gate is paused");
            paused.set(2, vec![1]);
            drop(paused);
            assert!(gate.enter_open().is_none(), "a live snapshot");
            gate.pause().await.set(3, vec![]);
            assert!(gate.enter_open().is_some());
            gate.pause()
                .await
                .change(|e| e.hooks.push(Arc::new(Nothing)));
            assert!(gate.enter_open().is_none(), "a write hook");
            gate.pause().await.change(|e| e.hooks.clear());
            let ticket = gate.enter_open().expect("open again");
            // The drain is woken by the last open ticket, not only polled.
            // (join! polls the pause first, so it is waiting when the
            // ticket goes.)
            let paused_once = std::cell::Cell::new(false);
            let pausing = async {
                drop(gate.pause().await);
                paused_once.set(true);
            };
            let releasing = async {
                assert!(!paused_once.get(), "the pause waits for the ticket");
                drop(ticket);
            };
            futures::join!(pausing, releasing);
            assert!(paused_once.get());
        });
        assert!(
            Gate::new(5, vec![4]).enter_open().is_none(),
            "a gate made with a live snapshot starts closed"
        );
    }

    #[test]
    fn a_pause_changes_the_epoch_and_waits_for_tickets() {
        let gate = Gate::new(1, vec![]);
        crate::runtime::block_on(async {
            let before = gate.epoch().id;
            {
                let ticket = gate.enter().await;
                assert_eq!(ticket.epoch_id, before);
            }
            let paused = gate.pause().await;
            paused.set(2, vec![1]);
            drop(paused);
            let ticket = gate.enter().await;
            assert_ne!(ticket.epoch_id, before);
            assert_eq!(gate.epoch().generation, 2);
        });
    }
}

//! What other subsystems may attach to a volume's write path: write hooks
//! (copy jobs' `hold`/`direct` policies, replication's write log) and
//! released chunk sets (a copy job giving back the chunks of its private
//! snapshot that it has durably copied, seed 001's "writes to ranges already
//! copied go straight through").
//!
//! Hooks are part of the write gate's epoch: installing or removing one
//! pauses the gate, so every write either ran the new hook set before its
//! origin write or was drained before the change took effect.

use super::error::Result;
use futures::future::BoxFuture;
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a write changes, as passed to [`WriteHook::after_write`].
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    Data(&'a [u8]),
    /// Discard or write-zeroes of this many bytes: reads back as zeros.
    Zeroes(u64),
}

impl Change<'_> {
    pub fn len(&self) -> u64 {
        match self {
            Change::Data(data) => data.len() as u64,
            Change::Zeroes(len) => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Held by a write from [`WriteHook::before_write`] until after
/// [`WriteHook::after_write`]; a hook keeps whatever it needs in it (a range
/// lock, for instance) and learns the write ended when it is dropped.
pub type WriteGuard = Option<Box<dyn Any + Send>>;

/// Sits in a volume's write path (writes, discards and write-zeroes of the
/// live volume; never reads).
pub trait WriteHook: Send + Sync {
    /// Runs before the write touches the origin, outside the gate: it may wait
    /// (a `hold` copy job) or do I/O (a `direct` copy job). An error fails
    /// this one write. If a snapshot or another hook change happens while it
    /// runs, the write drops the guard and asks again under the new epoch.
    fn before_write(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<WriteGuard>>;

    /// The change reached the origin and is not acknowledged yet; the write
    /// still holds its gate ticket, so a pause sees every earlier write here.
    /// `guard` is what `before_write` gave this write (dropped right after),
    /// so a hook can finish its bookkeeping here in one step and leave its
    /// guard's drop only a write that never got this far.
    /// Must not block or fail: a slow consumer falls back on its own.
    fn after_write(&self, guard: &mut WriteGuard, offset: u64, change: Change<'_>);
}

/// A set of chunk indexes, shared between the engine and one consumer, that
/// only ever grows while the consumer lives.
pub struct ChunkSet {
    words: Vec<AtomicU64>,
}

impl ChunkSet {
    pub fn new(chunks: u64) -> Self {
        ChunkSet {
            words: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    pub fn insert(&self, chunk: u64) {
        if let Some(word) = self.words.get((chunk / 64) as usize) {
            word.fetch_or(1 << (chunk % 64), Ordering::Release);
        }
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
    }

    pub fn contains(&self, chunk: u64) -> bool {
        self.words
            .get((chunk / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_set_remembers_inserted_chunks_only() {
        let set = ChunkSet::new(130);
        set.insert(0);
        set.insert(129);
        set.insert(5000);
        assert!(set.contains(0) && set.contains(129));
        assert!(!set.contains(1) && !set.contains(64) && !set.contains(5000));
    }
}

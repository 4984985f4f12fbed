//! The source's persistent write-intent dirty map (md/DRBD style): one bit
//! per region (64 KiB, or one block if blocks are larger; the caller maps
//! blocks to regions), set durably *before* the first write to a clean
//! block reaches the origin, cleared only after the destination acknowledged
//! a consistency point that covers the block. After a kill -9 of the source,
//! a broken link or a full log, the set bits are exactly what resync sends.
//!
//! File: `DATA_DIR/replication/VOL.dirty`, the raw bitmap (little-endian
//! 64-bit words). It is rewritten whole by one flusher at a time from a copy
//! of the in-memory map taken when that flush starts, so the file always
//! holds a map at least as new as every flush that completed; requests that
//! arrive during a flush share the next one (group commit). A torn rewrite
//! can only mix sectors of two maps that both hold every bit whose write
//! proceeded, so no checksum is needed. A file of the wrong size (a volume
//! resized under us) is read as "everything dirty".
//!
//! A write may proceed only once its regions' bits are durable, also when
//! an earlier write set a bit that is still on its way to disk: [`DirtyMap::mark`]
//! then returns the generation that set it, so the second write waits for
//! the same flush instead of racing ahead of it (a power cut could
//! otherwise lose the bit of an acknowledged write).

use crate::runtime;
use std::collections::HashMap;
use std::fs::File;
use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;
use std::task::{Poll, Waker};

pub struct DirtyMap {
    file: File,
    blocks: u64,
    state: Mutex<State>,
}

struct State {
    bits: Vec<u64>,
    /// Bumped by every change of `bits`.
    generation: u64,
    /// The newest generation known to be on disk.
    durable: u64,
    /// Bits set in memory by a generation not known to be on disk yet:
    /// region -> that generation.
    pending: HashMap<u64, u64>,
    flushing: bool,
    waiters: Vec<Waker>,
}

impl DirtyMap {
    /// Opens (or creates, all clean) the map of `blocks` blocks at `path`.
    pub fn open(path: &Path, blocks: u64) -> io::Result<DirtyMap> {
        let words = blocks.div_ceil(64) as usize;
        let mut bits = vec![0u64; words];
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if existed {
            let bytes = std::fs::read(path)?;
            if bytes.len() == words * 8 {
                for (w, b) in bits.iter_mut().zip(bytes.chunks_exact(8)) {
                    *w = u64::from_le_bytes(b.try_into().unwrap());
                }
            } else {
                log::warn!(
                    "{}: {} bytes where {} were expected; treating every block as changed",
                    path.display(),
                    bytes.len(),
                    words * 8
                );
                (0..blocks).for_each(|b| bits[(b / 64) as usize] |= 1 << (b % 64));
            }
        }
        let map = DirtyMap {
            file,
            blocks,
            state: Mutex::new(State {
                bits,
                generation: 1,
                durable: 0,
                pending: HashMap::new(),
                flushing: false,
                waiters: Vec::new(),
            }),
        };
        // Persist the initial state (the file may be new or resized).
        runtime::block_on(map.make_durable(1))?;
        Ok(map)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the bits of blocks `first..=last`; returns the generation to make
    /// durable before the write may proceed if any bit was clear or is set
    /// but not durable yet.
    pub fn mark(&self, first: u64, last: u64) -> Option<u64> {
        let mut s = self.lock();
        let s = &mut *s;
        let next = s.generation + 1;
        let mut changed = false;
        let mut wait = 0;
        for b in first..=last.min(self.blocks.saturating_sub(1)) {
            let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
            if s.bits[w] & m == 0 {
                s.bits[w] |= m;
                s.pending.insert(b, next);
                changed = true;
            } else if let Some(&g) = s.pending.get(&b) {
                if g > s.durable {
                    wait = wait.max(g);
                }
            }
        }
        if changed {
            s.generation = next;
            return Some(next);
        }
        (wait > 0).then_some(wait)
    }

    /// Clears the given blocks' bits; returns the generation to make durable.
    pub fn clear(&self, blocks: impl IntoIterator<Item = u64>) -> u64 {
        let mut s = self.lock();
        for b in blocks {
            if b < self.blocks {
                s.bits[(b / 64) as usize] &= !(1u64 << (b % 64));
                s.pending.remove(&b);
            }
        }
        s.generation += 1;
        s.generation
    }

    /// Every set bit, in block order.
    pub fn dirty_blocks(&self) -> Vec<u64> {
        let s = self.lock();
        let mut out = Vec::new();
        for (i, &w) in s.bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                out.push(i as u64 * 64 + bit);
                w &= w - 1;
            }
        }
        out
    }

    /// Returns once generation `target` (or a newer one) is on disk; at most
    /// one flush runs at a time, the others wait for it and share the next.
    /// Runs on the calling thread's [`runtime`] ring.
    pub async fn make_durable(&self, target: u64) -> io::Result<()> {
        loop {
            let snapshot = poll_fn(|cx| {
                let mut s = self.lock();
                if s.durable >= target {
                    return Poll::Ready(None);
                }
                if s.flushing {
                    s.waiters.push(cx.waker().clone());
                    return Poll::Pending;
                }
                s.flushing = true;
                let bytes: Vec<u8> = s.bits.iter().flat_map(|w| w.to_le_bytes()).collect();
                Poll::Ready(Some((s.generation, bytes)))
            })
            .await;
            let Some((generation, bytes)) = snapshot else {
                return Ok(());
            };
            let fd = self.file.as_raw_fd();
            let written = async {
                runtime::write_at(fd, &bytes, 0, 0).await?;
                runtime::fsync(fd, true).await
            }
            .await;
            let waiters = {
                let mut s = self.lock();
                s.flushing = false;
                if written.is_ok() {
                    s.durable = s.durable.max(generation);
                    let durable = s.durable;
                    s.pending.retain(|_, g| *g > durable);
                }
                std::mem::take(&mut s.waiters)
            };
            waiters.into_iter().for_each(Waker::wake);
            written?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_survive_reopen_and_clear() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("v.dirty");
        let map = DirtyMap::open(&path, 130).unwrap();
        let g = map.mark(3, 5).unwrap();
        runtime::block_on(map.make_durable(g)).unwrap();
        assert!(
            map.mark(4, 4).is_none(),
            "already durable: nothing to flush"
        );
        map.mark(129, 129);
        drop(map);
        let map = DirtyMap::open(&path, 130).unwrap();
        assert_eq!(
            map.dirty_blocks(),
            vec![3, 4, 5],
            "129 was never made durable"
        );
        let g = map.clear([4]);
        runtime::block_on(map.make_durable(g)).unwrap();
        drop(map);
        let map = DirtyMap::open(&path, 130).unwrap();
        assert_eq!(map.dirty_blocks(), vec![3, 5]);
        assert_eq!(map.dirty_blocks().len(), 2);
        drop(map);
        let map = DirtyMap::open(&path, 200).unwrap();
        assert_eq!(map.dirty_blocks().len(), 200, "a resized map is all dirty");
    }

    /// Two writes into one clean region: the second must not proceed before
    /// the bit the first one set is durable, though it finds the bit set.
    /// Dropping the map without its flush is the power cut that loses
    /// whatever was not durable.
    #[test]
    fn a_second_write_waits_for_the_bit_the_first_one_set() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("v.dirty");
        let map = DirtyMap::open(&path, 16).unwrap();
        let first = map.mark(5, 5).expect("a clear bit: flush");
        let second = map
            .mark(5, 5)
            .expect("set in memory only: the second write must wait too");
        assert_eq!(second, first, "the same flush covers both");
        let other = map.mark(6, 7).unwrap();
        assert!(other > first);
        assert_eq!(
            map.mark(5, 6),
            Some(other),
            "the newest pending bit of the range"
        );
        // The second write proceeds only after this; then the power cut.
        runtime::block_on(map.make_durable(second)).unwrap();
        assert_eq!(map.mark(5, 5), None, "durable now: nothing to wait for");
        drop(map);
        let map = DirtyMap::open(&path, 16).unwrap();
        assert!(
            map.dirty_blocks().contains(&5),
            "the region of an acknowledged write is still dirty after the power cut"
        );
    }
}

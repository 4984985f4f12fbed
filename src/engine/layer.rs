//! A clone's layer over its parent snapshot: which chunks the clone owns
//! (its origin holds them), and reads that fall through to the parent
//! snapshot for every chunk it does not own yet.
//!
//! A chunk becomes owned by a copy-up: the parent's content of the whole
//! chunk is written into the clone's origin (a hole is punched instead when
//! the parent reads zeros there), and only then is the chunk marked owned.
//! So the clone's origin holds the chunk's full content before anything
//! reads it there, and a write that follows changes only what it covers.
//!
//! Durability: ownership is kept in `owned.map`, one bit per chunk, and bits
//! only ever go from 0 to 1, so a torn write of a map page loses at most
//! bits that were not durable yet. A bit may reach the map only after the
//! copy-up it stands for is durable in the origin, or a crash would leave an
//! owned chunk whose origin never got the parent's content: newly owned
//! chunks wait in `pending` until a FLUSH (or FUA write, or snapshot) takes
//! them, flushes the origin and then writes their bits
//! ([`Layer::take_pending`], [`Layer::record`]), one such flusher at a time
//! ([`Layer::lock_map`]): a FUA write to a chunk whose bit is not durable yet
//! flushes too, and must not return while another flusher that took the
//! bit is still writing it. A bit lost at a crash only
//! means the chunk reads from the parent again, which is what it held at
//! the last FLUSH (its copy-up and later writes were not flushed).
//!
//! Must never: mark a chunk owned before its origin holds the chunk's
//! content, or write a bit to the map before the origin flush that covers
//! its copy-up.

use super::error::Result;
use super::hooks::ChunkSet;
use super::volume::{View, Volume};
use crate::backend::{Backend, Extent, Reuse, Storage};
use crate::runtime::AlignedBuf;
use futures::channel::oneshot;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub const OWNED_MAP: &str = "owned.map";
/// Map pages are written whole: a page of bits covers 32768 chunks.
const MAP_PAGE: usize = 4096;

/// The bytes of an ownership map for `chunks` chunks (whole pages).
pub fn map_len(chunks: u64) -> u64 {
    (chunks.div_ceil(8)).div_ceil(MAP_PAGE as u64) * MAP_PAGE as u64
}

/// Held by the one flusher of a layer's map (see [`Layer::lock_map`]).
pub struct MapGuard<'a>(futures::lock::MutexGuard<'a, Vec<u8>>);

pub struct Layer {
    /// The parent snapshot's image.
    parent: View,
    chunk_shift: u32,
    chunks: u64,
    owned: ChunkSet,
    map: Backend,
    /// Chunks owned since the last [`Layer::take_pending`].
    pending: Mutex<Vec<u64>>,
    /// Chunks whose bit is durable in the map.
    durable: ChunkSet,
    /// The bits the map file holds (or is being given); held by the one
    /// flusher at a time.
    recorded: futures::lock::Mutex<Vec<u8>>,
    /// Chunks being copied up now, with the writers waiting for it.
    copying: Mutex<HashMap<u64, Vec<oneshot::Sender<()>>>>,
    /// Unpins the parent snapshot when the layer goes (clone deleted or
    /// flattened).
    _pin: Pin,
}

struct Pin {
    parent: Arc<Volume>,
    clone: String,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.parent.unpin_clone(&self.clone);
    }
}

impl Layer {
    /// Opens the layer of clone `clone` over `parent` (a snapshot view),
    /// reading its ownership map from `storage`.
    pub async fn open(
        clone: &str,
        storage: &Storage,
        parent: View,
        chunk_size: u32,
        size: u64,
    ) -> Result<Layer> {
        let chunk_shift = chunk_size.trailing_zeros();
        let chunks = size.div_ceil(chunk_size as u64);
        let map = storage.open(OWNED_MAP, false)?;
        let len = map_len(chunks) as usize;
        let mut recorded = vec![0u8; len];
        let have = (map.size()? as usize).min(len);
        map.read_at(&mut recorded[..have], 0).await?;
        let owned = ChunkSet::new(chunks);
        let durable = ChunkSet::new(chunks);
        for chunk in 0..chunks {
            if recorded[(chunk / 8) as usize] & (1 << (chunk % 8)) != 0 {
                owned.insert(chunk);
                durable.insert(chunk);
            }
        }
        let generation = parent.generation().unwrap_or(u64::MAX);
        parent.volume().pin_clone(clone, generation);
        Ok(Layer {
            _pin: Pin {
                parent: parent.volume().clone(),
                clone: clone.to_string(),
            },
            parent,
            chunk_shift,
            chunks,
            owned,
            map,
            pending: Mutex::new(Vec::new()),
            durable,
            recorded: futures::lock::Mutex::new(recorded),
            copying: Mutex::new(HashMap::new()),
        })
    }

    pub fn owns(&self, chunk: u64) -> bool {
        self.owned.contains(chunk)
    }

    /// How many chunks the clone owns.
    pub fn owned_chunks(&self) -> u64 {
        self.owned.count()
    }

    /// The first chunk at or after `from` that the clone does not own.
    pub fn next_unowned(&self, from: u64) -> Option<u64> {
        (from..self.chunks).find(|&c| !self.owns(c))
    }

    /// Runs of `[offset, offset + len)` split where ownership changes:
    /// (offset, len, owned).
    fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let chunk = pos >> self.chunk_shift;
            let end = ((chunk + 1) << self.chunk_shift).min(offset + len);
            let owned = self.owns(chunk);
            match out.last_mut() {
                Some(last) if last.2 == owned => last.1 += end - pos,
                _ => out.push((pos, end - pos, owned)),
            }
            pos = end;
        }
        out
    }

    /// Reads the clone's base image: owned chunks from `origin`, the rest
    /// from the parent snapshot.
    pub async fn read(
        &self,
        origin: &Backend,
        buf: &mut [u8],
        offset: u64,
        reuse: Reuse,
    ) -> Result<()> {
        for (pos, len, owned) in self.runs(offset, buf.len() as u64) {
            let piece = &mut buf[(pos - offset) as usize..(pos - offset + len) as usize];
            if owned {
                origin.read(piece, pos, reuse).await?;
            } else {
                // Boxed: a parent may itself be a clone (its reads recurse).
                Box::pin(self.parent.read_with(pos, piece, reuse)).await?;
            }
        }
        Ok(())
    }

    /// The base image's allocation map (see [`Layer::read`]).
    pub fn extents(&self, origin: &Backend, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        for (pos, len, owned) in self.runs(offset, len) {
            if owned {
                out.extend(origin.extents(pos, len)?);
            } else {
                out.extend(self.parent.block_status(pos, len)?);
            }
        }
        Ok(out)
    }

    /// True if every chunk of the range is owned (reads the clone's origin).
    pub fn owns_range(&self, offset: u64, len: u64) -> bool {
        self.runs(offset, len).iter().all(|r| r.2)
    }

    /// Copies up every chunk of the range the clone does not own yet (see
    /// the module docs); returns whether the ownership of any chunk of the
    /// range is not durable yet (a FUA write over it must make it so).
    pub async fn own(&self, origin: &Backend, offset: u64, len: u64) -> Result<bool> {
        let first = offset >> self.chunk_shift;
        let last = (offset + len.max(1) - 1) >> self.chunk_shift;
        for chunk in first..=last {
            self.own_chunk(origin, chunk).await?;
        }
        Ok((first..=last).any(|c| !self.durable.contains(c)))
    }

    async fn own_chunk(&self, origin: &Backend, chunk: u64) -> Result<()> {
        loop {
            if self.owns(chunk) {
                return Ok(());
            }
            let wait = {
                let mut copying = self.copying.lock().unwrap();
                match copying.get_mut(&chunk) {
                    Some(waiters) => {
                        let (tx, rx) = oneshot::channel();
                        waiters.push(tx);
                        rx
                    }
                    None => {
                        copying.insert(chunk, Vec::new());
                        break;
                    }
                }
            };
            // Done or failed: look again.
            let _ = wait.await;
        }
        let result = if self.owns(chunk) {
            Ok(())
        } else {
            let copied = self.copy_up(origin, chunk).await;
            if copied.is_ok() {
                self.owned.insert(chunk);
                self.pending.lock().unwrap().push(chunk);
            }
            copied
        };
        let waiters = self
            .copying
            .lock()
            .unwrap()
            .remove(&chunk)
            .unwrap_or_default();
        for waiter in waiters {
            let _ = waiter.send(());
        }
        result
    }

    async fn copy_up(&self, origin: &Backend, chunk: u64) -> Result<()> {
        let offset = chunk << self.chunk_shift;
        let size = self.parent.size();
        let len = (1u64 << self.chunk_shift).min(size - offset);
        // A hole is punched even where the origin has one: an earlier
        // copy-up whose bit was lost at a crash may have left data there.
        if self
            .parent
            .block_status(offset, len)?
            .iter()
            .all(|e| !e.data)
        {
            origin.punch_hole(offset, len).await?;
            return Ok(());
        }
        let mut data = AlignedBuf::zeroed(len as usize);
        Box::pin(self.parent.read(offset, &mut data)).await?;
        origin.write_at(&data, offset, false).await?;
        Ok(())
    }

    /// Makes the caller the one flusher of the map until the guard drops.
    pub async fn lock_map(&self) -> MapGuard<'_> {
        MapGuard(self.recorded.lock().await)
    }

    /// Takes the chunks owned since the last call. The caller (holding
    /// [`Layer::lock_map`]) flushes the origin, then hands them to
    /// [`Layer::record`] (or back with [`Layer::requeue`] if the flush failed).
    pub fn take_pending(&self) -> Vec<u64> {
        std::mem::take(&mut *self.pending.lock().unwrap())
    }

    pub fn requeue(&self, chunks: Vec<u64>) {
        self.pending.lock().unwrap().extend(chunks);
    }

    /// Writes the bits of `chunks` (whose copy-ups are durable) to the map
    /// and flushes it.
    pub async fn record(&self, map: &mut MapGuard<'_>, chunks: Vec<u64>) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let recorded = &mut map.0;
        let mut pages: Vec<usize> = Vec::new();
        for &chunk in &chunks {
            recorded[(chunk / 8) as usize] |= 1 << (chunk % 8);
            pages.push((chunk / 8) as usize / MAP_PAGE);
        }
        pages.sort_unstable();
        pages.dedup();
        let written = async {
            for page in pages {
                let bytes = &recorded[page * MAP_PAGE..(page + 1) * MAP_PAGE];
                self.map
                    .write_at(bytes, (page * MAP_PAGE) as u64, false)
                    .await?;
            }
            self.map.flush().await
        }
        .await;
        if let Err(e) = written {
            self.requeue(chunks);
            return Err(e.into());
        }
        chunks.iter().for_each(|&c| self.durable.insert(c));
        Ok(())
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }
}

//! A replica's staging area (`DEST.staging/`): transfers as they arrive and
//! the CP records that refer to them, until the CP is applied.
//!
//! Transfers are appended to segment files, `r-<first tid>` (a record is
//! `len | crc32c | payload`, its checksum seeded with the segment's id; a
//! new segment starts every [`SEGMENT_BYTES`]), acknowledged once written
//! and made durable with the next CP record ([`Staging::stage_cp`]), the
//! first thing that can refer to them after a crash: one sync per CP, not
//! per transfer. A file per transfer cost an inode allocation each (ext4
//! also skips inodes freed seconds ago, and a CP frees thousands) and held a
//! descriptor each until the CP, which a fast writer with a long CP interval
//! ran out of. Reading back at start, a segment ends at its first record
//! that fails its check (a torn append that no durable CP record can refer
//! to).
//!
//! Segments a CP no longer needs are kept as spares (`spare-<old id>`) and
//! the next segments overwrite them in place: a buffered write into blocks
//! the file already has allocates none, and the CP's sync then commits no
//! allocations (fio here: 1M buffered writes at 4.5 GB/s over a cached
//! file, 0.6 GB/s into a new one). In bench-repl's replicated 4k random
//! writes, with both daemons on one disk, the source wrote about 13% more.
//! The seed makes a reused file's old records fail their check, so it
//! still ends at its first record not written under its present name.
//! Spares not reused by the time the next CP is applied are deleted: the
//! pool holds about one CP interval of transfers, what staging held anyway.
//!
//! From earlier versions, unseeded segments (`s-<first tid>`) and transfer
//! files (`t-<tid>`: `crc32c | payload`) are still read, so a CP whose apply
//! a crash cut short is finished after an upgrade.
//!
//! Owns: the files under the directory, the transfer index, their sync.
//! Never: decides what a CP means or writes the replica volume (dest.rs).

use super::wire::{self, Piece};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// A new segment file is started once the open one holds this much.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Writeback of a segment is started every this many bytes appended, so
/// that the sync at the next CP finds little left to write: left to the
/// kernel, a CP interval of transfers (hundreds of MiB under a busy
/// source) went to the disk in one burst at the sync, which took the disk
/// from every other writer of the machine for a second or more.
const WRITEBACK_STEP: u64 = 8 << 20;
/// Bytes of a segment record's header: payload length and crc32c.
const RECORD_HEADER: u64 = 8;
/// Staged files are the replica's data: the daemon's user only.
const FILE_MODE: u32 = 0o600;

/// The file holding a staged transfer.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Holder {
    /// Segment `r-<id>`.
    Segment(u64),
    /// An earlier version's unseeded segment `s-<id>`.
    UnseededSegment(u64),
    /// An earlier version's `t-<tid>`.
    TransferFile(u64),
}

struct Staged {
    holder: Holder,
    /// Where the payload starts in its file.
    at: u64,
    pieces: Vec<Piece>,
}

/// The segment taking transfers.
struct OpenSegment {
    id: u64,
    file: fs::File,
    len: u64,
    /// Bytes whose writeback was started ([`WRITEBACK_STEP`]).
    started: u64,
}

#[derive(Default)]
struct Inner {
    index: BTreeMap<u64, Staged>,
    open: Option<OpenSegment>,
    /// Segments written since the last sync other than the open one.
    unsynced: Vec<fs::File>,
    /// The open segment was written since the last sync.
    open_dirty: bool,
    /// Segment id -> its last transfer id and its file.
    segments: BTreeMap<u64, (u64, Holder)>,
    /// Spare segment files, by the id they had.
    spares: Vec<u64>,
}

pub struct Staging {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

/// Starts writing a range of `file` back without waiting for it (advice:
/// the sync at the CP is what makes it durable, and waits for the rest).
fn start_writeback(file: &fs::File, offset: u64, len: u64) {
    // SAFETY: plain syscall on a descriptor we own.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A segment record's checksum: seeded with the segment's id, or not in an
/// earlier version's segment.
fn record_crc(seed: Option<u64>, payload: &[u8]) -> u32 {
    let start = seed.map_or(0, |id| crc32c::crc32c(&id.to_le_bytes()));
    crc32c::crc32c_append(start, payload)
}

fn create(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

fn parse_hex(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    u64::from_str_radix(hex, 16).ok()
}

impl Staging {
    pub fn new(dir: PathBuf) -> Staging {
        Staging {
            dir,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("r-{id:016x}"))
    }

    fn unseeded_segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("s-{id:016x}"))
    }

    fn spare_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("spare-{id:016x}"))
    }

    fn holder_path(&self, holder: Holder) -> PathBuf {
        match holder {
            Holder::Segment(id) => self.segment_path(id),
            Holder::UnseededSegment(id) => self.unseeded_segment_path(id),
            Holder::TransferFile(tid) => self.transfer_path(tid),
        }
    }

    fn transfer_path(&self, tid: u64) -> PathBuf {
        self.dir.join(format!("t-{tid:016x}"))
    }

    fn cp_path(&self, cp: u64) -> PathBuf {
        self.dir.join(format!("cp-{cp:016x}.rec"))
    }

    /// Transfers staged and not dropped yet.
    pub fn len(&self) -> usize {
        self.lock().index.len()
    }

    /// The id the next transfer of a session must have at least.
    pub fn next_tid(&self, keep_from_tid: u64) -> u64 {
        let staged = self.lock().index.keys().next_back().map_or(0, |t| t + 1);
        staged.max(keep_from_tid)
    }

    /// Piece `i` of transfer `tid`, if staged.
    pub fn piece(&self, tid: u64, i: u32) -> Option<Piece> {
        self.lock()
            .index
            .get(&tid)
            .and_then(|s| s.pieces.get(i as usize))
            .cloned()
    }

    /// Creates the directory and indexes what it holds for a replica of
    /// `size` bytes: transfers from `keep_from_tid` on that pass their
    /// checks, and the CP records after `last_applied`, which it returns
    /// oldest first. Everything else (spares too) is removed.
    pub fn load(
        &self,
        size: u64,
        keep_from_tid: u64,
        last_applied: Option<u64>,
    ) -> io::Result<Vec<wire::CpCommit>> {
        fs::create_dir_all(&self.dir)?;
        let mut inner = self.lock();
        let mut pending = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let segment = parse_hex(&name, "r-", "")
                .map(|id| (id, Holder::Segment(id), Some(id)))
                .or_else(|| {
                    parse_hex(&name, "s-", "").map(|id| (id, Holder::UnseededSegment(id), None))
                });
            let keep = if let Some((id, holder, seed)) = segment {
                let bytes = fs::read(&path)?;
                let mut at = 0usize;
                let mut last = None;
                while let Some((payload, next)) = next_record(&bytes, at, seed) {
                    match wire::decode_transfer(payload, size) {
                        Ok((tid, pieces)) if tid >= keep_from_tid => {
                            let staged = Staged {
                                holder,
                                at: (at as u64) + RECORD_HEADER,
                                pieces,
                            };
                            inner.index.insert(tid, staged);
                            last = Some(tid);
                        }
                        _ => {}
                    }
                    at = next;
                }
                if at < bytes.len() {
                    log::info!(
                        "replication: {} ends in {} bytes that fail their check (a write cut \
                         short); ignoring them",
                        path.display(),
                        bytes.len() - at
                    );
                }
                last.map(|l| inner.segments.insert(id, (l, holder)))
                    .is_some()
            } else if let Some(tid) = parse_hex(&name, "t-", "") {
                match read_checked(&path)?.map(|p| wire::decode_transfer(&p, size)) {
                    Some(Ok((id, pieces))) if id == tid && tid >= keep_from_tid => {
                        let staged = Staged {
                            holder: Holder::TransferFile(tid),
                            at: 4,
                            pieces,
                        };
                        inner.index.insert(tid, staged);
                        true
                    }
                    _ => false,
                }
            } else if parse_hex(&name, "cp-", ".rec").is_some() {
                match read_checked(&path)?.map(|p| wire::decode_cp(&p)) {
                    Some(Ok(cp)) if last_applied.is_none_or(|a| cp.cp > a) => {
                        pending.push(cp);
                        true
                    }
                    _ => false,
                }
            } else {
                false
            };
            if !keep {
                log::info!(
                    "replication: dropping stale staging file {}",
                    path.display()
                );
                fs::remove_file(&path)?;
            }
        }
        pending.sort_by_key(|c| c.cp);
        Ok(pending)
    }

    /// Checks and stages a transfer for a replica of `size` bytes; returns
    /// its id.
    pub fn store_transfer(&self, payload: &[u8], size: u64) -> io::Result<u64> {
        let (tid, pieces) = wire::decode_transfer(payload, size)?;
        let mut inner = self.lock();
        if let Some(last) = inner.index.keys().next_back() {
            if tid <= *last {
                return Err(invalid(format!(
                    "transfer {tid} is not after the last one staged ({last})"
                )));
            }
        }
        if inner.open.as_ref().is_none_or(|s| s.len >= SEGMENT_BYTES) {
            let file = self.new_segment(&mut inner, tid)?;
            if let Some(old) = inner.open.take() {
                if inner.open_dirty {
                    inner.unsynced.push(old.file);
                }
            }
            inner.open = Some(OpenSegment {
                id: tid,
                file,
                len: 0,
                started: 0,
            });
        }
        let seg = inner.open.as_mut().expect("a segment is open");
        let mut header = [0u8; RECORD_HEADER as usize];
        header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&record_crc(Some(seg.id), payload).to_le_bytes());
        let written = seg
            .file
            .write_all(&header)
            .and_then(|_| seg.file.write_all(payload));
        if let Err(e) = written {
            // What was written of this record is a torn tail: no later
            // record may follow it in this file.
            inner.open = None;
            return Err(e);
        }
        let (id, at) = (seg.id, seg.len + RECORD_HEADER);
        seg.len = at + payload.len() as u64;
        if seg.len - seg.started >= WRITEBACK_STEP {
            start_writeback(&seg.file, seg.started, seg.len - seg.started);
            seg.started = seg.len;
        }
        inner.open_dirty = true;
        inner.segments.insert(id, (tid, Holder::Segment(id)));
        let staged = Staged {
            holder: Holder::Segment(id),
            at,
            pieces,
        };
        inner.index.insert(tid, staged);
        Ok(tid)
    }

    /// Opens segment `id` for writing from its start: a spare renamed, or a
    /// new file. Neither name change needs a sync of its own: the directory
    /// is synced with the next CP record, the first thing to refer to what
    /// the segment will hold.
    fn new_segment(&self, inner: &mut Inner, id: u64) -> io::Result<fs::File> {
        let path = self.segment_path(id);
        while let Some(spare) = inner.spares.pop() {
            let reused = fs::rename(self.spare_path(spare), &path)
                .and_then(|_| fs::OpenOptions::new().write(true).open(&path));
            match reused {
                Ok(file) => return Ok(file),
                Err(e) => log::warn!(
                    "replication: cannot reuse spare staging segment {}: {e}; \
                     creating a new one",
                    self.spare_path(spare).display()
                ),
            }
        }
        create(&path)
    }

    /// Makes every staged transfer durable, then CP record `cp`: a crash
    /// after this applies the CP again from staging.
    pub fn stage_cp(&self, cp: u64, payload: &[u8]) -> io::Result<()> {
        let mut inner = self.lock();
        for f in std::mem::take(&mut inner.unsynced) {
            f.sync_data()?;
        }
        if inner.open_dirty {
            if let Some(seg) = &inner.open {
                seg.file.sync_data()?;
            }
            inner.open_dirty = false;
        }
        let mut f = create(&self.cp_path(cp)).or_else(|e| {
            // An earlier commit of this CP that was never applied.
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
            fs::remove_file(self.cp_path(cp))?;
            create(&self.cp_path(cp))
        })?;
        f.write_all(&crc32c::crc32c(payload).to_le_bytes())?;
        f.write_all(payload)?;
        f.sync_data()?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// Opens staged files for one apply.
    pub fn reader(&self) -> Reader<'_> {
        Reader {
            staging: self,
            files: HashMap::new(),
        }
    }

    /// After CP `cp` was applied: drops its record and the transfers
    /// before `keep_from_tid`, and the files that held only those.
    pub fn applied(&self, cp: u64, keep_from_tid: u64) -> io::Result<()> {
        fs::remove_file(self.cp_path(cp))?;
        let mut inner = self.lock();
        let kept = inner.index.split_off(&keep_from_tid);
        let dropped = std::mem::replace(&mut inner.index, kept);
        for (tid, staged) in dropped {
            if staged.holder == Holder::TransferFile(tid) {
                fs::remove_file(self.transfer_path(tid))?;
            }
        }
        let mut dead = Vec::new();
        inner.segments.retain(|&id, &mut (last, holder)| {
            let live = last >= keep_from_tid;
            if !live {
                dead.push((id, holder));
            }
            live
        });
        for &(id, _) in &dead {
            if inner.open.as_ref().is_some_and(|s| s.id == id) {
                inner.open = None;
                inner.open_dirty = false;
            }
        }
        // The spares the interval since the last CP did not need are more
        // than the next one will: only this CP's dead segments stay.
        let unused = std::mem::take(&mut inner.spares);
        // Unlinking a 64 MiB file frees its cached pages and blocks: done
        // under the lock, it held the receiver's next transfers (and their
        // acknowledgements) for as long, and a fast source's log filled.
        drop(inner);
        for spare in unused {
            fs::remove_file(self.spare_path(spare))?;
        }
        let mut spares = Vec::with_capacity(dead.len());
        for (id, holder) in dead {
            // Not synced: a crash that loses the rename leaves the segment
            // under its name, with nothing live, and the next start drops it.
            fs::rename(self.holder_path(holder), self.spare_path(id))?;
            spares.push(id);
        }
        self.lock().spares = spares;
        Ok(())
    }

    /// Forgets everything staged and empties the directory (a replica
    /// starting over, or promoted when `keep_dir` is false).
    pub fn reset(&self, keep_dir: bool) -> io::Result<()> {
        *self.lock() = Inner::default();
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if keep_dir {
            fs::create_dir_all(&self.dir)?;
        }
        Ok(())
    }
}

/// The next segment record at `at`: its payload and where the next record
/// starts; `None` at the end or at a record that fails its check (with
/// the segment's `seed`, see [`record_crc`]).
fn next_record(bytes: &[u8], at: usize, seed: Option<u64>) -> Option<(&[u8], usize)> {
    let header = bytes.get(at..at + RECORD_HEADER as usize)?;
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
    let start = at + RECORD_HEADER as usize;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    (record_crc(seed, payload) == crc).then_some((payload, start + len))
}

/// Reads a `crc32c | payload` file back; `None` if it fails its check.
fn read_checked(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let bytes = fs::read(path)?;
    if bytes.len() < 4 {
        return Ok(None);
    }
    let (crc, payload) = bytes.split_at(4);
    if crc32c::crc32c(payload) != u32::from_le_bytes(crc.try_into().unwrap()) {
        return Ok(None);
    }
    Ok(Some(payload.to_vec()))
}

/// Reads staged pieces, keeping their files open across one apply.
pub struct Reader<'a> {
    staging: &'a Staging,
    files: HashMap<Holder, fs::File>,
}

impl Reader<'_> {
    /// Reads into `buf` the bytes of piece `i` of transfer `tid` that
    /// belong at `start..` of the volume (checked against the piece by the
    /// caller).
    pub fn read_into(&mut self, tid: u64, i: u32, start: u64, buf: &mut [u8]) -> io::Result<()> {
        let (holder, at, piece) = {
            let inner = self.staging.lock();
            let staged = inner
                .index
                .get(&tid)
                .ok_or_else(|| invalid(format!("transfer {tid} is not staged")))?;
            let piece = staged
                .pieces
                .get(i as usize)
                .cloned()
                .ok_or_else(|| invalid(format!("transfer {tid} has no piece {i}")))?;
            (staged.holder, staged.at, piece)
        };
        let f = match self.files.entry(holder) {
            std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(fs::File::open(self.staging.holder_path(holder))?)
            }
        };
        f.read_exact_at(buf, at + piece.at as u64 + (start - piece.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::wire::encode_transfer;

    const SIZE: u64 = 1 << 30;

    fn cp_payload(cp: u64) -> Vec<u8> {
        wire::encode_cp(&wire::CpCommit {
            cp,
            keep_from_tid: 0,
            block_size: 4096,
            entries: Vec::new(),
        })
    }

    fn read(s: &Staging, tid: u64, i: u32, offset: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0; len as usize];
        s.reader().read_into(tid, i, offset, &mut buf).unwrap();
        buf
    }

    #[test]
    fn transfers_survive_a_restart_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.staging");
        let s = Staging::new(path.clone());
        assert!(s.load(SIZE, 0, None).unwrap().is_empty());
        for tid in 0..3u64 {
            let a = vec![tid as u8 + 1; 4096];
            let b = vec![tid as u8 + 10; 8192];
            s.store_transfer(&encode_transfer(tid, &[(0, &a), (8192, &b)]), SIZE)
                .unwrap();
        }
        assert_eq!(read(&s, 1, 1, 12288, 4096), vec![11; 4096]);
        s.stage_cp(4, &cp_payload(4)).unwrap();
        // A fourth transfer, torn by a crash: half its record was written.
        let seg = path.join(format!("r-{:016x}", 0));
        let before = fs::metadata(&seg).unwrap().len();
        s.store_transfer(&encode_transfer(3, &[(0, &[9; 4096])]), SIZE)
            .unwrap();
        let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(before + 100).unwrap();
        drop(s);

        let s = Staging::new(path.clone());
        let pending = s.load(SIZE, 1, Some(2)).unwrap();
        assert_eq!(pending.iter().map(|c| c.cp).collect::<Vec<_>>(), vec![4]);
        assert_eq!(
            s.len(),
            2,
            "transfers 1 and 2; 0 is before keep_from, 3 torn"
        );
        assert!(s.piece(0, 0).is_none());
        assert_eq!(read(&s, 2, 0, 0, 4096), vec![3; 4096]);
        assert_eq!(read(&s, 2, 1, 8192, 8192), vec![12; 8192]);
        assert_eq!(s.next_tid(0), 3);
        // New transfers go to a new segment, after the torn tail's id.
        s.store_transfer(&encode_transfer(3, &[(0, &[7; 4096])]), SIZE)
            .unwrap();
        assert!(path.join(format!("r-{:016x}", 3)).exists());
        assert_eq!(read(&s, 3, 0, 0, 4096), vec![7; 4096]);
        assert!(
            s.store_transfer(&encode_transfer(3, &[(0, &[7; 4096])]), SIZE)
                .is_err(),
            "a transfer id is staged once"
        );

        // Applying CP 4 up to transfer 3 drops the first segment, keeps the new.
        s.applied(4, 3).unwrap();
        assert!(!seg.exists());
        assert!(!path.join(format!("cp-{:016x}.rec", 4)).exists());
        assert_eq!(s.len(), 1);
        assert_eq!(read(&s, 3, 0, 0, 4096), vec![7; 4096]);
        use std::os::unix::fs::PermissionsExt;
        for e in fs::read_dir(&path).unwrap() {
            let mode = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, FILE_MODE, "staged files are the daemon user's only");
        }
    }

    #[test]
    fn earlier_versions_transfer_files_are_read_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.staging");
        fs::create_dir_all(&path).unwrap();
        let payload = encode_transfer(5, &[(4096, &[6; 4096])]);
        let mut file = crc32c::crc32c(&payload).to_le_bytes().to_vec();
        file.extend_from_slice(&payload);
        fs::write(path.join(format!("t-{:016x}", 5)), &file).unwrap();
        // A transfer file whose name and content disagree, and junk.
        fs::write(path.join(format!("t-{:016x}", 6)), &file).unwrap();
        fs::write(path.join("junk"), b"x").unwrap();
        let s = Staging::new(path.clone());
        s.load(SIZE, 0, None).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(read(&s, 5, 0, 4096, 4096), vec![6; 4096]);
        assert!(!path.join("junk").exists());
        assert!(!path.join(format!("t-{:016x}", 6)).exists());
        s.stage_cp(1, &cp_payload(1)).unwrap();
        s.applied(1, 6).unwrap();
        assert_eq!(fs::read_dir(&path).unwrap().count(), 0);
    }

    /// A staging area at `path` holding transfers 0 to n - 1, 1 MiB each.
    fn staged_mib(path: &Path, n: u64) -> Staging {
        let s = Staging::new(path.to_path_buf());
        s.load(SIZE, 0, None).unwrap();
        let data = vec![1u8; 1 << 20];
        for tid in 0..n {
            s.store_transfer(&encode_transfer(tid, &[(0, &data)]), SIZE)
                .unwrap();
        }
        s
    }

    /// A busy source's transfers do not pile up in the page cache until
    /// the next CP's sync: all but the last few MiB of a segment are on
    /// their way to the disk as it grows.
    #[test]
    fn a_growing_segment_is_written_back_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let s = staged_mib(
            &dir.path().join("v.staging"),
            2 * WRITEBACK_STEP / (1 << 20) + 1,
        );
        let inner = s.lock();
        let seg = inner.open.as_ref().unwrap();
        assert!(
            seg.started >= 2 * WRITEBACK_STEP && seg.len - seg.started < WRITEBACK_STEP,
            "writeback started at each step: {} of {} bytes",
            seg.started,
            seg.len
        );
        let fd = seg.file.as_raw_fd();
        let dirty = crate::backend::file::dirty_pages(fd, 0, seg.started)
            .expect("cachestat (Linux 6.5) says how many pages are dirty");
        // At most the page each step ended in, which the next record wrote
        // again: against 4096 pages dirty without the steps.
        let steps = seg.started / WRITEBACK_STEP;
        assert!(
            dirty <= steps,
            "{dirty} pages of the started range still dirty"
        );
        let tail = crate::backend::file::dirty_pages(fd, seg.started, seg.len - seg.started);
        assert!(tail.unwrap() > 0, "the rest waits for the CP's sync");
    }

    #[test]
    fn segments_rotate_and_stay_few() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.staging");
        let n = 2 * SEGMENT_BYTES / (1 << 20) + 1;
        let s = staged_mib(&path, n);
        s.stage_cp(0, &cp_payload(0)).unwrap();
        let segments = fs::read_dir(&path).unwrap().count() - 1;
        assert_eq!(segments, 3, "{n} transfers of 1 MiB in 64 MiB segments");
        s.applied(0, n).unwrap();
        let names = || {
            let mut v: Vec<String> = fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert!(
            names().iter().all(|n| n.starts_with("spare-")) && names().len() == 3,
            "the dead segments are kept as spares: {:?}",
            names()
        );
        // The next transfers overwrite a spare instead of a new file.
        let data = vec![2u8; 1 << 20];
        s.store_transfer(&encode_transfer(n, &[(0, &data)]), SIZE)
            .unwrap();
        assert_eq!(names().len(), 3, "{:?}", names());
        assert!(names().contains(&format!("r-{n:016x}")));
        assert_eq!(read(&s, n, 0, 0, 1 << 20), data);
        // Spares the interval did not need go at the next applied CP.
        s.stage_cp(1, &cp_payload(1)).unwrap();
        s.applied(1, n).unwrap();
        assert_eq!(names(), vec![format!("r-{n:016x}")]);
    }

    /// A reused segment holds its earlier life's records past what was
    /// written under its present name: after a crash they are not taken
    /// for its own (its checksums are seeded with its id). An earlier
    /// version's unseeded segment is still read, and reused like any.
    #[test]
    fn a_reused_segment_ends_at_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.staging");
        fs::create_dir_all(&path).unwrap();
        let mut old = Vec::new();
        for tid in 0..4u64 {
            let payload = encode_transfer(tid, &[(tid * 4096, &[tid as u8 + 1; 4096])]);
            old.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            old.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
            old.extend_from_slice(&payload);
        }
        fs::write(path.join(format!("s-{:016x}", 0)), &old).unwrap();
        let s = Staging::new(path.clone());
        s.load(SIZE, 0, None).unwrap();
        assert_eq!(s.len(), 4, "an unseeded segment from an earlier version");
        assert_eq!(read(&s, 2, 0, 2 * 4096, 4096), vec![3; 4096]);
        s.stage_cp(1, &cp_payload(1)).unwrap();
        s.applied(1, 4).unwrap();
        // Transfers 4 and 5, the size of the old records 0 and 1: the old
        // records 2 and 3 follow them in the file.
        for tid in 4..6u64 {
            s.store_transfer(&encode_transfer(tid, &[(0, &[9; 4096])]), SIZE)
                .unwrap();
        }
        let reused = path.join(format!("r-{:016x}", 4));
        assert_eq!(fs::metadata(&reused).unwrap().len(), old.len() as u64);
        s.stage_cp(2, &cp_payload(2)).unwrap();
        drop(s);
        // Seeded like the new ones, the old records would read as more
        // transfers of this segment (with ids before keep_from they would
        // only be skipped; with the same bytes as a new record's lost
        // write they would be taken).
        let s = Staging::new(path.clone());
        let pending = s.load(SIZE, 0, Some(1)).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(s.len(), 2, "transfers 4 and 5 only");
        assert!(s.piece(2, 0).is_none() && s.piece(3, 0).is_none());
        assert_eq!(read(&s, 5, 0, 0, 4096), vec![9; 4096]);
    }
}

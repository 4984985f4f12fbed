//! An in-memory disk that can lose power.
//!
//! Every file keeps its durable image and the list of writes since its last
//! flush. [`MemDisk::crash_after`] makes the disk fail every operation after a
//! given count, as a machine that stopped mid-work; [`MemDisk::power_cut`] then
//! yields the disk a reboot would find: the durable image plus a random subset
//! of the unflushed writes, some of them torn at a sector boundary. That is what
//! a volatile disk cache and the page cache may leave behind, and it is the
//! fault model of the crash tests.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

const SECTOR: usize = 512;

#[derive(Clone)]
enum Pending {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    Truncate {
        len: u64,
    },
    /// A size extension that never shrinks the file (fallocate mode 0).
    Grow {
        len: u64,
    },
}

#[derive(Default, Clone)]
struct FileState {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
}

fn apply(image: &mut Vec<u8>, op: &Pending) {
    match op {
        Pending::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[*offset as usize..end].copy_from_slice(data);
        }
        Pending::Zero { offset, len } => {
            let start = (*offset as usize).min(image.len());
            let end = ((*offset + *len) as usize).min(image.len());
            image[start..end].fill(0);
        }
        Pending::Truncate { len } => image.resize(*len as usize, 0),
        Pending::Grow { len } => {
            if image.len() < *len as usize {
                image.resize(*len as usize, 0)
            }
        }
    }
}

/// Reads what the file holds now; past its end reads as zeros.
fn read_current(file: &FileState, buf: &mut [u8], offset: u64) {
    let start = (offset as usize).min(file.current.len());
    let end = (offset as usize + buf.len()).min(file.current.len());
    buf[..end - start].copy_from_slice(&file.current[start..end]);
    buf[end - start..].fill(0);
}

#[derive(Default)]
struct DiskState {
    files: HashMap<String, FileState>,
    manifests: HashMap<String, Vec<u8>>,
    operations: u64,
    /// Flushes of any file, so tests can count commits.
    flushes: u64,
    crash_after: Option<u64>,
    /// Whether files on this disk can share blocks (see [`MemDisk::set_reflink`]).
    reflink: bool,
    /// See [`MemDisk::set_clone_min_bytes`].
    clone_min_bytes: Option<u64>,
}

impl DiskState {
    /// Counts one operation; fails it if the machine has "stopped".
    fn tick(&mut self) -> io::Result<()> {
        self.operations += 1;
        match self.crash_after {
            Some(limit) if self.operations > limit => Err(io::Error::other("simulated power cut")),
            _ => Ok(()),
        }
    }
}

#[derive(Default)]
pub struct MemDisk {
    state: Mutex<DiskState>,
    /// Runs once, just before the next read of the named file copies its
    /// data: lets a test land another request inside a read's window.
    read_hook: Mutex<Option<(String, ReadHook)>>,
}

type ReadHook = Box<dyn FnOnce() + Send>;

/// A deterministic generator, so a failing crash case can be replayed from its seed.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

impl MemDisk {
    pub fn new() -> Arc<Self> {
        Arc::new(MemDisk::default())
    }

    /// Operations (reads, writes, flushes, manifest replacements) so far.
    pub fn operations(&self) -> u64 {
        self.state.lock().unwrap().operations
    }

    /// Flushes (of any file) so far.
    pub fn flushes(&self) -> u64 {
        self.state.lock().unwrap().flushes
    }

    /// Lets files on this disk share blocks, as XFS with reflink does (see
    /// [`MemFile::clone_range_from`]).
    pub fn set_reflink(&self, on: bool) {
        self.state.lock().unwrap().reflink = on;
    }

    /// Makes the engine clone stretches from `bytes` on instead of a file
    /// system's [`super::file::CLONE_MIN_BYTES`], so the crash tests' small
    /// volumes take the clone path.
    pub fn set_clone_min_bytes(&self, bytes: u64) {
        self.state.lock().unwrap().clone_min_bytes = Some(bytes);
    }

    /// From now on, operation number `n+1` and every later one fails.
    pub fn crash_after(&self, n: u64) {
        self.state.lock().unwrap().crash_after = Some(n);
    }

    /// The disk as found after power returns: durable data plus a random
    /// subset of unflushed writes, in order, some torn at a sector boundary.
    pub fn power_cut(&self, rng: &mut SplitMix) -> Arc<MemDisk> {
        let state = self.state.lock().unwrap();
        let mut files = HashMap::new();
        // In name order, so a seed cuts the same writes on every run.
        let mut names: Vec<&String> = state.files.keys().collect();
        names.sort();
        for (name, file) in names.into_iter().map(|n| (n, &state.files[n])) {
            let mut image = file.durable.clone();
            for op in &file.pending {
                match rng.below(3) {
                    0 => {}
                    1 => apply(&mut image, op),
                    _ => match op {
                        Pending::Write { offset, data } if data.len() > SECTOR => {
                            let sectors = data.len().div_ceil(SECTOR);
                            let keep =
                                (rng.below(sectors as u64) as usize * SECTOR).min(data.len());
                            apply(
                                &mut image,
                                &Pending::Write {
                                    offset: *offset,
                                    data: data[..keep].to_vec(),
                                },
                            );
                        }
                        _ => {}
                    },
                }
            }
            files.insert(
                name.clone(),
                FileState {
                    durable: image.clone(),
                    current: image,
                    pending: Vec::new(),
                },
            );
        }
        Arc::new(MemDisk {
            read_hook: Mutex::new(None),
            state: Mutex::new(DiskState {
                files,
                manifests: state.manifests.clone(),
                reflink: state.reflink,
                clone_min_bytes: state.clone_min_bytes,
                ..Default::default()
            }),
        })
    }

    /// Flips one byte of a file's durable image (corruption tests).
    pub fn corrupt(&self, name: &str, offset: usize) {
        let mut state = self.state.lock().unwrap();
        let file = state.files.get_mut(name).expect("no such file");
        file.durable[offset] ^= 0x5a;
        file.current[offset] ^= 0x5a;
    }

    pub fn file_len(&self, name: &str) -> Option<usize> {
        self.state
            .lock()
            .unwrap()
            .files
            .get(name)
            .map(|f| f.current.len())
    }

    /// Runs `hook` on its own, just before the next read of `name` copies data.
    pub fn before_next_read(&self, name: &str, hook: impl FnOnce() + Send + 'static) {
        *self.read_hook.lock().unwrap() = Some((name.to_string(), Box::new(hook)));
    }

    pub fn set_manifest(&self, name: &str, bytes: &[u8]) {
        self.state
            .lock()
            .unwrap()
            .manifests
            .insert(name.to_string(), bytes.to_vec());
    }

    pub(super) fn open(self: &Arc<Self>, name: &str, create: bool) -> io::Result<MemFile> {
        let mut state = self.state.lock().unwrap();
        state.tick()?;
        if !state.files.contains_key(name) {
            if !create {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{name}: no such file"),
                ));
            }
            state.files.insert(name.to_string(), FileState::default());
        }
        Ok(MemFile {
            disk: self.clone(),
            name: name.to_string(),
        })
    }

    pub(super) fn read_manifest(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let mut state = self.state.lock().unwrap();
        state.tick()?;
        Ok(state.manifests.get(name).cloned())
    }

    pub(super) fn replace_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state.tick()?;
        let image = bytes.to_vec();
        let file = FileState {
            durable: image.clone(),
            current: image,
            pending: Vec::new(),
        };
        state.files.insert(name.to_string(), file);
        Ok(())
    }

    /// Durable at once, as an unlink followed by a sync of the directory.
    pub(super) fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state.tick()?;
        state.files.remove(name);
        Ok(())
    }

    pub(super) fn replace_manifest(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state.tick()?;
        state.manifests.insert(name.to_string(), bytes.to_vec());
        Ok(())
    }
}

/// A file on a [`MemDisk`].
#[derive(Clone)]
pub struct MemFile {
    disk: Arc<MemDisk>,
    name: String,
}

impl MemFile {
    fn with<R>(&self, f: impl FnOnce(&mut FileState) -> R) -> io::Result<R> {
        let mut state = self.disk.state.lock().unwrap();
        state.tick()?;
        Ok(f(state.files.get_mut(&self.name).expect("file vanished")))
    }

    fn record(&self, op: Pending, durable: bool) -> io::Result<()> {
        self.with(|file| {
            apply(&mut file.current, &op);
            file.pending.push(op);
            if durable {
                // A FUA write reaches the platter in order with, and after,
                // what the cache held for the same file: model it as a flush.
                for op in std::mem::take(&mut file.pending) {
                    apply(&mut file.durable, &op);
                }
            }
        })
    }

    pub fn size(&self) -> io::Result<u64> {
        let state = self.disk.state.lock().unwrap();
        Ok(state.files[&self.name].current.len() as u64)
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let hook = {
            let mut slot = self.disk.read_hook.lock().unwrap();
            match slot.take() {
                Some((name, hook)) if name == self.name => Some(hook),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        if let Some(hook) = hook {
            hook();
        }
        self.with(|file| read_current(file, buf, offset))
    }

    pub fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        self.record(
            Pending::Write {
                offset,
                data: buf.to_vec(),
            },
            durable,
        )
    }

    /// See [`super::file::FileBackend::clone_range_from`]. A clone lands
    /// like a write of the source's current bytes: lost or torn by a power
    /// cut until this file's next flush.
    pub fn clone_range_from(
        &self,
        src: &MemFile,
        src_offset: u64,
        dst_offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        if !self.disk.state.lock().unwrap().reflink || !Arc::ptr_eq(&self.disk, &src.disk) {
            return Ok(false);
        }
        let mut data = vec![0; len as usize];
        src.with(|file| read_current(file, &mut data, src_offset))?;
        self.write_at(&data, dst_offset, false)?;
        Ok(true)
    }

    pub fn clone_min_bytes(&self) -> u64 {
        let state = self.disk.state.lock().unwrap();
        state
            .clone_min_bytes
            .unwrap_or(super::file::CLONE_MIN_BYTES)
    }

    pub fn flush(&self) -> io::Result<()> {
        self.disk.state.lock().unwrap().flushes += 1;
        self.with(|file| {
            for op in std::mem::take(&mut file.pending) {
                apply(&mut file.durable, &op);
            }
        })
    }

    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Pending::Zero { offset, len }, false)
    }

    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Pending::Zero { offset, len }, false)
    }

    /// Like a file system's size change, lost at a power cut unless flushed.
    pub fn grow(&self, len: u64) -> io::Result<()> {
        self.record(Pending::Grow { len }, false)
    }

    pub fn truncate(&self, len: u64) -> io::Result<()> {
        self.record(Pending::Truncate { len }, true)
    }

    pub fn allocated_bytes(&self) -> io::Result<u64> {
        let state = self.disk.state.lock().unwrap();
        Ok(state.files[&self.name]
            .current
            .iter()
            .filter(|b| **b != 0)
            .count() as u64)
    }
}

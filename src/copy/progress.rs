//! A job's durable state: `DATA_DIR/jobs/<id>.json` (what the job is, its
//! state; replaced atomically) and `DATA_DIR/jobs/<id>.map` (per-segment
//! progress, updated in place with pwrite + fdatasync, many segments per
//! fdatasync).
//!
//! Map layout: `"SBCPMAP1"`, the committed stream length (u64, stream
//! targets), then 8 bytes per segment: state (u32: 0 pending, 1 copied,
//! 2 zero, 3 unchanged since `--since`'s snapshot, so not written) and the
//! crc32c of the data written to the target (u32). An entry
//! is written only after the target holds its segment durably.

use super::stream::MAX_BLOCK;
use crate::engine::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAP_MAGIC: &[u8; 8] = b"SBCPMAP1";
const MAP_HEADER: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Cow,
    Hold,
    Direct,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Stream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Paused,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn finished(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What `<id>.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    pub volume: String,
    /// The user snapshot copied (`VOL@SNAP`), if any.
    pub snapshot: Option<String>,
    /// The engine-internal snapshot that holds the `cow` point-in-time image.
    pub internal_snapshot: Option<String>,
    pub target: String,
    pub policy: Policy,
    pub format: Format,
    pub block_size: u64,
    pub rate: Option<u64>,
    pub verify: bool,
    /// `--since`: only what changed since this older image is copied (the
    /// target holds it already, or the stream is an incremental onto it).
    #[serde(default)]
    pub since: Option<Since>,
    /// The copied image's creation time (ms), its identity with the
    /// volume and the generation.
    #[serde(default)]
    pub stamp: u64,
    /// How long a write may wait for the job (a held write, or one that
    /// copies its segment first) before the job fails and lets it through.
    #[serde(default = "default_hold_timeout_ms")]
    pub hold_timeout_ms: u64,
    /// A file or device target's path with symlinks resolved at start,
    /// and its (device, inode): a resumed job reopens exactly that file.
    #[serde(default)]
    pub target_real: Option<String>,
    #[serde(default)]
    pub target_id: Option<(u64, u64)>,
    pub size: u64,
    pub chunk_size: u32,
    pub generation: u64,
    pub created_unix_ms: u64,
    pub state: JobState,
    pub error: Option<String>,
    /// Bytes durably done when the job ended (`copy list` of ended jobs).
    #[serde(default)]
    pub bytes_done: u64,
    /// How the data moved, counted since the job last started.
    #[serde(default, flatten)]
    pub moved: Moved,
}

/// The snapshot a `--since` job counts changes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    pub snapshot: String,
    pub generation: u64,
    pub stamp: u64,
}

/// Bytes a job copied (data, not zeros), and how: by `copy_file_range`,
/// or read and written through the job thread's registered arena (a byte
/// counts once when read and once when written there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub bytes_copied: u64,
    pub bytes_kernel_copied: u64,
    pub registered_buffer_io_bytes: u64,
}

/// A stalled target (a pipe nobody drains, a hung network file system)
/// fails a job after this long rather than block the volume's writes.
pub const DEFAULT_HOLD_TIMEOUT_MS: u64 = 10_000;

fn default_hold_timeout_ms() -> u64 {
    DEFAULT_HOLD_TIMEOUT_MS
}

impl JobRecord {
    pub fn segments(&self) -> u64 {
        self.size.div_ceil(self.block_size)
    }
}

pub fn jobs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("jobs")
}

pub fn record_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id}.json"))
}

pub fn map_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id}.map"))
}

pub fn save_record(dir: &Path, record: &JobRecord) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    crate::backend::file::replace_atomically(&record_path(dir, record.id), &bytes)
}

/// [`save_record`] on a helper thread, for async code that must not block
/// (a write's hook on an I/O thread).
pub async fn save_record_off_thread(dir: &Path, record: JobRecord) -> io::Result<()> {
    let dir = dir.to_path_buf();
    crate::runtime::run_blocking(move || save_record(&dir, &record)).await
}

pub fn load_record(path: &Path) -> io::Result<JobRecord> {
    JobRecord::parse(&std::fs::read(path)?, path)
}

impl JobRecord {
    /// Decodes the bytes of the record file `path` (named in errors), and
    /// checks the geometry the job's segments are computed from.
    pub fn parse(bytes: &[u8], path: &Path) -> io::Result<JobRecord> {
        let invalid = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a job record: {what}", path.display()),
            )
        };
        let r: JobRecord = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let chunk = r.chunk_size;
        if !chunk.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk) {
            return Err(invalid(format!(
                "chunk size {chunk} is not a power of two between 4K and 1M"
            )));
        }
        let block = r.block_size;
        if block == 0 || !block.is_multiple_of(chunk as u64) || block > MAX_BLOCK as u64 {
            return Err(invalid(format!(
                "block size {block} is not a multiple of the chunk size {chunk} of at most {MAX_BLOCK}"
            )));
        }
        Ok(r)
    }
}

/// One segment's durable progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Pending,
    Copied(u32),
    Zero,
    /// `--since`: the segment did not change; the target holds it already.
    Unchanged,
}

/// An entry as the map stores it.
fn encode(entry: Entry) -> [u8; 8] {
    let (state, crc) = match entry {
        Entry::Pending => (0u32, 0u32),
        Entry::Copied(crc) => (1, crc),
        Entry::Zero => (2, 0),
        Entry::Unchanged => (3, 0),
    };
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&state.to_le_bytes());
    b[4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The progress map file.
pub struct ProgressMap {
    file: File,
}

impl ProgressMap {
    /// Creates an all-pending map for `segments` segments, durably.
    pub fn create(path: &Path, segments: u64) -> io::Result<ProgressMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let mut header = [0u8; MAP_HEADER as usize];
        header[..8].copy_from_slice(MAP_MAGIC);
        file.write_all_at(&header, 0)?;
        file.set_len(MAP_HEADER + segments * 8)?;
        file.sync_all()?;
        Ok(ProgressMap { file })
    }

    /// Opens a map and reads it: (committed stream length, entries).
    pub fn open(path: &Path, segments: u64) -> io::Result<(ProgressMap, u64, Vec<Entry>)> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let held = file.metadata()?.len().saturating_sub(MAP_HEADER) / 8;
        if held < segments {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds {held} segments but the job has {segments}: it was cut short \
                     or belongs to another job",
                    path.display()
                ),
            ));
        }
        let mut bytes = vec![0u8; (MAP_HEADER + segments * 8) as usize];
        file.read_exact_at(&mut bytes, 0)?;
        if &bytes[..8] != MAP_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a progress map", path.display()),
            ));
        }
        let stream_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        let entries = bytes[MAP_HEADER as usize..]
            .chunks_exact(8)
            .map(|e| {
                let crc = u32::from_le_bytes(e[4..].try_into().unwrap());
                match u32::from_le_bytes(e[..4].try_into().unwrap()) {
                    1 => Entry::Copied(crc),
                    2 => Entry::Zero,
                    3 => Entry::Unchanged,
                    _ => Entry::Pending,
                }
            })
            .collect();
        Ok((ProgressMap { file }, stream_len, entries))
    }

    /// Writes entries and the stream length; durable after [`Self::sync`].
    /// Asynchronous (io_uring), one write per run of consecutive segments:
    /// a write's hook commits from an I/O thread, which must not block.
    pub async fn write(&self, entries: &[(u64, Entry)], stream_len: Option<u64>) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let mut sorted = entries.to_vec();
        sorted.sort_unstable_by_key(|&(segment, _)| segment);
        let mut rest = &sorted[..];
        while let Some(&(first, _)) = rest.first() {
            let run = rest
                .iter()
                .zip(first..)
                .take_while(|&(&(segment, _), want)| segment == want)
                .count();
            let bytes: Vec<u8> = rest[..run].iter().flat_map(|&(_, e)| encode(e)).collect();
            crate::runtime::write_at(fd, &bytes, MAP_HEADER + first * 8, 0).await?;
            rest = &rest[run..];
        }
        if let Some(len) = stream_len {
            crate::runtime::write_at(fd, &len.to_le_bytes(), 8, 0).await?;
        }
        Ok(())
    }

    pub async fn sync(&self) -> io::Result<()> {
        crate::runtime::fsync(self.file.as_raw_fd(), true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_bytes(block_size: u64, chunk_size: u32, size: u64) -> Vec<u8> {
        format!(
            r#"{{"id":1,"volume":"v","snapshot":null,"internal_snapshot":null,"target":"/t",
            "policy":"cow","format":"raw","block_size":{block_size},"rate":null,"verify":false,
            "size":{size},"chunk_size":{chunk_size},"generation":1,"created_unix_ms":0,
            "state":"running","error":null,"bytes_copied":0,"bytes_kernel_copied":0,
            "registered_buffer_io_bytes":0}}"#
        )
        .into_bytes()
    }

    #[test]
    fn a_record_with_an_impossible_geometry_is_refused_naming_its_file() {
        let path = Path::new("/data/jobs/1.json");
        let r = JobRecord::parse(&record_bytes(131072, 65536, 1 << 20), path).unwrap();
        assert_eq!(r.segments(), 8);
        for (block, chunk, needle) in [
            (0, 65536, "block size 0"),
            (98304, 65536, "block size 98304"),
            (128 << 20, 65536, "block size 134217728"),
            (4096, 0, "chunk size 0"),
            (4096, 3000, "chunk size 3000"),
        ] {
            let e = JobRecord::parse(&record_bytes(block, chunk, 1 << 20), path).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            let e = e.to_string();
            assert!(e.contains("/data/jobs/1.json") && e.contains(needle), "{e}");
        }
    }

    #[test]
    fn a_map_shorter_than_its_record_is_refused_before_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.map");
        drop(ProgressMap::create(&path, 4).unwrap());
        let (_, _, entries) = ProgressMap::open(&path, 4).unwrap();
        assert_eq!(entries, [Entry::Pending; 4]);
        // A record claiming 2^60 segments must not make the daemon try to
        // allocate 8 EiB for them.
        for segments in [5, 1 << 60, u64::MAX] {
            let e = ProgressMap::open(&path, segments).err().unwrap();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("holds 4 segments"), "{e}");
        }
    }
}

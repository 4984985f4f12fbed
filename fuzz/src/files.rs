//! Targets over the files a volume and a copy job keep: the journal and the
//! manifest, decoded by the real volume open on a copy of an in-memory disk
//! that holds a small volume with snapshots, and the job record with its
//! progress map.

use super::{checksum_mode, le32, put_le32};
use snapblk::backend::memory::{MemDisk, SplitMix};
use snapblk::backend::Storage;
use snapblk::copy::job::record_json;
use snapblk::copy::progress::{JobRecord, ProgressMap};
use snapblk::engine::{CacheMode, Volume, VolumeConfig, WriteBackConfig};
use snapblk::runtime::block_on;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

const JOURNAL: &str = "part-000.journal";
const MANIFEST: &str = "volume.json";

/// No committer thread: held writes are committed by the flush below, so
/// each input's work ends with its call.
fn writeback() -> WriteBackConfig {
    WriteBackConfig {
        background: false,
        ..WriteBackConfig::default()
    }
}

/// A disk holding volume `v` (256 KiB, 4 KiB chunks, 2 partitions) whose
/// journals hold preserved versions, partition snapshots and frees: two
/// snapshots taken, the older deleted, writes around each.
fn template() -> &'static Arc<MemDisk> {
    static DISK: OnceLock<Arc<MemDisk>> = OnceLock::new();
    DISK.get_or_init(|| {
        let disk = MemDisk::new();
        let config = VolumeConfig {
            size: 256 << 10,
            chunk_size: 4096,
            partitions: 2,
            backing: None,
            cache: CacheMode::Writeback,
        };
        block_on(async {
            let storage = Storage::Memory(disk.clone());
            let v = Volume::create_with("v", storage, &config, writeback()).await?;
            let live = v.live();
            live.write(0, &[1; 16 << 10], false).await?;
            v.create_snapshot("a").await?;
            live.write(4096, &[2; 8 << 10], false).await?;
            live.write(128 << 10, &[3; 4096], false).await?;
            v.create_snapshot("b").await?;
            live.write(0, &[0; 4096], false).await?;
            v.delete_snapshot("a").await?;
            live.write(8192, &[4; 4096], true).await?;
            v.shutdown().await
        })
        .expect("the template volume is built on the memory disk");
        disk
    })
}

/// A fresh copy of the template disk (everything on it is durable, so the
/// "power cut" keeps it whole).
fn disk() -> Arc<MemDisk> {
    template().power_cut(&mut SplitMix(0))
}

/// The bytes of a file of a disk.
pub(super) fn file_bytes(disk: &Arc<MemDisk>, name: &str) -> Vec<u8> {
    let file = Storage::Memory(disk.clone())
        .open(name, false)
        .expect("the file exists");
    let mut bytes = vec![0; file.size().expect("a memory file has a size") as usize];
    block_on(file.read_at(&mut bytes, 0)).expect("a memory file reads");
    bytes
}

/// Seeds: the template's partition-0 journal and its manifest.
pub fn template_files() -> (Vec<u8>, Vec<u8>) {
    let disk = disk();
    let manifest = Storage::Memory(disk.clone())
        .read_manifest(MANIFEST)
        .expect("the memory disk reads")
        .expect("the template has a manifest");
    (file_bytes(&disk, JOURNAL), manifest)
}

/// Opens volume `v` on `disk` as the daemon does at start, then reads the
/// volume and every snapshot whole, rewrites the volume and flushes: what
/// the journals and the manifest said must hold up under use.
fn open_and_use(disk: Arc<MemDisk>) -> bool {
    block_on(async {
        let v = match Volume::open_with("v", Storage::Memory(disk), writeback()).await {
            Ok(v) => v,
            Err(e) => {
                let _ = e.to_string();
                return false;
            }
        };
        let mut buf = vec![0u8; v.size() as usize];
        let mut ok = v.live().read(0, &mut buf).await.is_ok();
        for s in v.list_snapshots() {
            ok &= match v.snapshot_view(&s.name) {
                Ok(view) => view.read(0, &mut buf).await.is_ok(),
                Err(_) => false,
            };
        }
        ok &= v.live().write(0, &buf, false).await.is_ok();
        ok &= v.live().flush().await.is_ok();
        ok &= v.shutdown().await.is_ok();
        ok
    })
}

/// Recomputes each journal record's crc32c (over everything before it).
fn fix_journal(b: &mut [u8]) {
    const MAGIC: u32 = u32::from_le_bytes(*b"SNJR");
    let mut at = 0;
    while le32(b, at) == Some(MAGIC) {
        let Some(len) = le32(b, at + 4) else { return };
        let end = at + 16 + len as usize;
        if len > 4096 || end + 4 > b.len() {
            return;
        }
        let crc = crc32c::crc32c(&b[at..end]);
        put_le32(b, end, crc);
        at = end + 4;
    }
}

/// Partition 0's journal, replayed by the volume open.
/// Accepted: the volume opened and served reads and writes.
pub fn journal(data: &[u8]) -> bool {
    let Some((fix, mut bytes)) = checksum_mode(data) else {
        return false;
    };
    if fix {
        fix_journal(&mut bytes);
    }
    let disk = disk();
    Storage::Memory(disk.clone())
        .replace_file(JOURNAL, &bytes)
        .expect("the memory disk takes the journal");
    open_and_use(disk)
}

/// The manifest (`volume.json`), read by the volume open.
/// Accepted: the volume opened and served reads and writes.
pub fn manifest(data: &[u8]) -> bool {
    // A manifest may name any file or device as the origin: never open a
    // path an input chose, only the template's container.
    let origin = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("origin").cloned());
    if origin.as_ref().and_then(|o| o.as_str()) != Some("container") {
        return false;
    }
    let disk = disk();
    disk.set_manifest(MANIFEST, data);
    open_and_use(disk)
}

/// Segments the fixed progress map holds.
pub const MAP_SEGMENTS: u64 = 16;

/// A progress map of [`MAP_SEGMENTS`] segments: copied, zero, pending, ...
fn map_path() -> &'static Path {
    static MAP: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = MAP.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory for the map");
        let path = dir.path().join("1.map");
        let mut bytes = b"SBCPMAP1".to_vec();
        bytes.extend_from_slice(&(1u64 << 20).to_le_bytes());
        for i in 0..MAP_SEGMENTS as u32 {
            bytes.extend_from_slice(&(i % 3).to_le_bytes());
            bytes.extend_from_slice(&i.wrapping_mul(0x9e37_79b9).to_le_bytes());
        }
        std::fs::write(&path, bytes).expect("the map is written");
        (dir, path)
    });
    path
}

/// A copy job's record (`jobs/<id>.json`) as a daemon restart reads it,
/// then its progress map opened for the segments the record counts.
/// Accepted: the record parsed and the map matched it.
pub fn job_record(data: &[u8]) -> bool {
    let record = match JobRecord::parse(data, Path::new("jobs/1.json")) {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            return false;
        }
    };
    let _ = record_json(&record);
    let segments = record.segments();
    match ProgressMap::open(map_path(), segments) {
        Ok((_, _, entries)) => entries.len() as u64 == segments,
        Err(e) => {
            let _ = e.to_string();
            false
        }
    }
}

//! The volume manifest (`volume.json`): configuration plus the overall
//! snapshot list. It is the commit point of snapshot create and delete and is
//! only ever replaced atomically (see [`crate::backend::Storage::replace_manifest`]).

use super::error::{EngineError, Result};
use super::{MAX_CHUNK_SIZE, MAX_PARTITIONS, MIN_CHUNK_SIZE, SECTOR_SIZE};
use crate::backend::PageCache;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub const MANIFEST: &str = "volume.json";
pub const CONTAINER: &str = "origin.img";
const FORMAT: u32 = 1;
/// Generations are counted up from 1, one per snapshot or consistency
/// point: a billion a second would take 146 years to reach this. A larger
/// number in a manifest or journal is damage, and refusing it keeps every
/// `generation + 1` from overflowing.
pub const MAX_GENERATION: u64 = 1 << 62;

pub fn journal_name(partition: u32) -> String {
    format!("part-{partition:03}.journal")
}

pub fn store_name(partition: u32) -> String {
    format!("part-{partition:03}.store")
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A sparse file in the volume directory.
    Container,
    /// An existing file or block device the user named.
    Backing(PathBuf),
}

/// How the origin is opened; the names are qemu's `cache=` modes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Through the page cache (buffered I/O).
    #[default]
    Writeback,
    /// O_DIRECT: no page cache; a FLUSH still syncs the disk's cache.
    None,
    /// O_DIRECT writes, reads through the page cache: writes as in `none`,
    /// reads of cached data as in `writeback`, and never a dirty page.
    Writearound,
}

impl CacheMode {
    /// What a volume gets when its creator does not say (measured in
    /// docs/benchmarks.md, "Cache mode"): writearound writes as fast as
    /// `none` (O_DIRECT, 2-4x `writeback` on 4k random writes), reads
    /// cached data as `writeback` does, preserves old content from the page
    /// cache when it is there, and never holds a dirty page, so a FLUSH or
    /// a snapshot never waits for seconds of page cache to reach the disk.
    /// Manifests without a mode stay `writeback`, what they were made with.
    pub const FOR_NEW_VOLUMES: CacheMode = CacheMode::Writearound;

    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
            CacheMode::Writearound => "writearound",
        }
    }

    pub fn page_cache(self) -> PageCache {
        match self {
            CacheMode::Writeback => PageCache::Use,
            CacheMode::None => PageCache::Bypass,
            CacheMode::Writearound => PageCache::BypassForWrites,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub name: String,
    pub generation: u64,
    pub created_unix_ms: u64,
}

/// The snapshot a clone reads the chunks it does not own from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentRecord {
    pub volume: String,
    pub snapshot: String,
}

/// How much a user or group may do with a volume; each level includes the
/// ones below it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Read,
    Write,
    Admin,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
            Level::Admin => "admin",
        }
    }
}

/// Whom an access list entry names.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Principal {
    User,
    Group,
}

/// One access list entry: a uid or gid and its level.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AclEntry {
    pub kind: Principal,
    pub id: u32,
    pub level: Level,
}

/// A volume's owner (uid) and access list. The engine keeps it in the
/// manifest, so it travels with the volume (a Ceph volume's manifest is in
/// the pool), and never reads it: `crate::volumes::access` decides.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessRecord {
    pub owner: u32,
    #[serde(default)]
    pub acl: Vec<AclEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    pub partitions: u32,
    pub origin: Origin,
    /// Manifests written before cache modes existed read as writeback.
    #[serde(default)]
    pub cache: CacheMode,
    /// Lower bound for the current generation after a restart.
    pub next_generation: u64,
    /// Overall snapshots, oldest first.
    pub snapshots: Vec<SnapshotRecord>,
    /// Set for a clone until a flatten has copied every chunk into it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRecord>,
    /// A flatten was asked for and has not finished: it resumes at open.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flattening: bool,
    /// A revert to this snapshot began and has not finished: open
    /// completes it before anything else reads or writes the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverting: Option<String>,
    /// Owner and access list; manifests written before owners existed
    /// read as owned by root (uid 0) with an empty list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessRecord>,
    /// Every snapshot's image is kept by the storage as a native snapshot
    /// of the origin (an RBD snapshot named `snapblk.gGENERATION`), and a
    /// preservation records only that (see `journal::NATIVE_SLOT`). Set at
    /// create where the storage has them (Ceph); volumes made before keep
    /// copying into their change logs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub native_snapshots: bool,
}

impl Manifest {
    pub fn new(name: &str, size: u64, chunk_size: u32, partitions: u32, origin: Origin) -> Self {
        Manifest {
            format: FORMAT,
            name: name.to_string(),
            size,
            chunk_size,
            partitions,
            origin,
            cache: CacheMode::Writeback,
            next_generation: 1,
            snapshots: Vec::new(),
            parent: None,
            flattening: false,
            reverting: None,
            access: None,
            native_snapshots: false,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("manifest serializes");
        bytes.push(b'\n');
        bytes
    }

    pub fn parse(bytes: &[u8], what: &str) -> Result<Self> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| {
            EngineError::Corrupt(format!(
                "{what}: {e}; restore it from a backup or delete the volume"
            ))
        })?;
        if manifest.format != FORMAT {
            return Err(EngineError::Corrupt(format!(
                "{what}: format {} is not supported by this snapblk (it reads format {FORMAT})",
                manifest.format
            )));
        }
        let bad = |m: String| {
            Err(EngineError::Corrupt(format!(
                "{what}: {m}; the file is damaged"
            )))
        };
        let cs = manifest.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return bad(format!(
                "chunk size {cs} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
            ));
        }
        if !(1..=MAX_PARTITIONS).contains(&manifest.partitions) {
            return bad(format!(
                "{} partitions is not from 1 to {MAX_PARTITIONS}",
                manifest.partitions
            ));
        }
        if manifest.size == 0 || !manifest.size.is_multiple_of(SECTOR_SIZE) {
            return bad(format!(
                "size {} is not a positive multiple of {SECTOR_SIZE} bytes",
                manifest.size
            ));
        }
        if manifest.next_generation > MAX_GENERATION {
            return bad(format!(
                "next generation {} is beyond {MAX_GENERATION}",
                manifest.next_generation
            ));
        }
        if let Some(s) = manifest
            .snapshots
            .iter()
            .find(|s| s.generation >= MAX_GENERATION)
        {
            return bad(format!(
                "snapshot {} has generation {}, beyond {MAX_GENERATION}",
                s.name, s.generation
            ));
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_geometry_is_a_clear_error() {
        let good = Manifest::new("v", 1 << 20, 65536, 4, Origin::Container);
        type Damage = fn(&mut Manifest);
        let cases: [(&str, Damage); 8] = [
            ("chunk size 3000", |m| m.chunk_size = 3000),
            ("chunk size 2048", |m| m.chunk_size = 2048),
            ("chunk size 2097152", |m| m.chunk_size = 2 << 20),
            ("0 partitions", |m| m.partitions = 0),
            ("257 partitions", |m| m.partitions = 257),
            ("size 1000", |m| m.size = 1000),
            ("next generation 18446744073709551615", |m| {
                m.next_generation = u64::MAX
            }),
            ("generation 4611686018427387904", |m| {
                m.snapshots.push(SnapshotRecord {
                    name: "s".into(),
                    generation: MAX_GENERATION,
                    created_unix_ms: 0,
                })
            }),
        ];
        for (needle, damage) in cases {
            let mut m = good.clone();
            damage(&mut m);
            let e = Manifest::parse(&m.to_bytes(), "vol/volume.json")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("vol/volume.json") && e.contains(needle),
                "{needle}: {e}"
            );
        }
        assert!(Manifest::parse(&good.to_bytes(), "t").is_ok());
    }

    #[test]
    fn cache_mode_round_trips_and_defaults_to_writeback() {
        let mut m = Manifest::new("v", 1 << 20, 65536, 1, Origin::Container);
        m.cache = CacheMode::None;
        let bytes = m.to_bytes();
        assert!(String::from_utf8_lossy(&bytes).contains(r#""cache": "none""#));
        assert_eq!(Manifest::parse(&bytes, "t").unwrap().cache, CacheMode::None);

        // A manifest from before cache modes.
        let old = br#"{"format":1,"name":"v","size":1048576,"chunk_size":65536,"partitions":1,
            "origin":"container","next_generation":1,"snapshots":[]}"#;
        assert_eq!(
            Manifest::parse(old, "t").unwrap().cache,
            CacheMode::Writeback
        );
    }
}

//! Which image a copy or restore target holds, so that an incremental
//! (`restore` of a `--since` stream, or `copy start --since` to a raw
//! target) applies only onto exactly its base image, as `zfs recv -i` and
//! `rbd import-diff` refuse a wrong base.
//!
//! A target's memory is cleared before anything is written to it and set
//! once the image it received is durable, so a target cut off half-way
//! remembers nothing and takes only a full image next.
//!
//! - a file: a sidecar `FILE.snapblk-image` (JSON) beside it;
//! - a block device: `DATA_DIR/images/dev-MAJOR-MINOR.json` (a device has
//!   no room of its own);
//! - a volume of the daemon (`vol:NAME`): a snapshot of that volume named
//!   `.image-<generation>-<stamp>-<source volume>`, taken when the image
//!   landed; a write to the volume since then shows in the engine's change
//!   map from that snapshot, and the volume then holds no known image.

use super::stream::Image;
use crate::engine::Volume;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const SIDECAR_SUFFIX: &str = ".snapblk-image";
const MARKER_PREFIX: &str = ".image-";

/// Where a file's or device's memory lives.
fn memory_path(target: &Path, data_dir: &Path) -> io::Result<PathBuf> {
    let meta = std::fs::metadata(target)?;
    if meta.file_type().is_block_device() {
        let dev = meta.rdev();
        return Ok(data_dir.join("images").join(format!(
            "dev-{}-{}.json",
            libc::major(dev),
            libc::minor(dev)
        )));
    }
    // Absolute, so the sidecar's directory can be synced.
    let mut name = target.canonicalize()?.into_os_string();
    name.push(SIDECAR_SUFFIX);
    Ok(PathBuf::from(name))
}

/// The image file or device `target` holds, if it is known.
pub fn held(target: &Path, data_dir: &Path) -> io::Result<Option<Image>> {
    let path = memory_path(target, data_dir)?;
    match std::fs::read(&path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Forgets what `target` holds (before writing to it).
pub fn forget(target: &Path, data_dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(memory_path(target, data_dir)?) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Records that `target` now durably holds `image`.
pub fn remember(target: &Path, data_dir: &Path, image: &Image) -> io::Result<()> {
    let path = memory_path(target, data_dir)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec(image).map_err(io::Error::other)?;
    crate::backend::file::replace_atomically(&path, &bytes)
}

fn marker_name(image: &Image) -> String {
    format!(
        "{MARKER_PREFIX}{}-{}-{}",
        image.generation, image.stamp, image.volume
    )
}

fn parse_marker(name: &str) -> Option<Image> {
    let mut parts = name.strip_prefix(MARKER_PREFIX)?.splitn(3, '-');
    Some(Image {
        generation: parts.next()?.parse().ok()?,
        stamp: parts.next()?.parse().ok()?,
        volume: parts.next()?.to_owned(),
    })
}

/// The image volume `vol` holds: the one its marker names, if nothing was
/// written to the volume since.
pub fn volume_holds(vol: &Volume) -> Option<Image> {
    let marker = vol
        .list_snapshots()
        .into_iter()
        .rev()
        .find(|s| s.name.starts_with(MARKER_PREFIX))?;
    let unchanged = vol
        .changed_extents(&marker.name, None, 0, vol.size())
        .is_ok_and(|c| c.is_empty());
    unchanged.then(|| parse_marker(&marker.name)).flatten()
}

/// Drops volume `vol`'s marker (before writing to it).
pub async fn volume_forget(vol: &Volume) -> crate::engine::Result<()> {
    for s in vol.list_snapshots() {
        if s.name.starts_with(MARKER_PREFIX) {
            vol.delete_snapshot(&s.name).await?;
        }
    }
    Ok(())
}

/// Marks volume `vol` as holding `image` now (after its data is durable).
pub async fn volume_remember(vol: &Volume, image: &Image) -> crate::engine::Result<()> {
    volume_forget(vol).await?;
    vol.create_snapshot(&marker_name(image)).await.map(|_| ())
}

/// Refuses an incremental onto `target` (described for people) unless
/// the target holds exactly `base`.
pub fn check_base(held: Option<&Image>, base: &Image, target: &str) -> Result<(), String> {
    match held {
        Some(h) if h == base => Ok(()),
        Some(h) => Err(format!(
            "{target} holds {h}, but this incremental applies onto {base}: apply the streams \
             in order, starting from a full stream (check a chain with `snapblk restore \
             --verify-chain`)"
        )),
        None => Err(format!(
            "{target} holds no image snapblk knows (never restored, cut off half-way, or \
             written since): this incremental applies onto {base}; restore the full stream \
             first"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_a_file_remembers_until_forgotten() {
        let image = Image {
            volume: "db-1".into(),
            generation: 7,
            stamp: 1_700_000_000_123,
        };
        assert_eq!(parse_marker(&marker_name(&image)), Some(image.clone()));
        assert_eq!(parse_marker("s1"), None);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(held(&file, dir.path()).unwrap(), None);
        remember(&file, dir.path(), &image).unwrap();
        assert_eq!(held(&file, dir.path()).unwrap(), Some(image.clone()));
        let other = Image {
            generation: 6,
            ..image.clone()
        };
        let e = check_base(Some(&image), &other, "disk.img").unwrap_err();
        assert!(
            e.contains("generation 7") && e.contains("generation 6"),
            "{e}"
        );
        assert!(check_base(Some(&image), &image, "x").is_ok());
        forget(&file, dir.path()).unwrap();
        forget(&file, dir.path()).unwrap();
        assert!(check_base(held(&file, dir.path()).unwrap().as_ref(), &image, "x").is_err());
    }
}

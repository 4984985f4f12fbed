//! The `restore` request: `snapblk restore STREAM|- --to vol:NAME` writes a
//! backup stream into a volume of the running daemon. The CLI passes the
//! stream's descriptor with the request (SCM_RIGHTS, as `copy start --to -`
//! passes its standard output), so the data never crosses the JSON
//! connection. Every frame is checked ([`StreamReader`]) before it is
//! written through the engine (a `View` of the live volume), so snapshots of
//! the target keep their data; the ranges the stream has no frame for are
//! zeroed with `write_zeroes`, then the volume is flushed.
//!
//! An incremental stream applies only onto a volume that holds its base
//! image and was not written since ([`super::chain`]); the volume
//! remembers the image it received with a marker snapshot.
//!
//! A missing volume is created with the stream's size and chunk size; an
//! existing one must be at least that large and unused (no device on its
//! live image, no NBD connection, no copy job, no replication), and stays
//! claimed ([`Registry::claim_for_restore`]) until the restore ends.
//!
//! Must never: write a volume something else serves or reads; write a
//! frame before its checksum was checked; report success before the flush.

use super::restore::gaps;
use super::stream::{Item, StreamReader};
use crate::runtime::block_on;
use crate::volumes::{validate_name, ErrorKind, Registry, RestoreClaim, VolumeError};
use serde_json::{json, Value};
use std::fs::File;
use std::io::BufReader;
use std::os::fd::OwnedFd;

/// Restores the stream passed with this request (`passed`, sent with
/// SCM_RIGHTS) into volume `name`.
/// `claim` takes the registry's restore claim on the volume, refusing one
/// a copy job or replication uses (they hold it, so the registry's claim
/// alone would give a vaguer message), atomically with `copy.start`.
/// `discard` deletes a volume this restore created when the restore fails
/// (as `volume.delete` does, so never one a job has started on since).
pub fn restore<'r>(
    registry: &'r Registry,
    name: &str,
    passed: Option<OwnedFd>,
    claim: impl FnOnce(&str) -> Result<RestoreClaim<'r>, VolumeError> + Send,
    discard: impl FnOnce(&str) -> Result<Value, VolumeError> + Send,
) -> Result<Value, VolumeError> {
    validate_name("volume", name)?;
    let fd = passed.ok_or_else(|| {
        VolumeError::invalid(
            "restore reads the stream from a descriptor passed with the request; use \
             `snapblk restore STREAM|- --to vol:NAME`",
        )
    })?;
    // Its own thread, as a copy job: a long restore is plain to see in the
    // daemon's threads and runs at background priority.
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name(format!("restore-{name}"))
            .spawn_scoped(s, || {
                super::lower_priority();
                run(registry, name, File::from(fd), claim, discard)
            })
            .map_err(|e| VolumeError::new(ErrorKind::IoError, e.to_string()))?
            .join()
            .unwrap_or_else(|_| {
                Err(VolumeError::new(
                    ErrorKind::IoError,
                    format!("the restore of volume {name} failed unexpectedly; see the log"),
                ))
            })
    })
}

fn run<'r>(
    registry: &'r Registry,
    name: &str,
    input: File,
    claim: impl FnOnce(&str) -> Result<RestoreClaim<'r>, VolumeError> + Send,
    discard: impl FnOnce(&str) -> Result<Value, VolumeError> + Send,
) -> Result<Value, VolumeError> {
    let mut r = StreamReader::open(BufReader::with_capacity(1 << 20, input))
        .map_err(|e| VolumeError::invalid(format!("{e}; nothing was written")))?;
    let h = r.header.clone();
    if let Some(base) = h.base_image() {
        let held = registry
            .volume(name)
            .ok()
            .and_then(|v| super::chain::volume_holds(&v));
        super::chain::check_base(held.as_ref(), &base, &format!("volume {name}"))
            .map_err(|e| VolumeError::invalid(format!("{e}; nothing was written")))?;
    }
    let created = match registry.volume(name) {
        Err(e) if e.kind == ErrorKind::NotFound => {
            registry.create_volume(name, h.volume_size, Some(h.chunk_size), None, None, None)?;
            true
        }
        Err(e) => return Err(e),
        Ok(vol) if vol.size() < h.volume_size => {
            return Err(VolumeError::invalid(format!(
                "volume {name} has {} bytes but the stream's image has {}; restore into a new \
                 volume (it is created with the stream's size) or a larger one",
                vol.size(),
                h.volume_size
            )))
        }
        Ok(_) => false,
    };
    let claim = claim(name)?;
    let written = write_image(&claim, &mut r, created);
    drop(claim);
    let mut e = match written {
        Ok((blocks, bytes)) => {
            return Ok(json!({
                "source": h.source,
                "generation": h.generation,
                "size": h.volume_size,
                "blocks": blocks,
                "bytes": bytes,
                "target": format!("vol:{name}"),
                "created": created,
            }))
        }
        Err(e) => e,
    };
    let discarded = created && discard(name).is_ok();
    e.message = if discarded {
        format!(
            "{}; volume {name} was created for this restore and is deleted again",
            e.message
        )
    } else {
        format!(
            "{}; volume {name} holds a partial image: do not use it (restore again, or delete \
             it with `snapblk volume delete {name}`)",
            e.message
        )
    };
    log::error!("restore into {name}: {}", e.message);
    Err(e)
}

/// Writes the stream's image into the claimed volume; (blocks, bytes).
fn write_image(
    claim: &RestoreClaim<'_>,
    r: &mut StreamReader<BufReader<File>>,
    created: bool,
) -> Result<(u64, u64), VolumeError> {
    let vol = &claim.volume;
    let name = vol.name();
    log::info!(
        "restoring {} generation {} into volume {name}",
        r.header.source,
        r.header.generation
    );
    let view = vol.live();
    block_on(super::chain::volume_forget(vol)).map_err(VolumeError::from)?;
    let mut written: Vec<(u64, u64)> = Vec::new();
    let mut data = Vec::new();
    let blocks = loop {
        match r.next(&mut data) {
            Ok(Item::Block { offset }) => {
                block_on(view.write(offset, &data, false)).map_err(VolumeError::from)?;
                written.push((offset, data.len() as u64));
            }
            Ok(Item::Zero { offset, len }) => {
                block_on(view.write_zeroes(offset, len, false)).map_err(VolumeError::from)?;
            }
            Ok(Item::End { blocks }) => break blocks,
            Err(e) => return Err(VolumeError::invalid(e.to_string())),
        }
    };
    // A new volume reads as zeros already; an old one has its old data
    // where a full stream has no frame, and beyond the stream's size (an
    // incremental's target holds its base there, which is right).
    if !created && r.header.base.is_none() {
        for (start, end) in gaps(&mut written, vol.size()) {
            block_on(view.write_zeroes(start, end - start, false)).map_err(VolumeError::from)?;
        }
    }
    block_on(view.flush()).map_err(VolumeError::from)?;
    block_on(super::chain::volume_remember(vol, &r.header.image())).map_err(VolumeError::from)?;
    let bytes: u64 = written.iter().map(|w| w.1).sum();
    log::info!("restored {blocks} blocks ({bytes} bytes) into volume {name}");
    Ok((blocks, bytes))
}

//! `snapblk restore STREAM|- --to TARGET`: writes a backup stream's image to
//! a file (created or replaced, sparse) or a block device, checking every
//! frame and the footer; an incremental stream only onto the target that
//! holds its base ([`super::chain`]). Runs in the CLI process: no daemon
//! needed (a volume of the daemon is [`super::restore_vol`]'s).
//! `restore --verify-chain` ([`verify_chain`]) checks streams without
//! writing anything.

use super::chain;
use super::stream::{Header, Image, Item, StreamReader};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What a successful restore wrote.
pub struct Restored {
    pub header: Header,
    pub blocks: u64,
    pub bytes: u64,
}

/// Restores `input` into `target`; `data_dir` keeps what block devices
/// hold. The error is a full sentence for people.
pub fn restore(input: impl Read, target: &Path, data_dir: &Path) -> Result<Restored, String> {
    let mut r = StreamReader::open(io::BufReader::with_capacity(1 << 20, input))
        .map_err(|e| format!("{e}; nothing was written"))?;
    let size = r.header.volume_size;
    let is_dev = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    let cannot = |e: io::Error| {
        format!(
            "cannot write {}: {}",
            target.display(),
            crate::cli::strip_os_error(&e.to_string())
        )
    };
    let base = r.header.base_image();
    if let Some(base) = &base {
        let held = match target.exists() {
            true => chain::held(target, data_dir).map_err(cannot)?,
            false => None,
        };
        chain::check_base(held.as_ref(), base, &target.display().to_string())
            .map_err(|e| format!("{e}; nothing was written"))?;
    }
    let file = if is_dev || base.is_some() {
        let f = OpenOptions::new()
            .write(true)
            .open(target)
            .map_err(cannot)?;
        let have = {
            use std::io::{Seek, SeekFrom};
            (&f).seek(SeekFrom::End(0)).map_err(cannot)?
        };
        if have < size {
            return Err(format!(
                "{} holds {have} bytes but the stream's image has {size}; use a larger device",
                target.display()
            ));
        }
        chain::forget(target, data_dir).map_err(cannot)?;
        f
    } else {
        if target.exists() {
            chain::forget(target, data_dir).map_err(cannot)?;
        }
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(super::target::TARGET_MODE)
            .open(target)
            .map_err(|e| cannot(super::target::new_target_hint(e, target)))?;
        f.set_len(size).map_err(cannot)?;
        f
    };
    let mut written: Vec<(u64, u64)> = Vec::new();
    let mut data = Vec::new();
    let partial = |e: String| {
        format!(
            "{e}; {} holds a partial image: do not use it",
            target.display()
        )
    };
    let blocks = loop {
        match r.next(&mut data).map_err(|e| partial(e.to_string()))? {
            Item::Block { offset } => {
                file.write_all_at(&data, offset)
                    .map_err(|e| partial(cannot(e)))?;
                written.push((offset, data.len() as u64));
            }
            Item::Zero { offset, len } => {
                zero_range(&file, offset, offset + len).map_err(|e| partial(cannot(e)))?
            }
            Item::End { blocks } => break blocks,
        }
    };
    if is_dev && base.is_none() {
        zero_gaps(&file, &mut written, size).map_err(|e| partial(cannot(e)))?;
    }
    file.sync_all().map_err(|e| partial(cannot(e)))?;
    chain::remember(target, data_dir, &r.header.image()).map_err(|e| partial(cannot(e)))?;
    Ok(Restored {
        header: r.header,
        blocks,
        bytes: written.iter().map(|w| w.1).sum(),
    })
}

/// A device is not zero where the stream has no frame: zero it there.
fn zero_gaps(file: &File, written: &mut [(u64, u64)], size: u64) -> io::Result<()> {
    for (at, end) in gaps(written, size) {
        zero_range(file, at, end)?;
    }
    Ok(())
}

/// Makes `[at, end)` of a file or device read as zeros: a hole in a file,
/// written zeros on a device.
fn zero_range(file: &File, mut at: u64, end: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, at as i64, (end - at) as i64) } == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    while at < end {
        let n = (end - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// What `--verify-chain` found: each stream's image, checked.
pub struct Link {
    pub path: String,
    pub header: Header,
    pub blocks: u64,
}

/// Checks streams as a chain without writing anything: every frame and
/// footer, the first a full stream, each next one an incremental onto the
/// image the previous one leaves, all of one geometry.
pub fn verify_chain(paths: &[PathBuf]) -> Result<Vec<Link>, String> {
    let mut links: Vec<Link> = Vec::new();
    for path in paths {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|e| {
            format!(
                "cannot open the stream {shown}: {}",
                crate::cli::strip_os_error(&e.to_string())
            )
        })?;
        let mut r = StreamReader::open(io::BufReader::with_capacity(1 << 20, file))
            .map_err(|e| format!("{shown}: {e}"))?;
        let h = r.header.clone();
        let base = h.base_image();
        match (links.last(), &base) {
            (None, Some(base)) => {
                return Err(format!(
                "{shown} is an incremental stream onto {base}; a chain starts with a full stream"
            ))
            }
            (Some(prev), None) => {
                return Err(format!(
                    "{shown} is a full stream; after {} only incrementals follow (start a new \
                     chain with it)",
                    prev.path
                ))
            }
            (Some(prev), Some(base)) => {
                let left: Image = prev.header.image();
                if *base != left || prev.header.volume_size != h.volume_size {
                    return Err(format!(
                        "{shown} applies onto {base}, but {} leaves {left}: the streams are \
                         out of order or from another chain",
                        prev.path
                    ));
                }
            }
            (None, None) => {}
        }
        let mut data = Vec::new();
        let blocks = loop {
            match r.next(&mut data).map_err(|e| format!("{shown}: {e}"))? {
                Item::End { blocks } => break blocks,
                Item::Block { .. } | Item::Zero { .. } => {}
            }
        };
        links.push(Link {
            path: shown,
            header: h,
            blocks,
        });
    }
    Ok(links)
}

/// The ranges `[start, end)` of `[0, size)` that no `(offset, len)` in
/// `written` covers, in order.
pub fn gaps(written: &mut [(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    written.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for &(off, len) in written.iter().chain([&(size, 0)]) {
        if at < off {
            out.push((at, off));
        }
        at = at.max(off + len);
    }
    out
}

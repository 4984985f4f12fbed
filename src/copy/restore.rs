//! `snapblk restore STREAM|- --to TARGET`: writes a backup stream's image to
//! a file (created or replaced, sparse) or a block device, checking every
//! frame and the footer. Runs in the CLI process: no daemon needed (a
//! volume of the daemon is [`super::restore_vol`]'s).

use super::stream::{Header, Item, StreamReader};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a successful restore wrote.
pub struct Restored {
    pub header: Header,
    pub blocks: u64,
    pub bytes: u64,
}

/// Restores `input` into `target`. The error is a full sentence for people.
pub fn restore(input: impl Read, target: &Path) -> Result<Restored, String> {
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
    let file = if is_dev {
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
        f
    } else {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(super::target::TARGET_MODE)
            .open(target)
            .map_err(cannot)?;
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
            Item::End { blocks } => break blocks,
        }
    };
    if is_dev {
        zero_gaps(&file, &mut written, size).map_err(|e| partial(cannot(e)))?;
    }
    file.sync_all().map_err(|e| partial(cannot(e)))?;
    Ok(Restored {
        header: r.header,
        blocks,
        bytes: written.iter().map(|w| w.1).sum(),
    })
}

/// A device is not zero where the stream has no frame: zero it there.
fn zero_gaps(file: &File, written: &mut [(u64, u64)], size: u64) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    for (mut at, end) in gaps(written, size) {
        while at < end {
            let n = (end - at).min(zeros.len() as u64);
            file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
    }
    Ok(())
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

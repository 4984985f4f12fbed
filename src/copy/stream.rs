//! The backup stream format (`--format stream`) and its checking reader.
//!
//! ```text
//! header: "SBLKSTRM" version:u32 volume_size:u64 chunk_size:u32
//!         block_size:u32 generation:u64 name_len:u16 name crc32c(header):u32
//! frame:  "FRME"(u32) offset:u64 length:u32 | data | crc32c(control+data):u32
//! footer: "FOOT"(u32) blocks:u64 crc32c(every byte before the footer):u32
//! ```
//!
//! All integers little-endian. Ranges that read as zeros have no frame; a
//! restore leaves them zero. Frames may come in any order (held writes make
//! their segments go first). The reader checks every field and names the
//! first bad byte of the stream and the volume offset of the block it was in.

use std::fmt;
use std::io::{self, Read};

pub const MAGIC: &[u8; 8] = b"SBLKSTRM";
pub const VERSION: u32 = 1;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FRME");
const FOOTER_MAGIC: u32 = u32::from_le_bytes(*b"FOOT");
/// A frame's control data before its block.
pub const FRAME_HEAD: usize = 16;
/// A frame's control data after its block.
pub const FRAME_TAIL: usize = 4;
/// The largest block a frame may carry (the largest `--block-size`).
pub const MAX_BLOCK: u32 = 64 << 20;

/// What the stream's header says about the image it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub volume_size: u64,
    pub chunk_size: u32,
    pub block_size: u32,
    pub generation: u64,
    pub source: String,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.source.len());
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&self.volume_size.to_le_bytes());
        v.extend_from_slice(&self.chunk_size.to_le_bytes());
        v.extend_from_slice(&self.block_size.to_le_bytes());
        v.extend_from_slice(&self.generation.to_le_bytes());
        v.extend_from_slice(&(self.source.len() as u16).to_le_bytes());
        v.extend_from_slice(self.source.as_bytes());
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }
}

/// The control data before a block.
pub fn frame_head(offset: u64, len: u32) -> [u8; FRAME_HEAD] {
    let mut h = [0u8; FRAME_HEAD];
    h[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    h[4..12].copy_from_slice(&offset.to_le_bytes());
    h[12..].copy_from_slice(&len.to_le_bytes());
    h
}

/// The control data after a block: crc32c of the head and the data.
pub fn frame_tail(head: &[u8; FRAME_HEAD], data: &[u8]) -> [u8; FRAME_TAIL] {
    crc32c::crc32c_append(crc32c::crc32c(head), data).to_le_bytes()
}

/// The footer, given the block count and the crc32c of everything before it.
pub fn footer(blocks: u64, whole: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&FOOTER_MAGIC.to_le_bytes());
    v.extend_from_slice(&blocks.to_le_bytes());
    v.extend_from_slice(&whole.to_le_bytes());
    v
}

/// Why a stream cannot be trusted, and where.
#[derive(Debug)]
pub struct StreamError {
    /// Byte offset in the stream of the first bad byte (or where it ended).
    pub at: u64,
    /// The volume offset of the block being read, if inside a frame.
    pub volume_offset: Option<u64>,
    pub what: String,
    pub truncated: bool,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.truncated {
            write!(
                f,
                "the backup stream is truncated: it ends at byte {}",
                self.at
            )?;
        } else {
            write!(f, "the backup stream is corrupt at byte {}", self.at)?;
        }
        if let Some(o) = self.volume_offset {
            write!(f, " (in the block for volume offset {o})")?;
        }
        write!(f, ": {}", self.what)
    }
}

impl std::error::Error for StreamError {}

/// One element read from a stream.
pub enum Item {
    /// A block, checked: `data` holds it.
    Block { offset: u64 },
    /// The footer, checked: the stream is complete.
    End { blocks: u64 },
}

/// Reads and checks a stream front to back.
pub struct StreamReader<R: Read> {
    r: R,
    pos: u64,
    crc: u32,
    blocks: u64,
    pub header: Header,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn open(r: R) -> Result<Self, StreamError> {
        let mut s = StreamReader {
            r,
            pos: 0,
            crc: 0,
            blocks: 0,
            header: Header {
                volume_size: 0,
                chunk_size: 0,
                block_size: 0,
                generation: 0,
                source: String::new(),
            },
        };
        let mut fixed = [0u8; 38];
        s.fill(&mut fixed, None)?;
        if &fixed[..8] != MAGIC {
            return Err(s.bad(0, None, "not a snapblk backup stream (bad magic)"));
        }
        let version = u32::from_le_bytes(fixed[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(s.bad(
                8,
                None,
                &format!("stream version {version}; this snapblk reads version {VERSION}"),
            ));
        }
        let name_len = u16::from_le_bytes(fixed[36..38].try_into().unwrap()) as usize;
        let mut name = vec![0u8; name_len];
        s.fill(&mut name, None)?;
        let mut crc = [0u8; 4];
        s.fill(&mut crc, None)?;
        let mut all = fixed.to_vec();
        all.extend_from_slice(&name);
        if crc32c::crc32c(&all) != u32::from_le_bytes(crc) {
            return Err(s.bad(0, None, "the header's checksum does not match"));
        }
        s.header = Header {
            volume_size: u64::from_le_bytes(fixed[12..20].try_into().unwrap()),
            chunk_size: u32::from_le_bytes(fixed[20..24].try_into().unwrap()),
            block_size: u32::from_le_bytes(fixed[24..28].try_into().unwrap()),
            generation: u64::from_le_bytes(fixed[28..36].try_into().unwrap()),
            source: String::from_utf8_lossy(&name).into_owned(),
        };
        Ok(s)
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Frames read so far.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// crc32c of every byte read so far.
    pub fn crc(&self) -> u32 {
        self.crc
    }

    fn bad(&self, at: u64, volume_offset: Option<u64>, what: &str) -> StreamError {
        StreamError {
            at,
            volume_offset,
            what: what.to_string(),
            truncated: false,
        }
    }

    fn fill(&mut self, buf: &mut [u8], volume_offset: Option<u64>) -> Result<(), StreamError> {
        let mut done = 0;
        while done < buf.len() {
            match self.r.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(StreamError {
                        at: self.pos + done as u64,
                        volume_offset,
                        what: "more data was expected (no footer)".into(),
                        truncated: true,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(self.bad(
                        self.pos + done as u64,
                        volume_offset,
                        &format!("cannot read it: {e}"),
                    ))
                }
            }
        }
        self.crc = crc32c::crc32c_append(self.crc, buf);
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Reads the next frame into `data` (or the footer, then checks that
    /// nothing follows).
    pub fn next(&mut self, data: &mut Vec<u8>) -> Result<Item, StreamError> {
        let start = self.pos;
        let crc_before = self.crc;
        let mut magic = [0u8; 4];
        self.fill(&mut magic, None)?;
        match u32::from_le_bytes(magic) {
            FRAME_MAGIC => {
                let mut head = [0u8; FRAME_HEAD];
                head[..4].copy_from_slice(&magic);
                self.fill(&mut head[4..], None)?;
                let offset = u64::from_le_bytes(head[4..12].try_into().unwrap());
                let len = u32::from_le_bytes(head[12..16].try_into().unwrap());
                let fits = offset
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= self.header.volume_size);
                if len == 0 || len > MAX_BLOCK || !fits || offset % 512 != 0 || len % 512 != 0 {
                    return Err(self.bad(
                        start + 4,
                        None,
                        &format!(
                            "a block at offset {offset} of length {len} does not fit a volume of {} bytes",
                            self.header.volume_size
                        ),
                    ));
                }
                data.resize(len as usize, 0);
                self.fill(data, Some(offset))?;
                let mut tail = [0u8; FRAME_TAIL];
                self.fill(&mut tail, Some(offset))?;
                if frame_tail(&head, data) != tail {
                    return Err(self.bad(
                        start,
                        Some(offset),
                        "the block's checksum does not match its data",
                    ));
                }
                self.blocks += 1;
                Ok(Item::Block { offset })
            }
            FOOTER_MAGIC => {
                let mut rest = [0u8; 12];
                self.fill(&mut rest, None)?;
                let blocks = u64::from_le_bytes(rest[..8].try_into().unwrap());
                let whole = u32::from_le_bytes(rest[8..].try_into().unwrap());
                if blocks != self.blocks {
                    return Err(self.bad(
                        start,
                        None,
                        &format!(
                            "the footer counts {blocks} blocks but the stream has {}",
                            self.blocks
                        ),
                    ));
                }
                if whole != crc_before {
                    return Err(self.bad(
                        start,
                        None,
                        "the checksum of the whole stream does not match",
                    ));
                }
                let mut extra = [0u8; 1];
                if matches!(self.r.read(&mut extra), Ok(n) if n > 0) {
                    return Err(self.bad(self.pos, None, "data follows the footer"));
                }
                Ok(Item::End { blocks })
            }
            _ => Err(self.bad(
                start,
                None,
                "expected a block or the footer (bad frame magic)",
            )),
        }
    }
}

/// Sequential reads of a file from an offset, without moving its position.
pub struct ReadFrom(pub std::fs::File, pub u64);

impl Read for ReadFrom {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.0.read_at(buf, self.1)?;
        self.1 += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let header = Header {
            volume_size: 1 << 20,
            chunk_size: 65536,
            block_size: 65536,
            generation: 3,
            source: "v".into(),
        };
        let mut s = header.encode();
        for (off, byte) in [(65536u64, 7u8), (0, 9)] {
            let data = vec![byte; 65536];
            let head = frame_head(off, data.len() as u32);
            s.extend_from_slice(&head);
            s.extend_from_slice(&data);
            s.extend_from_slice(&frame_tail(&head, &data));
        }
        let whole = crc32c::crc32c(&s);
        s.extend_from_slice(&footer(2, whole));
        s
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<u64>, StreamError> {
        let mut r = StreamReader::open(bytes)?;
        let mut data = Vec::new();
        let mut offsets = Vec::new();
        loop {
            match r.next(&mut data)? {
                Item::Block { offset } => offsets.push(offset),
                Item::End { blocks } => {
                    assert_eq!(blocks, offsets.len() as u64);
                    return Ok(offsets);
                }
            }
        }
    }

    #[test]
    fn round_trip_and_every_flipped_byte_or_cut_is_caught() {
        let s = sample();
        assert_eq!(read_all(&s).unwrap(), [65536, 0]);
        for at in (0..s.len()).step_by(997).chain([s.len() - 1, 40, 60]) {
            let mut bad = s.clone();
            bad[at] ^= 0x40;
            let e = read_all(&bad).unwrap_err();
            assert!(!e.truncated, "flip at {at}: {e}");
        }
        for cut in [0, 10, 60, 70000, s.len() - 1] {
            let e = read_all(&s[..cut]).unwrap_err();
            assert!(e.truncated, "cut at {cut}: {e}");
            assert!(e.to_string().contains(&format!("byte {cut}")), "{e}");
        }
        let mut bad = s.clone();
        bad[s.len() - 30] ^= 1; // inside the second block (volume offset 0)
        let e = read_all(&bad).unwrap_err();
        assert!(e.to_string().contains("volume offset 0"), "{e}");
    }
}

//! The backup stream format (`--format stream`) and its checking reader.
//!
//! ```text
//! header: "SBLKSTRM" version:u32 volume_size:u64 chunk_size:u32
//!         block_size:u32 generation:u64 name_len:u16 name
//!         volume_len:u16 volume stamp:u64                      (version 2)
//!         kind:u8 base_generation:u64 base_stamp:u64           (version 2)
//!         crc32c(header):u32
//! frame:  "FRME"(u32) offset:u64 length:u32 | data | crc32c(control+data):u32
//! zeros:  "ZERO"(u32) offset:u64 length:u32 crc32c(control):u32  (version 2)
//! footer: "FOOT"(u32) blocks:u64 crc32c(every byte before the footer):u32
//! ```
//!
//! All integers little-endian. A full stream (kind 0) has no frame for
//! ranges that read as zeros; a restore leaves them zero. An incremental
//! stream (kind 1, `copy start --since`) carries only what changed since
//! its base image, zeroed ranges as ZERO frames, and applies only onto a
//! target that holds exactly that base. An image is named by its volume,
//! the snapshot's generation and its creation time in ms (the stamp), so a
//! volume deleted and made again under the same name is another volume.
//! Frames may come in any order (held writes make their segments go
//! first); `blocks` counts both kinds. The reader checks every field and
//! names the first bad byte of the stream and the volume offset of the
//! block it was in. It reads version 1 streams (full, without identity).

use std::fmt;
use std::io::{self, Read};

pub const MAGIC: &[u8; 8] = b"SBLKSTRM";
pub const VERSION: u32 = 2;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FRME");
const ZERO_MAGIC: u32 = u32::from_le_bytes(*b"ZERO");
const FOOTER_MAGIC: u32 = u32::from_le_bytes(*b"FOOT");
/// A frame's control data before its block.
pub const FRAME_HEAD: usize = 16;
/// A frame's control data after its block.
pub const FRAME_TAIL: usize = 4;
/// The largest block a frame may carry (the largest `--block-size`).
pub const MAX_BLOCK: u32 = 64 << 20;

/// One point-in-time image of a volume, as streams and the targets that
/// hold them name it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Image {
    pub volume: String,
    pub generation: u64,
    /// The snapshot's creation time (ms since the epoch); 0 if unknown.
    pub stamp: u64,
}

impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "volume {} generation {} (stamp {})",
            self.volume, self.generation, self.stamp
        )
    }
}

/// What the stream's header says about the image it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub volume_size: u64,
    pub chunk_size: u32,
    pub block_size: u32,
    pub generation: u64,
    /// `VOL` or `VOL@SNAP`, for people.
    pub source: String,
    pub volume: String,
    pub stamp: u64,
    /// An incremental stream's base: (generation, stamp) of the same volume.
    pub base: Option<(u64, u64)>,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(96 + self.source.len() + self.volume.len());
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&self.volume_size.to_le_bytes());
        v.extend_from_slice(&self.chunk_size.to_le_bytes());
        v.extend_from_slice(&self.block_size.to_le_bytes());
        v.extend_from_slice(&self.generation.to_le_bytes());
        v.extend_from_slice(&(self.source.len() as u16).to_le_bytes());
        v.extend_from_slice(self.source.as_bytes());
        v.extend_from_slice(&(self.volume.len() as u16).to_le_bytes());
        v.extend_from_slice(self.volume.as_bytes());
        v.extend_from_slice(&self.stamp.to_le_bytes());
        let (base_generation, base_stamp) = self.base.unwrap_or((0, 0));
        v.push(self.base.is_some() as u8);
        v.extend_from_slice(&base_generation.to_le_bytes());
        v.extend_from_slice(&base_stamp.to_le_bytes());
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// The image a restore of this stream leaves.
    pub fn image(&self) -> Image {
        Image {
            volume: self.volume.clone(),
            generation: self.generation,
            stamp: self.stamp,
        }
    }

    /// The image an incremental stream applies onto.
    pub fn base_image(&self) -> Option<Image> {
        self.base.map(|(generation, stamp)| Image {
            volume: self.volume.clone(),
            generation,
            stamp,
        })
    }
}

/// The control data of a ZERO frame: its head and the head's crc32c.
pub fn zero_frame(offset: u64, len: u32) -> [u8; FRAME_HEAD + FRAME_TAIL] {
    let mut f = [0u8; FRAME_HEAD + FRAME_TAIL];
    f[..4].copy_from_slice(&ZERO_MAGIC.to_le_bytes());
    f[4..12].copy_from_slice(&offset.to_le_bytes());
    f[12..16].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&f[..FRAME_HEAD]);
    f[FRAME_HEAD..].copy_from_slice(&crc.to_le_bytes());
    f
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
    /// A range that reads as zeros now (incremental streams), checked.
    Zero { offset: u64, len: u64 },
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
                volume: String::new(),
                stamp: 0,
                base: None,
            },
        };
        let mut fixed = [0u8; 38];
        s.fill(&mut fixed, None)?;
        if &fixed[..8] != MAGIC {
            return Err(s.bad(0, None, "not a snapblk backup stream (bad magic)"));
        }
        let version = u32::from_le_bytes(fixed[8..12].try_into().unwrap());
        if version != 1 && version != VERSION {
            return Err(s.bad(
                8,
                None,
                &format!("stream version {version}; this snapblk reads version {VERSION}"),
            ));
        }
        let name_len = u16::from_le_bytes(fixed[36..38].try_into().unwrap()) as usize;
        let mut name = vec![0u8; name_len];
        s.fill(&mut name, None)?;
        let source = String::from_utf8_lossy(&name).into_owned();
        let mut all = fixed.to_vec();
        all.extend_from_slice(&name);
        let (mut volume, mut stamp, mut base) = (String::new(), 0, None);
        if version >= 2 {
            let mut len = [0u8; 2];
            s.fill(&mut len, None)?;
            let mut ext = vec![0u8; u16::from_le_bytes(len) as usize + 25];
            s.fill(&mut ext, None)?;
            all.extend_from_slice(&len);
            all.extend_from_slice(&ext);
            let (name, rest) = ext.split_at(ext.len() - 25);
            volume = String::from_utf8_lossy(name).into_owned();
            let u64_at = |i: usize| u64::from_le_bytes(rest[i..i + 8].try_into().unwrap());
            stamp = u64_at(0);
            base = match rest[8] {
                0 => None,
                1 => Some((u64_at(9), u64_at(17))),
                kind => {
                    let at = all.len() as u64 - 17;
                    return Err(s.bad(at, None, &format!("unknown stream kind {kind}")));
                }
            };
        }
        let mut crc = [0u8; 4];
        s.fill(&mut crc, None)?;
        if crc32c::crc32c(&all) != u32::from_le_bytes(crc) {
            return Err(s.bad(0, None, "the header's checksum does not match"));
        }
        if version == 1 {
            volume = source.split('@').next().unwrap_or_default().to_owned();
        }
        s.header = Header {
            volume_size: u64::from_le_bytes(fixed[12..20].try_into().unwrap()),
            chunk_size: u32::from_le_bytes(fixed[20..24].try_into().unwrap()),
            block_size: u32::from_le_bytes(fixed[24..28].try_into().unwrap()),
            generation: u64::from_le_bytes(fixed[28..36].try_into().unwrap()),
            source,
            volume,
            stamp,
            base,
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

    /// Reads the rest of a frame's head (its magic already read at
    /// `start`): the head, and the sector-aligned range it names, which must
    /// lie inside the volume and be at most `max_len` long.
    fn frame_head(
        &mut self,
        magic: [u8; 4],
        start: u64,
        max_len: u32,
        what: &str,
    ) -> Result<([u8; FRAME_HEAD], u64, u32), StreamError> {
        let mut head = [0u8; FRAME_HEAD];
        head[..4].copy_from_slice(&magic);
        self.fill(&mut head[4..], None)?;
        let offset = u64::from_le_bytes(head[4..12].try_into().unwrap());
        let len = u32::from_le_bytes(head[12..16].try_into().unwrap());
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.header.volume_size);
        if len == 0 || len > max_len || !fits || offset % 512 != 0 || len % 512 != 0 {
            return Err(self.bad(
                start + 4,
                None,
                &format!(
                    "{what} at offset {offset} of length {len} does not fit a volume of {} bytes",
                    self.header.volume_size
                ),
            ));
        }
        Ok((head, offset, len))
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
                let (head, offset, len) = self.frame_head(magic, start, MAX_BLOCK, "a block")?;
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
            ZERO_MAGIC => {
                let (head, offset, len) =
                    self.frame_head(magic, start, u32::MAX, "a zeroed range")?;
                let mut tail = [0u8; FRAME_TAIL];
                self.fill(&mut tail, Some(offset))?;
                if crc32c::crc32c(&head).to_le_bytes() != tail {
                    return Err(self.bad(
                        start,
                        Some(offset),
                        "the zeroed range's checksum does not match",
                    ));
                }
                self.blocks += 1;
                Ok(Item::Zero {
                    offset,
                    len: len as u64,
                })
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

    fn header() -> Header {
        Header {
            volume_size: 1 << 20,
            chunk_size: 65536,
            block_size: 65536,
            generation: 3,
            source: "v@s3".into(),
            volume: "v".into(),
            stamp: 1234,
            base: Some((2, 1000)),
        }
    }

    fn sample() -> Vec<u8> {
        let mut s = header().encode();
        for (off, byte) in [(65536u64, 7u8), (0, 9)] {
            let data = vec![byte; 65536];
            let head = frame_head(off, data.len() as u32);
            s.extend_from_slice(&head);
            s.extend_from_slice(&data);
            s.extend_from_slice(&frame_tail(&head, &data));
        }
        s.extend_from_slice(&zero_frame(131072, 65536));
        let whole = crc32c::crc32c(&s);
        s.extend_from_slice(&footer(3, whole));
        s
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<u64>, StreamError> {
        let mut r = StreamReader::open(bytes)?;
        let mut data = Vec::new();
        let mut offsets = Vec::new();
        loop {
            match r.next(&mut data)? {
                Item::Block { offset } | Item::Zero { offset, .. } => offsets.push(offset),
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
        assert_eq!(read_all(&s).unwrap(), [65536, 0, 131072]);
        let r = StreamReader::open(&s[..]).unwrap();
        assert_eq!(r.header, header());
        let base = r.header.base_image().unwrap();
        assert_eq!(
            (base.volume.as_str(), base.generation, base.stamp),
            ("v", 2, 1000)
        );
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
        bad[s.len() - 60] ^= 1; // inside the second block (volume offset 0)
        let e = read_all(&bad).unwrap_err();
        assert!(e.to_string().contains("volume offset 0"), "{e}");
    }

    /// Streams written before identities and incrementals still restore.
    #[test]
    fn a_version_1_stream_reads_as_a_full_stream() {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&(1u64 << 20).to_le_bytes());
        v.extend_from_slice(&65536u32.to_le_bytes());
        v.extend_from_slice(&65536u32.to_le_bytes());
        v.extend_from_slice(&5u64.to_le_bytes());
        v.extend_from_slice(&6u16.to_le_bytes());
        v.extend_from_slice(b"vol@s5");
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        let whole = crc32c::crc32c(&v);
        v.extend_from_slice(&footer(0, whole));
        let r = StreamReader::open(&v[..]).unwrap();
        assert_eq!(r.header.image().volume, "vol");
        assert_eq!(r.header.base, None);
        assert_eq!(read_all(&v).unwrap(), Vec::<u64>::new());
    }
}

//! The replication wire protocol: frames, messages and the key handshake.
//!
//! Every message is one frame: a 16-byte header (magic `SBRP`, kind, payload
//! length, crc32c of kind and payload) and the payload. A frame whose magic,
//! length or checksum is wrong, or whose payload does not parse completely,
//! is an error: the receiver drops the connection before the frame touches
//! staging or the replica.
//!
//! Handshake (mutual HMAC-SHA256 challenge-response over a shared key, before
//! any data): the source sends `Hello` with a random nonce; the destination
//! answers `Challenge` with its own nonce and its proof
//! `HMAC(key, "snapblk-repl dest" | source nonce | dest nonce)`; the source
//! checks it (so it never ships data to an impostor) and answers `Proof` with
//! `HMAC(key, "snapblk-repl source" | dest nonce | source nonce)`; the
//! destination checks that and answers `Welcome` or `Refused`. The key never
//! crosses the wire and is never logged.
//!
//! After the handshake: `Open` (JSON: who the source is, which destination
//! volume) -> `Opened` (JSON: the last CP the replica applied); then any
//! number of `Transfer` -> `TransferAck` and `CpCommit` -> `CpAck`.
//!
//! Version 2: a CP carries its replication block size (a setting of the
//! link, at most the volume's chunk), and a reference sets a run of blocks
//! from part of one piece, so a multi-block write or a run of blocks sent
//! whole costs one entry.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::io::{self, Read, Write};

pub const MAGIC: u32 = 0x5342_5250; // "SBRP"
pub const VERSION: u32 = 2;
pub const HEADER: usize = 16;
/// The largest payload either side accepts.
pub const MAX_PAYLOAD: usize = 64 << 20;
pub const NONCE: usize = 32;
/// The shortest key accepted (bytes, after trimming whitespace).
pub const MIN_KEY: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Challenge = 2,
    Proof = 3,
    Welcome = 4,
    Refused = 5,
    Open = 6,
    Opened = 7,
    Transfer = 8,
    TransferAck = 9,
    CpCommit = 10,
    CpAck = 11,
    Error = 12,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        [
            Hello,
            Challenge,
            Proof,
            Welcome,
            Refused,
            Open,
            Opened,
            Transfer,
            TransferAck,
            CpCommit,
            CpAck,
            Error,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn checksum(kind: u8, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload)
}

/// The bytes of one frame.
pub fn encode_frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&[kind as u8, 0, 0, 0]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(kind as u8, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads one frame; any malformation is an `InvalidData` error.
pub fn read_frame(r: &mut impl Read) -> io::Result<(Kind, Vec<u8>)> {
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h)?;
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    if word(0) != MAGIC {
        return Err(bad(format!("bad frame magic {:#x}", word(0))));
    }
    let kind = Kind::from_u8(h[4]).ok_or_else(|| bad(format!("unknown frame kind {}", h[4])))?;
    let len = word(8) as usize;
    if len > MAX_PAYLOAD {
        return Err(bad(format!(
            "frame of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        )));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            bad(format!("truncated frame: {len} payload bytes announced"))
        } else {
            e
        }
    })?;
    if checksum(h[4], &payload) != word(12) {
        return Err(bad(format!("{kind:?} frame fails its crc32c check")));
    }
    Ok((kind, payload))
}

/// Reads one frame and insists on its kind; an `Error` or `Refused` frame
/// from the peer becomes an error carrying the peer's message.
pub fn expect(r: &mut impl Read, want: Kind) -> io::Result<Vec<u8>> {
    let (kind, payload) = read_frame(r)?;
    match kind {
        k if k == want => Ok(payload),
        Kind::Error | Kind::Refused => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        k => Err(bad(format!("expected a {want:?} frame, got {k:?}"))),
    }
}

pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<usize> {
    let frame = encode_frame(kind, payload);
    w.write_all(&frame)?;
    Ok(frame.len())
}

pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("wire messages serialize")
}

pub fn from_json<T: for<'a> Deserialize<'a>>(payload: &[u8]) -> io::Result<T> {
    serde_json::from_slice(payload).map_err(|e| bad(format!("bad message: {e}")))
}

/// `Open`: the source names itself and the replica it wants.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Open {
    pub source_id: String,
    pub source_volume: String,
    pub dest_volume: String,
    pub size: u64,
    /// The chunk size a replica volume is created with.
    pub chunk_size: u32,
    /// The link's replication block size (also in every CP).
    pub block_size: u32,
    pub keep_cps: u32,
}

/// `Opened`: where the replica stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Opened {
    pub last_applied_cp: Option<u64>,
    /// Transfer ids from here on are unused on the replica.
    pub next_tid: u64,
}

// ---- the key handshake ----

/// Reads a key file: its content with surrounding whitespace trimmed.
pub fn read_key(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read the replication key file {}: {}",
            path.display(),
            crate::cli::strip_os_error(&e.to_string())
        )
    })?;
    let key = raw.trim_ascii().to_vec();
    if key.len() < MIN_KEY {
        return Err(format!(
            "the replication key file {} holds {} bytes; use at least {MIN_KEY} random bytes \
             (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
            path.display(),
            key.len()
        ));
    }
    Ok(key)
}

fn mac(key: &[u8], role: &[u8], a: &[u8], b: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"snapblk-repl ");
    mac.update(role);
    mac.update(a);
    mac.update(b);
    mac
}

fn proof(key: &[u8], role: &[u8], a: &[u8], b: &[u8]) -> [u8; 32] {
    mac(key, role, a, b).finalize().into_bytes().into()
}

/// Checks a peer's proof in constant time.
fn verify(key: &[u8], role: &[u8], a: &[u8], b: &[u8], claimed: &[u8]) -> bool {
    mac(key, role, a, b).verify_slice(claimed).is_ok()
}

pub fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    let mut filled = 0;
    while filled < NONCE {
        // SAFETY: getrandom writes at most the given length into `n`.
        let r = unsafe {
            libc::getrandom(
                n[filled..].as_mut_ptr() as *mut libc::c_void,
                NONCE - filled,
                0,
            )
        };
        if r > 0 {
            filled += r as usize;
        }
    }
    n
}

/// Source side of the handshake; returns the bytes it sent. A destination
/// that cannot prove the key, or refuses ours, is an error.
pub fn authenticate_to_destination<S: Read + Write>(s: &mut S, key: &[u8]) -> io::Result<usize> {
    let ours = nonce();
    let mut hello = VERSION.to_le_bytes().to_vec();
    hello.extend_from_slice(&ours);
    let mut sent = write_frame(s, Kind::Hello, &hello)?;
    let challenge = expect(s, Kind::Challenge)?;
    if challenge.len() != NONCE + 32 {
        return Err(bad("malformed challenge"));
    }
    let (theirs, their_proof) = challenge.split_at(NONCE);
    if !verify(key, b"dest", &ours, theirs, their_proof) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "authentication failed: the destination does not know our key (wrong key on one side?)",
        ));
    }
    sent += write_frame(s, Kind::Proof, &proof(key, b"source", theirs, &ours))?;
    expect(s, Kind::Welcome)?;
    Ok(sent)
}

/// Destination side of the handshake: `Ok(())` once the peer proved the key;
/// on a wrong proof it answers `Refused` and returns a `PermissionDenied` error.
pub fn authenticate_source<S: Read + Write>(s: &mut S, key: &[u8]) -> io::Result<()> {
    let hello = expect(s, Kind::Hello)?;
    if hello.len() != 4 + NONCE {
        return Err(bad("malformed hello"));
    }
    let version = u32::from_le_bytes(hello[..4].try_into().unwrap());
    if version != VERSION {
        let msg =
            format!("protocol version {version} is not supported (this daemon speaks {VERSION})");
        write_frame(s, Kind::Refused, msg.as_bytes())?;
        return Err(bad(msg));
    }
    let theirs = &hello[4..];
    let ours = nonce();
    let mut challenge = ours.to_vec();
    challenge.extend_from_slice(&proof(key, b"dest", theirs, &ours));
    write_frame(s, Kind::Challenge, &challenge)?;
    let claimed = expect(s, Kind::Proof).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the peer hung up after our challenge: it could not verify our key (wrong key?)",
            )
        } else {
            e
        }
    })?;
    if !verify(key, b"source", &ours, theirs, &claimed) {
        let _ = write_frame(
            s,
            Kind::Refused,
            b"authentication failed: the destination refused our key (wrong key on one side?)",
        );
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "wrong key (the peer's proof does not match this daemon's replication key)",
        ));
    }
    write_frame(s, Kind::Welcome, &[])?;
    Ok(())
}

// ---- transfers and consistency points ----

/// One piece of a transfer: `data` belongs at byte `offset` of the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u32,
    /// Where the data starts in the transfer's payload.
    pub at: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| bad("truncated message"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn done(&self) -> io::Result<()> {
        if self.at != self.buf.len() {
            return Err(bad("trailing bytes after the message"));
        }
        Ok(())
    }
}

/// Encodes a transfer: id, piece count, then each piece (offset, length, data).
pub fn encode_transfer(tid: u64, pieces: &[(u64, &[u8])]) -> Vec<u8> {
    let total: usize = pieces.iter().map(|(_, d)| d.len() + 12).sum();
    let mut out = Vec::with_capacity(12 + total);
    out.extend_from_slice(&tid.to_le_bytes());
    out.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    for (offset, data) in pieces {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// Parses a transfer and checks every piece lies inside a volume of `size`
/// bytes on 512-byte boundaries.
pub fn decode_transfer(payload: &[u8], size: u64) -> io::Result<(u64, Vec<Piece>)> {
    let mut c = Cursor {
        buf: payload,
        at: 0,
    };
    let tid = c.u64()?;
    let n = c.u32()? as usize;
    let mut pieces = Vec::with_capacity(n.min(payload.len() / 12));
    for _ in 0..n {
        let offset = c.u64()?;
        let len = c.u32()?;
        let at = c.at;
        c.take(len as usize)?;
        if !offset.is_multiple_of(512)
            || !len.is_multiple_of(512)
            || offset.checked_add(len as u64).is_none_or(|e| e > size)
        {
            return Err(bad(format!(
                "transfer {tid}: piece at {offset}+{len} is misaligned or beyond the volume's {size} bytes"
            )));
        }
        pieces.push(Piece { offset, len, at });
    }
    c.done()?;
    Ok((tid, pieces))
}

/// What a consistency point sets a run of blocks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpEntry {
    /// Blocks `block .. block + count` := the bytes of piece `index` of
    /// transfer `tid` that belong at their offsets (the piece covers them).
    Ref {
        block: u64,
        count: u64,
        tid: u64,
        index: u32,
    },
    /// Blocks `block .. block + count` read as zeros.
    Zero { block: u64, count: u64 },
}

/// A consistency point's block set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpCommit {
    pub cp: u64,
    /// Transfers below this id are referenced by no later CP.
    pub keep_from_tid: u64,
    /// The size of the blocks the entries count in.
    pub block_size: u32,
    pub entries: Vec<CpEntry>,
}

/// Bytes of one encoded entry: kind, block, count, tid, index.
const ENTRY: usize = 1 + 8 + 8 + 8 + 4;

pub fn encode_cp(cp: &CpCommit) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + cp.entries.len() * ENTRY);
    out.extend_from_slice(&cp.cp.to_le_bytes());
    out.extend_from_slice(&cp.keep_from_tid.to_le_bytes());
    out.extend_from_slice(&cp.block_size.to_le_bytes());
    out.extend_from_slice(&(cp.entries.len() as u32).to_le_bytes());
    for e in &cp.entries {
        let (kind, block, count, tid, index) = match *e {
            CpEntry::Ref {
                block,
                count,
                tid,
                index,
            } => (0u8, block, count, tid, index),
            CpEntry::Zero { block, count } => (1u8, block, count, 0, 0),
        };
        out.push(kind);
        out.extend_from_slice(&block.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&tid.to_le_bytes());
        out.extend_from_slice(&index.to_le_bytes());
    }
    out
}

pub fn decode_cp(payload: &[u8]) -> io::Result<CpCommit> {
    let mut c = Cursor {
        buf: payload,
        at: 0,
    };
    let cp = c.u64()?;
    let keep_from_tid = c.u64()?;
    let block_size = c.u32()?;
    if !block_size.is_power_of_two() || block_size < 512 {
        return Err(bad(format!(
            "CP {cp}: block size {block_size} is not a power of two of at least 512"
        )));
    }
    let n = c.u32()? as usize;
    let mut entries = Vec::with_capacity(n.min(payload.len() / ENTRY));
    for _ in 0..n {
        let kind = c.take(1)?[0];
        let block = c.u64()?;
        let count = c.u64()?;
        let tid = c.u64()?;
        let index = c.u32()?;
        if count == 0 {
            return Err(bad(format!(
                "CP {cp}: an entry of no blocks at block {block}"
            )));
        }
        entries.push(match kind {
            0 => CpEntry::Ref {
                block,
                count,
                tid,
                index,
            },
            1 => CpEntry::Zero { block, count },
            k => return Err(bad(format!("CP {cp}: unknown entry kind {k}"))),
        });
    }
    c.done()?;
    Ok(CpCommit {
        cp,
        keep_from_tid,
        block_size,
        entries,
    })
}

pub fn u64_payload(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

pub fn parse_u64(payload: &[u8]) -> io::Result<u64> {
    let b: [u8; 8] = payload.try_into().map_err(|_| bad("expected 8 bytes"))?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn frames_round_trip_and_reject_corruption() {
        let f = encode_frame(Kind::Transfer, b"hello");
        let (k, p) = read_frame(&mut &f[..]).unwrap();
        assert_eq!((k, &p[..]), (Kind::Transfer, &b"hello"[..]));
        let mut flipped = f.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let e = read_frame(&mut &flipped[..]).unwrap_err();
        assert!(e.to_string().contains("crc32c"), "{e}");
        let e = read_frame(&mut &f[..f.len() - 1]).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut magic = f.clone();
        magic[0] = 0;
        assert!(read_frame(&mut &magic[..]).is_err());
    }

    #[test]
    fn transfers_and_cps_round_trip_and_check_bounds() {
        let a = vec![7u8; 1024];
        let t = encode_transfer(9, &[(4096, &a), (0, &a[..512])]);
        let (tid, pieces) = decode_transfer(&t, 8192).unwrap();
        assert_eq!(tid, 9);
        assert_eq!(pieces.len(), 2);
        assert_eq!(&t[pieces[0].at..pieces[0].at + 1024], &a[..]);
        assert!(decode_transfer(&t, 4096).is_err(), "beyond the volume");
        assert!(decode_transfer(&t[..t.len() - 1], 8192).is_err());
        let cp = CpCommit {
            cp: 3,
            keep_from_tid: 10,
            block_size: 4096,
            entries: vec![
                CpEntry::Ref {
                    block: 1,
                    count: 2,
                    tid: 9,
                    index: 0,
                },
                CpEntry::Zero { block: 3, count: 5 },
            ],
        };
        assert_eq!(decode_cp(&encode_cp(&cp)).unwrap(), cp);
        assert!(decode_cp(&encode_cp(&cp)[..30]).is_err());
        let odd = CpCommit {
            block_size: 3000,
            ..cp.clone()
        };
        assert!(decode_cp(&encode_cp(&odd)).is_err(), "not a power of two");
        let empty = CpCommit {
            entries: vec![CpEntry::Zero { block: 3, count: 0 }],
            ..cp
        };
        assert!(decode_cp(&encode_cp(&empty)).is_err(), "a run of no blocks");
    }

    #[test]
    fn handshake_needs_the_same_key_on_both_sides() {
        for (src_key, dst_key, ok) in [
            (&b"0123456789abcdef"[..], &b"0123456789abcdef"[..], true),
            (b"0123456789abcdef", b"0123456789abcdeX", false),
        ] {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let dst_key = dst_key.to_vec();
            let t = std::thread::spawn(move || authenticate_source(&mut b, &dst_key).is_ok());
            let src = authenticate_to_destination(&mut a, src_key);
            assert_eq!(src.is_ok(), ok);
            drop(a);
            assert_eq!(t.join().unwrap(), ok);
        }
    }
}

//! Targets over in-memory decoders: the control protocol, the backup stream
//! reader and the replication wire format.

use super::{checksum_mode, le32, put_le32};
use snapblk::control::protocol::{parse_request, Response};
use snapblk::copy::stream::{Item, StreamReader, FRAME_HEAD, MAGIC as STREAM_MAGIC};
use snapblk::replication::wire::{self, Kind};
use std::io::{self, Read, Write};

/// A control request line as the daemon parses it, and a response line as
/// the CLI parses it. A request that parses must survive a round trip.
/// Accepted: the line is a request or a response.
pub fn control_protocol(data: &[u8]) -> bool {
    let response = serde_json::from_slice::<Response>(data).map(|r| r.into_result());
    if let Ok(Err(e)) = &response {
        let _ = e.to_string();
    }
    response.is_ok() | request(data)
}

fn request(data: &[u8]) -> bool {
    match parse_request(data) {
        Ok(request) => {
            let line = serde_json::to_vec(&request).expect("a parsed request serializes");
            let again = parse_request(&line).expect("a serialized request parses");
            assert_eq!(again, request, "a request changed in a round trip");
            let _ = request.op();
            true
        }
        Err(e) => {
            let _ = e.to_string();
            false
        }
    }
}

/// Recomputes a backup stream's checksums: the header's, each frame's and
/// the footer's (over everything before it).
fn fix_stream(s: &mut [u8]) {
    const FIXED: usize = 38;
    let u16_at = |s: &[u8], at: usize| {
        s.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let Some(name_len) = u16_at(s, 36) else {
        return;
    };
    let mut header = FIXED + name_len;
    // Version 2: the volume's name, its stamp, kind and base follow.
    if le32(s, 8) == Some(2) {
        let Some(volume_len) = u16_at(s, header) else {
            return;
        };
        header += 2 + volume_len + 25;
    }
    if s.len() < header + 4 || &s[..8] != STREAM_MAGIC {
        return;
    }
    let crc = crc32c::crc32c(&s[..header]);
    put_le32(s, header, crc);
    let mut at = header + 4;
    while let Some(magic) = le32(s, at) {
        match &magic.to_le_bytes() {
            b"FRME" => {
                let Some(len) = le32(s, at + 12) else { return };
                let end = at + FRAME_HEAD + len as usize;
                if end + 4 > s.len() {
                    return;
                }
                let crc = crc32c::crc32c(&s[at..end]);
                put_le32(s, end, crc);
                at = end + 4;
            }
            b"ZERO" => {
                let end = at + FRAME_HEAD;
                if end + 4 > s.len() {
                    return;
                }
                let crc = crc32c::crc32c(&s[at..end]);
                put_le32(s, end, crc);
                at = end + 4;
            }
            b"FOOT" => {
                if at + 16 <= s.len() {
                    let crc = crc32c::crc32c(&s[..at]);
                    put_le32(s, at + 12, crc);
                }
                return;
            }
            _ => return,
        }
    }
}

/// A backup stream read front to back, as `restore` reads it.
pub fn backup_stream(data: &[u8]) -> bool {
    let Some((fix, mut bytes)) = checksum_mode(data) else {
        return false;
    };
    if fix {
        fix_stream(&mut bytes);
    }
    let mut reader = match StreamReader::open(&bytes[..]) {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            return false;
        }
    };
    let mut block = Vec::new();
    loop {
        match reader.next(&mut block) {
            Ok(Item::Block { offset }) => {
                assert!(offset + block.len() as u64 <= reader.header.volume_size);
            }
            Ok(Item::Zero { offset, len }) => {
                assert!(offset + len <= reader.header.volume_size);
            }
            Ok(Item::End { blocks }) => {
                assert_eq!(blocks, reader.blocks());
                return true;
            }
            Err(e) => {
                let _ = e.to_string();
                return false;
            }
        }
    }
}

/// The volume size the replication target checks transfers against.
const REPLICA_SIZE: u64 = 1 << 20;

/// Recomputes each frame's crc32c (over its kind byte and payload).
fn fix_frames(b: &mut [u8]) {
    let mut at = 0;
    while le32(b, at) == Some(wire::MAGIC) {
        let Some(len) = le32(b, at + 8) else { return };
        let end = at + wire::HEADER + len as usize;
        if end > b.len() {
            return;
        }
        let crc = crc32c::crc32c(&[&[b[at + 4]][..], &b[at + wire::HEADER..end]].concat());
        put_le32(b, at + 12, crc);
        at = end;
    }
}

/// Decodes one frame's payload as the peer receiving it would; what
/// decodes must encode to bytes that decode to the same message.
fn decode_message(kind: Kind, payload: &[u8]) -> io::Result<()> {
    match kind {
        Kind::Transfer => {
            let (tid, pieces) = wire::decode_transfer(payload, REPLICA_SIZE)?;
            let data: Vec<(u64, &[u8])> = pieces
                .iter()
                .map(|p| (p.offset, &payload[p.at..p.at + p.len as usize]))
                .collect();
            assert_eq!(wire::encode_transfer(tid, &data), payload);
        }
        Kind::CpCommit => {
            // Not byte-exact: a zero entry's tid and index are padding.
            let cp = wire::decode_cp(payload)?;
            assert_eq!(wire::decode_cp(&wire::encode_cp(&cp))?, cp);
        }
        Kind::Open => {
            wire::from_json::<wire::Open>(payload)?;
        }
        Kind::Opened => {
            wire::from_json::<wire::Opened>(payload)?;
        }
        Kind::TransferAck | Kind::CpAck => {
            wire::parse_u64(payload)?;
        }
        Kind::Hello | Kind::Challenge | Kind::Proof | Kind::Welcome | Kind::Ping => {}
        Kind::Refused | Kind::Error => {
            let _ = String::from_utf8_lossy(payload);
        }
    }
    Ok(())
}

/// Bytes a peer sends, read from memory; what we answer goes nowhere.
struct Peer<'a>(&'a [u8]);

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The replication frames and messages, as a destination reads them: the
/// whole input as the key handshake's peer, then as a sequence of frames
/// whose payloads are decoded by kind.
pub fn replication_wire(data: &[u8]) -> bool {
    let Some((fix, mut bytes)) = checksum_mode(data) else {
        return false;
    };
    if fix {
        fix_frames(&mut bytes);
    }
    let _ = wire::authenticate_source(&mut Peer(&bytes), b"fuzzing key, 32 bytes long.....");
    let mut r = &bytes[..];
    let mut frames = 0;
    while !r.is_empty() {
        match wire::read_frame(&mut r).and_then(|(kind, p)| decode_message(kind, &p)) {
            Ok(()) => frames += 1,
            Err(_) => return false,
        }
    }
    frames > 0
}

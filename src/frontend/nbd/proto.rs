//! NBD wire constants and the encoding of fixed-size wire structures.
//!
//! Everything on the wire is big-endian ("network byte order"). The values
//! come from the NBD protocol specification (`doc/proto.md` of
//! NetworkBlockDevice/nbd).

use crate::engine::EngineError;

// ---- Handshake ------------------------------------------------------------

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server -> client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client -> server).
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

/// NBD_INFO_* types carried in NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// The only metadata context we serve, and the id we give it.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Context ids count from here in selection order, base:allocation first
/// when selected, so its id is always this.
pub const META_BASE_ALLOCATION_ID: u32 = 1;
/// QEMU's name for the context of its dirty bitmap NAME is this + NAME.
pub const META_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// A dirty bitmap context's flag: the extent changed.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Limits. An option longer than this is garbage: the connection is closed.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Strings (export names, queries) may not exceed this (spec: 4096).
pub const MAX_STRING_LEN: usize = 4096;
/// Block size constraints advertised with NBD_INFO_BLOCK_SIZE.
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const DEFAULT_PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest READ/WRITE payload accepted.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

// ---- Transmission -----------------------------------------------------------

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;

/// Block status flags of base:allocation.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// NBD error values (the protocol's own numbering; equal to Linux errnos).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Maps a host errno onto the NBD error set; anything the protocol does not
/// name becomes EIO.
pub fn nbd_error_from_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

pub fn nbd_error(e: &EngineError) -> u32 {
    nbd_error_from_errno(e.errno())
}

/// A decoded transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request header is refused outright (the connection is closed).
#[derive(Debug, PartialEq, Eq)]
pub enum BadRequest {
    Magic(u32),
}

impl Request {
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, BadRequest> {
        let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(BadRequest::Magic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Appends a simple reply header.
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header; `length` is the payload length.
pub fn put_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends a final NBD_REPLY_TYPE_ERROR chunk carrying `message`.
pub fn put_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = truncate_utf8(message, MAX_STRING_LEN);
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Appends an option reply (header + payload).
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Longest prefix of `s` of at most `max` bytes ending on a char boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(
            OPT_REPLY_MAGIC.to_be_bytes(),
            [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]
        );
    }

    #[test]
    fn request_decodes_from_big_endian_bytes() {
        let bytes: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // type: WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0x00, // offset 4096
            0, 0, 0x02, 0x00, // length 512
        ];
        let r = Request::decode(&bytes).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512
            }
        );
        assert_eq!(r.encode(), bytes);
    }

    #[test]
    fn bad_request_magic_is_refused() {
        let mut bytes = [0u8; 28];
        bytes[0..4].copy_from_slice(&0xdeadbeefu32.to_be_bytes());
        assert_eq!(Request::decode(&bytes), Err(BadRequest::Magic(0xdeadbeef)));
    }

    #[test]
    fn simple_reply_bytes() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, NBD_EINVAL, 0xabcd);
        assert_eq!(
            out,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0xab, 0xcd]
        );
    }

    #[test]
    fn error_chunk_bytes() {
        let mut out = Vec::new();
        put_error_chunk(&mut out, 7, NBD_EPERM, "ro");
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, // magic
                0x00, 0x01, // DONE
                0x80, 0x01, // ERROR
                0, 0, 0, 0, 0, 0, 0, 7, // cookie
                0, 0, 0, 8, // length
                0, 0, 0, 1, // EPERM
                0, 2, b'r', b'o'
            ]
        );
    }

    #[test]
    fn option_reply_bytes() {
        let mut out = Vec::new();
        put_option_reply(&mut out, OPT_GO, REP_ACK, &[]);
        assert_eq!(
            out,
            [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]
        );
    }

    #[test]
    fn errno_mapping_uses_nbd_numbers_and_defaults_to_eio() {
        assert_eq!(nbd_error(&EngineError::ReadOnly), 1);
        assert_eq!(
            nbd_error(&EngineError::OutOfRange {
                offset: 0,
                len: 1,
                size: 0
            }),
            22
        );
        assert_eq!(nbd_error(&EngineError::NoSpace), 28);
        assert_eq!(nbd_error(&EngineError::NotFound("x".into())), 5);
        assert_eq!(nbd_error(&EngineError::SnapshotGone("s".into())), 5);
        assert_eq!(nbd_error_from_errno(libc::EOVERFLOW), 75);
        assert_eq!(nbd_error_from_errno(libc::ESHUTDOWN), 108);
        assert_eq!(nbd_error_from_errno(libc::ENOTSUP), 95);
    }

    #[test]
    fn long_messages_are_cut_on_char_boundaries() {
        let s = "é".repeat(3000); // 6000 bytes
        let t = truncate_utf8(&s, MAX_STRING_LEN);
        assert!(t.len() <= MAX_STRING_LEN && t.len().is_multiple_of(2));
    }
}

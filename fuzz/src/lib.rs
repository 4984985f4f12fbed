//! The bodies of snapblk's fuzz targets: one function per target, each
//! feeding one input to the real decoder it targets (or, for the NBD server
//! and the volume files, to the real server and the real volume open over
//! in-memory storage).
//!
//! Shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`, run by
//! `scripts/fuzz`) and by `tests/fuzz_regressions.rs`, which replays every
//! kept input through the same functions in a plain `cargo test`. So this
//! file only uses paths relative to itself (it is also a module of that
//! test) and needs nothing from libFuzzer.
//!
//! Each function returns whether the input was accepted as wholly valid
//! (the replay test checks that the seed corpora reach deep). A decoder that
//! panics, hangs or allocates what an input tells it to is the bug a target
//! looks for; rejecting an input is not.
//!
//! Checksummed formats (journal, backup stream, replication frames): when
//! bit 0 of an input's first byte is set, the rest has its checksums
//! recomputed before the decoder sees it, so mutations reach the checks
//! behind the checksum; with it clear the bytes go through untouched.

#[path = "files.rs"]
mod files;
#[path = "nbd.rs"]
mod nbd;
#[path = "parsers.rs"]
mod parsers;
#[path = "seeds.rs"]
pub mod seeds;

pub use files::{job_record, journal, manifest};
pub use nbd::{nbd_handshake, nbd_transmission};
pub use parsers::{backup_stream, control_protocol, replication_wire};

/// A target's body: whether the input was accepted whole.
pub type Target = fn(&[u8]) -> bool;

/// Every target by name, as `scripts/fuzz` and the corpus folders name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("nbd_handshake", nbd_handshake),
    ("nbd_transmission", nbd_transmission),
    ("control_protocol", control_protocol),
    ("backup_stream", backup_stream),
    ("replication_wire", replication_wire),
    ("journal", journal),
    ("manifest", manifest),
    ("job_record", job_record),
];

/// Splits an input of a checksummed format into its mode byte's
/// "recompute checksums" bit and the bytes to decode.
fn checksum_mode(data: &[u8]) -> Option<(bool, Vec<u8>)> {
    let (&mode, rest) = data.split_first()?;
    Some((mode & 1 != 0, rest.to_vec()))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn put_le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

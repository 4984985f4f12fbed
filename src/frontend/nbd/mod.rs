//! NBD server: exports engine views to NBD clients (qemu, nbdkit's tools,
//! libnbd, the kernel's nbd-client) over UNIX sockets and loopback TCP.
//!
//! Written by hand against the NBD protocol specification (`doc/proto.md` of
//! NetworkBlockDevice/nbd). The `nbd` crate (0.3.1) was not usable: it cannot
//! finish negotiation with NBD_OPT_GO or NBD_OPT_INFO, refuses structured
//! replies, answers TRIM/WRITE_ZEROES with ENOSYS, has no FUA, block status
//! or multi-conn, serves one request at a time, and qemu-img cannot open its
//! exports. No other usable permissively licensed server crate exists.
//!
//! Files follow the protocol's phases (like nbdkit's `server/`):
//! - [`proto`]: constants and the encoding of wire structures;
//! - `handshake`: fixed newstyle negotiation (EXPORT_NAME, ABORT, LIST, INFO,
//!   GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation` and
//!   `qemu:dirty-bitmap:SNAP`);
//! - `transmission`: the request loop (READ, WRITE, FLUSH, TRIM,
//!   WRITE_ZEROES, BLOCK_STATUS, DISC), many requests in flight, replies out
//!   of order;
//! - `tls`: STARTTLS (`--tls=off|on|require`, client certificates), and
//!   the TLS record I/O the transmission loop uses once TLS is up;
//! - `server`: listeners, who may connect, a thread per connection, shutdown.
//!
//! Capabilities: FLUSH, FUA, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO),
//! structured replies, `base:allocation` block status, changed-block maps
//! (`qemu:dirty-bitmap:SNAP`: what changed since each older snapshot SNAP,
//! computed by the engine, flag 1 dirty, as QEMU reports its bitmaps), and
//! CAN_MULTI_CONN:
//! every connection to a volume shares the engine's state, and the engine's
//! flush makes every completed write durable whichever connection made it.
//! Snapshot exports (`VOL@SNAP`) are READ_ONLY.
//!
//! Bad input: an out-of-range, misaligned or oversized request gets an error
//! reply and the connection lives on; a malformed packet (bad magic, a WRITE
//! beyond the 32 MiB payload limit) closes that one connection; nothing a
//! client sends can disturb another connection.

mod handshake;
pub mod proto;
mod server;
pub mod tls;
mod transmission;

use crate::engine::{EngineError, View};

pub use server::{Limits, NbdServer};
pub use tls::{NbdTls, TlsFiles, TlsMode};

/// Where the NBD server finds its exports; the daemon implements it over its
/// registry of volumes.
pub trait ExportResolver: Send + Sync + 'static {
    /// "VOL" -> the live volume (read-write); "VOL@SNAP" -> that snapshot (read-only).
    fn resolve(&self, export_name: &str) -> Result<View, EngineError>;
    /// Names for NBD_OPT_LIST (volumes and VOL@SNAP for each snapshot).
    fn list(&self) -> Vec<String>;
    /// Export used when a client asks for the empty name "" (None: refuse).
    fn default_export(&self) -> Option<String>;
    /// Whether `caller` (a UNIX-socket peer that is not a superuser) may
    /// write export `export_name` (`Ok(false)`: only read it); `Err` says
    /// why it may not use it at all. The default lets everyone write.
    fn permits(
        &self,
        _export_name: &str,
        _caller: &crate::security::Caller,
    ) -> Result<bool, String> {
        Ok(true)
    }
}

//! Targets over the real NBD server: one [`NbdServer`] per process on a
//! UNIX socket, exporting a volume on the in-memory disk (`vol`, and its
//! snapshot `vol@snap` read-only). Each input is one client connection's
//! bytes; the target sends them, ends its side and reads every reply until
//! the server closes the connection, so one input's work is over before the
//! next begins.

use snapblk::backend::{memory::MemDisk, Storage};
use snapblk::engine::{CacheMode, EngineError, View, Volume, VolumeConfig};
use snapblk::frontend::nbd::{proto::*, ExportResolver, NbdServer};
use snapblk::runtime::block_on;
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// Small, so that no sequence of READs in one input costs much.
const SIZE: u64 = 512 << 10;

struct Resolver(Arc<Volume>);

impl ExportResolver for Resolver {
    fn resolve(&self, name: &str) -> Result<View, EngineError> {
        match name.split_once('@') {
            None if name == "vol" => Ok(self.0.live()),
            Some(("vol", snap)) => self.0.snapshot_view(snap),
            _ => Err(EngineError::NotFound(format!("export {name}"))),
        }
    }
    fn list(&self) -> Vec<String> {
        vec!["vol".into(), "vol@snap".into()]
    }
    fn default_export(&self) -> Option<String> {
        Some("vol".into())
    }
}

struct Server {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    _server: NbdServer,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // libFuzzer's main does not ignore SIGPIPE as Rust's does, and the
        // server may close before reading everything we send.
        // SAFETY: setting a signal disposition, before any other thread writes.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let config = VolumeConfig {
            size: SIZE,
            chunk_size: 65536,
            partitions: 2,
            backing: None,
            cache: CacheMode::Writeback,
        };
        let volume = block_on(async {
            let v = Volume::create("vol", Storage::Memory(MemDisk::new()), &config).await?;
            v.live().write(0, &[0x5a; 65536], false).await?;
            v.create_snapshot("snap").await?;
            v.live().write(0, &[0xa5; 4096], false).await?;
            Ok::<_, EngineError>(v)
        })
        .expect("the fuzz volume is created on the memory disk");
        let dir = tempfile::tempdir().expect("a temporary directory for the NBD socket");
        let sock = dir.path().join("nbd.sock");
        let server = NbdServer::new(Arc::new(Resolver(volume)));
        server
            .listen_unix(&sock)
            .expect("the NBD server listens on its socket");
        Server {
            _dir: dir,
            sock,
            _server: server,
        }
    })
}

/// The fuzz server's socket, for clients other than [`exchange`].
pub(super) fn server_socket() -> &'static std::path::Path {
    &server().sock
}

/// One connection: sends `client`, ends our side, returns all the server sent.
pub(super) fn exchange(client: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(&server().sock).expect("the fuzz NBD server accepts");
    let mut w = s.try_clone().expect("a second handle on the connection");
    std::thread::scope(|scope| {
        // Sent from another thread: a server that answers as it reads must
        // never wait for us to finish sending.
        scope.spawn(move || {
            let _ = w.write_all(client);
            let _ = w.shutdown(Shutdown::Write);
        });
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// How a negotiation ended, from the server's bytes.
enum Ended {
    /// In the transmission phase, which starts at this offset.
    Transmission(usize),
    /// The server acknowledged NBD_OPT_ABORT.
    Aborted,
    /// Anything else: the connection was cut or the client left.
    Cut,
}

/// Reads the server's side of a negotiation: the 18-byte greeting, option
/// replies up to the ACK of NBD_OPT_GO or NBD_OPT_ABORT, or the short reply
/// to NBD_OPT_EXPORT_NAME (if `export_name`: the client sent that option).
fn negotiation_end(server: &[u8], export_name: bool) -> Ended {
    let mut at = 18;
    while be64(server, at) == Some(OPT_REPLY_MAGIC) {
        let (Some(option), Some(kind), Some(len)) = (
            be32(server, at + 8),
            be32(server, at + 12),
            be32(server, at + 16),
        ) else {
            return Ended::Cut;
        };
        at += 20 + len as usize;
        match (option, kind) {
            (OPT_GO, REP_ACK) if at <= server.len() => return Ended::Transmission(at),
            (OPT_ABORT, REP_ACK) => return Ended::Aborted,
            _ => {}
        }
    }
    // NBD_OPT_EXPORT_NAME: size, flags and maybe 124 zero bytes.
    if export_name && server.len() >= at + 10 {
        return Ended::Transmission(at);
    }
    Ended::Cut
}

/// The negotiation phase: any bytes after the server's greeting.
/// Accepted: the client reached the transmission phase or aborted cleanly.
pub fn nbd_handshake(data: &[u8]) -> bool {
    let server = exchange(data);
    assert!(server.len() >= 18, "the server always sends its greeting");
    let export_name = data
        .windows(12)
        .any(|w| w[..8] == IHAVEOPT.to_be_bytes() && w[8..] == OPT_EXPORT_NAME.to_be_bytes());
    !matches!(negotiation_end(&server, export_name), Ended::Cut)
}

/// What one connection's requests were: cookie -> (command, length) of
/// each request with that cookie, in order (clients such as qemu reuse a
/// cookie once its request is answered).
type Sent = HashMap<u64, VecDeque<(u16, u32)>>;

fn requests(mut b: &[u8]) -> Option<Sent> {
    let mut sent = Sent::new();
    while !b.is_empty() {
        let header: &[u8; REQUEST_LEN] = b.get(..REQUEST_LEN)?.try_into().ok()?;
        let r = Request::decode(header).ok()?;
        b = &b[REQUEST_LEN..];
        if r.kind == CMD_DISC {
            break;
        }
        if r.kind == CMD_WRITE {
            b = b.get(r.length as usize..)?;
        }
        sent.entry(r.cookie)
            .or_default()
            .push_back((r.kind, r.length));
    }
    Some(sent)
}

/// Whether `replies` answer each of `sent` exactly once, without an error.
fn all_answered(mut replies: &[u8], mut sent: Sent) -> Option<bool> {
    while !replies.is_empty() {
        let cookie = be64(replies, 8)?;
        let waiting = sent.get_mut(&cookie)?;
        let &(kind, length) = waiting.front()?;
        let done = match be32(replies, 0)? {
            SIMPLE_REPLY_MAGIC => {
                if be32(replies, 4)? != 0 {
                    return Some(false);
                }
                let data = if kind == CMD_READ { length as usize } else { 0 };
                replies = replies.get(SIMPLE_REPLY_LEN + data..)?;
                true
            }
            STRUCTURED_REPLY_MAGIC => {
                if be16(replies, 6)? & 0x8000 != 0 {
                    return Some(false);
                }
                let done = be16(replies, 4)? & REPLY_FLAG_DONE != 0;
                replies = replies.get(CHUNK_HEADER_LEN + be32(replies, 16)? as usize..)?;
                done
            }
            _ => return None,
        };
        if done {
            waiting.pop_front();
        }
    }
    Some(sent.values().all(VecDeque::is_empty))
}

/// The transmission phase. The first byte picks the negotiation (bit 0:
/// structured replies, bit 1: the read-only snapshot export, bit 2:
/// base:allocation); the rest is the request stream.
/// Accepted: every request got one successful reply.
pub fn nbd_transmission(data: &[u8]) -> bool {
    let Some((&mode, stream)) = data.split_first() else {
        return false;
    };
    let structured = mode & 1 != 0;
    let export = if mode & 2 != 0 { "vol@snap" } else { "vol" };
    let mut options: Vec<(u32, Vec<u8>)> = Vec::new();
    let name = [&(export.len() as u32).to_be_bytes()[..], export.as_bytes()].concat();
    if structured {
        options.push((OPT_STRUCTURED_REPLY, Vec::new()));
        if mode & 4 != 0 {
            let query = META_BASE_ALLOCATION.as_bytes();
            let meta = [
                &name[..],
                &1u32.to_be_bytes(),
                &(query.len() as u32).to_be_bytes(),
                query,
            ]
            .concat();
            options.push((OPT_SET_META_CONTEXT, meta));
        }
    }
    options.push((OPT_GO, [&name[..], &0u16.to_be_bytes()].concat()));
    let mut client = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    for (option, payload) in options {
        client.extend_from_slice(&IHAVEOPT.to_be_bytes());
        client.extend_from_slice(&option.to_be_bytes());
        client.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        client.extend_from_slice(&payload);
    }
    client.extend_from_slice(stream);
    let server = exchange(&client);
    let Ended::Transmission(start) = negotiation_end(&server, false) else {
        panic!("the server refused the fixed negotiation");
    };
    let Some(sent) = requests(stream) else {
        return false;
    };
    !sent.is_empty() && all_answered(&server[start..], sent) == Some(true)
}

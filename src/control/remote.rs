//! `--control-listen HOST:PORT`: the control protocol over TCP, inside
//! mutual TLS, for `snapblk --remote` on another machine.
//!
//! Who may use it: only a peer whose certificate the `--tls-ca` CA signed;
//! the handshake refuses everyone else before a request is read. Such a
//! peer is a full administrator, as root is on the UNIX socket: every
//! request of the protocol is served, and paths in requests (copy targets,
//! `--hook` scripts, key files) are paths on the daemon's machine. The TLS
//! configuration is the NBD server's ([`NbdTls`]), loaded from the same
//! `--tls-cert/--tls-key/--tls-ca`, with client certificates mandatory.
//!
//! Bounds, as the UNIX socket's: [`MAX_REMOTE`] connections at once (one
//! over is closed at accept, before any TLS), the handshake done by
//! [`HANDSHAKE_LIMIT`] however slowly the peer trickles bytes, then
//! [`IDLE_LIMIT`] for each request line to arrive and for each answer to be
//! taken, and the protocol's line limit. Nothing arrives here as a passed
//! descriptor: requests that need one (`copy start --to -`, restore from a
//! stream) fail as on a UNIX connection that passed none.
//!
//! Must never: serve a byte of the protocol to a peer without a verified
//! certificate, start without `--tls-ca`, or block the accept thread on a
//! peer.

use super::server::{serve_lines, DaemonFacts};
use crate::frontend::nbd::{NbdTls, TlsFiles, TlsMode};
use crate::replication::wire::Deadline;
use crate::volumes::Registry;
use std::io::{self, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Remote control connections served at once.
pub const MAX_REMOTE: usize = 16;
/// The TLS handshake's deadline.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// How long a request line may take to arrive, or an answer to be read.
pub const IDLE_LIMIT: Duration = Duration::from_secs(300);

/// Loads the TLS settings `--control-listen` needs, refusing any that do
/// not make peers prove a certificate.
pub fn load_tls(files: &TlsFiles) -> anyhow::Result<NbdTls> {
    let missing: Vec<&str> = [
        (files.cert.is_none(), "--tls-cert FILE"),
        (files.key.is_none(), "--tls-key FILE"),
        (files.ca.is_none(), "--tls-ca FILE"),
    ]
    .into_iter()
    .filter_map(|(m, flag)| m.then_some(flag))
    .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "--control-listen serves the control protocol only over TLS with client \
             certificates; add {} (the daemon's certificate and key, and the CA that signs \
             the certificates of those who may administer it)",
            missing.join(" ")
        );
    }
    NbdTls::load(TlsMode::Require, files).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The TCP control listener and its accept thread.
pub struct RemoteControl {
    listener: TcpListener,
    addr: SocketAddr,
    accept_thread: Option<JoinHandle<()>>,
}

impl RemoteControl {
    /// Binds `addr` (not yet accepting: see [`RemoteControl::serve`]).
    pub fn bind(addr: &str) -> anyhow::Result<TcpListener> {
        TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for remote control on {addr}: {e}; pick another address with \
                 --control-listen HOST:PORT"
            )
        })
    }

    /// Accepts on `listener` until [`RemoteControl::stop`].
    pub fn serve(
        listener: TcpListener,
        tls: NbdTls,
        registry: Arc<Registry>,
        facts: Arc<DaemonFacts>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<RemoteControl> {
        let addr = listener.local_addr()?;
        let accept = listener.try_clone()?;
        let pool = Arc::new(AtomicUsize::new(0));
        let accept_thread = std::thread::Builder::new()
            .name("control-remote".into())
            .spawn(move || {
                for conn in accept.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let (stream, peer) = match conn.and_then(|s| Ok((s.peer_addr()?, s))) {
                        Ok((peer, s)) => (s, peer),
                        Err(e) => {
                            log::warn!("remote control: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    let Some(slot) = super::server::PoolSlot::take(&pool, MAX_REMOTE) else {
                        log::warn!(
                            "remote control: {MAX_REMOTE} connections already open; closing \
                             the one from {peer}"
                        );
                        continue;
                    };
                    let (tls, registry, facts, stop) =
                        (tls.clone(), registry.clone(), facts.clone(), stop.clone());
                    let spawned = std::thread::Builder::new()
                        .name("control-remote-client".into())
                        .spawn(move || {
                            let _slot = slot;
                            serve_peer(stream, peer, &tls, &registry, &facts, &stop)
                        });
                    if let Err(e) = spawned {
                        log::error!("remote control: cannot start a client thread: {e}");
                    }
                }
            })?;
        log::info!("remote control (mutual TLS) listening on {addr}");
        Ok(RemoteControl {
            listener,
            addr,
            accept_thread: Some(accept_thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting (the caller set the shared stop flag first).
    pub fn stop(&mut self) {
        // SAFETY: plain syscall on a descriptor we own; wakes accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_peer(
    stream: TcpStream,
    peer: SocketAddr,
    tls: &NbdTls,
    registry: &Registry,
    facts: &DaemonFacts,
    stop: &AtomicBool,
) {
    let mut hs = Deadline {
        stream: &stream,
        until: Instant::now() + HANDSHAKE_LIMIT,
    };
    let conn = match tls.accept(&mut hs) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("remote control: refusing {peer}: {e}");
            linger(&stream);
            return;
        }
    };
    if let Err(e) = stream
        .set_read_timeout(Some(IDLE_LIMIT))
        .and_then(|_| stream.set_write_timeout(Some(IDLE_LIMIT)))
    {
        log::warn!("remote control: {peer}: {e}");
        return;
    }
    log::info!("remote control: {peer} connected");
    serve_lines(
        BufReader::new(rustls::StreamOwned::new(conn, stream)),
        // A certificate the CA signed is trusted as root (README "Remote
        // administration"); access lists bind UNIX-socket callers.
        Ok(crate::security::Caller::superuser()),
        registry,
        facts,
        stop,
    );
}

/// Closes a refused connection so that the peer reads the TLS alert that
/// says why: closing with its unread request in our buffer would send a
/// reset, which may overtake the alert. Bounded by the handshake limit.
fn linger(stream: &TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + HANDSHAKE_LIMIT;
    let mut sink = [0u8; 4096];
    let mut drain = Deadline { stream, until };
    while matches!(drain.read(&mut sink), Ok(n) if n > 0) {}
}

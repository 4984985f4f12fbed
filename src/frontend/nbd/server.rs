//! Listeners, connection threads and shutdown.
//!
//! One accept thread per listener and one thread per connection. A
//! connection thread negotiates with blocking I/O (and runs the TLS
//! handshake there when the client starts TLS), then runs the transmission
//! phase on its own io_uring executor. A panic or error in one connection
//! is caught and logged; it never reaches other connections or the daemon.
//!
//! Who gets in: a UNIX socket's peer is checked with the daemon's
//! [`LocalPeers`] rule (the control socket's); a refused peer gets
//! `NBD_REP_ERR_POLICY` with the reason for every option, and no export. A
//! TCP peer is known only through TLS: the daemon refuses to listen on a
//! non-loopback address without it (see `control::daemon`).
//!
//! Shutdown: stop the accept threads (shutting a listening socket down wakes
//! its `accept`), then shut the read side of every connection's socket. Each
//! connection sees end of stream, finishes and answers the requests it has in
//! flight, and exits. A client that stops reading its replies would hold a
//! connection forever, so after [`DRAIN_TIMEOUT`] the sockets are shut down
//! completely.

use super::handshake::{self, Outcome, Policy};
use super::tls::{NbdTls, TlsIo};
use super::{transmission, ExportResolver};
use crate::runtime;
use crate::security::LocalPeers;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long shutdown waits for connections to finish their requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that sends nothing for this long during negotiation is dropped,
/// so idle sockets cannot pin threads forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once; more are closed right after accept.
const MAX_CONNECTIONS: usize = 1024;

/// The NBD server: any number of listeners feeding connection threads that
/// all serve exports found through one [`ExportResolver`].
pub struct NbdServer {
    shared: Arc<Shared>,
}

struct Shared {
    resolver: Arc<dyn ExportResolver>,
    tls: NbdTls,
    /// Who may connect on UNIX sockets (`None`: anyone who can open them).
    local_peers: Option<LocalPeers>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    listeners: Mutex<Vec<Listener>>,
    conns: Mutex<HashMap<u64, Conn>>,
}

struct Listener {
    fd: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

struct Conn {
    sock: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

/// Blocking `Read`/`Write` over a socket fd, without SIGPIPE.
struct SockStream(RawFd);

impl Read for SockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: recv into a valid, exclusively borrowed buffer.
            let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Write for SockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: send from a valid buffer.
            let n =
                unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn shutdown_fd(fd: RawFd, how: i32) {
    // SAFETY: plain syscall on an fd kept open by the caller's Arc<OwnedFd>.
    unsafe { libc::shutdown(fd, how) };
}

impl NbdServer {
    /// A server without TLS whose UNIX sockets admit whoever can open them
    /// (tests, embedding); the daemon uses [`NbdServer::with_access`].
    pub fn new(resolver: Arc<dyn ExportResolver>) -> NbdServer {
        NbdServer::with_access(resolver, NbdTls::off(), None)
    }

    /// A server with these TLS settings whose UNIX sockets admit only the
    /// peers `local_peers` allows.
    pub fn with_access(
        resolver: Arc<dyn ExportResolver>,
        tls: NbdTls,
        local_peers: Option<LocalPeers>,
    ) -> NbdServer {
        NbdServer {
            shared: Arc::new(Shared {
                resolver,
                tls,
                local_peers,
                stopping: AtomicBool::new(false),
                next_id: AtomicU64::new(0),
                listeners: Mutex::new(Vec::new()),
                conns: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Listens on a UNIX socket at `path`, replacing a stale socket file
    /// (one nobody answers on). A live socket or a non-socket file there is
    /// an error.
    pub fn listen_unix(&self, path: &Path) -> io::Result<()> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        // Like the control socket: owner and group may connect; whether a
        // connecting process may use it is decided by its credentials.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        let fd: OwnedFd = listener.into();
        self.start_listener(fd, Some(path.to_owned()), false);
        log::info!(
            "nbd: listening on unix:{} (TLS {})",
            path.display(),
            self.shared.tls.mode().as_str()
        );
        Ok(())
    }

    /// Listens on TCP (loopback addresses only, by the project's rules; the
    /// caller chooses). Returns the bound address (useful with port 0).
    pub fn listen_tcp(&self, addr: &str) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let fd: OwnedFd = listener.into();
        self.start_listener(fd, None, true);
        log::info!(
            "nbd: listening on tcp:{local} (TLS {})",
            self.shared.tls.mode().as_str()
        );
        Ok(local)
    }

    fn start_listener(&self, fd: OwnedFd, unix_path: Option<PathBuf>, tcp: bool) {
        let fd = Arc::new(fd);
        let shared = self.shared.clone();
        let lfd = fd.clone();
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(shared, lfd, tcp))
            .expect("cannot spawn the NBD accept thread");
        self.shared.listeners.lock().unwrap().push(Listener {
            fd,
            thread: Some(thread),
            unix_path,
        });
    }

    /// Stops accepting, lets requests in flight finish and get their replies,
    /// closes every connection and joins every thread. Idempotent.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let listeners: Vec<Listener> = std::mem::take(&mut *self.shared.listeners.lock().unwrap());
        for mut l in listeners {
            shutdown_fd(l.fd.as_raw_fd(), libc::SHUT_RDWR);
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
            if let Some(p) = &l.unix_path {
                let _ = std::fs::remove_file(p);
            }
        }
        // No new connections from here on. Ask the rest to finish.
        let mut threads = Vec::new();
        for c in self.shared.conns.lock().unwrap().values_mut() {
            shutdown_fd(c.sock.as_raw_fd(), libc::SHUT_RD);
            threads.extend(c.thread.take());
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in self.shared.conns.lock().unwrap().values() {
            shutdown_fd(c.sock.as_raw_fd(), libc::SHUT_RDWR);
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(shared: Arc<Shared>, listener: Arc<OwnedFd>, tcp: bool) {
    loop {
        // SAFETY: accept4 on our listening socket; null address is allowed.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if shared.stopping.load(Ordering::SeqCst) {
            if fd >= 0 {
                // SAFETY: we own the freshly accepted fd.
                unsafe { libc::close(fd) };
            }
            return;
        }
        if fd < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::ECONNABORTED) | Some(libc::EPROTO) => continue,
                Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS)
                | Some(libc::ENOMEM) => {
                    log::warn!("nbd: accept: {e}; retrying shortly");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                _ => {
                    log::warn!("nbd: accept failed, listener stops: {e}");
                    return;
                }
            }
        }
        // SAFETY: accept4 returned a new fd that nothing else owns.
        let sock = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        if tcp {
            set_nodelay(fd);
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Hold the lock while spawning so the entry exists before the thread
        // can try to remove it.
        let mut conns = shared.conns.lock().unwrap();
        reap_finished(&mut conns);
        if conns.len() >= MAX_CONNECTIONS {
            log::warn!("nbd: {MAX_CONNECTIONS} connections already open; refusing one");
            continue;
        }
        let s = shared.clone();
        let csock = sock.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || connection_thread(s, id, csock, !tcp));
        match spawned {
            Ok(thread) => {
                conns.insert(
                    id,
                    Conn {
                        sock,
                        thread: Some(thread),
                    },
                );
            }
            Err(e) => log::warn!("nbd: cannot start a connection thread: {e}"),
        }
    }
}

/// Drops the entries of threads that have exited (their handles detach).
fn reap_finished(conns: &mut HashMap<u64, Conn>) {
    conns.retain(|_, c| c.thread.as_ref().is_none_or(|t| !t.is_finished()));
}

/// setsockopt(2) with `value` as the option value; returns its result.
fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> libc::c_int {
    // SAFETY: the pointer is to a live `T` and the length is its size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    }
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    if setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one) != 0 {
        log::warn!("nbd: TCP_NODELAY: {}", io::Error::last_os_error());
    }
}

fn connection_thread(shared: Arc<Shared>, id: u64, sock: Arc<OwnedFd>, unix: bool) {
    let fd = sock.as_raw_fd();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve(fd, id, &shared, unix)
    }));
    match result {
        Ok(Ok(())) => log::debug!("nbd: connection {id} closed"),
        Ok(Err(e)) => log::warn!("nbd: connection {id} closed: {e}"),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log::warn!("nbd: connection {id} aborted by a panic: {msg}");
        }
    }
    // Nothing may be left half-sent: close the socket for good.
    shutdown_fd(fd, libc::SHUT_RDWR);
    if let Ok(mut conns) = shared.conns.lock() {
        conns.remove(&id);
    }
}

/// Sets SO_RCVTIMEO (`None`: wait forever).
fn set_recv_timeout(fd: RawFd, timeout: Option<Duration>) {
    let d = timeout.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv);
}

fn serve(fd: RawFd, id: u64, shared: &Shared, unix: bool) -> io::Result<()> {
    let resolver = &*shared.resolver;
    let refused = match (&shared.local_peers, unix) {
        (Some(peers), true) => peers.check(fd, "NBD socket").err(),
        _ => None,
    };
    if let Some(why) = &refused {
        log::warn!("nbd: connection {id} refused: {why}");
    }
    let policy = Policy {
        tls: shared.tls.mode(),
        refused,
    };
    let mut stream = SockStream(fd);
    set_recv_timeout(fd, Some(HANDSHAKE_TIMEOUT));
    let (negotiated, tls) = match handshake::negotiate(&mut stream, resolver, &policy)? {
        Outcome::Closed => return Ok(()),
        Outcome::Transmission(n) => (n, None),
        Outcome::StartTls(resume) => {
            let mut tls = shared.tls.accept(&mut stream)?;
            let mut secure = rustls::Stream::new(&mut tls, &mut stream);
            match handshake::resume_over_tls(&mut secure, resolver, &policy, resume)? {
                Outcome::Transmission(n) => (n, Some(tls)),
                Outcome::Closed | Outcome::StartTls(_) => {
                    tls.send_close_notify();
                    let _ = tls.write_tls(&mut stream);
                    return Ok(());
                }
            }
        }
    };
    set_recv_timeout(fd, None);
    log::debug!(
        "nbd: serving export '{}' (flags {:#x}, structured replies: {}, base:allocation: {}, TLS: {})",
        negotiated.name,
        negotiated.flags,
        negotiated.structured,
        negotiated.base_allocation,
        tls.is_some()
    );
    runtime::block_on(transmission::serve(fd, tls.map(TlsIo::new), negotiated))
}

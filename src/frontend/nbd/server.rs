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
//!
//! Disconnecting a volume's writers ([`NbdServer::disconnect_writers`],
//! for a forced revert): the same drain, for the connections serving that
//! volume read-write only; its read-only snapshot exports stay connected.
//!
//! Bounds ([`Limits`]): a watchdog thread closes a connection whose whole
//! negotiation takes longer than the handshake limit (a client trickling one
//! byte at a time cannot pin a thread) and, when an idle timeout is set, one
//! on which nothing moved while no request was inside the engine (a client
//! that stops reading its replies is idle too). Each client (a peer address
//! on TCP, a uid on a UNIX socket) may hold a bounded number of connections;
//! TCP connections get keepalive probes, so a peer that vanished without a
//! FIN is noticed.

use super::handshake::{self, Outcome, Policy};
use super::proto::TFLAG_READ_ONLY;
use super::tls::{NbdTls, TlsIo};
use super::transmission::{self, Activity};
use super::ExportResolver;
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
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long shutdown waits for connections to finish their requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed right after accept.
const MAX_CONNECTIONS: usize = 1024;
/// TCP keepalive: first probe after this much silence, then every
/// [`KEEPALIVE_INTERVAL`], giving up after [`KEEPALIVE_PROBES`] unanswered.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: libc::c_int = 6;

/// What one client may cost the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The whole negotiation (greeting to NBD_OPT_GO) must end within this.
    pub handshake: Duration,
    /// Close a connection idle this long (None: never).
    pub idle: Option<Duration>,
    /// Connections one client (TCP peer address, UNIX peer uid) may hold.
    pub per_client: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake: Duration::from_secs(10),
            idle: None,
            per_client: 64,
        }
    }
}

/// Who a connection belongs to, for [`Limits::per_client`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Client {
    Addr(std::net::IpAddr),
    Uid(u32),
    Unknown,
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Addr(a) => write!(f, "{a}"),
            Client::Uid(u) => write!(f, "uid {u}"),
            Client::Unknown => f.write_str("an unidentified peer"),
        }
    }
}

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
    limits: Limits,
    /// Set on shutdown; the condvar wakes the watchdog at once.
    watch_stop: (Mutex<bool>, Condvar),
    watchdog: Mutex<Option<JoinHandle<()>>>,
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
    client: Client,
    accepted: Instant,
    /// Some once negotiation is over (the transmission phase runs).
    serving: Arc<Mutex<Option<Serving>>>,
    /// The watchdog already closed it.
    cut: bool,
}

/// What a connection in its transmission phase serves.
struct Serving {
    activity: Arc<Activity>,
    /// The volume behind the export (`VOL` of `VOL` or `VOL@SNAP`).
    volume: String,
    writable: bool,
}

impl Conn {
    fn writes(&self, volume: &str) -> bool {
        self.serving
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|s| s.writable && s.volume == volume)
    }
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
        NbdServer::with_access(resolver, NbdTls::off(), None, Limits::default())
    }

    /// A server with these TLS settings and bounds whose UNIX sockets admit
    /// only the peers `local_peers` allows.
    pub fn with_access(
        resolver: Arc<dyn ExportResolver>,
        tls: NbdTls,
        local_peers: Option<LocalPeers>,
        limits: Limits,
    ) -> NbdServer {
        let shared = Arc::new(Shared {
            resolver,
            tls,
            local_peers,
            limits,
            watch_stop: (Mutex::new(false), Condvar::new()),
            watchdog: Mutex::new(None),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            listeners: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let watchdog = std::thread::Builder::new()
            .name("nbd-watchdog".into())
            .spawn(move || watchdog(s))
            .expect("cannot spawn the NBD watchdog thread");
        *shared.watchdog.lock().unwrap() = Some(watchdog);
        NbdServer { shared }
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
        if let Some(peers) = &self.shared.local_peers {
            peers.give_socket_to_group(path);
        }
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

    /// The connections serving `volume` read-write, named for a person
    /// ("connection 3 from uid 1000").
    pub fn writers(&self, volume: &str) -> Vec<String> {
        let conns = self.shared.conns.lock().unwrap();
        let mut named: Vec<(u64, String)> = conns
            .iter()
            .filter(|(_, c)| c.writes(volume))
            .map(|(id, c)| (*id, format!("connection {id} from {}", c.client)))
            .collect();
        named.sort();
        named.into_iter().map(|(_, n)| n).collect()
    }

    /// Closes the connections serving `volume` read-write: their requests
    /// in flight finish and get their replies, then each connection ends and
    /// drops its reference to the volume. Returns how many were closed; an
    /// error if one is still open after twice [`DRAIN_TIMEOUT`] (a request
    /// stuck in the engine).
    pub fn disconnect_writers(&self, volume: &str) -> Result<usize, String> {
        let ids: Vec<u64> = {
            let mut conns = self.shared.conns.lock().unwrap();
            conns
                .iter_mut()
                .filter(|(_, c)| c.writes(volume))
                .map(|(id, c)| {
                    log::info!("nbd: connection {id} from {}: closing it (its volume {volume} is reverted)", c.client);
                    shutdown_fd(c.sock.as_raw_fd(), libc::SHUT_RD);
                    c.cut = true;
                    *id
                })
                .collect()
        };
        // A connection leaves the map only after its thread dropped the
        // export (and with it the volume).
        let open = |ids: &[u64]| -> Vec<u64> {
            let conns = self.shared.conns.lock().unwrap();
            ids.iter()
                .copied()
                .filter(|id| conns.contains_key(id))
                .collect()
        };
        let wait = |ids: &[u64]| {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            while !open(ids).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait(&ids);
        // A client that stops reading its replies would keep its connection.
        for id in open(&ids) {
            if let Some(c) = self.shared.conns.lock().unwrap().get(&id) {
                shutdown_fd(c.sock.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        wait(&ids);
        let stuck = open(&ids);
        if !stuck.is_empty() {
            return Err(format!(
                "NBD connection(s) {stuck:?} serving volume {volume} did not close within {} s \
                 (a request is stuck in the engine); nothing was changed; retry, or restart \
                 the daemon",
                2 * DRAIN_TIMEOUT.as_secs()
            ));
        }
        Ok(ids.len())
    }

    /// Stops accepting, lets requests in flight finish and get their replies,
    /// closes every connection and joins every thread. Idempotent.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        *self.shared.watch_stop.0.lock().unwrap() = true;
        self.shared.watch_stop.1.notify_all();
        if let Some(t) = self.shared.watchdog.lock().unwrap().take() {
            let _ = t.join();
        }
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
            set_keepalive(fd);
        }
        let client = peer(fd, tcp);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Hold the lock while spawning so the entry exists before the thread
        // can try to remove it.
        let mut conns = shared.conns.lock().unwrap();
        reap_finished(&mut conns);
        if conns.len() >= MAX_CONNECTIONS {
            log::warn!("nbd: {MAX_CONNECTIONS} connections already open; refusing one");
            continue;
        }
        let limit = shared.limits.per_client;
        if conns.values().filter(|c| c.client == client).count() >= limit {
            log::warn!(
                "nbd: {client} already holds {limit} connections (the per-client limit, \
                 --nbd-client-connections); refusing another"
            );
            continue;
        }
        let s = shared.clone();
        let csock = sock.clone();
        let serving = Arc::new(Mutex::new(None));
        let cserving = serving.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || connection_thread(s, id, csock, !tcp, cserving));
        match spawned {
            Ok(thread) => {
                conns.insert(
                    id,
                    Conn {
                        sock,
                        thread: Some(thread),
                        client,
                        accepted: Instant::now(),
                        serving,
                        cut: false,
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

fn set_keepalive(fd: RawFd) {
    let secs = |d: Duration| d.as_secs() as libc::c_int;
    let opts = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(KEEPALIVE_IDLE)),
        (
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            secs(KEEPALIVE_INTERVAL),
        ),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
    ];
    for (level, name, value) in opts {
        if setsockopt(fd, level, name, &value) != 0 {
            log::warn!("nbd: keepalive: {}", io::Error::last_os_error());
        }
    }
}

/// The client a connection counts against: its address on TCP, its uid on
/// a UNIX socket.
fn peer(fd: RawFd, tcp: bool) -> Client {
    if tcp {
        // SAFETY: getpeername into a zeroed sockaddr_storage of the size given.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of_val(&ss) as libc::socklen_t;
        let rc = unsafe {
            libc::getpeername(
                fd,
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Client::Unknown;
        }
        return match ss.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the family says it is a sockaddr_in.
                let a =
                    unsafe { &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                Client::Addr(std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into())
            }
            libc::AF_INET6 => {
                // SAFETY: the family says it is a sockaddr_in6.
                let a = unsafe {
                    &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                Client::Addr(std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into())
            }
            _ => Client::Unknown,
        };
    }
    crate::security::peer_credentials(fd).map_or(Client::Unknown, |c| Client::Uid(c.uid))
}

/// Closes connections past their handshake limit or idle timeout, until
/// the server shuts down. Closing = shutting the socket down: the
/// connection's thread sees end of stream (or a failed send) and ends.
fn watchdog(shared: Arc<Shared>) {
    let limits = shared.limits;
    let shortest = limits
        .idle
        .map_or(limits.handshake, |i| i.min(limits.handshake));
    let tick = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let (stop, wake) = &shared.watch_stop;
    let mut stopped = stop.lock().unwrap();
    while !*stopped {
        stopped = wake.wait_timeout(stopped, tick).unwrap().0;
        let mut conns = shared.conns.lock().unwrap();
        for (id, c) in conns.iter_mut().filter(|(_, c)| !c.cut) {
            let activity = c
                .serving
                .lock()
                .unwrap()
                .as_ref()
                .map(|s| s.activity.clone());
            let why = match activity {
                None if c.accepted.elapsed() > limits.handshake => format!(
                    "did not finish negotiating within {} s (--nbd-handshake-limit)",
                    limits.handshake.as_secs_f64()
                ),
                Some(a) if limits.idle.is_some_and(|i| a.idle_for() > i) => format!(
                    "idle for {} s (--nbd-idle-timeout)",
                    limits.idle.unwrap_or_default().as_secs_f64()
                ),
                _ => continue,
            };
            log::warn!("nbd: connection {id} from {}: {why}; closing it", c.client);
            shutdown_fd(c.sock.as_raw_fd(), libc::SHUT_RDWR);
            c.cut = true;
        }
    }
}

fn connection_thread(
    shared: Arc<Shared>,
    id: u64,
    sock: Arc<OwnedFd>,
    unix: bool,
    serving: Arc<Mutex<Option<Serving>>>,
) {
    let fd = sock.as_raw_fd();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve(fd, id, &shared, unix, &serving)
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

fn serve(
    fd: RawFd,
    id: u64,
    shared: &Shared,
    unix: bool,
    serving: &Mutex<Option<Serving>>,
) -> io::Result<()> {
    let resolver = &*shared.resolver;
    let (caller, refused) = match (&shared.local_peers, unix) {
        (Some(peers), true) => match peers.check(fd, "NBD socket") {
            Ok(caller) => (Some(caller), None),
            Err(why) => (None, Some(why)),
        },
        _ => (None, None),
    };
    if let Some(why) = &refused {
        log::warn!("nbd: connection {id} refused: {why}");
    }
    let policy = Policy {
        tls: shared.tls.mode(),
        refused,
        caller,
    };
    let mut stream = SockStream(fd);
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
    log::debug!(
        "nbd: serving export '{}' (flags {:#x}, structured replies: {}, contexts: {:?}, TLS: {})",
        negotiated.name,
        negotiated.flags,
        negotiated.structured,
        negotiated.contexts,
        tls.is_some()
    );
    let a = Arc::new(Activity::default());
    a.touch();
    let volume = negotiated.name.split('@').next().unwrap_or_default();
    *serving.lock().unwrap() = Some(Serving {
        activity: a.clone(),
        volume: volume.to_string(),
        writable: negotiated.flags & TFLAG_READ_ONLY == 0,
    });
    runtime::block_on(transmission::serve(fd, tls.map(TlsIo::new), negotiated, a))
}

//! The transmission phase: the request loop of one connection.
//!
//! One connection = one thread running [`runtime::block_on`] over that
//! thread's io_uring. Inside it:
//! - the **reader** receives request headers (and WRITE payloads) with
//!   [`runtime::recv`], checks them, and spawns one task per request, keeping
//!   at most [`MAX_IN_FLIGHT`] requests (and about [`IN_FLIGHT_BYTES`] of
//!   payload) in flight. A request stays in flight until its reply is *sent*,
//!   not merely built: a client that sends READs and never reads its socket
//!   fills the budget and then waits, instead of making the daemon hold an
//!   ever longer queue of read data;
//! - each **request task** calls the engine and queues its complete reply;
//!   replies therefore go out in completion order, not request order (NBD
//!   matches them by cookie);
//! - the **writer** drains the queue, sending every reply that is ready at the
//!   same moment in one `writev`, so replies never interleave on the wire.
//!
//! The executor is single-threaded, so the shared state is plain `Cell`s and
//! `RefCell`s; no request ever hops to another thread.
//!
//! Over TLS the same loop runs with the reader's receives and the writer's
//! sends going through the connection's [`TlsIo`] (see `tls` for why);
//! a plaintext connection pays one branch per receive and per send.
//!
//! Closing: at end of stream, NBD_CMD_DISC, a malformed packet, or a server
//! shutdown (which shuts the socket's read side), the reader stops taking
//! requests, waits until every request in flight has finished and its reply is
//! sent, and the connection ends. Requests are never abandoned half-way
//! inside the engine.

use super::handshake::{MetaContext, Negotiated};
use super::proto::*;
use super::tls::TlsIo;
use crate::backend::Extent;
use crate::engine::{EngineError, View};
use crate::runtime::{self, AlignedBuf};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::ops::Range;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Requests a connection may have in flight at once.
pub(crate) const MAX_IN_FLIGHT: usize = 128;
/// Bytes in flight (WRITE data, then every reply's bytes until sent: READ
/// data, block status descriptors, error messages) before the reader waits;
/// one request alone may always exceed it. With [`MAX_PAYLOAD`] and the
/// buffer pool this bounds a connection's memory.
pub(crate) const IN_FLIGHT_BYTES: usize = 128 * 1024 * 1024;
/// Replies sent with one writev at most (two iovecs each; IOV_MAX is 1024).
const MAX_BATCH: usize = 256;
/// Receive buffer for request headers (and small WRITE payloads).
const RECV_BUF: usize = 256 * 1024;
/// Descriptors in one BLOCK_STATUS reply at most.
const MAX_EXTENTS: usize = 64 * 1024;

/// One encoded reply: a header and, for reads, the data.
struct Reply {
    head: Vec<u8>,
    data: Option<AlignedBuf>,
}

impl Reply {
    /// What the reply holds until it is sent.
    fn bytes(&self) -> usize {
        self.head.len() + self.data.as_ref().map_or(0, |d| d.len())
    }
}

/// What the server's watchdog sees of a connection: when bytes last moved
/// on its socket and whether the engine is working for it. Shared with the
/// watchdog thread, hence atomics.
#[derive(Default)]
pub(crate) struct Activity {
    /// Milliseconds since [`epoch`] when bytes last moved either way.
    last_ms: AtomicU64,
    /// Requests inside the engine (a long FLUSH is not idleness).
    executing: AtomicUsize,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Activity {
    pub(crate) fn touch(&self) {
        self.last_ms
            .store(epoch().elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long nothing has moved while nothing was executing (zero while
    /// a request is inside the engine).
    pub(crate) fn idle_for(&self) -> Duration {
        if self.executing.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = epoch().elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A single-waiter wake-up slot (one reader, one writer).
#[derive(Default)]
struct WakeSlot(RefCell<Option<Waker>>);

impl WakeSlot {
    fn register(&self, w: &Waker) {
        *self.0.borrow_mut() = Some(w.clone());
    }
    fn wake(&self) {
        if let Some(w) = self.0.borrow_mut().take() {
            w.wake();
        }
    }
}

struct Conn {
    fd: RawFd,
    /// The TLS session, when the client started TLS.
    tls: Option<TlsIo>,
    view: View,
    structured: bool,
    /// The negotiated metadata contexts; each one's id is its index + 1.
    contexts: Vec<MetaContext>,
    read_only: bool,
    queue: RefCell<VecDeque<Reply>>,
    /// Requests taken and not yet answered on the wire.
    in_flight: Cell<usize>,
    /// Their bytes: reserved when taken, the reply's own size once built.
    in_flight_bytes: Cell<usize>,
    activity: Arc<Activity>,
    /// The reader has stopped: the writer ends when everything is sent.
    closing: Cell<bool>,
    /// Sending failed: the peer is gone.
    broken: Cell<bool>,
    reader: WakeSlot,
    writer: WakeSlot,
    /// Payload buffers of replies already sent, for reuse (a fresh large
    /// allocation per request costs a page fault per 4 KiB), by size class:
    /// `buffers[k]` holds buffers of `MIN_BUFFER << k` bytes. Page-aligned,
    /// so an origin opened with O_DIRECT takes them as they are.
    buffers: RefCell<Vec<Vec<AlignedBuf>>>,
    pooled_bytes: Cell<usize>,
}

/// Most bytes of idle payload buffers a connection keeps.
const POOLED_BYTES: usize = 16 << 20;
/// The smallest payload buffer: one page.
const MIN_BUFFER: usize = runtime::ALIGN;

/// The size class of a `len`-byte payload: its buffers hold `MIN_BUFFER << k`.
fn size_class(len: usize) -> usize {
    (len.max(MIN_BUFFER).next_power_of_two() / MIN_BUFFER).trailing_zeros() as usize
}

impl Conn {
    /// A buffer of `len` bytes whose content the caller overwrites entirely.
    fn take_buffer(&self, len: usize) -> AlignedBuf {
        let class = size_class(len);
        let pooled = self.buffers.borrow_mut().get_mut(class).and_then(Vec::pop);
        let mut buf = match pooled {
            Some(buf) => {
                self.pooled_bytes
                    .set(self.pooled_bytes.get() - buf.capacity());
                buf
            }
            None => AlignedBuf::zeroed(MIN_BUFFER << class),
        };
        buf.set_len(len);
        buf
    }

    fn give_back(&self, buf: AlignedBuf) {
        let cap = buf.capacity();
        if self.pooled_bytes.get() + cap > POOLED_BYTES {
            return;
        }
        let class = size_class(cap);
        let mut pool = self.buffers.borrow_mut();
        if pool.len() <= class {
            pool.resize_with(class + 1, Vec::new);
        }
        pool[class].push(buf);
        self.pooled_bytes.set(self.pooled_bytes.get() + cap);
    }

    fn push(&self, reply: Reply) {
        self.queue.borrow_mut().push_back(reply);
        self.writer.wake();
    }

    fn error_reply(&self, cookie: u64, error: u32, message: &str) -> Reply {
        let mut head = Vec::with_capacity(64);
        if self.structured {
            put_error_chunk(&mut head, cookie, error, message);
        } else {
            put_simple_reply(&mut head, error, cookie);
        }
        Reply { head, data: None }
    }

    fn ok_reply(&self, cookie: u64) -> Reply {
        let mut head = Vec::with_capacity(SIMPLE_REPLY_LEN);
        put_simple_reply(&mut head, 0, cookie);
        Reply { head, data: None }
    }

    fn engine_reply(&self, cookie: u64, r: Result<(), EngineError>) -> Reply {
        match r {
            Ok(()) => self.ok_reply(cookie),
            Err(e) => self.error_reply(cookie, nbd_error(&e), &e.to_string()),
        }
    }
}

/// Buffered receiving of the request stream.
struct Receiver<'c> {
    conn: &'c Conn,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// How much the next refill of `buf` asks for. After a large payload
    /// the next request is likely another one: its header alone is asked
    /// for, so its payload is received straight into its own buffer
    /// instead of up to `RECV_BUF` of it landing here first and being
    /// copied (about 3% of the daemon's CPU under 1M writes).
    fill: usize,
}

/// Receives some bytes of the request stream (plaintext) into `out`.
async fn recv(conn: &Conn, out: &mut [u8]) -> io::Result<usize> {
    match &conn.tls {
        None => runtime::recv(conn.fd, out).await,
        Some(tls) => {
            let n = tls.recv(conn.fd, out).await?;
            if tls.wants_write() {
                // rustls has something to say (a key update): only the
                // writer sends.
                conn.writer.wake();
            }
            Ok(n)
        }
    }
}

impl Receiver<'_> {
    /// Fills `out` completely. `Ok(false)`: clean end of stream before the
    /// first byte; end of stream in the middle is an error.
    async fn read_exact(&mut self, out: &mut [u8]) -> io::Result<bool> {
        let mut done = 0;
        while done < out.len() {
            if self.start < self.end {
                let n = (self.end - self.start).min(out.len() - done);
                out[done..done + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                done += n;
                continue;
            }
            let want = out.len() - done;
            let n = if want >= self.buf.len() / 2 {
                // Large payloads go straight into their own buffer.
                let n = recv(self.conn, &mut out[done..]).await?;
                done += n;
                self.fill = REQUEST_LEN;
                n
            } else {
                self.start = 0;
                self.end = recv(self.conn, &mut self.buf[..self.fill]).await?;
                self.fill = self.buf.len();
                self.end
            };
            self.conn.activity.touch();
            if n == 0 {
                if done == 0 {
                    return Ok(false);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a request",
                ));
            }
        }
        Ok(true)
    }
}

/// Serves one negotiated connection until it ends. An `Err` describes why
/// the connection was cut (malformed packet, I/O error).
pub(crate) async fn serve(
    fd: RawFd,
    tls: Option<TlsIo>,
    n: Negotiated<View>,
    activity: Arc<Activity>,
) -> io::Result<()> {
    activity.touch();
    let conn = Rc::new(Conn {
        fd,
        tls,
        // Read-only by the export, or because the caller may only read it.
        read_only: n.flags & TFLAG_READ_ONLY != 0,
        view: n.export,
        structured: n.structured,
        contexts: n.contexts,
        queue: RefCell::new(VecDeque::new()),
        buffers: RefCell::new(Vec::new()),
        pooled_bytes: Cell::new(0),
        in_flight: Cell::new(0),
        in_flight_bytes: Cell::new(0),
        activity,
        closing: Cell::new(false),
        broken: Cell::new(false),
        reader: WakeSlot::default(),
        writer: WakeSlot::default(),
    });
    let (result, ()) = futures::join!(reader(conn.clone()), writer(conn.clone()));
    result
}

async fn reader(conn: Rc<Conn>) -> io::Result<()> {
    let result = read_requests(&conn).await;
    // Let every request in flight finish and its reply go out.
    poll_fn(|cx| {
        if conn.in_flight.get() == 0 {
            Poll::Ready(())
        } else {
            conn.reader.register(cx.waker());
            Poll::Pending
        }
    })
    .await;
    conn.closing.set(true);
    conn.writer.wake();
    result
}

async fn read_requests(conn: &Rc<Conn>) -> io::Result<()> {
    let mut rx = Receiver {
        conn,
        buf: vec![0u8; RECV_BUF],
        start: 0,
        end: 0,
        fill: RECV_BUF,
    };
    loop {
        // Back-pressure: wait for room before taking the next request.
        poll_fn(|cx| {
            let room = conn.in_flight.get() < MAX_IN_FLIGHT
                && (conn.in_flight_bytes.get() < IN_FLIGHT_BYTES || conn.in_flight.get() == 0);
            if room || conn.broken.get() {
                Poll::Ready(())
            } else {
                conn.reader.register(cx.waker());
                Poll::Pending
            }
        })
        .await;
        if conn.broken.get() {
            return Ok(());
        }

        let mut head = [0u8; REQUEST_LEN];
        if !rx.read_exact(&mut head).await? {
            return Ok(());
        }
        let req = Request::decode(&head).map_err(|BadRequest::Magic(m)| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad request magic {m:#010x}"),
            )
        })?;

        let mut payload = None;
        let mut budget = 0usize;
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if req.length > MAX_PAYLOAD {
                    // Skipping that much unchecked data is not worth the risk.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "WRITE of {} bytes exceeds the {MAX_PAYLOAD}-byte limit",
                            req.length
                        ),
                    ));
                }
                let buf = payload.insert(conn.take_buffer(req.length as usize));
                if !rx.read_exact(buf).await? && req.length > 0 {
                    return Ok(());
                }
                budget = buf.len();
            }
            CMD_READ if req.length <= MAX_PAYLOAD => budget = req.length as usize,
            CMD_READ | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => {}
            _ if req.length > MAX_PAYLOAD => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown command {} with length {}", req.kind, req.length),
                ));
            }
            _ => {}
        }

        conn.in_flight.set(conn.in_flight.get() + 1);
        conn.in_flight_bytes
            .set(conn.in_flight_bytes.get() + budget);
        conn.activity.executing.fetch_add(1, Ordering::Relaxed);
        let c = conn.clone();
        // Shared, so a Ceph volume's storage can write from it without a
        // copy (see `Backend::write_owned_at`).
        let payload = payload.map(Arc::new);
        runtime::spawn(async move {
            let reply = execute(&c, req, payload.as_ref()).await;
            // Still shared only where the storage failed a write it never
            // let go of (a fenced Ceph volume): the buffer stays with it.
            if let Some(Ok(buf)) = payload.map(Arc::try_unwrap) {
                c.give_back(buf);
            }
            // From here the reply's own bytes count until the writer sent them.
            c.in_flight_bytes
                .set(c.in_flight_bytes.get() - budget + reply.bytes());
            c.activity.executing.fetch_sub(1, Ordering::Relaxed);
            c.activity.touch();
            c.push(reply);
            c.reader.wake();
        });
    }
}

/// Runs one request against the engine and encodes its reply.
async fn execute(conn: &Conn, req: Request, payload: Option<&Arc<AlignedBuf>>) -> Reply {
    let cookie = req.cookie;
    let einval = |msg: &str| conn.error_reply(cookie, NBD_EINVAL, msg);
    let allowed = match req.kind {
        CMD_READ => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return einval(&format!("command {} is not supported", req.kind)),
    };
    if req.flags & !allowed != 0 {
        return einval(&format!(
            "flags {:#x} are not valid for command {}",
            req.flags, req.kind
        ));
    }
    if req.flags & CMD_FLAG_DF != 0 && !conn.structured {
        return einval("NBD_CMD_FLAG_DF needs structured replies");
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && conn.read_only {
        return conn.error_reply(cookie, NBD_EPERM, "this export is read-only");
    }
    if req.length == 0 && req.kind != CMD_FLUSH {
        return einval("zero-length request");
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let view = &conn.view;
    match req.kind {
        CMD_READ => {
            if req.length > MAX_PAYLOAD {
                return einval(&format!(
                    "READ of {} bytes exceeds the {MAX_PAYLOAD}-byte limit",
                    req.length
                ));
            }
            let mut data = conn.take_buffer(req.length as usize);
            if let Err(e) = view.read(req.offset, &mut data).await {
                conn.give_back(data);
                return conn.error_reply(cookie, nbd_error(&e), &e.to_string());
            }
            let mut head = Vec::with_capacity(CHUNK_HEADER_LEN + 8);
            if conn.structured {
                put_chunk_header(
                    &mut head,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + req.length,
                );
                head.extend_from_slice(&req.offset.to_be_bytes());
            } else {
                put_simple_reply(&mut head, 0, cookie);
            }
            Reply {
                head,
                data: Some(data),
            }
        }
        CMD_WRITE => match payload {
            Some(data) => conn.engine_reply(cookie, view.write_owned(req.offset, data, fua).await),
            None => einval("WRITE without its data"),
        },
        CMD_FLUSH => {
            if conn.read_only {
                return conn.ok_reply(cookie);
            }
            conn.engine_reply(cookie, view.flush().await)
        }
        CMD_TRIM => {
            let mut r = view.discard(req.offset, req.length as u64).await;
            if r.is_ok() && fua {
                r = view.flush().await;
            }
            conn.engine_reply(cookie, r)
        }
        CMD_WRITE_ZEROES => {
            // FAST_ZERO: the engine zeroes by punching or zero-ranging, never
            // slower than writing zeros, so the request is served as is.
            let keep = req.flags & CMD_FLAG_NO_HOLE != 0;
            let mut r = view.write_zeroes(req.offset, req.length as u64, keep).await;
            if r.is_ok() && fua {
                r = view.flush().await;
            }
            conn.engine_reply(cookie, r)
        }
        CMD_BLOCK_STATUS => {
            if conn.contexts.is_empty() {
                return einval("no metadata context was negotiated");
            }
            let (offset, len) = (req.offset, req.length as u64);
            let one = req.flags & CMD_FLAG_REQ_ONE != 0;
            let mut head = Vec::new();
            // One chunk per context, as QEMU sends them; the last is final.
            for (i, context) in conn.contexts.iter().enumerate() {
                let descs = match context {
                    MetaContext::BaseAllocation => view
                        .block_status(offset, len)
                        .map(|e| descriptors(&e, offset, len, one)),
                    MetaContext::DirtyBitmap(from) => view
                        .changed_since(from, offset, len)
                        .map(|changed| dirty_descriptors(&changed, offset, len, one)),
                };
                match descs {
                    Ok(descs) => {
                        let id = META_BASE_ALLOCATION_ID + i as u32;
                        let last = i + 1 == conn.contexts.len();
                        block_status_chunk(&mut head, cookie, id, &descs, last)
                    }
                    Err(e) => return conn.error_reply(cookie, nbd_error(&e), &e.to_string()),
                }
            }
            Reply { head, data: None }
        }
        _ => unreachable!("filtered above"),
    }
}

/// Turns engine extents into (length, flags) descriptors covering
/// `[offset, offset + len)` from its start, clipped and merged. Gaps in the
/// engine's answer are reported as data (the safe answer).
pub(crate) fn descriptors(extents: &[Extent], offset: u64, len: u64, one: bool) -> Vec<(u32, u32)> {
    let mut sorted: Vec<&Extent> = extents.iter().collect();
    sorted.sort_by_key(|e| e.offset);
    let runs = sorted.into_iter().map(|e| {
        let flags = if e.data { 0 } else { STATE_HOLE | STATE_ZERO };
        (e.offset, e.len, flags)
    });
    clip_runs(runs, offset, len, one)
}

/// A dirty bitmap context's descriptors for `[offset, offset + len)`:
/// the `changed` ranges (sorted) dirty, the rest clean.
fn dirty_descriptors(changed: &[Range<u64>], offset: u64, len: u64, one: bool) -> Vec<(u32, u32)> {
    let runs = changed
        .iter()
        .map(|r| (r.start, r.end - r.start, STATE_DIRTY));
    clip_runs(runs, offset, len, one)
}

/// (length, flags) descriptors covering `[offset, offset + len)` from
/// `runs` of (offset, length, flags) in order, clipped and merged; gaps
/// have flags 0.
fn clip_runs(
    runs: impl Iterator<Item = (u64, u64, u32)>,
    offset: u64,
    len: u64,
    one: bool,
) -> Vec<(u32, u32)> {
    let end = offset + len;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    let emit = |out: &mut Vec<(u32, u32)>, n: u64, flags: u32| {
        if n == 0 {
            return;
        }
        match out.last_mut() {
            Some((l, f)) if *f == flags && (*l as u64 + n) <= u32::MAX as u64 => *l += n as u32,
            _ => out.push((n as u32, flags)),
        }
    };
    for (e_offset, e_len, flags) in runs {
        if pos >= end || out.len() >= MAX_EXTENTS {
            break;
        }
        let e_end = e_offset.saturating_add(e_len).min(end);
        if e_end <= pos {
            continue;
        }
        if e_offset > pos {
            emit(&mut out, e_offset.min(end) - pos, 0);
            pos = e_offset.min(end);
        }
        emit(&mut out, e_end - pos, flags);
        pos = e_end;
    }
    if out.is_empty() {
        out.push((len as u32, 0));
    }
    if one {
        out.truncate(1);
    }
    out
}

/// Encodes an NBD_REPLY_TYPE_BLOCK_STATUS chunk for context `id` (`last`:
/// the reply's final chunk).
pub(crate) fn block_status_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    id: u32,
    descs: &[(u32, u32)],
    last: bool,
) {
    put_chunk_header(
        out,
        if last { REPLY_FLAG_DONE } else { 0 },
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 8 * descs.len() as u32,
    );
    out.extend_from_slice(&id.to_be_bytes());
    for (len, flags) in descs {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

async fn writer(conn: Rc<Conn>) {
    loop {
        let more = poll_fn(|cx| {
            if !conn.queue.borrow().is_empty() {
                Poll::Ready(true)
            } else if conn.closing.get() {
                Poll::Ready(false)
            } else if conn.tls.as_ref().is_some_and(|t| t.wants_write()) {
                Poll::Ready(true)
            } else {
                conn.writer.register(cx.waker());
                Poll::Pending
            }
        })
        .await;
        if !more {
            if let Some(tls) = conn.tls.as_ref().filter(|_| !conn.broken.get()) {
                tls.close(conn.fd, &conn.activity).await;
            }
            return;
        }
        let batch: Vec<Reply> = {
            let mut q = conn.queue.borrow_mut();
            let n = q.len().min(MAX_BATCH);
            q.drain(..n).collect()
        };
        let mut slices: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
        for r in &batch {
            slices.push(&r.head);
            if let Some(data) = r.data.as_deref().filter(|d| !d.is_empty()) {
                slices.push(data);
            }
        }
        let sent = match &conn.tls {
            None => send_all(conn.fd, &slices, &conn.activity).await,
            Some(tls) => tls.send_all(conn.fd, &slices, &conn.activity).await,
        };
        drop(slices);
        let mut finished = batch;
        if let Err(e) = sent {
            if !conn.broken.get() {
                log::debug!("nbd: sending replies failed: {e}");
            }
            conn.broken.set(true);
            // Wake a reader blocked in recv: nobody will read our replies.
            // SAFETY: plain syscall on a socket this connection owns.
            unsafe { libc::shutdown(conn.fd, libc::SHUT_RDWR) };
            finished.extend(conn.queue.borrow_mut().drain(..));
        }
        let released: usize = finished.iter().map(Reply::bytes).sum();
        conn.in_flight_bytes
            .set(conn.in_flight_bytes.get() - released);
        conn.in_flight.set(conn.in_flight.get() - finished.len());
        for data in finished.into_iter().filter_map(|r| r.data) {
            conn.give_back(data);
        }
        conn.reader.wake();
    }
}

/// Sends all of `slices` with as few writev calls as the kernel allows.
pub(crate) async fn send_all(fd: RawFd, slices: &[&[u8]], activity: &Activity) -> io::Result<()> {
    let mut index = 0;
    let mut skip = 0;
    while index < slices.len() {
        let iovecs: Vec<libc::iovec> = slices[index..]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let s = if i == 0 { &s[skip..] } else { s };
                libc::iovec {
                    iov_base: s.as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                }
            })
            .collect();
        let mut n = runtime::writev(fd, &iovecs).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "socket closed"));
        }
        activity.touch();
        while index < slices.len() && n >= slices[index].len() - skip {
            n -= slices[index].len() - skip;
            index += 1;
            skip = 0;
        }
        skip += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, data: bool) -> Extent {
        Extent { offset, len, data }
    }

    #[test]
    fn descriptors_clip_merge_and_fill_gaps() {
        let e = [
            ext(0, 4096, true),
            ext(4096, 4096, true),
            ext(8192, 8192, false),
            ext(20480, 4096, false),
        ];
        // Request [1024, 1024 + 22528): data 7168, hole 8192, gap (data) 4096, hole 3072.
        assert_eq!(
            descriptors(&e, 1024, 22528, false),
            vec![(7168, 0), (8192, 3), (4096, 0), (3072, 3)]
        );
        assert_eq!(descriptors(&e, 1024, 22528, true), vec![(7168, 0)]);
        assert_eq!(descriptors(&[], 0, 512, false), vec![(512, 0)]);
        let changed = [4096..8192, 12288..16384];
        assert_eq!(
            dirty_descriptors(&changed, 2048, 12288, false),
            vec![(2048, 0), (4096, 1), (4096, 0), (2048, 1)]
        );
        assert_eq!(dirty_descriptors(&[], 0, 512, true), vec![(512, 0)]);
    }

    #[test]
    fn block_status_reply_bytes() {
        let mut out = Vec::new();
        block_status_chunk(&mut out, 9, 1, &[(65536, 0), (512, 3)], true);
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0,
                20, // header
                0, 0, 0, 1, // context id
                0, 1, 0, 0, 0, 0, 0, 0, // 64 KiB data
                0, 0, 2, 0, 0, 0, 0, 3, // 512 hole|zero
            ]
        );
    }

    #[test]
    fn send_all_handles_many_slices_over_a_socketpair() {
        let mut fds = [0i32; 2];
        // SAFETY: plain syscall filling a 2-element array.
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
            0
        );
        let big = vec![7u8; 3 << 20];
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            use std::os::fd::FromRawFd;
            // SAFETY: we own fds[1] from here on.
            let mut s = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fds[1]) };
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            all
        });
        runtime::block_on(async {
            send_all(fds[0], &[b"ab", &big, b"", b"cd"], &Activity::default())
                .await
                .unwrap();
        });
        // SAFETY: closing our own fd.
        unsafe { libc::close(fds[0]) };
        let all = reader.join().unwrap();
        assert_eq!(all.len(), 4 + (3 << 20));
        assert_eq!(&all[..2], b"ab");
        assert_eq!(&all[all.len() - 2..], b"cd");
    }
}

//! Volumes in a Ceph pool: the engine's files as RBD images and RADOS objects.
//!
//! Owns: the connection to a cluster (one RADOS client per volume, so that
//! blocklisting it fences exactly that volume), the volume's exclusive lock
//! on its origin image, and the mapping of the engine's named files:
//! - the origin is the RBD image `IMAGE` itself (any RBD client can read it);
//! - each partition's change-log store is the RBD image `IMAGE.snapblk.NAME`
//!   (thin; grown in steps as slots are used);
//! - each partition's journal and the manifest are RADOS objects
//!   `snapblk.IMAGE.NAME`: an acknowledged RADOS write is on every replica's
//!   stable storage, and `rados_write_full` replaces an object atomically,
//!   which is exactly what manifests and journal compaction need. A journal
//!   object is bounded by the OSDs' `osd max object size` (128 MiB by
//!   default, about 2 million preserved chunks between compactions).
//!
//! So everything needed to open a volume lives in the pool; a daemon keeps
//! only a pointer to it.
//!
//! Durability: every image is opened with the RBD cache off, so a write is
//! durable when librbd acknowledges it; FLUSH still goes through
//! `rbd_aio_flush`. Fencing: a write refused with ESHUTDOWN means another
//! daemon broke our lock and had us blocklisted; from then on every request
//! fails at once with ESHUTDOWN and the loss is logged once. Writes lend
//! their buffer to librbd instead of being copied by it, which leaves a
//! write that loses the lock uncompleted for good; the fence watch fails
//! such writes (see [`Image::fail_stuck_calls`]).
//!
//! Must never: serve a volume whose lock it does not hold, or report a write
//! before librbd/librados acknowledged it.

mod ffi;

use super::{CephSpec, Claim, Extent};
use crate::engine::{CONTAINER, MANIFEST};
use crate::runtime::AlignedBuf;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};
use std::future::Future;
use std::io;
use std::os::raw::{c_char, c_int, c_void};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Store images grow in steps this large: a resize is a metadata round trip.
const STORE_GROWTH: u64 = 64 << 20;

/// How often the fence watch looks at the calls in flight, and how old the
/// oldest must be before it asks the cluster whether this client still
/// holds the origin's lock (one OSD round trip per look while it stays
/// that old). Writes on a healthy one-node cluster complete in
/// milliseconds even at QD32 of 1 MiB, so a write lent to a client that
/// lost its lock fails within about 2.5 s.
const FENCE_TICK: Duration = Duration::from_millis(500);
const STUCK_AFTER: Duration = Duration::from_secs(2);

/// How long a request may wait on the cluster, where ceph.conf leaves
/// librados' default (which waits forever on an OSD or monitor that stops
/// answering, and with it the client's request, the volume and the daemon's
/// stop): (option, librados' default, ours). The op timeouts leave time for
/// an OSD failure to be detected and its PGs to peer (the heartbeat grace is
/// 20 s) before a request fails with ETIMEDOUT; connecting gives up sooner
/// than the default 300 s, since volumes open one by one at start.
const CLIENT_TIMEOUTS: [(&CStr, &str, &CStr); 3] = [
    (c"rados_osd_op_timeout", "0", c"60"),
    (c"rados_mon_op_timeout", "0", c"60"),
    (c"client_mount_timeout", "300", c"30"),
];

fn err(rc: impl Into<i64>) -> io::Error {
    io::Error::from_raw_os_error(-(rc.into() as i32))
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a Ceph name"))
}

/// One RADOS client and its I/O context in the volume's pool.
struct Cluster {
    rados: ffi::RadosT,
    io: ffi::IoCtx,
    /// `POOL/IMAGE`, for messages.
    label: String,
    fenced: AtomicBool,
    /// Set when the cluster stopped answering at shutdown: closing then
    /// waits on it once per handle (see [`Pool::abandon`]).
    abandoned: AtomicBool,
    /// Set once the volume gave its lock up to close: every handle still
    /// open must be closed by then, or the cluster is abandoned (see
    /// [`Image`]'s drop).
    close_by: Mutex<Option<Instant>>,
    /// The calls in flight that borrow none of our memory: those the fence
    /// watch may fail without waiting for librbd.
    calls: Mutex<Calls>,
}

/// Calls in flight by id; ids grow with time, so the first is the oldest.
#[derive(Default)]
struct Calls {
    next: u64,
    by_id: BTreeMap<u64, (Instant, Arc<Done>)>,
}

// SAFETY: librados handles are thread-safe (the C API documents concurrent
// use of a rados_t and of an ioctx from many threads).
unsafe impl Send for Cluster {}
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.abandoned.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: created in `connect`; every image and object holds an Arc.
        unsafe {
            ffi::rados_ioctx_destroy(self.io);
            ffi::rados_shutdown(self.rados);
        }
    }
}

impl Cluster {
    fn connect(spec: &CephSpec) -> io::Result<Cluster> {
        let label = format!("{}/{}", spec.pool, spec.image);
        let user = cstr(&format!("client.{}", spec.id.as_deref().unwrap_or("admin")))?;
        let mut rados: ffi::RadosT = std::ptr::null_mut();
        // SAFETY: plain C calls on a handle we own; strings outlive them.
        unsafe {
            let rc = ffi::rados_create2(&mut rados, c"ceph".as_ptr(), user.as_ptr(), 0);
            if rc < 0 {
                return Err(err(rc));
            }
            let cluster = Cluster {
                rados,
                io: std::ptr::null_mut(),
                label,
                fenced: AtomicBool::new(false),
                abandoned: AtomicBool::new(false),
                close_by: Mutex::new(None),
                calls: Mutex::new(Calls::default()),
            };
            let conf = spec
                .conf
                .as_ref()
                .map(|p| cstr(&p.to_string_lossy()))
                .transpose()?;
            let rc = ffi::rados_conf_read_file(
                rados,
                conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            );
            if rc < 0 {
                return Err(io::Error::new(
                    err(rc).kind(),
                    format!("cannot read the Ceph configuration: {}", err(rc)),
                ));
            }
            cluster.bound_waits();
            // Writes durable when acknowledged; FLUSH stays cheap and exact.
            ffi::rados_conf_set(rados, c"rbd_cache".as_ptr(), c"false".as_ptr());
            // librbd otherwise hands every aio call to its own work queue
            // thread before dispatching it: one more thread hop per request
            // (a wake-up and a context switch on a core the OSD shares).
            // Every layer below the call is asynchronous (exclusive lock,
            // refresh and QoS queue requests, they do not wait), so
            // dispatching on the caller's thread only blocks it where the
            // objecter's in-flight throttle is full: back-pressure we want.
            // Measured: docs/benchmarks.md, "Ceph".
            ffi::rados_conf_set(rados, c"rbd_non_blocking_aio".as_ptr(), c"false".as_ptr());
            // librbd copies every write's buffer unless told not to, since a
            // client such as QEMU may change a buffer in flight; that copy
            // was 12-14% of the daemon's CPU under 1 MiB writes. Without it
            // the buffer must live until librbd completes the write, which
            // every image write here arranges (see `Image::write_owned`).
            ffi::rados_conf_set(
                rados,
                c"rbd_disable_zero_copy_writes".as_ptr(),
                c"false".as_ptr(),
            );
            let rc = ffi::rados_connect(rados);
            if rc < 0 {
                return Err(io::Error::new(
                    err(rc).kind(),
                    format!(
                        "cannot connect to the Ceph cluster as {}: {}",
                        user.to_string_lossy(),
                        err(rc)
                    ),
                ));
            }
            let pool = cstr(&spec.pool)?;
            let mut io_ctx: ffi::IoCtx = std::ptr::null_mut();
            let rc = ffi::rados_ioctx_create(rados, pool.as_ptr(), &mut io_ctx);
            if rc < 0 {
                return Err(io::Error::new(
                    err(rc).kind(),
                    format!("Ceph pool {}: {}", spec.pool, err(rc)),
                ));
            }
            let mut cluster = cluster;
            cluster.io = io_ctx;
            Ok(cluster)
        }
    }

    /// Gives every timeout in [`CLIENT_TIMEOUTS`] that ceph.conf did not set
    /// ours, and logs the values librados then holds.
    fn bound_waits(&self) {
        let mut shown = Vec::new();
        for (option, default, ours) in CLIENT_TIMEOUTS {
            if self.conf(option).is_none_or(|v| v == default) {
                // SAFETY: plain call on our handle with NUL-terminated strings.
                unsafe { ffi::rados_conf_set(self.rados, option.as_ptr(), ours.as_ptr()) };
            }
            let value = self.conf(option).unwrap_or_else(|| "?".into());
            shown.push(format!("{} {value} s", option.to_string_lossy()));
        }
        log::info!("Ceph volume {}: {}", self.label, shown.join(", "));
    }

    /// How long a call that librados does not bound itself may wait: the
    /// OSD op timeout (60 s where ceph.conf turned it off) and a margin.
    fn op_deadline(&self) -> std::time::Duration {
        let op = self
            .conf(c"rados_osd_op_timeout")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|&s| s > 0.0)
            .unwrap_or(60.0);
        std::time::Duration::from_secs_f64(op + 10.0)
    }

    /// Runs `call` on a thread named `thread` and waits for it until
    /// `deadline`. Past it the call is left running, holding what it
    /// captured, and the cluster is abandoned (see [`Pool::abandon`]):
    /// `None`. For calls librbd does not bound by the op timeout.
    fn bounded<R: Send + 'static>(
        &self,
        thread: &str,
        deadline: Instant,
        call: impl FnOnce() -> R + Send + 'static,
    ) -> io::Result<Option<R>> {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                let _ = done.send(call());
            })?;
        let wait = deadline.saturating_duration_since(Instant::now());
        match result.recv_timeout(wait) {
            Ok(r) => Ok(Some(r)),
            Err(_) => {
                self.abandoned.store(true, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// A librados option's value as text.
    fn conf(&self, option: &CStr) -> Option<String> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: librados writes a NUL-terminated value of at most `len`
        // bytes into `buf`, or fails.
        unsafe {
            (ffi::rados_conf_get(self.rados, option.as_ptr(), buf.as_mut_ptr(), buf.len()) == 0)
                .then(|| CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned())
        }
    }

    /// Fails at once once fenced: nothing more reaches the cluster.
    fn check_fenced(&self) -> io::Result<()> {
        if self.fenced.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        Ok(())
    }

    /// Turns a librados/librbd return code into a result, noticing fencing.
    fn result(&self, rc: i64) -> io::Result<i64> {
        if rc >= 0 {
            return Ok(rc);
        }
        if rc == -(libc::ESHUTDOWN as i64) && !self.fenced.swap(true, Ordering::Relaxed) {
            log::error!(
                "Ceph volume {}: this daemon lost its lock (another daemon took the volume \
                 over with --break-lock and blocklisted us); it is no longer served here and \
                 every request on it fails",
                self.label
            );
        }
        Err(err(rc))
    }

    /// Enters a call that borrows none of our memory into [`Cluster::calls`].
    fn track(&self, done: &Arc<Done>) -> u64 {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let id = calls.next;
        calls.next += 1;
        calls.by_id.insert(id, (Instant::now(), done.clone()));
        id
    }

    fn untrack(&self, id: u64) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.by_id.remove(&id);
    }

    fn oldest_call(&self) -> Option<Instant> {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls
            .by_id
            .first_key_value()
            .map(|(_, (started, _))| *started)
    }

    /// Fails every tracked call in flight for longer than `age` with `rc`,
    /// whether or not librbd ever completes it; returns how many.
    fn give_up_calls(&self, age: Duration, rc: i32) -> usize {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let stuck = calls
            .by_id
            .values()
            .take_while(|(started, _)| started.elapsed() >= age);
        stuck.map(|(_, done)| done.give_up(-(rc as i64))).count()
    }

    /// `client.ID at ADDR`, as `rbd status` shows this client.
    fn whoami(&self) -> String {
        // SAFETY: the returned buffer is freed with rados_buffer_free.
        unsafe {
            let id = ffi::rados_get_instance_id(self.rados);
            let mut addrs: *mut c_char = std::ptr::null_mut();
            if ffi::rados_getaddrs(self.rados, &mut addrs) < 0 || addrs.is_null() {
                return format!("client.{id}");
            }
            let a = CStr::from_ptr(addrs).to_string_lossy().into_owned();
            ffi::rados_buffer_free(addrs);
            format!("client.{id} at {a}")
        }
    }
}

/// The state an asynchronous librbd/librados call completes into.
struct Done {
    state: Mutex<DoneState>,
    cv: Condvar,
}

#[derive(Default)]
struct DoneState {
    rc: Option<i64>,
    waker: Option<Waker>,
    /// A [`Pending`] dropped before completion waits on `cv`. Only then is
    /// it notified: a notify is a futex call on librbd's thread, per I/O.
    dropped: bool,
    /// The buffer of a write lent to librbd (see [`Image::write_owned`]):
    /// kept until librbd completes the call, even if we stopped waiting.
    lent: Option<Arc<AlignedBuf>>,
}

impl Done {
    /// librbd or librados completed the call, and is done with its buffer.
    fn finish(&self, rc: i64) {
        let lent = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            self.settle(&mut s, rc);
            s.lent.take()
        };
        drop(lent);
    }

    /// Fails a call librbd may never complete; a buffer lent to it stays
    /// lent (see [`Image::fail_stuck_calls`]).
    fn give_up(&self, rc: i64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.settle(&mut s, rc);
    }

    /// The first result wins: librbd may still complete a call given up.
    fn settle(&self, s: &mut DoneState, rc: i64) {
        if s.rc.is_none() {
            s.rc = Some(rc);
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
        if s.dropped {
            self.cv.notify_all();
        }
    }
}

extern "C" fn rbd_done(c: ffi::Completion, arg: *mut c_void) {
    // SAFETY: `arg` is the Arc leaked by `Pending::start`; librbd calls this once.
    let done = unsafe { Arc::from_raw(arg as *const Done) };
    let rc = unsafe { ffi::rbd_aio_get_return_value(c) } as i64;
    unsafe { ffi::rbd_aio_release(c) };
    done.finish(rc);
}

extern "C" fn rados_done(c: ffi::Completion, arg: *mut c_void) {
    // SAFETY: as in `rbd_done`.
    let done = unsafe { Arc::from_raw(arg as *const Done) };
    let rc = unsafe { ffi::rados_aio_get_return_value(c) } as i64;
    unsafe { ffi::rados_aio_release(c) };
    done.finish(rc);
}

#[derive(Clone, Copy)]
enum Api {
    Rbd,
    Rados,
}

/// What a call does with our memory.
enum Lends {
    /// A buffer borrowed for as long as the [`Pending`] lives: dropping it
    /// before completion waits for librbd to finish with the buffer.
    Borrowed,
    /// Nothing borrowed: no buffer, or one the completion keeps (see
    /// [`DoneState::lent`]). Such a call may be given up (see
    /// [`Image::fail_stuck_calls`]).
    Owned(Option<Arc<AlignedBuf>>),
}

/// One call in flight.
struct Pending<'a> {
    done: Arc<Done>,
    cluster: &'a Cluster,
    /// Its entry in [`Cluster::calls`], for a call that borrows nothing.
    tracked: Option<u64>,
}

impl<'a> Pending<'a> {
    /// `issue` submits the call with the completion; a buffer it borrows
    /// must live for `'a`.
    fn start(
        cluster: &'a Cluster,
        api: Api,
        lends: Lends,
        issue: impl FnOnce(ffi::Completion) -> c_int,
    ) -> io::Result<Pending<'a>> {
        cluster.check_fenced()?;
        let (lent, owned) = match lends {
            Lends::Borrowed => (None, false),
            Lends::Owned(lent) => (lent, true),
        };
        let done = Arc::new(Done {
            state: Mutex::new(DoneState {
                lent,
                ..DoneState::default()
            }),
            cv: Condvar::new(),
        });
        let pending = Pending {
            tracked: owned.then(|| cluster.track(&done)),
            done,
            cluster,
        };
        let arg = Arc::into_raw(pending.done.clone()) as *mut c_void;
        let mut c: ffi::Completion = std::ptr::null_mut();
        // SAFETY: the completion gets our leaked Arc; on any failure to
        // submit, the callback never runs and we take the Arc back (and
        // settle the call, so that dropping it does not wait).
        unsafe {
            let rc = match api {
                Api::Rbd => ffi::rbd_aio_create_completion(arg, rbd_done, &mut c),
                Api::Rados => ffi::rados_aio_create_completion2(arg, rados_done, &mut c),
            };
            if rc < 0 {
                Arc::from_raw(arg as *const Done).finish(rc as i64);
                return Err(err(rc));
            }
            let rc = issue(c);
            if rc < 0 {
                match api {
                    Api::Rbd => ffi::rbd_aio_release(c),
                    Api::Rados => ffi::rados_aio_release(c),
                }
                Arc::from_raw(arg as *const Done).finish(rc as i64);
                return Err(err(rc));
            }
        }
        Ok(pending)
    }
}

impl Future for Pending<'_> {
    type Output = io::Result<i64>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<i64>> {
        let mut s = self.done.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.rc {
            Some(rc) => Poll::Ready(self.cluster.result(rc)),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.tracked {
            // Nothing of ours to wait for: the completion owns what it uses.
            self.cluster.untrack(id);
            return;
        }
        let mut s = self.done.state.lock().unwrap_or_else(|e| e.into_inner());
        s.dropped = true;
        while s.rc.is_none() {
            s = self.done.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// An open RBD image.
pub struct Image {
    cluster: Arc<Cluster>,
    handle: ffi::Image,
    size: AtomicU64,
    /// Serializes growth, so concurrent writes past the end resize once.
    grow: Mutex<()>,
}

// SAFETY: librbd image handles may be used from many threads at once.
unsafe impl Send for Image {}
unsafe impl Sync for Image {}

/// An image handle moved to the thread that closes it.
struct Closing(ffi::Image);

// SAFETY: see `Image`; the handle is used by that thread alone.
unsafe impl Send for Closing {}

impl Drop for Image {
    /// Once the volume is closing (its lock given up), within the time
    /// the release set: with the cluster gone, each `rbd_close` waits on it
    /// (1 to 1.6 s each with 3 s op timeouts, measured), and a volume opens
    /// an image for each of its snapshots, so its closes one after another
    /// could outlast the service manager's stop timeout.
    fn drop(&mut self) {
        if self.cluster.abandoned.load(Ordering::Relaxed) {
            return;
        }
        let close_by = *self
            .cluster
            .close_by
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // A fenced client's close waits on every write librbd never
        // completed (see `Image::fail_stuck_calls`), without end.
        let close_by = close_by.or_else(|| {
            self.cluster
                .fenced
                .load(Ordering::Relaxed)
                .then(|| Instant::now() + self.cluster.op_deadline())
        });
        if let Some(deadline) = close_by {
            let handle = Closing(self.handle);
            let cluster = self.cluster.clone();
            let close = move || {
                let handle = handle;
                // SAFETY: as below; `cluster` keeps the connection alive.
                unsafe { ffi::rbd_close(handle.0) };
                drop(cluster);
            };
            match self.cluster.bounded("rbd-close", deadline, close) {
                Ok(Some(())) => return,
                Ok(None) => {
                    log::error!(
                        "Ceph volume {}: closing its images did not finish within the op \
                         timeout; the cluster is not answering, the rest are left open",
                        self.cluster.label
                    );
                    return;
                }
                // No thread to close it on (the handle never moved): below.
                Err(_) => {}
            }
        }
        // SAFETY: opened in `Image::open`; closing also releases our lock.
        unsafe { ffi::rbd_close(self.handle) };
    }
}

impl Image {
    fn open(cluster: &Arc<Cluster>, name: &str) -> io::Result<Image> {
        Image::open_at(cluster, name, None)
    }

    /// Turns off the image's own exclusive lock (and the object map and
    /// fast diff that need it), for a store image. librbd takes that lock
    /// on the first write and delays I/O until it holds it, which needs the
    /// client's watch on the image: once the cluster was unreachable long
    /// enough to lose the watch, every store read, write and flush (and so
    /// a first overwrite after a snapshot, and the volume's stop) waited
    /// without bound, past every op timeout. Stores need no lock of their
    /// own: only the holder of the origin's lock opens them, and breaking
    /// that lock blocklists the old holder's client on every image. Stores
    /// made before this are changed when opened.
    fn without_own_lock(&self) -> io::Result<()> {
        let mut features = 0u64;
        // SAFETY: plain call on our open image.
        let rc = unsafe { ffi::rbd_get_features(self.handle, &mut features) };
        self.cluster.result(rc as i64)?;
        if features & ffi::FEATURE_EXCLUSIVE_LOCK == 0 {
            return Ok(());
        }
        let own_lock =
            ffi::FEATURE_EXCLUSIVE_LOCK | ffi::FEATURE_OBJECT_MAP | ffi::FEATURE_FAST_DIFF;
        // SAFETY: plain call on our open image.
        let rc = unsafe { ffi::rbd_update_features(self.handle, features & own_lock, 0) };
        self.cluster.result(rc as i64).map(drop)
    }

    /// With `snap`, the image as that RBD snapshot holds it, read-only
    /// (no lock needed, none taken).
    fn open_at(cluster: &Arc<Cluster>, name: &str, snap: Option<&str>) -> io::Result<Image> {
        let n = cstr(name)?;
        let mut handle: ffi::Image = std::ptr::null_mut();
        // SAFETY: plain calls; `handle` is ours once rbd_open succeeds.
        let rc = unsafe {
            match snap {
                None => ffi::rbd_open(cluster.io, n.as_ptr(), &mut handle, std::ptr::null()),
                Some(snap) => {
                    let s = cstr(snap)?;
                    ffi::rbd_open_read_only(cluster.io, n.as_ptr(), &mut handle, s.as_ptr())
                }
            }
        };
        if rc < 0 {
            let at = snap.map(|s| format!("@{s}")).unwrap_or_default();
            return Err(io::Error::new(
                err(rc).kind(),
                format!(
                    "RBD image {}/{name}{at}: {}",
                    cluster_pool(cluster),
                    err(rc)
                ),
            ));
        }
        let mut size = 0u64;
        // SAFETY: `handle` is open.
        let rc = unsafe { ffi::rbd_get_size(handle, &mut size) };
        let image = Image {
            cluster: cluster.clone(),
            handle,
            size: AtomicU64::new(size),
            grow: Mutex::new(()),
        };
        cluster.result(rc as i64)?;
        Ok(image)
    }

    /// Starts a librbd call; a buffer `issue` borrows must outlive the result.
    fn call<'a>(
        &'a self,
        lends: Lends,
        issue: impl FnOnce(ffi::Completion) -> c_int,
    ) -> io::Result<Pending<'a>> {
        Pending::start(&self.cluster, Api::Rbd, lends, issue)
    }

    /// Writes `buf` at `offset`, lending it to librbd, which then writes
    /// from it without a copy and completes the call only once it let go
    /// of it; the completion keeps it alive until then.
    async fn write_owned(&self, buf: &Arc<AlignedBuf>, offset: u64) -> io::Result<()> {
        self.grow_to(offset + buf.len() as u64)?;
        let lent = Lends::Owned(Some(buf.clone()));
        // SAFETY: the buffer stays valid until librbd completes the call:
        // the completion holds it.
        let pending = self.call(lent, |c| unsafe {
            ffi::rbd_aio_write(self.handle, offset, buf.len(), buf.as_ptr().cast(), c)
        })?;
        pending.await.map(drop)
    }

    /// Watches the origin's calls for those librbd will never complete, on
    /// a thread of its own for as long as the origin is open.
    fn watch_fence(origin: &Arc<Image>) -> io::Result<()> {
        let origin: Weak<Image> = Arc::downgrade(origin);
        std::thread::Builder::new()
            .name("rbd-fence-watch".into())
            .spawn(move || loop {
                std::thread::sleep(FENCE_TICK);
                match origin.upgrade() {
                    Some(origin) => origin.fail_stuck_calls(),
                    None => return,
                }
            })
            .map(drop)
    }

    /// Fails the calls in flight that librbd will not complete. A write
    /// lent to librbd (see [`Image::write_owned`]) that librbd fails before
    /// sending it, as it does every write once this client lost the lock,
    /// is never completed: its completion waits for the buffer, which the
    /// failed request keeps (librbd 16.2, seen under `debug rbd = 20`:
    /// "op requires exclusive lock", then nothing). So once the oldest call
    /// is [`STUCK_AFTER`] old, this asks the cluster whether we still hold
    /// the lock; if not, the volume is fenced and every such call fails
    /// with ESHUTDOWN, its buffer left to librbd (at most what was in
    /// flight). Past the op deadline a call fails with ETIMEDOUT whatever
    /// the answer, as librados would fail a request it sent.
    fn fail_stuck_calls(&self) {
        let cluster = &self.cluster;
        if cluster.fenced.load(Ordering::Relaxed) {
            cluster.give_up_calls(Duration::ZERO, libc::ESHUTDOWN);
            return;
        }
        let Some(age) = cluster.oldest_call().map(|t| t.elapsed()) else {
            return;
        };
        if age < STUCK_AFTER {
            return;
        }
        let released = cluster
            .close_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !released {
            let mut owner: c_int = 0;
            // SAFETY: plain call on our open image; one OSD round trip,
            // bounded by the op timeout.
            let rc = unsafe { ffi::rbd_is_exclusive_lock_owner(self.handle, &mut owner) };
            if rc == -libc::ESHUTDOWN || (rc == 0 && owner == 0) {
                let _ = cluster.result(-(libc::ESHUTDOWN as i64));
                cluster.give_up_calls(Duration::ZERO, libc::ESHUTDOWN);
                return;
            }
        }
        let deadline = cluster.op_deadline();
        if age >= deadline {
            let failed = cluster.give_up_calls(deadline, libc::ETIMEDOUT);
            log::error!(
                "Ceph volume {}: {failed} request(s) to librbd did not complete within {} s; \
                 they fail with a timeout (is the cluster answering? `ceph -s`)",
                cluster.label,
                deadline.as_secs()
            );
        }
    }

    fn resize(&self, size: u64) -> io::Result<()> {
        self.cluster.check_fenced()?;
        // SAFETY: `handle` is open.
        self.cluster
            .result(unsafe { ffi::rbd_resize(self.handle, size) } as i64)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the image at least `end` bytes long. A blocking metadata call,
    /// taken once per [`STORE_GROWTH`] of preserved data.
    fn grow_to(&self, end: u64) -> io::Result<()> {
        if end <= self.size.load(Ordering::Relaxed) {
            return Ok(());
        }
        let _g = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        if end <= self.size.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.resize(end.div_ceil(STORE_GROWTH) * STORE_GROWTH)
    }
}

fn cluster_pool(c: &Cluster) -> &str {
    c.label.split('/').next().unwrap_or("")
}

/// A RADOS object (journals; manifests are read and replaced whole).
pub struct Object {
    cluster: Arc<Cluster>,
    oid: CString,
}

impl Object {
    /// Starts a librados call, as [`Image::call`]; its buffer is borrowed.
    fn call<'a>(&'a self, issue: impl FnOnce(ffi::Completion) -> c_int) -> io::Result<Pending<'a>> {
        Pending::start(&self.cluster, Api::Rados, Lends::Borrowed, issue)
    }

    fn size(&self) -> io::Result<u64> {
        stat(&self.cluster, &self.oid)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("RADOS object {} is gone", self.oid.to_string_lossy()),
            )
        })
    }

    async fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.call(|c| unsafe {
            let oid = self.oid.as_ptr();
            ffi::rados_aio_write(
                self.cluster.io,
                oid,
                c,
                buf.as_ptr().cast(),
                buf.len(),
                offset,
            )
        })?
        .await
        .map(drop)
    }
}

fn stat(cluster: &Cluster, oid: &CStr) -> io::Result<Option<u64>> {
    cluster.check_fenced()?;
    let (mut size, mut mtime) = (0u64, 0i64);
    // SAFETY: plain call with out-pointers we own.
    let rc = unsafe { ffi::rados_stat(cluster.io, oid.as_ptr(), &mut size, &mut mtime) };
    if rc == -libc::ENOENT {
        return Ok(None);
    }
    cluster.result(rc as i64)?;
    Ok(Some(size))
}

/// One of a Ceph volume's files (see the module doc).
#[derive(Clone)]
pub enum CephFile {
    Image(Arc<Image>),
    Object(Arc<Object>),
}

impl CephFile {
    pub fn size(&self) -> io::Result<u64> {
        match self {
            CephFile::Image(i) => Ok(i.size.load(Ordering::Relaxed)),
            CephFile::Object(o) => o.size(),
        }
    }

    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len();
        let n = match self {
            CephFile::Image(i) => {
                i.call(Lends::Borrowed, |c| unsafe {
                    ffi::rbd_aio_read(i.handle, offset, len, buf.as_mut_ptr().cast(), c)
                })?
                .await?
            }
            CephFile::Object(o) => {
                o.call(|c| unsafe {
                    let oid = o.oid.as_ptr();
                    ffi::rados_aio_read(o.cluster.io, oid, c, buf.as_mut_ptr().cast(), len, offset)
                })?
                .await?
            }
        };
        // Past an object's end reads as zeros, as past a file's end would.
        buf[(n as usize).min(len)..].fill(0);
        Ok(())
    }

    /// A borrowed buffer is copied (librbd would copy it otherwise, see
    /// [`Image::write_owned`]).
    pub async fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        match self {
            CephFile::Image(_) => {
                let mut copy = AlignedBuf::for_overwrite(buf.len());
                copy.copy_from_slice(buf);
                self.write_owned_at(&Arc::new(copy), offset, durable).await
            }
            CephFile::Object(o) => o.write(buf, offset).await,
        }
    }

    /// Writes without a copy: librbd keeps `buf` until it is done with it.
    pub async fn write_owned_at(
        &self,
        buf: &Arc<AlignedBuf>,
        offset: u64,
        durable: bool,
    ) -> io::Result<()> {
        match self {
            CephFile::Image(i) => {
                i.write_owned(buf, offset).await?;
                if durable {
                    self.flush().await?;
                }
                Ok(())
            }
            CephFile::Object(o) => o.write(buf, offset).await,
        }
    }

    pub async fn flush(&self) -> io::Result<()> {
        match self {
            CephFile::Image(i) => i
                .call(Lends::Owned(None), |c| unsafe {
                    ffi::rbd_aio_flush(i.handle, c)
                })?
                .await
                .map(drop),
            // An acknowledged RADOS write is already committed on every replica.
            CephFile::Object(o) => o.cluster.check_fenced(),
        }
    }

    pub async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            CephFile::Image(i) => i
                .call(Lends::Owned(None), |c| unsafe {
                    ffi::rbd_aio_discard(i.handle, offset, len, c)
                })?
                .await
                .map(drop),
            CephFile::Object(_) => self.zero_range(offset, len).await,
        }
    }

    pub async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            CephFile::Image(i) => i
                .call(Lends::Owned(None), |c| unsafe {
                    ffi::rbd_aio_write_zeroes(i.handle, offset, len as usize, c, 0, 0)
                })?
                .await
                .map(drop),
            CephFile::Object(o) => o.write(&vec![0; len as usize], offset).await,
        }
    }

    /// Bytes the file addresses (RBD images are thin; Ceph's own accounting
    /// is `rbd du`, which would cost a scan per call).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        self.size()
    }

    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        vec![Extent {
            offset,
            len,
            data: true,
        }]
    }

    pub async fn truncate(&self, len: u64) -> io::Result<()> {
        match self {
            CephFile::Image(i) => i.resize(len),
            CephFile::Object(o) => {
                o.cluster.check_fenced()?;
                // SAFETY: plain call on our ioctx.
                let rc = unsafe { ffi::rados_trunc(o.cluster.io, o.oid.as_ptr(), len) };
                o.cluster.result(rc as i64).map(drop)
            }
        }
    }
}

/// A Ceph volume's "directory": its pool, its image and the lock on it.
pub struct Pool {
    cluster: Arc<Cluster>,
    spec: CephSpec,
    origin: Arc<Image>,
    /// Who we are, as the lock's holder.
    holder: String,
    /// The origin's RBD snapshots that hold the engine's snapshots, by
    /// generation, open read-only (see [`Pool::take_snapshot`]).
    snapshots: Mutex<HashMap<u64, Arc<Image>>>,
}

/// The Ceph client library and the allocator this build runs with, for the
/// daemon's start-up log: librbd's behaviour and speed move with its release,
/// and the allocator is part of the Ceph path's cost (see `ffi`).
pub fn library_versions() -> String {
    let (mut major, mut minor, mut extra) = (0, 0, 0);
    // SAFETY: both calls only write the integers and pointer given.
    let tcmalloc = unsafe {
        ffi::rados_version(&mut major, &mut minor, &mut extra);
        let mut patch = std::ptr::null();
        let (mut tc_major, mut tc_minor) = (0, 0);
        let version = ffi::tc_version(&mut tc_major, &mut tc_minor, &mut patch);
        if version.is_null() {
            format!("{tc_major}.{tc_minor}")
        } else {
            CStr::from_ptr(version).to_string_lossy().into_owned()
        }
    };
    format!("librados {major}.{minor}.{extra}, {tcmalloc}")
}

/// The RBD snapshot of the origin that holds the engine's snapshot of
/// `generation`.
fn snap_name(generation: u64) -> String {
    format!("{SNAP_PREFIX}{generation}")
}

const SNAP_PREFIX: &str = "snapblk.g";

impl Pool {
    /// Connects, opens (or creates) the origin image and takes its exclusive
    /// lock explicitly, so that librbd never hands it to another client on
    /// request: only `--break-lock` (which blocklists us) takes it away.
    pub fn connect(spec: &CephSpec, claim: Claim) -> io::Result<Pool> {
        let cluster = Arc::new(Cluster::connect(spec)?);
        let name = cstr(&spec.image)?;
        if let Claim::Create(size) = claim {
            let mut order: c_int = 0;
            // SAFETY: plain call.
            let rc = unsafe { ffi::rbd_create(cluster.io, name.as_ptr(), size, &mut order) };
            if rc == -libc::EEXIST {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "RBD image {} already exists; serve it with `snapblk volume import \
                         NAME --ceph {}` (or attach it if another daemon made it a volume)",
                        cluster.label, cluster.label
                    ),
                ));
            }
            cluster.result(rc as i64)?;
        }
        let origin = Arc::new(Image::open(&cluster, &spec.image)?);
        let owners = lock_owners(&origin)?;
        if !owners.is_empty() {
            if claim != Claim::BreakLock {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    // The caller knows the volume's name and adds how to
                    // take it over (see `volumes::registry`).
                    format!(
                        "RBD image {} is locked by {} (another snapblk daemon, or a dead one)",
                        cluster.label,
                        owners.join(", "),
                    ),
                ));
            }
            for owner in &owners {
                log::warn!(
                    "Ceph volume {}: breaking the lock of {owner} and blocklisting it",
                    cluster.label
                );
                let o = cstr(owner)?;
                // SAFETY: plain call on our open image.
                let rc = unsafe {
                    ffi::rbd_lock_break(origin.handle, ffi::LOCK_MODE_EXCLUSIVE, o.as_ptr())
                };
                cluster.result(rc as i64)?;
            }
        }
        // SAFETY: plain call on our open image.
        let rc = unsafe { ffi::rbd_lock_acquire(origin.handle, ffi::LOCK_MODE_EXCLUSIVE) };
        if rc < 0 {
            return Err(io::Error::new(
                err(rc).kind(),
                format!(
                    "cannot take the exclusive lock of RBD image {}: {} (is the \
                     exclusive-lock feature on? another daemon holding it?)",
                    cluster.label,
                    err(rc)
                ),
            ));
        }
        let holder = cluster.whoami();
        Image::watch_fence(&origin)?;
        Ok(Pool {
            cluster,
            spec: spec.clone(),
            origin,
            holder,
            snapshots: Mutex::new(HashMap::new()),
        })
    }

    /// Takes the RBD snapshot that keeps the origin's content as of now for
    /// the engine's snapshot of `generation` (opened for reads later, by
    /// [`Pool::open_snapshot`], outside the snapshot's pause). One left by
    /// a snapshot that never committed (a crash) is replaced. Blocking: a
    /// metadata update of the image's header object.
    pub fn take_snapshot(&self, generation: u64) -> io::Result<()> {
        self.cluster.check_fenced()?;
        let name = snap_name(generation);
        let n = cstr(&name)?;
        // The engine has drained its writes, which is all quiescing would
        // do (and a quiesce notify to the watchers costs a round trip).
        // SAFETY: plain calls on our open origin; `n` outlives them.
        let create = || unsafe {
            ffi::rbd_snap_create2(
                self.origin.handle,
                n.as_ptr(),
                ffi::SNAP_CREATE_SKIP_QUIESCE,
                None,
                std::ptr::null_mut(),
            )
        };
        let mut rc = create();
        if rc == -libc::EEXIST {
            self.lock_snapshots().remove(&generation);
            self.remove_snapshot_named(&name)?;
            rc = create();
        }
        self.cluster
            .result(rc as i64)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot take RBD snapshot {}@{name}: {e}",
                        self.cluster.label
                    ),
                )
            })
            .map(drop)
    }

    /// Opens the RBD snapshot of `generation` for reads.
    pub fn open_snapshot(&self, generation: u64) -> io::Result<()> {
        let image = Image::open_at(
            &self.cluster,
            &self.spec.image,
            Some(&snap_name(generation)),
        )?;
        self.lock_snapshots().insert(generation, Arc::new(image));
        Ok(())
    }

    /// Closes and removes the RBD snapshot of `generation` (one that is not
    /// there is fine).
    pub fn drop_snapshot(&self, generation: u64) -> io::Result<()> {
        self.lock_snapshots().remove(&generation);
        self.remove_snapshot_named(&snap_name(generation))
    }

    /// Removes every RBD snapshot snapblk took whose generation `keep`
    /// does not name (those of snapshots deleted or never committed when
    /// a daemon died).
    pub fn prune_snapshots(&self, keep: &[u64]) -> io::Result<()> {
        for name in self.snapshot_names()? {
            let ours = name
                .strip_prefix(SNAP_PREFIX)
                .and_then(|g| g.parse::<u64>().ok());
            if let Some(g) = ours.filter(|g| !keep.contains(g)) {
                log::info!(
                    "Ceph volume {}: removing RBD snapshot {name}, left by a snapshot that \
                     is gone",
                    self.cluster.label
                );
                self.drop_snapshot(g)?;
            }
        }
        Ok(())
    }

    fn lock_snapshots(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Image>>> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove_snapshot_named(&self, name: &str) -> io::Result<()> {
        self.cluster.check_fenced()?;
        let n = cstr(name)?;
        // SAFETY: plain call on our open origin.
        let rc = unsafe { ffi::rbd_snap_remove(self.origin.handle, n.as_ptr()) };
        if rc == -libc::ENOENT {
            return Ok(());
        }
        self.cluster.result(rc as i64).map(drop)
    }

    /// The names of the origin's RBD snapshots.
    fn snapshot_names(&self) -> io::Result<Vec<String>> {
        let mut max: c_int = 16;
        loop {
            let mut snaps: Vec<ffi::SnapInfo> = Vec::with_capacity(max as usize);
            // SAFETY: `snaps` has room for `max` entries; librbd fills
            // `rc` of them (freed with rbd_snap_list_end) or asks for more.
            unsafe {
                let rc = ffi::rbd_snap_list(self.origin.handle, snaps.as_mut_ptr(), &mut max);
                if rc == -libc::ERANGE {
                    continue;
                }
                let n = self.cluster.result(rc as i64)? as usize;
                snaps.set_len(n);
                let names = snaps
                    .iter()
                    .map(|s| CStr::from_ptr(s.name).to_string_lossy().into_owned())
                    .collect();
                ffi::rbd_snap_list_end(snaps.as_mut_ptr());
                return Ok(names);
            }
        }
    }

    /// Reads the origin as the RBD snapshot of `generation` holds it.
    pub async fn read_snapshot(
        &self,
        generation: u64,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        let image = self.lock_snapshots().get(&generation).cloned();
        let image = image.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "RBD snapshot {}@{} is not open",
                    self.cluster.label,
                    snap_name(generation)
                ),
            )
        })?;
        CephFile::Image(image).read_at(buf, offset).await
    }

    pub fn spec(&self) -> &CephSpec {
        &self.spec
    }

    /// This daemon's RADOS client, which holds the lock.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Gives up the origin image's exclusive lock, at the daemon's orderly
    /// shutdown, after the volume's last flush: the image is closed (which
    /// releases it too) only when the last handle goes, and a replication
    /// link keeps one until the process ends. A lock left to a dead process
    /// would make the next start refuse the volume without `--break-lock`.
    /// Nothing to give up once fenced.
    ///
    /// Bounded by the op timeout: with the cluster gone long enough for the
    /// client to lose its watch, librbd's release waits for the watch to
    /// come back, without end. Past the deadline the release is left
    /// running on its thread and the cluster is abandoned (see
    /// [`Pool::abandon`]): the lock stays, for `--break-lock`.
    pub fn release_lock(&self) -> io::Result<()> {
        let timeout = self.cluster.op_deadline();
        let deadline = Instant::now() + timeout;
        // The images close as the volume's last handles go, by the same
        // deadline (see `Image`'s drop).
        *self
            .cluster
            .close_by
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(deadline);
        if self.fenced() {
            return Ok(());
        }
        let origin = self.origin.clone();
        // SAFETY: plain call on our open image, which `origin` keeps.
        let release = move || unsafe { ffi::rbd_lock_release(origin.handle) };
        match self.cluster.bounded("rbd-unlock", deadline, release)? {
            Some(rc) => self.cluster.result(rc as i64).map(drop),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the cluster did not answer within {} s", timeout.as_secs()),
            )),
        }
    }

    /// Leaves the cluster without another word, for a volume whose last
    /// flush at shutdown failed: the cluster did not answer within its op
    /// timeouts, and releasing the lock and closing the images would each
    /// wait that long again, one volume after another, past the service
    /// manager's stop timeout. The process is ending, so nothing leaks for
    /// long; the lock stays with this (soon dead) client, and the next
    /// daemon takes the volume with `--break-lock`, knowingly: its last
    /// flush was not confirmed.
    pub fn abandon(&self) {
        self.cluster.abandoned.store(true, Ordering::Relaxed);
    }

    /// Whether another daemon took the volume away (see the module doc).
    pub fn fenced(&self) -> bool {
        self.cluster.fenced.load(Ordering::Relaxed)
    }

    fn object_id(&self, name: &str) -> io::Result<CString> {
        cstr(&format!("snapblk.{}.{name}", self.spec.image))
    }

    /// The engine's file `name` (see the module doc for what maps where).
    pub fn open(&self, name: &str, create: bool) -> io::Result<CephFile> {
        if name == CONTAINER {
            return Ok(CephFile::Image(self.origin.clone()));
        }
        if name.ends_with(".store") {
            let image = format!("{}.snapblk.{name}", self.spec.image);
            if create {
                let n = cstr(&image)?;
                let mut order: c_int = 0;
                // SAFETY: plain call.
                let rc = unsafe {
                    ffi::rbd_create2(
                        self.cluster.io,
                        n.as_ptr(),
                        0,
                        ffi::FEATURE_LAYERING,
                        &mut order,
                    )
                };
                if rc != -libc::EEXIST {
                    self.cluster.result(rc as i64)?;
                }
            }
            let store = Image::open(&self.cluster, &image)?;
            store.without_own_lock()?;
            return Ok(CephFile::Image(Arc::new(store)));
        }
        let oid = self.object_id(name)?;
        if stat(&self.cluster, &oid)?.is_none() {
            if !create {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "RADOS object {} is missing from pool {}",
                        oid.to_string_lossy(),
                        self.spec.pool
                    ),
                ));
            }
            self.write_full(&oid, &[])?;
        }
        Ok(CephFile::Object(Arc::new(Object {
            cluster: self.cluster.clone(),
            oid,
        })))
    }

    fn write_full(&self, oid: &CStr, bytes: &[u8]) -> io::Result<()> {
        self.cluster.check_fenced()?;
        // SAFETY: plain call; `bytes` outlives it.
        let rc = unsafe {
            ffi::rados_write_full(
                self.cluster.io,
                oid.as_ptr(),
                bytes.as_ptr().cast(),
                bytes.len(),
            )
        };
        self.cluster.result(rc as i64).map(drop)
    }

    pub fn read_manifest(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let oid = self.object_id(name)?;
        let Some(size) = stat(&self.cluster, &oid)? else {
            return Ok(None);
        };
        let mut bytes = vec![0u8; size as usize];
        // SAFETY: `bytes` is `size` long.
        let rc = unsafe {
            ffi::rados_read(
                self.cluster.io,
                oid.as_ptr(),
                bytes.as_mut_ptr().cast(),
                bytes.len(),
                0,
            )
        };
        let n = self.cluster.result(rc as i64)?;
        bytes.truncate(n as usize);
        Ok(Some(bytes))
    }

    /// Atomic: RADOS applies a whole-object write all or nothing.
    pub fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.write_full(&self.object_id(name)?, bytes)
    }

    /// Removes the RADOS object behind `name` (one that is not there is
    /// fine). Only for files kept as objects, not `.store` images.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.cluster.check_fenced()?;
        let oid = self.object_id(name)?;
        // SAFETY: plain call; `oid` outlives it.
        let rc = unsafe { ffi::rados_remove(self.cluster.io, oid.as_ptr()) };
        if rc == -libc::ENOENT {
            return Ok(());
        }
        self.cluster.result(rc as i64).map(drop)
    }

    /// Removes the volume from the pool: each change-log image with its
    /// journal object, the manifest, then the origin image, last, because
    /// its lock keeps other daemons out until then. What is gone already is
    /// skipped, so an interrupted delete can simply run again. Needs every
    /// other handle on the volume's files closed (librbd refuses to remove
    /// an open image), hence the sole reference.
    pub fn destroy(pool: Arc<Pool>) -> io::Result<()> {
        let pool = Arc::try_unwrap(pool).map_err(|_| {
            io::Error::new(
                io::ErrorKind::ResourceBusy,
                "the volume's Ceph files are still open here; try again",
            )
        })?;
        pool.cluster.check_fenced()?;
        // Refused before anything is removed: librbd would refuse the
        // origin last, with the rest gone.
        let foreign: Vec<String> = pool
            .snapshot_names()?
            .into_iter()
            .filter(|n| !n.starts_with(SNAP_PREFIX))
            .collect();
        if !foreign.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::DirectoryNotEmpty,
                format!(
                    "RBD image {} has RBD snapshots snapblk did not take ({}); remove them \
                     with `rbd snap purge {}`, or keep the image: `snapblk volume detach`",
                    pool.cluster.label,
                    foreign.join(", "),
                    pool.cluster.label
                ),
            ));
        }
        let prefix = format!("{}.snapblk.", pool.spec.image);
        for image in pool.list_images()? {
            let Some(name) = image.strip_prefix(&prefix) else {
                continue;
            };
            if let Some(part) = name.strip_suffix(".store") {
                pool.remove(&format!("{part}.journal"))?;
            }
            pool.remove_image(&image)?;
        }
        pool.remove(MANIFEST)?;
        pool.prune_snapshots(&[])?;
        let Pool {
            cluster,
            spec,
            origin,
            ..
        } = pool;
        drop(origin);
        Pool::remove_image_of(&cluster, &spec.image)
    }

    fn remove_image(&self, name: &str) -> io::Result<()> {
        Pool::remove_image_of(&self.cluster, name)
    }

    fn remove_image_of(cluster: &Cluster, name: &str) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: plain call; `n` outlives it.
        let rc = unsafe { ffi::rbd_remove(cluster.io, n.as_ptr()) };
        match rc {
            0 => Ok(()),
            rc if rc == -libc::ENOENT => Ok(()),
            rc => cluster.result(rc as i64).map(drop).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot remove RBD image {}/{name}: {e}",
                        cluster_pool(cluster)
                    ),
                )
            }),
        }
    }

    /// The names of the pool's images.
    fn list_images(&self) -> io::Result<Vec<String>> {
        let mut buf: Vec<u8> = vec![0; 4096];
        loop {
            let mut size = buf.len();
            // SAFETY: `buf` holds `size` bytes; librbd writes at most that
            // many, or says how many it needs with ERANGE.
            let rc = unsafe { ffi::rbd_list(self.cluster.io, buf.as_mut_ptr().cast(), &mut size) };
            if rc == -libc::ERANGE {
                buf.resize(size.max(buf.len() * 2), 0);
                continue;
            }
            let n = self.cluster.result(rc as i64)? as usize;
            return Ok(buf[..n.min(buf.len())]
                .split(|&b| b == 0)
                .filter(|n| !n.is_empty())
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect());
        }
    }

    pub fn free_bytes(&self) -> io::Result<u64> {
        let mut st = ffi::ClusterStat::default();
        // SAFETY: plain call with an out-pointer we own.
        let rc = unsafe { ffi::rados_cluster_stat(self.cluster.rados, &mut st) };
        self.cluster.result(rc as i64)?;
        Ok(st.kb_avail * 1024)
    }
}

fn lock_owners(image: &Image) -> io::Result<Vec<String>> {
    let mut owners: [*mut c_char; 8] = [std::ptr::null_mut(); 8];
    let mut max = owners.len();
    let mut mode: c_int = 0;
    // SAFETY: `owners` holds `max` pointers; librbd fills `max` of them,
    // which the cleanup call frees.
    unsafe {
        let rc = ffi::rbd_lock_get_owners(image.handle, &mut mode, owners.as_mut_ptr(), &mut max);
        if rc == -libc::ENOENT {
            return Ok(Vec::new());
        }
        image.cluster.result(rc as i64)?;
        let out = owners[..max]
            .iter()
            .map(|&p| CStr::from_ptr(p).to_string_lossy().into_owned())
            .collect();
        ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), max);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::block_on;

    /// A cluster that is never connected: enough for the bookkeeping of
    /// calls, whose completions librbd creates without one.
    fn unconnected() -> Cluster {
        Cluster {
            rados: std::ptr::null_mut(),
            io: std::ptr::null_mut(),
            label: "rbd/test".into(),
            fenced: AtomicBool::new(false),
            // Nothing to shut down.
            abandoned: AtomicBool::new(true),
            close_by: Mutex::new(None),
            calls: Mutex::new(Calls::default()),
        }
    }

    /// A call that is never issued; its completion, to complete it as
    /// librbd would, and the argument librbd would pass back.
    fn started(cluster: &Cluster, lends: Lends) -> (Pending<'_>, ffi::Completion, *mut c_void) {
        let mut completion: ffi::Completion = std::ptr::null_mut();
        let pending = Pending::start(cluster, Api::Rbd, lends, |c| {
            completion = c;
            0
        })
        .unwrap();
        let arg = Arc::as_ptr(&pending.done) as *mut c_void;
        (pending, completion, arg)
    }

    /// What the fence watch relies on: calls are given up oldest first and
    /// by age; the first result wins; a buffer lent to librbd stays lent
    /// after the call was given up, until librbd completes it.
    #[test]
    fn a_call_given_up_keeps_its_buffer_until_librbd_completes_it() {
        let cluster = unconnected();
        let buf = Arc::new(AlignedBuf::zeroed(4096));
        let (mut lent, lent_c, lent_arg) = started(&cluster, Lends::Owned(Some(buf.clone())));
        std::thread::sleep(Duration::from_millis(50));
        let (mut flush, flush_c, flush_arg) = started(&cluster, Lends::Owned(None));
        assert_eq!(
            Arc::strong_count(&buf),
            2,
            "the completion holds the buffer"
        );

        assert_eq!(
            cluster.give_up_calls(Duration::from_millis(40), libc::ESHUTDOWN),
            1
        );
        let e = block_on(&mut lent).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESHUTDOWN));
        assert!(cluster.fenced.load(Ordering::Relaxed), "ESHUTDOWN fences");
        drop(lent);
        assert_eq!(Arc::strong_count(&buf), 2, "given up, still lent");
        // librbd lets go of it at last.
        rbd_done(lent_c, lent_arg);
        assert_eq!(Arc::strong_count(&buf), 1, "released with the completion");

        // The flush completes before anyone gives it up; a late give-up
        // changes nothing.
        rbd_done(flush_c, flush_arg);
        flush.done.give_up(-(libc::EIO as i64));
        assert_eq!(block_on(&mut flush).unwrap(), 0);
        assert!(cluster.oldest_call().is_some(), "tracked until dropped");
        drop(flush);
        assert!(cluster.oldest_call().is_none());
    }

    /// tcmalloc must interpose glibc's malloc for the whole process (see
    /// `ffi`): linked after libc, it would be loaded and never used.
    #[test]
    fn malloc_comes_from_tcmalloc() {
        // SAFETY: Dl_info is plain pointers, valid zeroed.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr fills `info` for an address in a loaded object.
        let found = unsafe { libc::dladdr(libc::malloc as *const c_void, &mut info) };
        assert_ne!(found, 0, "dladdr knows no object holding malloc");
        // SAFETY: dladdr set dli_fname to the object's NUL-terminated path.
        let object = unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy();
        assert!(object.contains("tcmalloc"), "malloc comes from {object}");
        let versions = library_versions();
        assert!(
            versions.starts_with("librados ") && versions.contains("gperftools"),
            "{versions}"
        );
    }
}

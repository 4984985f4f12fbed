//! ublk frontend: engine views as kernel block devices (`/dev/ublkbN`).
//!
//! Owns: the life of kernel ublk devices (add, start, stop, delete, through
//! the `libublk` crate's control path), one thread per hardware queue, and
//! the mapping of ublk requests (READ, WRITE, FLUSH, FUA, DISCARD,
//! WRITE_ZEROES) onto [`View`] calls, errors going back as -errno.
//!
//! How a queue thread runs: libublk owns the queue's io_uring (it alone may
//! open `/dev/ublkcN`), and its per-tag command futures are woken when its
//! completions are reaped. The thread's [`runtime`] is hosted on that same
//! ring ([`runtime::block_on_hosted`] with [`QueueRing`]): the engine's I/O
//! goes on the queue's ring with [`RUNTIME_TAG`] in its user_data, libublk's
//! completion loop (`flush_and_wake_io_tasks`) is the thread's only wait,
//! and it hands those completions back to the runtime. One `io_uring_enter`
//! then submits the commits of finished requests and the engine I/O of new
//! ones, and waits for either. The engine is called inline from the tag's
//! task: snapshot checks and copy-on-write happen in the queue's own I/O
//! path, with every tag of the queue in flight at once.
//!
//! Buffers: where the kernel offers AUTO_BUF_REG and USER_COPY (6.16+),
//! devices run zero copy (`buffers: zero-copy`): the driver registers each
//! request's pages with the queue's ring at the tag's buffer index before
//! handing the request over, and a read or write the engine can serve from
//! the origin file alone ([`View::read_registered`],
//! [`View::write_registered`]) moves them with one READ_FIXED/WRITE_FIXED
//! between the file and the request, never through the daemon's memory.
//! Every other request (a snapshot's device, a clone, a Ceph volume, held
//! writes after a snapshot, a write hook such as replication's, memory
//! O_DIRECT refuses) copies through the tag's own buffer with USER_COPY
//! (pread/pwrite on `/dev/ublkcN`). Elsewhere each request's data is copied
//! through the tag's own buffer by the driver (`buffers: copy`), as it was
//! before zero copy existed. [`features`] says which a kernel gets.
//!
//! Must never: block the queue thread (no synchronous syscalls in the I/O
//! path beyond the rings), decide anything about snapshots, or keep serving
//! after its device was stopped.

use crate::engine::{EngineError, View, SECTOR_SIZE};
use crate::runtime;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::UblkIOCtx;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_wake_task;
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkUringData};
use serde::Serialize;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Largest single request the kernel sends us.
const IO_BUF_BYTES: u32 = 1 << 20;
/// Creating or deleting a device can hang on broken kernels: give up then.
const KERNEL_TIMEOUT: Duration = Duration::from_secs(60);
/// The ublk target type our devices carry (libublk's run file names it).
const TARGET_NAME: &str = "snapblk";

#[derive(Clone, Copy, Debug)]
pub struct DeviceOptions {
    pub queues: u16,
    pub depth: u16,
    /// Ask for `UBLK_F_USER_RECOVERY` (where the kernel has it): a daemon
    /// killed by -9 leaves the device waiting for the next one. Without it
    /// the kernel fails the device's I/O and removes `/dev/ublkbN` as soon
    /// as the daemon dies.
    pub recovery: bool,
    /// Run zero copy (AUTO_BUF_REG with USER_COPY) where the kernel offers
    /// it; without, the driver copies every request's data.
    pub zero_copy: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            queues: 1,
            depth: 64,
            recovery: true,
            zero_copy: true,
        }
    }
}

/// What the kernel granted a device, which may be less than was asked: at
/// most one queue per CPU, and recovery only where the driver has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    pub id: u32,
    pub queues: u16,
    pub depth: u16,
    pub recovery: bool,
    /// [`BUFFERS_COPY`] or [`BUFFERS_ZERO_COPY`].
    pub buffers: &'static str,
}

/// What a queue has done, one per queue, each on its own cache line (a
/// queue thread only ever writes its own).
#[repr(align(64))]
#[derive(Default)]
struct QueueStats {
    requests: AtomicU64,
    /// Engine operations submitted on the queue's own ring.
    queue_ring_ops: AtomicU64,
    /// Engine operations submitted on a runtime ring of the queue thread's
    /// own (none while the runtime is hosted on the queue's ring).
    runtime_ring_ops: AtomicU64,
    /// Reads and writes whose data moved without a copy in the daemon.
    zero_copy: AtomicU64,
}

type Counters = Arc<Vec<QueueStats>>;

/// How a queue thread's engine I/O reached the kernel so far, and how many
/// of its requests' data moved without a copy in the daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RingOps {
    pub queue_ring: u64,
    pub runtime_ring: u64,
    pub zero_copy: u64,
}

/// How request data moves between the kernel and the daemon: copied by the
/// driver through each tag's buffer.
pub const BUFFERS_COPY: &str = "copy";
/// The request's pages registered with the queue's ring (AUTO_BUF_REG),
/// copied through the tag's buffer only where the engine needs the bytes
/// (USER_COPY).
pub const BUFFERS_ZERO_COPY: &str = "zero-copy";
/// The driver features zero copy needs.
const ZERO_COPY_FLAGS: u64 = (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY) as u64;

/// A running `/dev/ublkbN` serving one engine view.
pub struct Device {
    granted: Granted,
    /// Requests each queue has served (up to `MAX_QUEUES` slots; the first
    /// `granted.queues` are used).
    counters: Counters,
    read_only: bool,
    /// Ends when the device's queues have exited and the device is deleted.
    exited: Option<mpsc::Receiver<()>>,
    /// A stop in progress (it may have timed out once): its verdict.
    stopping: Option<mpsc::Receiver<io::Result<()>>>,
}

/// A libublk error with the errno it carries, if any.
fn ublk_error(what: &str, e: UblkError) -> io::Error {
    match e {
        UblkError::UringIOError(n) | UblkError::OtherError(n) if n != 0 => {
            let os = io::Error::from_raw_os_error(n.abs());
            io::Error::new(os.kind(), format!("{what}: {os}"))
        }
        UblkError::IOError(os) => io::Error::new(os.kind(), format!("{what}: {os}")),
        e => io::Error::other(format!("{what}: {e}")),
    }
}

impl Device {
    /// Adds and starts a kernel ublk device for `view`; returns once
    /// `/dev/ublkbN` exists. `want_id`: the id to ask for (the kernel picks
    /// another if that one is taken).
    pub fn start(view: View, options: &DeviceOptions, want_id: Option<u32>) -> io::Result<Device> {
        if let Some(id) = want_id {
            match Device::launch(view.clone(), options, Launch::Add(Some(id))) {
                Ok(d) => return Ok(d),
                Err(e) if e.kind() != io::ErrorKind::TimedOut => {
                    log::info!("ublk device id {id} is not free ({e}); the kernel picks another");
                }
                Err(e) => return Err(e),
            }
        }
        Device::launch(view, options, Launch::Add(None))
    }

    /// Re-attaches to device `id`, left waiting by a daemon that died
    /// (USER_RECOVERY): the same `/dev/ublkbN`, whose queued I/O resumes, so
    /// a mounted filesystem carries on.
    pub fn recover(id: u32, view: View, options: &DeviceOptions) -> io::Result<Device> {
        Device::launch(view, options, Launch::Recover(id))
    }

    fn launch(view: View, options: &DeviceOptions, how: Launch) -> io::Result<Device> {
        if options.queues == 0 || options.depth == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "queues and depth must be at least 1",
            ));
        }
        features()?;
        let read_only = view.read_only();
        let (started_tx, started_rx) = mpsc::channel::<io::Result<Granted>>();
        let (exited_tx, exited_rx) = mpsc::channel::<()>();
        // Set when we gave up waiting: a device that starts after all is
        // stopped at once instead of running untracked.
        let abandoned = Arc::new(AtomicBool::new(false));
        let abandoned2 = abandoned.clone();
        let counters: Counters =
            Arc::new((0..options.queues).map(|_| QueueStats::default()).collect());
        let counters2 = counters.clone();
        let options = *options;
        std::thread::Builder::new()
            .name("ublk-device".into())
            .spawn(move || {
                let result = run_device(
                    view,
                    options,
                    how,
                    started_tx.clone(),
                    abandoned2,
                    counters2,
                );
                if let Err(e) = result {
                    let _ = started_tx.send(Err(e));
                }
                drop(exited_tx);
            })?;
        let granted = match started_rx.recv_timeout(KERNEL_TIMEOUT) {
            Ok(result) => result?,
            Err(_) => {
                abandoned.store(true, Ordering::SeqCst);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not start the ublk device within 60 s; \
                     check `dmesg` for ublk_drv errors",
                ));
            }
        };
        Ok(Device {
            granted,
            counters,
            read_only,
            exited: Some(exited_rx),
            stopping: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.granted.id
    }

    pub fn granted(&self) -> Granted {
        self.granted
    }

    /// Requests served so far by each of the device's queues.
    pub fn requests_per_queue(&self) -> Vec<u64> {
        self.counters
            .iter()
            .take(self.granted.queues as usize)
            .map(|c| c.requests.load(Ordering::Relaxed))
            .collect()
    }

    /// Where each queue's engine I/O went so far.
    pub fn ring_ops_per_queue(&self) -> Vec<RingOps> {
        self.counters
            .iter()
            .take(self.granted.queues as usize)
            .map(|c| RingOps {
                queue_ring: c.queue_ring_ops.load(Ordering::Relaxed),
                runtime_ring: c.runtime_ring_ops.load(Ordering::Relaxed),
                zero_copy: c.zero_copy.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub fn path(&self) -> String {
        format!("/dev/ublkb{}", self.granted.id)
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Stops and deletes the kernel device, then waits for its threads. A
    /// stop that timed out goes on in the background; calling this again
    /// waits for it once more.
    pub fn stop(&mut self) -> io::Result<()> {
        if self.stopping.is_none() {
            let (tx, rx) = mpsc::channel();
            let id = self.granted.id;
            let exited = self.exited.take();
            // Every kernel call of a stop can hang on a broken kernel: they
            // run on a thread of their own, and we wait for it with a limit.
            std::thread::Builder::new()
                .name("ublk-stop".into())
                .spawn(move || {
                    let _ = tx.send(stop_kernel_device(id, exited));
                })?;
            self.stopping = Some(rx);
        }
        let rx = self.stopping.as_ref().expect("set above");
        match rx.recv_timeout(KERNEL_TIMEOUT) {
            Ok(result) => {
                self.stopping = None;
                result
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not stop within 60 s; check `dmesg` for ublk_drv errors",
                    self.path()
                ),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.stopping = None;
                Err(io::Error::other("the stop thread of the device panicked"))
            }
        }
    }
}

/// How [`Device::launch`] gets its kernel device.
#[derive(Clone, Copy, Debug)]
enum Launch {
    /// A new one, with this id if it is free.
    Add(Option<u32>),
    /// Re-attach to one left waiting (USER_RECOVERY).
    Recover(u32),
}

/// Stops kernel device `id` (STOP_DEV), waits for its queue threads to
/// exit (`exited` disconnects), and deletes it.
fn stop_kernel_device(id: u32, exited: Option<mpsc::Receiver<()>>) -> io::Result<()> {
    let path = format!("/dev/ublkb{id}");
    match UblkCtrl::new_simple(id as i32) {
        Ok(ctrl) => {
            ctrl.kill_dev()
                .map_err(|e| ublk_error(&format!("stopping {path}"), e))?;
        }
        // Gone already (deleted behind our back): the threads end anyway.
        Err(e) => log::warn!("{}", ublk_error(&format!("opening {path} to stop it"), e)),
    }
    if let Some(exited) = exited {
        let _ = exited.recv();
    }
    // A device we added is deleted when its thread ends; one we re-attached
    // to after a crash is not ours to have added, so delete it here.
    delete_device(id);
    Ok(())
}

/// Deletes kernel device `id` without waiting for its last user to let go
/// (DEL_DEV_ASYNC, kernel 6.9+; a filesystem still mounted on a stopped
/// device would make a plain DEL_DEV wait for its unmount). On an older
/// kernel the plain DEL_DEV runs on a thread of its own. Nothing to do if
/// it is gone already.
pub fn delete_device(id: u32) {
    let Ok(ctrl) = UblkCtrl::new_simple(id as i32) else {
        return;
    };
    match ctrl.del_dev_async() {
        Ok(_) => {}
        Err(UblkError::UringIOError(n)) if n == -libc::ENODEV || n == -libc::ENOENT => {}
        Err(e) => {
            log::debug!("DEL_DEV_ASYNC of ublk device {id}: {e:?}; trying DEL_DEV");
            let _ = std::thread::Builder::new()
                .name("ublk-del".into())
                .spawn(move || {
                    if let Ok(ctrl) = UblkCtrl::new_simple(id as i32) {
                        if let Err(e) = ctrl.del_dev() {
                            log::warn!("{}", ublk_error(&format!("deleting ublk device {id}"), e));
                        }
                    }
                });
        }
    }
}

/// What a restarted daemon finds of the kernel device an entry had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Previous {
    /// No such device any more.
    Gone,
    /// Ours, left waiting by a daemon that died (USER_RECOVERY): re-attach.
    AwaitingRecovery,
    /// Ours, left dead by a daemon that died without USER_RECOVERY: the
    /// kernel failed its I/O and removed its block device, and the id stays
    /// taken until someone deletes it.
    Dead,
    /// Not ours to touch (another server's, or one still served); why.
    Other(String),
}

/// Which ublk server the device's run file (libublk's
/// `/run/ublksrvd/NNNN.json`) names: our devices carry target type
/// `snapblk`.
fn run_file_target(id: u32) -> Option<String> {
    let path = format!("{}/{id:04}.json", UblkCtrl::run_dir());
    let text = std::fs::read(path).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&text).ok()?;
    json["target"]["tgt_type"].as_str().map(str::to_string)
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Classifies kernel device `id`, which a daemon of ours last ran.
pub fn previous_state(id: u32) -> Previous {
    let Ok(ctrl) = UblkCtrl::new_simple(id as i32) else {
        return Previous::Gone;
    };
    let info = ctrl.dev_info();
    match run_file_target(id) {
        Some(t) if t == TARGET_NAME => {}
        Some(t) => return Previous::Other(format!("it is a {t:?} device of another ublk server")),
        None => {
            return Previous::Other(format!(
                "{}/{id:04}.json does not say which server it belongs to",
                UblkCtrl::run_dir()
            ))
        }
    }
    let pid = info.ublksrv_pid;
    let recovery = info.flags & sys::UBLK_F_USER_RECOVERY as u64 != 0;
    let state = info.state as u32;
    if state == sys::UBLK_S_DEV_DEAD {
        return Previous::Dead;
    }
    if process_alive(pid) {
        return Previous::Other(format!("process {pid} still serves it"));
    }
    if recovery && (state == sys::UBLK_S_DEV_QUIESCED || state == sys::UBLK_S_DEV_LIVE) {
        Previous::AwaitingRecovery
    } else {
        // LIVE without recovery and no server: the kernel is removing it.
        Previous::Dead
    }
}

/// Runs on the device thread until the device stops.
fn run_device(
    view: View,
    options: DeviceOptions,
    how: Launch,
    started: mpsc::Sender<io::Result<Granted>>,
    abandoned: Arc<AtomicBool>,
    counters: Counters,
) -> io::Result<()> {
    // With USER_RECOVERY, a daemon killed by -9 leaves the device waiting
    // (I/O queued, not failed) for the next daemon to re-attach.
    // REISSUE: requests the dead daemon had taken are sent again to the new
    // one rather than failed; block writes are idempotent, so that is safe.
    let wanted = if options.recovery {
        (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64
    } else {
        0
    };
    let offered = features()?.driver_features;
    let recovery = offered & wanted;
    // Zero copy wherever the driver offers it; the kernel keeps a device's
    // flags, so one re-attached to after a crash runs as it was added.
    let zero_copy = if options.zero_copy && runs_zero_copy(offered) {
        ZERO_COPY_FLAGS
    } else {
        0
    };
    // DEL_DEV_ASYNC: deleting the device when this thread ends must not
    // wait for a filesystem still mounted on it to be unmounted.
    let (id, flags) = match how {
        Launch::Recover(id) => (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV),
        Launch::Add(want) => (
            want.map_or(-1, |id| id as i32),
            UblkFlags::UBLK_DEV_F_ADD_DEV | UblkFlags::UBLK_DEV_F_DEL_DEV_ASYNC,
        ),
    };
    // Each queue thread runs on one CPU of its queue's set (libublk picks
    // it), as rublk's do: the driver's completions for the queue and the
    // thread's own io_uring work then stay on that CPU instead of following
    // a thread the scheduler moves. Measured in the guest (bench-ublk, 4k
    // random writes at QD32, one queue): 43.2k and 43.6k IOPS against 42.3k
    // floating (docs/benchmarks.md, "ublk devices").
    let flags = flags | UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY;
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id)
        .nr_queues(options.queues)
        .depth(options.depth)
        .io_buf_bytes(IO_BUF_BYTES)
        .ctrl_flags(recovery | zero_copy)
        .dev_flags(flags)
        .build()
        .map_err(|e| match how {
            Launch::Add(Some(id)) => ublk_error(&format!("adding ublk device {id}"), e),
            _ => ublk_error("adding a ublk device", e),
        })?;
    if let Launch::Recover(id) = how {
        ctrl.start_user_recover()
            .map_err(|e| ublk_error(&format!("re-attaching to /dev/ublkb{id}"), e))?;
    }
    let size = view.size();
    let chunk = view.volume().chunk_size();
    let read_only = view.read_only();
    let init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        // The queue's ring carries the engine's I/O too: room for every
        // tag's command plus its engine operations, and completions to
        // spare, so a full queue never overflows the completion ring.
        let depth = dev.dev_info.queue_depth;
        dev.tgt.sq_depth = depth.saturating_mul(2).clamp(128, 4096);
        dev.tgt.cq_depth = depth.saturating_mul(4).clamp(256, 16384);
        let params = &mut dev.tgt.params;
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.basic.logical_bs_shift = 9;
        params.basic.physical_bs_shift = 12;
        params.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
        if read_only {
            params.basic.attrs |= sys::UBLK_ATTR_READ_ONLY;
        }
        params.discard.discard_granularity = chunk;
        params.discard.max_discard_sectors = u32::MAX >> 9;
        params.discard.max_write_zeroes_sectors = u32::MAX >> 9;
        params.discard.max_discard_segments = 1;
        Ok(())
    };
    let announce = move |ctrl: &UblkCtrl| {
        let info = ctrl.dev_info();
        let granted = Granted {
            id: info.dev_id,
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            recovery: info.flags & sys::UBLK_F_USER_RECOVERY as u64 != 0,
            buffers: buffers_of(info.flags),
        };
        if abandoned.load(Ordering::SeqCst) || started.send(Ok(granted)).is_err() {
            log::warn!(
                "/dev/ublkb{} started after its caller gave up waiting; stopping it",
                granted.id
            );
            let _ = ctrl.kill_dev();
        }
    };
    ctrl.run_target(
        init,
        move |qid, dev| serve_queue(qid, dev, &view, &counters[qid as usize]),
        announce,
    )
    .map_err(|e| ublk_error("running the ublk device", e))?;
    Ok(())
}

/// The bits that mark the runtime's entries on a queue's ring: libublk's
/// `Target` bit, so libublk never counts them as ublk commands, plus one
/// that libublk's own target I/O (which we never submit) leaves clear.
const RUNTIME_TAG: u64 = UblkUringData::Target as u64 | 1 << 61;

/// A queue's ring as the host of its thread's runtime.
struct QueueRing<'a> {
    queue: &'a UblkQueue<'a>,
}

impl runtime::HostRing for QueueRing<'_> {
    fn tag(&self) -> u64 {
        RUNTIME_TAG
    }

    fn push(&self, entry: &io_uring::squeue::Entry) -> bool {
        // SAFETY: the runtime keeps the entry's buffers alive until its
        // completion is handed back.
        libublk::with_task_io_ring_mut(|ring| unsafe { ring.submission().push(entry) }.is_ok())
    }

    fn turn(&self, want: usize, ours: &mut dyn FnMut(u64, i32)) {
        let mut route = |data: u64, cqe: &io_uring::cqueue::Entry| {
            if data & RUNTIME_TAG == RUNTIME_TAG {
                ours(data, cqe.result());
            } else {
                ublk_wake_task(data, cqe);
            }
        };
        // libublk's loop keeps the queue's own accounting (commands in
        // flight, abort, idle); it waits at most 20 s (idle) and returns.
        loop {
            match self
                .queue
                .flush_and_wake_io_tasks(|data, cqe, _| route(data, cqe), want)
            {
                Ok(_) => return,
                Err(UblkError::IOError(e)) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => break,
            }
        }
        // The queue is down (no command in flight any more), yet a tag may
        // still wait for its engine I/O: serve the ring directly.
        libublk::with_task_io_ring_mut(|ring| {
            loop {
                match ring.submit_and_wait(want) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                    Err(e) => panic!("io_uring wait on a ublk queue failed: {e}"),
                }
            }
            for cqe in ring.completion() {
                route(cqe.user_data(), &cqe);
            }
        });
    }
}

/// One queue: a task per tag, on a runtime hosted on the queue's ring.
fn serve_queue(qid: u16, dev: &UblkDev, view: &View, stats: &QueueStats) {
    // `top -H` and /proc show which thread is which queue.
    if let Ok(name) = std::ffi::CString::new(format!("ublk{}-q{qid}", dev.dev_info.dev_id)) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    }
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            log::error!("ublk queue {qid}: {e}");
            return;
        }
    };
    runtime::block_on_hosted(&QueueRing { queue: &queue }, async {
        let tasks = queue.tags().map(|tag| serve_tag(&queue, tag, view, stats));
        futures::future::join_all(tasks).await;
    });
}

/// Whether a device with driver flags `flags` runs zero copy.
fn runs_zero_copy(flags: u64) -> bool {
    flags & ZERO_COPY_FLAGS == ZERO_COPY_FLAGS
}

/// How a device with driver flags `flags` moves request data.
fn buffers_of(flags: u64) -> &'static str {
    if runs_zero_copy(flags) {
        BUFFERS_ZERO_COPY
    } else {
        BUFFERS_COPY
    }
}

async fn serve_tag(queue: &UblkQueue<'_>, tag: u16, view: &View, stats: &QueueStats) {
    let mut buf = IoBuf::<u8>::new(queue.dev.dev_info.max_io_buf_bytes as usize);
    let zero_copy = runs_zero_copy(queue.dev.dev_info.flags);
    // Zero copy: the driver registers each request's pages at this tag's
    // index (the queue's sparse table has one slot per tag); where that
    // fails, FALLBACK hands the request over unregistered, and it copies.
    let registered = sys::ublk_auto_buf_reg {
        index: tag,
        flags: sys::UBLK_AUTO_BUF_REG_FALLBACK as u8,
        reserved0: 0,
        reserved1: 0,
    };
    let (desc, io_buf) = if zero_copy {
        (BufDesc::AutoReg(registered), None)
    } else {
        (BufDesc::Slice(buf.as_slice()), Some(&buf))
    };
    let prep = queue.submit_io_prep_cmd(tag, desc, 0, io_buf).await;
    if let Err(e) = prep {
        if !matches!(e, UblkError::QueueIsDown) {
            log::error!("ublk tag {tag}: {e}");
        }
        return;
    }
    let request = Request {
        cdev: queue.dev.tgt.fds[0],
        queue: queue.get_qid(),
        tag,
    };
    loop {
        let iod = *queue.get_iod(tag);
        let result = if zero_copy {
            handle_registered(view, &iod, &request, buf.as_mut_slice(), stats).await
        } else {
            handle(view, &iod, buf.as_mut_slice()).await
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        // This thread's counts: only this thread writes them.
        let ops = runtime::submitted_ops();
        stats.queue_ring_ops.store(ops.host_ring, Ordering::Relaxed);
        stats
            .runtime_ring_ops
            .store(ops.own_ring, Ordering::Relaxed);
        let desc = if zero_copy {
            BufDesc::AutoReg(registered)
        } else {
            BufDesc::Slice(buf.as_slice())
        };
        if queue.submit_io_commit_cmd(tag, desc, result).await.is_err() {
            return; // the device is stopping
        }
    }
}

/// Where a zero-copy request's data is: its pages, registered with the
/// queue's ring at the tag's index, and reachable by USER_COPY on the
/// device's char device.
struct Request {
    cdev: i32,
    queue: u16,
    tag: u16,
}

impl Request {
    /// The char device offset of the request's data (USER_COPY).
    fn user_copy_offset(&self) -> u64 {
        UblkIOCtx::ublk_user_copy_pos(self.queue, self.tag, 0)
    }

    /// Copies the request's data (a write's) into `buf`.
    async fn copy_out(&self, buf: &mut [u8]) -> io::Result<()> {
        runtime::read_at(self.cdev, buf, self.user_copy_offset()).await
    }

    /// Copies `buf` into the request's data (a read's).
    async fn copy_in(&self, buf: &[u8]) -> io::Result<()> {
        runtime::write_at(self.cdev, buf, self.user_copy_offset(), 0).await
    }
}

/// [`handle`] on a zero-copy device: reads and writes the engine can serve
/// from the origin file alone move the request's registered pages; the
/// others copy them through `buf` (USER_COPY) and run as [`handle`] does.
async fn handle_registered(
    view: &View,
    iod: &sys::ublksrv_io_desc,
    request: &Request,
    buf: &mut [u8],
    stats: &QueueStats,
) -> i32 {
    let op = iod.op_flags & 0xff;
    let offset = iod.start_sector * SECTOR_SIZE;
    let len = iod.nr_sectors as u64 * SECTOR_SIZE;
    let registered = iod.op_flags & sys::UBLK_IO_F_NEED_REG_BUF == 0;
    let index = request.tag;
    match op {
        sys::UBLK_IO_OP_READ if len as usize <= buf.len() => {
            if registered {
                let read = |fd, at| runtime::read_into_registered(fd, index, len as usize, at);
                let served = view.read_registered(offset, len, read).await;
                if let Some(reply) = zero_copy_reply(served, len, stats) {
                    return reply;
                }
            }
            let data = &mut buf[..len as usize];
            if let Err(e) = view.read(offset, data).await {
                return -e.errno();
            }
            match request.copy_in(data).await {
                Ok(()) => len as i32,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            }
        }
        sys::UBLK_IO_OP_WRITE if len as usize <= buf.len() => {
            let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
            if registered {
                let write = |fd, at, flags| {
                    runtime::write_from_registered(fd, index, len as usize, at, flags)
                };
                let served = view.write_registered(offset, len, fua, write).await;
                if let Some(reply) = zero_copy_reply(served, len, stats) {
                    return reply;
                }
            }
            let data = &mut buf[..len as usize];
            if let Err(e) = request.copy_out(data).await {
                return -e.raw_os_error().unwrap_or(libc::EIO);
            }
            reply(view.write(offset, data, fua).await, len)
        }
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => -libc::EINVAL,
        _ => handle(view, iod, buf).await,
    }
}

/// The reply to a request the engine tried zero copy for, counted; `None`
/// where it declined (the request then copies).
fn zero_copy_reply(served: Result<bool, EngineError>, len: u64, stats: &QueueStats) -> Option<i32> {
    match served {
        Ok(true) => {
            stats.zero_copy.fetch_add(1, Ordering::Relaxed);
            Some(len as i32)
        }
        Ok(false) => None,
        Err(e) => Some(-e.errno()),
    }
}

/// Runs one ublk request against the engine: bytes done, or -errno.
async fn handle(view: &View, iod: &sys::ublksrv_io_desc, buf: &mut [u8]) -> i32 {
    let op = iod.op_flags & 0xff;
    // A FLUSH's start sector means nothing: handle it before any range check.
    if op == sys::UBLK_IO_OP_FLUSH {
        return reply(view.flush().await, 0);
    }
    let offset = iod.start_sector * SECTOR_SIZE;
    let len = iod.nr_sectors as u64 * SECTOR_SIZE;
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    match op {
        sys::UBLK_IO_OP_READ => match buf.get_mut(..len as usize) {
            Some(data) => reply(view.read(offset, data).await, len),
            None => -libc::EINVAL,
        },
        sys::UBLK_IO_OP_WRITE => match buf.get(..len as usize) {
            Some(data) => reply(view.write(offset, data, fua).await, len),
            None => -libc::EINVAL,
        },
        // No buffer: a discard may be larger than the I/O buffer. The
        // driver wants a result >= 0, not a byte count: a count of 2 GiB or
        // more would not fit the i32 and read as an error.
        sys::UBLK_IO_OP_DISCARD => reply(view.discard(offset, len).await, 0),
        sys::UBLK_IO_OP_WRITE_ZEROES => reply(view.write_zeroes(offset, len, false).await, 0),
        _ => -libc::EOPNOTSUPP,
    }
}

fn reply(result: Result<(), EngineError>, bytes: u64) -> i32 {
    match result {
        Ok(()) => bytes as i32,
        Err(e) => -e.errno(),
    }
}

/// What the running kernel's ublk driver offers.
#[derive(Clone, Debug, Serialize)]
pub struct Features {
    pub driver_features: u64,
    pub names: Vec<String>,
    /// Whether the driver offers zero copy by registering each request's
    /// pages with the server's io_uring on request (SUPPORT_ZERO_COPY,
    /// usable since 6.15) or by itself (AUTO_BUF_REG, 6.16).
    pub support_zero_copy: bool,
    pub auto_buf_reg: bool,
    /// How snapblk's devices move request data on this kernel.
    pub buffers: &'static str,
    /// What the bits mean for snapblk's devices, one sentence each.
    pub notes: Vec<String>,
}

/// What the driver's feature bits mean for our devices.
fn feature_notes(bits: u64) -> Vec<String> {
    let has = |bit: u32| bits & bit as u64 != 0;
    let recovery = if has(sys::UBLK_F_USER_RECOVERY) {
        "recovery: yes (USER_RECOVERY): after kill -9 the restarted daemon re-attaches to the \
         same /dev/ublkbN and held I/O resumes (unless a device was started with --no-recovery)"
            .to_string()
    } else {
        "recovery: no (this kernel lacks USER_RECOVERY, 6.0+): a device dies with its daemon; \
         the restarted daemon starts a new one"
            .to_string()
    };
    let offered: Vec<&str> = [
        (sys::UBLK_F_SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY"),
        (sys::UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG"),
    ]
    .iter()
    .filter(|(bit, _)| has(*bit))
    .map(|(_, name)| *name)
    .collect();
    let zero_copy = if runs_zero_copy(bits) {
        format!(
            "zero copy: yes (AUTO_BUF_REG with USER_COPY; this kernel offers {}): reads and \
             writes the volume's file can serve alone move between it and the request's pages \
             without a copy in the daemon; the others (snapshot devices, clones, Ceph volumes, \
             writes held after a snapshot, replicated volumes) copy through the tag's buffer \
             (buffers: {BUFFERS_ZERO_COPY})",
            offered.join(" and ")
        )
    } else if offered.is_empty() {
        format!(
            "zero copy: not available: this kernel offers neither SUPPORT_ZERO_COPY (6.15+) nor \
             AUTO_BUF_REG (6.16+); devices copy each request's data through their own buffers \
             (buffers: {BUFFERS_COPY})"
        )
    } else {
        format!(
            "zero copy: not used: this kernel offers {} but not AUTO_BUF_REG with USER_COPY, \
             which snapblk's zero copy needs; devices copy each request's data through their \
             own buffers (buffers: {BUFFERS_COPY})",
            offered.join(" and ")
        )
    };
    vec![recovery, zero_copy]
}

const FEATURE_NAMES: &[(u64, &str)] = &[
    (sys::UBLK_F_SUPPORT_ZERO_COPY as u64, "SUPPORT_ZERO_COPY"),
    (
        sys::UBLK_F_URING_CMD_COMP_IN_TASK as u64,
        "URING_CMD_COMP_IN_TASK",
    ),
    (sys::UBLK_F_NEED_GET_DATA as u64, "NEED_GET_DATA"),
    (sys::UBLK_F_USER_RECOVERY as u64, "USER_RECOVERY"),
    (
        sys::UBLK_F_USER_RECOVERY_REISSUE as u64,
        "USER_RECOVERY_REISSUE",
    ),
    (sys::UBLK_F_UNPRIVILEGED_DEV as u64, "UNPRIVILEGED_DEV"),
    (sys::UBLK_F_CMD_IOCTL_ENCODE as u64, "CMD_IOCTL_ENCODE"),
    (sys::UBLK_F_USER_COPY as u64, "USER_COPY"),
    (sys::UBLK_F_ZONED as u64, "ZONED"),
    (
        sys::UBLK_F_USER_RECOVERY_FAIL_IO as u64,
        "USER_RECOVERY_FAIL_IO",
    ),
    (sys::UBLK_F_UPDATE_SIZE as u64, "UPDATE_SIZE"),
    (sys::UBLK_F_AUTO_BUF_REG as u64, "AUTO_BUF_REG"),
    (sys::UBLK_F_QUIESCE as u64, "QUIESCE"),
    (sys::UBLK_F_PER_IO_DAEMON as u64, "PER_IO_DAEMON"),
];

/// Asks the kernel's ublk driver what it supports.
pub fn features() -> io::Result<Features> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "this kernel has no ublk: /dev/ublk-control is missing; load it with \
             `modprobe ublk_drv` (kernel 6.0 or later)",
        ));
    }
    let bits = UblkCtrl::get_features().ok_or_else(|| {
        io::Error::other("the ublk driver did not answer GET_FEATURES (kernel older than 6.1?)")
    })?;
    let names = FEATURE_NAMES
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| name.to_string())
        .collect();
    Ok(Features {
        driver_features: bits,
        names,
        support_zero_copy: bits & sys::UBLK_F_SUPPORT_ZERO_COPY as u64 != 0,
        auto_buf_reg: bits & sys::UBLK_F_AUTO_BUF_REG as u64 != 0,
        buffers: buffers_of(bits),
        notes: feature_notes(bits),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_notes_say_what_is_missing() {
        // Debian's 6.12: recovery, neither zero-copy mode.
        let notes = feature_notes(sys::UBLK_F_USER_RECOVERY as u64);
        assert!(notes[0].starts_with("recovery: yes"), "{notes:?}");
        assert!(
            notes[1].starts_with(
                "zero copy: not available: this kernel offers neither SUPPORT_ZERO_COPY"
            ),
            "{notes:?}"
        );
        assert!(notes[1].contains("(buffers: copy)"), "{notes:?}");
        let notes =
            feature_notes((sys::UBLK_F_SUPPORT_ZERO_COPY | sys::UBLK_F_AUTO_BUF_REG) as u64);
        assert!(notes[0].starts_with("recovery: no"), "{notes:?}");
        assert!(
            notes[1].starts_with(
                "zero copy: not used: this kernel offers SUPPORT_ZERO_COPY and AUTO_BUF_REG but \
                 not AUTO_BUF_REG with USER_COPY"
            ),
            "{notes:?}"
        );
        // 6.16 and later: all three.
        let bits = (sys::UBLK_F_SUPPORT_ZERO_COPY
            | sys::UBLK_F_AUTO_BUF_REG
            | sys::UBLK_F_USER_COPY) as u64;
        let notes = feature_notes(bits);
        assert!(
            notes[1].starts_with("zero copy: yes (AUTO_BUF_REG with USER_COPY"),
            "{notes:?}"
        );
        assert!(notes[1].contains("(buffers: zero-copy)"), "{notes:?}");
        assert_eq!(buffers_of(bits), BUFFERS_ZERO_COPY);
        assert_eq!(buffers_of(sys::UBLK_F_AUTO_BUF_REG as u64), BUFFERS_COPY);
    }
}

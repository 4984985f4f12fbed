//! ublk frontend: engine views as kernel block devices (`/dev/ublkbN`).
//!
//! Owns: the life of kernel ublk devices (add, start, stop, delete, through
//! the `libublk` crate's control path), one thread per hardware queue, and
//! the mapping of ublk requests (READ, WRITE, FLUSH, FUA, DISCARD,
//! WRITE_ZEROES) onto [`View`] calls, errors going back as -errno.
//!
//! How a queue thread runs: libublk owns the queue's io_uring (it alone may
//! open `/dev/ublkcN`), and its per-tag command futures are woken when its
//! completions are reaped. The engine's own I/O runs on this thread's
//! [`runtime`] ring. [`runtime::block_on_with`] joins the two: before every
//! sleep it reaps the queue ring without blocking, and a task polls the queue
//! ring's fd from this thread's ring, so either ring's completions wake the
//! thread. The engine is called inline from the tag's task: snapshot checks
//! and copy-on-write happen in the queue's own I/O path, with every tag of
//! the queue in flight at once.
//!
//! Must never: block the queue thread (no synchronous syscalls in the I/O
//! path beyond the rings), decide anything about snapshots, or keep serving
//! after its device was stopped.

use crate::engine::{EngineError, View, SECTOR_SIZE};
use crate::runtime;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_wake_task;
use libublk::{sys, BufDesc, UblkError, UblkFlags};
use serde::Serialize;
use std::io;
use std::sync::mpsc;
use std::time::Duration;

/// Largest single request the kernel sends us.
const IO_BUF_BYTES: u32 = 1 << 20;
/// Creating or deleting a device can hang on broken kernels: give up then.
const KERNEL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
pub struct DeviceOptions {
    pub queues: u16,
    pub depth: u16,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            queues: 1,
            depth: 64,
        }
    }
}

/// A running `/dev/ublkbN` serving one engine view.
pub struct Device {
    id: u32,
    read_only: bool,
    /// Ends when the device's queues have exited and the device is deleted.
    exited: mpsc::Receiver<()>,
}

fn ublk_error(what: &str, e: UblkError) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl Device {
    /// Adds and starts a kernel ublk device for `view`; returns once
    /// `/dev/ublkbN` exists.
    pub fn start(view: View, options: &DeviceOptions) -> io::Result<Device> {
        Device::launch(view, options, None)
    }

    /// Re-attaches to device `id`, left waiting by a daemon that died
    /// (USER_RECOVERY): the same `/dev/ublkbN`, whose queued I/O resumes, so
    /// a mounted filesystem carries on.
    pub fn recover(id: u32, view: View, options: &DeviceOptions) -> io::Result<Device> {
        Device::launch(view, options, Some(id))
    }

    fn launch(view: View, options: &DeviceOptions, recover: Option<u32>) -> io::Result<Device> {
        if options.queues == 0 || options.depth == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "queues and depth must be at least 1",
            ));
        }
        features()?;
        let read_only = view.read_only();
        let (started_tx, started_rx) = mpsc::channel::<io::Result<u32>>();
        let (exited_tx, exited_rx) = mpsc::channel::<()>();
        let options = *options;
        std::thread::Builder::new()
            .name("ublk-device".into())
            .spawn(move || {
                let result = run_device(view, options, recover, started_tx.clone());
                if let Err(e) = result {
                    let _ = started_tx.send(Err(e));
                }
                drop(exited_tx);
            })?;
        let id = match started_rx.recv_timeout(KERNEL_TIMEOUT) {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not start the ublk device within 60 s; \
                     check `dmesg` for ublk_drv errors",
                ))
            }
        };
        Ok(Device {
            id,
            read_only,
            exited: exited_rx,
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn path(&self) -> String {
        format!("/dev/ublkb{}", self.id)
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Stops and deletes the kernel device, then waits for its threads.
    pub fn stop(self) -> io::Result<()> {
        let ctrl = UblkCtrl::new_simple(self.id as i32)
            .map_err(|e| ublk_error(&format!("opening ublk device {}", self.id), e))?;
        ctrl.kill_dev()
            .map_err(|e| ublk_error(&format!("stopping {}", self.path()), e))?;
        if let Err(mpsc::RecvTimeoutError::Timeout) = self.exited.recv_timeout(KERNEL_TIMEOUT) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not stop within 60 s; check `dmesg` for ublk_drv errors",
                    self.path()
                ),
            ));
        }
        // A device we added is deleted when its thread ends; one we
        // re-attached to after a crash is not ours to have added, so
        // delete it here (an error just means it is gone already).
        let _ = ctrl.del_dev();
        Ok(())
    }
}

/// Runs on the device thread until the device stops.
fn run_device(
    view: View,
    options: DeviceOptions,
    recover: Option<u32>,
    started: mpsc::Sender<io::Result<u32>>,
) -> io::Result<()> {
    // With USER_RECOVERY, a daemon killed by -9 leaves the device waiting
    // (I/O queued, not failed) for the next daemon to re-attach.
    // REISSUE: requests the dead daemon had taken are sent again to the new
    // one rather than failed; block writes are idempotent, so that is safe.
    let wanted = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
    let recovery = features()?.driver_features & wanted;
    let (id, flags) = match recover {
        Some(id) => (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV),
        None => (-1, UblkFlags::UBLK_DEV_F_ADD_DEV),
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("snapblk")
        .id(id)
        .nr_queues(options.queues)
        .depth(options.depth)
        .io_buf_bytes(IO_BUF_BYTES)
        .ctrl_flags(recovery)
        .dev_flags(flags)
        .build()
        .map_err(|e| ublk_error("adding a ublk device", e))?;
    if recover.is_some() {
        ctrl.start_user_recover()
            .map_err(|e| ublk_error(&format!("re-attaching to /dev/ublkb{id}"), e))?;
    }
    let size = view.size();
    let chunk = view.volume().chunk_size();
    let read_only = view.read_only();
    let init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
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
        let _ = started.send(Ok(ctrl.dev_info().dev_id));
    };
    ctrl.run_target(init, move |qid, dev| serve_queue(qid, dev, &view), announce)
        .map_err(|e| ublk_error("running the ublk device", e))?;
    Ok(())
}

/// One queue: a task per tag, the queue ring served through the runtime.
fn serve_queue(qid: u16, dev: &UblkDev, view: &View) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            log::error!("ublk queue {qid}: {e}");
            return;
        }
    };
    let ring_fd = libublk::io::with_task_io_ring(|ring| {
        use std::os::fd::AsRawFd;
        ring.as_raw_fd()
    });
    let service = || {
        // Submits queued commands and wakes the tasks whose commands completed.
        matches!(
            queue.flush_and_wake_io_tasks(|data, cqe, _| ublk_wake_task(data, cqe), 0),
            Ok(n) if n > 0
        )
    };
    runtime::block_on_with(service, async {
        runtime::spawn(async move { while runtime::poll_readable(ring_fd).await.is_ok() {} });
        let tasks = queue.tags().map(|tag| serve_tag(&queue, tag, view));
        futures::future::join_all(tasks).await;
    });
}

async fn serve_tag(queue: &UblkQueue<'_>, tag: u16, view: &View) {
    let mut buf = IoBuf::<u8>::new(queue.dev.dev_info.max_io_buf_bytes as usize);
    let prep = queue
        .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await;
    if let Err(e) = prep {
        if !matches!(e, UblkError::QueueIsDown) {
            log::error!("ublk tag {tag}: {e}");
        }
        return;
    }
    loop {
        let iod = *queue.get_iod(tag);
        let result = handle(view, &iod, buf.as_mut_slice()).await;
        let commit = queue
            .submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), result)
            .await;
        if commit.is_err() {
            return; // the device is stopping
        }
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
        // No buffer: a discard may be larger than the I/O buffer.
        sys::UBLK_IO_OP_DISCARD => reply(view.discard(offset, len).await, len),
        sys::UBLK_IO_OP_WRITE_ZEROES => reply(view.write_zeroes(offset, len, false).await, len),
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

/// Whether kernel device `id` exists and waits for a daemon to re-attach
/// (its previous daemon died with USER_RECOVERY set).
pub fn awaiting_recovery(id: u32) -> bool {
    let Ok(ctrl) = UblkCtrl::new_simple(id as i32) else {
        return false;
    };
    let info = ctrl.dev_info();
    info.flags & sys::UBLK_F_USER_RECOVERY as u64 != 0
        && (info.state == sys::UBLK_S_DEV_QUIESCED as u16
            || info.state == sys::UBLK_S_DEV_LIVE as u16)
}

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
    })
}

//! The control socket: a UNIX stream socket speaking JSON lines.
//!
//! One thread accepts; each client gets a thread of its own (control traffic
//! is rare and small, and a thread can block in [`crate::runtime::block_on`]
//! for engine work without stalling anyone else). The socket is mode 0660,
//! in the data directory's group, and each connection's peer credentials
//! (`SO_PEERCRED`) are checked ([`LocalPeers`]): root, the owner of the data
//! directory and members of its group may use it; everyone else gets a
//! `permission_denied` answer to every request. Each request of a caller
//! who is not a superuser is then checked against the access list of the
//! volume it names ([`super::access`]).
//!
//! A bad line (not JSON, unknown op, missing or mistyped field, too long) gets
//! a JSON error on that connection, which then goes on; nothing a client
//! sends can stop the daemon.
//!
//! Bounds: at most [`MAX_CLIENTS`] client threads for permitted peers and
//! [`MAX_REFUSED`] for refused ones (so other users cannot crowd out root);
//! a connection over its pool's limit gets one `busy` line and is closed.
//! Descriptors passed (SCM_RIGHTS) on a refused connection are closed at
//! once; a permitted one keeps only its latest [`MAX_PASSED`].

use super::protocol::{parse_request, ControlError, ErrorCode, Request, Response, MAX_LINE};
use crate::frontend::nbd::NbdTls;
use crate::security::{Caller, LocalPeers};
use crate::volumes::{CephPlacement, ErrorKind, Registry, VolumeError};
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Client threads serving permitted peers at once.
pub const MAX_CLIENTS: usize = 64;
/// Client threads answering refused peers at once.
pub const MAX_REFUSED: usize = 8;
/// Passed descriptors a connection holds at most (a request uses one).
pub const MAX_PASSED: usize = 4;

/// Counts a client thread in its pool while it lives.
pub(super) struct PoolSlot(Arc<AtomicUsize>);

impl PoolSlot {
    pub(super) fn take(pool: &Arc<AtomicUsize>, max: usize) -> Option<PoolSlot> {
        pool.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| PoolSlot(pool.clone()))
    }
}

impl Drop for PoolSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What `daemon.status` reports besides the registry.
pub struct DaemonFacts {
    pub data_dir: PathBuf,
    pub control_socket: PathBuf,
    /// `--control-listen`'s bound address.
    pub control_tcp: Option<String>,
    pub nbd_unix: Vec<PathBuf>,
    pub nbd_tcp: Vec<String>,
    /// NBD TLS mode: "off", "on" or "require".
    pub nbd_tls: &'static str,
    pub nbd_tls_client_certs: bool,
    pub started: Instant,
    pub jobs: Arc<crate::copy::Jobs>,
    pub replication: Arc<crate::replication::Replication>,
    pub schedules: Arc<crate::schedule::Schedules>,
    /// A forced revert closes the connections writing the volume.
    pub nbd: Arc<crate::frontend::nbd::NbdServer>,
    pub space_guard: Arc<crate::schedule::SpaceGuard>,
}

pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    stopping: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    remote: Option<super::remote::RemoteControl>,
}

impl ControlServer {
    /// Binds the socket at `path` (a stale socket file is replaced; the caller
    /// holds the data directory's lock, so no other daemon owns it) and starts
    /// accepting; with `remote`, on that TCP listener too (mutual TLS).
    pub fn start(
        path: &Path,
        registry: Arc<Registry>,
        facts: DaemonFacts,
        remote: Option<(TcpListener, NbdTls)>,
    ) -> io::Result<ControlServer> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                if UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("another daemon is already listening on {}", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
        }
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)?;
            }
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        let peers = LocalPeers::of_data_dir(registry.data_dir())?;
        peers.give_socket_to_group(path);
        let stopping = Arc::new(AtomicBool::new(false));
        let facts = Arc::new(facts);
        let remote = match remote {
            Some((tcp, tls)) => Some(super::remote::RemoteControl::serve(
                tcp,
                tls,
                registry.clone(),
                facts.clone(),
                stopping.clone(),
            )?),
            None => None,
        };
        let accept_listener = listener.try_clone()?;
        let stop = stopping.clone();
        let (permitted, turned) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let accept_thread = std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || {
                for conn in accept_listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let stream = match conn {
                        Ok(s) => s,
                        Err(e) => {
                            log::warn!("control socket: accept failed: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            continue;
                        }
                    };
                    let caller = peers.check(stream.as_raw_fd(), "control socket");
                    if let Err(why) = &caller {
                        log::warn!("control socket: refusing a client: {why}");
                    }
                    let allowed = caller.is_ok();
                    let (pool, max) = if allowed {
                        (&permitted, MAX_CLIENTS)
                    } else {
                        (&turned, MAX_REFUSED)
                    };
                    let Some(slot) = PoolSlot::take(pool, max) else {
                        turn_away(stream, allowed);
                        continue;
                    };
                    let registry = registry.clone();
                    let facts = facts.clone();
                    let stop = stop.clone();
                    let spawned = std::thread::Builder::new()
                        .name("control-client".into())
                        .spawn(move || {
                            let _slot = slot;
                            serve_client(stream, caller, &registry, &facts, &stop)
                        });
                    if let Err(e) = spawned {
                        log::error!("control socket: cannot start a client thread: {e}");
                    }
                }
            })?;
        log::info!("control socket listening on {}", path.display());
        Ok(ControlServer {
            path: path.to_path_buf(),
            listener,
            stopping,
            accept_thread: Some(accept_thread),
            remote,
        })
    }

    /// Stops accepting and removes the socket file. Clients already connected
    /// get `busy` from the registry from now on.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // shutdown(2) on a listening socket wakes a thread blocked in accept.
        // SAFETY: plain syscall on a descriptor we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        if let Some(r) = &mut self.remote {
            r.stop();
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.accept_thread.is_some() {
            self.stop();
        }
    }
}

/// Answers a connection over its pool's limit with one `busy` line and
/// closes it (with whatever descriptors it passed, never received).
fn turn_away(mut stream: UnixStream, allowed: bool) {
    let max = if allowed { MAX_CLIENTS } else { MAX_REFUSED };
    log::warn!("control socket: {max} clients of this kind already connected; turning one away");
    let mut line = Response::from_result(Err(ControlError::new(
        ErrorCode::Busy,
        format!(
            "the daemon already serves {max} control connections; close some (or wait) and retry"
        ),
    )))
    .to_line();
    line.push('\n');
    // Never block the accept thread on a client that does not read.
    let _ = stream.set_nonblocking(true);
    let _ = stream.write_all(line.as_bytes());
}

/// Serves one connection; `caller` is its peer, or why it may not use the
/// socket (every request gets that as a `permission_denied` answer).
fn serve_client(
    stream: UnixStream,
    caller: Result<Caller, String>,
    registry: &Registry,
    facts: &DaemonFacts,
    stop: &AtomicBool,
) {
    let keep = caller.is_ok();
    serve_lines(
        BufReader::new(PassingReader { stream, keep }),
        caller,
        registry,
        facts,
        stop,
    );
}

/// Answers request lines on `conn` until it ends or fails: the protocol
/// loop both listeners share (the UNIX socket and `--control-listen`).
pub(super) fn serve_lines<S: Read + Write>(
    mut reader: BufReader<S>,
    caller: Result<Caller, String>,
    registry: &Registry,
    facts: &DaemonFacts,
    stop: &AtomicBool,
) {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return; // EOF
        }
        let too_long = line.len() > MAX_LINE && line.last() != Some(&b'\n');
        let response = if too_long {
            // Skip the rest of this line, then answer it.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                match (&mut reader)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut rest)
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) if rest.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
            Response::from_result(Err(ControlError::bad_request(format!(
                "request line longer than {MAX_LINE} bytes"
            ))))
        } else {
            let trimmed = line.trim_ascii();
            if trimmed.is_empty() {
                continue;
            }
            match &caller {
                Err(why) => Response::from_result(Err(ControlError::new(
                    ErrorCode::PermissionDenied,
                    why.clone(),
                ))),
                Ok(caller) => {
                    let result = parse_request(trimmed).and_then(|req| {
                        if stop.load(Ordering::Acquire) {
                            return Err(ControlError::new(
                                ErrorCode::Busy,
                                "the daemon is shutting down",
                            ));
                        }
                        let op = req.op();
                        let r = handle(req, caller, registry, facts);
                        if let Err(e) = &r {
                            log::debug!("{op}: {} ({})", e.message, e.code);
                        }
                        r
                    });
                    Response::from_result(result)
                }
            }
        };
        let mut out = response.to_line();
        out.push('\n');
        let writer = reader.get_mut();
        if writer
            .write_all(out.as_bytes())
            .and_then(|_| writer.flush())
            .is_err()
        {
            return;
        }
    }
}

thread_local! {
    /// Descriptors a client passed with SCM_RIGHTS (each client has a thread).
    static PASSED: std::cell::RefCell<Vec<OwnedFd>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The latest descriptor this thread's client passed (`copy start --to -`,
/// `restore`), if any; earlier ones are closed.
fn take_passed_fd() -> Option<OwnedFd> {
    PASSED.with(|p| p.borrow_mut().drain(..).next_back())
}

/// Reads a control connection with `recvmsg`, keeping passed descriptors
/// if `keep` (the peer is permitted), at most [`MAX_PASSED`]; the others
/// are closed as they arrive.
struct PassingReader {
    stream: UnixStream,
    keep: bool,
}

fn received_fd(fd: OwnedFd, keep: bool) {
    if !keep {
        return; // dropped: closed
    }
    PASSED.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() >= MAX_PASSED {
            p.remove(0);
        }
        p.push(fd);
    });
}

/// Answers go straight to the socket.
impl Write for PassingReader {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.stream).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for PassingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: msg points at live buffers of the sizes given; the kernel
        // writes at most msg_controllen bytes of control data.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
            let n = libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_SOCKET
                        && (*cmsg).cmsg_type == libc::SCM_RIGHTS
                    {
                        let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                        let count = ((*cmsg).cmsg_len as usize - (data as usize - cmsg as usize))
                            / std::mem::size_of::<RawFd>();
                        for i in 0..count {
                            let fd = std::ptr::read_unaligned(data.add(i));
                            received_fd(OwnedFd::from_raw_fd(fd), self.keep);
                        }
                    }
                    cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
                }
            }
            n
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Takes a snapshot of `volumes` with `take`, quiesced as `quiesce` says.
fn quiesced(
    quiesce: Option<crate::quiesce::Quiesce>,
    registry: &Registry,
    target: &str,
    volumes: &[String],
    snapshot: &str,
    take: impl FnOnce() -> Result<Value, VolumeError>,
) -> Result<Value, VolumeError> {
    match quiesce {
        Some(q) => crate::quiesce::around(&q, registry, target, volumes, snapshot, take),
        None => take(),
    }
}

/// Executes one parsed request if `caller` may send it; the layer that
/// does it answers in its own error type, which becomes the protocol's here.
pub fn handle(
    req: Request,
    caller: &Caller,
    registry: &Registry,
    facts: &DaemonFacts,
) -> Result<Value, ControlError> {
    if let Err(e) = super::access::authorize(&req, caller, registry) {
        log::warn!("control socket: refused {}: {}", req.op(), e.message);
        return Err(e.into());
    }
    dispatch(req, caller, registry, facts).map_err(ControlError::from)
}

/// A new volume of a caller who is not a superuser becomes theirs. Made
/// right after the create: a crash in between leaves it root's, never
/// someone else's.
fn owned_by(
    caller: &Caller,
    registry: &Registry,
    name: &str,
    created: Result<Value, VolumeError>,
) -> Result<Value, VolumeError> {
    let mut created = created?;
    if !caller.superuser {
        let access = crate::engine::AccessRecord {
            owner: caller.uid,
            acl: Vec::new(),
        };
        registry.set_access(name, access)?;
        created["owner"] = json!(crate::security::user_name(caller.uid));
    }
    Ok(created)
}

/// `volume.access`: shows the list after applying a grant or revoke.
fn volume_access(
    registry: &Registry,
    name: &str,
    grant: Option<String>,
    revoke: Option<String>,
) -> Result<Value, VolumeError> {
    use crate::volumes::access;
    let mut record = registry.access_of(name)?;
    let changed = grant.is_some() || revoke.is_some();
    if let Some(g) = grant {
        record = access::granted(record, access::parse_grant(&g)?);
    }
    if let Some(r) = revoke {
        record = access::revoked(record, access::parse_principal(&r)?, name)?;
    }
    if changed {
        registry.set_access(name, record.clone())?;
        log::info!(
            "volume {name}: access list is now {}",
            access::to_json(&record)
        );
    }
    let mut out = access::to_json(&record);
    out["volume"] = json!(name);
    Ok(out)
}

/// A user named by name or uid.
fn user_id(user: &str) -> Result<u32, VolumeError> {
    crate::security::user_by_name(user).ok_or_else(|| {
        VolumeError::not_found(format!(
            "no user named {user:?} on the daemon's machine; check the name (`getent passwd`)"
        ))
    })
}

/// `quota.show`: every user's (a superuser) or the caller's own line.
fn quota_show(
    registry: &Registry,
    caller: &Caller,
    user: Option<String>,
) -> Result<Value, VolumeError> {
    let owners: Vec<(String, u32)> = registry
        .ready_volumes()
        .iter()
        .map(|v| (v.name().to_string(), v.access().owner))
        .collect();
    let only = match user {
        Some(u) => Some(user_id(&u)?),
        None if !caller.superuser => Some(caller.uid),
        None => None,
    };
    let mut usage = registry.quotas().usage(&owners);
    if let Some(uid) = only {
        usage.retain(|u| u.uid == uid);
        if usage.is_empty() {
            usage.push(crate::volumes::quota::Usage {
                user: crate::security::user_name(uid),
                uid,
                limit: None,
                used: 0,
                volumes: Vec::new(),
            });
        }
    }
    serde_json::to_value(usage).map_err(|e| VolumeError::new(ErrorKind::IoError, e.to_string()))
}

fn dispatch(
    req: Request,
    caller: &Caller,
    registry: &Registry,
    facts: &DaemonFacts,
) -> Result<Value, VolumeError> {
    match req {
        Request::VolumeCreate {
            name,
            size,
            chunk_size,
            partitions,
            backing,
            cache,
            ceph,
        } => match ceph {
            None => owned_by(
                caller,
                registry,
                &name,
                registry.create_volume(&name, size, chunk_size, partitions, backing, cache),
            ),
            Some(_) if backing.is_some() || cache.is_some() => Err(VolumeError::invalid(
                "a Ceph volume takes neither --backing nor --cache (its data is the RBD image)",
            )),
            Some(spec) => {
                let placement = CephPlacement::Create { size };
                registry.create_ceph_volume(&name, spec, placement, chunk_size, partitions)
            }
        },
        Request::VolumeImport {
            name,
            ceph,
            chunk_size,
            partitions,
        } => {
            registry.create_ceph_volume(&name, ceph, CephPlacement::Import, chunk_size, partitions)
        }
        Request::VolumeAttach {
            name,
            ceph,
            break_lock,
        } => {
            let placement = CephPlacement::Attach { break_lock };
            registry.create_ceph_volume(&name, ceph, placement, None, None)
        }
        Request::VolumeList {} => registry.list_volumes().map(|all| {
            // Only the volumes the caller may read.
            match all {
                Value::Array(list) if !caller.superuser => Value::Array(
                    list.into_iter()
                        .filter(|v| {
                            let name = v["name"].as_str().unwrap_or_default();
                            registry.access_of(name).is_ok_and(|a| {
                                crate::volumes::access::level_of(&a, caller).is_some()
                            })
                        })
                        .collect(),
                ),
                other => other,
            }
        }),
        Request::VolumeAccess {
            name,
            grant,
            revoke,
        } => volume_access(registry, &name, grant, revoke),
        Request::VolumeChown { name, user } => {
            let uid = user_id(&user)?;
            let mut record = registry.access_of(&name)?;
            record.owner = uid;
            registry.set_access(&name, record.clone())?;
            log::info!(
                "volume {name}: owner is now {}",
                crate::security::user_name(uid)
            );
            let mut out = crate::volumes::access::to_json(&record);
            out["volume"] = json!(name);
            Ok(out)
        }
        Request::QuotaSet { user, limit } => {
            let uid = user_id(&user)?;
            registry.quotas().set(uid, limit)?;
            log::info!(
                "quota of user {}: {}",
                crate::security::user_name(uid),
                limit.map_or("none".to_string(), |l| format!("{l} bytes"))
            );
            quota_show(registry, caller, Some(user))
        }
        Request::QuotaShow { user } => quota_show(registry, caller, user),
        Request::VolumeInfo { name } => registry.volume_info(&name).map(|mut v| {
            v["space_guard"] = facts.space_guard.volume_status(&name);
            v
        }),
        Request::VolumeDelete { name } => facts.jobs.unless_used(&name, None, || {
            facts.replication.check_volume_delete(&name)?;
            facts.replication.check_replica_delete(&name)?;
            facts.schedules.check_unscheduled(Some(&name), None)?;
            registry.delete_volume(&name)
        }),
        Request::VolumeDetach { name } => facts.jobs.unless_used(&name, None, || {
            facts.replication.check_volume_delete(&name)?;
            facts.replication.check_replica_delete(&name)?;
            facts.schedules.check_unscheduled(Some(&name), None)?;
            registry.detach_volume(&name)
        }),
        Request::VolumeReopen { name } => facts.jobs.unless_used(&name, None, || {
            facts.replication.check_volume_delete(&name)?;
            facts.replication.check_replica_reopen(&name)?;
            registry.reopen_volume(&name)
        }),
        Request::SnapshotCreate {
            volume,
            name,
            quiesce,
        } => quiesced(
            quiesce,
            registry,
            &format!("volume {volume}"),
            std::slice::from_ref(&volume),
            &name,
            || {
                let created = registry.create_snapshot(&volume, &name)?;
                facts.replication.snapshot_taken(&volume);
                Ok(created)
            },
        ),
        Request::VolumeClone {
            volume,
            snapshot,
            name,
        } => owned_by(
            caller,
            registry,
            &name,
            registry.clone_volume(&volume, &snapshot, &name),
        ),
        Request::VolumeFlatten { name } => registry.flatten_volume(&name),
        Request::SnapshotRevert {
            volume,
            name,
            force,
        } => {
            // Forced: what writes the volume is stopped first (its device
            // in `revert`); its read-only snapshot exports stay connected.
            if force {
                facts.jobs.cancel_using(&volume);
                if facts.replication.check_volume_delete(&volume).is_err() {
                    facts.replication.stop_link(&volume, None)?;
                }
                facts
                    .nbd
                    .disconnect_writers(&volume)
                    .map_err(|e| VolumeError::new(ErrorKind::Busy, e))?;
            } else {
                let writers = facts.nbd.writers(&volume);
                if !writers.is_empty() {
                    return Err(VolumeError::new(
                        ErrorKind::Busy,
                        format!(
                            "volume {volume} is written by NBD client(s): {}; disconnect them, \
                             or use `snapblk snapshot revert {volume} {name} --force` to close \
                             their connections",
                            writers.join(", ")
                        ),
                    ));
                }
            }
            facts.jobs.unless_used(&volume, None, || {
                facts.replication.check_volume_delete(&volume)?;
                facts.replication.check_replica_use(&volume, None, false)?;
                registry.revert(&volume, &name, force)
            })
        }
        Request::SnapshotList { volume } => registry.list_snapshots(&volume),
        Request::SnapshotDiff { volume, from, to } => {
            registry.diff_snapshots(&volume, &from, to.as_deref())
        }
        Request::SnapshotDelete { volume, name } => {
            facts.jobs.unless_used(&volume, Some(&name), || {
                facts
                    .replication
                    .check_replica_use(&volume, Some(&name), true)?;
                registry.delete_snapshot(&volume, &name)
            })
        }
        Request::DeviceStart {
            volume,
            snapshot,
            queues,
            depth,
            recovery,
            zero_copy,
        } => {
            facts
                .replication
                .check_replica_use(&volume, snapshot.as_deref(), false)?;
            registry.start_device(&volume, snapshot, queues, depth, recovery, zero_copy)
        }
        Request::DeviceStop { device } => registry.stop_device(&device),
        Request::DeviceList {} => registry.list_devices(),
        Request::Features {} => registry.features(),
        Request::CopyStart(start) => facts.jobs.start(start, take_passed_fd()),
        Request::CopyStatus { id } => facts.jobs.status(id),
        Request::CopyPause { id } => facts.jobs.pause(id),
        Request::CopyResume { id } => facts.jobs.resume(id),
        Request::CopyCancel { id } => facts.jobs.cancel(id),
        Request::CopyList {} => Ok(facts.jobs.list()),
        Request::Restore { volume } => crate::copy::restore_vol::restore(
            registry,
            &volume,
            take_passed_fd(),
            |v| {
                facts.jobs.unless_used(v, None, || {
                    facts.replication.check_volume_delete(v)?;
                    facts.replication.check_replica_use(v, None, false)?;
                    registry.claim_for_restore(v)
                })
            },
            |v| {
                facts
                    .jobs
                    .unless_used(v, None, || registry.delete_volume(v))
            },
        ),
        Request::ReplicateStart(start) => facts.replication.start_link(start),
        Request::ReplicateStop { volume, group } => {
            facts.replication.stop_link(&volume, group.as_deref())
        }
        Request::ReplicateStatus { volume, group } => facts
            .replication
            .status(volume.as_deref(), group.as_deref()),
        Request::ReplicateCp { volume, group } => {
            facts.replication.cp_now(&volume, group.as_deref())
        }
        Request::ReplicatePromote { volume } => facts.replication.promote(&volume),
        Request::GroupCreate { name, volumes } => registry.create_group(&name, &volumes),
        Request::GroupList {} => registry.list_groups(),
        Request::GroupInfo { name } => registry.group_info(&name),
        Request::GroupDelete { name } => {
            facts.schedules.check_unscheduled(None, Some(&name))?;
            facts.replication.check_group_delete(&name)?;
            registry.delete_group(&name)
        }
        Request::GroupSnapshotCreate {
            group,
            name,
            quiesce,
        } => quiesced(
            quiesce,
            registry,
            &format!("group {group}"),
            &registry.groups().members(&group)?,
            &name,
            || {
                let created = registry.create_group_snapshot(&group, &name)?;
                for v in registry.groups().members(&group)? {
                    facts.replication.snapshot_taken(&v);
                }
                Ok(created)
            },
        ),
        Request::GroupSnapshotDelete { group, name } => {
            let members = registry.groups().members(&group)?;
            facts.jobs.unless_snapshot_used(&members, &name, || {
                registry.delete_group_snapshot(&group, &name)
            })
        }
        Request::ScheduleAdd(add) => facts.schedules.add(add),
        Request::ScheduleList {} => Ok(facts.schedules.list()),
        Request::ScheduleRemove { id } => facts.schedules.remove(id),
        Request::SchedulePause { id } => facts.schedules.set_paused(id, true),
        Request::ScheduleResume { id } => facts.schedules.set_paused(id, false),
        Request::Stats {} => Ok(super::metrics::gather(
            registry,
            &facts.jobs,
            &facts.replication,
        )),
        Request::DaemonStatus {} => Ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "data_dir": facts.data_dir,
            "control_socket": facts.control_socket,
            "control_tcp": facts.control_tcp,
            "nbd_unix": facts.nbd_unix,
            "nbd_tcp": facts.nbd_tcp,
            "nbd_tls": facts.nbd_tls,
            "nbd_tls_client_certs": facts.nbd_tls_client_certs,
            "volumes": registry.len(),
            "devices": registry.device_count(),
            "copy_jobs": facts.jobs.list().as_array().map_or(0, Vec::len),
            "replication_links": facts.replication.link_count(),
            "uptime_s": facts.started.elapsed().as_secs(),
            "space_guard": facts.space_guard.status(),
        })),
    }
}

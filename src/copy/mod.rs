//! Live copy jobs: a point-in-time copy of a volume (or one of its
//! snapshots) that is being written, to a file, a block device, another
//! volume (`vol:NAME`) or a backup stream, and `restore` of such streams.
//! Seeds 000 and 001: segments of a fixed block size, write interception
//! with a FIFO hold or a copy-first, the snapshot map and data for
//! copy-on-write, device-to-device I/O, a reordered block list, control
//! data before and after each block.
//!
//! Owns: the job engine ([`job`]: segments, policies, the job thread, group
//! commit, verify), targets ([`target`]), the stream format ([`stream`]),
//! durable progress ([`progress`]: `DATA_DIR/jobs/<id>.json` + `<id>.map`),
//! restore ([`restore`] to files and devices, [`restore_vol`] into a volume
//! of the daemon) and the set of jobs of a daemon ([`Jobs`]).
//!
//! Policies: `cow` takes an engine-internal snapshot `.copy-<id>` at
//! `copy start` (users cannot name, list or delete it) and reads it; the
//! engine preserves old data once, as for any snapshot, and each segment
//! durably copied is given back so later overwrites skip the preservation.
//! `hold` and `direct` install a write hook and read the live volume: a
//! write to a segment not yet copied waits until the job copied it (`hold`)
//! or copies it first itself (`direct`).
//!
//! Data path (seed 001's device-to-device copy): the job thread moves
//! segments the source reads from the origin file with `copy_file_range`
//! when the target is a file on the same file system; everything else is
//! read and written through one arena registered with the job thread's
//! io_uring (READ_FIXED / WRITE_FIXED), O_DIRECT on the target where
//! accepted, consecutive segments merged into runs of up to 8 MiB.
//!
//! Must never: let a write reach a segment of the origin that the copy
//! still needs before that segment's data and progress entry are durable;
//! fail or block a client's write because the target failed (the job fails
//! instead, and every write goes through); move data through a client
//! connection.

pub mod chain;
pub mod job;
pub mod progress;
pub mod restore;
pub mod restore_vol;
pub mod stream;
pub mod target;

use crate::engine::Volume;
use crate::runtime::block_on;
use crate::volumes::{validate_name, ErrorKind, Registry, VolumeError};
use job::{record_json, Job, Parts, Want};
use progress::{Format, JobRecord, JobState, Policy, ProgressMap};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use target::Target;

/// Internal snapshots of `cow` jobs are named `.copy-<id>`.
pub const INTERNAL_PREFIX: &str = ".copy-";
pub const DEFAULT_BLOCK_SIZE: u64 = 1 << 20;
/// The nice value of a job thread no write waits for.
const BACKGROUND_NICE: i32 = 10;

/// Lets foreground I/O win the CPU and the disk over the calling thread (a
/// job or a restore no client write waits for): nice 10, and the idle I/O
/// class, which schedulers with priorities (mq-deadline, bfq) serve only
/// when nothing else waits, or after their aging limit (10 s by default),
/// so the job is slowed by foreground I/O but never stopped. Its io_uring
/// requests carry this thread's I/O priority.
fn lower_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: u32 = 13;
    // SAFETY: plain syscalls on this thread's own id.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE);
        let idle = IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT;
        if libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            idle,
        ) != 0
        {
            log::debug!(
                "cannot lower the I/O priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// `copy.start`'s fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyStart {
    pub volume: String,
    /// Copy this snapshot of the volume instead of the live volume.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// A file path, a block device, `vol:NAME`.
    pub target: String,
    #[serde(default)]
    pub policy: Option<Policy>,
    #[serde(default)]
    pub block_size: Option<u64>,
    /// Bytes per second.
    #[serde(default)]
    pub rate: Option<u64>,
    #[serde(default)]
    pub format: Option<Format>,
    #[serde(default)]
    pub verify: bool,
    /// See [`JobRecord::hold_timeout_ms`]; default
    /// [`progress::DEFAULT_HOLD_TIMEOUT_MS`].
    #[serde(default)]
    pub hold_timeout_ms: Option<u64>,
    /// Copy only what changed since this older snapshot: the raw target
    /// holds it already, or the stream is an incremental onto it.
    #[serde(default)]
    pub since: Option<String>,
}

enum Slot {
    Live(Arc<Job>),
    Ended(Box<JobRecord>),
}

/// Whether `copy_file_range` to `file` shares extents (reflink: XFS,
/// btrfs, OCFS2) or copies on the server (NFS, SMB) instead of moving the
/// data through the page cache, as the generic fallback of ext4 or tmpfs
/// does: measured with `scripts/bench-copy`, that fallback is slower than
/// the job's own O_DIRECT path through registered buffers.
fn clones_or_offloads(file: &std::fs::File) -> bool {
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683e;
    const OCFS2: i64 = 0x7461_636f;
    const NFS: i64 = 0x6969;
    const SMB2: i64 = 0xfe53_4d42;
    const CIFS: i64 = 0xff53_4d42;
    // SAFETY: statfs is plain old data, valid all zero; fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(file), &mut st) } != 0 {
        return false;
    }
    [XFS, BTRFS, OCFS2, NFS, SMB2, CIFS].contains(&(st.f_type as i64))
}

/// Every job of a daemon.
pub struct Jobs {
    dir: PathBuf,
    registry: Arc<Registry>,
    jobs: Arc<Mutex<BTreeMap<u64, Slot>>>,
    threads: Mutex<BTreeMap<u64, JoinHandle<()>>>,
    /// Held by `copy.start` from looking up its source to the job being
    /// listed (ids, internal snapshot names, the source's existence), and by
    /// a delete of a volume or snapshot from its in-use check to the
    /// deletion: either the delete sees the job and is refused, or the
    /// start finds its source gone.
    starting: Mutex<()>,
    /// The timer thread failing jobs whose target stalled (set: stop).
    timer_stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    timer: Mutex<Option<JoinHandle<()>>>,
}

/// How often the timer looks for writes waiting on a stalled target.
const STALL_TICK: Duration = Duration::from_millis(100);
/// How long `copy cancel` and shutdown let a job thread finish its I/O, and
/// then wait again after dropping that I/O, before leaving the thread.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Waits up to [`STOP_GRACE`] for `thread` to end; true if it did.
fn ended_within(thread: &JoinHandle<()>) -> bool {
    let deadline = Instant::now() + STOP_GRACE;
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    thread.is_finished()
}

/// Joins a job thread asked to stop or cancel. One stuck on a target that
/// takes no data is told to stop waiting (its I/O is dropped, which
/// cancels it); one the kernel still does not let go (a hung network file
/// system) is left behind rather than hang the caller.
fn join_job(job: &Job, thread: JoinHandle<()>) {
    if !ended_within(&thread) {
        log::warn!(
            "copy job {}: its target takes no data; abandoning its I/O",
            job.id
        );
        job.stop_waiting();
        if !ended_within(&thread) {
            log::error!(
                "copy job {}: its thread is still stuck in the target's I/O; leaving it",
                job.id
            );
            return;
        }
    }
    let _ = thread.join();
}

fn io_err(what: &str, e: io::Error) -> VolumeError {
    let mut c = VolumeError::from(e);
    c.message = format!("{what}: {}", crate::cli::strip_os_error(&c.message));
    c
}

impl Jobs {
    /// Loads `DATA_DIR/jobs/` and resumes every unfinished job: hooks are
    /// in place when this returns, so call it before any frontend serves.
    pub fn open(data_dir: &Path, registry: Arc<Registry>) -> io::Result<Arc<Jobs>> {
        let dir = progress::jobs_dir(data_dir);
        std::fs::create_dir_all(&dir)?;
        let jobs = Arc::new(Jobs {
            dir: dir.clone(),
            registry,
            jobs: Arc::new(Mutex::new(BTreeMap::new())),
            threads: Mutex::new(BTreeMap::new()),
            starting: Mutex::new(()),
            timer_stop: Arc::new((Mutex::new(false), std::sync::Condvar::new())),
            timer: Mutex::new(None),
        });
        let (live, stop) = (jobs.jobs.clone(), jobs.timer_stop.clone());
        let timer = std::thread::Builder::new()
            .name("copy-timer".into())
            .spawn(move || stall_timer(&live, &stop))?;
        *jobs.timer.lock().unwrap() = Some(timer);
        let mut records = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                match progress::load_record(&path) {
                    Ok(r) => records.push(r),
                    Err(e) => log::error!("ignoring {}: {e}", path.display()),
                }
            }
        }
        records.sort_by_key(|r| r.id);
        for r in records {
            let id = r.id;
            if r.state.finished() {
                // Failed by a write's hook while the daemon stopped: its
                // map is left (its internal snapshot goes below).
                let _ = std::fs::remove_file(progress::map_path(&dir, id));
                jobs.lock().insert(id, Slot::Ended(Box::new(r)));
                continue;
            }
            match jobs.reload(r.clone()) {
                Ok(job) => {
                    log::info!("copy job {id}: resumed ({:?})", r.state);
                    jobs.lock().insert(id, Slot::Live(job.clone()));
                    jobs.spawn(job);
                }
                Err(e) => {
                    let mut r = r;
                    let msg = format!("cannot resume after the daemon restarted: {}", e.message);
                    log::error!("copy job {id}: {msg}");
                    jobs.forget_leftovers(&r);
                    r.state = JobState::Failed;
                    r.error = Some(msg);
                    if let Err(e) = progress::save_record(&dir, &r) {
                        log::error!("copy job {id}: cannot save its state: {e}");
                    }
                    jobs.lock().insert(id, Slot::Ended(Box::new(r)));
                }
            }
        }
        jobs.drop_orphan_snapshots();
        Ok(jobs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Slot>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `.copy-<id>` snapshots whose job is not live (a crash between taking
    /// the snapshot and recording the job).
    fn drop_orphan_snapshots(&self) {
        let live: Vec<String> = self
            .lock()
            .values()
            .filter_map(|s| match s {
                Slot::Live(j) => j.record().internal_snapshot,
                Slot::Ended(_) => None,
            })
            .collect();
        for (name, slot) in self.registry.entries() {
            let crate::volumes::Slot::Ready(vol) = slot else {
                continue;
            };
            for s in vol.list_snapshots() {
                if s.name.starts_with(INTERNAL_PREFIX) && !live.contains(&s.name) {
                    log::info!("deleting {name}@{}: no copy job uses it", s.name);
                    if let Err(e) = block_on(vol.delete_snapshot(&s.name)) {
                        log::warn!("cannot delete {name}@{}: {e}", s.name);
                    }
                }
            }
        }
    }

    /// Removes what an unfinished job left (its internal snapshot, its map).
    fn forget_leftovers(&self, r: &JobRecord) {
        if let (Some(snap), Ok(vol)) = (&r.internal_snapshot, self.registry.volume(&r.volume)) {
            let _ = block_on(vol.delete_snapshot(snap));
        }
        let _ = std::fs::remove_file(progress::map_path(&self.dir, r.id));
    }

    fn spawn(&self, job: Arc<Job>) {
        let id = job.id;
        let jobs = self.jobs.clone();
        let handle = std::thread::Builder::new()
            .name(format!("copy-{id}"))
            .spawn(move || {
                let r = job.record();
                if r.policy == Policy::Cow || r.snapshot.is_some() {
                    // No write waits for this job: let foreground I/O win
                    // the CPU (a held or copied-first write does wait).
                    lower_priority();
                }
                job.clone().run();
                // An ended job lets go of its target (a pipe sees EOF).
                let r = job.record();
                if r.state.finished() {
                    drop(job);
                    jobs.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, Slot::Ended(Box::new(r)));
                }
            })
            .expect("spawning a copy job thread");
        self.threads.lock().unwrap().insert(id, handle);
    }

    /// `passed` is the descriptor the client sent with the request, the
    /// target `-` stands for.
    fn open_target(
        &self,
        r: &JobRecord,
        resume: bool,
        passed: Option<OwnedFd>,
    ) -> Result<(Target, Option<PathBuf>), VolumeError> {
        if r.target == "-" {
            if resume {
                return Err(VolumeError::invalid(
                    "its target was the standard output of `snapblk copy start`, which ended \
                     with the daemon; start a new copy",
                ));
            }
            let fd = passed.ok_or_else(|| {
                VolumeError::invalid(
                    "target `-` is the standard output of the CLI, passed with the request; \
                     use `snapblk copy start VOL --format stream --to -`",
                )
            })?;
            if r.format != Format::Stream || r.verify {
                return Err(VolumeError::invalid(
                    "standard output takes a backup stream (--format stream) without --verify",
                ));
            }
            let incremental = r.since.is_some();
            return Ok((Target::stream(std::fs::File::from(fd), incremental), None));
        }
        if let Some(name) = r.target.strip_prefix("vol:") {
            if r.format == Format::Stream {
                return Err(VolumeError::invalid(
                    "a stream goes to a file; copy to vol:NAME with --format raw",
                ));
            }
            if name == r.volume {
                return Err(VolumeError::invalid(format!(
                    "volume {name} cannot be copied onto itself; choose another volume"
                )));
            }
            let vol = self.registry.volume(name)?;
            if vol.size() < r.size {
                return Err(VolumeError::invalid(format!(
                    "target volume {name} has {} bytes but the copy needs {}; create a volume at \
                     least as large",
                    vol.size(),
                    r.size
                )));
            }
            return Ok((Target::Volume(vol.live()), None));
        }
        let path = Path::new(&r.target);
        if !path.is_absolute() {
            return Err(VolumeError::invalid(format!(
                "target path {:?} must be absolute",
                r.target
            )));
        }
        if !resume {
            if let Some(dev) = own_device(path, &self.registry.device_paths_of(&r.volume)) {
                return Err(VolumeError::invalid(format!(
                    "{} is {}, a device of volume {} itself: the copy would overwrite what it \
                     reads; choose another target",
                    r.target,
                    dev.display(),
                    r.volume
                )));
            }
        }
        let existed = path.exists();
        let opened = match (&r.target_real, resume) {
            (Some(real), true) => Path::new(real),
            _ => path,
        };
        let stream = r.format == Format::Stream;
        let t =
            Target::open_path(opened, r.size, stream, resume, r.since.is_some()).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc::ELOOP) => VolumeError::invalid(format!(
                        "its target {} is now a symbolic link; a resumed job never follows one \
                     (it could point at any file); start a new copy",
                        opened.display()
                    )),
                    _ => io_err(&format!("cannot use {} as the target", r.target), e),
                }
            })?;
        if resume && r.target_id.is_some() && t.identity() != r.target_id {
            return Err(VolumeError::invalid(format!(
                "its target {} is no longer the file it was writing (another file was put \
                 there); nothing was written to it; start a new copy",
                opened.display()
            )));
        }
        Ok((t, (!existed).then(|| path.to_path_buf())))
    }

    /// Builds the job for a record from disk, with its hook installed.
    fn reload(&self, r: JobRecord) -> Result<Arc<Job>, VolumeError> {
        let vol = self.registry.volume(&r.volume)?;
        let (target, _) = self.open_target(&r, true, None)?;
        let map_path = progress::map_path(&self.dir, r.id);
        let (map, stream_len, entries) = ProgressMap::open(&map_path, r.segments())
            .map_err(|e| io_err("cannot read its progress map", e))?;
        if let Target::Stream { file, pos, .. } = &target {
            rescan_stream(file, stream_len, pos)
                .map_err(|e| io_err("cannot continue its stream", e))?;
        }
        self.build(r, vol, target, map, entries, stream_len)
    }

    fn build(
        &self,
        r: JobRecord,
        vol: Arc<Volume>,
        target: Target,
        map: ProgressMap,
        entries: Vec<progress::Entry>,
        stream_len: u64,
    ) -> Result<Arc<Job>, VolumeError> {
        let reads = r.snapshot.as_ref().or(r.internal_snapshot.as_ref());
        // A copy passes over its source once: it must not evict what the
        // volume's clients read, nor leave pages each later write drops.
        let source = match reads {
            Some(s) => vol.snapshot_view(s)?,
            None => vol.live(),
        }
        .for_one_pass();
        let consumer = match &r.internal_snapshot {
            Some(s) => Some(block_on(vol.consume_snapshot(s))?),
            None => None,
        };
        let hooked = reads.is_none();
        let kernel_copy = self.kernel_copy_files(&r, &vol);
        let job = Job::new(Parts {
            dir: self.dir.clone(),
            record: r,
            volume: vol,
            source,
            consumer,
            target,
            map,
            entries,
            committed_stream_len: stream_len,
            kernel_copy,
        });
        if hooked {
            block_on(job.install_hook());
        }
        Ok(job)
    }

    /// The origin and target files, when both are regular files the
    /// kernel copies between without moving the data (raw format;
    /// `--verify` needs the data's checksums, so it reads the data
    /// instead).
    fn kernel_copy_files(
        &self,
        r: &JobRecord,
        vol: &Volume,
    ) -> Option<(std::fs::File, std::fs::File)> {
        if r.format != Format::Raw || r.verify || !r.target.starts_with('/') {
            return None;
        }
        let origin = PathBuf::from(vol.info().ok()?.origin);
        let origin = if origin.is_absolute() {
            origin
        } else {
            self.dir
                .parent()?
                .join("volumes")
                .join(&r.volume)
                .join(origin)
        };
        let is_file = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file());
        if !is_file(&origin) || !is_file(Path::new(&r.target)) {
            return None;
        }
        let from = std::fs::File::open(&origin).ok()?;
        let to = std::fs::OpenOptions::new()
            .write(true)
            .open(&r.target)
            .ok()?;
        if !clones_or_offloads(&to) {
            log::debug!(
                "copy job {}: {} is on a file system where copy_file_range copies through \
                 the page cache; the registered read/write path is faster there",
                r.id,
                r.target
            );
            return None;
        }
        Some((from, to))
    }

    /// `copy.start`.
    /// `passed`: the descriptor sent with the request (SCM_RIGHTS), for
    /// target `-`.
    pub fn start(&self, req: CopyStart, passed: Option<OwnedFd>) -> Result<Value, VolumeError> {
        let _one = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        let vol = self.registry.volume(&req.volume)?;
        if let Some(s) = &req.snapshot {
            validate_name("snapshot", s)?;
        }
        let info = vol.info()?;
        let chunk = info.chunk_size as u64;
        // --since copies changed chunks, not whole megabytes around them.
        let asked = match req.since {
            Some(_) => req.block_size.unwrap_or(chunk),
            None => req.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
        };
        if asked == 0 || asked > stream::MAX_BLOCK as u64 {
            return Err(VolumeError::invalid(format!(
                "block size {asked} must be between 1 byte and {} (it is rounded up to the \
                 volume's chunk size, {chunk})",
                stream::MAX_BLOCK
            )));
        }
        let block_size = asked.div_ceil(chunk) * chunk;
        if req.hold_timeout_ms == Some(0) {
            return Err(VolumeError::invalid(
                "hold timeout must be more than 0; leave it out for the default (10 s)",
            ));
        }
        if req.rate == Some(0) {
            return Err(VolumeError::invalid(
                "rate must be more than 0 bytes per second; leave it out for no limit",
            ));
        }
        let id = self.lock().keys().next_back().map_or(1, |k| k + 1);
        let policy = req.policy.unwrap_or(Policy::Cow);
        let mut record = JobRecord {
            id,
            volume: req.volume.clone(),
            snapshot: req.snapshot.clone(),
            internal_snapshot: None,
            target: req.target.clone(),
            policy,
            format: req.format.unwrap_or(Format::Raw),
            block_size,
            rate: req.rate,
            verify: req.verify,
            hold_timeout_ms: req
                .hold_timeout_ms
                .unwrap_or(progress::DEFAULT_HOLD_TIMEOUT_MS),
            size: vol.size(),
            chunk_size: info.chunk_size,
            generation: info.generation,
            created_unix_ms: crate::engine::now_unix_ms(),
            state: JobState::Running,
            error: None,
            bytes_done: 0,
            moved: Default::default(),
            target_real: None,
            target_id: None,
            since: None,
            stamp: 0,
        };
        record.stamp = record.created_unix_ms;
        let snapshots = vol.list_snapshots();
        let find = |s: &str| {
            snapshots.iter().find(|x| x.name == s).ok_or_else(|| {
                VolumeError::not_found(format!("snapshot {s} of volume {} not found", req.volume))
            })
        };
        if let Some(s) = &req.snapshot {
            let snap = find(s)?;
            record.generation = snap.generation;
            record.stamp = snap.created_unix_ms;
        }
        if let Some(from) = &req.since {
            validate_name("snapshot", from)?;
            let snap = find(from)?;
            if snap.generation >= record.generation {
                return Err(VolumeError::invalid(format!(
                    "--since {from} must name a snapshot older than the image copied ({})",
                    req.snapshot.as_deref().unwrap_or("the live volume")
                )));
            }
            record.since = Some(progress::Since {
                snapshot: from.clone(),
                generation: snap.generation,
                stamp: snap.created_unix_ms,
            });
        }
        let (target, created) = self.open_target(&record, false, passed)?;
        if record.format == Format::Raw {
            self.claim_raw_target(&record, &target)?;
        }
        if record.target.starts_with('/') {
            record.target_id = target.identity();
            record.target_real = std::fs::canonicalize(&record.target)
                .ok()
                .map(|p| p.display().to_string());
        }
        let mut undo = Undo {
            jobs: self,
            vol: vol.clone(),
            id,
            snapshot: None,
            created,
            armed: true,
        };
        if policy == Policy::Cow && req.snapshot.is_none() {
            let name = format!("{INTERNAL_PREFIX}{id}");
            let made = block_on(vol.create_snapshot(&name))?;
            undo.snapshot = Some(name.clone());
            record.internal_snapshot = Some(name);
            record.generation = made.snapshot.generation;
            record.stamp = made.snapshot.created_unix_ms;
        }
        progress::save_record(&self.dir, &record)
            .map_err(|e| io_err("cannot record the job", e))?;
        let map = ProgressMap::create(&progress::map_path(&self.dir, id), record.segments())
            .map_err(|e| io_err("cannot create the job's progress map", e))?;
        let mut stream_len = 0;
        if let Target::Stream { file, pos, .. } = &target {
            let header = stream::Header {
                volume_size: record.size,
                chunk_size: record.chunk_size,
                block_size: block_size as u32,
                generation: record.generation,
                source: match &record.snapshot {
                    Some(s) => format!("{}@{s}", record.volume),
                    None => record.volume.clone(),
                },
                volume: record.volume.clone(),
                stamp: record.stamp,
                base: record.since.as_ref().map(|s| (s.generation, s.stamp)),
            }
            .encode();
            stream_len = header.len() as u64;
            block_on(async {
                use std::os::fd::AsRawFd;
                crate::runtime::write_at(file.as_raw_fd(), &header, 0, 0).await?;
                target.flush().await?; // a pipe has nothing to sync
                map.write(&[], Some(stream_len)).await?;
                map.sync().await
            })
            .map_err(|e| io_err("cannot write the stream's header", e))?;
            let mut p = pos.try_lock().expect("a new stream is not shared yet");
            p.len = stream_len;
            p.crc = crc32c::crc32c(&header);
        }
        let entries = vec![progress::Entry::Pending; record.segments() as usize];
        let job = self.build(record, vol, target, map, entries, stream_len)?;
        undo.armed = false;
        let out = job.status();
        self.lock().insert(id, Slot::Live(job.clone()));
        self.spawn(job);
        log::info!("copy job {id}: {} -> {} started", req.volume, req.target);
        let mut out = out;
        if block_size != asked {
            out["note"] = format!(
                "block size rounded up from {asked} to {block_size}, a multiple of the volume's \
                 chunk size {chunk}"
            )
            .into();
        }
        Ok(out)
    }

    /// A raw target is about to change: under `--since` it must hold the
    /// base image (else the copy would mix two images); whatever it held,
    /// it holds no known image until the job is done.
    fn claim_raw_target(&self, r: &JobRecord, target: &Target) -> Result<(), VolumeError> {
        let data_dir = self.dir.parent().unwrap_or(&self.dir);
        let cannot = |e: io::Error| io_err(&format!("cannot use {} as the target", r.target), e);
        let held = match target {
            Target::Volume(view) => chain::volume_holds(view.volume()),
            _ => chain::held(Path::new(&r.target), data_dir).map_err(cannot)?,
        };
        if let Some(s) = &r.since {
            let base = stream::Image {
                volume: r.volume.clone(),
                generation: s.generation,
                stamp: s.stamp,
            };
            chain::check_base(held.as_ref(), &base, &r.target).map_err(|e| {
                VolumeError::invalid(format!(
                    "{e}, or copy {}@{} there in full first",
                    r.volume, s.snapshot
                ))
            })?;
        }
        match target {
            Target::Volume(view) => {
                block_on(chain::volume_forget(view.volume())).map_err(VolumeError::from)
            }
            _ => chain::forget(Path::new(&r.target), data_dir).map_err(cannot),
        }
    }

    fn job(&self, id: u64) -> Result<Arc<Job>, VolumeError> {
        match self.lock().get(&id) {
            Some(Slot::Live(j)) => match j.record() {
                r if r.state.finished() => Err(ended(&r)),
                _ => Ok(j.clone()),
            },
            Some(Slot::Ended(r)) => Err(ended(r)),
            None => Err(not_found(id)),
        }
    }

    fn status_of(&self, slot: &Slot) -> Value {
        match slot {
            Slot::Live(j) => j.status(),
            Slot::Ended(r) => record_json(r),
        }
    }

    /// `copy.status`: one job, or every job not yet ended.
    pub fn status(&self, id: Option<u64>) -> Result<Value, VolumeError> {
        let map = self.lock();
        match id {
            Some(id) => map
                .get(&id)
                .map(|s| self.status_of(s))
                .ok_or_else(|| not_found(id)),
            None => Ok(Value::Array(
                map.values()
                    .map(|s| self.status_of(s))
                    .filter(|v| {
                        !matches!(v["state"].as_str(), Some("done" | "failed" | "cancelled"))
                    })
                    .collect(),
            )),
        }
    }

    /// `copy.list`: every job, ended ones too.
    pub fn list(&self) -> Value {
        Value::Array(self.lock().values().map(|s| self.status_of(s)).collect())
    }

    /// Runs `then` (a delete of volume `volume` or of its snapshot
    /// `snapshot`, or a restore's claim on the volume) unless a job that
    /// has not ended uses it (`busy`), atomically with `copy.start`: no job
    /// can start on it between the check and `then`.
    pub fn unless_used<T>(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        then: impl FnOnce() -> Result<T, VolumeError>,
    ) -> Result<T, VolumeError> {
        let _one = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        match snapshot {
            Some(name) => self.check_snapshot_unused(volume, name)?,
            None => self.check_unused(volume)?,
        }
        then()
    }

    /// [`Jobs::unless_used`] for snapshot `snapshot` of each of `volumes`
    /// (a group snapshot).
    pub fn unless_snapshot_used<T>(
        &self,
        volumes: &[String],
        snapshot: &str,
        then: impl FnOnce() -> Result<T, VolumeError>,
    ) -> Result<T, VolumeError> {
        let _one = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        for v in volumes {
            self.check_snapshot_unused(v, snapshot)?;
        }
        then()
    }

    /// Refuses (`busy`) while a running job reads or writes volume `name`.
    /// Unfinished jobs that read volume `name` (live or a snapshot) or
    /// write it (`vol:NAME`).
    fn using(&self, name: &str) -> Vec<JobRecord> {
        let target = format!("vol:{name}");
        self.lock()
            .values()
            .filter_map(|slot| match slot {
                Slot::Live(j) => Some(j.record()),
                _ => None,
            })
            .filter(|r| !r.state.finished() && (r.volume == name || r.target == target))
            .collect()
    }

    /// Cancels every job [`Jobs::using`] volume `name`, as a forced
    /// revert must.
    pub fn cancel_using(&self, name: &str) {
        for r in self.using(name) {
            if let Err(e) = self.cancel(r.id) {
                log::warn!("cannot cancel copy job {}: {}", r.id, e.message);
            }
        }
    }

    pub fn check_unused(&self, name: &str) -> Result<(), VolumeError> {
        match self.using(name).first() {
            Some(r) => Err(VolumeError::new(
                ErrorKind::Busy,
                format!(
                    "volume {name} is in use by copy job {}; wait for it or cancel it with \
                     `snapblk copy cancel {}`",
                    r.id, r.id
                ),
            )),
            None => Ok(()),
        }
    }

    /// Refuses (`busy`) while a running job reads snapshot `volume@name`.
    fn check_snapshot_unused(&self, volume: &str, name: &str) -> Result<(), VolumeError> {
        for slot in self.lock().values() {
            let Slot::Live(j) = slot else { continue };
            let r = j.record();
            if !r.state.finished() && r.volume == volume && r.snapshot.as_deref() == Some(name) {
                return Err(VolumeError::new(
                    ErrorKind::Busy,
                    format!(
                        "snapshot {volume}@{name} is being read by copy job {}; wait for it to \
                         end (`snapblk copy status {}`) or cancel it with `snapblk copy cancel {}`",
                        r.id, r.id, r.id
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn pause(&self, id: u64) -> Result<Value, VolumeError> {
        let job = self.job(id)?;
        job.set_want(Want::Pause);
        Ok(job.status())
    }

    pub fn resume(&self, id: u64) -> Result<Value, VolumeError> {
        let job = self.job(id)?;
        job.set_want(Want::Run);
        Ok(job.status())
    }

    /// `copy.cancel`: the job ends; the target keeps what was copied.
    pub fn cancel(&self, id: u64) -> Result<Value, VolumeError> {
        let job = self.job(id)?;
        job.set_want(Want::Cancel);
        let thread = self.threads.lock().unwrap().remove(&id);
        if let Some(t) = thread {
            join_job(&job, t);
        }
        Ok(record_json(&job.record()))
    }

    /// Stops every job thread, leaving unfinished jobs to resume at next
    /// start. Call after the frontends stopped taking requests.
    pub fn shutdown(&self) {
        let mut live = BTreeMap::new();
        for (id, slot) in self.lock().iter() {
            if let Slot::Live(j) = slot {
                if !j.record().state.finished() {
                    j.set_want(Want::Stop);
                }
                live.insert(*id, j.clone());
            }
        }
        *self.timer_stop.0.lock().unwrap() = true;
        self.timer_stop.1.notify_all();
        if let Some(t) = self.timer.lock().unwrap().take() {
            let _ = t.join();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        for (id, t) in threads {
            match live.get(&id) {
                Some(job) => join_job(job, t),
                None => {
                    let _ = t.join();
                }
            }
        }
    }
}

/// Seed 002's timer: fails every job a write has waited for longer than
/// its hold timeout, until `stop` is set.
fn stall_timer(jobs: &Mutex<BTreeMap<u64, Slot>>, stop: &(Mutex<bool>, std::sync::Condvar)) {
    let mut stopped = stop.0.lock().unwrap();
    while !*stopped {
        stopped = stop.1.wait_timeout(stopped, STALL_TICK).unwrap().0;
        let live: Vec<Arc<Job>> = jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|s| match s {
                Slot::Live(j) => Some(j.clone()),
                Slot::Ended(_) => None,
            })
            .collect();
        live.iter().for_each(|j| j.check_stall());
    }
}

/// The one of `devices` (the source volume's own block devices) that
/// `target` is, by device number, whatever its path (a symlink, another
/// node for the same device).
fn own_device(target: &Path, devices: &[PathBuf]) -> Option<PathBuf> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let rdev = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .filter(|m| m.file_type().is_block_device())
            .map(|m| m.rdev())
    };
    let t = rdev(target)?;
    devices.iter().find(|d| rdev(d) == Some(t)).cloned()
}

fn not_found(id: u64) -> VolumeError {
    VolumeError::not_found(format!(
        "copy job {id} not found; list jobs with `snapblk copy list`"
    ))
}

fn ended(r: &JobRecord) -> VolumeError {
    VolumeError::new(
        ErrorKind::InvalidArgument,
        format!(
            "copy job {} has already ended ({}); start a new one with `snapblk copy start`",
            r.id,
            serde_json::to_value(r.state)
                .unwrap()
                .as_str()
                .unwrap_or("?")
        ),
    )
}

/// Rebuilds a stream's position after a restart: cuts what was written
/// after the last commit and re-reads the rest for its checksum.
fn rescan_stream(
    file: &std::fs::File,
    len: u64,
    pos: &futures::lock::Mutex<target::StreamPos>,
) -> io::Result<()> {
    file.set_len(len)?;
    let mut r =
        stream::StreamReader::open(io::BufReader::new(stream::ReadFrom(file.try_clone()?, 0)))
            .map_err(io::Error::other)?;
    let mut data = Vec::new();
    while r.position() < len {
        r.next(&mut data).map_err(io::Error::other)?;
    }
    let mut p = pos.try_lock().expect("a resumed stream is not shared yet");
    p.len = len;
    p.crc = r.crc();
    p.blocks = r.blocks();
    Ok(())
}

/// Undoes a `copy.start` that failed half-way.
struct Undo<'a> {
    jobs: &'a Jobs,
    vol: Arc<Volume>,
    id: u64,
    snapshot: Option<String>,
    created: Option<PathBuf>,
    armed: bool,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(s) = &self.snapshot {
            let _ = block_on(self.vol.delete_snapshot(s));
        }
        let _ = std::fs::remove_file(progress::map_path(&self.jobs.dir, self.id));
        let _ = std::fs::remove_file(progress::record_path(&self.jobs.dir, self.id));
        if let Some(p) = &self.created {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::own_device;
    use std::path::Path;

    fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: mknod on a valid NUL-terminated path.
        unsafe { libc::mknod(c.as_ptr(), kind | 0o600, libc::makedev(major, minor)) == 0 }
    }

    /// Real device nodes (this host has no ublk): a node or a symlink for
    /// one of the volume's devices is found by device number, whatever its
    /// name; another device, a character device with the same numbers, or
    /// a regular file is not.
    #[test]
    fn own_devices_are_found_by_device_number() {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        if !mknod(&p("ublkb3"), libc::S_IFBLK, 259, 3) {
            // scripts/test (SNAPBLK_TESTS_STRICT=1) runs as root: no skip there.
            assert!(
                std::env::var_os("SNAPBLK_TESTS_STRICT").is_none_or(|v| v != "1"),
                "mknod failed, and SNAPBLK_TESTS_STRICT=1 allows no skip (needs root)"
            );
            eprintln!("SKIP own_devices_are_found_by_device_number: mknod needs root");
            return;
        }
        assert!(mknod(&p("alias"), libc::S_IFBLK, 259, 3));
        assert!(mknod(&p("other"), libc::S_IFBLK, 259, 4));
        assert!(mknod(&p("char"), libc::S_IFCHR, 259, 3));
        std::os::unix::fs::symlink(p("ublkb3"), p("by-id")).unwrap();
        std::fs::write(p("file"), b"x").unwrap();
        let devices = [p("ublkb9-gone"), p("ublkb3")];
        assert_eq!(own_device(&p("alias"), &devices), Some(p("ublkb3")));
        assert_eq!(own_device(&p("by-id"), &devices), Some(p("ublkb3")));
        for not in ["other", "char", "file", "missing"] {
            assert_eq!(own_device(&p(not), &devices), None, "{not}");
        }
    }
}

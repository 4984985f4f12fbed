//! The daemon: startup, NBD listeners, signals, orderly shutdown.
//!
//! Startup order: block SIGTERM/SIGINT in every thread (the mask is set
//! before any thread exists, so all threads inherit it), move into a mount
//! namespace of our own (also before any thread exists; see
//! [`private_mount_namespace`]), take the data directory's lock (one daemon
//! per directory), open the registry (every volume; broken ones are logged
//! and kept as errors), start replication (links go into their volumes'
//! write paths before anything can write; replicas finish interrupted CP
//! applies), start the ublk devices listed in `devices.json`
//! (failures are logged, never fatal), start the schedules (a run missed
//! while the daemon was down is taken now) and the space guard after them,
//! start the NBD listeners, and bind the
//! control socket *last*: once the socket exists, everything is being
//! served. The main thread then waits in `sigwait`. Before all that, the NBD
//! access settings are checked ([`check_nbd_exposure`]): a wrong TLS file or
//! a network address without TLS stops the start with nothing touched.
//!
//! NBD is served on `DATA_DIR/nbd.sock` (unless `--nbd-socket` names other
//! sockets), whose peers are checked like the control socket's; TCP only on
//! the addresses `--nbd-listen` names.
//!
//! Shutdown (SIGTERM or SIGINT): stop accepting control clients, shut the NBD
//! server down (it drains in-flight requests), stop the space guard and the schedules (a run in
//! progress finishes), stop copy jobs and replication's threads
//! (links resume at next start), stop every ublk device, flush
//! and close every volume, remove the sockets, exit 0. No async runtime crate: one thread per control
//! client and the engine's per-thread io_uring runtime.

use super::metrics::{MetricsAddr, MetricsServer};
use super::server::{ControlServer, DaemonFacts};
use super::ublk::UblkDriver;
use crate::engine::{EngineError, View};
use crate::frontend::nbd::{ExportResolver, Limits, NbdServer, NbdTls, TlsFiles, TlsMode};
use crate::replication::{Replication, ReplicationConfig};
use crate::security::LocalPeers;
use crate::volumes::Registry;
use std::io;
use std::net::ToSocketAddrs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    /// Default: `data_dir/control.sock`.
    pub control: Option<PathBuf>,
    /// `--control-listen`: the control protocol over mutual TLS on TCP
    /// (`nbd_access.tls_files` are its certificate, key and CA).
    pub control_listen: Option<String>,
    /// Default: `data_dir/nbd.sock`.
    pub nbd_unix: Vec<PathBuf>,
    /// TCP listeners; none by default.
    pub nbd_tcp: Vec<String>,
    pub nbd_access: NbdAccess,
    pub nbd_limits: Limits,
    pub replication: ReplicationConfig,
    /// `--metrics-listen`: none by default.
    pub metrics: Option<MetricsConfig>,
    /// `--space-guard`: percent of a volume's filesystem used past which
    /// scheduled snapshots are pruned; 0: off.
    pub space_guard_percent: u8,
}

/// Where and for whom the metrics endpoint answers.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    pub listen: MetricsAddr,
    /// Needed for a TCP address.
    pub token_file: Option<PathBuf>,
}

/// NBD TLS and the override for plain text on network addresses.
#[derive(Clone, Debug, Default)]
pub struct NbdAccess {
    /// `None`: `require` when a certificate is given, else `off`.
    pub tls: Option<TlsMode>,
    pub tls_files: TlsFiles,
    /// Serve plain text on non-loopback addresses anyway.
    pub insecure: bool,
}

impl NbdAccess {
    pub fn tls_mode(&self) -> TlsMode {
        self.tls.unwrap_or(if self.tls_files.cert.is_some() {
            TlsMode::Require
        } else {
            TlsMode::Off
        })
    }
}

impl DaemonConfig {
    /// Applies the defaults: NBD on the UNIX socket `data_dir/nbd.sock`
    /// unless other sockets are named.
    pub fn with_defaults(mut self) -> Self {
        if self.nbd_unix.is_empty() {
            self.nbd_unix.push(self.data_dir.join("nbd.sock"));
        }
        self
    }

    pub fn control_path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| self.data_dir.join("control.sock"))
    }
}

/// Serves the registry's volumes to NBD clients; an unpromoted replica
/// `VOL` serves its newest CP snapshot, read-only.
struct Resolver(Arc<Registry>, Arc<Replication>);

impl ExportResolver for Resolver {
    fn resolve(&self, export_name: &str) -> Result<View, EngineError> {
        let registry = &self.0;
        self.1
            .open_export(export_name, |newest| match newest {
                Ok(snap) => registry.resolve_export(&format!("{export_name}@{snap}")),
                Err(why) => Err(EngineError::NotFound(why)),
            })
            .unwrap_or_else(|| registry.resolve_export(export_name))
    }
    fn list(&self) -> Vec<String> {
        self.0.export_names()
    }
    fn default_export(&self) -> Option<String> {
        self.0.default_export_name()
    }
    /// The volume's access list decides: `read` reads (a snapshot, or the
    /// live volume read-only), `write` or more writes.
    fn permits(&self, export_name: &str, caller: &crate::security::Caller) -> Result<bool, String> {
        let volume = export_name.split('@').next().unwrap_or_default();
        let access = self.0.access_of(volume).map_err(|e| e.message)?;
        match crate::volumes::access::level_of(&access, caller) {
            Some(level) => Ok(level >= crate::engine::Level::Write),
            None => Err(format!(
                "permission denied: {} has no access to volume {volume}; ask its owner ({}) \
                 or root to run `snapblk volume access {volume} --grant user:{}=read` (or =write)",
                caller.describe(),
                crate::security::user_name(access.owner),
                crate::security::user_name(caller.uid)
            )),
        }
    }
}

/// A started daemon; [`Daemon::wait_for_signal`] then [`Daemon::shutdown`].
pub struct Daemon {
    pub registry: Arc<Registry>,
    pub replication: Arc<Replication>,
    pub facts_nbd_tcp: Vec<String>,
    pub facts_nbd_unix: Vec<PathBuf>,
    pub facts_nbd_tls: TlsMode,
    pub control_path: PathBuf,
    nbd: Arc<NbdServer>,
    control: Option<ControlServer>,
    metrics: Option<MetricsServer>,
    jobs: Arc<crate::copy::Jobs>,
    schedules: Arc<crate::schedule::Schedules>,
    space_guard: Arc<crate::schedule::SpaceGuard>,
    _lock: std::fs::File,
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and every thread
/// it creates afterwards; call first thing, before any thread exists.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for a signal in `set` (blocked beforehand) and returns it. SIGHUP is
/// logged and ignored (nothing to reload yet).
pub fn wait_for_termination(set: &libc::sigset_t) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialized; `sig` is valid for writes.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc != 0 {
            continue;
        }
        if sig == libc::SIGHUP {
            log::info!("SIGHUP: nothing to reload");
            continue;
        }
        return sig;
    }
}

/// Moves the process into a mount namespace of its own, with `/` made
/// recursively private so that no mount event propagates in or out.
/// libublk's upstream caveat: a ublk server that shares its mount namespace
/// can deadlock on exit (a mount of its own device pins it). `unshare`
/// (with its implied `CLONE_FS`) fails once threads exist, so call it before
/// any. Without the privilege (not root) it logs a warning and goes on.
pub fn private_mount_namespace() {
    // SAFETY: plain syscalls with constant arguments and a static C string.
    let result = unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            Err(("unshare(CLONE_NEWNS)", io::Error::last_os_error()))
        } else if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            Err(("making / private in it", io::Error::last_os_error()))
        } else {
            Ok(())
        }
    };
    match result {
        Ok(()) => {
            log::info!("running in a private mount namespace");
            detach_ublk_mounts();
        }
        Err((what, e)) => log::warn!(
            "cannot run in a private mount namespace ({what}: {e}); ublk devices may hang \
             the daemon's exit while one is mounted; run the daemon as root"
        ),
    }
}

/// The private namespace starts as a copy of the one the daemon was started
/// in, so a filesystem mounted from one of our devices before a restart
/// (kill -9, then re-attach) would be mounted in here too, pinning the
/// device: stopping it would then wait on ourselves. Detach those copies;
/// the mounts people see are in their own namespace and stay.
fn detach_ublk_mounts() {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    for line in mounts.lines() {
        let mut fields = line.split(' ');
        let (Some(source), Some(target)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !source.starts_with("/dev/ublkb") {
            continue;
        }
        let target = crate::quiesce::freeze::unescape_mount_field(target);
        let Ok(c_target) = std::ffi::CString::new(target.clone()) else {
            continue;
        };
        // SAFETY: umount2 with a valid C string; affects only this namespace.
        if unsafe { libc::umount2(c_target.as_ptr(), libc::MNT_DETACH) } == 0 {
            log::info!("detached this namespace's copy of {source} on {target}");
        }
    }
}

/// Thaws the filesystems a previous daemon left frozen (see
/// [`crate::quiesce::freeze`]); after the devices are back, so the thaw's
/// superblock write is served. A thaw that hangs (a device that does not
/// come back) holds up the start no longer than a quiesce's timer.
fn thaw_leftovers(data_dir: &Path) {
    let dir = data_dir.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("thaw".into())
        .spawn(move || {
            let _ = tx.send(crate::quiesce::freeze::thaw_leftovers(&dir));
        });
    let wait = std::time::Duration::from_millis(crate::quiesce::DEFAULT_TIMEOUT_MS);
    match spawned.map(|_| rx.recv_timeout(wait)) {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => log::error!("{e}"),
        Ok(Err(_)) => log::error!(
            "thawing the filesystems a previous daemon left frozen takes more than {} ms; it \
             goes on in the background",
            wait.as_millis()
        ),
        Err(e) => log::error!("cannot start the thaw of left-frozen filesystems: {e}"),
    }
}

fn lock_data_dir(dir: &Path) -> io::Result<std::fs::File> {
    let path = dir.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another snapblk daemon is already using {} (it holds {}); stop it first",
                    dir.display(),
                    path.display()
                ),
            ));
        }
        return Err(e);
    }
    Ok(f)
}

/// Refuses NBD on a network (non-loopback) address unless every client
/// there must use TLS, or the operator said `--nbd-insecure`; the override
/// is logged loudly at every start.
pub fn check_nbd_exposure(tcp: &[String], tls: TlsMode, insecure: bool) -> anyhow::Result<()> {
    let mut exposed = Vec::new();
    for addr in tcp {
        let resolved: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot use --nbd-listen {addr}: {e}; give HOST:PORT, e.g. 127.0.0.1:10809"
                )
            })?
            .collect();
        if resolved.is_empty() || resolved.iter().any(|a| !a.ip().is_loopback()) {
            exposed.push(addr.as_str());
        }
    }
    if exposed.is_empty() || tls == TlsMode::Require {
        if insecure {
            log::warn!("--nbd-insecure is given but changes nothing: no NBD address is served in plain text beyond loopback");
        }
        return Ok(());
    }
    let list = exposed.join(", ");
    if insecure {
        log::warn!(
            "INSECURE: NBD on {list} is served without required TLS (--nbd-insecure): anyone who can \
             reach it can read and write every volume"
        );
        return Ok(());
    }
    let why = match tls {
        TlsMode::On => "--tls=on lets clients stay in plain text; use --tls=require",
        _ => {
            "give --tls-cert FILE --tls-key FILE (and --tls-ca FILE to require client certificates)"
        }
    };
    anyhow::bail!(
        "refusing to serve NBD on {list} without TLS: it is not a loopback address, so anyone who \
         can reach it could read and write every volume; {why}, or --nbd-insecure to serve it in \
         plain text anyway"
    )
}

/// Creates the data directory 0750 (parents too), or takes the group's
/// write and others' access away from an existing one: it holds every
/// volume's data.
fn make_data_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode & 0o027 != 0 {
        let tight = mode & !0o027;
        log::warn!(
            "data directory {} was mode {mode:o}; setting {tight:o} (no group write, no access \
             for others)",
            dir.display()
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(tight))?;
    }
    Ok(())
}

fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Daemon {
    /// Starts everything; on return the control socket is accepting.
    /// `before_control` runs after the volumes are open and the NBD listeners
    /// are up, before the control socket is bound (`snapblk serve` creates
    /// its volume there).
    pub fn start(
        config: &DaemonConfig,
        before_control: impl FnOnce(&Registry) -> anyhow::Result<()>,
    ) -> anyhow::Result<Daemon> {
        use anyhow::Context;
        let config = config.clone().with_defaults();
        let tls = NbdTls::load(config.nbd_access.tls_mode(), &config.nbd_access.tls_files)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        check_nbd_exposure(&config.nbd_tcp, tls.mode(), config.nbd_access.insecure)?;
        let control_tls = match &config.control_listen {
            Some(_) => Some(super::remote::load_tls(&config.nbd_access.tls_files)?),
            None => None,
        };
        make_data_dir(&config.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the data directory {}: {}; give one this user may create with \
                 --data-dir DIR (or $SNAPBLK_DATA_DIR)",
                config.data_dir.display(),
                crate::cli::strip_os_error(&e.to_string())
            )
        })?;
        let data_dir = config.data_dir.canonicalize().with_context(|| {
            format!(
                "cannot open the data directory {}",
                config.data_dir.display()
            )
        })?;
        let lock = lock_data_dir(&data_dir)?;
        log::info!(
            "snapblk {} starting; data directory {}",
            env!("CARGO_PKG_VERSION"),
            data_dir.display()
        );
        #[cfg(feature = "ceph")]
        log::info!("Ceph support: {}", crate::backend::rbd::library_versions());
        let registry = Arc::new(
            Registry::open(&data_dir, Box::new(UblkDriver)).with_context(|| {
                format!(
                    "cannot read the registry in {}",
                    data_dir.join("volumes").display()
                )
            })?,
        );
        registry
            .start_quota_refresher()
            .context("cannot start the quota refresher")?;
        // Copy jobs resume (their write hooks in place) before any device
        // or export serves a write.
        let jobs = crate::copy::Jobs::open(&data_dir, registry.clone()).with_context(|| {
            format!(
                "cannot read the copy jobs in {}",
                data_dir.join("jobs").display()
            )
        })?;
        // Before any device or export can write: links must see every write.
        let replication = Replication::start(registry.clone(), &config.replication)?;
        let failed = registry.restore_devices();
        if failed > 0 {
            log::error!(
                "{failed} device(s) listed in {} could not be started; see above (the daemon goes on)",
                data_dir.join(crate::volumes::devices::DEVICES_FILE).display()
            );
        }
        thaw_leftovers(&data_dir);
        before_control(&registry)?;
        // After the devices: a run missed while the daemon was down is
        // taken now, and may be read from them at once.
        let schedules = crate::schedule::Schedules::start(
            &data_dir,
            registry.clone(),
            jobs.clone(),
            replication.clone(),
        )
        .with_context(|| {
            format!(
                "cannot read the schedules in {}",
                data_dir.join(crate::schedule::SCHEDULES_FILE).display()
            )
        })?;
        let space_guard = crate::schedule::SpaceGuard::start(
            config.space_guard_percent,
            registry.clone(),
            schedules.clone(),
        )
        .context("cannot start the space guard")?;

        let facts_tls = (tls.mode(), tls.client_certs());
        let nbd = Arc::new(NbdServer::with_access(
            Arc::new(Resolver(registry.clone(), replication.clone())),
            tls,
            Some(LocalPeers::of_data_dir(&data_dir)?),
            config.nbd_limits,
        ));
        let mut nbd_tcp = Vec::new();
        for addr in &config.nbd_tcp {
            let bound = nbd.listen_tcp(addr).map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen for NBD on {addr}: {e}; is another NBD server using it? pick another address with --nbd-listen HOST:PORT"
                )
            })?;
            log::info!("NBD listening on {bound}");
            nbd_tcp.push(bound.to_string());
        }
        for path in &config.nbd_unix {
            remove_stale_socket(path);
            nbd.listen_unix(path)
                .map_err(|e| anyhow::anyhow!("cannot listen for NBD on {}: {e}", path.display()))?;
            log::info!("NBD listening on {}", path.display());
        }

        let metrics = match &config.metrics {
            None => None,
            Some(m) => {
                let (registry, jobs, replication) =
                    (registry.clone(), jobs.clone(), replication.clone());
                Some(MetricsServer::start(
                    &m.listen,
                    m.token_file.as_deref(),
                    LocalPeers::of_data_dir(&data_dir)?,
                    move || super::metrics::gather(&registry, &jobs, &replication),
                )?)
            }
        };

        let control_path = config.control_path();
        let remote = match (&config.control_listen, control_tls) {
            (Some(addr), Some(tls)) => Some((super::remote::RemoteControl::bind(addr)?, tls)),
            _ => None,
        };
        let control_tcp = match &remote {
            Some((l, _)) => Some(l.local_addr()?.to_string()),
            None => None,
        };
        let facts = DaemonFacts {
            data_dir: data_dir.clone(),
            control_socket: control_path.clone(),
            control_tcp,
            nbd_unix: config.nbd_unix.clone(),
            nbd_tcp: nbd_tcp.clone(),
            nbd_tls: facts_tls.0.as_str(),
            nbd_tls_client_certs: facts_tls.1,
            started: Instant::now(),
            jobs: jobs.clone(),
            replication: replication.clone(),
            schedules: schedules.clone(),
            nbd: nbd.clone(),
            space_guard: space_guard.clone(),
        };
        let control = ControlServer::start(&control_path, registry.clone(), facts, remote)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the control socket {}: {e}",
                    control_path.display()
                )
            })?;
        Ok(Daemon {
            registry,
            replication,
            facts_nbd_tcp: nbd_tcp,
            facts_nbd_unix: config.nbd_unix.clone(),
            facts_nbd_tls: facts_tls.0,
            control_path,
            nbd,
            control: Some(control),
            metrics,
            jobs,
            schedules,
            space_guard,
            _lock: lock,
        })
    }

    /// Orderly shutdown; returns the number of volumes that failed to flush.
    pub fn shutdown(mut self) -> usize {
        if let Some(mut c) = self.control.take() {
            c.stop();
        }
        if let Some(mut m) = self.metrics.take() {
            m.stop();
        }
        log::info!("stopping the NBD server (draining in-flight requests)");
        self.nbd.shutdown();
        self.space_guard.shutdown();
        self.schedules.shutdown();
        log::info!("stopping copy jobs (they resume at next start)");
        self.jobs.shutdown();
        self.replication.shutdown();
        let failed = self.registry.shutdown();
        for p in &self.facts_nbd_unix {
            remove_stale_socket(p);
        }
        failed
    }
}

/// `snapblk daemon`: runs until SIGTERM/SIGINT. `before_control` and
/// `after_start` are hooks for `snapblk serve`.
pub fn run(
    config: &DaemonConfig,
    before_control: impl FnOnce(&Registry) -> anyhow::Result<()>,
    after_start: impl FnOnce(&Daemon),
) -> anyhow::Result<()> {
    let set = block_signals();
    // Whatever umask the daemon inherited (a service manager's 000, say),
    // nothing it creates is writable by its group or visible to others;
    // files that hold data get explicit modes on top (volume files 0640,
    // copy targets 0600).
    // SAFETY: umask only sets this process's file creation mask.
    unsafe { libc::umask(0o027) };
    private_mount_namespace();
    let daemon = Daemon::start(config, before_control)?;
    after_start(&daemon);
    let sig = wait_for_termination(&set);
    log::info!(
        "received {}; shutting down",
        if sig == libc::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        }
    );
    let failed = daemon.shutdown();
    if failed > 0 {
        anyhow::bail!("{failed} volume(s) did not close cleanly at shutdown; see the log above");
    }
    log::info!("stopped cleanly");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn network_addresses_need_required_tls_or_the_override() {
        let lo = addrs(&["127.0.0.1:0", "[::1]:0", "localhost:0"]);
        for tls in [TlsMode::Off, TlsMode::On, TlsMode::Require] {
            check_nbd_exposure(&lo, tls, false).unwrap();
        }
        let net = addrs(&["127.0.0.1:0", "0.0.0.0:10809"]);
        let e = check_nbd_exposure(&net, TlsMode::Off, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("refusing to serve NBD on 0.0.0.0:10809 without TLS")
                && e.contains("--tls-cert FILE --tls-key FILE")
                && e.contains("--nbd-insecure"),
            "{e}"
        );
        let e = check_nbd_exposure(&net, TlsMode::On, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("use --tls=require"), "{e}");
        check_nbd_exposure(&net, TlsMode::Require, false).unwrap();
        check_nbd_exposure(&net, TlsMode::Off, true).unwrap();
        let e = check_nbd_exposure(&addrs(&["no-port"]), TlsMode::Off, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("give HOST:PORT"), "{e}");
    }
}

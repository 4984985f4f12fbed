//! The `snapblk` command line: argument parsing, talking to the daemon, and
//! printing results for people (tables, `key: value`) or programs (`--json`).
//!
//! Every failure prints one line, `snapblk: error: <what went wrong>; <what
//! to do>`, to stderr and exits 1 (argument syntax errors from clap exit 2).
//! Sizes and names are checked here first, so obvious mistakes need no daemon.

pub mod client;
pub mod copy;
pub mod group;
pub mod output;
pub mod paths;
pub mod remote;
pub mod replicate;
pub mod schedule;
pub mod size;
pub mod top;

use crate::backend::CephSpec;
use crate::control::daemon::{self, DaemonConfig, MetricsConfig, NbdAccess};
use crate::control::metrics::MetricsAddr;
use crate::control::protocol::Request;
use crate::engine::CacheMode;
use crate::engine::WriteBackConfig;
use crate::frontend::nbd::{Limits, TlsFiles, TlsMode};
use crate::quiesce::{OnTimeout, Quiesce};
use crate::replication::ReplicationConfig;
use crate::volumes::validate_name;
use clap::{Args, Parser, Subcommand, ValueEnum};
use client::{CliError, Endpoint};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "snapblk",
    version,
    about = "Userspace block devices with instant snapshots, served over NBD and ublk",
    after_help = "Quick start: `snapblk serve`, then the `qemu-img info` line it prints."
)]
pub struct Cli {
    /// Control socket [default: $SNAPBLK_CONTROL, else DATA_DIR/control.sock]
    #[arg(long, global = true, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Print the daemon's JSON result instead of a table
    #[arg(long, global = true)]
    pub json: bool,
    /// Send the command to the daemon whose --control-listen is HOST:PORT,
    /// over TLS [default: $SNAPBLK_REMOTE, else the local control socket]
    #[arg(long, value_name = "HOST:PORT")]
    pub remote: Option<String>,
    /// For --remote and `status --all`: this CLI's certificate (PEM)
    /// [default: $SNAPBLK_TLS_CERT]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// For --remote and `status --all`: its private key (PEM, mode 0600 or
    /// tighter) [default: $SNAPBLK_TLS_KEY]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// For --remote and `status --all`: the CA that signed the daemons'
    /// certificates (PEM) [default: $SNAPBLK_TLS_CA]
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon in the foreground
    Daemon(DaemonArgs),
    /// Quick start: run the daemon, create volume disk0 if missing, print how to connect
    Serve(ServeArgs),
    /// Create, list, inspect and delete volumes
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Create, list and delete snapshots
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Show the running daemon's status (with --all: one line per daemon)
    Status(StatusArgs),
    /// Start, stop and list ublk block devices (/dev/ublkbN)
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Show what the running kernel's ublk driver offers
    Features,
    /// Live point-in-time copies of volumes: start, status, pause, resume, cancel, list
    #[command(subcommand)]
    Copy(copy::CopyCmd),
    /// Write a backup stream (from `copy start --format stream`) to a file or device
    Restore(copy::RestoreArgs),
    /// Replicate volumes to another daemon: start, stop, status, cp, promote
    #[command(subcommand)]
    Replicate(replicate::ReplicateCmd),
    /// Consistency groups: volumes snapshotted at one instant (create, list, info, delete)
    #[command(subcommand)]
    Group(group::GroupCmd),
    /// Snapshots on a schedule with retention: add, list, remove, pause, resume
    #[command(subcommand)]
    Schedule(schedule::ScheduleCmd),
    /// A live per-volume view: IOPS, bandwidth, latency, copy-on-write rate, replication lag
    Top(top::TopArgs),
    /// Space quotas per user: show limit, use and volumes (`quota [USER]`), or `quota set USER SIZE|none`
    Quota(QuotaArgs),
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QuotaArgs {
    #[command(subcommand)]
    pub set: Option<QuotaCmd>,
    /// Show this user only [default: every user (root) or yourself]
    pub user: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum QuotaCmd {
    /// Set USER's quota: the most their volumes' data and change logs may hold (root only)
    Set {
        /// A user name on the daemon's machine
        user: String,
        /// Bytes or K/M/G/T (powers of 1024), or `none`
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One line for this CLI's daemon (local, or --remote) and one for each
    /// HOST:PORT (a daemon's --control-listen) after it
    #[arg(long, value_name = "HOST:PORT", num_args = 0..)]
    pub all: Option<Vec<String>>,
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Where volumes and sockets live [default: $SNAPBLK_DATA_DIR, /var/lib/snapblk for root, else ~/.local/share/snapblk]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve NBD on this UNIX socket (repeatable) [default: DATA_DIR/nbd.sock]
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Vec<PathBuf>,
    #[command(flatten)]
    pub nbd: NbdArgs,
    /// Close an NBD connection that has not finished negotiating after SECS seconds
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub nbd_handshake_limit: u64,
    /// Close an NBD connection on which nothing moved for SECS seconds while
    /// no request was being served (0: never; a client that stops reading
    /// its replies counts as idle)
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub nbd_idle_timeout: u64,
    /// NBD connections one client may hold at once (a client: a TCP peer
    /// address, or a uid on a UNIX socket)
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub nbd_client_connections: usize,
    /// Also serve the control protocol on this TCP address, over TLS with
    /// client certificates only (needs --tls-cert, --tls-key and --tls-ca;
    /// for `snapblk --remote`)
    #[arg(long, value_name = "HOST:PORT")]
    pub control_listen: Option<String>,
    /// Accept replication sources on this TCP address
    #[arg(long, value_name = "HOST:PORT")]
    pub replication_listen: Option<String>,
    /// The key replication sources must prove [default: DATA_DIR/replication.key]
    #[arg(long, value_name = "PATH")]
    pub replication_key_file: Option<PathBuf>,
    /// Bytes of writes each volume may acknowledge before the copy-on-write
    /// they depend on is committed (0: every such write waits for its commit)
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub writeback_buffer: String,
    /// Serve Prometheus metrics (GET /metrics) on HOST:PORT (needs
    /// --metrics-token-file) or on a UNIX socket PATH
    #[arg(long, value_name = "HOST:PORT|PATH")]
    pub metrics_listen: Option<String>,
    /// The bearer token metrics scrapers must send (first line of FILE,
    /// mode 0600 or tighter)
    #[arg(long, value_name = "FILE", requires = "metrics_listen")]
    pub metrics_token_file: Option<PathBuf>,
    /// When the filesystem of a local volume's data passes PERCENT used,
    /// delete the oldest snapshots schedules took (never manual ones) until
    /// it is below again; 0 or `off` disables
    #[arg(long, value_name = "PERCENT", default_value_t = crate::schedule::guard::DEFAULT_PERCENT, value_parser = space_guard_arg)]
    pub space_guard: u8,
}

/// `--space-guard`: 1 to 99, or 0/`off`.
fn space_guard_arg(text: &str) -> Result<u8, String> {
    if text == "off" {
        return Ok(0);
    }
    let pct = text.trim_end_matches('%');
    match pct.parse::<u8>() {
        Ok(p) if p < 100 => Ok(p),
        _ => Err(format!(
            "{text:?} is not a threshold; give a percent of the filesystem used, 1 to 99 \
             (e.g. 90), or `off`"
        )),
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Data directory [default: as for `snapblk daemon`]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Size of disk0 when it is created (sparse)
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "10G",
        allow_hyphen_values = true
    )]
    pub size: String,
    #[command(flatten)]
    pub nbd: NbdArgs,
    /// As for `snapblk daemon`
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub writeback_buffer: String,
}

/// Who may reach NBD beyond the UNIX socket: TCP listeners and TLS
/// (`snapblk daemon` and `snapblk serve` alike).
#[derive(Args, Debug)]
pub struct NbdArgs {
    /// Also serve NBD on this TCP address (repeatable; none by default). An
    /// address other than loopback needs TLS (--tls-cert/--tls-key) or --nbd-insecure
    #[arg(long, value_name = "HOST:PORT")]
    pub nbd_listen: Vec<String>,
    /// NBD TLS: off, on (offered, plain text allowed) or require (STARTTLS
    /// before anything else) [default: require with --tls-cert, else off]
    #[arg(long, value_enum, value_name = "MODE")]
    pub tls: Option<TlsArg>,
    /// NBD TLS: the server's certificate (PEM, then any intermediates)
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// NBD TLS: the certificate's private key (PEM, mode 0600 or tighter)
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// NBD TLS: clients must present a certificate signed by this CA (PEM)
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Serve NBD in plain text on non-loopback --nbd-listen addresses anyway:
    /// anyone who can reach them can read and write every volume
    #[arg(long)]
    pub nbd_insecure: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TlsArg {
    Off,
    On,
    Require,
}

impl NbdArgs {
    fn access(&self) -> NbdAccess {
        NbdAccess {
            tls: self.tls.map(|t| match t {
                TlsArg::Off => TlsMode::Off,
                TlsArg::On => TlsMode::On,
                TlsArg::Require => TlsMode::Require,
            }),
            tls_files: TlsFiles {
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                ca: self.tls_ca.clone(),
            },
            insecure: self.nbd_insecure,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CacheArg {
    /// Through the page cache
    Writeback,
    /// O_DIRECT: the page cache is bypassed (FLUSH still syncs the disk)
    None,
    /// O_DIRECT writes, reads through the page cache
    Writearound,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume (a sparse container file unless --backing is given)
    Create {
        /// The new volume's name (1-64 of A-Z a-z 0-9 . _ -)
        name: String,
        /// Capacity: bytes or K/M/G/T (powers of 1024), e.g. 10G
        #[arg(long, allow_hyphen_values = true)]
        size: String,
        /// Copy-on-write chunk size, a power of two from 4K to 1M [default: 64K]
        #[arg(long, allow_hyphen_values = true)]
        chunk_size: Option<String>,
        /// Number of partitions (parallel metadata journals) [default: 4]
        #[arg(long)]
        partitions: Option<u32>,
        /// Use this existing file or block device as the volume's data
        #[arg(long, value_name = "PATH")]
        backing: Option<PathBuf>,
        /// How the volume's data is opened [default: writearound, or writeback where the file system refuses O_DIRECT]
        #[arg(long, value_enum)]
        cache: Option<CacheArg>,
        /// Create the volume as a new RBD image POOL/IMAGE (IMAGE defaults to NAME) in a Ceph cluster
        #[arg(long, value_name = "POOL[/IMAGE]", conflicts_with_all = ["backing", "cache"])]
        ceph: Option<String>,
        #[command(flatten)]
        cluster: CephClusterArgs,
    },
    /// Make an existing RBD image (and its data) a volume
    Import {
        /// The new volume's name
        name: String,
        /// The image, POOL/IMAGE
        #[arg(long, value_name = "POOL/IMAGE")]
        ceph: String,
        #[command(flatten)]
        cluster: CephClusterArgs,
        /// Copy-on-write chunk size, a power of two from 4K to 1M [default: 64K]
        #[arg(long, allow_hyphen_values = true)]
        chunk_size: Option<String>,
        /// Number of partitions (parallel metadata journals) [default: 4]
        #[arg(long)]
        partitions: Option<u32>,
    },
    /// Serve a Ceph volume another daemon served (failover)
    Attach {
        /// The volume's name on this daemon
        name: String,
        /// The volume's image, POOL/IMAGE
        #[arg(long, value_name = "POOL/IMAGE")]
        ceph: String,
        #[command(flatten)]
        cluster: CephClusterArgs,
        /// Take the image's lock from its holder and blocklist that client (it is dead, or must be fenced)
        #[arg(long)]
        break_lock: bool,
    },
    /// Forget a Ceph volume on this daemon and release its lock; its image, snapshots and metadata stay in the pool for `volume attach`
    Detach {
        /// The Ceph volume
        name: String,
    },
    /// Close a volume and open it again from its storage, as a daemon restart would, without stopping the other volumes: after its metadata journal failed, or to retry one listed with an error (a Ceph cluster that was down at start)
    Reopen {
        /// The volume (no device, NBD client, copy job or replication may be using it)
        name: String,
    },
    /// List volumes
    #[command(alias = "ls")]
    List,
    /// Show one volume
    Info {
        /// The volume
        name: String,
    },
    /// Delete a volume and all its snapshots (a Ceph volume's image and metadata in the pool too)
    #[command(alias = "rm")]
    Delete {
        /// The volume
        name: String,
    },
    /// Create NEW, a writable clone of snapshot VOL@SNAP: instant for any size; its unwritten chunks read from the snapshot
    Clone {
        /// The parent snapshot, VOL@SNAP
        #[arg(value_name = "VOL@SNAP")]
        source: String,
        /// The clone's name
        #[arg(value_name = "NEW")]
        name: String,
    },
    /// Show a volume's owner and access list, or change it with --grant / --revoke (admin access needed)
    Access {
        /// The volume
        name: String,
        /// Give a user or group a level: user:NAME=read|write|admin or group:NAME=LEVEL
        #[arg(long, value_name = "user:NAME=LEVEL", conflicts_with = "revoke")]
        grant: Option<String>,
        /// Take a user's or group's entry away: user:NAME or group:NAME
        #[arg(long, value_name = "user:NAME")]
        revoke: Option<String>,
    },
    /// Give a volume to another owner (root only); its space then counts against their quota
    Chown {
        /// The volume
        name: String,
        /// Its new owner, a user name on the daemon's machine
        user: String,
    },
    /// Copy every chunk a clone still reads from its parent snapshot into it, in the background, so the parent can go
    Flatten {
        /// The clone
        name: String,
        /// Show progress and return when the flatten is done
        #[arg(long)]
        wait: bool,
    },
}

/// How to reach a Ceph cluster.
#[derive(Args, Debug)]
pub struct CephClusterArgs {
    /// The cluster's ceph.conf [default: librados' search, /etc/ceph/ceph.conf]
    #[arg(long, value_name = "PATH")]
    ceph_conf: Option<PathBuf>,
    /// The cephx user, without "client." [default: admin]
    #[arg(long, value_name = "USER")]
    ceph_id: Option<String>,
}

/// The Ceph spec of `POOL[/IMAGE]` (`default_image` when no image is named).
fn ceph_arg(
    target: &str,
    default_image: Option<&str>,
    cluster: CephClusterArgs,
) -> Result<CephSpec, CliError> {
    let (pool, image) = match target.split_once('/') {
        Some((p, i)) => (p, i),
        None => (target, default_image.unwrap_or("")),
    };
    if pool.is_empty() || image.is_empty() || image.contains('/') {
        return Err(CliError::plain(format!(
            "invalid Ceph image {target:?}: give POOL/IMAGE, e.g. --ceph rbd/vol1"
        )));
    }
    let conf = match cluster.ceph_conf {
        Some(p) => Some(p.canonicalize().map_err(|e| {
            CliError::new(
                format!(
                    "cannot use {} as the Ceph configuration: {}",
                    p.display(),
                    strip_os_error(&e.to_string())
                ),
                "give the path of the cluster's ceph.conf",
            )
        })?),
        None => None,
    };
    Ok(CephSpec {
        pool: pool.to_string(),
        image: image.to_string(),
        conf,
        id: cluster.ceph_id,
    })
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot of a volume (VOL SNAP), or of every volume of a group at one instant (--group GROUP SNAP)
    Create {
        #[command(flatten)]
        of: SnapshotOf,
        #[command(flatten)]
        hooks: HookArgs,
    },
    /// List a volume's snapshots (VOL), or a group's (--group GROUP)
    #[command(alias = "ls")]
    List {
        /// The group's snapshots instead
        #[arg(
            long,
            value_name = "GROUP",
            conflicts_with = "volume",
            required_unless_present = "volume"
        )]
        group: Option<String>,
        /// The volume
        volume: Option<String>,
    },
    /// Delete a snapshot (VOL SNAP), or a group's snapshot on every volume (--group GROUP SNAP)
    #[command(alias = "rm")]
    Delete {
        #[command(flatten)]
        of: SnapshotOf,
    },
    /// List the extents that changed between snapshot FROM and TO (a later
    /// snapshot; the live volume if left out)
    Diff {
        /// The volume
        volume: String,
        /// The older snapshot
        from: String,
        /// A later snapshot [default: the live volume]
        to: Option<String>,
    },
    /// Make the live volume's content equal to snapshot SNAP's (newer snapshots stay); refused while anything writes the volume
    Revert {
        /// The volume
        volume: String,
        /// The snapshot whose content it takes
        snapshot: String,
        /// Stop every writer first: the volume's device, its copy jobs, its replication link and
        /// the NBD connections that have it open read-write (their requests in flight are answered)
        #[arg(long)]
        force: bool,
    },
}

/// Application hooks and filesystem freeze around a snapshot (see `src/quiesce`).
#[derive(Args, Debug)]
pub struct HookArgs {
    /// Freeze the filesystems mounted on the volume's ublk devices (FIFREEZE) during the snapshot
    #[arg(long)]
    quiesce: bool,
    /// Run `sh -c CMD` before the snapshot (as the data directory's owner), e.g. a database's backup mode
    #[arg(long, value_name = "CMD")]
    pre_hook: Option<String>,
    /// Run `sh -c CMD` after it; always runs once the pre-hook started
    #[arg(long, value_name = "CMD")]
    post_hook: Option<String>,
    /// How long the pre-hook, and then the freeze, may take [default: 10s]
    #[arg(long, value_name = "DUR")]
    quiesce_timeout: Option<String>,
    /// When the pre-hook or the freeze fails or times out: no snapshot, or one without quiesce [default: fail]
    #[arg(long, value_enum, value_name = "WHAT")]
    on_timeout: Option<OnTimeoutArg>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnTimeoutArg {
    Fail,
    CrashConsistent,
}

impl HookArgs {
    fn quiesce(self) -> Result<Option<Quiesce>, CliError> {
        if !self.quiesce && self.pre_hook.is_none() && self.post_hook.is_none() {
            if self.quiesce_timeout.is_some() || self.on_timeout.is_some() {
                return Err(CliError::plain(
                    "--quiesce-timeout and --on-timeout bound a quiesce: add --quiesce \
                     and/or --pre-hook CMD (and --post-hook CMD)",
                ));
            }
            return Ok(None);
        }
        let timeout_ms = self
            .quiesce_timeout
            .map(|t| replicate::parse_duration_ms(&t))
            .transpose()
            .map_err(CliError::plain)?;
        Ok(Some(Quiesce {
            freeze: self.quiesce,
            pre_hook: self.pre_hook,
            post_hook: self.post_hook,
            timeout_ms,
            on_timeout: self.on_timeout.map(|o| match o {
                OnTimeoutArg::Fail => OnTimeout::Fail,
                OnTimeoutArg::CrashConsistent => OnTimeout::CrashConsistent,
            }),
        }))
    }
}

/// `VOL SNAP`, or `--group GROUP SNAP`.
#[derive(Args, Debug)]
pub struct SnapshotOf {
    /// The snapshot is a group snapshot of this group's volumes
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// VOL SNAP, or SNAP with --group
    #[arg(value_name = "VOL SNAP", num_args = 1..=2, required = true)]
    names: Vec<String>,
}

enum Snap {
    /// (volume, snapshot)
    Volume(String, String),
    /// (group, snapshot)
    Group(String, String),
}

impl SnapshotOf {
    /// Which form was used; a wrong count of names is a usage error that
    /// says which form to use.
    fn parts(self) -> Result<Snap, CliError> {
        match (self.group, <[String; 2]>::try_from(self.names)) {
            (None, Ok([volume, snap])) => Ok(Snap::Volume(volume, snap)),
            (Some(g), Err(mut one)) if one.len() == 1 => Ok(Snap::Group(g, one.remove(0))),
            (Some(g), _) => Err(CliError::plain(format!(
                "with --group {g}, name only the snapshot: `--group {g} SNAP`"
            ))),
            (None, _) => Err(CliError::plain(
                "name the volume and the snapshot (`VOL SNAP`), or `--group GROUP SNAP`",
            )),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// Start /dev/ublkbN for a volume (read-write) or one of its snapshots (read-only); prints its path
    Start {
        /// The volume
        volume: String,
        /// Serve this snapshot of the volume, read-only
        #[arg(long, value_name = "SNAP")]
        snapshot: Option<String>,
        /// Hardware queues, one thread and io_uring each [default: 1]
        #[arg(long, value_name = "N")]
        queues: Option<u16>,
        /// Requests in flight per queue, 1 to 4096 [default: 64]
        #[arg(long, value_name = "D")]
        depth: Option<u16>,
        /// Without UBLK_F_USER_RECOVERY: if the daemon dies, the kernel fails the
        /// device's I/O and removes it (the restarted daemon starts a new one)
        /// instead of holding I/O until the daemon is back
        #[arg(long)]
        no_recovery: bool,
        /// Copy every request's data through the daemon even where the
        /// kernel offers zero copy (AUTO_BUF_REG with USER_COPY, 6.16+)
        #[arg(long)]
        no_zero_copy: bool,
    },
    /// Stop a device: VOL, VOL@SNAP or /dev/ublkbN
    #[command(alias = "rm")]
    Stop {
        /// The device, by what it serves or by its path
        #[arg(value_name = "VOL|VOL@SNAP|/dev/ublkbN")]
        device: String,
    },
    /// List devices
    #[command(alias = "ls")]
    List,
}

fn size_arg(text: &str) -> Result<u64, CliError> {
    size::parse_size(text).map_err(CliError::plain)
}

fn name_arg(kind: &str, name: &str) -> Result<(), CliError> {
    validate_name(kind, name).map_err(|e| CliError::plain(e.message))
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialize")
    );
}

/// Sends `req` to the daemon; prints the result as JSON with `--json`, else
/// for people with `human`.
fn reply(
    control: &Endpoint,
    json: bool,
    req: &Request,
    human: impl FnOnce(&Value),
) -> Result<(), CliError> {
    let r = client::request(control, req)?;
    if json {
        print_json(&r);
    } else {
        human(&r);
    }
    Ok(())
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{}", e.line());
            1
        }
    }
}

fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}

/// Drops the " (os error N)" that `io::Error` appends; people don't need it.
pub(crate) fn strip_os_error(s: &str) -> String {
    let mut out = s.to_string();
    while let Some(i) = out.find(" (os error ") {
        match out[i..].find(')') {
            Some(j) => out.replace_range(i..i + j + 1, ""),
            None => break,
        }
    }
    out
}

fn daemon_error(e: anyhow::Error) -> CliError {
    // anyhow's alternate form joins the context chain with ": ".
    let msg = strip_os_error(&format!("{e:#}"));
    if msg.contains("; ") {
        CliError::plain(msg)
    } else {
        CliError::new(msg, "see the log above")
    }
}

/// The NBD server's [`Limits`] from `snapblk daemon`'s options.
fn nbd_limits(handshake: u64, idle: u64, per_client: usize) -> Result<Limits, CliError> {
    if handshake == 0 || per_client == 0 {
        return Err(CliError::plain(
            "--nbd-handshake-limit and --nbd-client-connections must be at least 1",
        ));
    }
    Ok(Limits {
        handshake: Duration::from_secs(handshake),
        idle: (idle > 0).then(|| Duration::from_secs(idle)),
        per_client,
    })
}

/// Where commands go: `--remote` (else `$SNAPBLK_REMOTE`) with its TLS
/// files, else the local control socket.
struct Targets {
    control: Option<PathBuf>,
    remote: Option<String>,
    files: remote::ClientFiles,
}

impl Targets {
    fn of(cli: &mut Cli) -> Targets {
        Targets {
            control: cli.control.take(),
            remote: cli.remote.take().or_else(|| {
                std::env::var("SNAPBLK_REMOTE")
                    .ok()
                    .filter(|s| !s.is_empty())
            }),
            files: remote::ClientFiles {
                cert: cli.tls_cert.take(),
                key: cli.tls_key.take(),
                ca: cli.tls_ca.take(),
            },
        }
    }

    fn endpoint(self) -> Result<Endpoint, CliError> {
        Ok(match self.remote {
            Some(addr) => Endpoint::Remote(remote::Remote::new(
                addr,
                remote::client_config(self.files)?,
            )),
            None => Endpoint::Local(paths::client_control_path(self.control)),
        })
    }
}

pub fn run(mut cli: Cli) -> Result<(), CliError> {
    let json = cli.json;
    if cli.remote.is_some() && matches!(cli.command, Command::Daemon(_) | Command::Serve(_)) {
        return Err(CliError::new(
            "--remote sends a command to a daemon elsewhere; it cannot run one",
            "drop --remote (a daemon serves remote CLIs with --control-listen HOST:PORT)",
        ));
    }
    let targets = Targets::of(&mut cli);
    match cli.command {
        Command::Daemon(a) => {
            set_writeback_buffer(&a.writeback_buffer)?;
            init_logging();
            let config = DaemonConfig {
                data_dir: a.data_dir.unwrap_or_else(paths::default_data_dir),
                control: targets.control,
                control_listen: a.control_listen,
                nbd_unix: a.nbd_socket,
                nbd_access: a.nbd.access(),
                nbd_tcp: a.nbd.nbd_listen,
                nbd_limits: nbd_limits(
                    a.nbd_handshake_limit,
                    a.nbd_idle_timeout,
                    a.nbd_client_connections,
                )?,
                replication: ReplicationConfig {
                    listen: a.replication_listen,
                    key_file: a.replication_key_file,
                },
                metrics: a.metrics_listen.map(|l| MetricsConfig {
                    listen: MetricsAddr::parse(&l),
                    token_file: a.metrics_token_file,
                }),
                space_guard_percent: a.space_guard,
            };
            daemon::run(&config, |_| Ok(()), |_| {}).map_err(daemon_error)
        }
        Command::Serve(a) => serve(targets.control, a),
        Command::Status(StatusArgs { all: Some(others) }) => {
            let config = match others.is_empty() {
                true => None,
                false => Some(remote::client_config(remote::ClientFiles {
                    cert: targets.files.cert.clone(),
                    key: targets.files.key.clone(),
                    ca: targets.files.ca.clone(),
                })?),
            };
            let mut daemons = vec![targets.endpoint()?];
            for addr in others {
                let config = config.clone().expect("made for the addresses");
                daemons.push(Endpoint::Remote(remote::Remote::new(addr, config)));
            }
            status_all(&daemons, json)
        }
        command => {
            let control = targets.endpoint()?;
            request(&control, json, command)
        }
    }
}

/// The commands that are one or more requests to the daemon at `control`.
fn request(control: &Endpoint, json: bool, command: Command) -> Result<(), CliError> {
    match command {
        Command::Daemon(_) | Command::Serve(_) | Command::Status(StatusArgs { all: Some(_) }) => {
            unreachable!("`run` handles the commands that are not a request")
        }
        Command::Status(StatusArgs { all: None }) => {
            reply(control, json, &Request::DaemonStatus {}, |r| {
                let list = |k: &str| {
                    r.get(k)
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .map(|x| x.as_str().unwrap_or("?").to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "-".into())
                };
                print!(
                    "{}",
                    output::key_values(&[
                        ("version", output::str_of(r, "version")),
                        ("pid", output::str_of(r, "pid")),
                        ("data dir", output::str_of(r, "data_dir")),
                        ("control socket", output::str_of(r, "control_socket")),
                        ("control tcp", output::str_of(r, "control_tcp")),
                        ("nbd tcp", list("nbd_tcp")),
                        ("nbd unix", list("nbd_unix")),
                        ("nbd tls", nbd_tls_fact(r)),
                        ("volumes", output::str_of(r, "volumes")),
                        ("space guard", output::space_guard_of(&r["space_guard"])),
                        ("uptime", format!("{} s", output::str_of(r, "uptime_s"))),
                    ])
                );
            })
        }
        Command::Volume(cmd) => volume(control, json, cmd),
        Command::Snapshot(cmd) => snapshot(control, json, cmd),
        Command::Device(cmd) => device(control, json, cmd),
        Command::Copy(cmd) => copy::run(control, json, cmd),
        Command::Restore(a) => copy::restore(control, json, a),
        Command::Replicate(cmd) => replicate::run(control, json, cmd),
        Command::Group(cmd) => group::run(control, json, cmd),
        Command::Schedule(cmd) => schedule::run(control, json, cmd),
        Command::Top(a) => top::run(control, json, a),
        Command::Quota(a) => {
            let req = match a.set {
                Some(QuotaCmd::Set { user, size }) => Request::QuotaSet {
                    user,
                    limit: match size.as_str() {
                        "none" => None,
                        s => Some(size_arg(s)?),
                    },
                },
                None => Request::QuotaShow { user: a.user },
            };
            reply(control, json, &req, |r| print!("{}", output::quotas(r)))
        }
        Command::Features => reply(control, json, &Request::Features {}, |r| {
            print!("{}", output::features(r))
        }),
    }
}

/// How long `status --all` waits for each daemon.
const STATUS_ALL_LIMIT: Duration = Duration::from_secs(5);

/// `status --all`: asks every daemon at once; one line (or JSON object)
/// each, an error for one that does not answer; fails if any did not.
fn status_all(daemons: &[Endpoint], json: bool) -> Result<(), CliError> {
    let answers: Vec<Result<Value, CliError>> = std::thread::scope(|s| {
        let asks: Vec<_> = daemons
            .iter()
            .map(|d| {
                s.spawn(move || {
                    client::request_within(d, &Request::DaemonStatus {}, STATUS_ALL_LIMIT)
                })
            })
            .collect();
        asks.into_iter()
            .map(|a| a.join().expect("a status thread panicked"))
            .collect()
    });
    let failed = answers.iter().filter(|a| a.is_err()).count();
    if json {
        let list: Vec<Value> = daemons
            .iter()
            .zip(&answers)
            .map(|(d, a)| match a {
                Ok(st) => serde_json::json!({"address": d.to_string(), "status": st}),
                Err(e) => serde_json::json!({"address": d.to_string(), "error": e.line()}),
            })
            .collect();
        print_json(&Value::Array(list));
    } else {
        let rows: Vec<Vec<String>> = daemons
            .iter()
            .zip(&answers)
            .map(|(d, a)| {
                let mut row = vec![d.to_string()];
                match a {
                    Ok(st) => row.extend(
                        [
                            "version",
                            "uptime_s",
                            "volumes",
                            "devices",
                            "replication_links",
                            "copy_jobs",
                        ]
                        .map(|k| output::str_of(st, k)),
                    ),
                    Err(e) => row.push(e.line().replacen("snapblk: ", "", 1)),
                }
                row
            })
            .collect();
        print!(
            "{}",
            output::table(
                &["DAEMON", "VERSION", "UPTIME_S", "VOLUMES", "DEVICES", "LINKS", "JOBS"],
                &rows
            )
        );
    }
    match failed {
        0 => Ok(()),
        n => Err(CliError::new(
            format!("{n} of {} daemons did not answer", daemons.len()),
            "see their lines above",
        )),
    }
}

fn device(control: &Endpoint, json: bool, cmd: DeviceCmd) -> Result<(), CliError> {
    match cmd {
        DeviceCmd::Start {
            volume,
            snapshot,
            queues,
            depth,
            no_recovery,
            no_zero_copy,
        } => {
            name_arg("volume", &volume)?;
            if let Some(s) = &snapshot {
                name_arg("snapshot", s)?;
            }
            let req = Request::DeviceStart {
                volume,
                snapshot,
                queues,
                depth,
                recovery: no_recovery.then_some(false),
                zero_copy: no_zero_copy.then_some(false),
            };
            reply(control, json, &req, |r| {
                println!("{}", output::str_of(r, "path"))
            })
        }
        DeviceCmd::Stop { device } => {
            if !device.starts_with('/') {
                match device.split_once('@') {
                    Some((v, s)) => {
                        name_arg("volume", v)?;
                        name_arg("snapshot", s)?;
                    }
                    None => name_arg("volume", &device)?,
                }
            }
            let req = Request::DeviceStop {
                device: device.clone(),
            };
            reply(control, json, &req, |r| {
                let key = match r.get("snapshot").and_then(Value::as_str) {
                    Some(s) => format!("{}@{s}", output::str_of(r, "volume")),
                    None => output::str_of(r, "volume"),
                };
                match r.get("path").and_then(Value::as_str) {
                    Some(p) => println!("stopped device {p} ({key})"),
                    None => println!("dropped the device entry for {key} (it was not running)"),
                }
            })
        }
        DeviceCmd::List => reply(control, json, &Request::DeviceList {}, |r| {
            print!("{}", output::device_list(r))
        }),
    }
}

fn volume(control: &Endpoint, json: bool, cmd: VolumeCmd) -> Result<(), CliError> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            chunk_size,
            partitions,
            backing,
            cache,
            ceph,
            cluster,
        } => {
            name_arg("volume", &name)?;
            let ceph = ceph
                .map(|c| ceph_arg(&c, Some(&name), cluster))
                .transpose()?;
            let size = size_arg(&size)?;
            if size == 0 {
                return Err(CliError::plain(
                    "invalid size \"0\": a volume needs at least one byte; e.g. --size 10G",
                ));
            }
            let chunk_size = chunk_size_arg(chunk_size)?;
            let backing = match backing {
                Some(p) => Some(
                    p.canonicalize()
                        .map_err(|e| {
                            CliError::new(
                                format!(
                                    "cannot use {} as backing: {}",
                                    p.display(),
                                    strip_os_error(&e.to_string())
                                ),
                                "give an existing file or block device",
                            )
                        })?
                        .to_string_lossy()
                        .into_owned(),
                ),
                None => None,
            };
            let req = Request::VolumeCreate {
                name: name.clone(),
                size,
                chunk_size,
                partitions,
                backing,
                cache: cache.map(|c| match c {
                    CacheArg::Writeback => CacheMode::Writeback,
                    CacheArg::None => CacheMode::None,
                    CacheArg::Writearound => CacheMode::Writearound,
                }),
                ceph,
            };
            reply(control, json, &req, |r| {
                println!(
                    "created volume {name}: {}, chunk size {}, {} partitions, cache {}",
                    output::size_of(r, "capacity"),
                    output::size_of(r, "chunk_size"),
                    output::str_of(r, "partitions"),
                    output::str_of(r, "cache"),
                )
            })
        }
        VolumeCmd::List => reply(control, json, &Request::VolumeList {}, |r| {
            print!("{}", output::volume_list(r))
        }),
        VolumeCmd::Info { name } => reply(control, json, &Request::VolumeInfo { name }, |r| {
            print!("{}", output::volume_info(r))
        }),
        VolumeCmd::Access {
            name,
            grant,
            revoke,
        } => {
            let req = Request::VolumeAccess {
                name,
                grant,
                revoke,
            };
            reply(control, json, &req, |r| print!("{}", output::access(r)))
        }
        VolumeCmd::Chown { name, user } => {
            let req = Request::VolumeChown { name, user };
            reply(control, json, &req, |r| print!("{}", output::access(r)))
        }
        VolumeCmd::Delete { name } => {
            let req = Request::VolumeDelete { name: name.clone() };
            reply(control, json, &req, |_| println!("deleted volume {name}"))
        }
        VolumeCmd::Detach { name } => {
            let req = Request::VolumeDetach { name: name.clone() };
            reply(control, json, &req, |_| {
                println!("detached volume {name}; its data stays in the Ceph pool")
            })
        }
        VolumeCmd::Reopen { name } => {
            let req = Request::VolumeReopen { name: name.clone() };
            reply(control, json, &req, |_| println!("reopened volume {name}"))
        }
        VolumeCmd::Clone { source, name } => {
            let Some((volume, snapshot)) = source.split_once('@') else {
                return Err(CliError::plain(format!(
                    "{source:?} names no snapshot: give the parent as VOL@SNAP, e.g. \
                     `snapblk volume clone db@before-upgrade db-test`"
                )));
            };
            name_arg("volume", &name)?;
            let req = Request::VolumeClone {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
                name: name.clone(),
            };
            reply(control, json, &req, |r| {
                println!(
                    "created volume {name}, a clone of {source} ({}), in {} µs",
                    output::size_of(r, "capacity"),
                    output::str_of(r, "create_us"),
                )
            })
        }
        VolumeCmd::Flatten { name, wait } => {
            let req = Request::VolumeFlatten { name: name.clone() };
            if !wait {
                return reply(control, json, &req, |r| {
                    println!(
                        "flattening {name}: {}; follow it with `snapblk volume info {name}`",
                        output::flatten_of(&r["flatten"])
                    )
                });
            }
            client::request(control, &req)?;
            let info = Request::VolumeInfo { name: name.clone() };
            loop {
                let r = client::request(control, &info)?;
                let state = output::str_of(&r["flatten"], "state");
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(&r["flatten"]).unwrap_or_default()
                    );
                } else {
                    println!("{name}: {}", output::flatten_of(&r["flatten"]));
                }
                if state.starts_with("failed") {
                    return Err(CliError::plain(format!("flatten of {name} {state}")));
                }
                if r.get("parent").is_none() {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        VolumeCmd::Import {
            name,
            ceph,
            cluster,
            chunk_size,
            partitions,
        } => {
            name_arg("volume", &name)?;
            let req = Request::VolumeImport {
                name: name.clone(),
                ceph: ceph_arg(&ceph, None, cluster)?,
                chunk_size: chunk_size_arg(chunk_size)?,
                partitions,
            };
            reply(control, json, &req, |r| {
                println!(
                    "imported {ceph} as volume {name}: {}",
                    output::size_of(r, "capacity")
                )
            })
        }
        VolumeCmd::Attach {
            name,
            ceph,
            cluster,
            break_lock,
        } => {
            name_arg("volume", &name)?;
            let req = Request::VolumeAttach {
                name: name.clone(),
                ceph: ceph_arg(&ceph, None, cluster)?,
                break_lock,
            };
            reply(control, json, &req, |r| {
                println!(
                    "attached volume {name} ({ceph}), lock held by {}",
                    output::str_of(&r["ceph"], "lock_holder")
                )
            })
        }
    }
}

fn chunk_size_arg(chunk_size: Option<String>) -> Result<Option<u32>, CliError> {
    let Some(c) = chunk_size else {
        return Ok(None);
    };
    let b = size_arg(&c)?;
    u32::try_from(b).map(Some).map_err(|_| {
        CliError::plain(format!(
            "invalid chunk size {c:?}: too large; use a power of two from 4K to 1M"
        ))
    })
}

fn snapshot(control: &Endpoint, json: bool, cmd: SnapshotCmd) -> Result<(), CliError> {
    match cmd {
        SnapshotCmd::Create { of, hooks } => {
            let quiesce = hooks.quiesce()?;
            let (volume, name) = match of.parts()? {
                Snap::Volume(v, n) => (v, n),
                Snap::Group(g, n) => return group::snapshot_create(control, json, &g, &n, quiesce),
            };
            name_arg("snapshot", &name)?;
            let req = Request::SnapshotCreate {
                volume: volume.clone(),
                name: name.clone(),
                quiesce,
            };
            reply(control, json, &req, |r| {
                println!(
                    "created snapshot {name} of volume {volume} (generation {}, writes paused {} µs)",
                    output::str_of(r, "generation"),
                    output::str_of(r, "stall_us"),
                );
                print!("{}", output::quiesce_report(r));
            })
        }
        SnapshotCmd::List {
            group: Some(name), ..
        } => reply(control, json, &Request::GroupInfo { name }, |r| {
            print!("{}", group::info(r))
        }),
        SnapshotCmd::List { volume, .. } => {
            let volume = volume.expect("clap requires a volume without --group");
            let req = Request::SnapshotList {
                volume: volume.clone(),
            };
            reply(control, json, &req, |r| {
                print!("{}", output::snapshot_list(&volume, r))
            })
        }
        SnapshotCmd::Delete { of } => {
            let (volume, name) = match of.parts()? {
                Snap::Volume(v, n) => (v, n),
                Snap::Group(g, n) => return group::snapshot_delete(control, json, &g, &n),
            };
            let req = Request::SnapshotDelete {
                volume: volume.clone(),
                name: name.clone(),
            };
            reply(control, json, &req, |_| {
                println!("deleted snapshot {name} of volume {volume}")
            })
        }
        SnapshotCmd::Revert {
            volume,
            snapshot,
            force,
        } => {
            let req = Request::SnapshotRevert {
                volume: volume.clone(),
                name: snapshot.clone(),
                force,
            };
            reply(control, json, &req, |r| {
                println!(
                    "reverted volume {volume} to snapshot {snapshot}: rewrote {} in {} ms",
                    output::size_of(r, "changed_bytes"),
                    r["elapsed_us"].as_u64().unwrap_or(0) / 1000,
                )
            })
        }
        SnapshotCmd::Diff { volume, from, to } => {
            let req = Request::SnapshotDiff { volume, from, to };
            reply(control, json, &req, |r| {
                print!("{}", output::snapshot_diff(r))
            })
        }
    }
}

/// `snapblk status`'s line on NBD TLS.
fn nbd_tls_fact(r: &Value) -> String {
    let mode = output::str_of(r, "nbd_tls");
    if r.get("nbd_tls_client_certs").and_then(Value::as_bool) == Some(true) {
        format!("{mode}, client certificates required")
    } else {
        mode
    }
}

/// `snapblk serve`: the quick start.
fn set_writeback_buffer(arg: &str) -> Result<(), CliError> {
    let limit_bytes = usize::try_from(size_arg(arg)?)
        .map_err(|_| CliError::plain(format!("--writeback-buffer {arg} is too large")))?;
    WriteBackConfig::set_daemon_default(WriteBackConfig {
        limit_bytes,
        ..WriteBackConfig::default()
    });
    Ok(())
}

fn serve(control: Option<PathBuf>, a: ServeArgs) -> Result<(), CliError> {
    let size = size_arg(&a.size)?;
    if size == 0 {
        return Err(CliError::plain(
            "invalid size \"0\": disk0 needs at least one byte; e.g. --size 10G",
        ));
    }
    set_writeback_buffer(&a.writeback_buffer)?;
    init_logging();
    let data_dir = a.data_dir.unwrap_or_else(paths::default_data_dir);
    let config = DaemonConfig {
        data_dir: data_dir.clone(),
        control,
        control_listen: None,
        nbd_unix: vec![data_dir.join("nbd.sock")],
        nbd_access: a.nbd.access(),
        nbd_tcp: a.nbd.nbd_listen,
        nbd_limits: Default::default(),
        replication: ReplicationConfig::default(),
        metrics: None,
        space_guard_percent: crate::schedule::guard::DEFAULT_PERCENT,
    };
    const DISK: &str = "disk0";
    daemon::run(
        &config,
        |reg| {
            if reg.volume(DISK).is_err() && reg.entries().iter().all(|(n, _)| n != DISK) {
                reg.create_volume(DISK, size, None, None, None, None)
                    .map_err(|e| anyhow::anyhow!("cannot create volume {DISK}: {}", e.message))?;
                log::info!("created volume {DISK} ({})", size::format_size(size));
            }
            Ok(())
        },
        |d| {
            let tls = d.facts_nbd_tls == TlsMode::Require;
            let scheme = if tls { "nbds" } else { "nbd" };
            let unix = d
                .facts_nbd_unix
                .first()
                .map(|p| format!("{scheme}+unix:///{DISK}?socket={}", p.display()))
                .unwrap_or_default();
            let tcp = d
                .facts_nbd_tcp
                .first()
                .map(|a| format!("{scheme}://{a}/{DISK}"));
            let size = d
                .registry
                .volume(DISK)
                .map(|v| size::format_size(v.size()))
                .unwrap_or_else(|e| format!("unavailable: {}", e.message));
            println!(
                "snapblk is serving volume {DISK} ({size}) from {}",
                d.registry.data_dir().display()
            );
            println!();
            println!("  NBD over UNIX:  {unix}");
            match &tcp {
                Some(tcp) => println!("  NBD over TCP:   {tcp}"),
                None => println!("  (no TCP: add --nbd-listen 127.0.0.1:10809 to serve it there)"),
            }
            println!();
            let uri = tcp.unwrap_or(unix);
            if tls {
                println!("TLS is required; clients need the CA certificate, e.g.:");
                let sep = if uri.contains('?') { '&' } else { '?' };
                println!("Try:  nbdinfo '{uri}{sep}tls-certificates=DIR-WITH-ca-cert.pem'");
            } else {
                println!("Try:  qemu-img info '{uri}'");
                println!("      nbdinfo '{uri}'");
            }
            println!(
                "More: snapblk --control {} volume list   (Ctrl-C stops the daemon)",
                d.control_path.display()
            );
            use std::io::Write;
            let _ = std::io::stdout().flush();
        },
    )
    .map_err(daemon_error)
}

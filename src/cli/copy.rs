//! `snapblk copy ...` and `snapblk restore`: live copy jobs from the command
//! line. `copy start ... --to -` hands the CLI's standard output to the
//! daemon over the control socket (SCM_RIGHTS), so the stream never passes
//! through the JSON connection, then waits for the job to end; `restore
//! ... --to vol:NAME` hands over the stream's descriptor the same way.

use super::client::{self, CliError, Endpoint};
use super::output::{self, key_values, str_of, table};
use super::size::{format_size, parse_size};
use super::{name_arg, print_json, reply};
use crate::control::protocol::Request;
use crate::copy::progress::{Format, Policy};
use crate::copy::CopyStart;
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PolicyArg {
    /// Old data is preserved once in the snapshot store; writes go on
    Cow,
    /// Writes to a segment not yet copied wait until it is copied (it goes next)
    Hold,
    /// Writes to a segment not yet copied copy its old data to the target first
    Direct,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    /// The image itself (a sparse file, a device, a volume)
    Raw,
    /// A self-describing backup stream for `snapblk restore`
    Stream,
}

#[derive(Subcommand, Debug)]
pub enum CopyCmd {
    /// Start a point-in-time copy of a live volume (or VOL@SNAP); prints the job id
    Start {
        /// The volume (its image when the job starts) or one of its snapshots
        #[arg(value_name = "VOL[@SNAP]")]
        source: String,
        /// A new file (created sparse), a block device, vol:NAME, or - (stdout, --format stream)
        #[arg(long, value_name = "TARGET", allow_hyphen_values = true)]
        to: String,
        /// What a write to a range not yet copied does [default: cow]
        #[arg(long, value_enum)]
        policy: Option<PolicyArg>,
        /// Segment size, rounded up to the volume's chunk size [default: 1M]
        #[arg(long, value_name = "SIZE")]
        block_size: Option<String>,
        /// Bandwidth limit in bytes per second (K/M/G suffixes), e.g. 100M
        #[arg(long, value_name = "BYTES_PER_S")]
        rate: Option<String>,
        /// Output format [default: raw]
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Re-read the target at the end and compare checksums
        #[arg(long)]
        verify: bool,
        /// hold/direct: a write that waits this long for the job (the target
        /// stalled) fails the job and goes through [default: 10]
        #[arg(long, value_name = "SECS")]
        hold_timeout: Option<f64>,
        /// Copy only what changed since this older snapshot: a raw target
        /// must hold it already; a stream is an incremental onto it
        #[arg(long, value_name = "SNAP")]
        since: Option<String>,
    },
    /// Show progress, throughput and ETA of one job (or of every running job)
    Status {
        /// The job's id [default: every running job]
        job: Option<u64>,
        /// Follow the job until it ends (a progress bar on a terminal)
        #[arg(long)]
        watch: bool,
    },
    /// Pause a job (hold writes are then copied first by the writer)
    Pause {
        /// The job's id
        job: u64,
    },
    /// Resume a paused job
    Resume {
        /// The job's id
        job: u64,
    },
    /// Cancel a job; the target keeps what was copied so far
    Cancel {
        /// The job's id
        job: u64,
    },
    /// List jobs, ended ones too
    #[command(alias = "ls")]
    List,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The stream files, applied in order (a full stream, then
    /// incrementals onto it), or - for standard input
    #[arg(value_name = "STREAM|-", required = true)]
    pub streams: Vec<PathBuf>,
    /// A file (created or replaced, sparse), a block device, or vol:NAME (a
    /// volume of the daemon: created with the stream's size if missing)
    #[arg(long, value_name = "TARGET", required_unless_present = "verify_chain")]
    pub to: Option<PathBuf>,
    /// Check the streams as a chain (every frame, and each incremental onto
    /// the image the previous stream leaves) without writing anything
    #[arg(long, conflicts_with = "to")]
    pub verify_chain: bool,
}

fn absolute(path: &str) -> Result<String, CliError> {
    let p = Path::new(path);
    if p.is_absolute() {
        return Ok(path.to_string());
    }
    let cwd = std::env::current_dir()
        .map_err(|e| CliError::plain(format!("cannot read the current directory: {e}")))?;
    Ok(cwd.join(p).display().to_string())
}

pub fn run(control: &Endpoint, json: bool, cmd: CopyCmd) -> Result<(), CliError> {
    match cmd {
        CopyCmd::Start {
            source,
            to,
            policy,
            block_size,
            rate,
            format,
            verify,
            hold_timeout,
            since,
        } => {
            let (volume, snapshot) = match source.split_once('@') {
                Some((v, s)) => (v.to_string(), Some(s.to_string())),
                None => (source.clone(), None),
            };
            name_arg("volume", &volume)?;
            if let Some(s) = &snapshot {
                name_arg("snapshot", s)?;
            }
            let stdout = to == "-";
            if stdout && !matches!(format, Some(FormatArg::Stream)) {
                return Err(CliError::plain(
                    "--to - writes a backup stream to standard output; add --format stream",
                ));
            }
            if stdout && verify {
                return Err(CliError::plain(
                    "--verify re-reads the target, which standard output cannot do; verify with \
                     `snapblk restore` instead",
                ));
            }
            let target = if stdout || to.starts_with("vol:") {
                to.clone()
            } else {
                absolute(&to)?
            };
            let size = |s: Option<String>| s.map(|s| parse_size(&s)).transpose();
            let req = Request::CopyStart(CopyStart {
                volume,
                snapshot,
                target,
                policy: policy.map(|p| match p {
                    PolicyArg::Cow => Policy::Cow,
                    PolicyArg::Hold => Policy::Hold,
                    PolicyArg::Direct => Policy::Direct,
                }),
                block_size: size(block_size).map_err(CliError::plain)?,
                rate: size(rate).map_err(CliError::plain)?,
                format: format.map(|f| match f {
                    FormatArg::Raw => Format::Raw,
                    FormatArg::Stream => Format::Stream,
                }),
                verify,
                hold_timeout_ms: hold_timeout.map(|s| (s * 1000.0).round() as u64),
                since,
            });
            if stdout {
                return stream_to_stdout(control, &req);
            }
            reply(control, json, &req, |r| {
                if let Some(note) = r.get("note").and_then(Value::as_str) {
                    eprintln!("snapblk: note: {note}");
                }
                println!("{}", str_of(r, "id"))
            })
        }
        CopyCmd::Status { job, watch } => {
            if watch {
                return watch_job(control, json, job);
            }
            reply(control, json, &Request::CopyStatus { id: job }, |r| {
                if r.is_array() {
                    print!("{}", job_table(r));
                } else {
                    print!("{}", job_details(r));
                }
            })
        }
        CopyCmd::Pause { job } => reply(control, json, &Request::CopyPause { id: job }, |_| {
            println!("paused copy job {job}")
        }),
        CopyCmd::Resume { job } => reply(control, json, &Request::CopyResume { id: job }, |_| {
            println!("resumed copy job {job}")
        }),
        CopyCmd::Cancel { job } => reply(control, json, &Request::CopyCancel { id: job }, |_| {
            println!("cancelled copy job {job}; the target holds a partial copy")
        }),
        CopyCmd::List => reply(control, json, &Request::CopyList {}, |r| {
            print!("{}", job_table(r))
        }),
    }
}

fn percent(v: &Value) -> String {
    let total = v["size"].as_u64().unwrap_or(0).max(1);
    let done = v["bytes_done"].as_u64().unwrap_or(0);
    format!("{:.1}%", done as f64 * 100.0 / total as f64)
}

fn throughput(v: &Value) -> String {
    match v["throughput_bps"].as_u64() {
        Some(t) if t > 0 => format!("{}/s", format_size(t)),
        _ => "-".into(),
    }
}

fn eta(v: &Value) -> String {
    match v["eta_s"].as_u64() {
        Some(s) if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        Some(s) => format!("{s}s"),
        None => "-".into(),
    }
}

fn source_of(v: &Value) -> String {
    match v["snapshot"].as_str() {
        Some(s) => format!("{}@{s}", str_of(v, "volume")),
        None => str_of(v, "volume"),
    }
}

fn job_table(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| {
                    vec![
                        str_of(v, "id"),
                        source_of(v),
                        str_of(v, "target"),
                        str_of(v, "policy"),
                        str_of(v, "state"),
                        percent(v),
                        throughput(v),
                        eta(v),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "ID", "SOURCE", "TARGET", "POLICY", "STATE", "DONE", "SPEED", "ETA",
        ],
        &rows,
    )
}

fn job_details(v: &Value) -> String {
    let mut pairs = vec![
        ("job", str_of(v, "id")),
        ("source", source_of(v)),
        ("target", str_of(v, "target")),
        ("policy", str_of(v, "policy")),
        ("format", str_of(v, "format")),
        ("block size", output::size_of(v, "block_size")),
        ("state", str_of(v, "state")),
        (
            "progress",
            format!(
                "{} of {} ({})",
                output::size_of(v, "bytes_done"),
                output::size_of(v, "size"),
                percent(v)
            ),
        ),
        ("throughput", throughput(v)),
        ("eta", eta(v)),
    ];
    if let Some(e) = v["error"].as_str() {
        pairs.push(("error", e.to_string()));
    }
    key_values(&pairs)
}

fn ended(v: &Value) -> bool {
    matches!(v["state"].as_str(), Some("done" | "failed" | "cancelled"))
}

/// A job that ended other than done is an error for the CLI's exit status.
fn outcome(v: &Value) -> Result<(), CliError> {
    match v["state"].as_str() {
        Some("done") => Ok(()),
        Some(state) => Err(CliError::plain(format!(
            "copy job {} {state}: {}",
            str_of(v, "id"),
            v["error"].as_str().unwrap_or("cancelled by request")
        ))),
        None => Err(CliError::plain("the daemon sent a job without a state")),
    }
}

/// `copy status --watch`: polls the job until it ends. On a terminal an
/// indicatif bar (bytes done/total, throughput, ETA); otherwise a plain line
/// a second and the final one; with `--json` one object a line. A job that
/// failed or was cancelled is an error (non-zero exit).
fn watch_job(control: &Endpoint, json: bool, job: Option<u64>) -> Result<(), CliError> {
    let Some(id) = job else {
        return Err(CliError::plain(
            "--watch follows one job; give its id (see `snapblk copy list`)",
        ));
    };
    let mut bar: Option<ProgressBar> = None;
    let tty = !json && std::io::stdout().is_terminal();
    loop {
        let v = client::request(control, &Request::CopyStatus { id: Some(id) })?;
        let done = v["bytes_done"].as_u64().unwrap_or(0);
        if json {
            println!(
                "{}",
                serde_json::to_string(&v).expect("JSON values serialize")
            );
        } else if tty {
            let b = bar.get_or_insert_with(|| {
                let bar = bytes_bar(&format!("job {id}"), v["size"].as_u64());
                bar.set_draw_target(ProgressDrawTarget::stdout());
                bar
            });
            b.set_position(done);
            b.set_message(str_of(&v, "state"));
        } else {
            let speed = match ended(&v) {
                true => String::new(),
                false => format!(" {} ETA {}", throughput(&v), eta(&v)),
            };
            println!(
                "job {id}: {} {} ({} of {}){speed}",
                str_of(&v, "state"),
                percent(&v),
                format_size(done),
                output::size_of(&v, "size"),
            );
        }
        if ended(&v) {
            if let Some(b) = bar {
                let state = str_of(&v, "state");
                if state == "done" {
                    b.finish_with_message(state);
                } else {
                    b.abandon_with_message(state);
                }
            }
            return outcome(&v);
        }
        std::thread::sleep(Duration::from_millis(if tty { 200 } else { 1000 }));
    }
}

/// A terminal bar of bytes out of `total`, with throughput and ETA,
/// labelled `label` (drawn on stderr unless told otherwise).
fn bytes_bar(label: &str, total: Option<u64>) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({percent}%) \
         {binary_bytes_per_sec} ETA {eta} {msg}",
    )
    .expect("a valid template")
    .progress_chars("#>-");
    ProgressBar::new(total.unwrap_or(0))
        .with_style(style)
        .with_prefix(label.to_string())
}

fn show_offset(bar: &ProgressBar, file: &std::fs::File) {
    if let Ok(at) = std::io::Seek::stream_position(&mut &*file) {
        bar.set_position(at);
    }
}

/// A restore's progress on a terminal: how far the stream file has been
/// read, by this process or by the daemon (a passed descriptor shares its
/// file offset with ours, so `lseek` here sees the daemon's reads).
struct ReadProgress {
    bar: ProgressBar,
    watched: std::fs::File,
    stop: std::sync::mpsc::Sender<()>,
    poller: std::thread::JoinHandle<()>,
}

impl ReadProgress {
    /// None unless stderr is a terminal and `stream` a regular file.
    fn start(stream: &std::fs::File, json: bool) -> Option<ReadProgress> {
        if json || !std::io::stderr().is_terminal() {
            return None;
        }
        let len = stream.metadata().ok().filter(|m| m.is_file())?.len();
        let watched = stream.try_clone().ok()?;
        let polled = stream.try_clone().ok()?;
        let bar = bytes_bar("restore", Some(len));
        let (stop, stopped) = std::sync::mpsc::channel();
        let shown = bar.clone();
        let poller = std::thread::spawn(move || {
            while stopped.recv_timeout(Duration::from_millis(100)).is_err() {
                show_offset(&shown, &polled);
            }
        });
        Some(ReadProgress {
            bar,
            watched,
            stop,
            poller,
        })
    }

    /// Leaves the bar where the reader stopped (full after a whole stream).
    fn end(self, ok: bool) {
        let _ = self.stop.send(());
        let _ = self.poller.join();
        show_offset(&self.bar, &self.watched);
        self.bar
            .abandon_with_message(if ok { "restored" } else { "failed" });
    }
}

/// `copy start ... --to -`: passes fd 1 to the daemon, then waits for the
/// job; messages go to stderr since stdout carries the stream.
fn stream_to_stdout(control: &Endpoint, req: &Request) -> Result<(), CliError> {
    let v = client::request_with_fd(control, req, libc::STDOUT_FILENO)?;
    let id = v["id"].as_u64().unwrap_or(0);
    eprintln!("snapblk: copy job {id} is streaming to standard output");
    loop {
        let v = client::request(control, &Request::CopyStatus { id: Some(id) })?;
        if ended(&v) {
            return outcome(&v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `snapblk restore`: each stream in turn into a file or device here, or
/// into a volume by the daemon, which reads the stream from the descriptor
/// passed with the request; or `--verify-chain`.
pub fn restore(control: &Endpoint, json: bool, a: RestoreArgs) -> Result<(), CliError> {
    if let Endpoint::Remote(r) = control {
        return Err(CliError::new(
            format!(
                "restore reads its streams on this machine and writes here or hands them to \
                 the local daemon; the daemon at {} cannot receive them",
                r.addr
            ),
            "copy the stream to the daemon's machine and run `snapblk restore` there, \
             without --remote",
        ));
    }
    let Some(to) = a.to else {
        return verify_chain(json, &a.streams);
    };
    if a.streams.len() > 1 && a.streams.iter().any(|s| s == Path::new("-")) {
        return Err(CliError::plain(
            "standard input (-) is one stream; give the streams of a chain as files",
        ));
    }
    for stream in &a.streams {
        restore_one(control, json, stream, &to)?;
    }
    Ok(())
}

/// `restore --verify-chain`: checks without writing; prints each link.
fn verify_chain(json: bool, streams: &[PathBuf]) -> Result<(), CliError> {
    let links = crate::copy::restore::verify_chain(streams).map_err(CliError::plain)?;
    let rows: Vec<Value> = links
        .iter()
        .map(|l| {
            serde_json::json!({
                "stream": l.path,
                "source": l.header.source,
                "image": l.header.image(),
                "base": l.header.base_image(),
                "blocks": l.blocks,
            })
        })
        .collect();
    if json {
        print_json(&Value::Array(rows));
        return Ok(());
    }
    for l in &links {
        let kind = match l.header.base_image() {
            Some(b) => format!("incremental onto generation {}", b.generation),
            None => "full".to_string(),
        };
        println!(
            "{}: {} generation {} ({kind}, {} blocks): ok",
            l.path, l.header.source, l.header.generation, l.blocks
        );
    }
    println!(
        "the chain of {} streams is complete and intact",
        links.len()
    );
    Ok(())
}

fn restore_one(control: &Endpoint, json: bool, stream: &Path, to: &Path) -> Result<(), CliError> {
    let opened = if stream == Path::new("-") {
        None
    } else {
        Some(std::fs::File::open(stream).map_err(|e| {
            CliError::new(
                format!(
                    "cannot open the stream {}: {}",
                    stream.display(),
                    super::strip_os_error(&e.to_string())
                ),
                "give the path of a file written by `snapblk copy start --format stream`",
            )
        })?)
    };
    let progress = opened.as_ref().and_then(|f| ReadProgress::start(f, json));
    let data_dir = super::paths::default_data_dir();
    let restored = match to.to_str().and_then(|t| t.strip_prefix("vol:")) {
        Some(volume) => {
            name_arg("volume", volume)?;
            let fd = opened
                .as_ref()
                .map_or(libc::STDIN_FILENO, std::os::fd::AsRawFd::as_raw_fd);
            let req = Request::Restore {
                volume: volume.to_string(),
            };
            client::request_with_fd(control, &req, fd)
        }
        None => match opened {
            Some(f) => crate::copy::restore::restore(f, to, &data_dir),
            None => crate::copy::restore::restore(std::io::stdin().lock(), to, &data_dir),
        }
        .map_err(CliError::plain)
        .map(|r| {
            serde_json::json!({
                "source": r.header.source,
                "generation": r.header.generation,
                "size": r.header.volume_size,
                "blocks": r.blocks,
                "bytes": r.bytes,
                "target": to,
                "incremental": r.header.base.is_some(),
            })
        }),
    };
    if let Some(p) = progress {
        p.end(restored.is_ok());
    }
    let v = restored?;
    if json {
        print_json(&v);
    } else {
        println!(
            "restored {} ({} blocks, {} of data) of {} generation {} to {}{}",
            output::size_of(&v, "size"),
            str_of(&v, "blocks"),
            output::size_of(&v, "bytes"),
            str_of(&v, "source"),
            str_of(&v, "generation"),
            str_of(&v, "target"),
            if v["created"] == true {
                " (created)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

//! The CLI's side of the control protocol: one request line, one response
//! line, to the local daemon's UNIX socket or to a remote daemon
//! ([`super::remote`]).

use crate::control::protocol::{Request, Response};
use serde_json::Value;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where requests go.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// The control socket of a daemon on this machine.
    Local(PathBuf),
    /// A daemon's `--control-listen`, over mutual TLS.
    Remote(super::remote::Remote),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Local(p) => write!(f, "{}", p.display()),
            Endpoint::Remote(r) => f.write_str(&r.addr),
        }
    }
}

/// What went wrong talking to the daemon, ready to print.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub hint: Option<String>,
}

impl CliError {
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }
    pub fn plain(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            hint: None,
        }
    }
    /// `snapblk: error: <message>; <hint>`
    pub fn line(&self) -> String {
        match &self.hint {
            Some(h) => format!("snapblk: error: {}; {h}", self.message),
            None => format!("snapblk: error: {}", self.message),
        }
    }
}

/// The data directory a control socket path belongs to (for hints).
fn data_dir_of(control: &Path) -> PathBuf {
    if control.file_name().is_some_and(|n| n == "control.sock") {
        if let Some(p) = control.parent() {
            if !p.as_os_str().is_empty() {
                return p.to_path_buf();
            }
        }
    }
    super::paths::default_data_dir()
}

fn os_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "no such socket".into(),
        Some(libc::ECONNREFUSED) => "connection refused".into(),
        Some(libc::EACCES) | Some(libc::EPERM) => "permission denied".into(),
        Some(libc::ENOTSOCK) => "not a socket".into(),
        _ => {
            let s = e.to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_lowercase(),
                None => s,
            }
        }
    }
}

/// Sends one request and returns the daemon's response.
pub fn call(control: &Endpoint, request: &Request) -> Result<Response, CliError> {
    let line = serde_json::to_string(request).expect("requests serialize");
    exchange(control, &line, None, None)
}

/// [`request`] giving up when connecting, sending or the answer takes
/// longer than `limit` (`status --all`: one silent daemon must not hold up
/// the others' lines).
pub fn request_within(
    control: &Endpoint,
    request: &Request,
    limit: Duration,
) -> Result<Value, CliError> {
    request_passing(control, request, None, Some(limit))
}

/// Sends one raw line (no newline) and returns the daemon's response.
pub fn call_line(control: &Endpoint, line: &str) -> Result<Response, CliError> {
    exchange(control, line, None, None)
}

/// Sends `bytes` with a copy of descriptor `fd` attached (SCM_RIGHTS).
fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: RawFd) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msg points at live buffers of the sizes given; the cmsg
    // header and data are written inside `cbuf`.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd);
        libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut w = stream;
    w.write_all(&bytes[sent as usize..])
}

fn exchange(
    to: &Endpoint,
    line: &str,
    fd: Option<RawFd>,
    limit: Option<Duration>,
) -> Result<Response, CliError> {
    let bytes = format!("{line}\n");
    match to {
        Endpoint::Local(control) => {
            let stream = connect_local(control)?;
            let lost = |e: io::Error| {
                CliError::new(
                    format!(
                        "lost the connection to the daemon at {}: {}",
                        control.display(),
                        os_reason(&e)
                    ),
                    "see the daemon's log; it may have stopped",
                )
            };
            stream
                .set_read_timeout(limit)
                .and_then(|_| stream.set_write_timeout(limit))
                .map_err(lost)?;
            match fd {
                Some(fd) => send_with_fd(&stream, bytes.as_bytes(), fd).map_err(lost)?,
                None => (&stream).write_all(bytes.as_bytes()).map_err(lost)?,
            }
            read_answer(BufReader::new(&stream), to, lost)
        }
        Endpoint::Remote(remote) => {
            if fd.is_some() {
                return Err(CliError::new(
                    format!(
                        "this command hands a file of this machine to the daemon, which the \
                         daemon at {} cannot receive over the network",
                        remote.addr
                    ),
                    "run it on the daemon's machine without --remote (or give a path there, \
                     e.g. `copy start ... --to PATH`)",
                ));
            }
            let mut tls = remote.connect(limit)?;
            let lost = |e: io::Error| super::remote::explain(&remote.addr, &e);
            tls.write_all(bytes.as_bytes())
                .and_then(|_| tls.flush())
                .map_err(lost)?;
            read_answer(BufReader::new(tls), to, lost)
        }
    }
}

fn connect_local(control: &Path) -> Result<UnixStream, CliError> {
    UnixStream::connect(control).map_err(|e| {
        let reason = os_reason(&e);
        let hint = match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => {
                "run as root, as the owner of the daemon's data directory or as a member of its \
                 group"
                    .to_string()
            }
            _ => format!(
                "start it with `snapblk daemon --data-dir {}` (or point at it with --control PATH or $SNAPBLK_CONTROL)",
                data_dir_of(control).display()
            ),
        };
        CliError::new(
            format!("cannot reach the daemon at {}: {reason}", control.display()),
            hint,
        )
    })
}

/// Reads the one response line.
fn read_answer(
    mut reader: impl BufRead,
    from: &Endpoint,
    lost: impl Fn(io::Error) -> CliError,
) -> Result<Response, CliError> {
    let mut resp = String::new();
    let n = reader.read_line(&mut resp).map_err(lost)?;
    if n == 0 {
        return Err(CliError::new(
            format!("the daemon at {from} closed the connection without answering"),
            "see the daemon's log; it may have stopped",
        ));
    }
    serde_json::from_str::<Response>(&resp).map_err(|e| {
        CliError::new(
            format!("the daemon sent a response this CLI cannot read ({e})"),
            "check that the CLI and the daemon are the same version",
        )
    })
}

/// Calls and turns a failed response into a [`CliError`] with a hint.
pub fn request(control: &Endpoint, request: &Request) -> Result<Value, CliError> {
    request_passing(control, request, None, None)
}

/// [`request`] with a copy of descriptor `fd` handed to the daemon.
pub fn request_with_fd(
    control: &Endpoint,
    request: &Request,
    fd: RawFd,
) -> Result<Value, CliError> {
    request_passing(control, request, Some(fd), None)
}

fn request_passing(
    control: &Endpoint,
    request: &Request,
    fd: Option<RawFd>,
    limit: Option<Duration>,
) -> Result<Value, CliError> {
    let op = request.op();
    let line = serde_json::to_string(request).expect("requests serialize");
    exchange(control, &line, fd, limit)?
        .into_result()
        .map_err(|e| {
            use crate::control::ErrorCode::*;
            let hint = if e.message.contains("; ") {
                None
            } else {
                Some(match e.code {
                    NotFound if e.message.starts_with("snapshot") => {
                        "list the volume's snapshots with `snapblk snapshot list VOLUME`"
                            .to_string()
                    }
                    NotFound => "list volumes with `snapblk volume list`".to_string(),
                    AlreadyExists => {
                        "pick another name, or delete the existing one first".to_string()
                    }
                    InvalidArgument => format!("see `snapblk {} --help`", op.replace('.', " ")),
                    Busy => "try again in a moment".to_string(),
                    NoSpace => {
                        "free space on the filesystem that holds the data directory".to_string()
                    }
                    PermissionDenied => {
                        "run as root, or ask for access (`snapblk volume access VOL`)".to_string()
                    }
                    BadRequest => {
                        "check that the CLI and the daemon are the same version".to_string()
                    }
                    IoError | Unknown => "see the daemon's log for details".to_string(),
                })
            };
            CliError {
                message: super::strip_os_error(&e.message),
                hint,
            }
        })
}

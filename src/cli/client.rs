//! The CLI's side of the control socket: one request line, one response line.

use crate::control::protocol::{Request, Response};
use serde_json::Value;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

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
pub fn call(control: &Path, request: &Request) -> Result<Response, CliError> {
    let line = serde_json::to_string(request).expect("requests serialize");
    call_line(control, &line)
}

/// Sends one raw line (no newline) and returns the daemon's response.
pub fn call_line(control: &Path, line: &str) -> Result<Response, CliError> {
    let stream = UnixStream::connect(control).map_err(|e| {
        let reason = os_reason(&e);
        let hint = match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => {
                "run as root or as the owner of the daemon's data directory".to_string()
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
    })?;
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
    let mut w = &stream;
    w.write_all(format!("{line}\n").as_bytes()).map_err(lost)?;
    let mut reader = BufReader::new(&stream);
    let mut resp = String::new();
    let n = reader.read_line(&mut resp).map_err(lost)?;
    if n == 0 {
        return Err(CliError::new(
            format!(
                "the daemon at {} closed the connection without answering",
                control.display()
            ),
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
pub fn request(control: &Path, request: &Request) -> Result<Value, CliError> {
    let op = request.op();
    call(control, request)?.into_result().map_err(|e| {
        use crate::control::ErrorCode::*;
        let hint = if e.message.contains("; ") {
            None
        } else {
            Some(match e.code {
                NotFound if e.message.starts_with("snapshot") => {
                    "list the volume's snapshots with `snapblk snapshot list VOLUME`".to_string()
                }
                NotFound => "list volumes with `snapblk volume list`".to_string(),
                AlreadyExists => "pick another name, or delete the existing one first".to_string(),
                InvalidArgument => format!("see `snapblk {} --help`", op.replace('.', " ")),
                Busy => "try again in a moment".to_string(),
                NoSpace => "free space on the filesystem that holds the data directory".to_string(),
                PermissionDenied => {
                    "run as root or as the owner of the daemon's data directory".to_string()
                }
                BadRequest => "check that the CLI and the daemon are the same version".to_string(),
                IoError | Unknown => "see the daemon's log for details".to_string(),
            })
        };
        CliError {
            message: super::strip_os_error(&e.message),
            hint,
        }
    })
}

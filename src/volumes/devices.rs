//! Kernel block devices (`/dev/ublkbN`) the daemon runs for volumes and
//! snapshots: what a device is asked to be ([`DeviceSpec`]), the persisted
//! list of them (`DATA_DIR/devices.json`), and the seam to the frontend that
//! runs them ([`Driver`]; the real one is `control::ublk::UblkDriver`).
//!
//! `devices.json` lists every device the operator started and has not
//! stopped; a restarted daemon (also after `kill -9`) starts them again. It
//! is replaced atomically (temporary file, fsync, rename, fsync of the
//! directory), so a crash leaves either the old list or the new one.
//!
//! Must never: touch a volume's bytes (the frontend does, through its
//! [`View`]) or decide which devices may exist (the registry does).

use crate::engine::View;
use crate::frontend::ublk::RingOps;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// The file, in the data directory, that lists the devices to run.
pub const DEVICES_FILE: &str = "devices.json";

/// Queues per device when none is asked for.
pub const DEFAULT_QUEUES: u16 = 1;
/// Queue depth when none is asked for.
pub const DEFAULT_DEPTH: u16 = 64;
/// Most queues a device may have (each is a thread with its own io_uring).
pub const MAX_QUEUES: u16 = 64;
/// Deepest queue the kernel's ublk driver accepts (`UBLK_MAX_QUEUE_DEPTH`).
pub const MAX_DEPTH: u16 = 4096;

/// What the operator asked for: one device for `volume` (read-write) or for
/// `volume@snapshot` (read-only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    pub volume: String,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default = "default_queues")]
    pub queues: u16,
    #[serde(default = "default_depth")]
    pub depth: u16,
    /// The kernel device id (`N` of `/dev/ublkbN`) it last ran as, for a
    /// restarted daemon that re-attaches to the same device
    /// (`UBLK_F_USER_RECOVERY`); absent before its first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_id: Option<u32>,
    /// Ask the kernel for `UBLK_F_USER_RECOVERY` (the default). Without it,
    /// a daemon killed by -9 takes the device with it: the kernel fails its
    /// I/O and removes `/dev/ublkbN`, and the restarted daemon deletes the
    /// dead device and starts a new one.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub recovery: bool,
    /// Run zero copy where the kernel offers it (the default; see
    /// [`crate::frontend::ublk`]). Without it every request's data is
    /// copied, as on kernels without AUTO_BUF_REG.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub zero_copy: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn default_queues() -> u16 {
    DEFAULT_QUEUES
}

fn default_depth() -> u16 {
    DEFAULT_DEPTH
}

impl DeviceSpec {
    /// `VOL` or `VOL@SNAP`, as in NBD export names; at most one device per key.
    pub fn key(&self) -> String {
        match &self.snapshot {
            Some(s) => format!("{}@{s}", self.volume),
            None => self.volume.clone(),
        }
    }
}

/// `devices.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesFile {
    devices: Vec<DeviceSpec>,
}

/// Reads `DATA_DIR/devices.json`; a missing file is an empty list. A file
/// that cannot be parsed is moved aside to `devices.json.bad` (so the next
/// save does not silently lose it) and reported as an error.
pub fn load(data_dir: &Path) -> io::Result<Vec<DeviceSpec>> {
    let path = data_dir.join(DEVICES_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice::<DevicesFile>(&bytes) {
        Ok(f) => Ok(f.devices),
        Err(e) => {
            let bad = data_dir.join(format!("{DEVICES_FILE}.bad"));
            let moved = fs::rename(&path, &bad).is_ok();
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} cannot be read ({e}){}; no device is restored, start them again with \
                     `snapblk device start`",
                    path.display(),
                    if moved {
                        format!(" and was moved to {}", bad.display())
                    } else {
                        String::new()
                    }
                ),
            ))
        }
    }
}

/// Replaces `DATA_DIR/devices.json` atomically with `specs`.
pub fn save(data_dir: &Path, specs: &[DeviceSpec]) -> io::Result<()> {
    let path = data_dir.join(DEVICES_FILE);
    let tmp = data_dir.join(format!(".{DEVICES_FILE}.tmp"));
    let mut text = serde_json::to_string_pretty(&DevicesFile {
        devices: specs.to_vec(),
    })
    .map_err(io::Error::other)?;
    text.push('\n');
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        fs::File::open(data_dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(|e| io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())))
}

/// A running kernel device.
pub trait RunningDevice: Send {
    fn id(&self) -> u32;
    /// `/dev/ublkbN`.
    fn path(&self) -> String;
    fn read_only(&self) -> bool;
    /// Queues the kernel granted (at most one per CPU, whatever was asked).
    fn queues(&self) -> u16;
    /// Queue depth the kernel granted.
    fn depth(&self) -> u16;
    /// Whether the kernel device has `UBLK_F_USER_RECOVERY`.
    fn recovery(&self) -> bool;
    /// Requests served so far by each queue.
    fn requests_per_queue(&self) -> Vec<u64>;
    /// Where each queue's engine I/O went so far: the queue's own ring, or
    /// a runtime ring of the queue thread's own.
    fn ring_ops_per_queue(&self) -> Vec<RingOps>;
    /// How request data moves between the kernel and the daemon
    /// ([`crate::frontend::ublk::BUFFERS_COPY`] or
    /// [`crate::frontend::ublk::BUFFERS_ZERO_COPY`]).
    fn buffers(&self) -> &'static str;
    /// Stops and deletes the kernel device. A stop that failed (timed out)
    /// may be called again.
    fn stop(&mut self) -> io::Result<()>;
}

/// Starts kernel devices; the daemon's seam to the ublk frontend.
pub trait Driver: Send + Sync {
    /// Starts a device serving `view` as `spec` asks; returns once its
    /// block device exists. `spec.last_id`: the kernel device this entry had
    /// before the daemon stopped; if it is still there waiting
    /// (USER_RECOVERY after a crash), the new daemon re-attaches to it
    /// instead of adding a new one; if it was left dead, it is deleted first.
    fn start(&self, view: View, spec: &DeviceSpec) -> io::Result<Box<dyn RunningDevice>>;
    /// What the kernel offers, as the `features` op answers it.
    fn features(&self) -> io::Result<Value>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load() {
        let t = tempfile::tempdir().unwrap();
        assert!(load(t.path()).unwrap().is_empty());
        let specs = vec![
            DeviceSpec {
                volume: "v".into(),
                snapshot: None,
                queues: 2,
                depth: 128,
                last_id: Some(3),
                recovery: true,
                zero_copy: true,
            },
            DeviceSpec {
                volume: "v".into(),
                snapshot: Some("s".into()),
                queues: 1,
                depth: 64,
                last_id: None,
                recovery: false,
                zero_copy: false,
            },
        ];
        save(t.path(), &specs).unwrap();
        assert_eq!(load(t.path()).unwrap(), specs);
        assert_eq!(specs[1].key(), "v@s");
        assert!(!t.path().join(".devices.json.tmp").exists());
        save(t.path(), &[]).unwrap();
        assert!(load(t.path()).unwrap().is_empty());
    }

    #[test]
    fn defaults_and_bad_files() {
        let t = tempfile::tempdir().unwrap();
        fs::write(
            t.path().join(DEVICES_FILE),
            r#"{"devices":[{"volume":"v"}]}"#,
        )
        .unwrap();
        assert_eq!(
            load(t.path()).unwrap(),
            vec![DeviceSpec {
                volume: "v".into(),
                snapshot: None,
                queues: DEFAULT_QUEUES,
                depth: DEFAULT_DEPTH,
                last_id: None,
                recovery: true,
                zero_copy: true,
            }]
        );
        fs::write(t.path().join(DEVICES_FILE), "not json").unwrap();
        let e = load(t.path()).unwrap_err();
        assert!(e.to_string().contains("devices.json.bad"), "{e}");
        assert!(t.path().join("devices.json.bad").exists());
        assert!(load(t.path()).unwrap().is_empty());
    }
}

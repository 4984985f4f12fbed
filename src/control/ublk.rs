//! The daemon's [`Driver`] for ublk: [`crate::frontend::ublk`] devices.
//!
//! Adds one thing to the frontend: a clear answer, before any ioctl, when the
//! running kernel has no ublk at all (no `/dev/ublk-control`).

use crate::engine::View;
use crate::frontend::ublk::{self, Device, DeviceOptions, Previous};
use crate::volumes::devices::{DeviceSpec, Driver, RunningDevice};
use serde_json::Value;
use std::io;
use std::path::Path;

/// The ublk driver's control device; it exists once `ublk_drv` is loaded.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// The error for a kernel without ublk.
pub fn no_ublk_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "this kernel has no ublk: {UBLK_CONTROL} is missing; load it with `modprobe ublk_drv` \
             (kernel 6.0+)"
        ),
    )
}

fn check_control() -> io::Result<()> {
    if Path::new(UBLK_CONTROL).exists() {
        Ok(())
    } else {
        Err(no_ublk_error())
    }
}

/// Runs devices with [`crate::frontend::ublk::Device`].
pub struct UblkDriver;

impl RunningDevice for Device {
    fn id(&self) -> u32 {
        Device::id(self)
    }
    fn path(&self) -> String {
        Device::path(self)
    }
    fn read_only(&self) -> bool {
        Device::read_only(self)
    }
    fn queues(&self) -> u16 {
        self.granted().queues
    }
    fn depth(&self) -> u16 {
        self.granted().depth
    }
    fn recovery(&self) -> bool {
        self.granted().recovery
    }
    fn requests_per_queue(&self) -> Vec<u64> {
        Device::requests_per_queue(self)
    }
    fn ring_ops_per_queue(&self) -> Vec<ublk::RingOps> {
        Device::ring_ops_per_queue(self)
    }
    fn buffers(&self) -> &'static str {
        self.granted().buffers
    }
    fn stop(&mut self) -> io::Result<()> {
        Device::stop(self)
    }
}

impl Driver for UblkDriver {
    fn start(&self, view: View, spec: &DeviceSpec) -> io::Result<Box<dyn RunningDevice>> {
        check_control()?;
        let options = DeviceOptions {
            queues: spec.queues,
            depth: spec.depth,
            recovery: spec.recovery,
            zero_copy: spec.zero_copy,
        };
        let key = spec.key();
        let mut want_id = None;
        if let Some(id) = spec.last_id {
            match ublk::previous_state(id) {
                Previous::Gone => want_id = Some(id),
                Previous::AwaitingRecovery => {
                    log::info!(
                        "device for {key}: /dev/ublkb{id} was left waiting by a daemon that died \
                         (USER_RECOVERY); re-attaching to it"
                    );
                    return Ok(Box::new(Device::recover(id, view, &options)?));
                }
                Previous::Dead => {
                    log::warn!(
                        "device for {key}: /dev/ublkb{id} was left dead by a daemon that died \
                         without USER_RECOVERY: the kernel failed its in-flight I/O and removed the \
                         block device (a filesystem mounted on it was shut down; unmount it and \
                         check it with e2fsck/xfs_repair before mounting it again); deleting the \
                         dead device (id {id}) and starting a new one"
                    );
                    ublk::delete_device(id);
                    want_id = Some(id);
                }
                Previous::Other(why) => log::warn!(
                    "device for {key}: kernel device {id} is not the one it last ran as ({why}); \
                     leaving it alone and starting a new device"
                ),
            }
        }
        let dev = Device::start(view, &options, want_id)?;
        if dev.granted().queues < spec.queues || dev.granted().depth < spec.depth {
            log::warn!(
                "device for {key}: asked for {} queue(s) of depth {}, the kernel granted {} of \
                 depth {} (at most one queue per CPU)",
                spec.queues,
                spec.depth,
                dev.granted().queues,
                dev.granted().depth
            );
        }
        if spec.recovery && !dev.granted().recovery {
            log::warn!(
                "device for {key}: this kernel's ublk has no USER_RECOVERY: if the daemon dies, \
                 the kernel fails the device's I/O and removes {}",
                dev.path()
            );
        }
        Ok(Box::new(dev))
    }

    fn features(&self) -> io::Result<Value> {
        check_control()?;
        serde_json::to_value(ublk::features()?).map_err(io::Error::other)
    }
}

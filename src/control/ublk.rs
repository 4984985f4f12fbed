//! The daemon's [`Driver`] for ublk: [`crate::frontend::ublk`] devices.
//!
//! Adds one thing to the frontend: a clear answer, before any ioctl, when the
//! running kernel has no ublk at all (no `/dev/ublk-control`).

use super::devices::{Driver, RunningDevice};
use crate::engine::View;
use crate::frontend::ublk::{self, Device, DeviceOptions};
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
    fn stop(self: Box<Self>) -> io::Result<()> {
        Device::stop(*self)
    }
}

impl Driver for UblkDriver {
    fn start(
        &self,
        view: View,
        queues: u16,
        depth: u16,
        previous_id: Option<u32>,
    ) -> io::Result<Box<dyn RunningDevice>> {
        check_control()?;
        let options = DeviceOptions { queues, depth };
        if let Some(id) = previous_id.filter(|&id| ublk::awaiting_recovery(id)) {
            return Ok(Box::new(Device::recover(id, view, &options)?));
        }
        Ok(Box::new(Device::start(view, &options)?))
    }

    fn features(&self) -> io::Result<Value> {
        check_control()?;
        serde_json::to_value(ublk::features()?).map_err(io::Error::other)
    }
}

//! Host side of devices: `local`, `qemu-aarch64` / `qemu-armv7` (qemu-user on this host)
//! and `ssh://[user@]host[:port]` boards reached with the system's `ssh`. A [`Session`]
//! deploys a runner and its files into a fresh work directory on the device, runs it with
//! a timeout, fetches what it wrote and cleans up; [`ops`] builds `bench` and `install`
//! on it.

pub mod device;
pub mod ops;
pub mod process;
pub mod session;
pub mod ssh;

use std::time::Duration;

pub use device::{default_target, Device, ACCEPTED_FORMS};
pub use process::Finished;
pub use session::Session;
pub use ssh::SshOptions;

/// Default limit on any one step on a device (connect, copy, run), in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 600;

/// How to reach and use devices: ssh settings, where work directories go, time limits.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// ssh/scp settings for `ssh://` devices.
    pub ssh: SshOptions,
    /// Parent of the per-run work directory on the device (default: the device's
    /// `$TMPDIR`, else `/tmp`).
    pub work_parent: Option<String>,
    /// Limit on one step (copy, run, fetch); the process is killed when it passes.
    pub timeout: Duration,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            ssh: SshOptions::default(),
            work_parent: None,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        }
    }
}

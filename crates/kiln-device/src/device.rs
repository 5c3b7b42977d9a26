//! Device names (`local`, `qemu-aarch64`, `qemu-armv7`, `ssh://user@host:port`), the CPU
//! architecture each runs, and which target's runner fits it.

use std::fmt;

use anyhow::{bail, Context, Result};
use kiln_target::emulate::{execution, Execution};
use kiln_target::TargetSpec;

use crate::DeviceOptions;

/// The device strings `Device::parse` accepts, for error messages and help texts.
pub const ACCEPTED_FORMS: &str =
    "local, qemu-aarch64, qemu-armv7 (or qemu-arm), ssh://[user@]host[:port]";

/// A place a runner can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// This machine, running a runner built for its own architecture.
    Local,
    /// qemu-user on this machine for an architecture (ELF machine name: `aarch64`, `arm`).
    Qemu(String),
    /// A board reached with the system's `ssh` and `scp`.
    Ssh(SshAddr),
}

/// `[user@]host[:port]` of an `ssh://` device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshAddr {
    /// Login user (default: ssh's own default, the local user or ssh_config's `User`).
    pub user: Option<String>,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port (default: ssh's, 22 or ssh_config's `Port`).
    pub port: Option<u16>,
}

impl SshAddr {
    /// `user@host` (or `host`) as ssh takes it; IPv6 addresses as they are.
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Local => f.write_str("local"),
            Device::Qemu(arch) if arch == "arm" => f.write_str("qemu-armv7"),
            Device::Qemu(arch) => write!(f, "qemu-{arch}"),
            Device::Ssh(a) => {
                let host = if a.host.contains(':') {
                    format!("[{}]", a.host)
                } else {
                    a.host.clone()
                };
                write!(f, "ssh://")?;
                if let Some(u) = &a.user {
                    write!(f, "{u}@")?;
                }
                write!(f, "{host}")?;
                if let Some(p) = a.port {
                    write!(f, ":{p}")?;
                }
                Ok(())
            }
        }
    }
}

impl Device {
    /// Parses a device string (see [`ACCEPTED_FORMS`]).
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "local" => return Ok(Device::Local),
            "qemu-aarch64" => return Ok(Device::Qemu("aarch64".into())),
            "qemu-armv7" | "qemu-arm" => return Ok(Device::Qemu("arm".into())),
            _ => {}
        }
        let Some(rest) = s.strip_prefix("ssh://") else {
            bail!("unknown device `{s}`; accepted forms: {ACCEPTED_FORMS}");
        };
        parse_ssh(rest)
            .with_context(|| format!("bad ssh device `{s}`; expected ssh://[user@]host[:port]"))
    }

    /// Whether the runner runs under qemu-user (timings are then not representative).
    pub fn emulated(&self) -> bool {
        matches!(self, Device::Qemu(_))
    }

    /// The device's CPU architecture as an ELF machine name (`x86_64`, `aarch64`, `arm`);
    /// asks an ssh device (`uname -m`).
    pub fn arch(&self, opts: &DeviceOptions) -> Result<String> {
        match self {
            Device::Local => Ok(std::env::consts::ARCH.to_string()),
            Device::Qemu(arch) => Ok(arch.clone()),
            Device::Ssh(addr) => {
                let out = crate::ssh::run_remote(addr, &opts.ssh, "uname -m", opts.timeout)
                    .with_context(|| format!("cannot reach {self}"))?;
                let machine = out.stdout_text();
                let machine = machine.trim();
                if !out.success() {
                    bail!(
                        "`uname -m` failed on {self} ({}): {}",
                        out.describe_status(),
                        out.stderr_tail()
                    );
                }
                elf_machine(machine)
                    .map(String::from)
                    .with_context(|| format!("{self} reports CPU `{machine}` (uname -m), which no kiln target supports (x86_64, aarch64, armv7)"))
            }
        }
    }

    /// Checks that this device, whose CPU is `arch`, can run runners built for `spec`.
    pub fn check_runs(&self, arch: &str, spec: &TargetSpec) -> Result<()> {
        let ok = match self {
            Device::Local => execution(spec) == Execution::Native,
            Device::Qemu(a) => {
                spec.elf.machine == *a
                    && execution(spec) == Execution::Emulated
                    && spec.emulate.is_some()
            }
            Device::Ssh(_) => spec.elf.machine == arch,
        };
        if !ok {
            bail!(
                "device {self} runs {arch} but target `{}` is for {}: pick a target for {arch} \
                 (e.g. --target {}) or another device",
                spec.name,
                spec.elf.machine,
                default_target_name(arch).unwrap_or("?")
            );
        }
        Ok(())
    }
}

fn parse_ssh(rest: &str) -> Result<Device> {
    let rest = rest.trim_end_matches('/');
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, rest),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').context("`[` without `]` in the host")?;
        match after.strip_prefix(':') {
            Some(p) => (h.to_string(), Some(p)),
            None if after.is_empty() => (h.to_string(), None),
            None => bail!("unexpected `{after}` after the host"),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .with_context(|| format!("port `{p}` is not a number from 1 to 65535"))
        })
        .transpose()?;
    let safe = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:%".contains(c))
    };
    if !safe(&host) {
        bail!("host `{host}` is empty or has characters a host name cannot have");
    }
    if let Some(u) = &user {
        if !safe(u) || u.contains(':') {
            bail!("user `{u}` is empty or has characters a user name cannot have");
        }
    }
    Ok(Device::Ssh(SshAddr { user, host, port }))
}

/// Maps `uname -m` to the ELF machine name targets use.
fn elf_machine(uname: &str) -> Option<&'static str> {
    match uname {
        "x86_64" | "amd64" => Some("x86_64"),
        "aarch64" | "arm64" | "aarch64_be" => Some("aarch64"),
        m if m.starts_with("armv7") || m.starts_with("armv8l") => Some("arm"),
        _ => None,
    }
}

/// The baseline target name for an ELF machine (`aarch64` → `aarch64-linux`).
fn default_target_name(arch: &str) -> Option<&'static str> {
    match arch {
        "x86_64" => Some("x86_64-linux"),
        "aarch64" => Some("aarch64-linux"),
        "arm" => Some("armv7-linux"),
        _ => None,
    }
}

/// The target a device running `arch` gets when none is asked for: the baseline spec for
/// that architecture (`x86_64-linux`, `aarch64-linux`, `armv7-linux`), else the first spec
/// for it.
pub fn default_target<'a>(arch: &str, specs: &'a [TargetSpec]) -> Option<&'a TargetSpec> {
    default_target_name(arch)
        .and_then(|n| specs.iter().find(|s| s.name == n))
        .or_else(|| specs.iter().find(|s| s.elf.machine == arch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(Device::parse("local").unwrap(), Device::Local);
        assert_eq!(
            Device::parse("qemu-armv7").unwrap().to_string(),
            "qemu-armv7"
        );
        let d = Device::parse("ssh://pi@board.lan:2222").unwrap();
        assert_eq!(
            d,
            Device::Ssh(SshAddr {
                user: Some("pi".into()),
                host: "board.lan".into(),
                port: Some(2222)
            })
        );
        assert_eq!(d.to_string(), "ssh://pi@board.lan:2222");
        let d = Device::parse("ssh://[::1]:22").unwrap();
        assert_eq!(d.to_string(), "ssh://[::1]:22");
        assert_eq!(
            Device::parse("ssh://10.0.0.7").unwrap().to_string(),
            "ssh://10.0.0.7"
        );
    }

    #[test]
    fn refuses_bad_devices_with_the_accepted_forms() {
        let e = format!("{:#}", Device::parse("raspberrypi").unwrap_err());
        assert!(
            e.contains("unknown device `raspberrypi`") && e.contains("ssh://"),
            "{e}"
        );
        for bad in [
            "ssh://",
            "ssh://pi@",
            "ssh://host:99999",
            "ssh://host:x",
            "ssh://-oProxyCommand=x",
            "ssh://a b",
        ] {
            let e = format!("{:#}", Device::parse(bad).unwrap_err());
            assert!(e.contains("bad ssh device"), "{bad}: {e}");
        }
    }

    #[test]
    fn uname_maps_to_elf_machines() {
        assert_eq!(elf_machine("armv7l"), Some("arm"));
        assert_eq!(elf_machine("arm64"), Some("aarch64"));
        assert_eq!(elf_machine("mips"), None);
    }
}

//! What `agent run` was asked for, checked before anything is created: every
//! flag is parsed and validated here, without side effects, so that bad input
//! is one sentence and leaves nothing behind.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use crate::units::parse_size;

/// A flag that could not be taken, in one sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn bad(message: impl Into<String>) -> SpecError {
    SpecError(message.into())
}

/// How the workload reaches the network.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// The host's network namespace.
    Host,
    /// Its own network namespace with only `lo`.
    None,
    /// Its own network namespace with a veth pair to the host, addressed from
    /// 169.254.77.0/24: the workload and the host reach each other, nothing else.
    Isolated,
}

/// A block device's per-direction byte-rate caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoLimit {
    pub major: u32,
    pub minor: u32,
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
}

/// The limits of a workload, as the cgroup files take them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// CPUs of time per period (`--cpus`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Relative CPU weight, 1 to 10000 (cgroup v2's scale; 100 is the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// CPUs the workload may run on, in the kernel's list format.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpuset: Option<String>,
    /// Hard memory limit in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Most processes and threads at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Relative I/O weight, 1 to 10000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub io_limits: Vec<IoLimit>,
}

/// Everything `agent run` will do, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    pub name: String,
    pub limits: Limits,
    pub hostname: Option<String>,
    pub net: NetMode,
    pub userns: bool,
    pub rootfs: Option<PathBuf>,
    pub keep: bool,
    /// The workload's device policy (`--device`, `--device-default`).
    pub devices: Option<crate::policy::DevicePolicy>,
    /// The workload's network policy (`--net-allow`, `--net-deny`,
    /// `--net-default`, `--egress-rate`, `--ingress-rate`, `--classid`).
    pub network: Option<crate::policy::NetworkPolicy>,
    /// The program, resolved to a path (inside `rootfs` when given), then its arguments.
    pub program: PathBuf,
    pub command: Vec<OsString>,
}

/// The flags as typed, before validation.
#[derive(Debug, Clone, Default)]
pub struct RawRun {
    pub name: Option<String>,
    pub cpus: Option<String>,
    pub cpu_weight: Option<String>,
    pub cpuset: Option<String>,
    pub memory: Option<String>,
    pub pids: Option<String>,
    pub io_weight: Option<String>,
    pub io_limits: Vec<String>,
    pub hostname: Option<String>,
    pub net: Option<NetMode>,
    pub userns: bool,
    pub rootfs: Option<PathBuf>,
    pub keep: bool,
    pub devices: Vec<String>,
    pub device_default: Option<crate::policy::Action>,
    /// `--net-allow` and `--net-deny`, in command-line order.
    pub net_rules: Vec<(crate::policy::Action, String)>,
    pub net_default: Option<crate::policy::Action>,
    pub egress_rate: Option<String>,
    pub ingress_rate: Option<String>,
    pub classid: Option<String>,
    pub command: Vec<OsString>,
}

/// The network policy the `agent run` flags ask for, if any. Rules are for
/// egress, in command-line order; without `--net-default`, the default is
/// deny when every rule is an allow (an allow list) and allow otherwise.
fn network_policy(raw: &RawRun) -> Result<Option<crate::policy::NetworkPolicy>, SpecError> {
    use crate::policy::{network, Action};
    let bad = |message: String| SpecError(message);
    let mut policy = crate::policy::NetworkPolicy::default();
    let mut rules = Vec::new();
    for (action, text) in &raw.net_rules {
        let flag = if *action == Action::Allow {
            "--net-allow"
        } else {
            "--net-deny"
        };
        rules.push(
            network::parse_compact(text, *action)
                .map_err(|m| bad(format!("{flag} {text:?}: {m}")))?,
        );
    }
    if !rules.is_empty() || raw.net_default.is_some() {
        let default =
            raw.net_default
                .unwrap_or(if rules.iter().all(|r| r.action == Action::Allow) {
                    Action::Deny
                } else {
                    Action::Allow
                });
        let direction = network::Direction { default, rules };
        network::compile(&direction).map_err(|m| bad(format!("--net-allow/--net-deny: {m}")))?;
        policy.egress = Some(direction);
    }
    let rate = |flag: &str, text: &Option<String>, egress: bool| {
        text.as_deref()
            .map(|text| {
                network::parse_rate(text)
                    .map(|bits_per_s| network::Rate {
                        bits_per_s,
                        burst_bytes: network::default_burst(bits_per_s, egress),
                    })
                    .map_err(|m| bad(format!("{flag}: {m}")))
            })
            .transpose()
    };
    policy.egress_rate = rate("--egress-rate", &raw.egress_rate, true)?;
    policy.ingress_rate = rate("--ingress-rate", &raw.ingress_rate, false)?;
    policy.classid = raw
        .classid
        .as_deref()
        .map(network::parse_classid)
        .transpose()
        .map_err(|m| bad(format!("--classid: {m}")))?;
    Ok((policy != crate::policy::NetworkPolicy::default()).then_some(policy))
}

/// Facts about the host the checks need.
#[derive(Debug, Clone)]
pub struct Host {
    /// CPUs online (for `--cpus` and `--cpuset`).
    pub cpus: usize,
    /// `PATH` to look the command up in.
    pub path: OsString,
}

/// Whether `name` can name a workload (and a cgroup directory): 1 to 64 of
/// letters, digits, `-`, `_` and `.`, not starting with `.` or `-`.
#[must_use]
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parses a CPU list such as `0-1,3`; every CPU must exist on this host.
pub fn parse_cpuset(text: &str, host_cpus: usize) -> Result<String, SpecError> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>(), b.trim().parse::<usize>()),
            None => (part.trim().parse::<usize>(), part.trim().parse::<usize>()),
        };
        let (Ok(first), Ok(last)) = (first, last) else {
            return Err(bad(format!(
                "--cpuset {text:?} is not a CPU list such as 0-1,3"
            )));
        };
        if first > last {
            return Err(bad(format!(
                "--cpuset {text:?}: range {part} runs backwards"
            )));
        }
        if last >= host_cpus {
            return Err(bad(format!(
                "--cpuset {text:?}: CPU {last} does not exist (this host has CPUs 0-{})",
                host_cpus.saturating_sub(1)
            )));
        }
        cpus.push(part.trim().to_owned());
    }
    Ok(cpus.join(","))
}

/// Parses `DEV:rbps=N,wbps=N` where DEV is a block device path or `MAJOR:MINOR`
/// and N a byte rate (`10M` means 10 MiB/s).
pub fn parse_io_limit(
    text: &str,
    device_numbers: impl Fn(&Path) -> Option<(u32, u32)>,
) -> Result<IoLimit, SpecError> {
    let usage = || {
        bad(format!(
            "--io-limit {text:?} is not DEV:rbps=N,wbps=N (DEV a block device or MAJOR:MINOR)"
        ))
    };
    let split = text
        .find(":rbps=")
        .or_else(|| text.find(":wbps="))
        .ok_or_else(usage)?;
    let (device, settings) = (&text[..split], &text[split + 1..]);
    let (major, minor) = if device.starts_with('/') {
        device_numbers(Path::new(device))
            .ok_or_else(|| bad(format!("--io-limit: {device} is not a block device")))?
    } else {
        let (major, minor) = device.split_once(':').ok_or_else(usage)?;
        (
            major.parse().map_err(|_| usage())?,
            minor.parse().map_err(|_| usage())?,
        )
    };
    let mut limit = IoLimit {
        major,
        minor,
        read_bps: None,
        write_bps: None,
    };
    for setting in settings.split(',') {
        let (key, value) = setting.split_once('=').ok_or_else(usage)?;
        let rate = parse_size(value).filter(|rate| *rate > 0).ok_or_else(|| {
            bad(format!(
                "--io-limit: {key}={value} is not a positive byte rate such as 10M"
            ))
        })?;
        match key {
            "rbps" => limit.read_bps = Some(rate),
            "wbps" => limit.write_bps = Some(rate),
            _ => return Err(usage()),
        }
    }
    Ok(limit)
}

/// The device numbers of a block device node.
#[must_use]
pub fn block_device_numbers(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    Some((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

/// Finds `program` the way execvp would, inside `rootfs` when given. Returns
/// the path as the workload will see it.
pub fn resolve_program(
    program: &OsString,
    rootfs: Option<&Path>,
    path: &OsString,
) -> Result<PathBuf, SpecError> {
    use std::os::unix::fs::PermissionsExt as _;
    let outside = |inside: &Path| match rootfs {
        Some(root) => root.join(inside.strip_prefix("/").unwrap_or(inside)),
        None => inside.to_path_buf(),
    };
    let executable = |inside: &Path| {
        std::fs::metadata(outside(inside))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let shown = Path::new(program).display().to_string();
    let where_ = rootfs
        .map(|root| format!(" in {}", root.display()))
        .unwrap_or_default();
    if Path::new(program).components().count() > 1 || program.to_string_lossy().contains('/') {
        let candidate = PathBuf::from(program);
        return if executable(&candidate) {
            Ok(candidate)
        } else {
            Err(bad(format!("{shown}: no such executable{where_}")))
        };
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_absolute() && executable(candidate))
        .ok_or_else(|| {
            bad(format!(
                "{shown}: command not found{where_} (looked in PATH)"
            ))
        })
}

impl RunSpec {
    /// Checks every flag; `default_name` is used when `--name` is absent.
    pub fn new(
        raw: RawRun,
        host: &Host,
        default_name: impl FnOnce(&str) -> String,
    ) -> Result<Self, SpecError> {
        if raw.command.is_empty() {
            return Err(bad(
                "no command given: put it after --, as in `agent run -- sleep 10`",
            ));
        }
        let mut limits = Limits::default();
        if let Some(text) = &raw.cpus {
            let cpus: f64 = text
                .parse()
                .ok()
                .filter(|c: &f64| c.is_finite())
                .ok_or_else(|| {
                    bad(format!(
                        "--cpus {text:?} is not a number of CPUs such as 0.5"
                    ))
                })?;
            #[expect(clippy::cast_precision_loss, reason = "CPU counts are small")]
            let available = host.cpus as f64;
            if cpus <= 0.0 || cpus > available {
                return Err(bad(format!(
                    "--cpus {text}: must be more than 0 and at most {} (the CPUs this host has)",
                    host.cpus
                )));
            }
            // The kernel's smallest quota is 1 ms per 100 ms period.
            if cpus < 0.01 {
                return Err(bad(format!(
                    "--cpus {text}: the smallest share is 0.01 CPU"
                )));
            }
            limits.cpus = Some(cpus);
        }
        if let Some(text) = &raw.cpu_weight {
            limits.cpu_weight = Some(
                text.parse().ok().filter(|w| (1..=10_000).contains(w)).ok_or_else(|| {
                    bad(format!("--cpu-weight {text:?} is not a weight from 1 to 10000 (100 is the default)"))
                })?,
            );
        }
        if let Some(text) = &raw.cpuset {
            limits.cpuset = Some(parse_cpuset(text, host.cpus)?);
        }
        if let Some(text) = &raw.memory {
            let bytes = parse_size(text).ok_or_else(|| {
                bad(format!(
                    "--memory {text:?} is not a size such as 512M, 1G or 1048576"
                ))
            })?;
            if bytes < 1 << 20 {
                return Err(bad(format!(
                    "--memory {text}: the smallest limit the agent sets is 1M"
                )));
            }
            limits.memory_bytes = Some(bytes);
        }
        if let Some(text) = &raw.pids {
            limits.pids = Some(text.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                bad(format!(
                    "--pids {text:?} is not a number of processes (at least 1)"
                ))
            })?);
        }
        if let Some(text) = &raw.io_weight {
            limits.io_weight = Some(
                text.parse()
                    .ok()
                    .filter(|w| (1..=10_000).contains(w))
                    .ok_or_else(|| {
                        bad(format!(
                            "--io-weight {text:?} is not a weight from 1 to 10000"
                        ))
                    })?,
            );
        }
        for text in &raw.io_limits {
            limits
                .io_limits
                .push(parse_io_limit(text, block_device_numbers)?);
        }
        if let Some(hostname) = &raw.hostname {
            let ok = !hostname.is_empty()
                && hostname.len() <= 64
                && hostname.split('.').all(|label| {
                    !label.is_empty()
                        && !label.starts_with('-')
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !ok {
                return Err(bad(format!("--hostname {hostname:?} is not a host name (letters, digits, - and dots, at most 64)")));
            }
        }
        if let Some(rootfs) = &raw.rootfs {
            if !rootfs.is_dir() {
                return Err(bad(format!(
                    "--rootfs {}: not a directory",
                    rootfs.display()
                )));
            }
            if !rootfs.join("proc").is_dir() {
                return Err(bad(format!(
                    "--rootfs {}: it has no /proc directory to mount the workload's /proc on",
                    rootfs.display()
                )));
            }
        }
        let devices = if raw.devices.is_empty() && raw.device_default.is_none() {
            None
        } else {
            let mut rules = Vec::new();
            for text in &raw.devices {
                rules.push(
                    crate::policy::devices::parse_rule(text, crate::policy::Action::Allow)
                        .map_err(|message| bad(format!("--device {text:?}: {message}")))?,
                );
            }
            Some(crate::policy::DevicePolicy {
                default: raw.device_default.unwrap_or(crate::policy::Action::Deny),
                rules,
            })
        };
        let network = network_policy(&raw)?;
        let rootfs = raw
            .rootfs
            .as_deref()
            .map(std::fs::canonicalize)
            .transpose()
            .map_err(|e| bad(format!("--rootfs: {e}")))?;
        let program = resolve_program(&raw.command[0], rootfs.as_deref(), &host.path)?;
        let name = match raw.name {
            Some(name) => name,
            None => default_name(
                &Path::new(&raw.command[0])
                    .file_name()
                    .map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned()),
            ),
        };
        if !valid_name(&name) {
            return Err(bad(format!(
                "--name {name:?} is not a workload name (1 to 64 letters, digits, -, _ and ., not starting with . or -)"
            )));
        }
        Ok(Self {
            name,
            limits,
            hostname: raw.hostname,
            net: raw.net.unwrap_or(NetMode::Host),
            userns: raw.userns,
            rootfs,
            keep: raw.keep,
            devices,
            network,
            program,
            command: raw.command,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            cpus: 2,
            path: OsString::from("/usr/local/bin:/usr/bin:/bin"),
        }
    }

    fn raw(command: &[&str]) -> RawRun {
        RawRun {
            command: command.iter().map(OsString::from).collect(),
            ..RawRun::default()
        }
    }

    fn error(raw: RawRun) -> String {
        RunSpec::new(raw, &host(), |_| "x".into()).unwrap_err().0
    }

    #[test]
    fn a_full_command_line_is_taken() {
        let mut r = raw(&["sleep", "1"]);
        r.name = Some("web-1".into());
        r.cpus = Some("0.5".into());
        r.cpu_weight = Some("200".into());
        r.cpuset = Some("0-1".into());
        r.memory = Some("512M".into());
        r.pids = Some("100".into());
        r.io_weight = Some("500".into());
        r.io_limits = vec!["8:0:rbps=10M,wbps=1M".into()];
        r.hostname = Some("box.example".into());
        r.net = Some(NetMode::Isolated);
        let spec = RunSpec::new(r, &host(), |_| unreachable!()).unwrap();
        assert_eq!(spec.name, "web-1");
        assert_eq!(spec.program, PathBuf::from("/usr/bin/sleep"));
        assert_eq!(spec.limits.cpus, Some(0.5));
        assert_eq!(spec.limits.memory_bytes, Some(512 << 20));
        assert_eq!(spec.limits.cpuset.as_deref(), Some("0-1"));
        assert_eq!(
            spec.limits.io_limits,
            [IoLimit {
                major: 8,
                minor: 0,
                read_bps: Some(10 << 20),
                write_bps: Some(1 << 20)
            }]
        );
        assert_eq!(spec.net, NetMode::Isolated);
    }

    #[test]
    fn the_default_name_comes_from_the_command() {
        let spec = RunSpec::new(raw(&["/usr/bin/sleep", "1"]), &host(), |cmd| {
            format!("{cmd}-1f2e")
        })
        .unwrap();
        assert_eq!(spec.name, "sleep-1f2e");
    }

    #[test]
    fn each_bad_flag_is_one_sentence_naming_it() {
        let with = |f: fn(&mut RawRun)| {
            let mut r = raw(&["sleep", "1"]);
            f(&mut r);
            error(r)
        };
        assert_eq!(
            with(|r| r.memory = Some("5QB".into())),
            r#"--memory "5QB" is not a size such as 512M, 1G or 1048576"#
        );
        assert_eq!(
            with(|r| r.cpus = Some("0".into())),
            "--cpus 0: must be more than 0 and at most 2 (the CPUs this host has)"
        );
        assert_eq!(
            with(|r| r.cpus = Some("-1".into())),
            "--cpus -1: must be more than 0 and at most 2 (the CPUs this host has)"
        );
        assert_eq!(
            with(|r| r.cpus = Some("3".into())),
            "--cpus 3: must be more than 0 and at most 2 (the CPUs this host has)"
        );
        assert_eq!(
            with(|r| r.cpus = Some("lots".into())),
            r#"--cpus "lots" is not a number of CPUs such as 0.5"#
        );
        assert_eq!(
            with(|r| r.cpuset = Some("0-4".into())),
            r#"--cpuset "0-4": CPU 4 does not exist (this host has CPUs 0-1)"#
        );
        assert_eq!(
            with(|r| r.pids = Some("0".into())),
            r#"--pids "0" is not a number of processes (at least 1)"#
        );
        assert_eq!(
            with(|r| r.name = Some("../x".into()))
                .split(" is not")
                .next(),
            Some(r#"--name "../x""#)
        );
        assert_eq!(
            with(|r| r.io_limits = vec!["sda:fast".into()]),
            r#"--io-limit "sda:fast" is not DEV:rbps=N,wbps=N (DEV a block device or MAJOR:MINOR)"#
        );
        assert_eq!(
            with(|r| r.rootfs = Some("/nonexistent-root".into())),
            "--rootfs /nonexistent-root: not a directory"
        );
        assert_eq!(
            error(raw(&["no-such-command-xyz"])),
            "no-such-command-xyz: command not found (looked in PATH)"
        );
        assert_eq!(error(raw(&["./nope"])), "./nope: no such executable");
        assert_eq!(
            error(raw(&[])),
            "no command given: put it after --, as in `agent run -- sleep 10`"
        );
        assert_eq!(
            with(|r| r.devices = vec!["c x:3 r".into()]),
            r#"--device "c x:3 r": major "x" is neither a number nor *"#
        );
    }

    #[test]
    fn cpu_lists_are_checked_against_the_host() {
        assert_eq!(parse_cpuset("0-1", 2), Ok("0-1".into()));
        assert_eq!(parse_cpuset("1,0", 2), Ok("1,0".into()));
        assert!(parse_cpuset("1-0", 2)
            .unwrap_err()
            .0
            .contains("runs backwards"));
        assert!(parse_cpuset("a", 2).is_err());
    }

    #[test]
    fn io_limits_take_device_paths() {
        let limit = parse_io_limit("/dev/vda:wbps=1M", |p| {
            (p == Path::new("/dev/vda")).then_some((254, 0))
        })
        .unwrap();
        assert_eq!(
            limit,
            IoLimit {
                major: 254,
                minor: 0,
                read_bps: None,
                write_bps: Some(1 << 20)
            }
        );
        let err = parse_io_limit("/dev/null:rbps=1M", |_| None).unwrap_err();
        assert_eq!(err.0, "--io-limit: /dev/null is not a block device");
    }

    #[test]
    fn names_are_safe_directory_names() {
        assert!(valid_name("web_1.prod-2"));
        for name in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(name), "{name:?}");
        }
    }
}

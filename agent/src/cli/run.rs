//! `agent run`: start a command in its own cgroups and namespaces, wait for
//! it, and clean up after it.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use clap::Args;
use nix::{
    sys::{
        signal::{kill, SigSet, SigmaskHow, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};

use crate::{
    units,
    workload::{
        cgroups::{self, WorkloadCgroups},
        net, process,
        registry::{self, Record, DEFAULT_STATE_DIR},
        spec::{Host, NetMode, RawRun, RunSpec},
    },
};

/// Exit status when the agent itself fails (bad flags, set-up), as `docker run` uses it.
pub const EXIT_AGENT_FAILED: u8 = 125;
/// Exit status when the command was found but could not be executed.
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit status when the command was not found.
pub const EXIT_NOT_FOUND: u8 = 127;

/// Run a command in its own cgroups and namespaces.
///
/// The command runs as PID 1 of a new PID namespace (with its own /proc), in
/// new mount, UTS, IPC and cgroup namespaces, under the limits given, in the
/// cgroup <cgroup-parent>/<name> of every hierarchy. stdin, stdout and stderr
/// pass through; the exit status is the command's (128+n when killed by
/// signal n). SIGINT and SIGTERM are forwarded; a second one kills the
/// workload. Its cgroups are removed when it ends, unless --keep.
///
/// As PID 1, a command that installs no handler for SIGTERM or SIGINT is
/// not ended by them; `agent stop` escalates to SIGKILL.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  agent run --memory 512M --cpus 0.5 -- make -j4
  agent run --name web --net isolated --hostname web -- python3 -m http.server
  agent run --pids 100 --userns --rootfs ./rootfs -- /bin/sh

Exit status: the command's; 125 when the agent fails (bad flags, set-up),
126 when the command cannot be executed, 127 when it is not found.")]
pub struct RunArgs {
    /// Name of the workload (default: the command's name and a random suffix).
    #[arg(long)]
    pub name: Option<String>,
    /// CPU time, in CPUs (0.5 = half of one CPU per 100 ms period).
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<String>,
    /// Relative CPU weight, 1 to 10000 (100 is the default).
    #[arg(long, value_name = "W")]
    pub cpu_weight: Option<String>,
    /// CPUs it may run on, such as 0-1,3.
    #[arg(long, value_name = "LIST")]
    pub cpuset: Option<String>,
    /// Hard memory limit, such as 512M or 1G; past it the OOM killer ends it.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Most processes (and threads) at once; past it fork fails with EAGAIN.
    #[arg(long, value_name = "N")]
    pub pids: Option<String>,
    /// Relative I/O weight, 1 to 10000.
    #[arg(long, value_name = "W")]
    pub io_weight: Option<String>,
    /// Byte-rate caps on a block device: DEV:rbps=N,wbps=N (DEV a path or MAJOR:MINOR).
    #[arg(long, value_name = "DEV:rbps=N,wbps=N")]
    pub io_limit: Vec<String>,
    /// Host name inside.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// host: the host's network; none: only lo; isolated: a veth to the host only.
    #[arg(long, value_enum, default_value = "host")]
    pub net: NetMode,
    /// Run in a new user namespace: root inside is uid 100000 outside.
    #[arg(long)]
    pub userns: bool,
    /// Directory to use as the root file system (it needs a /proc directory).
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// Keep the cgroups after the workload ends.
    #[arg(long)]
    pub keep: bool,
    /// Allow a device, as devices.allow writes it: `c 1:3 rw` (TYPE a, b or c;
    /// MAJOR:MINOR numbers or *; ACCESS of r, w, m). Repeat for more; the
    /// first matching rule decides. Enforced by an eBPF program on the
    /// workload's cgroup.
    #[arg(long, value_name = "RULE")]
    pub device: Vec<String>,
    /// What happens to devices no --device allows (default: deny once any
    /// --device is given).
    #[arg(long, value_name = "allow|deny", value_parser = parse_action)]
    pub device_default: Option<crate::policy::Action>,
    /// Allow egress to CIDR[:PORTS][/PROTO], such as 10.0.0.0/8:443/tcp,
    /// [fd00::/8]:53/udp, 192.0.2.7 or any:22/tcp (PORTS a port or a range
    /// 8000-9000; PROTO tcp, udp, icmp or any). Rules apply in command-line
    /// order with --net-deny; the first that matches decides.
    #[arg(long, value_name = "CIDR[:PORTS][/PROTO]")]
    pub net_allow: Vec<String>,
    /// Deny egress to CIDR[:PORTS][/PROTO] (as --net-allow).
    #[arg(long, value_name = "CIDR[:PORTS][/PROTO]")]
    pub net_deny: Vec<String>,
    /// What happens to egress no rule matches (default: deny when every rule
    /// is an --net-allow, allow otherwise).
    #[arg(long, value_name = "allow|deny", value_parser = parse_action)]
    pub net_default: Option<crate::policy::Action>,
    /// Cap the bandwidth the workload sends, such as 50mbit or 1gbit (a
    /// token bucket in the kernel: over it TCP is told to slow down, then
    /// packets are dropped).
    #[arg(long, value_name = "RATE")]
    pub egress_rate: Option<String>,
    /// Cap the bandwidth the workload receives (over it, packets are dropped).
    #[arg(long, value_name = "RATE")]
    pub ingress_rate: Option<String>,
    /// net_cls class id MAJOR:MINOR (hex, as tc writes it): the workload's
    /// packets get this priority, so an HTB qdisc files them into that class.
    #[arg(long, value_name = "MAJOR:MINOR")]
    pub classid: Option<String>,
    /// --net-allow and --net-deny in command-line order (filled in by
    /// [`RunArgs::order_net_rules`]).
    #[arg(skip)]
    pub net_rules: Vec<(crate::policy::Action, String)>,
    #[command(flatten)]
    pub pins: super::PinArgs,
    /// Parent of the workload's cgroup in every hierarchy, relative to its root.
    #[arg(long, value_name = "PATH", default_value = "agent")]
    pub cgroup_parent: String,
    /// Where running workloads are recorded (for ps, pause, resume, stop, stats).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// An error with the exit status `agent run` reports it with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub status: u8,
    pub message: String,
}

fn fail(status: u8, message: impl std::fmt::Display) -> anyhow::Error {
    Failure {
        status,
        message: message.to_string(),
    }
    .into()
}

/// A cloned workload process that is killed and reaped unless it started.
struct ChildGuard(Option<u32>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let pid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

fn parse_action(text: &str) -> Result<crate::policy::Action, String> {
    match text {
        "allow" => Ok(crate::policy::Action::Allow),
        "deny" => Ok(crate::policy::Action::Deny),
        other => Err(format!("{other:?} is neither allow nor deny")),
    }
}

impl RunArgs {
    /// Puts --net-allow and --net-deny into `net_rules` in the order they
    /// were given (clap keeps each flag's values apart).
    pub fn order_net_rules(&mut self, matches: &clap::ArgMatches) {
        use crate::policy::Action;
        let mut rules: Vec<(usize, Action, String)> = Vec::new();
        for (id, action, values) in [
            ("net_allow", Action::Allow, &self.net_allow),
            ("net_deny", Action::Deny, &self.net_deny),
        ] {
            let indices: Vec<usize> = matches
                .indices_of(id)
                .map(Iterator::collect)
                .unwrap_or_default();
            for (i, value) in values.iter().enumerate() {
                let at = indices.get(i).copied().unwrap_or(usize::MAX);
                rules.push((at, action, value.clone()));
            }
        }
        rules.sort_by_key(|(at, _, _)| *at);
        self.net_rules = rules.into_iter().map(|(_, a, v)| (a, v)).collect();
    }
}

/// A workload's device and network policies in force: the programs on its
/// cgroup and the rules in the maps; removed on drop.
struct WorkloadPolicy {
    devices: crate::loader::DeviceMaps,
    network: crate::loader::NetworkMaps,
    _guard: crate::loader::WorkloadGuard,
    cgroup_id: u64,
    version: u32,
    device_policy: Option<crate::policy::DevicePolicy>,
    network_policy: Option<crate::policy::NetworkPolicy>,
}

impl WorkloadPolicy {
    fn install(cgroup: &Path, pin_dir: &Path, spec: &RunSpec) -> anyhow::Result<Option<Self>> {
        let guards = crate::loader::Guards {
            devices: spec.devices.is_some(),
            network: spec.network.is_some(),
        };
        if guards == crate::loader::Guards::default() {
            return Ok(None);
        }
        let (guard, devices, network) =
            crate::loader::guard_workload(cgroup, Some(pin_dir), guards)?;
        let cgroup_id = crate::cgroup::cgroup_id(cgroup)?;
        let version =
            crate::enforce::RUN_VERSIONS | (std::process::id() & !crate::enforce::RUN_VERSIONS);
        let mut installed = Self {
            devices,
            network,
            _guard: guard,
            cgroup_id,
            version,
            device_policy: None,
            network_policy: None,
        };
        if let Some(policy) = &spec.devices {
            crate::enforce::set_for_run(&mut installed.devices, cgroup_id, version, policy)?;
            installed.device_policy = Some(policy.clone());
        }
        if let Some(policy) = &spec.network {
            crate::enforce::set_for_run(&mut installed.network, cgroup_id, version, policy)?;
            installed.network_policy = Some(policy.clone());
        }
        Ok(Some(installed))
    }
}

impl Drop for WorkloadPolicy {
    fn drop(&mut self) {
        if let Some(policy) = &self.device_policy {
            crate::enforce::clear_for_run(&mut self.devices, self.cgroup_id, self.version, policy);
        }
        if let Some(policy) = &self.network_policy {
            crate::enforce::clear_for_run(&mut self.network, self.cgroup_id, self.version, policy);
        }
    }
}

fn default_name(command: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let suffix = (nanos ^ std::process::id().rotate_left(16)) & 0xffff;
    let base: String = command
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect();
    format!(
        "{}-{suffix:04x}",
        if base.is_empty() { "run" } else { &base }
    )
}

pub fn run(args: &RunArgs) -> anyhow::Result<u8> {
    super::require_root("agent run", super::FOR_WORKLOADS)
        .map_err(|e| fail(EXIT_AGENT_FAILED, e))?;
    registry::collect_garbage(&args.state_dir);
    let host = Host {
        cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        path: std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
    };
    let raw = RawRun {
        name: args.name.clone(),
        cpus: args.cpus.clone(),
        cpu_weight: args.cpu_weight.clone(),
        cpuset: args.cpuset.clone(),
        memory: args.memory.clone(),
        pids: args.pids.clone(),
        io_weight: args.io_weight.clone(),
        io_limits: args.io_limit.clone(),
        hostname: args.hostname.clone(),
        net: Some(args.net),
        userns: args.userns,
        rootfs: args.rootfs.clone(),
        keep: args.keep,
        devices: args.device.clone(),
        device_default: args.device_default,
        net_rules: args.net_rules.clone(),
        net_default: args.net_default,
        egress_rate: args.egress_rate.clone(),
        ingress_rate: args.ingress_rate.clone(),
        classid: args.classid.clone(),
        command: args.command.clone(),
    };
    let spec = RunSpec::new(raw, &host, default_name).map_err(|e| {
        let status = if e.0.contains("command not found") || e.0.contains("no such executable") {
            EXIT_NOT_FOUND
        } else {
            EXIT_AGENT_FAILED
        };
        fail(status, e)
    })?;
    if !args
        .cgroup_parent
        .trim_matches('/')
        .split('/')
        .all(crate::workload::spec::valid_name)
    {
        return Err(fail(
            EXIT_AGENT_FAILED,
            format!(
                "--cgroup-parent {:?} is not a relative cgroup path",
                args.cgroup_parent
            ),
        ));
    }
    if registry::in_use(&args.state_dir, &spec.name) {
        return Err(fail(
            EXIT_AGENT_FAILED,
            format!(
                "a workload named {:?} is already running: pick another --name, or see `agent ps`",
                spec.name
            ),
        ));
    }

    // Block the signals we handle before the child exists, so none is lost;
    // the child unblocks them before it executes the command.
    let mut signals = SigSet::empty();
    for signal in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGCHLD,
    ] {
        signals.add(signal);
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .map_err(|e| fail(EXIT_AGENT_FAILED, format!("blocking signals failed: {e}")))?;

    let mut cgroups = WorkloadCgroups::create(&args.cgroup_parent, &spec.name, &spec.limits)
        .map_err(|e| fail(EXIT_AGENT_FAILED, e))?;
    let config = process::Config {
        program: spec.program.clone(),
        args: spec.command.clone(),
        hostname: spec.hostname.clone(),
        rootfs: spec.rootfs.clone(),
        userns: spec.userns,
        new_netns: spec.net != NetMode::Host,
    };
    let held = process::spawn(&config).map_err(|e| fail(EXIT_AGENT_FAILED, e))?;
    let pid = held.pid();
    let mut guard = ChildGuard(Some(pid));
    if spec.userns {
        held.map_ids().map_err(|e| fail(EXIT_AGENT_FAILED, e))?;
    }
    cgroups.join(pid).map_err(|e| fail(EXIT_AGENT_FAILED, e))?;
    // The device and network policies are in force before the command runs.
    let policies = WorkloadPolicy::install(&cgroups.placement().v2, &args.pins.pin_dir, &spec)
        .map_err(|e| fail(EXIT_AGENT_FAILED, e))?;
    let veth =
        net::setup(spec.net, pid, &args.state_dir).map_err(|e| fail(EXIT_AGENT_FAILED, e))?;
    let record = Record {
        name: spec.name.clone(),
        pid,
        agent_pid: std::process::id(),
        started_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
        command: spec
            .command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        cgroups: cgroups.placement().clone(),
        limits: spec.limits.clone(),
        net: spec.net,
        address: veth.as_ref().map(|v| v.address.to_string()),
        host_address: veth.as_ref().map(|v| v.host_address.to_string()),
    };
    registry::write(&args.state_dir, &record).map_err(|e| fail(EXIT_AGENT_FAILED, e))?;
    let forget = |state_dir: &Path| registry::remove(state_dir, &spec.name);
    if let Err(err) = held.start() {
        forget(&args.state_dir);
        let status = if err.to_string().contains("executing") {
            EXIT_CANNOT_EXECUTE
        } else {
            EXIT_AGENT_FAILED
        };
        return Err(fail(status, err));
    }
    guard.0 = None;
    if let Some(veth) = &veth {
        log::info!(
            "{}: reachable at {} (the host is {} on {})",
            spec.name,
            veth.address,
            veth.host_address,
            veth.host_device
        );
    }

    let status = wait(
        Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
        &signals,
    );
    forget(&args.state_dir);
    drop(policies);
    let oom_killed = cgroups::oom_kills(cgroups.placement()).unwrap_or(0) > 0;
    if spec.keep {
        cgroups.disarm();
        log::info!(
            "{}: keeping its cgroups ({})",
            spec.name,
            cgroups.placement().v2.display()
        );
    } else if let Err(err) = cgroups.remove() {
        log::warn!("{}: removing its cgroups failed: {err}", spec.name);
    }
    if oom_killed {
        let limit = spec.limits.memory_bytes.map_or_else(String::new, |bytes| {
            #[expect(clippy::cast_precision_loss, reason = "display")]
            let shown = units::bytes(bytes as f64);
            format!(" of {shown} (--memory)")
        });
        eprintln!("agent: workload {} was killed by the kernel's OOM killer: it reached its memory limit{limit}", spec.name);
    }
    Ok(status)
}

/// Waits for the workload, forwarding signals; returns its exit status as a
/// shell reports it.
fn wait(child: Pid, signals: &SigSet) -> u8 {
    let mut interrupts = 0;
    loop {
        let mut info: libc::siginfo_t = unsafe_zeroed_siginfo();
        // SAFETY: a valid signal set and a zeroed siginfo to fill.
        let signo = unsafe { libc::sigwaitinfo(signals.as_ref(), &raw mut info) };
        if signo < 0 {
            continue;
        }
        if signo == libc::SIGCHLD {
            loop {
                match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => return u8::try_from(code).unwrap_or(1),
                    Ok(WaitStatus::Signaled(_, signal, _)) => {
                        return 128u8.saturating_add(signal as u8)
                    }
                    Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => break,
                    Ok(_) => {}
                    Err(_) => return EXIT_AGENT_FAILED,
                }
            }
            continue;
        }
        let Ok(signal) = Signal::try_from(signo) else {
            continue;
        };
        interrupts += u32::from(matches!(signal, Signal::SIGINT | Signal::SIGTERM));
        if interrupts >= 2 {
            eprintln!("agent: second {signal}: killing the workload");
            let _ = kill(child, Signal::SIGKILL);
        } else if info.si_code != libc::SI_KERNEL {
            // A signal from the terminal (SI_KERNEL) already reached the
            // workload, which is in the same process group.
            let _ = kill(child, signal);
        }
    }
}

fn unsafe_zeroed_siginfo() -> libc::siginfo_t {
    // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

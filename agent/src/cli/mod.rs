//! The command line: one file per subcommand.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

pub mod control;
pub mod daemon;
pub mod events;
pub mod policy;
pub mod ps;
pub mod run;
pub mod stats;
pub mod table;
pub mod top;

/// Per-cgroup observability with eBPF, and workloads in their own cgroups and namespaces.
///
/// The agent attaches eBPF programs at the root of the cgroup v2 hierarchy and
/// counts every packet of every socket below it by the socket's cgroup.
/// `agent daemon` keeps the programs attached and pins their maps; `agent stats`
/// and `agent top` read them. `agent run` starts a command under limits in its
/// own cgroups and namespaces; `ps`, `pause`, `resume` and `stop` manage it.
#[derive(Debug, Parser)]
#[command(name = "agent", version, propagate_version = true)]
#[command(after_help = "\
Examples:
  agent daemon                      count every cgroup of this host, until Ctrl-C
  agent stats --json | jq .         one snapshot of the daemon's counters, as JSON
  agent top                         a live table of the busiest cgroups
  agent run --memory 64M -- CMD     run CMD in its own cgroups and namespaces

Needs root (to load eBPF programs and to read their pins).")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Daemon(Box<daemon::DaemonArgs>),
    Stats(stats::StatsArgs),
    Top(top::TopArgs),
    Run(Box<run::RunArgs>),
    Ps(ps::PsArgs),
    /// Freeze every process of a workload started by `agent run`.
    Pause(control::Target),
    /// Thaw a paused workload.
    Resume(control::Target),
    Stop(control::StopArgs),
    Policy(policy::PolicyArgs),
    Events(events::EventsArgs),
}

/// Where a daemon's pins live.
#[derive(Debug, Clone, Args)]
pub struct PinArgs {
    /// bpffs directory for the daemon's pinned maps and links (bpffs is
    /// mounted at /sys/fs/bpf first when absent).
    #[arg(long, value_name = "DIR", default_value = crate::bpffs::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Where `agent run` records its workloads (their names appear in snapshots).
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// Directory of `agent run`'s workload records.
    #[arg(long, value_name = "DIR", default_value = crate::workload::registry::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// Which cgroups to watch, when this command loads the programs itself.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// cgroup v2 directory to attach to; every cgroup below it is counted.
    /// Default: the cgroup2 mount in /proc/self/mountinfo (/sys/fs/cgroup on
    /// unified hosts, /sys/fs/cgroup/unified on hybrid ones).
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,

    /// How many cgroups the overflow map holds. Each CPU counts up to 512
    /// cgroups in its slot table; cgroups whose slot another cgroup holds go
    /// to the overflow map, and traffic beyond its capacity is reported as
    /// "uncounted".
    #[arg(long, value_name = "N", default_value_t = common::DEFAULT_MAX_CGROUPS,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_cgroups: u32,

    /// Slots per CPU (a power of two up to 512). Only tests lower it, to make
    /// cgroups collide.
    #[arg(long, value_name = "N", default_value_t = common::NET_SLOTS as u32, hide = true)]
    pub net_slots: u32,
}

/// Parses a duration such as `1s`, `500ms` or a plain number of seconds (`0.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Duration::from_secs_f64(seconds),
        Ok(_) => return Err(format!("{text:?} is not a positive number of seconds")),
        Err(_) => humantime::parse_duration(text).map_err(|err| {
            format!("{text:?} is not a duration such as 1s, 500ms or 0.5 ({err})")
        })?,
    };
    if duration < Duration::from_millis(10) {
        return Err(format!(
            "{text:?} is shorter than the shortest interval, 10ms"
        ));
    }
    Ok(duration)
}

/// Stops with a clear sentence when not root: everything the agent does with
/// eBPF needs it, and the kernel's bare EPERM would not say so.
pub fn require_root(what: &str, why: &str) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        anyhow::bail!("{what} needs root to {why}: run it with sudo")
    }
}

/// Why the eBPF commands need root.
pub const FOR_EBPF: &str = "load and read eBPF programs";
/// Why the workload commands need root.
pub const FOR_WORKLOADS: &str = "create cgroups and namespaces";

/// A one-line progress note on stderr for slow set-up steps (only on a terminal).
pub fn progress(message: &str) {
    use std::io::IsTerminal as _;
    if std::io::stderr().is_terminal() {
        eprintln!("{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_or_seconds() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("0")
            .unwrap_err()
            .contains("not a positive number"));
        assert!(parse_duration("5QB")
            .unwrap_err()
            .contains("is not a duration"));
        assert!(parse_duration("1ms")
            .unwrap_err()
            .contains("shortest interval"));
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}

//! `agent pause`, `agent resume` and `agent stop`: act on a running workload.

use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use clap::Args;

use crate::sys::pid_running;
use nix::{sys::signal::Signal, unistd::Pid};

use crate::workload::{
    cgroups,
    registry::{self, DEFAULT_STATE_DIR},
};

/// Which workload.
#[derive(Debug, Args)]
pub struct Target {
    /// The workload's name (see `agent ps`).
    pub name: String,
    /// Where running workloads are recorded.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// Stop a workload: SIGTERM, then SIGKILL after a grace period.
#[derive(Debug, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub target: Target,
    /// How long to wait after SIGTERM before SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = super::parse_duration)]
    pub timeout: Duration,
}

/// Freeze every process of a workload (the cgroup freezer).
pub fn pause(target: &Target) -> anyhow::Result<()> {
    super::require_root("agent pause", super::FOR_WORKLOADS)?;
    let record = registry::find(&target.state_dir, &target.name)?;
    cgroups::set_frozen(&record.cgroups, true)?;
    println!("paused {}", record.name);
    Ok(())
}

/// Thaw a paused workload.
pub fn resume(target: &Target) -> anyhow::Result<()> {
    super::require_root("agent resume", super::FOR_WORKLOADS)?;
    let record = registry::find(&target.state_dir, &target.name)?;
    cgroups::set_frozen(&record.cgroups, false)?;
    println!("resumed {}", record.name);
    Ok(())
}

/// Ends a workload and waits until its `agent run` has cleaned up.
pub fn stop(args: &StopArgs) -> anyhow::Result<()> {
    super::require_root("agent stop", super::FOR_WORKLOADS)?;
    let record = registry::find(&args.target.state_dir, &args.target.name)?;
    let pid = Pid::from_raw(i32::try_from(record.pid)?);
    let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
    // A frozen workload cannot act on SIGTERM until thawed.
    if cgroups::is_frozen(&record.cgroups) {
        cgroups::set_frozen(&record.cgroups, false)?;
    }
    let deadline = Instant::now() + args.timeout;
    while pid_running(record.pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let killed = pid_running(record.pid);
    if killed {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    }
    // Its `agent run` removes the cgroups and the record.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_running(record.agent_pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    println!(
        "stopped {}{}",
        record.name,
        if killed {
            " (killed after the grace period)"
        } else {
            ""
        }
    );
    Ok(())
}

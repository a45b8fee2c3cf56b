//! `agent ps`: the workloads `agent run` is running.

use std::path::PathBuf;

use clap::Args;

use crate::{
    units,
    workload::{
        cgroups,
        registry::{self, DEFAULT_STATE_DIR},
        spec::Limits,
    },
};

/// List the running workloads started by `agent run`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print JSON (an array of objects) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where running workloads are recorded.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// `cpus=0.5 mem=64.0 MiB pids=20`, or `-` without limits.
#[must_use]
pub fn describe(limits: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(cpus) = limits.cpus {
        parts.push(format!("cpus={cpus}"));
    }
    if let Some(weight) = limits.cpu_weight {
        parts.push(format!("cpu-weight={weight}"));
    }
    if let Some(cpuset) = &limits.cpuset {
        parts.push(format!("cpuset={cpuset}"));
    }
    if let Some(bytes) = limits.memory_bytes {
        #[expect(clippy::cast_precision_loss, reason = "display")]
        parts.push(format!(
            "memory={}",
            units::bytes(bytes as f64).replace(' ', "")
        ));
    }
    if let Some(pids) = limits.pids {
        parts.push(format!("pids={pids}"));
    }
    if let Some(weight) = limits.io_weight {
        parts.push(format!("io-weight={weight}"));
    }
    for limit in &limits.io_limits {
        parts.push(format!("io={}:{}", limit.major, limit.minor));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

pub fn run(args: &PsArgs) -> anyhow::Result<()> {
    registry::collect_garbage(&args.state_dir);
    let running: Vec<_> = registry::all(&args.state_dir)
        .into_iter()
        .filter(registry::Record::is_alive)
        .collect();
    if args.json {
        let objects: Vec<_> = running
            .iter()
            .map(|record| {
                let mut value = serde_json::to_value(record).unwrap_or_default();
                value["state"] = if cgroups::is_frozen(&record.cgroups) {
                    "paused"
                } else {
                    "running"
                }
                .into();
                value
            })
            .collect();
        println!("{}", serde_json::to_string(&objects)?);
        return Ok(());
    }
    println!(
        "{:<20} {:>8} {:<8} {:<40} {:<30} COMMAND",
        "NAME", "PID", "STATE", "CGROUP (v2)", "LIMITS"
    );
    for record in &running {
        let state = if cgroups::is_frozen(&record.cgroups) {
            "paused"
        } else {
            "running"
        };
        println!(
            "{:<20} {:>8} {:<8} {:<40} {:<30} {}",
            record.name,
            record.pid,
            state,
            record.cgroups.v2.display(),
            describe(&record.limits),
            record.command.join(" ")
        );
    }
    Ok(())
}

//! `cargo xtask bench <which>`: runs the release build of `agent-bench`
//! (tests/src/bin/agent-bench.rs, which reuses the integration tests' harness)
//! and writes its table under bench/results/ with the date.
use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};

#[derive(Subcommand, Clone)]
pub enum Which {
    /// iperf3 TCP and 64-byte UDP over veth, with no program, an empty program
    /// and the accounting programs, interleaved; ns per program run.
    Net(Common),
    /// perf bench sched pipe and messaging with no program, empty programs and
    /// the scheduler accounting; ns per run; the daemon's CPU at 10 to 1,000
    /// cgroups against polling cgroup files.
    Sched(Common),
    /// ns per open/close of /dev/null with no program, an empty program, and
    /// 10- and 100-rule device policies.
    Dev(Common),
}

#[derive(Args, Clone)]
pub struct Common {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Repeats of each mode (medians are reported).
    #[arg(long, default_value_t = 5)]
    repeats: u32,
}

pub fn run(which: Which, agent: &Path, root: &Path) -> Result<()> {
    let (name, common) = match &which {
        Which::Net(common) => ("net", common),
        Which::Sched(common) => ("sched", common),
        Which::Dev(common) => ("dev", common),
    };
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .context("running date")?;
    let date = String::from_utf8_lossy(&date.stdout).trim().to_owned();
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let out = results.join(format!("{name}-{date}.md"));
    let bench = agent.with_file_name("agent-bench");
    let status = Command::new(&bench)
        .arg(name)
        .args([
            "--seconds",
            &common.seconds.to_string(),
            "--repeats",
            &common.repeats.to_string(),
        ])
        .arg("--out")
        .arg(&out)
        .env("AGENT_BIN", agent)
        .status()
        .with_context(|| format!("running {} failed", bench.display()))?;
    if !status.success() {
        bail!("benchmark {name} failed ({status})");
    }
    Ok(())
}

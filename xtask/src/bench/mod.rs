//! `cargo xtask bench <which>`: runs the release build of `agent-bench`
//! (tests/src/bin/agent-bench.rs, which reuses the integration tests' harness)
//! and writes its table under bench/results/ with the date.
use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand, ValueEnum};

#[derive(Subcommand, Clone)]
pub enum Which {
    /// iperf3 TCP and 64-byte UDP over veth, with no program, an empty program
    /// and the accounting programs, interleaved; ns per program run; network
    /// policies of 10 to 100,000 rules; the bandwidth caps' accuracy;
    /// iptables cgroup rules against the agent at 10 to 1,000 cgroups.
    Net(Net),
    /// perf bench sched pipe and messaging with no program, empty programs and
    /// the scheduler accounting; ns per run; the daemon's CPU at 10 to 1,000
    /// cgroups against polling cgroup files.
    Sched(Common),
    /// ns per open/close of /dev/null with no program, an empty program, one
    /// that only asks for the cgroup id, and 10- and 100-rule device policies.
    Dev(Common),
    /// The daemon's CPU milliseconds and bytes per export at 10, 100 and
    /// 1,000 cgroups: OTLP gRPC, OTLP HTTP/protobuf and a Prometheus scrape.
    Export(Common),
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

#[derive(Args, Clone)]
pub struct Net {
    #[command(flatten)]
    common: Common,
    /// Run only these sections (comma-separated; all by default). The table
    /// then goes to net-SECTIONS-DATE.md.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<NetSection>,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum NetSection {
    /// No program, an empty program and the accounting programs; ns per run.
    Throughput,
    /// Network policies of 10, 1,000 and 100,000 rules; ns per packet.
    Policy,
    /// Bandwidth caps: measured / cap, retransmits.
    Rate,
    /// iptables cgroup rules against the agent at 10, 100 and 1,000 cgroups.
    Iptables,
}

impl NetSection {
    const fn name(self) -> &'static str {
        match self {
            Self::Throughput => "throughput",
            Self::Policy => "policy",
            Self::Rate => "rate",
            Self::Iptables => "iptables",
        }
    }
}

pub fn run(which: Which, agent: &Path, root: &Path) -> Result<()> {
    let (name, common, only) = match &which {
        Which::Net(net) => (
            "net",
            &net.common,
            net.only.iter().map(|s| s.name()).collect::<Vec<_>>(),
        ),
        Which::Sched(common) => ("sched", common, Vec::new()),
        Which::Dev(common) => ("dev", common, Vec::new()),
        Which::Export(common) => ("export", common, Vec::new()),
    };
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .context("running date")?;
    let date = String::from_utf8_lossy(&date.stdout).trim().to_owned();
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let file = if only.is_empty() {
        name.to_owned()
    } else {
        format!("{name}-{}", only.join("-"))
    };
    let out = results.join(format!("{file}-{date}.md"));
    let bench = agent.with_file_name("agent-bench");
    let status = Command::new(&bench)
        .arg(name)
        .args([
            "--seconds",
            &common.seconds.to_string(),
            "--repeats",
            &common.repeats.to_string(),
        ])
        .args(if only.is_empty() {
            Vec::new()
        } else {
            vec!["--only".to_owned(), only.join(",")]
        })
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

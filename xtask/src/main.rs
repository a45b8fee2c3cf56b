//! Developer tasks: `cargo xtask <setup|build|run|test|bench>`.
//!
//! Every task first runs the set-up (idempotent, quick when all is present),
//! so on a fresh machine of this project's kind the README's two commands
//! work with nothing installed by hand.

mod bench;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Set up, build, run, test and benchmark the agent"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages, bpf-linker, the debian-bpf toolchain.
    Setup,
    /// Set up, then build the agent.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run the agent with the given arguments (`cargo xtask run -- top`).
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every unit test and every kernel integration test (as root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks that measure side by side and print ratios (as root).
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    setup::ensure()?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Build { release } => build(release).map(|_| ()),
        Task::Run { release, args } => {
            let agent = build(release)?;
            let status = Command::new(&agent)
                .args(&args)
                .status()
                .with_context(|| format!("running {} failed", agent.display()))?;
            if !status.success() {
                std::process::exit(status.code().unwrap_or(1));
            }
            Ok(())
        }
        Task::Test { args } => test(&args),
        Task::Bench { which } => {
            setup::require_root("cargo xtask bench")?;
            let agent = build(true)?;
            bench::run(which, &agent, &workspace_root())
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Builds the agent and the test helpers; returns the agent binary's path.
fn build(release: bool) -> Result<PathBuf> {
    setup::progress(&format!(
        "building the agent{}",
        if release { " (release)" } else { "" }
    ));
    let mut command = cargo();
    command.args([
        "build",
        "--package",
        "agent",
        "--package",
        "agent-tests",
        "--bins",
    ]);
    if release {
        command.arg("--release");
    }
    let status = command.status().context("running cargo build failed")?;
    if !status.success() {
        bail!("building the agent failed ({status})");
    }
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("agent"))
}

fn test(args: &[String]) -> Result<()> {
    setup::require_root(
        "cargo xtask test (the kernel tests load eBPF programs and create cgroups)",
    )?;
    let agent = build(false)?;
    setup::progress("running the unit tests and the kernel integration tests");
    let status = cargo()
        .args(["test", "--workspace", "--exclude", "ebpf", "--no-fail-fast"])
        .arg("--")
        .args(args)
        .env("AGENT_BIN", &agent)
        .status()
        .context("running cargo test failed")?;
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}

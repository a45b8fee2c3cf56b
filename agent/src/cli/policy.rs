//! `agent policy check`: validate a policy file without applying it.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::policy;

/// Work with policy files.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file: print every problem with where it is (line and
    /// column for syntax, the field path for meaning); exit 0 only for a
    /// valid file.
    Check {
        /// The policy file.
        file: PathBuf,
    },
}

/// A policy file with problems (each already printed).
#[derive(Debug, thiserror::Error)]
#[error("{file}: {count} problem(s); nothing was applied")]
pub struct Rejected {
    pub file: String,
    pub count: usize,
}

pub fn run(args: &PolicyArgs) -> anyhow::Result<()> {
    match &args.command {
        PolicyCommand::Check { file } => {
            let text = std::fs::read_to_string(file).map_err(|err| {
                anyhow::anyhow!("reading policy file {} failed: {err}", file.display())
            })?;
            match policy::parse(&text) {
                Ok(parsed) => {
                    let devices = parsed
                        .policies
                        .iter()
                        .filter(|p| p.devices.is_some())
                        .count();
                    let network = parsed
                        .policies
                        .iter()
                        .filter(|p| p.network.is_some())
                        .count();
                    println!(
                        "{}: valid, {} policies ({devices} with device rules, {network} with network rules)",
                        file.display(),
                        parsed.policies.len()
                    );
                    Ok(())
                }
                Err(invalid) => {
                    for problem in &invalid.0 {
                        println!("{}: {problem}", file.display());
                    }
                    Err(Rejected {
                        file: file.display().to_string(),
                        count: invalid.0.len(),
                    }
                    .into())
                }
            }
        }
    }
}

//! `cargo xtask bench <which>`.
use std::path::Path;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Clone, Copy)]
pub enum Which {
    /// iperf3 TCP and 64-byte UDP over veth: no program, an empty program, the accounting programs.
    Net,
}

pub fn run(which: Which, _agent: &Path, _root: &Path) -> Result<()> {
    match which {
        Which::Net => Ok(()),
    }
}

//! `agent-bench`: the measurements behind `cargo xtask bench <net|sched>`.
//! Each benchmark measures side by side in one run, interleaving modes run by
//! run, and prints a table of medians and ratios.

mod dev;
mod export;
mod iperf;
mod iptables;
mod measure;
mod net;
mod netpolicy;
mod netrate;
mod sched;

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("agent-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

pub struct Options {
    pub seconds: u32,
    pub repeats: usize,
    pub out: Option<PathBuf>,
    /// `net --only`: the sections to run (all when empty).
    pub only: Vec<String>,
}

fn parse(args: &[String]) -> Result<(String, Options), String> {
    let mut options = Options {
        seconds: 5,
        repeats: 5,
        out: None,
        only: Vec::new(),
    };
    let mut which = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().cloned().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => {
                options.seconds = value("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            "--repeats" => {
                options.repeats = value("--repeats")?
                    .parse()
                    .map_err(|e| format!("--repeats: {e}"))?
            }
            "--out" => options.out = Some(PathBuf::from(value("--out")?)),
            "--only" => options.only.extend(
                value("--only")?
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            ),
            name if which.is_none() && !name.starts_with('-') => which = Some(name.to_owned()),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    if options.repeats == 0 || options.seconds == 0 {
        return Err("--repeats and --seconds must be at least 1".into());
    }
    Ok((
        which.ok_or(
            "usage: agent-bench net|sched|dev|export [--seconds N] [--repeats N] [--out FILE] \
             [--only SECTION,...] (net: throughput, policy, rate, iptables)",
        )?,
        options,
    ))
}

fn run(args: &[String]) -> Result<(), String> {
    let (which, options) = parse(args)?;
    if which != "net" && !options.only.is_empty() {
        return Err(format!("--only is for the net benchmark, not {which}"));
    }
    match which.as_str() {
        "net" => net::run(&options),
        "sched" => sched::run(&options),
        "dev" => dev::run(&options),
        "export" => export::run(&options),
        other => Err(format!(
            "unknown benchmark {other:?} (known: net, sched, dev, export)"
        )),
    }
}

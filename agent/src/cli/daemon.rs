//! `agent daemon`: load and attach the programs, pin them, keep the maps
//! tidy, and run until SIGINT or SIGTERM.

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

use super::{LoadArgs, PinArgs};
use crate::{
    cgroup,
    collect::{Collector, Role},
    loader::{Attached, Options},
};

/// Attach the accounting programs and keep them attached until stopped.
///
/// Pins the maps and links under --pin-dir so that `agent stats` and
/// `agent top` can read them. On SIGINT or SIGTERM the programs are detached
/// and the pins removed, unless --keep-pinned: then the programs keep counting
/// and the next daemon started with the same --pin-dir takes them over without
/// losing a packet.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub load: LoadArgs,

    #[command(flatten)]
    pub pins: PinArgs,

    #[command(flatten)]
    pub state: super::StateArgs,

    /// On exit leave the programs attached and the maps pinned.
    #[arg(long)]
    pub keep_pinned: bool,

    /// Where the per-cgroup CPU figures come from each interval: `ebpf` (the
    /// maps, the default) or `files` (walking the tree and reading every
    /// cgroup's CPU files, the way file-polling monitors do). Only
    /// `cargo xtask bench sched` uses `files`, to compare the two.
    #[arg(long, value_enum, default_value = "ebpf", hide = true)]
    pub cpu_source: CpuSource,

    /// How often to read the maps and drop the entries of removed cgroups.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = super::parse_duration)]
    pub interval: Duration,
}

/// See [`DaemonArgs::cpu_source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuSource {
    Ebpf,
    Files,
}

pub fn run(args: &DaemonArgs) -> anyhow::Result<()> {
    super::require_root("agent daemon", super::FOR_EBPF)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime failed")?;
    runtime.block_on(serve(args))
}

async fn serve(args: &DaemonArgs) -> anyhow::Result<()> {
    // Handlers first: a signal during set-up must still end in a clean exit.
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let root = cgroup::resolve_root(args.load.cgroup_root.as_deref())?;
    super::progress("agent: loading and attaching the eBPF programs...");
    let (attached, maps) = Attached::load(&Options {
        cgroup_root: root.clone(),
        max_cgroups: args.load.max_cgroups,
        net_slots: args.load.net_slots,
        pin_dir: Some(args.pins.pin_dir.clone()),
    })?;
    log::info!(
        "counting network and scheduler activity of every cgroup under {} (pins in {})",
        root.display(),
        args.pins.pin_dir.display()
    );

    let mut collector =
        Collector::new(maps, &root, Role::Owner).with_state_dir(&args.state.state_dir);
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => match tick_once(&mut collector, args.cpu_source) {
                Ok(()) => failing = false,
                Err(err) if !failing => {
                    log::warn!("collecting failed, retrying every interval: {err}");
                    failing = true;
                }
                Err(_) => {}
            },
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    let keep = args.keep_pinned;
    attached.shutdown(keep)?;
    if keep {
        log::info!(
            "stopped; the programs stay attached through the pins in {}",
            args.pins.pin_dir.display()
        );
    } else {
        log::info!("stopped; programs detached and pins removed");
    }
    Ok(())
}

fn tick_once(collector: &mut Collector, source: CpuSource) -> Result<(), crate::collect::Error> {
    match source {
        CpuSource::Ebpf => collector.housekeep().map(|_| ()),
        CpuSource::Files => collector.poll_cpu_files().map(|_| ()),
    }
}

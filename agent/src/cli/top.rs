//! `agent top`: a live table of the busiest cgroups, refreshed every interval.

use std::{io::IsTerminal as _, time::Duration};

use anyhow::Context as _;
use clap::Args;

use super::{LoadArgs, PinArgs};
use crate::{
    cgroup,
    collect::{Collector, Role},
    loader::{self, Attached, Options},
    model::Snapshot,
};

/// Show the cgroups with the most network traffic, live.
///
/// Reads a running daemon's pins; with no daemon, loads and attaches the
/// programs itself for as long as it runs (then detaches them). Rates are
/// over the refresh interval; totals count from when the programs attached.
#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub pins: PinArgs,

    #[command(flatten)]
    pub load: LoadArgs,

    #[command(flatten)]
    pub state: super::StateArgs,

    /// Refresh interval, in seconds (or a duration such as 500ms).
    #[arg(short = 'd', long = "delay", value_name = "SECONDS", default_value = "1", value_parser = super::parse_duration)]
    pub delay: Duration,

    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(short = 'n', long, value_name = "N")]
    pub iterations: Option<u64>,
}

pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    super::require_root("agent top", super::FOR_EBPF)?;
    let (collector, _attached) = if loader::pins_exist(&args.pins.pin_dir) {
        (super::stats::open_daemon(&args.pins)?, None)
    } else {
        let root = cgroup::resolve_root(args.load.cgroup_root.as_deref())?;
        super::progress("agent: no daemon running; loading and attaching the eBPF programs...");
        let (attached, loaded) = Attached::load(&Options {
            cgroup_root: root.clone(),
            max_cgroups: args.load.max_cgroups,
            net_slots: args.load.net_slots,
            pin_dir: None,
            guards: crate::loader::Guards::default(),
            event_rate: common::DEFAULT_EVENT_RATE,
        })?;
        (
            Collector::new(loaded.counters, &root, Role::Owner),
            Some(attached),
        )
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime failed")?;
    let mut collector = collector.with_state_dir(&args.state.state_dir);
    runtime.block_on(async move {
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("installing the SIGINT handler")?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        let terminal = std::io::stdout().is_terminal();
        let mut previous = collector.sample()?;
        let mut shown = 0u64;
        while args.iterations.is_none_or(|n| shown < n) {
            tokio::select! {
                () = tokio::time::sleep(args.delay) => {}
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
            }
            let current = collector.sample()?;
            let snapshot = Snapshot::new(&current, Some(&previous));
            previous = current;
            shown += 1;
            let rows = terminal.then(|| terminal_rows().saturating_sub(3).max(1));
            let table = super::table::render(&snapshot, rows);
            if terminal {
                // Home and clear, then redraw.
                print!("\x1b[H\x1b[2J");
            }
            println!(
                "agent top - {} - {} cgroups under {}",
                snapshot.timestamp,
                snapshot.cgroups.len(),
                snapshot.cgroup_root
            );
            print!("{table}");
            if !terminal {
                println!();
            }
        }
        anyhow::Ok(())
    })
    // `_attached` drops here: programs loaded by this command detach.
}

fn terminal_rows() -> usize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the pointer given.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &raw mut size) } == 0;
    if ok && size.ws_row > 0 {
        usize::from(size.ws_row)
    } else {
        24
    }
}

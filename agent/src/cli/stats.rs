//! `agent stats`: one snapshot of a running daemon's counters.

use clap::Args;

use super::PinArgs;
use crate::{
    collect::{Collector, Role},
    loader,
    model::Snapshot,
};

/// Print one snapshot of the daemon's per-cgroup counters.
///
/// Reads the maps the daemon pinned and the cgroup files: network bytes and
/// packets, CPU time, context switches, run-queue latency, processes started
/// and exited (counted since the daemon first attached), and memory, pids,
/// block I/O and CPU throttling (the kernel's own figures). Exits with status
/// 2 when no daemon is running.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub pins: PinArgs,

    #[command(flatten)]
    pub state: super::StateArgs,

    /// Print JSON (one object on one line) instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Take the snapshot over this interval, which adds rates: CPU percent,
    /// bytes per second, and the run-queue latency of the interval.
    #[arg(long, value_name = "DURATION", value_parser = super::parse_duration)]
    pub interval: Option<std::time::Duration>,
}

pub fn run(args: &StatsArgs) -> anyhow::Result<()> {
    let mut collector = open_daemon(&args.pins)?.with_state_dir(&args.state.state_dir);
    print(&mut collector, args.interval, args.json)
}

/// Prints one snapshot from `collector` (over `interval`, when given, which
/// adds rates): the JSON object on one line, or the table. The one home of
/// what `agent stats` prints; `agent top --once` prints the same.
pub fn print(
    collector: &mut Collector,
    interval: Option<std::time::Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let first = collector.sample()?;
    let snapshot = match interval {
        Some(interval) => {
            std::thread::sleep(interval);
            Snapshot::new(&collector.sample()?, Some(&first))
        }
        None => Snapshot::new(&first, None),
    };
    if json {
        println!("{}", serde_json::to_string(&snapshot)?);
    } else {
        print!("{}", super::table::render(&snapshot, None));
    }
    Ok(())
}

/// A collector reading the pins of the daemon at `pins.pin_dir`.
pub fn open_daemon(pins: &PinArgs) -> anyhow::Result<Collector> {
    // Root first: bpffs is mode 0700, so without it the pins look absent.
    super::require_root("reading the daemon's pinned maps", "open them")?;
    if !loader::pins_exist(&pins.pin_dir) {
        return Err(loader::Error::NoDaemon {
            pin_dir: pins.pin_dir.clone(),
        }
        .into());
    }
    let (maps, info) = loader::open_pins(&pins.pin_dir)?;
    if !info.is_alive() {
        log::warn!(
            "the daemon that pinned {} is not running: its programs still count, but removed \
             cgroups are not cleaned from the maps until a daemon runs",
            pins.pin_dir.display()
        );
    }
    Ok(Collector::new(maps, &info.cgroup_root, Role::Reader))
}

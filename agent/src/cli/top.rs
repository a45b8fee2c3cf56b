//! `agent top`: a live view of every cgroup (ratatui on crossterm), plain
//! tables for pipes (`--batch`), or one snapshot (`--once`).
//!
//! It is a consumer like `stats`: it reads [`Snapshot`]s from the collector
//! and never a map. The view's state is plain data in `state.rs` (unit
//! tested without a terminal), drawn by `view.rs`; `terminal.rs` guarantees
//! the terminal comes back; `feed.rs` reads the daemon's deny events.

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::widgets::TableState;

use super::{LoadArgs, PinArgs};
use crate::{
    cgroup,
    collect::{Collector, Role},
    events,
    loader::{self, Attached, Options},
    model::Snapshot,
};

mod feed;
pub mod state;
mod terminal;
pub mod view;

use state::{Key, Outcome, State};

/// Show every cgroup live: CPU, run-queue latency, memory, pids, traffic,
/// drops and denials.
///
/// Reads a running daemon's pins; with no daemon, loads and attaches the
/// programs itself for as long as it runs (then detaches them). Rates are
/// over the refresh interval. On a terminal it is interactive (press `?` for
/// the keys); piped, or with --batch, it prints one plain table per refresh.
#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub pins: PinArgs,

    #[command(flatten)]
    pub load: LoadArgs,

    #[command(flatten)]
    pub state: super::StateArgs,

    /// Refresh interval, in seconds (or a duration such as 500ms); `+` and
    /// `-` change it while it runs.
    #[arg(short = 'd', long = "delay", value_name = "SECONDS", default_value = "1", value_parser = super::parse_duration)]
    pub delay: Duration,

    /// Print plain tables, one per refresh, as `top -b` does (the default
    /// when standard output is not a terminal).
    #[arg(short = 'b', long)]
    pub batch: bool,

    /// Stop after this many refreshes (default: until q or Ctrl-C).
    #[arg(short = 'n', long, value_name = "N")]
    pub iterations: Option<u64>,

    /// Print one snapshot and stop: what `agent stats` prints (counted since
    /// the programs attached).
    #[arg(long, conflicts_with_all = ["batch", "iterations"])]
    pub once: bool,

    /// With --once: print the JSON of `agent stats --json`.
    #[arg(long, requires = "once")]
    pub json: bool,

    /// The daemon's events socket, for the latest deny events of the
    /// selected cgroup.
    #[arg(long, value_name = "PATH", default_value = events::DEFAULT_SOCKET)]
    pub events_socket: PathBuf,
}

pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    super::require_root("agent top", super::FOR_EBPF)?;
    let from_daemon = loader::pins_exist(&args.pins.pin_dir);
    let (collector, _attached) = if from_daemon {
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
    let mut collector = collector.with_state_dir(&args.state.state_dir);
    if args.once {
        return super::stats::print(&mut collector, None, args.json);
    }
    if args.batch || !std::io::stdout().is_terminal() {
        batch(&mut collector, args)
    } else {
        live(
            &mut collector,
            args,
            from_daemon.then_some(args.events_socket.as_path()),
        )
    }
    // `_attached` drops here (also when a panic unwinds): programs loaded
    // by this command detach.
}

/// Plain tables, one per refresh, until `-n`, SIGINT or SIGTERM.
fn batch(collector: &mut Collector, args: &TopArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime failed")?;
    runtime.block_on(async move {
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("installing the SIGINT handler")?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
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
            // The interval the rates are over, as measured (a loaded host
            // wakes late), so that a reader can turn a rate back into a count.
            println!(
                "agent top - {} - {} cgroups under {} - rates over {:.3}s",
                snapshot.timestamp,
                snapshot.cgroups.len(),
                snapshot.cgroup_root,
                snapshot.interval_s.unwrap_or_default()
            );
            println!("{}", super::table::render(&snapshot, None));
        }
        anyhow::Ok(())
    })
}

/// The terminal's key, as the view's state understands it.
fn key(event: KeyEvent) -> Option<Key> {
    if event.modifiers.contains(KeyModifiers::CONTROL) {
        return matches!(event.code, KeyCode::Char('c')).then_some(Key::Interrupt);
    }
    Some(match event.code {
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        _ => return None,
    })
}

/// How often at most the loop looks at signals and the events feed.
const TICK: Duration = Duration::from_millis(100);

/// The interactive view, until `q`, Ctrl-C, SIGTERM, SIGINT, SIGHUP or `-n`.
fn live(
    collector: &mut Collector,
    args: &TopArgs,
    events_socket: Option<&Path>,
) -> anyhow::Result<()> {
    let mut state = State::new(args.delay);
    let mut feed = match events_socket {
        Some(path) => match feed::Feed::connect(path) {
            Ok(feed) => Some(feed),
            Err(why) => {
                state.events_note = Some(why);
                None
            }
        },
        None => {
            state.events_note =
                Some("none: deny events come from a running `agent daemon --policy`".into());
            None
        }
    };
    let mut previous = collector.sample()?;
    state.update(&Snapshot::new(&previous, None));
    terminal::catch_signals()?;
    // A log line would scribble over the screen: logging is off while it is
    // drawn (what matters is on screen: uncounted packets are in the title).
    let level = log::max_level();
    log::set_max_level(log::LevelFilter::Off);
    let result = (|| -> anyhow::Result<()> {
        let mut screen = terminal::Screen::enter().context("setting up the terminal")?;
        let mut table = TableState::default();
        let mut next = previous.at + state.interval;
        let mut refreshes = 0u64;
        let mut dirty = true;
        loop {
            if terminal::stop_requested() {
                return Ok(());
            }
            if let Some(source) = &feed {
                let drained = source.drain();
                dirty |= !drained.records.is_empty();
                for record in drained.records {
                    state.push_event(record);
                }
                if let Some(why) = drained.ended {
                    state.events_note = Some(why);
                    feed = None;
                    dirty = true;
                }
            }
            if dirty {
                let mut page = state.page;
                screen
                    .terminal
                    .draw(|frame| page = view::draw(frame, &state, &mut table))
                    .context("drawing on the terminal")?;
                state.page = page;
                dirty = false;
                if args.iterations.is_some_and(|n| refreshes >= n) {
                    return Ok(());
                }
            }
            let now = Instant::now();
            if !state.paused && now >= next {
                let current = collector.sample()?;
                state.update(&Snapshot::new(&current, Some(&previous)));
                previous = current;
                next = previous.at + state.interval;
                refreshes += 1;
                dirty = true;
                continue;
            }
            let wait = if state.paused {
                TICK
            } else {
                next.saturating_duration_since(now).min(TICK)
            };
            if terminal::wait_for_input(wait).context("waiting for the terminal's input")?
                == terminal::Input::Gone
            {
                return Ok(());
            }
            // What crossterm has read and queued, and what is now readable.
            while event::poll(Duration::ZERO).context("reading the terminal's input")? {
                match event::read().context("reading the terminal's input")? {
                    Event::Key(pressed) if pressed.kind != KeyEventKind::Release => {
                        if let Some(key) = key(pressed) {
                            if state.handle(key) == Outcome::Quit {
                                return Ok(());
                            }
                            next = previous.at + state.interval;
                            dirty = true;
                        }
                    }
                    Event::Resize(..) => dirty = true,
                    _ => {}
                }
            }
        }
    })();
    log::set_max_level(level);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_keys_map_to_the_view_s_keys() {
        let press = |code, modifiers| key(KeyEvent::new(code, modifiers));
        assert_eq!(
            press(KeyCode::Char('c'), KeyModifiers::CONTROL),
            Some(Key::Interrupt)
        );
        assert_eq!(press(KeyCode::Char('x'), KeyModifiers::CONTROL), None);
        assert_eq!(
            press(KeyCode::Char('c'), KeyModifiers::NONE),
            Some(Key::Char('c'))
        );
        assert_eq!(
            press(KeyCode::Char('?'), KeyModifiers::SHIFT),
            Some(Key::Char('?'))
        );
        assert_eq!(press(KeyCode::Enter, KeyModifiers::NONE), Some(Key::Enter));
        assert_eq!(
            press(KeyCode::PageDown, KeyModifiers::NONE),
            Some(Key::PageDown)
        );
        assert_eq!(press(KeyCode::F(1), KeyModifiers::NONE), None);
    }

    #[test]
    fn json_needs_once_and_once_excludes_batch() {
        use clap::Parser as _;
        let parse = |args: &[&str]| {
            crate::cli::Cli::try_parse_from(["agent", "top"].iter().chain(args))
                .map_err(|e| e.kind())
        };
        assert!(parse(&["--once", "--json"]).is_ok());
        assert!(parse(&["--batch", "-n", "2", "-d", "0.5"]).is_ok());
        assert_eq!(
            parse(&["--json"]).err(),
            Some(clap::error::ErrorKind::MissingRequiredArgument)
        );
        assert_eq!(
            parse(&["--once", "--batch"]).err(),
            Some(clap::error::ErrorKind::ArgumentConflict)
        );
    }
}

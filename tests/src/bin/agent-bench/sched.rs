//! `agent-bench sched`: what the scheduler accounting costs.
//!
//! 1. `perf bench sched pipe` pinned to one CPU and `perf bench sched
//!    messaging`, with no program, with empty programs on the same BTF
//!    tracepoints, and with the real `agent daemon` (watching the whole host,
//!    as in production), interleaved run by run.
//! 2. ns per run of the sched_switch and tick (hrtimer_expire_entry) programs, from
//!    `kernel.bpf_stats_enabled`, in separate runs of the pipe load.
//! 3. The daemon's own CPU time at 10, 100 and 1,000 live cgroups (each with a
//!    sleeping process) sampled every second, getting the CPU figures from
//!    its maps, against the same binary polling every cgroup's CPU files the
//!    way file-based monitors do (`--cpu-source files`).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use agent_tests::{agent_bin, cgroup_mounts, unique, v2_mount, Cgroup, Daemon};
use aya::programs::{
    links::{FdLink, PinnedLink},
    BtfTracePoint,
};

use crate::{
    measure::{self, median, paired_ratio, program_stats_by_id, spread, BpfStats},
    Options,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Empty,
    Accounting,
}

impl Mode {
    const ALL: [Self; 3] = [Self::None, Self::Empty, Self::Accounting];

    const fn label(self) -> &'static str {
        match self {
            Self::None => "no program",
            Self::Empty => "empty programs",
            Self::Accounting => "accounting",
        }
    }
}

/// Programs attached for one mode, and the ids of the switch and runtime
/// programs; dropping detaches them.
struct Attached {
    _ebpf: Option<aya::Ebpf>,
    _daemon: Option<Daemon>,
    switch_id: Option<u32>,
    runtime_id: Option<u32>,
}

fn attach(mode: Mode) -> Result<Attached, String> {
    match mode {
        Mode::None => Ok(Attached {
            _ebpf: None,
            _daemon: None,
            switch_id: None,
            runtime_id: None,
        }),
        Mode::Empty => {
            let btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
            let mut ebpf = aya::EbpfLoader::new()
                .allow_unsupported_maps()
                .load(agent::loader::EBPF_OBJECT)
                .map_err(|e| e.to_string())?;
            let mut ids = Vec::new();
            for (tracepoint, name) in common::programs::SCHED_EMPTY {
                let program: &mut BtfTracePoint = ebpf
                    .program_mut(name)
                    .ok_or(format!("{name} is missing"))?
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| e.to_string())?;
                program.load(tracepoint, &btf).map_err(|e| e.to_string())?;
                program.attach().map_err(|e| e.to_string())?;
                ids.push(program.info().map_err(|e| e.to_string())?.id());
            }
            Ok(Attached {
                _ebpf: Some(ebpf),
                _daemon: None,
                switch_id: Some(ids[0]),
                runtime_id: Some(ids[1]),
            })
        }
        Mode::Accounting => {
            // The whole host, as in production (accounting programs only allow).
            let daemon = Daemon::start(&v2_mount(), &[]);
            let program_of = |name: &str| -> Option<u32> {
                let link = PinnedLink::from_pin(daemon.pin_dir.join("links").join(name)).ok()?;
                FdLink::from(link).info().ok().map(|info| info.program_id())
            };
            let (switch_id, runtime_id) = (
                program_of(common::programs::SCHED_SWITCH),
                program_of(common::programs::SCHED_TICK),
            );
            Ok(Attached {
                _ebpf: None,
                _daemon: Some(daemon),
                switch_id,
                runtime_id,
            })
        }
    }
}

/// Runs `perf bench sched ...` in `cgroup`; returns its stdout.
fn perf(cgroup: &Cgroup, args: &[&str]) -> Result<String, String> {
    let out = cgroup
        .command("perf", None)
        .args(["bench", "sched"])
        .args(args)
        .output()
        .map_err(|e| format!("perf: {e} (install linux-perf)"))?;
    if !out.status.success() {
        return Err(format!(
            "perf bench sched {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Pipe round trips per second, pinned to CPU 1.
fn pipe(cgroup: &Cgroup, loops: u32) -> Result<f64, String> {
    let mut command = cgroup.command("perf", None);
    command.args(["bench", "sched", "pipe", "-l", &loops.to_string()]);
    let out = agent_tests::on_cpu(&mut command, 1)
        .output()
        .map_err(|e| format!("perf: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|line| line.contains("ops/sec"))
        .and_then(|line| line.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no ops/sec in perf output: {text}"))
}

/// Seconds `perf bench sched messaging` takes (lower is better).
fn messaging(cgroup: &Cgroup) -> Result<f64, String> {
    let text = perf(cgroup, &["messaging", "-g", "4", "-l", "400"])?;
    text.lines()
        .find_map(|line| line.trim().strip_prefix("Total time:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no total time in perf output: {text}"))
}

/// N live cgroups under a benchmark root: a directory in the v2 hierarchy and
/// in the v1 cpu and cpuacct hierarchies, each holding one sleeping process.
/// Removed on drop.
pub struct LiveCgroups {
    dirs: Vec<PathBuf>,
    sleepers: Vec<Child>,
    root_name: String,
}

impl LiveCgroups {
    pub fn create(count: usize) -> Result<Self, String> {
        let root_name = unique("agent-bench-live");
        // The v2 hierarchy (what the programs see) and, on hybrid hosts, the
        // v1 controllers that hold the CPU files polled in `files` mode.
        let v2 = v2_mount();
        let mounts: Vec<PathBuf> = cgroup_mounts()
            .into_iter()
            .filter(|mount| {
                *mount == v2
                    || mount
                        .file_name()
                        .is_some_and(|name| name == "cpu" || name == "cpuacct")
            })
            .collect();
        let mut live = Self {
            dirs: Vec::new(),
            sleepers: Vec::new(),
            root_name,
        };
        for mount in &mounts {
            let dir = mount.join(&live.root_name);
            fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            live.dirs.push(dir);
        }
        for i in 0..count {
            let sleeper = Command::new("sleep")
                .arg("3600")
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            let pid = sleeper.id();
            live.sleepers.push(sleeper);
            for mount in &mounts {
                let dir = mount.join(&live.root_name).join(format!("c{i}"));
                fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
                live.dirs.push(dir.clone());
                fs::write(dir.join("cgroup.procs"), pid.to_string())
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
            }
        }
        Ok(live)
    }

    pub fn v2_root(&self) -> PathBuf {
        v2_mount().join(&self.root_name)
    }
}

impl Drop for LiveCgroups {
    fn drop(&mut self) {
        for sleeper in &mut self.sleepers {
            let _ = sleeper.kill();
            let _ = sleeper.wait();
        }
        for dir in self.dirs.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// CPU time a process has used, in ns (/proc/PID/schedstat, exact).
pub fn cpu_time_ns(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|text| text.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// The daemon's CPU use over `window`, in ms per second, watching `root`.
fn daemon_cpu(root: &Path, source: &str, window: Duration) -> Result<f64, String> {
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("agent-bench"));
    let mut daemon = Command::new(agent_bin())
        .args(["daemon", "--cgroup-root"])
        .arg(root)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["--cpu-source", source, "--interval", "1s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting agent daemon: {e}"))?;
    let pid = daemon.id();
    // Past start-up (loading programs, the first walk) before measuring.
    thread::sleep(Duration::from_secs(3));
    let (start, t0) = (cpu_time_ns(pid), Instant::now());
    thread::sleep(window);
    let (end, elapsed) = (cpu_time_ns(pid), t0.elapsed());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    agent_tests::remove_pins(&pin_dir);
    #[expect(clippy::cast_precision_loss, reason = "ms per second")]
    Ok((end - start) as f64 / 1e6 / elapsed.as_secs_f64())
}

pub fn run(options: &Options) -> Result<(), String> {
    agent_tests::require_root();
    agent_tests::run("perf", &["--version"]);
    let root = Cgroup::new_root("agent-bench-sched");
    let load = root.child("load");
    let loops = 60_000 * options.seconds.max(1);
    // Short runs, many of them, each repeat starting with the next mode in
    // turn: this host's neighbours move a run by more than the programs do.
    let rounds = options.repeats * 3;

    eprintln!("warm-up: one run of each load in each mode");
    for mode in Mode::ALL {
        let _attached = attach(mode)?;
        pipe(&load, 50_000)?;
        messaging(&load)?;
    }
    let mut pipes = [vec![], vec![], vec![]];
    let mut messages = [vec![], vec![], vec![]];
    for repeat in 1..=rounds {
        for k in 0..Mode::ALL.len() {
            let i = (k + repeat) % Mode::ALL.len();
            let mode = Mode::ALL[i];
            let _attached = attach(mode)?;
            pipes[i].push(pipe(&load, loops)?);
            messages[i].push(messaging(&load)?);
            eprintln!(
                "repeat {repeat}/{rounds}: {}: pipe {:.0} ops/s, messaging {:.3} s",
                mode.label(),
                pipes[i][pipes[i].len() - 1],
                messages[i][messages[i].len() - 1]
            );
        }
    }

    // ns per run, with the kernel's run-time stats on.
    let stats = BpfStats::enable();
    let mut ns = [[vec![], vec![]], [vec![], vec![]]];
    // Both programs' time over the number of switches: what a switch event
    // costs, the tick included.
    let mut per_switch = [vec![], vec![]];
    for repeat in 1..=options.repeats {
        for (i, mode) in [Mode::Empty, Mode::Accounting].into_iter().enumerate() {
            let attached = attach(mode)?;
            let ids = [
                attached.switch_id.ok_or("no switch program")?,
                attached.runtime_id.ok_or("no runtime program")?,
            ];
            let before = ids.map(|id| program_stats_by_id(&[id]));
            pipe(&load, loops / 2)?;
            let after = ids.map(|id| program_stats_by_id(&[id]));
            let mut total_ns = 0;
            for program in 0..2 {
                let runs = after[program].1.saturating_sub(before[program].1).max(1);
                let time = after[program].0.saturating_sub(before[program].0);
                total_ns += time;
                #[expect(clippy::cast_precision_loss, reason = "ns per run")]
                ns[i][program].push(time as f64 / runs as f64);
            }
            let switches = after[0].1.saturating_sub(before[0].1).max(1);
            #[expect(clippy::cast_precision_loss, reason = "ns per switch")]
            per_switch[i].push(total_ns as f64 / switches as f64);
            eprintln!(
                "repeat {repeat}/{}: ns per run, {}",
                options.repeats,
                mode.label()
            );
        }
    }
    drop(stats);

    // The daemon's own CPU at 10, 100 and 1,000 live cgroups.
    let window = Duration::from_secs(u64::from(options.seconds.max(2)) * 2);
    let mut daemon_rows = Vec::new();
    for count in [10, 100, 1000] {
        let live = LiveCgroups::create(count)?;
        let mut ebpf = Vec::new();
        let mut files = Vec::new();
        for repeat in 1..=3 {
            ebpf.push(daemon_cpu(&live.v2_root(), "ebpf", window)?);
            files.push(daemon_cpu(&live.v2_root(), "files", window)?);
            eprintln!(
                "{count} cgroups, repeat {repeat}/3: maps {:.3} ms/s, files {:.3} ms/s",
                ebpf[ebpf.len() - 1],
                files[files.len() - 1]
            );
        }
        daemon_rows.push((count, ebpf, files));
    }

    let mut table = measure::preamble("sched");
    let _ = writeln!(
        table,
        "Loads run in a cgroup of their own; the accounting daemon watches the whole host (as in \
         production). Modes interleaved run by run, {rounds} repeats after a warm-up, each starting with \
         the next mode in turn. Cells: median (min to \
         max); ratios: median of the ratios within each repeat. `pipe`: `perf bench sched pipe -l {loops}` \
         pinned to CPU 1 (round trips per second, higher is better). `messaging`: `perf bench sched \
         messaging -g 4 -l 400` (seconds, lower is better; the ratio is baseline time / time). ns per run: \
         kernel.bpf_stats_enabled=1 during separate pipe runs; the figure includes the kernel's own cost \
         of timing each run (two clock reads), which is most of an empty program's, so `accounting - \
         empty` is what the accounting itself costs. The tick runs only on the timer interrupt (250 Hz \
         here), so its runs are few and start with cold caches; the last row spreads both programs' \
         time over the switches."
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| load | no program | empty programs | accounting | empty / none | accounting / none |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        table,
        "| pipe (ops/s) | {} | {} | {} | {:.3} | {:.3} |",
        spread(&pipes[0], 0),
        spread(&pipes[1], 0),
        spread(&pipes[2], 0),
        paired_ratio(&pipes[1], &pipes[0]),
        paired_ratio(&pipes[2], &pipes[0])
    );
    let _ = writeln!(
        table,
        "| messaging (s) | {} | {} | {} | {:.3} | {:.3} |",
        spread(&messages[0], 3),
        spread(&messages[1], 3),
        spread(&messages[2], 3),
        paired_ratio(&messages[0], &messages[1]),
        paired_ratio(&messages[0], &messages[2])
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| program | empty (ns/run) | accounting (ns/run) | accounting - empty |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|");
    for (program, name) in ["sched_switch", "hrtimer_expire_entry (tick)"]
        .iter()
        .enumerate()
    {
        let (empty, accounting) = (&ns[0][program], &ns[1][program]);
        let _ = writeln!(
            table,
            "| {name} | {} | {} | {:.1} |",
            spread(empty, 1),
            spread(accounting, 1),
            median(accounting) - median(empty)
        );
    }
    let _ = writeln!(
        table,
        "| both, per switch event (ns per sched_switch run) | {} | {} | {:.1} |",
        spread(&per_switch[0], 1),
        spread(&per_switch[1], 1),
        median(&per_switch[1]) - median(&per_switch[0])
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "Daemon CPU, sampling every second, over {} s windows after start-up, 3 repeats (ms of CPU per \
         second; 10 ms/s is 1% of one core). `maps`: the CPU figures from the eBPF maps (the default). \
         `files`: the same binary walking the tree and reading every cgroup's cpuacct.usage and cpu.stat \
         each second, as file-polling monitors do.",
        window.as_secs()
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| live cgroups | maps (ms/s) | files (ms/s) | files / maps |"
    );
    let _ = writeln!(table, "|---:|---:|---:|---:|");
    for (count, ebpf, files) in &daemon_rows {
        let _ = writeln!(
            table,
            "| {count} | {} | {} | {:.1} |",
            spread(ebpf, 3),
            spread(files, 3),
            median(files) / median(ebpf)
        );
    }
    measure::publish(&table, options.out.as_deref())
}

//! `agent-bench dev`: what the device policy costs per open.
//!
//! ns per open/close of /dev/null by a process in a cgroup with no device
//! program, with an empty cgroup_device program, with one that only asks for
//! the task's cgroup id, and with the agent's device
//! program enforcing a 10-rule and a 100-rule policy (the rule for /dev/null
//! last), interleaved run by run. The policy is installed the way `agent run
//! --device` does it: the program on the cgroup, the rules in its maps; the
//! program is loaded both as `agent run` loads it (the workload's cgroup as
//! its unit) and as the daemon's runs (asking for each task's cgroup).

use std::{fmt::Write as _, fs};

use agent::loader::DeviceUnit;
use agent::{
    loader,
    policy::{devices::parse_rule, Action, DevicePolicy},
};
use agent_tests::Cgroup;
use aya::programs::CgroupDevice;

use crate::{
    measure::{self, attached_ids, paired_ratio, program_stats_by_id, spread, BpfStats},
    Options,
};

#[derive(Clone, Copy)]
enum Mode {
    None,
    /// A program that returns at once.
    Empty,
    /// A program that only asks for the task's cgroup id.
    CgroupId,
    /// The agent's program with a policy of this many rules.
    Rules(usize, DeviceUnit),
}

impl Mode {
    const ALL: [Self; 7] = [
        Self::None,
        Self::Empty,
        Self::CgroupId,
        Self::Rules(10, DeviceUnit::Workload),
        Self::Rules(100, DeviceUnit::Workload),
        Self::Rules(10, DeviceUnit::EachCgroup),
        Self::Rules(100, DeviceUnit::EachCgroup),
    ];

    fn label(self) -> String {
        match self {
            Self::None => "no program".into(),
            Self::Empty => "empty program".into(),
            Self::CgroupId => "cgroup id only".into(),
            Self::Rules(n, DeviceUnit::Workload) => format!("{n}-rule policy (agent run)"),
            Self::Rules(n, DeviceUnit::EachCgroup) => {
                format!("{n}-rule policy (daemon: each task's cgroup)")
            }
        }
    }
}

/// A policy of `n` rules: `n - 1` about other devices, then /dev/null.
fn policy(n: usize) -> DevicePolicy {
    let mut rules: Vec<_> = (0..n - 1)
        .map(|i| {
            parse_rule(
                &format!("c {}:{} rw", 10 + i % 50, i),
                if i % 3 == 0 {
                    Action::Deny
                } else {
                    Action::Allow
                },
            )
        })
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    rules.push(
        parse_rule("c 1:3 rw", Action::Allow).unwrap_or_else(|_| unreachable!("a valid rule")),
    );
    DevicePolicy {
        default: Action::Deny,
        rules,
    }
}

/// What a mode attached; dropping it detaches (held, never read).
#[expect(clippy::large_enum_variant, reason = "one at a time")]
enum Attached {
    None,
    Baseline {
        _ebpf: aya::Ebpf,
    },
    Rules {
        _guard: loader::WorkloadGuard,
        _maps: loader::DeviceMaps,
    },
}

fn attach(mode: Mode, cgroup: &Cgroup) -> Result<Attached, String> {
    match mode {
        Mode::None => Ok(Attached::None),
        Mode::Empty | Mode::CgroupId => {
            let name = if matches!(mode, Mode::Empty) {
                common::programs::DEV_EMPTY
            } else {
                common::programs::DEV_CGROUP_ID
            };
            let mut ebpf = aya::EbpfLoader::new()
                .allow_unsupported_maps()
                .load(loader::EBPF_OBJECT)
                .map_err(|e| e.to_string())?;
            let program: &mut CgroupDevice = ebpf
                .program_mut(name)
                .ok_or(format!("{name} is missing"))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| e.to_string())?;
            program.load().map_err(|e| e.to_string())?;
            let dir = fs::File::open(&cgroup.path).map_err(|e| e.to_string())?;
            program
                .attach(dir, aya::programs::CgroupAttachMode::Single)
                .map_err(|e| e.to_string())?;
            Ok(Attached::Baseline { _ebpf: ebpf })
        }
        Mode::Rules(n, unit) => {
            let guards = loader::Guards {
                devices: true,
                network: false,
            };
            let (guard, mut maps, _) =
                loader::guard_workload_with(&cgroup.path, None, guards, unit)
                    .map_err(|e| e.to_string())?;
            agent::enforce::set_for_run(
                &mut maps,
                cgroup.id(),
                agent::enforce::RUN_VERSIONS | 1,
                &policy(n),
            )
            .map_err(|e| e.to_string())?;
            Ok(Attached::Rules {
                _guard: guard,
                _maps: maps,
            })
        }
    }
}

fn opens(cgroup: &Cgroup, count: u32) -> Result<f64, String> {
    let helper = agent_tests::agent_bin().with_file_name("devpeer");
    let mut command = cgroup.command(helper, None);
    command.args(["bench", &count.to_string(), "/dev/null"]);
    let out = agent_tests::on_cpu(&mut command, 1)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "devpeer bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("devpeer output: {e}"))
}

/// Opens per cgroup per round of [`cycle`] (about 3 ms).
const CYCLE_OPENS: u32 = 2_000;

/// Loads of each mode's program, each attached to a cgroup of its own: the
/// kernel places each load's code anew, and where it lands moves the cost
/// of calling it by tens of ns, so a mode's figure is the mean of several.
const LOADS: usize = 3;

/// The fastest round in this many is "at full speed".
const FAST_SHARE: usize = 10;

/// Rounds of each cycle timed by the kernel (kernel.bpf_stats_enabled=1).
const STATS_ROUNDS: usize = 60;

/// ns per open/close in each of `cgroups`, per round: one process, pinned
/// to CPU 1, that moves itself from cgroup to cgroup (`devpeer cycle`), so
/// that the modes of a round run within some 50 ms of one another.
fn cycle(cgroups: &[Cgroup], count: u32, rounds: usize) -> Result<Vec<Vec<f64>>, String> {
    let helper = agent_tests::agent_bin().with_file_name("devpeer");
    let mut command = cgroups[0].command(helper, None);
    command
        .args([
            "cycle",
            &count.to_string(),
            &rounds.to_string(),
            "/dev/null",
        ])
        .args(cgroups.iter().map(|c| c.path.clone()));
    eprintln!("{rounds} rounds of {count} opens in each mode");
    let out = agent_tests::on_cpu(&mut command, 1)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "devpeer cycle failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut ns = vec![Vec::new(); cgroups.len()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        for (i, value) in line.split_whitespace().enumerate() {
            ns.get_mut(i)
                .ok_or("devpeer cycle printed too many columns")?
                .push(value.parse().map_err(|e| format!("devpeer output: {e}"))?);
        }
    }
    if ns.iter().any(|column| column.len() != rounds) {
        return Err(format!("devpeer cycle printed fewer than {rounds} rounds"));
    }
    Ok(ns)
}

pub fn run(options: &Options) -> Result<(), String> {
    agent_tests::require_root();
    let root = Cgroup::new_root("agent-bench-dev");
    // LOADS cgroups per mode (cgroup j is mode j / LOADS), each with its own
    // load of the mode's program attached throughout, so that runs of every
    // mode follow one another within some 50 ms.
    let cgroups: Vec<Cgroup> = (0..Mode::ALL.len() * LOADS)
        .map(|j| root.child(&format!("mode-{}-{}", j / LOADS, j % LOADS)))
        .collect();
    let mut attached = Vec::new();
    for (j, cgroup) in cgroups.iter().enumerate() {
        attached.push(attach(Mode::ALL[j / LOADS], cgroup)?);
    }
    let count = 100_000 * options.seconds.max(1) / 5;
    let rounds = options.repeats * 300;
    eprintln!("warm-up: one run in each cgroup");
    for cgroup in &cgroups {
        opens(cgroup, count)?;
    }
    // CPU time, with the kernel's timing of programs off: one process
    // moving itself from cgroup to cgroup, a short run in each; a mode's
    // figure of a round is the mean of its loads'.
    let raw = cycle(&cgroups, CYCLE_OPENS, rounds)?;
    #[expect(clippy::cast_precision_loss, reason = "a small count")]
    let ns: Vec<Vec<f64>> = (0..Mode::ALL.len())
        .map(|i| {
            (0..rounds)
                .map(|r| (0..LOADS).map(|k| raw[i * LOADS + k][r]).sum::<f64>() / LOADS as f64)
                .collect()
        })
        .collect();
    // The programs' own time per run, from the kernel (the first mode has
    // none), in `repeats` shorter cycles of the same kind.
    let ids: Vec<Vec<u32>> = (0..Mode::ALL.len())
        .map(|i| {
            (0..LOADS)
                .flat_map(|k| attached_ids(&cgroups[i * LOADS + k].path, "cgroup_device"))
                .collect()
        })
        .collect();
    let mut per_run = vec![Vec::new(); Mode::ALL.len()];
    let stats = BpfStats::enable();
    for _ in 0..options.repeats {
        let before: Vec<_> = ids.iter().map(|ids| program_stats_by_id(ids)).collect();
        cycle(&cgroups, CYCLE_OPENS, STATS_ROUNDS)?;
        for (i, mode) in Mode::ALL.into_iter().enumerate() {
            if ids[i].is_empty() {
                continue;
            }
            let after = program_stats_by_id(&ids[i]);
            let runs = after.1.saturating_sub(before[i].1);
            // One run per open of the character device.
            let opens = u64::from(CYCLE_OPENS) * (STATS_ROUNDS * LOADS) as u64;
            if runs < opens {
                return Err(format!(
                    "{}: the program ran {runs} times for {opens} opens",
                    mode.label()
                ));
            }
            #[expect(clippy::cast_precision_loss, reason = "ns per run")]
            per_run[i].push(after.0.saturating_sub(before[i].0) as f64 / runs as f64);
        }
    }
    drop(stats);
    drop(attached);
    let mut table = measure::preamble("dev");
    let _ = writeln!(
        table,
        "Each mode has {LOADS} cgroups, each with its own load of the mode's program attached \
         throughout (where the kernel places a load's code moves the cost of calling it by tens \
         of ns). One process pinned to CPU 1 moves itself from cgroup to cgroup and opens and \
         closes /dev/null (read-write) {CYCLE_OPENS} times in each: a round visits every cgroup \
         once, back to back (some 50 ms at full speed), each round starting with the next, {rounds} rounds \
         after a warm-up; a mode's figure for a round is the mean of its {LOADS} cgroups'. Times are the process's \
         CPU time (CLOCK_THREAD_CPUTIME_ID: time the hypervisor gave to other guests is left out). \
         Policies: default deny, the rule allowing /dev/null last. Cells: median (min to max); \
         \"added\" is the median over rounds of the difference to no program within the round, \
         \"over empty\" the same to the empty program, both with kernel.bpf_stats_enabled=0. The \
         empty program's row is what the kernel's call of any cgroup_device program costs here; \
         \"cgroup id only\" is a program that only asks for the task's cgroup id \
         (bpf_get_current_cgroup_id), the least a program that finds each task's cgroup's policy does; \
         \"over empty\" is a program's own work. The agent's program is loaded as `agent run` \
         loads it (the workload's cgroup is its unit, a constant: it does not ask for the \
         task's cgroup) and as the daemon's runs (it asks for each task's cgroup, to find that \
         cgroup's policy). This VM's host runs it at changing speeds (the \
         no-program time moves by a factor of two over minutes; the line under the table gives \
         this run's), and the added figures move with it and from one load of the programs to \
         the next: compare runs. \"program ns per run\": the kernel's \
         own count, in {} cycles of {STATS_ROUNDS} rounds with kernel.bpf_stats_enabled=1 (which \
         adds its own two clock reads to each run: most of the empty program's figure); one run \
         per open.",
        options.repeats
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| mode | ns per open/close | added ns per open | over empty | added, host at full speed | ratio to no program | program ns per run |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|---:|");
    // The no-program time of the fastest 5% of rounds: the host at full speed.
    let mut fastest = ns[0].clone();
    fastest.sort_by(f64::total_cmp);
    let full_speed = fastest[fastest.len() / 20];
    // The rounds the host ran at full speed: the fastest tenth by the mean
    // of every mode's time in the round (chosen by all modes, not by the
    // no-program time alone, which would favour rounds where that one was
    // low by chance).
    #[expect(clippy::cast_precision_loss, reason = "a small count")]
    let round_mean = |r: usize| ns.iter().map(|mode| mode[r]).sum::<f64>() / ns.len() as f64;
    let mut by_speed: Vec<usize> = (0..rounds).collect();
    by_speed.sort_by(|&a, &b| round_mean(a).total_cmp(&round_mean(b)));
    let fast = &by_speed[..rounds.div_ceil(FAST_SHARE)];
    let fast_no_program: Vec<f64> = fast.iter().map(|&r| ns[0][r]).collect();
    let added = |i: usize, base: usize| {
        let differences: Vec<f64> = ns[i]
            .iter()
            .zip(&ns[base])
            .map(|(with, without)| with - without)
            .collect();
        measure::median(&differences)
    };
    for (i, mode) in Mode::ALL.into_iter().enumerate() {
        let _ = writeln!(
            table,
            "| {} | {} | {:.1} | {} | {:.1} | {:.3} | {} |",
            mode.label(),
            spread(&ns[i], 1),
            added(i, 0),
            if !matches!(mode, Mode::None | Mode::Empty) {
                format!("{:.1}", added(i, 1))
            } else {
                "-".to_owned()
            },
            measure::median(
                &fast
                    .iter()
                    .map(|&r| ns[i][r] - ns[0][r])
                    .collect::<Vec<_>>()
            ),
            paired_ratio(&ns[i], &ns[0]),
            if per_run[i].is_empty() {
                "-".to_owned()
            } else {
                spread(&per_run[i], 1)
            }
        );
    }
    let _ = writeln!(
        table,
        "\nThe host's speed in this run: no program took {:.1} ns per open/close at the median \
         round and {full_speed:.1} in the fastest 5%. \"added, host at full speed\": the \
         median difference to no program over the fastest tenth of rounds ({} rounds, chosen by \
         the mean of every mode's time in the round; no program took {:.1} ns there at the \
         median), as every added figure grows with the no-program time when the host slows.",
        measure::median(&ns[0]),
        fast.len(),
        measure::median(&fast_no_program),
    );
    measure::publish(&table, options.out.as_deref())
}

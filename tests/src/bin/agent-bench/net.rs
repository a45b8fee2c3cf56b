//! `agent-bench net`: iperf3 between two network namespaces joined by veth,
//! client and server each in a cgroup under a benchmark root. Sections (all
//! by default; `--only` picks, comma-separated):
//!
//! - `throughput` (here): three modes interleaved run by run: no program, an
//!   empty cgroup_skb program (ingress and egress) attached at the root, and
//!   the real `agent daemon` attached at the root; and each program's ns per
//!   run from `kernel.bpf_stats_enabled` (measured in separate runs, since
//!   the stats themselves cost time on every run).
//! - `policy` (`netpolicy.rs`): network policies of 10 to 100,000 rules.
//! - `rate` (`netrate.rs`): the bandwidth caps' accuracy.
//! - `iptables` (`iptables.rs`): per-cgroup accounting by iptables rules
//!   beside the agent's, at 10 to 1,000 cgroups.

use std::{fmt::Write as _, fs, path::Path};

use agent_tests::{Cgroup, Daemon, VethPair};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};

use crate::{
    iperf::Iperf,
    iptables,
    measure::{self, paired_ratio, program_stats, spread, BpfStats},
    netpolicy, netrate, Options,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Throughput,
    Policy,
    Rate,
    Iptables,
}

impl Section {
    const ALL: [Self; 4] = [Self::Throughput, Self::Policy, Self::Rate, Self::Iptables];

    const fn name(self) -> &'static str {
        match self {
            Self::Throughput => "throughput",
            Self::Policy => "policy",
            Self::Rate => "rate",
            Self::Iptables => "iptables",
        }
    }

    /// The sections `--only` names, in this order; all when it names none.
    fn selected(only: &[String]) -> Result<Vec<Self>, String> {
        for name in only {
            if !Self::ALL.iter().any(|s| s.name() == name) {
                return Err(format!(
                    "--only {name:?}: no such section (known: throughput, policy, rate, iptables)"
                ));
            }
        }
        Ok(Self::ALL
            .into_iter()
            .filter(|s| only.is_empty() || only.iter().any(|name| name == s.name()))
            .collect())
    }
}

pub fn run(options: &Options) -> Result<(), String> {
    let sections = Section::selected(&options.only)?;
    agent_tests::require_root();
    let pair = VethPair::new();
    let iperf = Iperf { pair: &pair };
    let name = if options.only.is_empty() {
        "net".to_owned()
    } else {
        let names: Vec<&str> = sections.iter().map(|s| s.name()).collect();
        format!("net --only {}", names.join(","))
    };
    let mut table = measure::preamble(&name);
    let _ = writeln!(
        table,
        "iperf3 between two network namespaces over veth (client on CPU 0, server on CPU 1), each in a \
         cgroup under a benchmark root of the section's own. Modes interleaved run by run, {} repeats of \
         {} s after a warm-up. Cells: median (min to max). Ratios: median of the ratios within each \
         repeat, so that the host's drift between repeats cancels.",
        options.repeats, options.seconds
    );
    for section in sections {
        eprintln!("section {}", section.name());
        let text = match section {
            Section::Throughput => throughput(&iperf, options)?,
            Section::Policy => netpolicy::run(&iperf, options)?,
            Section::Rate => netrate::run(&iperf, options)?,
            Section::Iptables => iptables::run(&iperf, options)?,
        };
        let _ = writeln!(table);
        table.push_str(&text);
    }
    measure::publish(&table, options.out.as_deref())
}

/// Loads the empty cgroup_skb program and attaches it to `cgroup` at ingress
/// and egress; dropping the returned object detaches it.
pub fn attach_empty(cgroup: &Path) -> Result<aya::Ebpf, String> {
    let mut ebpf = aya::EbpfLoader::new()
        .allow_unsupported_maps()
        .load(agent::loader::EBPF_OBJECT)
        .map_err(|e| format!("loading the eBPF object: {e}"))?;
    let program: &mut CgroupSkb = ebpf
        .program_mut(common::programs::NET_EMPTY)
        .ok_or("net_empty is missing from the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    program
        .load()
        .map_err(|e| format!("loading net_empty: {e}"))?;
    let dir = fs::File::open(cgroup).map_err(|e| format!("opening {}: {e}", cgroup.display()))?;
    for hook in [CgroupSkbAttachType::Ingress, CgroupSkbAttachType::Egress] {
        program
            .attach(&dir, hook, CgroupAttachMode::Single)
            .map_err(|e| format!("attaching net_empty to {}: {e}", cgroup.display()))?;
    }
    Ok(ebpf)
}

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
            Self::Empty => "empty program",
            Self::Accounting => "accounting",
        }
    }
}

/// Programs attached for one mode; dropping detaches them (held, never read).
enum Attachment {
    None,
    Empty { _ebpf: aya::Ebpf },
    Accounting { _daemon: Daemon },
}

fn attach(root: &Cgroup, mode: Mode) -> Result<Attachment, String> {
    Ok(match mode {
        Mode::None => Attachment::None,
        Mode::Accounting => Attachment::Accounting {
            _daemon: Daemon::start(&root.path, &[]),
        },
        Mode::Empty => Attachment::Empty {
            _ebpf: attach_empty(&root.path)?,
        },
    })
}

/// The no program / empty program / accounting table.
fn throughput(iperf: &Iperf, options: &Options) -> Result<String, String> {
    let root = Cgroup::new_root("agent-bench-net");
    let client = root.child("client");
    let server = root.child("server");
    let seconds = options.seconds;
    eprintln!("warm-up: one run of each test in each mode");
    for mode in Mode::ALL {
        let _attached = attach(&root, mode)?;
        iperf.tcp(&client, &server, 1)?;
        iperf.udp64(&client, &server, 1, false)?;
    }

    let mut tcp = [vec![], vec![], vec![]];
    let mut udp = [vec![], vec![], vec![]];
    for repeat in 1..=options.repeats {
        for (i, mode) in Mode::ALL.into_iter().enumerate() {
            eprintln!(
                "repeat {repeat}/{}: {} ({seconds} s TCP, {seconds} s UDP)",
                options.repeats,
                mode.label()
            );
            let _attached = attach(&root, mode)?;
            tcp[i].push(iperf.tcp(&client, &server, seconds)?);
            udp[i].push(iperf.udp64(&client, &server, seconds, false)?);
            eprintln!(
                "  TCP {:.2} Gbit/s, UDP {:.0} kpps",
                tcp[i][tcp[i].len() - 1],
                udp[i][udp[i].len() - 1]
            );
        }
    }

    // ns per run: the same 64-byte UDP load with the kernel's run-time stats
    // on, in more and shorter runs (per-run cost varies more than throughput).
    let stats = BpfStats::enable();
    let mut ns = [vec![], vec![]];
    let ns_seconds = 1;
    let ns_repeats = options.repeats * 4;
    for repeat in 1..=ns_repeats {
        for (i, mode) in [Mode::Empty, Mode::Accounting].into_iter().enumerate() {
            eprintln!("repeat {repeat}/{ns_repeats}: ns per run, {}", mode.label());
            let _attached = attach(&root, mode)?;
            let before = program_stats(&root.path);
            iperf.udp64(&client, &server, ns_seconds, false)?;
            let after = program_stats(&root.path);
            let runs = after.1.saturating_sub(before.1);
            if runs == 0 {
                return Err(format!("{}: the programs did not run", mode.label()));
            }
            #[expect(clippy::cast_precision_loss, reason = "nanoseconds per run")]
            ns[i].push(after.0.saturating_sub(before.0) as f64 / runs as f64);
        }
    }
    drop(stats);

    let mut table = String::new();
    let _ = writeln!(table, "## Accounting programs at the root");
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "Programs attached at the benchmark root. ns per run: kernel.bpf_stats_enabled=1 during \
         {ns_repeats} separate interleaved {ns_seconds} s runs of the UDP load per mode (one program run \
         per packet per hook; the figure includes the kernel's own cost of timing each run).",
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| measure | no program | empty program | accounting | empty / none | accounting / none |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|");
    for (label, values, digits) in [
        ("TCP throughput (Gbit/s)", &tcp, 2),
        ("UDP 64-byte (k packets/s received)", &udp, 0),
    ] {
        let _ = writeln!(
            table,
            "| {label} | {} | {} | {} | {:.3} | {:.3} |",
            spread(&values[0], digits),
            spread(&values[1], digits),
            spread(&values[2], digits),
            paired_ratio(&values[1], &values[0]),
            paired_ratio(&values[2], &values[0]),
        );
    }
    let _ = writeln!(table);
    let _ = writeln!(table, "| program | ns per run | ratio to empty |");
    let _ = writeln!(table, "|---|---:|---:|");
    let _ = writeln!(table, "| empty cgroup_skb | {} | 1.00 |", spread(&ns[0], 1));
    let _ = writeln!(
        table,
        "| accounting (net_ingress + net_egress) | {} | {:.2} |",
        spread(&ns[1], 1),
        paired_ratio(&ns[1], &ns[0])
    );
    Ok(table)
}

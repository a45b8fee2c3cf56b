//! `agent-bench net --only policy`: what a network policy costs per packet,
//! at 10, 1,000 and 100,000 CIDR rules.
//!
//! Each policy sits on a client cgroup of its own (the guards attached there,
//! the rules in their maps, as `agent run` installs them; no daemon); the
//! modes only choose the cgroup iperf3's client runs in, so nothing is
//! attached or written between runs. Every rule denies an address block
//! that does not hold the server's address: every packet does the real
//! lookup and passes by the default.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use agent::{
    enforce, loader,
    policy::{
        network::{self, Cidr, Direction, NetRule, Protocol},
        Action, NetworkPolicy,
    },
};
use agent_tests::Cgroup;

use crate::{
    iperf::Iperf,
    measure::{self, paired_ratio, program_stats_by_id, spread, BpfStats},
    net, Options,
};

/// Rules per policy, half egress and half ingress.
const SIZES: [usize; 3] = [10, 1_000, 100_000];

/// `count` IPv4 addresses next to `server` but outside its /24: the /24s
/// nearest it (its own with one bit of the upper 24 flipped, then two, ...),
/// filled in order. The trie then holds the server's near neighbours, so
/// the lookup of its address walks the longest path these rules make.
fn neighbours(server: Ipv4Addr, count: usize) -> Vec<Ipv4Addr> {
    let base = u32::from(server) & !0xff;
    (0..count)
        .map(|k| {
            let block = u32::try_from(k / 256 + 1).unwrap_or(u32::MAX) & 0xffff;
            let host = u32::try_from(k % 256).unwrap_or(0);
            Ipv4Addr::from((base ^ (block << 8)) | host)
        })
        .collect()
}

/// One direction of deny rules, one /32 each, default allow.
fn direction(addresses: &[Ipv4Addr]) -> Result<Direction, String> {
    let direction = Direction {
        default: Action::Allow,
        rules: addresses
            .iter()
            .map(|addr| NetRule {
                action: Action::Deny,
                cidr: Some(Cidr {
                    addr: IpAddr::V4(*addr),
                    len: 32,
                }),
                protocol: Protocol::Any,
                ports: None,
            })
            .collect(),
    };
    // The enforcer skips a direction that does not compile: check here, so
    // that no figure is of an empty table.
    let table = network::compile(&direction)
        .map_err(|e| format!("{} rules do not compile: {e}", addresses.len()))?;
    if table.len() != addresses.len() + 2 {
        return Err(format!(
            "{} rules compiled to {} trie entries, not one each plus /0 of each family",
            addresses.len(),
            table.len()
        ));
    }
    Ok(direction)
}

/// A policy on a cgroup, attached and written; dropping it detaches, then
/// removes the cgroup.
pub struct Installed {
    _guard: loader::WorkloadGuard,
    _maps: loader::NetworkMaps,
    pub cgroup: Cgroup,
}

/// Attaches the network guards to `cgroup` and puts `policy` in force there.
/// Returns them with the number of trie entries the maps hold.
pub fn install(cgroup: Cgroup, policy: &NetworkPolicy) -> Result<(Installed, usize), String> {
    let guards = loader::Guards {
        devices: false,
        network: true,
    };
    let (guard, _devices, mut maps) =
        loader::guard_workload(&cgroup.path, None, guards).map_err(|e| {
            format!(
                "attaching the network guards to {}: {e}",
                cgroup.path.display()
            )
        })?;
    enforce::set_for_run(&mut maps, cgroup.id(), enforce::RUN_VERSIONS | 1, policy)
        .map_err(|e| format!("writing the policy of {}: {e}", cgroup.path.display()))?;
    let entries = maps.rules.keys().filter(Result::is_ok).count();
    Ok((
        Installed {
            _guard: guard,
            _maps: maps,
            cgroup,
        },
        entries,
    ))
}

/// Checks that the guards decide for `cgroup`: a connect() to `denied`
/// fails with EPERM (the connect program refuses it before any packet;
/// without the policy there is no route to it and the error would be
/// ENETUNREACH), and one to the server's closed port 9 is refused by the
/// server (a SYN out and a reset back, both passed).
fn check_in_force(iperf: &Iperf, cgroup: &Cgroup, denied: Ipv4Addr) -> Result<(), String> {
    let out = cgroup
        .command(agent_tests::netpeer_bin(), Some(&iperf.pair.a))
        .args([
            "try",
            &format!("tcp:{denied}:9"),
            &format!("tcp:{}:9", iperf.pair.b_addr),
        ])
        .output()
        .map_err(|e| format!("running netpeer: {e}"))?;
    let verdicts = String::from_utf8_lossy(&out.stdout);
    let verdicts: Vec<&str> = verdicts.lines().collect();
    if !out.status.success() || verdicts != ["EPERM", "ECONNREFUSED"] {
        return Err(format!(
            "the policy of {} is not in force: connects to {denied} (denied) and to the server \
             gave {verdicts:?}, not EPERM and ECONNREFUSED {}",
            cgroup.path.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The `total`-rule policy for `cgroup`, checked; and how long it took.
fn policy_cgroup(iperf: &Iperf, root: &Cgroup, total: usize) -> Result<(Installed, f64), String> {
    let server = iperf.server_addr()?;
    let egress = total - total / 2;
    let ingress = total / 2;
    eprintln!(
        "installing the {total}-rule policy ({egress} egress, {ingress} ingress): compiling and \
         writing {} trie entries",
        total + 4
    );
    let started = Instant::now();
    let addresses = neighbours(server, egress.max(ingress));
    let policy = NetworkPolicy {
        egress: Some(direction(&addresses[..egress])?),
        ingress: Some(direction(&addresses[..ingress])?),
        ..NetworkPolicy::default()
    };
    let (installed, entries) = install(root.child(&format!("rules-{total}")), &policy)?;
    let took = started.elapsed().as_secs_f64();
    if entries != total + 4 {
        return Err(format!(
            "the {total}-rule policy's maps hold {entries} trie entries, not {}",
            total + 4
        ));
    }
    check_in_force(iperf, &installed.cgroup, addresses[egress - 1])?;
    eprintln!("  in force after {took:.2} s");
    Ok((installed, took))
}

pub fn run(iperf: &Iperf, options: &Options) -> Result<String, String> {
    let root = Cgroup::new_root("agent-bench-netpolicy");
    let server = root.child("server");
    let plain = root.child("plain");
    let empty = root.child("empty");
    let _empty_program = net::attach_empty(&empty.path)?;
    let mut policies = Vec::new();
    let mut install_secs = Vec::new();
    for total in SIZES {
        let (installed, took) = policy_cgroup(iperf, &root, total)?;
        policies.push(installed);
        install_secs.push(took);
    }
    // Throughput: no program, then each policy.
    let clients: Vec<&Cgroup> = std::iter::once(&plain)
        .chain(policies.iter().map(|p| &p.cgroup))
        .collect();
    let labels: Vec<String> = std::iter::once("no program".to_owned())
        .chain(SIZES.iter().map(|n| format!("{} rules", thousands(*n))))
        .collect();
    let seconds = options.seconds;
    eprintln!("warm-up: one run of each test in each mode");
    for client in &clients {
        iperf.tcp(client, &server, 1)?;
        iperf.udp64(client, &server, 1, false)?;
    }
    let mut tcp = vec![Vec::new(); clients.len()];
    let mut udp = vec![Vec::new(); clients.len()];
    // Each repeat starts with another mode, so that no mode always runs in
    // the same place of the sequence (the host's periodic work would then
    // fall on it every time).
    for repeat in 1..=options.repeats {
        for k in 0..clients.len() {
            let i = (k + repeat) % clients.len();
            let client = clients[i];
            tcp[i].push(iperf.tcp(client, &server, seconds)?);
            udp[i].push(iperf.udp64(client, &server, seconds, false)?);
            eprintln!(
                "repeat {repeat}/{}: {}: TCP {:.2} Gbit/s, UDP {:.0} kpps",
                options.repeats,
                labels[i],
                tcp[i][tcp[i].len() - 1],
                udp[i][udp[i].len() - 1]
            );
        }
    }

    // ns per packet of each guard, 64-byte UDP from the client (egress) and
    // to it (-R, ingress), beside the empty program.
    let measured: Vec<&Cgroup> = std::iter::once(&empty)
        .chain(policies.iter().map(|p| &p.cgroup))
        .collect();
    let stats = BpfStats::enable();
    let ns_repeats = options.repeats * 2;
    let mut ns = vec![[Vec::new(), Vec::new()]; measured.len()];
    for repeat in 1..=ns_repeats {
        eprintln!("repeat {repeat}/{ns_repeats}: ns per packet");
        for (i, cgroup) in measured.iter().enumerate() {
            for (d, (hook, reverse)) in
                [("cgroup_inet_egress", false), ("cgroup_inet_ingress", true)]
                    .into_iter()
                    .enumerate()
            {
                let ids = measure::attached_ids(&cgroup.path, hook);
                if ids.is_empty() {
                    return Err(format!(
                        "no {hook} program is attached to {}",
                        cgroup.path.display()
                    ));
                }
                let before = program_stats_by_id(&ids);
                iperf.udp64(cgroup, &server, 1, reverse)?;
                let after = program_stats_by_id(&ids);
                let runs = after.1.saturating_sub(before.1);
                if runs < 1000 {
                    return Err(format!(
                        "{hook} of {} ran {runs} times in a 1 s UDP run",
                        cgroup.path.display()
                    ));
                }
                #[expect(clippy::cast_precision_loss, reason = "nanoseconds per run")]
                ns[i][d].push(after.0.saturating_sub(before.0) as f64 / runs as f64);
            }
        }
    }
    // The guards' share of the CPUs during TCP runs: what they can take from
    // a CPU-bound transfer, measured exactly rather than read off the
    // throughput, which this host's neighbours move by far more.
    let mut share = vec![Vec::new(); policies.len()];
    for _ in 0..options.repeats {
        for (i, policy) in policies.iter().enumerate() {
            let ids: Vec<u32> = ["cgroup_inet_egress", "cgroup_inet_ingress"]
                .into_iter()
                .flat_map(|hook| measure::attached_ids(&policy.cgroup.path, hook))
                .collect();
            let before = program_stats_by_id(&ids);
            let start = std::time::Instant::now();
            let gbits = iperf.tcp(&policy.cgroup, &server, 2)?;
            let elapsed = start.elapsed().as_secs_f64();
            let after = program_stats_by_id(&ids);
            #[expect(clippy::cast_precision_loss, reason = "ns and counts")]
            let (time_ns, runs) = (
                after.0.saturating_sub(before.0) as f64,
                after.1.saturating_sub(before.1) as f64,
            );
            share[i].push((
                time_ns / (elapsed * 2e9),
                runs / elapsed,
                time_ns / runs.max(1.0),
                gbits,
            ));
        }
    }
    drop(stats);

    let mut table = String::new();
    let _ = writeln!(table, "## Network policy: 10 to 100,000 rules");
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "Each repeat starts with the next mode in turn, so that none always runs in the same place of \
         the sequence. Each policy is on a client cgroup of its own: the guards (net_guard_egress, net_guard_ingress, \
         and the connect programs) attached there and the rules written to their maps as `agent run` \
         does, without the daemon; each mode runs iperf3's client in its cgroup, so nothing is attached \
         or written between runs. A policy of N rules: N/2 egress and N/2 ingress deny rules (a \
         direction holds at most 65,535), default allow, each a /32 filling the /24s next to the \
         server's (its own /24 left out), so that no rule holds the server's address and the LPM lookup \
         of that address walks the longest path the rules make; every packet passes, the first of a \
         flow after the real lookup, the others on the verdict the guard cached per CPU. Before measuring, each policy was checked: its maps hold N + 4 trie entries (and /0 of \
         each family per direction), a connect() to the last egress rule's address fails with EPERM, \
         one to the server passes. Compiling and writing took {} s (10, 1,000, 100,000 rules). ns per \
         packet: kernel.bpf_stats_enabled=1 during {ns_repeats} interleaved 1 s runs per mode and \
         direction, 64-byte UDP from the client (the egress program, one run per datagram) and to it \
         (iperf3 -R: the ingress program); the figure includes the kernel's own cost of timing each run.",
        install_secs
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(table);
    let _ = write!(table, "| measure |");
    for label in &labels {
        let _ = write!(table, " {label} |");
    }
    for label in &labels[1..] {
        let _ = write!(table, " {label} / none |");
    }
    let _ = writeln!(table);
    let _ = writeln!(table, "|---|{}", "---:|".repeat(labels.len() * 2 - 1));
    for (label, values, digits) in [
        ("TCP throughput (Gbit/s)", &tcp, 2),
        ("UDP 64-byte (k packets/s received)", &udp, 0),
    ] {
        let _ = write!(table, "| {label} |");
        for v in values {
            let _ = write!(table, " {} |", spread(v, digits));
        }
        for v in &values[1..] {
            let _ = write!(table, " {:.3} |", paired_ratio(v, &values[0]));
        }
        let _ = writeln!(table);
    }
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| program | egress ns per packet | ingress ns per packet | egress / empty | ingress / empty |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|");
    for (i, label) in std::iter::once("empty cgroup_skb".to_owned())
        .chain(
            SIZES
                .iter()
                .map(|n| format!("guards, {} rules", thousands(*n))),
        )
        .enumerate()
    {
        let _ = writeln!(
            table,
            "| {label} | {} | {} | {:.2} | {:.2} |",
            spread(&ns[i][0], 1),
            spread(&ns[i][1], 1),
            paired_ratio(&ns[i][0], &ns[0][0]),
            paired_ratio(&ns[i][1], &ns[0][1]),
        );
    }
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "The guards' time during TCP runs (kernel.bpf_stats_enabled=1, {} runs of 2 s per policy, both \
         guards of the client's cgroup): their share of the two CPUs, which iperf3 over veth keeps busy, \
         bounds what they can take from throughput (\"bound\": 1 - share; the kernel's timing of each \
         run is counted in, so the bound is low). Cells: medians.",
        options.repeats
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| policy | TCP (Gbit/s) | guard runs per s | ns per run | share of 2 CPUs | throughput bound |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|");
    for (i, n) in SIZES.iter().enumerate() {
        let column = |f: fn(&(f64, f64, f64, f64)) -> f64| -> f64 {
            measure::median(&share[i].iter().map(f).collect::<Vec<_>>())
        };
        let cpu = column(|s| s.0);
        let _ = writeln!(
            table,
            "| {} rules | {:.2} | {:.0} | {:.1} | {:.2}% | {:.4} |",
            thousands(*n),
            column(|s| s.3),
            column(|s| s.1),
            column(|s| s.2),
            cpu * 100.0,
            1.0 - cpu
        );
    }
    drop(policies);
    Ok(table)
}

/// `100000` → `100,000`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

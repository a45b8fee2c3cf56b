//! `agent-bench net --only iptables`: per-cgroup accounting of the same
//! traffic by iptables rules and by the agent, at 10, 100 and 1,000 cgroups.
//!
//! For each count, that many sibling cgroups under a benchmark root, the
//! client in the last. iptables: one counting rule per cgroup (`-m cgroup
//! --path`, no target) in the OUTPUT chain of the client's namespace, in
//! cgroup order, so that every packet the client sends walks them all. The
//! agent: the real `agent daemon` watching the root. Both only ever inside
//! what the benchmark made: the rules in its namespace, the daemon's
//! programs at its root.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use agent_tests::{Cgroup, Daemon, Netns};

use crate::{
    iperf::Iperf,
    measure::{paired_ratio, spread},
    netpolicy::thousands,
    Options,
};

const COUNTS: [usize; 3] = [10, 100, 1_000];

/// Runs `iptables ARGS` (or another of its tools) inside `ns`, with `input`
/// on its standard input; returns its standard output.
fn iptables(ns: &Netns, tool: &str, args: &[&str], input: &str) -> Result<String, String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, tool, "-w"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {tool} in {}: {e}", ns.name))?;
    let written = child
        .stdin
        .take()
        .map_or(Ok(()), |mut stdin| stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {tool}: {e}"))?;
    written.map_err(|e| format!("writing to {tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} {} in {} failed ({}): {}",
            args.join(" "),
            ns.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Counting rules in the OUTPUT chain of a namespace; flushed on drop.
struct Rules<'a> {
    ns: &'a Netns,
}

impl<'a> Rules<'a> {
    /// One rule per path (relative to the cgroup v2 mount), in order.
    fn install(ns: &'a Netns, paths: &[String]) -> Result<Self, String> {
        let mut text = String::from("*filter\n");
        for path in paths {
            let _ = writeln!(text, "-A OUTPUT -m cgroup --path {path}");
        }
        text.push_str("COMMIT\n");
        let rules = Self { ns };
        iptables(ns, "iptables-restore", &["--noflush"], &text)?;
        Ok(rules)
    }

    /// `(path, packets, bytes)` of each rule, in order.
    fn counters(&self) -> Result<Vec<(String, u64, u64)>, String> {
        let text = iptables(self.ns, "iptables", &["-L", "OUTPUT", "-v", "-x", "-n"], "")?;
        text.lines()
            .skip(2)
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let bad = || format!("unexpected iptables -L line {line:?}");
                let path = line.split(" cgroup ").nth(1).ok_or_else(bad)?.trim();
                let packets = fields
                    .first()
                    .and_then(|f| f.parse().ok())
                    .ok_or_else(bad)?;
                let bytes = fields.get(1).and_then(|f| f.parse().ok()).ok_or_else(bad)?;
                Ok((path.trim_matches('"').to_owned(), packets, bytes))
            })
            .collect()
    }
}

impl Drop for Rules<'_> {
    fn drop(&mut self) {
        let _ = iptables(self.ns, "iptables", &["-F", "OUTPUT"], "");
    }
}

#[derive(Clone, Copy)]
enum Mode {
    None,
    Iptables,
    Agent,
}

impl Mode {
    const ALL: [Self; 3] = [Self::None, Self::Iptables, Self::Agent];
}

/// What a mode set up; dropping it removes the rules or stops the daemon.
enum Attached<'a> {
    None,
    Rules(#[expect(dead_code, reason = "held for its drop")] Rules<'a>),
    Agent(#[expect(dead_code, reason = "held for its drop")] Daemon),
}

/// One cgroup count's cgroups, paths and measurements.
struct Count<'a> {
    iperf: &'a Iperf<'a>,
    paths: Vec<String>,
    cgroups: Vec<Cgroup>,
    server: Cgroup,
    root: Cgroup,
}

impl<'a> Count<'a> {
    fn new(iperf: &'a Iperf<'a>, count: usize) -> Result<Self, String> {
        let root = Cgroup::new_root("agent-bench-ipt");
        let server = root.child("server");
        let cgroups: Vec<Cgroup> = (0..count).map(|i| root.child(&format!("c{i}"))).collect();
        let mount = agent_tests::v2_mount();
        let paths = cgroups
            .iter()
            .map(|c| relative(&mount, &c.path))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            iperf,
            paths,
            cgroups,
            server,
            root,
        })
    }

    fn client(&self) -> Result<&Cgroup, String> {
        self.cgroups.last().ok_or_else(|| "no cgroups".into())
    }

    fn attach(&self, mode: Mode) -> Result<Attached<'a>, String> {
        Ok(match mode {
            Mode::None => Attached::None,
            Mode::Iptables => Attached::Rules(Rules::install(&self.iperf.pair.a, &self.paths)?),
            Mode::Agent => Attached::Agent(Daemon::start(&self.root.path, &[])),
        })
    }

    /// Checks that the rules count the client's packets and only those,
    /// over 1 s of 64-byte UDP.
    fn check(&self) -> Result<Checked, String> {
        let started = Instant::now();
        let rules = Rules::install(&self.iperf.pair.a, &self.paths)?;
        let install_secs = started.elapsed().as_secs_f64();
        let sent = self.iperf.udp64_sent(self.client()?, &self.server, 1)?;
        let counters = rules.counters()?;
        drop(rules);
        let count = self.cgroups.len();
        let client_path = self.paths.last().map_or("", String::as_str);
        if counters.len() != count {
            return Err(format!(
                "{} iptables rules listed for {count} cgroups",
                counters.len()
            ));
        }
        let mut checked = Checked {
            count,
            sent,
            packets: 0,
            bytes: 0,
            others: 0,
            install_secs,
        };
        for (path, packets, bytes) in &counters {
            if path == client_path {
                (checked.packets, checked.bytes) = (*packets, *bytes);
            } else {
                checked.others += packets;
            }
        }
        if checked.packets < sent || checked.others != 0 {
            return Err(format!(
                "at {count} cgroups the client's iptables rule counted {} packets for {sent} \
                 datagrams sent, and the other rules {}: the rules do not count the client's traffic",
                checked.packets, checked.others
            ));
        }
        Ok(checked)
    }
}

/// What the counters said in [`Count::check`].
struct Checked {
    count: usize,
    sent: u64,
    packets: u64,
    bytes: u64,
    others: u64,
    install_secs: f64,
}

/// `path` relative to the v2 mount, with a leading slash (what `--path` takes).
fn relative(mount: &Path, path: &Path) -> Result<String, String> {
    path.strip_prefix(mount)
        .map(|rest| format!("/{}", rest.display()))
        .map_err(|_| {
            format!(
                "{} is not under the cgroup v2 mount {}",
                path.display(),
                mount.display()
            )
        })
}

pub fn run(iperf: &Iperf, options: &Options) -> Result<String, String> {
    let version = iptables(&iperf.pair.a, "iptables", &["--version"], "")?;
    let seconds = options.seconds;
    let mut checks = Vec::new();
    // [count][mode] runs.
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for count in COUNTS {
        eprintln!("{count} cgroups: creating them and checking the iptables counters");
        let set = Count::new(iperf, count)?;
        checks.push(set.check()?);
        let client = set.client()?;
        eprintln!("warm-up: one run of each test in each mode");
        for mode in Mode::ALL {
            let _attached = set.attach(mode)?;
            iperf.tcp(client, &set.server, 1)?;
            iperf.udp64(client, &set.server, 1, false)?;
        }
        let mut count_tcp = vec![Vec::new(); Mode::ALL.len()];
        let mut count_udp = vec![Vec::new(); Mode::ALL.len()];
        for repeat in 1..=options.repeats {
            for (i, mode) in Mode::ALL.into_iter().enumerate() {
                let _attached = set.attach(mode)?;
                count_tcp[i].push(iperf.tcp(client, &set.server, seconds)?);
                count_udp[i].push(iperf.udp64(client, &set.server, seconds, false)?);
            }
            eprintln!(
                "{count} cgroups, repeat {repeat}/{}: TCP {:.2} / {:.2} / {:.2} Gbit/s, UDP {:.0} / \
                 {:.0} / {:.0} kpps (none / iptables / agent)",
                options.repeats,
                count_tcp[0][repeat - 1],
                count_tcp[1][repeat - 1],
                count_tcp[2][repeat - 1],
                count_udp[0][repeat - 1],
                count_udp[1][repeat - 1],
                count_udp[2][repeat - 1],
            );
        }
        tcp.push(count_tcp);
        udp.push(count_udp);
    }

    let mut table = String::new();
    let _ = writeln!(
        table,
        "## Per-cgroup accounting: iptables rules and the agent"
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "The same traffic counted per cgroup, at 10, 100 and 1,000 sibling cgroups under the benchmark \
         root, the client in the last. iptables: one counting rule per cgroup (`-m cgroup --path \
         PATH`, no target) in the OUTPUT chain of the client's namespace, in cgroup order, so every \
         packet the client sends walks them all ({}; with the nf_tables backend the xt cgroup match \
         runs through nft_compat); it counts only what the client sends. Agent: the real `agent \
         daemon` watching the benchmark root (both directions, every cgroup). No program and no rule \
         is the baseline. Checked before measuring, with the counters of `iptables -L OUTPUT -v -x \
         -n` after 1 s of 64-byte UDP: the client's rule counts every datagram iperf3 sent (and the \
         packets of its control connection), the other rules nothing.",
        version.trim()
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| cgroups | datagrams sent | packets (bytes) the client's rule counted | packets the other rules counted | installing the rules (s) |"
    );
    let _ = writeln!(table, "|---:|---:|---:|---:|---:|");
    for c in &checks {
        let _ = writeln!(
            table,
            "| {} | {} | {} ({}) | {} | {:.2} |",
            thousands(c.count),
            c.sent,
            c.packets,
            c.bytes,
            c.others,
            c.install_secs
        );
    }
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| cgroups | measure | no program, no rules | iptables rules | agent | iptables / none | agent / none |"
    );
    let _ = writeln!(table, "|---:|---|---:|---:|---:|---:|---:|");
    for (c, count) in COUNTS.iter().enumerate() {
        for (label, values, digits) in [
            ("TCP (Gbit/s)", &tcp[c], 2),
            ("UDP 64-byte (k packets/s)", &udp[c], 0),
        ] {
            let _ = writeln!(
                table,
                "| {} | {label} | {} | {} | {} | {:.3} | {:.3} |",
                thousands(*count),
                spread(&values[0], digits),
                spread(&values[1], digits),
                spread(&values[2], digits),
                paired_ratio(&values[1], &values[0]),
                paired_ratio(&values[2], &values[0]),
            );
        }
    }
    Ok(table)
}

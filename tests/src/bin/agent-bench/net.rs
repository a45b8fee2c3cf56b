//! `agent-bench net`: iperf3 between two network namespaces joined by veth,
//! client and server each in a cgroup under a benchmark root, in three modes
//! interleaved run by run: no program, an empty cgroup_skb program (ingress
//! and egress) attached at the root, and the real `agent daemon` attached at
//! the root. Medians of the repeats, ratios to no program, and each program's
//! ns per run from `kernel.bpf_stats_enabled` (measured in separate runs,
//! since the stats themselves cost time on every run).

use std::{
    fmt::Write as _,
    fs,
    process::{Child, Stdio},
    time::Duration,
};

use agent_tests::{Cgroup, Daemon, VethPair};

use crate::{
    measure::{self, paired_ratio, program_stats, spread, BpfStats},
    Options,
};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};

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

struct Bench {
    root: Cgroup,
    client: Cgroup,
    server: Cgroup,
    pair: VethPair,
}

/// Programs attached for one mode; dropping detaches them (held, never read).
enum Attachment {
    None,
    Empty { _ebpf: aya::Ebpf },
    Accounting { _daemon: Daemon },
}

impl Bench {
    fn attach(&self, mode: Mode) -> Result<Attachment, String> {
        match mode {
            Mode::None => Ok(Attachment::None),
            Mode::Accounting => Ok(Attachment::Accounting {
                _daemon: Daemon::start(&self.root.path, &[]),
            }),
            Mode::Empty => {
                let mut ebpf =
                    aya::Ebpf::load(agent::loader::EBPF_OBJECT).map_err(|e| e.to_string())?;
                let program: &mut CgroupSkb = ebpf
                    .program_mut(common::programs::NET_EMPTY)
                    .ok_or("net_empty is missing from the object")?
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| e.to_string())?;
                program.load().map_err(|e| e.to_string())?;
                let cgroup = fs::File::open(&self.root.path).map_err(|e| e.to_string())?;
                for hook in [CgroupSkbAttachType::Ingress, CgroupSkbAttachType::Egress] {
                    program
                        .attach(&cgroup, hook, CgroupAttachMode::Single)
                        .map_err(|e| e.to_string())?;
                }
                Ok(Attachment::Empty { _ebpf: ebpf })
            }
        }
    }

    fn iperf3_server(&self) -> Child {
        let mut server = self
            .server
            .command("iperf3", Some(&self.pair.b))
            .args([
                "-s",
                "-1",
                "-B",
                &self.pair.b_addr,
                "-p",
                "5201",
                "--forceflush",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 server");
        // Wait for "Server listening", then keep draining so it never blocks on a full pipe.
        let stdout = server.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.starts_with("Server listening") {
                    let _ = ready_tx.send(());
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("iperf3 server did not start");
        server
    }

    /// One iperf3 run; returns its JSON report.
    fn iperf3(&self, extra: &[&str], seconds: u32) -> Result<serde_json::Value, String> {
        let mut server = self.iperf3_server();
        let output = self
            .client
            .command("iperf3", Some(&self.pair.a))
            .args([
                "-c",
                &self.pair.b_addr,
                "-p",
                "5201",
                "-J",
                "-A",
                "0,1",
                "-t",
                &seconds.to_string(),
            ])
            .args(extra)
            .output();
        if output.is_err() {
            let _ = server.kill();
        }
        let _ = server.wait();
        let output = output.map_err(|e| format!("iperf3 client: {e}"))?;
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).map_err(|e| format!("iperf3 JSON: {e}"))?;
        if let Some(error) = report.get("error") {
            return Err(format!("iperf3: {error}"));
        }
        Ok(report)
    }

    /// TCP throughput received, in Gbit/s.
    fn tcp(&self, seconds: u32) -> Result<f64, String> {
        let report = self.iperf3(&[], seconds)?;
        report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|bps| bps / 1e9)
            .ok_or_else(|| "iperf3 report has no end.sum_received".into())
    }

    /// 64-byte UDP datagrams received per second, in thousands.
    fn udp64(&self, seconds: u32) -> Result<f64, String> {
        let report = self.iperf3(&["-u", "-b", "0", "-l", "64"], seconds)?;
        let sum = &report["end"]["sum"];
        let (packets, lost, secs) = (
            sum["packets"].as_f64(),
            sum["lost_packets"].as_f64(),
            sum["seconds"].as_f64(),
        );
        match (packets, lost, secs) {
            (Some(packets), Some(lost), Some(secs)) if secs > 0.0 => {
                Ok((packets - lost) / secs / 1e3)
            }
            _ => Err("iperf3 report has no end.sum packets".into()),
        }
    }
}

pub fn run(options: &Options) -> Result<(), String> {
    agent_tests::require_root();
    let root = Cgroup::new_root("agent-bench-net");
    let bench = Bench {
        client: root.child("client"),
        server: root.child("server"),
        root,
        pair: VethPair::new(),
    };
    let seconds = options.seconds;
    eprintln!("warm-up: one run of each test in each mode");
    for mode in Mode::ALL {
        let _attached = bench.attach(mode)?;
        bench.tcp(1)?;
        bench.udp64(1)?;
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
            let _attached = bench.attach(mode)?;
            tcp[i].push(bench.tcp(seconds)?);
            udp[i].push(bench.udp64(seconds)?);
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
            let _attached = bench.attach(mode)?;
            let before = program_stats(&bench.root.path);
            bench.udp64(ns_seconds)?;
            let after = program_stats(&bench.root.path);
            let runs = after.1.saturating_sub(before.1);
            if runs == 0 {
                return Err(format!("{}: the programs did not run", mode.label()));
            }
            #[expect(clippy::cast_precision_loss, reason = "nanoseconds per run")]
            ns[i].push(after.0.saturating_sub(before.0) as f64 / runs as f64);
        }
    }
    drop(stats);

    let mut table = measure::preamble("net");
    let _ = writeln!(
        table,
        "iperf3 between two network namespaces over veth (client on CPU 0, server on \
         CPU 1), each in a cgroup under the benchmark root; programs attached at that root. Modes \
         interleaved run by run, {} repeats of {seconds} s after a warm-up. Cells: median (min to max). \
         Ratios: median of the ratios within each repeat, so that the host's drift between repeats \
         cancels. ns per run: kernel.bpf_stats_enabled=1 during {ns_repeats} separate interleaved \
         {ns_seconds} s runs of the UDP load per mode (one program run per packet per hook; the figure \
         includes the kernel's own cost of timing each run).",
        options.repeats,
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
    measure::publish(&table, options.out.as_deref())
}

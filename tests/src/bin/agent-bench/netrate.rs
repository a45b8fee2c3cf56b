//! `agent-bench net --only rate`: how close the bandwidth caps hold iperf3
//! TCP to the cap, and what they cost TCP in retransmits.
//!
//! Each cap is on a cgroup of its own (the guards attached there, a policy
//! with only the cap, as `agent run --egress-rate` installs it). Egress caps:
//! the capped cgroup's iperf3 client sends. The ingress cap: it receives
//! (`-R`, the server sends).

use std::fmt::Write as _;

use agent::policy::{
    network::{default_burst, Rate},
    NetworkPolicy,
};
use agent_tests::Cgroup;

use crate::{
    iperf::Iperf,
    measure::{median, spread},
    netpolicy::{install, Installed},
    Options,
};

/// The caps: bits per second, egress (else ingress), and a burst in bytes
/// other than the default. The ingress cap also with the egress default
/// burst, to show why ingress has its own: a received 64 KiB segment-
/// offload packet takes the whole of it.
const CAPS: [(u64, bool, Option<u64>); 7] = [
    (10_000_000, true, None),
    (50_000_000, true, None),
    (200_000_000, true, None),
    (1_000_000_000, true, None),
    (50_000_000, false, None),
    (200_000_000, false, None),
    (50_000_000, false, Some(64 << 10)),
];

struct Cap {
    bits_per_s: u64,
    egress: bool,
    burst: Option<u64>,
    installed: Installed,
}

impl Cap {
    fn new(
        root: &Cgroup,
        bits_per_s: u64,
        egress: bool,
        burst: Option<u64>,
    ) -> Result<Self, String> {
        let rate = Some(Rate {
            bits_per_s,
            burst_bytes: burst.unwrap_or_else(|| default_burst(bits_per_s, egress)),
        });
        let policy = if egress {
            NetworkPolicy {
                egress_rate: rate,
                ..NetworkPolicy::default()
            }
        } else {
            NetworkPolicy {
                ingress_rate: rate,
                ..NetworkPolicy::default()
            }
        };
        let name = format!(
            "{}-{bits_per_s}-{}",
            if egress { "egress" } else { "ingress" },
            burst.unwrap_or(0)
        );
        let (installed, _) = install(root.child(&name), &policy)?;
        Ok(Self {
            bits_per_s,
            egress,
            burst,
            installed,
        })
    }

    fn label(&self) -> String {
        let bits = self.bits_per_s;
        let rate = if bits >= 1_000_000_000 {
            format!("{} Gbit/s", bits / 1_000_000_000)
        } else {
            format!("{} Mbit/s", bits / 1_000_000)
        };
        let burst = self
            .burst
            .map_or(String::new(), |b| format!(", burst {} KiB", b / 1024));
        format!(
            "{rate} {}{burst}",
            if self.egress { "egress" } else { "ingress" }
        )
    }
}

/// One cap's runs.
#[derive(Default)]
struct Runs {
    mbit: Vec<f64>,
    ratio: Vec<f64>,
    steady: Vec<f64>,
    retransmits: Vec<f64>,
    retransmit_percent: Vec<f64>,
}

pub fn run(iperf: &Iperf, options: &Options) -> Result<String, String> {
    let root = Cgroup::new_root("agent-bench-netrate");
    let server = root.child("server");
    let mut caps = Vec::new();
    for (bits, egress, burst) in CAPS {
        caps.push(Cap::new(&root, bits, egress, burst)?);
    }
    // The steady figure leaves out the first second: runs last at least 2 s.
    let seconds = options.seconds.max(2);
    let mut runs: Vec<Runs> = caps.iter().map(|_| Runs::default()).collect();
    for repeat in 1..=options.repeats {
        for (cap, runs) in caps.iter().zip(&mut runs) {
            let extra: &[&str] = if cap.egress { &[] } else { &["-R"] };
            let tcp = iperf.tcp_run(&cap.installed.cgroup, &server, extra, seconds)?;
            let steady = tcp
                .steady
                .ok_or("the iperf3 report has no receiver intervals after the first second")?;
            #[expect(clippy::cast_precision_loss, reason = "bits per second")]
            let cap_bits = cap.bits_per_s as f64;
            #[expect(clippy::cast_precision_loss, reason = "a count")]
            let retransmits = tcp.retransmits as f64;
            runs.mbit.push(tcp.received / 1e6);
            runs.ratio.push(tcp.received / cap_bits);
            runs.steady.push(steady / cap_bits);
            runs.retransmits.push(retransmits);
            runs.retransmit_percent
                .push(retransmits * 100.0 / tcp.segments.max(1.0));
            eprintln!(
                "repeat {repeat}/{}: {}: {:.2} Mbit/s ({:.3} of the cap, {:.3} after the first \
                 second), {} retransmits",
                options.repeats,
                cap.label(),
                tcp.received / 1e6,
                tcp.received / cap_bits,
                steady / cap_bits,
                tcp.retransmits
            );
        }
    }

    let mut table = String::new();
    let _ = writeln!(table, "## Bandwidth caps");
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "iperf3 TCP (one stream, {seconds} s runs, caps interleaved run by run, {} repeats) from a \
         cgroup whose policy is only a cap, with the default burst (egress: 5 ms at the rate, at \
         least 64 KiB; ingress: 20 ms, at least 1 MiB) unless the row gives one, installed as `agent \
         run --egress-rate`/`--ingress-rate` do. Egress caps: the capped cgroup's client sends; \
         ingress caps: it receives (iperf3 -R), and drops are the only signal the sender gets. \"received / cap\": the receiver's total over the \
         run, which includes the one-time burst and, on egress, up to 250 ms of over-rate traffic \
         passed with congestion notification before drops begin; \"after 1 s\": the receiver's \
         intervals from the second second on. Retransmits: TCP's count at the sender per run, and as \
         a share of the segments sent (bytes / 1448).",
        options.repeats
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| cap | received (Mbit/s) | received / cap | after 1 s / cap | retransmits per run | retransmitted segments (%) |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|");
    for (cap, runs) in caps.iter().zip(&runs) {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {:.3} |",
            cap.label(),
            spread(&runs.mbit, 2),
            spread(&runs.ratio, 3),
            spread(&runs.steady, 3),
            spread(&runs.retransmits, 0),
            median(&runs.retransmit_percent),
        );
    }
    Ok(table)
}

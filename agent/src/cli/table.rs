//! The plain tables `agent stats` and `agent top` print.

use std::fmt::Write as _;

use crate::{
    model::{CgroupSnapshot, Snapshot},
    units,
};

fn opt_bytes(value: Option<u64>) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    value.map_or_else(|| "-".into(), |v| units::bytes(v as f64))
}

fn opt_count(value: Option<u64>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Packets the network policy dropped.
fn drops(cgroup: &CgroupSnapshot) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    units::count(cgroup.net.dropped_packets as f64)
}

/// Device accesses the device policy denied.
fn denials(cgroup: &CgroupSnapshot) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    units::count(cgroup.devices.denied as f64)
}

fn label(cgroup: &CgroupSnapshot) -> String {
    match &cgroup.name {
        Some(name) => format!("{} ({name})", cgroup.path),
        None => cgroup.path.clone(),
    }
}

/// How busy a cgroup is over the interval: CPU first, then traffic.
fn busy(cgroup: &CgroupSnapshot) -> (f64, f64) {
    let net = cgroup
        .net
        .rates
        .map_or(0.0, |r| r.rx_bytes_per_s + r.tx_bytes_per_s);
    (cgroup.cpu.percent.unwrap_or(0.0), net)
}

/// Renders `snapshot` as a table, at most `max_rows` cgroup rows. With rates
/// the rows are sorted busiest first (CPU, then traffic), else by path.
/// Figures the host cannot give show `-`.
#[must_use]
pub fn render(snapshot: &Snapshot, max_rows: Option<usize>) -> String {
    let with_rates = snapshot.interval_s.is_some();
    let mut rows: Vec<&CgroupSnapshot> = snapshot.cgroups.iter().collect();
    if with_rates {
        rows.sort_by(|a, b| {
            let (a_cpu, a_net) = busy(a);
            let (b_cpu, b_net) = busy(b);
            b_cpu
                .total_cmp(&a_cpu)
                .then(b_net.total_cmp(&a_net))
                .then_with(|| a.path.cmp(&b.path))
        });
    }
    let mut out = String::new();
    if with_rates {
        let _ = writeln!(
            out,
            "{:>6} {:>9} {:>10} {:>6} {:>10} {:>10} {:>6} {:>6}  CGROUP",
            "CPU%", "RUNQ P99", "MEM", "PIDS", "RX/s", "TX/s", "DROP", "DENY"
        );
    } else {
        let _ = writeln!(
            out,
            "{:>8} {:>9} {:>9} {:>10} {:>6} {:>10} {:>10} {:>6} {:>6}  CGROUP",
            "CPU", "SWITCHES", "RUNQ P99", "MEM", "PIDS", "RX", "TX", "DROP", "DENY"
        );
    }
    let shown = max_rows.unwrap_or(usize::MAX);
    for cgroup in rows.iter().take(shown) {
        let cpu = &cgroup.cpu;
        if let (Some(rates), Some(percent)) = (cgroup.net.rates, cpu.percent) {
            let p99 = cpu
                .runqueue_latency_interval
                .as_ref()
                .and_then(|l| l.p99_ns);
            let _ = writeln!(
                out,
                "{:>6.1} {:>9} {:>10} {:>6} {:>10} {:>10} {:>6} {:>6}  {}",
                percent,
                p99.map_or_else(|| "-".into(), units::duration_ns),
                opt_bytes(cgroup.memory.current_bytes),
                opt_count(cgroup.pids.current),
                format!("{}/s", units::bytes(rates.rx_bytes_per_s)),
                format!("{}/s", units::bytes(rates.tx_bytes_per_s)),
                drops(cgroup),
                denials(cgroup),
                label(cgroup)
            );
        } else {
            #[expect(clippy::cast_precision_loss, reason = "display")]
            let (switches, rx, tx) = (
                cpu.switches as f64,
                cgroup.net.rx_bytes as f64,
                cgroup.net.tx_bytes as f64,
            );
            let _ = writeln!(
                out,
                "{:>8} {:>9} {:>9} {:>10} {:>6} {:>10} {:>10} {:>6} {:>6}  {}",
                units::duration_ns(cpu.usage_ns),
                units::count(switches),
                cpu.runqueue_latency
                    .p99_ns
                    .map_or_else(|| "-".into(), units::duration_ns),
                opt_bytes(cgroup.memory.current_bytes),
                opt_count(cgroup.pids.current),
                units::bytes(rx),
                units::bytes(tx),
                drops(cgroup),
                denials(cgroup),
                label(cgroup)
            );
        }
    }
    if rows.len() > shown {
        let _ = writeln!(out, "... and {} more cgroups", rows.len() - shown);
    }
    let lost = snapshot.uncounted.rx_packets + snapshot.uncounted.tx_packets;
    if lost > 0 {
        let _ = writeln!(
            out,
            "{lost} packets uncounted: the per-cgroup maps are full (see --max-cgroups)"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        time::{Duration, Instant, SystemTime},
    };

    use common::{NetCounters, SchedCounters};

    use super::*;
    use crate::{
        cgroupfs::Resources,
        collect::{CgroupSample, Sample},
    };

    fn sample(at: Instant, busy_cpu_ns: u64, busy_rx: u64) -> Sample {
        let cgroup = |id, path: &str, cpu_ns, rx_bytes| {
            let mut sched = SchedCounters::ZERO;
            sched.cpu_ns = cpu_ns;
            CgroupSample {
                id,
                path: path.into(),
                name: (path == "/busy").then(|| "job".into()),
                net: NetCounters {
                    rx_bytes,
                    rx_packets: rx_bytes / 100,
                    tx_bytes: 0,
                    tx_packets: 0,
                },
                sched,
                resources: Resources {
                    memory_current: Some(2048),
                    pids_current: Some(3),
                    ..Resources::default()
                },
                devices: common::devices::DevCounters::default(),
                net_drops: common::netpolicy::NetDrops::default(),
                rule_hits: Vec::new(),
            }
        };
        Sample {
            taken: SystemTime::UNIX_EPOCH,
            at,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroups: vec![
                cgroup(1, "/", 1_000_000, 2048),
                cgroup(2, "/busy", busy_cpu_ns, busy_rx),
            ],
            uncounted: NetCounters::ZERO,
            sched_uncounted: SchedCounters::ZERO,
        }
    }

    #[test]
    fn without_rates_rows_follow_paths_with_totals() {
        let table = render(&Snapshot::new(&sample(Instant::now(), 0, 100), None), None);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(
            lines[0],
            "     CPU  SWITCHES  RUNQ P99        MEM   PIDS         RX         TX   DROP   DENY  CGROUP"
        );
        assert_eq!(
            lines[1],
            "   1.0ms         0         -    2.0 KiB      3    2.0 KiB        0 B      0      0  /"
        );
        assert!(lines[2].ends_with("  /busy (job)"), "{table}");
    }

    #[test]
    fn with_rates_the_busiest_comes_first_and_rows_are_capped() {
        let start = Instant::now();
        let snapshot = Snapshot::new(
            &sample(start + Duration::from_secs(1), 500_000_000, 100),
            Some(&sample(start, 0, 0)),
        );
        let table = render(&snapshot, Some(1));
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(
            lines[0],
            "  CPU%  RUNQ P99        MEM   PIDS       RX/s       TX/s   DROP   DENY  CGROUP"
        );
        assert_eq!(
            lines[1],
            "  50.0         -    2.0 KiB      3    100 B/s      0 B/s      0      0  /busy (job)"
        );
        assert_eq!(lines[2], "... and 1 more cgroups");
    }
}

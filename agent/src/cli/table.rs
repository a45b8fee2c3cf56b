//! The plain table `agent stats` and `agent top` print.

use std::fmt::Write as _;

use crate::{model::Snapshot, units};

/// Renders `snapshot` as a table, at most `max_rows` cgroup rows. With rates
/// the rows are sorted busiest first, else by path.
#[must_use]
pub fn render(snapshot: &Snapshot, max_rows: Option<usize>) -> String {
    let with_rates = snapshot.interval_s.is_some();
    let mut rows: Vec<_> = snapshot.cgroups.iter().collect();
    if with_rates {
        rows.sort_by(|a, b| {
            let busy = |c: &crate::model::CgroupSnapshot| {
                c.net
                    .rates
                    .map_or(0.0, |r| r.rx_bytes_per_s + r.tx_bytes_per_s)
            };
            busy(b)
                .total_cmp(&busy(a))
                .then_with(|| a.path.cmp(&b.path))
        });
    }
    let mut out = String::new();
    if with_rates {
        let _ = writeln!(
            out,
            "{:>10} {:>10} {:>10} {:>10} {:>8} {:>8}  CGROUP",
            "RX/s", "TX/s", "RX", "TX", "RX PKTS", "TX PKTS"
        );
    } else {
        let _ = writeln!(
            out,
            "{:>10} {:>10} {:>8} {:>8}  CGROUP",
            "RX", "TX", "RX PKTS", "TX PKTS"
        );
    }
    let shown = max_rows.unwrap_or(usize::MAX);
    for cgroup in rows.iter().take(shown) {
        let net = &cgroup.net;
        #[expect(clippy::cast_precision_loss, reason = "display only")]
        let (rx, tx, rxp, txp) = (
            net.rx_bytes as f64,
            net.tx_bytes as f64,
            net.rx_packets as f64,
            net.tx_packets as f64,
        );
        if let Some(rates) = net.rates {
            let _ = writeln!(
                out,
                "{:>10} {:>10} {:>10} {:>10} {:>8} {:>8}  {}",
                format!("{}/s", units::bytes(rates.rx_bytes_per_s)),
                format!("{}/s", units::bytes(rates.tx_bytes_per_s)),
                units::bytes(rx),
                units::bytes(tx),
                units::count(rxp),
                units::count(txp),
                cgroup.path
            );
        } else {
            let _ = writeln!(
                out,
                "{:>10} {:>10} {:>8} {:>8}  {}",
                units::bytes(rx),
                units::bytes(tx),
                units::count(rxp),
                units::count(txp),
                cgroup.path
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
            "{lost} packets uncounted: the per-cgroup map is full (see --max-cgroups)"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CgroupSnapshot, Net, NetRates};

    fn net(rx: u64, rate: Option<f64>) -> Net {
        Net {
            rx_bytes: rx,
            rx_packets: rx / 100,
            tx_bytes: 0,
            tx_packets: 0,
            rates: rate.map(|r| NetRates {
                rx_bytes_per_s: r,
                tx_bytes_per_s: 0.0,
                rx_packets_per_s: 0.0,
                tx_packets_per_s: 0.0,
            }),
        }
    }

    fn snapshot(rates: bool) -> Snapshot {
        Snapshot {
            timestamp: String::new(),
            cgroup_root: "/sys/fs/cgroup".into(),
            interval_s: rates.then_some(1.0),
            cgroups: vec![
                CgroupSnapshot {
                    id: 1,
                    path: "/".into(),
                    name: None,
                    net: net(2048, rates.then_some(10.0)),
                },
                CgroupSnapshot {
                    id: 2,
                    path: "/busy".into(),
                    name: None,
                    net: net(100, rates.then_some(5000.0)),
                },
            ],
            uncounted: net(0, None),
        }
    }

    #[test]
    fn without_rates_rows_follow_paths() {
        let table = render(&snapshot(false), None);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines[0], "        RX         TX  RX PKTS  TX PKTS  CGROUP");
        assert_eq!(lines[1], "   2.0 KiB        0 B       20        0  /");
        assert!(lines[2].ends_with("  /busy"));
    }

    #[test]
    fn with_rates_the_busiest_comes_first_and_rows_are_capped() {
        let table = render(&snapshot(true), Some(1));
        let lines: Vec<_> = table.lines().collect();
        assert!(lines[1].trim_start().starts_with("4.9 KiB/s"), "{table}");
        assert!(lines[1].ends_with("  /busy"));
        assert_eq!(lines[2], "... and 1 more cgroups");
    }
}

//! The model: turns samples of cumulative counters into a [`Snapshot`], with
//! rates when two samples are given. Consumers (`stats`, `top`, exporters)
//! depend on snapshots only, never on maps or samples.

use std::collections::HashMap;

use common::NetCounters;
use serde::Serialize;

use crate::collect::Sample;

/// Everything the agent knows about the watched cgroups at one moment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// The cgroup v2 directory the programs are attached to.
    pub cgroup_root: String,
    /// Seconds between the two samples the rates come from; absent without rates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<f64>,
    /// Sorted by path.
    pub cgroups: Vec<CgroupSnapshot>,
    /// Traffic of cgroups that found the per-cgroup map full (see `--max-cgroups`).
    pub uncounted: Net,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CgroupSnapshot {
    pub id: u64,
    /// Relative to `cgroup_root`, starting with `/`; the root itself is `/`.
    pub path: String,
    /// The `agent run` workload in this cgroup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub net: Net,
}

/// Network counters since the programs were attached, and rates over the
/// snapshot's interval when it has one.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Net {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub rates: Option<NetRates>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct NetRates {
    pub rx_bytes_per_s: f64,
    pub tx_bytes_per_s: f64,
    pub rx_packets_per_s: f64,
    pub tx_packets_per_s: f64,
}

impl Net {
    fn totals(counters: NetCounters) -> Self {
        Self {
            rx_bytes: counters.rx_bytes,
            rx_packets: counters.rx_packets,
            tx_bytes: counters.tx_bytes,
            tx_packets: counters.tx_packets,
            rates: None,
        }
    }
}

/// Per-second rate of a counter between two readings; a counter that went
/// backwards (map entry recreated) counts as a restart from zero.
fn rate(previous: u64, current: u64, seconds: f64) -> f64 {
    let delta = current.checked_sub(previous).unwrap_or(current);
    #[expect(
        clippy::cast_precision_loss,
        reason = "rates are for display and export"
    )]
    let delta = delta as f64;
    delta / seconds
}

impl NetRates {
    fn between(previous: &NetCounters, current: &NetCounters, seconds: f64) -> Self {
        Self {
            rx_bytes_per_s: rate(previous.rx_bytes, current.rx_bytes, seconds),
            tx_bytes_per_s: rate(previous.tx_bytes, current.tx_bytes, seconds),
            rx_packets_per_s: rate(previous.rx_packets, current.rx_packets, seconds),
            tx_packets_per_s: rate(previous.tx_packets, current.tx_packets, seconds),
        }
    }
}

impl Snapshot {
    /// A snapshot of `current`, with rates against `previous` when given
    /// (cgroups that were not in `previous` are new: their rates count from 0).
    #[must_use]
    pub fn new(current: &Sample, previous: Option<&Sample>) -> Self {
        let interval = previous
            .map(|previous| {
                current
                    .at
                    .saturating_duration_since(previous.at)
                    .as_secs_f64()
            })
            .filter(|seconds| *seconds > 0.0);
        let before: HashMap<u64, &NetCounters> = match (previous, interval) {
            (Some(previous), Some(_)) => previous
                .cgroups
                .iter()
                .map(|cgroup| (cgroup.id, &cgroup.net))
                .collect(),
            _ => HashMap::new(),
        };
        let cgroups = current
            .cgroups
            .iter()
            .map(|cgroup| {
                let mut net = Net::totals(cgroup.net);
                if let Some(seconds) = interval {
                    let previous = before
                        .get(&cgroup.id)
                        .copied()
                        .unwrap_or(&NetCounters::ZERO);
                    net.rates = Some(NetRates::between(previous, &cgroup.net, seconds));
                }
                CgroupSnapshot {
                    id: cgroup.id,
                    path: cgroup.path.clone(),
                    name: cgroup.name.clone(),
                    net,
                }
            })
            .collect();
        Self {
            timestamp: humantime::format_rfc3339_millis(current.taken).to_string(),
            cgroup_root: current.cgroup_root.display().to_string(),
            interval_s: interval,
            cgroups,
            uncounted: Net::totals(current.uncounted),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        time::{Duration, Instant, SystemTime},
    };

    use super::*;
    use crate::collect::CgroupSample;

    fn sample(at: Instant, cgroups: &[(u64, &str, u64, u64)]) -> Sample {
        Sample {
            taken: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_504_000),
            at,
            cgroup_root: PathBuf::from("/sys/fs/cgroup/unified"),
            cgroups: cgroups
                .iter()
                .map(|&(id, path, rx_bytes, tx_bytes)| CgroupSample {
                    id,
                    path: path.into(),
                    name: (path == "/agent/web").then(|| "web".to_owned()),
                    net: NetCounters {
                        rx_bytes,
                        rx_packets: rx_bytes / 100,
                        tx_bytes,
                        tx_packets: tx_bytes / 100,
                    },
                })
                .collect(),
            uncounted: NetCounters::ZERO,
        }
    }

    #[test]
    fn one_sample_gives_totals_and_the_documented_json() {
        let now = Instant::now();
        let snapshot = Snapshot::new(&sample(now, &[(1, "/", 1000, 200)]), None);
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "timestamp": "2025-11-30T12:00:00.000Z",
                "cgroup_root": "/sys/fs/cgroup/unified",
                "cgroups": [{"id": 1, "path": "/", "net": {
                    "rx_bytes": 1000, "rx_packets": 10, "tx_bytes": 200, "tx_packets": 2}}],
                "uncounted": {"rx_bytes": 0, "rx_packets": 0, "tx_bytes": 0, "tx_packets": 0},
            })
        );
    }

    #[test]
    fn two_samples_give_rates_per_second() {
        let start = Instant::now();
        let first = sample(start, &[(1, "/", 1000, 0), (7, "/a", 0, 500)]);
        let second = sample(
            start + Duration::from_millis(500),
            &[(1, "/", 3000, 0), (7, "/a", 0, 500), (9, "/new", 400, 0)],
        );
        let snapshot = Snapshot::new(&second, Some(&first));
        assert_eq!(snapshot.interval_s, Some(0.5));
        let rates: Vec<_> = snapshot
            .cgroups
            .iter()
            .map(|c| {
                (
                    c.path.as_str(),
                    c.net.rates.unwrap().rx_bytes_per_s,
                    c.net.rates.unwrap().tx_bytes_per_s,
                )
            })
            .collect();
        assert_eq!(
            rates,
            [("/", 4000.0, 0.0), ("/a", 0.0, 0.0), ("/new", 800.0, 0.0)]
        );
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(json["cgroups"][0]["net"]["rx_bytes_per_s"], 4000.0);
        assert_eq!(json["interval_s"], 0.5);
    }

    #[test]
    fn a_counter_that_went_backwards_restarts_from_zero() {
        assert_eq!(rate(500, 100, 1.0), 100.0);
        assert_eq!(rate(100, 500, 2.0), 200.0);
    }
}

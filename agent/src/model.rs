//! The model: turns samples of cumulative counters into a [`Snapshot`], with
//! rates when two samples are given. Consumers (`stats`, `top`, exporters)
//! depend on snapshots only, never on maps or samples.

use std::collections::HashMap;

use common::{
    netpolicy::{NetDrops, DIR_EGRESS, RULE_DEFAULT},
    sched::latency_bucket_le_ns,
    NetCounters, SchedCounters, LATENCY_BUCKETS,
};
use serde::Serialize;

use crate::{
    cgroupfs::Resources,
    collect::{CgroupSample, RuleHits, Sample},
};

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
    /// Traffic of cgroups that found the per-cgroup maps full (see `--max-cgroups`).
    pub uncounted: Traffic,
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
    pub cpu: Cpu,
    pub memory: Memory,
    pub pids: Pids,
    pub io: Io,
    pub processes: Processes,
    pub devices: Devices,
}

/// Device accesses decided by the device policy (counted where one is in force).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Devices {
    pub allowed: u64,
    pub denied: u64,
    /// Denials whose event the rate limit held back.
    pub suppressed_events: u64,
}

/// Network counters since the programs were attached, and rates over the
/// snapshot's interval when it has one. `rx_*` and `tx_*` count every packet
/// the cgroup's sockets received or sent, including those its network
/// policy then dropped (counted in `dropped_*`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Net {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub rates: Option<NetRates>,
    /// Packets the network policy dropped, both directions.
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub drops_by_reason: DropsByReason,
    /// Egress packets over the rate let through with congestion notification.
    pub congestion_notified: u64,
    /// `connect()` calls refused with EPERM because the rules deny the address.
    pub refused_connects: u64,
    /// Denials whose event the rate limit held back.
    pub suppressed_events: u64,
    /// Packets each rule decided (rules that decided none are left out).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleHit>,
}

/// Bytes and packets, both directions.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Traffic {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// Dropped packets by why.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
pub struct DropsByReason {
    /// A rule or default denied them.
    pub policy: u64,
    /// Over the bandwidth cap.
    pub rate: u64,
}

/// What one rule of a cgroup's network policy decided.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct RuleHit {
    /// `egress` or `ingress`.
    pub direction: &'static str,
    /// The rule's index in its direction (from 0); null for the default.
    pub rule: Option<u16>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct NetRates {
    pub rx_bytes_per_s: f64,
    pub tx_bytes_per_s: f64,
    pub rx_packets_per_s: f64,
    pub tx_packets_per_s: f64,
}

/// CPU and scheduler figures. Counters run from when the programs were
/// attached; `throttled_*` are the kernel's own (cgroup cpu.stat).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cpu {
    /// Time its tasks spent on a CPU, in ns.
    pub usage_ns: u64,
    /// Context switches away from its tasks: voluntary plus involuntary.
    pub switches: u64,
    /// Its tasks blocked (slept, waited for I/O or a lock).
    pub voluntary_switches: u64,
    /// Its tasks were preempted while still runnable.
    pub involuntary_switches: u64,
    /// Time its tasks were held back by their CPU quota, in ns.
    pub throttled_ns: Option<u64>,
    /// Quota periods in which it was throttled.
    pub throttled_periods: Option<u64>,
    /// How long its tasks waited in a run queue before running.
    pub runqueue_latency: Latency,
    /// Share of one CPU used over the interval, in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Run-queue latency of the waits that ended during the interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runqueue_latency_interval: Option<Latency>,
}

/// A run-queue latency histogram (log2 buckets of microseconds) and its
/// percentiles, interpolated within their bucket.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    /// The longest wait seen (since attach; absent over an interval).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ns: Option<u64>,
    /// Waits per bucket: those shorter than `le_ns` and not shorter than the
    /// previous bucket's `le_ns`.
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Bucket {
    pub le_ns: u64,
    pub count: u64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Memory {
    pub current_bytes: Option<u64>,
    /// `null`: no limit, or none the host reports.
    pub limit_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Pids {
    pub current: Option<u64>,
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Io {
    pub read_bytes: Option<u64>,
    pub write_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Processes {
    /// Processes (not threads) created by its tasks.
    pub started: u64,
    /// Processes whose last thread exited in it.
    pub exited: u64,
}

impl Net {
    fn totals(counters: NetCounters) -> Self {
        Self {
            rx_bytes: counters.rx_bytes,
            rx_packets: counters.rx_packets,
            tx_bytes: counters.tx_bytes,
            tx_packets: counters.tx_packets,
            rates: None,
            dropped_packets: 0,
            dropped_bytes: 0,
            drops_by_reason: DropsByReason::default(),
            congestion_notified: 0,
            refused_connects: 0,
            suppressed_events: 0,
            rules: Vec::new(),
        }
    }

    fn with_policy(mut self, drops: &NetDrops, hits: &[RuleHits]) -> Self {
        self.dropped_packets = drops.policy_packets.saturating_add(drops.rate_packets);
        self.dropped_bytes = drops.policy_bytes.saturating_add(drops.rate_bytes);
        self.drops_by_reason = DropsByReason {
            policy: drops.policy_packets,
            rate: drops.rate_packets,
        };
        self.congestion_notified = drops.rate_marked;
        self.refused_connects = drops.refused_connects;
        self.suppressed_events = drops.suppressed;
        self.rules = hits
            .iter()
            .map(|h| RuleHit {
                direction: if h.direction == DIR_EGRESS {
                    "egress"
                } else {
                    "ingress"
                },
                rule: (h.rule != RULE_DEFAULT).then_some(h.rule),
                packets: h.hits.packets,
                bytes: h.hits.bytes,
            })
            .collect();
        self
    }
}

/// Per-second rate of a counter between two readings; a counter that went
/// backwards (map entry recreated) counts as a restart from zero.
fn rate(previous: u64, current: u64, seconds: f64) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "rates are for display and export"
    )]
    let delta = current.checked_sub(previous).unwrap_or(current) as f64;
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

impl Latency {
    /// From bucket counts (and the longest wait, when known).
    #[must_use]
    pub fn from_buckets(counts: &[u64; LATENCY_BUCKETS], max_ns: Option<u64>) -> Self {
        let count = counts.iter().sum();
        let buckets = counts
            .iter()
            .enumerate()
            .map(|(i, &count)| Bucket {
                le_ns: latency_bucket_le_ns(i),
                count,
            })
            .collect();
        Self {
            count,
            p50_ns: quantile(counts, 0.50, max_ns),
            p99_ns: quantile(counts, 0.99, max_ns),
            max_ns,
            buckets,
        }
    }
}

/// The `q` quantile of a log2 histogram, interpolated linearly within the
/// bucket it falls in (as Prometheus' histogram_quantile does), and never
/// past the longest wait seen.
#[must_use]
pub fn quantile(counts: &[u64; LATENCY_BUCKETS], q: f64, max_ns: Option<u64>) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &count) in counts.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "as above")]
        if count > 0 && (below + count) as f64 >= rank {
            let low = if i == 0 {
                0
            } else {
                latency_bucket_le_ns(i - 1)
            };
            let high = latency_bucket_le_ns(i);
            #[expect(clippy::cast_precision_loss, reason = "as above")]
            let within = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
            #[expect(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "ns fit"
            )]
            let value = (low as f64 + within * (high - low) as f64).round() as u64;
            return Some(max_ns.map_or(value, |max| value.min(max)));
        }
        below += count;
    }
    max_ns
}

fn cpu(sched: &SchedCounters, resources: &Resources) -> Cpu {
    Cpu {
        usage_ns: sched.cpu_ns,
        switches: sched.voluntary.saturating_add(sched.involuntary),
        voluntary_switches: sched.voluntary,
        involuntary_switches: sched.involuntary,
        throttled_ns: resources.throttled_ns,
        throttled_periods: resources.throttled_periods,
        runqueue_latency: Latency::from_buckets(
            &sched.latency,
            // A wait of 0 ns is a real sample (the task ran the moment it
            // was queued): the longest wait is known whenever any was seen.
            sched
                .latency
                .iter()
                .any(|&count| count > 0)
                .then_some(sched.latency_max_ns),
        ),
        percent: None,
        runqueue_latency_interval: None,
    }
}

impl CgroupSnapshot {
    fn new(cgroup: &CgroupSample, previous: Option<&CgroupSample>, interval: Option<f64>) -> Self {
        let mut net = Net::totals(cgroup.net).with_policy(&cgroup.net_drops, &cgroup.rule_hits);
        let mut cpu = cpu(&cgroup.sched, &cgroup.resources);
        if let Some(seconds) = interval {
            net.rates = Some(NetRates::between(
                previous.map_or(&NetCounters::ZERO, |p| &p.net),
                &cgroup.net,
                seconds,
            ));
            let before = previous.map_or(&SchedCounters::ZERO, |p| &p.sched);
            cpu.percent = Some(rate(before.cpu_ns, cgroup.sched.cpu_ns, seconds) / 1e9 * 100.0);
            let mut recent = [0u64; LATENCY_BUCKETS];
            for (i, bucket) in recent.iter_mut().enumerate() {
                *bucket = cgroup.sched.latency[i]
                    .checked_sub(before.latency[i])
                    .unwrap_or(cgroup.sched.latency[i]);
            }
            cpu.runqueue_latency_interval = Some(Latency::from_buckets(&recent, None));
        }
        let r = &cgroup.resources;
        Self {
            id: cgroup.id,
            path: cgroup.path.clone(),
            name: cgroup.name.clone(),
            net,
            cpu,
            memory: Memory {
                current_bytes: r.memory_current,
                limit_bytes: r.memory_limit,
            },
            pids: Pids {
                current: r.pids_current,
                limit: r.pids_limit,
            },
            io: Io {
                read_bytes: r.io_read_bytes,
                write_bytes: r.io_write_bytes,
            },
            processes: Processes {
                started: cgroup.sched.started,
                exited: cgroup.sched.exited,
            },
            devices: Devices {
                allowed: cgroup.devices.allowed,
                denied: cgroup.devices.denied,
                suppressed_events: cgroup.devices.suppressed,
            },
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
        let before: HashMap<u64, &CgroupSample> = match (previous, interval) {
            (Some(previous), Some(_)) => previous
                .cgroups
                .iter()
                .map(|cgroup| (cgroup.id, cgroup))
                .collect(),
            _ => HashMap::new(),
        };
        let cgroups = current
            .cgroups
            .iter()
            .map(|cgroup| CgroupSnapshot::new(cgroup, before.get(&cgroup.id).copied(), interval))
            .collect();
        Self {
            timestamp: humantime::format_rfc3339_millis(current.taken).to_string(),
            cgroup_root: current.cgroup_root.display().to_string(),
            interval_s: interval,
            cgroups,
            uncounted: Traffic {
                rx_bytes: current.uncounted.rx_bytes,
                rx_packets: current.uncounted.rx_packets,
                tx_bytes: current.uncounted.tx_bytes,
                tx_packets: current.uncounted.tx_packets,
            },
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

    fn cgroup(id: u64, path: &str, rx_bytes: u64, cpu_ns: u64) -> CgroupSample {
        let mut sched = SchedCounters::ZERO;
        sched.cpu_ns = cpu_ns;
        sched.voluntary = 3;
        sched.involuntary = 1;
        sched.started = 2;
        sched.exited = 1;
        sched.latency[1] = 4; // waits of 2-4 µs
        sched.latency_max_ns = 3_500;
        CgroupSample {
            id,
            path: path.into(),
            name: (path == "/agent/web").then(|| "web".to_owned()),
            net: NetCounters {
                rx_bytes,
                rx_packets: rx_bytes / 100,
                tx_bytes: 0,
                tx_packets: 0,
            },
            sched,
            devices: common::devices::DevCounters {
                allowed: 5,
                denied: 2,
                suppressed: 1,
            },
            net_drops: common::netpolicy::NetDrops {
                policy_packets: 3,
                policy_bytes: 300,
                rate_packets: 1,
                rate_bytes: 1500,
                rate_marked: 4,
                refused_connects: 2,
                suppressed: 1,
            },
            rule_hits: vec![
                crate::collect::RuleHits {
                    direction: common::netpolicy::DIR_EGRESS,
                    rule: 0,
                    hits: common::netpolicy::Hits {
                        packets: 3,
                        bytes: 300,
                    },
                },
                crate::collect::RuleHits {
                    direction: common::netpolicy::DIR_INGRESS,
                    rule: common::netpolicy::RULE_DEFAULT,
                    hits: common::netpolicy::Hits {
                        packets: 7,
                        bytes: 700,
                    },
                },
            ],
            resources: Resources {
                memory_current: Some(4096),
                memory_limit: None,
                pids_current: Some(2),
                pids_limit: Some(20),
                io_read_bytes: Some(10),
                io_write_bytes: Some(0),
                throttled_periods: Some(0),
                throttled_ns: Some(0),
            },
        }
    }

    fn sample(at: Instant, cgroups: Vec<CgroupSample>) -> Sample {
        Sample {
            taken: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_504_000),
            at,
            cgroup_root: PathBuf::from("/sys/fs/cgroup/unified"),
            cgroups,
            uncounted: NetCounters::ZERO,
            sched_uncounted: SchedCounters::ZERO,
        }
    }

    #[test]
    fn one_sample_gives_totals_and_the_documented_json() {
        let snapshot = Snapshot::new(
            &sample(Instant::now(), vec![cgroup(1, "/", 1000, 5_000_000)]),
            None,
        );
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(json["timestamp"], "2025-11-30T12:00:00.000Z");
        assert_eq!(json["cgroup_root"], "/sys/fs/cgroup/unified");
        assert!(json.get("interval_s").is_none());
        let c = &json["cgroups"][0];
        assert_eq!(c["id"], 1);
        assert_eq!(c["path"], "/");
        assert_eq!(
            c["net"],
            serde_json::json!({"rx_bytes": 1000, "rx_packets": 10, "tx_bytes": 0, "tx_packets": 0,
            "dropped_packets": 4, "dropped_bytes": 1800,
            "drops_by_reason": {"policy": 3, "rate": 1},
            "congestion_notified": 4, "refused_connects": 2, "suppressed_events": 1,
            "rules": [
                {"direction": "egress", "rule": 0, "packets": 3, "bytes": 300},
                {"direction": "ingress", "rule": null, "packets": 7, "bytes": 700}
            ]})
        );
        assert_eq!(c["cpu"]["usage_ns"], 5_000_000);
        assert_eq!(
            (
                c["cpu"]["switches"].as_u64(),
                c["cpu"]["involuntary_switches"].as_u64()
            ),
            (Some(4), Some(1))
        );
        assert_eq!(c["cpu"]["runqueue_latency"]["count"], 4);
        assert_eq!(c["cpu"]["runqueue_latency"]["max_ns"], 3_500);
        assert_eq!(
            c["cpu"]["runqueue_latency"]["buckets"][1],
            serde_json::json!({"le_ns": 4000, "count": 4})
        );
        assert_eq!(
            c["cpu"]["runqueue_latency"]["buckets"]
                .as_array()
                .map(Vec::len),
            Some(LATENCY_BUCKETS)
        );
        assert_eq!(
            c["memory"],
            serde_json::json!({"current_bytes": 4096, "limit_bytes": null})
        );
        assert_eq!(c["pids"], serde_json::json!({"current": 2, "limit": 20}));
        assert_eq!(
            c["io"],
            serde_json::json!({"read_bytes": 10, "write_bytes": 0})
        );
        assert_eq!(
            c["processes"],
            serde_json::json!({"started": 2, "exited": 1})
        );
        assert_eq!(
            c["devices"],
            serde_json::json!({"allowed": 5, "denied": 2, "suppressed_events": 1})
        );
        assert!(
            c["cpu"].get("percent").is_none(),
            "no rates without an interval"
        );
        assert_eq!(
            json["uncounted"],
            serde_json::json!({"rx_bytes": 0, "rx_packets": 0, "tx_bytes": 0, "tx_packets": 0})
        );
    }

    #[test]
    fn two_samples_give_rates_per_second() {
        let start = Instant::now();
        let first = sample(start, vec![cgroup(1, "/", 1000, 0), cgroup(7, "/a", 0, 0)]);
        let second = sample(
            start + Duration::from_millis(500),
            vec![
                cgroup(1, "/", 3000, 250_000_000),
                cgroup(7, "/a", 0, 0),
                cgroup(9, "/new", 400, 0),
                cgroup(11, "/agent/web", 0, 0),
            ],
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
                    c.cpu.percent.unwrap(),
                )
            })
            .collect();
        assert_eq!(
            rates,
            [
                ("/", 4000.0, 50.0),
                ("/a", 0.0, 0.0),
                ("/new", 800.0, 0.0),
                ("/agent/web", 0.0, 0.0)
            ]
        );
        // Waits over the interval: "/" had the same 4 in both samples, "/new" is new.
        assert_eq!(
            snapshot.cgroups[0]
                .cpu
                .runqueue_latency_interval
                .as_ref()
                .unwrap()
                .count,
            0
        );
        assert_eq!(
            snapshot.cgroups[2]
                .cpu
                .runqueue_latency_interval
                .as_ref()
                .unwrap()
                .count,
            4
        );
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(json["cgroups"][0]["net"]["rx_bytes_per_s"], 4000.0);
        assert_eq!(json["cgroups"][0]["cpu"]["percent"], 50.0);
        assert_eq!(json["interval_s"], 0.5);
        assert_eq!(
            json["cgroups"][3]["name"], "web",
            "a workload's cgroup carries its name"
        );
        assert!(
            json["cgroups"][0].get("name").is_none(),
            "other cgroups have no name key"
        );
    }

    #[test]
    fn a_counter_that_went_backwards_restarts_from_zero() {
        assert_eq!(rate(500, 100, 1.0), 100.0);
        assert_eq!(rate(100, 500, 2.0), 200.0);
    }

    #[test]
    fn quantiles_interpolate_within_log2_buckets() {
        let mut counts = [0u64; LATENCY_BUCKETS];
        assert_eq!(quantile(&counts, 0.5, None), None);
        counts[0] = 50; // under 2 µs
        counts[10] = 50; // 1.024 to 2.048 ms
        assert_eq!(quantile(&counts, 0.5, None), Some(2_000));
        assert_eq!(quantile(&counts, 0.99, None), Some(2_027_520));
        assert_eq!(
            quantile(&counts, 0.99, Some(1_500_000)),
            Some(1_500_000),
            "never past the longest wait"
        );
        counts[0] = 0;
        assert_eq!(quantile(&counts, 0.5, None), Some(1_536_000));
    }

    #[test]
    fn waits_of_zero_ns_have_a_known_maximum_of_zero() {
        let mut sched = SchedCounters::ZERO;
        let none = cpu(&sched, &Resources::default()).runqueue_latency;
        assert_eq!((none.count, none.max_ns, none.p50_ns), (0, None, None));
        sched.latency[0] = 28;
        let zero = cpu(&sched, &Resources::default()).runqueue_latency;
        assert_eq!(
            (zero.count, zero.max_ns, zero.p50_ns),
            (28, Some(0), Some(0))
        );
    }
}

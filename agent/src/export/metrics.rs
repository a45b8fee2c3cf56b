//! Every exported metric, defined once: its name, unit, instrument,
//! attributes, where it comes from, and how its points are read from a
//! [`Snapshot`]. The OTLP and Prometheus exporters both render the
//! [`Family`]s built here, and `docs/metrics.md` is checked against
//! [`METRICS`] and [`DAEMON_METRICS`] by a unit test.

use common::LATENCY_BUCKETS;

use crate::model::{CgroupSnapshot, Snapshot};

/// The OpenTelemetry instrument a metric is (and so its OTLP data type and
/// Prometheus type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instrument {
    /// Monotonic cumulative sum (Prometheus counter, `_total`).
    Counter,
    /// Non-monotonic cumulative sum: a total that goes up and down
    /// (Prometheus gauge).
    UpDownCounter,
    /// Cumulative explicit-bucket histogram (Prometheus histogram).
    Histogram,
}

impl Instrument {
    /// As written in docs/metrics.md.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Counter => "Counter",
            Self::UpDownCounter => "UpDownCounter",
            Self::Histogram => "Histogram",
        }
    }
}

/// One data point's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(u64),
    Double(f64),
    /// Counts per bucket (`bounds.len() + 1` of them: the last one counts
    /// everything above the last bound), and their total.
    Histogram {
        bounds: Vec<f64>,
        counts: Vec<u64>,
        count: u64,
        /// The largest value seen, when known.
        max: Option<f64>,
    },
}

/// Attributes of a point, in order: the cgroup's, then the metric's own.
pub type Attributes = Vec<(&'static str, String)>;

/// A data point: its metric-specific attributes and value.
pub type Point = (Vec<(&'static str, &'static str)>, Value);

/// A metric's definition.
pub struct Metric<T: 'static> {
    pub name: &'static str,
    /// UCUM, as OpenTelemetry writes units (`s`, `By`, `{packet}`).
    pub unit: &'static str,
    pub instrument: Instrument,
    pub description: &'static str,
    /// The attributes its points carry besides the cgroup's (with their values).
    pub attributes: &'static [(&'static str, &'static [&'static str])],
    /// Where the figure comes from (for docs/metrics.md).
    pub source: &'static str,
    /// Its points for one cgroup (or for the daemon); none when the figure
    /// is unknown for it.
    pub points: fn(&T) -> Vec<Point>,
}

/// The daemon's own figures, exported next to the per-cgroup metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DaemonStats {
    /// OTLP exports that failed (each attempt, retries included).
    pub export_failures: u64,
    /// Queued OTLP exports dropped because the queue was full.
    pub export_dropped: u64,
    /// Traffic that found the per-cgroup maps full.
    pub uncounted_rx_bytes: u64,
    pub uncounted_tx_bytes: u64,
}

const DIRECTION: &str = "network.io.direction";
const DIRECTIONS: &[&str] = &["receive", "transmit"];

fn seconds(ns: u64) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "exact up to 2^53 ns (104 days of CPU); beyond, to 1 part in 2^53"
    )]
    let ns = ns as f64;
    ns / 1e9
}

fn pair(key: &'static str, first: (&'static str, u64), second: (&'static str, u64)) -> Vec<Point> {
    vec![
        (vec![(key, first.0)], Value::Int(first.1)),
        (vec![(key, second.0)], Value::Int(second.1)),
    ]
}

fn single(value: Option<Value>) -> Vec<Point> {
    value.map(|v| (Vec::new(), v)).into_iter().collect()
}

/// The run-queue latency histogram's bounds in seconds: the kernel's log2
/// microsecond buckets (bucket `i` holds waits under `2^(i+1)` µs).
#[must_use]
pub fn latency_bounds() -> Vec<f64> {
    (0..LATENCY_BUCKETS - 1)
        .map(|i| seconds(common::sched::latency_bucket_le_ns(i)))
        .collect()
}

fn latency(c: &CgroupSnapshot) -> Vec<Point> {
    let counts: Vec<u64> = c
        .cpu
        .runqueue_latency
        .buckets
        .iter()
        .map(|b| b.count)
        .collect();
    single(Some(Value::Histogram {
        bounds: latency_bounds(),
        count: c.cpu.runqueue_latency.count,
        counts,
        max: c.cpu.runqueue_latency.max_ns.map(seconds),
    }))
}

/// Every per-cgroup metric. docs/metrics.md lists exactly these (and
/// [`DAEMON_METRICS`]), in this order.
pub const METRICS: &[Metric<CgroupSnapshot>] = &[
    Metric {
        name: "container.cpu.time",
        unit: "s",
        instrument: Instrument::Counter,
        description: "Time the cgroup's tasks spent on a CPU.",
        attributes: &[],
        source: "eBPF: tp_btf/sched_switch and the tick (growth of se.sum_exec_runtime, the runtime the kernel charges)",
        points: |c| single(Some(Value::Double(seconds(c.cpu.usage_ns)))),
    },
    Metric {
        name: "container.network.io",
        unit: "By",
        instrument: Instrument::Counter,
        description: "Bytes the cgroup's sockets received and sent, from the IP header on.",
        attributes: &[(DIRECTION, DIRECTIONS)],
        source: "eBPF: cgroup_skb ingress/egress at the watched root",
        points: |c| {
            pair(
                DIRECTION,
                ("receive", c.net.rx_bytes),
                ("transmit", c.net.tx_bytes),
            )
        },
    },
    Metric {
        name: "container.memory.usage",
        unit: "By",
        instrument: Instrument::UpDownCounter,
        description: "Memory the cgroup uses (semconv says Counter; it goes down, so a non-monotonic sum).",
        attributes: &[],
        source: "cgroup file: memory.current (v2) or memory.usage_in_bytes (v1)",
        points: |c| single(c.memory.current_bytes.map(Value::Int)),
    },
    Metric {
        name: "container.disk.io",
        unit: "By",
        instrument: Instrument::Counter,
        description: "Bytes the cgroup read from and wrote to block devices.",
        attributes: &[("disk.io.direction", &["read", "write"])],
        source: "cgroup file: io.stat (v2) or blkio.throttle.io_service_bytes_recursive (v1)",
        points: |c| match (c.io.read_bytes, c.io.write_bytes) {
            (Some(read), Some(write)) => {
                pair("disk.io.direction", ("read", read), ("write", write))
            }
            _ => Vec::new(),
        },
    },
    Metric {
        name: "agent.cgroup.memory.limit",
        unit: "By",
        instrument: Instrument::UpDownCounter,
        description: "The cgroup's memory limit (absent when unlimited).",
        attributes: &[],
        source: "cgroup file: memory.max (v2) or memory.limit_in_bytes (v1)",
        points: |c| single(c.memory.limit_bytes.map(Value::Int)),
    },
    Metric {
        name: "agent.cgroup.network.packets",
        unit: "{packet}",
        instrument: Instrument::Counter,
        description: "Packets the cgroup's sockets received and sent.",
        attributes: &[(DIRECTION, DIRECTIONS)],
        source: "eBPF: cgroup_skb ingress/egress at the watched root",
        points: |c| {
            pair(
                DIRECTION,
                ("receive", c.net.rx_packets),
                ("transmit", c.net.tx_packets),
            )
        },
    },
    Metric {
        name: "agent.cgroup.network.drops",
        unit: "{packet}",
        instrument: Instrument::Counter,
        description: "Packets the network policy dropped, by why.",
        attributes: &[("agent.drop.reason", &["policy", "rate"])],
        source: "eBPF: net_guard_egress/net_guard_ingress (NET_DROPS map)",
        points: |c| {
            pair(
                "agent.drop.reason",
                ("policy", c.net.drops_by_reason.policy),
                ("rate", c.net.drops_by_reason.rate),
            )
        },
    },
    Metric {
        name: "agent.cgroup.policy.denials",
        unit: "{denial}",
        instrument: Instrument::Counter,
        description: "Accesses a policy denied: device opens and mknods, and connect() calls.",
        attributes: &[("agent.policy.kind", &["device", "connect"])],
        source: "eBPF: cgroup_device dev_guard (DEV_SLOTS, DEV_COUNTS), cgroup/connect4 and connect6 (NET_DROPS)",
        points: |c| {
            pair(
                "agent.policy.kind",
                ("device", c.devices.denied),
                ("connect", c.net.refused_connects),
            )
        },
    },
    Metric {
        name: "agent.cgroup.device.accesses",
        unit: "{access}",
        instrument: Instrument::Counter,
        description: "Device accesses the device policy decided, by verdict.",
        attributes: &[("agent.device.verdict", &["allowed", "denied"])],
        source: "eBPF: cgroup_device dev_guard (DEV_SLOTS and DEV_COUNTS maps)",
        points: |c| {
            pair(
                "agent.device.verdict",
                ("allowed", c.devices.allowed),
                ("denied", c.devices.denied),
            )
        },
    },
    Metric {
        name: "agent.cgroup.cpu.context_switches",
        unit: "{switch}",
        instrument: Instrument::Counter,
        description: "Context switches away from the cgroup's tasks, by kind.",
        attributes: &[("agent.context_switch.type", &["voluntary", "involuntary"])],
        source: "eBPF: tp_btf/sched_switch",
        points: |c| {
            pair(
                "agent.context_switch.type",
                ("voluntary", c.cpu.voluntary_switches),
                ("involuntary", c.cpu.involuntary_switches),
            )
        },
    },
    Metric {
        name: "agent.cgroup.cpu.runqueue.latency",
        unit: "s",
        instrument: Instrument::Histogram,
        description: "How long the cgroup's tasks waited in a run queue before running (log2 buckets from 2 µs).",
        attributes: &[],
        source: "eBPF: tp_btf/sched_switch (growth of sched_info.run_delay)",
        points: latency,
    },
    Metric {
        name: "agent.cgroup.cpu.throttled.time",
        unit: "s",
        instrument: Instrument::Counter,
        description: "Time the cgroup's tasks were held back by its CPU quota.",
        attributes: &[],
        source: "cgroup file: cpu.stat throttled_usec (v2) or throttled_time (v1)",
        points: |c| single(c.cpu.throttled_ns.map(|ns| Value::Double(seconds(ns)))),
    },
    Metric {
        name: "agent.cgroup.cpu.throttled.periods",
        unit: "{period}",
        instrument: Instrument::Counter,
        description: "CPU quota periods in which the cgroup was throttled.",
        attributes: &[],
        source: "cgroup file: cpu.stat nr_throttled",
        points: |c| single(c.cpu.throttled_periods.map(Value::Int)),
    },
    Metric {
        name: "agent.cgroup.processes",
        unit: "{process}",
        instrument: Instrument::Counter,
        description: "Processes (not threads) started by and exited in the cgroup.",
        attributes: &[("agent.process.event", &["started", "exited"])],
        source: "eBPF: tp_btf/task_newtask and sched_process_exit",
        points: |c| {
            pair(
                "agent.process.event",
                ("started", c.processes.started),
                ("exited", c.processes.exited),
            )
        },
    },
    Metric {
        name: "agent.cgroup.tasks",
        unit: "{task}",
        instrument: Instrument::UpDownCounter,
        description: "Tasks (threads) in the cgroup now.",
        attributes: &[],
        source: "cgroup file: pids.current",
        points: |c| single(c.pids.current.map(Value::Int)),
    },
];

/// The daemon's own metrics (no cgroup attributes).
pub const DAEMON_METRICS: &[Metric<DaemonStats>] = &[
    Metric {
        name: "agent.export.failures",
        unit: "{export}",
        instrument: Instrument::Counter,
        description: "OTLP export attempts that failed (retries included).",
        attributes: &[],
        source: "the daemon's OTLP exporter",
        points: |d| single(Some(Value::Int(d.export_failures))),
    },
    Metric {
        name: "agent.export.dropped",
        unit: "{export}",
        instrument: Instrument::Counter,
        description: "OTLP exports dropped unsent because the queue was full.",
        attributes: &[],
        source: "the daemon's OTLP exporter",
        points: |d| single(Some(Value::Int(d.export_dropped))),
    },
    Metric {
        name: "agent.network.uncounted",
        unit: "By",
        instrument: Instrument::Counter,
        description: "Traffic of cgroups that found the per-cgroup maps full (see --max-cgroups).",
        attributes: &[(DIRECTION, DIRECTIONS)],
        source: "eBPF: NET_UNCOUNTED map",
        points: |d| {
            pair(
                DIRECTION,
                ("receive", d.uncounted_rx_bytes),
                ("transmit", d.uncounted_tx_bytes),
            )
        },
    },
];

/// The points of one metric, each with its full attributes.
pub struct Family {
    pub name: &'static str,
    pub unit: &'static str,
    pub instrument: Instrument,
    pub description: &'static str,
    pub points: Vec<(Attributes, Value)>,
}

/// A cgroup to export and the attributes that identify it.
pub struct Exported<'a> {
    pub cgroup: &'a CgroupSnapshot,
    pub attributes: Attributes,
}

/// Every metric's points for the given cgroups and the daemon.
#[must_use]
pub fn families(cgroups: &[Exported<'_>], daemon: &DaemonStats) -> Vec<Family> {
    let mut out = Vec::with_capacity(METRICS.len() + DAEMON_METRICS.len());
    for metric in METRICS {
        let mut points = Vec::with_capacity(cgroups.len() * 2);
        for exported in cgroups {
            for (own, value) in (metric.points)(exported.cgroup) {
                let mut attributes = exported.attributes.clone();
                attributes.extend(own.into_iter().map(|(k, v)| (k, v.to_owned())));
                points.push((attributes, value));
            }
        }
        out.push(Family {
            name: metric.name,
            unit: metric.unit,
            instrument: metric.instrument,
            description: metric.description,
            points,
        });
    }
    for metric in DAEMON_METRICS {
        out.push(Family {
            name: metric.name,
            unit: metric.unit,
            instrument: metric.instrument,
            description: metric.description,
            points: (metric.points)(daemon)
                .into_iter()
                .map(|(own, value)| {
                    (
                        own.into_iter().map(|(k, v)| (k, v.to_owned())).collect(),
                        value,
                    )
                })
                .collect(),
        });
    }
    out
}

/// The daemon's own figures that come from a snapshot.
#[must_use]
pub fn uncounted(snapshot: &Snapshot, mut stats: DaemonStats) -> DaemonStats {
    stats.uncounted_rx_bytes = snapshot.uncounted.rx_bytes;
    stats.uncounted_tx_bytes = snapshot.uncounted.tx_bytes;
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row of the table in docs/metrics.md.
    #[derive(Debug, PartialEq)]
    struct Row {
        name: String,
        unit: String,
        instrument: String,
        attributes: String,
        source: String,
    }

    fn cell(text: &str) -> String {
        text.trim().trim_matches('`').to_owned()
    }

    fn documented() -> Vec<Row> {
        let doc = include_str!("../../../docs/metrics.md");
        doc.lines()
            .map(str::trim)
            .filter(|line| line.starts_with("| `"))
            .filter_map(|line| {
                let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
                (cells.len() == 6).then(|| Row {
                    name: cell(cells[0]),
                    unit: cell(cells[1]),
                    instrument: cell(cells[2]),
                    attributes: cells[3].trim().replace('`', ""),
                    source: cells[5].trim().to_owned(),
                })
            })
            .collect()
    }

    fn attributes_cell(attributes: &[(&str, &[&str])]) -> String {
        if attributes.is_empty() {
            return "-".into();
        }
        attributes
            .iter()
            .map(|(key, values)| format!("{key} ({})", values.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn rows<T>(metrics: &[Metric<T>]) -> Vec<Row> {
        metrics
            .iter()
            .map(|m| Row {
                name: m.name.into(),
                unit: m.unit.into(),
                instrument: m.instrument.name().into(),
                attributes: attributes_cell(m.attributes),
                source: m.source.into(),
            })
            .collect()
    }

    #[test]
    fn docs_metrics_md_lists_exactly_the_exported_metrics() {
        let mut expected = rows(METRICS);
        expected.extend(rows(DAEMON_METRICS));
        let documented = documented();
        for (code, doc) in expected.iter().zip(&documented) {
            assert_eq!(code, doc, "docs/metrics.md disagrees with the code");
        }
        assert_eq!(
            expected.len(),
            documented.len(),
            "docs/metrics.md has {} metric rows, the code {}",
            documented.len(),
            expected.len()
        );
    }

    #[test]
    fn names_are_unique_and_follow_one_namespace() {
        let mut names: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
        names.extend(DAEMON_METRICS.iter().map(|m| m.name));
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
        for name in names {
            assert!(
                name.starts_with("container.") || name.starts_with("agent."),
                "{name}"
            );
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_'));
        }
    }

    #[test]
    fn latency_bounds_are_the_kernel_buckets_in_seconds() {
        let bounds = latency_bounds();
        assert_eq!(bounds.len(), LATENCY_BUCKETS - 1);
        assert!((bounds[0] - 2e-6).abs() < 1e-15);
        assert!((bounds[10] - 2.048e-3).abs() < 1e-15);
    }
}

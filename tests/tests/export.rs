//! Export against the kernel: `agent daemon` at a test cgroup root exports to
//! an in-process OTLP receiver (gRPC and HTTP/protobuf) and serves a
//! Prometheus endpoint that Debian's prometheus scrapes; the test sends UDP
//! datagrams of exactly known size between two namespaces it made and checks
//! the exact values, units and attributes that arrive. With the collector
//! unreachable, `agent stats` keeps working and the daemon warns once.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agent_tests::{
    counts, net_of, netpeer_bin, otlp, require_root, wait_for_line, wait_success, Cgroup, Daemon,
    VethPair,
};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    metrics::v1::{metric::Data, AggregationTemporality},
};

/// IPv4 + UDP headers: cgroup_skb sees skb->len from the network header on.
const UDP_OVERHEAD: u64 = 20 + 8;
const COUNT: u64 = 100;
const SIZE: u64 = 1000;
const BYTES: u64 = COUNT * (SIZE + UDP_OVERHEAD);

/// Sends COUNT datagrams of SIZE bytes from cgroup `a` (in namespace a) to
/// cgroup `b` (in namespace b).
fn udp(pair: &VethPair, a: &Cgroup, b: &Cgroup) {
    let port = "5001";
    let mut receiver = b
        .command(netpeer_bin(), Some(&pair.b))
        .args([
            "udp-recv",
            &format!("0.0.0.0:{port}"),
            &COUNT.to_string(),
            &SIZE.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start netpeer receiver");
    wait_for_line(&mut receiver, "ready");
    let status = a
        .command(netpeer_bin(), Some(&pair.a))
        .args([
            "udp-send",
            &format!("{}:{port}", pair.b_addr),
            &COUNT.to_string(),
            &SIZE.to_string(),
        ])
        .status()
        .expect("run netpeer sender");
    assert!(status.success(), "netpeer udp-send failed");
    wait_success(&mut receiver, "udp receiver", Duration::from_secs(20));
}

fn resource(request: &ExportMetricsServiceRequest, key: &str) -> Option<String> {
    request.resource_metrics[0]
        .resource
        .as_ref()
        .and_then(|r| otlp::attribute(&r.attributes, key))
        .map(str::to_owned)
}

/// Exports to `receiver`, configured by flags or (`by_env`) by the standard
/// OTEL_* variables.
fn export_over(receiver: &otlp::Receiver, by_env: bool) {
    require_root();
    let root = Cgroup::new_root("agent-test-otlp");
    let (a, b) = (root.child("a"), root.child("b"));
    let pair = VethPair::new();
    let pin_dir = std::path::Path::new("/sys/fs/bpf").join(agent_tests::unique("agent-test"));
    let base = receiver.endpoint.trim_end_matches("/v1/metrics");
    let mut daemon = if by_env {
        Daemon::start_with_env(
            &root.path,
            &pin_dir,
            &["--interval", "100ms"],
            &[
                // The base endpoint: the daemon adds /v1/metrics for HTTP.
                ("OTEL_EXPORTER_OTLP_ENDPOINT", base),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", receiver.protocol),
                ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=test,team=kernel",
                ),
                ("OTEL_SERVICE_NAME", "node-agent"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=kernel%20test"),
            ],
        )
    } else {
        Daemon::start_with_pins(
            &root.path,
            &pin_dir,
            &[
                "--otlp-endpoint",
                &receiver.endpoint,
                "--otlp-protocol",
                receiver.protocol,
                "--export-interval",
                "200ms",
                "--interval",
                "100ms",
                "--resource-attributes",
                "deployment.environment=test,team=kernel",
                "--otlp-headers",
                "x-tenant=kernel%20test",
            ],
        )
    };
    udp(&pair, &a, &b);

    let tx = [
        ("agent.cgroup.path", "/a"),
        ("network.io.direction", "transmit"),
    ];
    let rx = [
        ("agent.cgroup.path", "/b"),
        ("network.io.direction", "receive"),
    ];
    #[expect(clippy::cast_precision_loss, reason = "small exact integers")]
    let (bytes, count) = (BYTES as f64, COUNT as f64);
    // The first export with every datagram counted and the sender's CPU
    // time: a snapshot taken after its sends but before it left the CPU
    // has the first and not yet the second.
    let request = receiver.wait_for(Duration::from_secs(20), |r| {
        otlp::sum_value(r, "container.network.io", &tx) == Some(bytes)
            && otlp::sum_value(r, "container.network.io", &rx) == Some(bytes)
            && otlp::sum_value(r, "container.cpu.time", &[("agent.cgroup.path", "/a")])
                .is_some_and(|s| s > 0.0)
    });
    // Exact values, both directions, bytes and packets; nothing the other way.
    assert_eq!(
        otlp::sum_value(&request, "agent.cgroup.network.packets", &tx),
        Some(count)
    );
    assert_eq!(
        otlp::sum_value(
            &request,
            "agent.cgroup.network.packets",
            &[
                ("agent.cgroup.path", "/b"),
                ("network.io.direction", "receive")
            ]
        ),
        Some(count)
    );
    assert_eq!(
        otlp::sum_value(
            &request,
            "container.network.io",
            &[
                ("agent.cgroup.path", "/a"),
                ("network.io.direction", "receive")
            ]
        ),
        Some(0.0)
    );
    assert_eq!(
        otlp::sum_value(
            &request,
            "container.network.io",
            &[
                ("agent.cgroup.path", "/"),
                ("network.io.direction", "transmit")
            ]
        ),
        Some(0.0)
    );
    // Instruments and units.
    let io = otlp::metric(&request, "container.network.io").expect("container.network.io");
    assert_eq!(io.unit, "By");
    let Some(Data::Sum(sum)) = &io.data else {
        panic!("container.network.io is not a sum: {io:?}")
    };
    assert!(sum.is_monotonic);
    assert_eq!(
        sum.aggregation_temporality,
        AggregationTemporality::Cumulative as i32
    );
    assert_eq!(
        sum.data_points.len(),
        6,
        "three cgroups, two directions: {sum:?}"
    );
    for point in &sum.data_points {
        assert!(
            point.start_time_unix_nano > 0 && point.time_unix_nano > point.start_time_unix_nano
        );
    }
    let cpu = otlp::metric(&request, "container.cpu.time").expect("container.cpu.time");
    assert_eq!(cpu.unit, "s");
    assert!(matches!(&cpu.data, Some(Data::Sum(s)) if s.is_monotonic));
    // (The sender's CPU time is in the request: see the wait above.)
    let latency = otlp::metric(&request, "agent.cgroup.cpu.runqueue.latency")
        .expect("the run-queue latency histogram");
    assert_eq!(latency.unit, "s");
    let Some(Data::Histogram(histogram)) = &latency.data else {
        panic!("run-queue latency is not a histogram: {latency:?}")
    };
    for point in &histogram.data_points {
        assert_eq!(point.explicit_bounds.len(), 24);
        assert_eq!(point.bucket_counts.len(), 25);
        assert_eq!(point.bucket_counts.iter().sum::<u64>(), point.count);
        assert!((point.explicit_bounds[0] - 2e-6).abs() < 1e-12);
        assert_eq!(point.sum, None, "the kernel keeps no sum of waits");
        // The longest wait lies within the highest non-empty bucket (a wait
        // of 0 ns is a real sample: the task ran the moment it was queued).
        if let Some(top) = point.bucket_counts.iter().rposition(|&c| c > 0) {
            let low = if top == 0 {
                0.0
            } else {
                point.explicit_bounds[top - 1]
            };
            let high = point.explicit_bounds.get(top).copied().unwrap_or(f64::MAX);
            assert!(
                point.max.is_some_and(|max| max >= low && max <= high),
                "{point:?}"
            );
        } else {
            assert_eq!(point.max, None, "{point:?}");
        }
    }
    assert_eq!(receiver.header("x-tenant").as_deref(), Some("kernel test"));
    // Resource attributes: the defaults and the ones given.
    let service = if by_env { "node-agent" } else { "agent" };
    assert_eq!(resource(&request, "service.name").as_deref(), Some(service));
    assert_eq!(
        resource(&request, "service.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let host = nix::unistd::gethostname()
        .expect("hostname")
        .into_string()
        .expect("utf-8 hostname");
    assert_eq!(resource(&request, "host.name"), Some(host));
    assert_eq!(resource(&request, "team").as_deref(), Some("kernel"));
    assert_eq!(
        resource(&request, "deployment.environment").as_deref(),
        Some("test")
    );

    // A removed cgroup stops being exported.
    drop(b);
    let after = receiver.requests().len();
    let request = receiver.wait_for(Duration::from_secs(10), |r| {
        otlp::sum_value(r, "container.network.io", &tx).is_some()
            && otlp::sum_value(r, "container.network.io", &rx).is_none()
    });
    assert!(receiver.requests().len() > after);
    assert_eq!(
        otlp::sum_value(&request, "container.network.io", &tx),
        Some(bytes)
    );
    let log = daemon.stop();
    assert!(!log.contains("WARN"), "no warning expected:\n{log}");
}

#[test]
fn otlp_grpc_receives_exact_udp_counts_units_and_attributes() {
    let receiver = otlp::Receiver::grpc();
    export_over(&receiver, false);
}

#[test]
fn otel_variables_configure_the_export() {
    let receiver = otlp::Receiver::http();
    export_over(&receiver, true);
}

#[test]
fn otlp_http_protobuf_receives_exact_udp_counts_units_and_attributes() {
    let receiver = otlp::Receiver::http();
    export_over(&receiver, false);
}

/// A GET over loopback; the body (None when nothing answers).
fn try_http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

fn http_get(port: u16, path: &str) -> String {
    try_http_get(port, path).unwrap_or_else(|| panic!("GET http://127.0.0.1:{port}{path} failed"))
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A prometheus server this test started; killed (by pid) on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
    /// Held while prometheus runs (it binds the port itself).
    _reserved: otlp::ReservedPort,
}

impl Prometheus {
    fn start(target: u16) -> Self {
        let dir = std::env::temp_dir().join(agent_tests::unique("agent-test-prometheus"));
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: agent\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let reserved = otlp::ReservedPort::new();
        let port = reserved.port;
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(
                "start /usr/bin/prometheus (apt-get install prometheus; cargo xtask setup does)",
            );
        Self {
            child,
            dir,
            port,
            _reserved: reserved,
        }
    }

    /// The value of the instant query's single series, when it has one.
    fn query(&self, query: &str) -> Option<(serde_json::Value, String)> {
        let body = try_http_get(
            self.port,
            &format!("/api/v1/query?query={}", url_encode(query)),
        )?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = json["data"]["result"].as_array()?;
        let series = result.first()?;
        Some((
            series["metric"].clone(),
            series["value"][1].as_str()?.to_owned(),
        ))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_scrapes_the_endpoint_and_returns_the_exact_series() {
    require_root();
    let root = Cgroup::new_root("agent-test-prom");
    let (a, b) = (root.child("a"), root.child("b"));
    let pair = VethPair::new();
    let reserved_port = otlp::ReservedPort::new();
    let port = reserved_port.port;
    let listen = format!("127.0.0.1:{port}");
    let _daemon = Daemon::start(
        &root.path,
        &["--prometheus-listen", &listen, "--interval", "100ms"],
    );
    udp(&pair, &a, &b);
    // The endpoint itself: the translated names.
    let text = http_get(port, "/metrics");
    let line = format!(
        "container_network_io_bytes_total{{agent_cgroup_path=\"/a\",network_io_direction=\"transmit\"}} {BYTES}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = text;
    while !text.lines().any(|l| l == line) {
        assert!(Instant::now() < deadline, "no {line:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
        text = http_get(port, "/metrics");
    }
    assert!(text.contains("# TYPE container_network_io_bytes_total counter"));
    assert!(text.contains("# TYPE agent_cgroup_cpu_runqueue_latency_seconds histogram"));
    assert!(text.contains(&format!(
        "agent_cgroup_network_packets_total{{agent_cgroup_path=\"/b\",network_io_direction=\"receive\"}} {COUNT}"
    )));
    assert!(text.contains("target_info{host_name="));

    let prometheus = Prometheus::start(port);
    let query = "container_network_io_bytes_total{agent_cgroup_path=\"/a\",network_io_direction=\"transmit\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    let (labels, value) = loop {
        if let Some(found) = prometheus.query(query) {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus returned no series for {query}; its log:\n{}",
            std::fs::read_to_string(prometheus.dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(value, BYTES.to_string(), "{labels}");
    assert_eq!(labels["job"], "agent");
    assert_eq!(labels["agent_cgroup_path"], "/a");
    let (_, packets) = prometheus
        .query("agent_cgroup_network_packets_total{agent_cgroup_path=\"/b\",network_io_direction=\"receive\"}")
        .expect("the receiver's packets");
    assert_eq!(packets, COUNT.to_string());
}

#[test]
fn an_unreachable_collector_blocks_nothing_and_is_warned_about_once() {
    require_root();
    let root = Cgroup::new_root("agent-test-otlp-down");
    let (a, b) = (root.child("a"), root.child("b"));
    let pair = VethPair::new();
    // Nothing listens there: every connect is refused.
    let dead = otlp::ReservedPort::new();
    let dead_port = dead.port;
    let reserved_port = otlp::ReservedPort::new();
    let port = reserved_port.port;
    let mut daemon = Daemon::start(
        &root.path,
        &[
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{dead_port}"),
            "--otlp-protocol",
            "grpc",
            "--export-interval",
            "100ms",
            "--interval",
            "100ms",
            "--prometheus-listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    udp(&pair, &a, &b);
    let started = Instant::now();
    let stats = daemon.stats();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "agent stats took {:?}",
        started.elapsed()
    );
    assert_eq!(counts(net_of(&stats, "/a")), (0, 0, BYTES, COUNT));
    assert_eq!(counts(net_of(&stats, "/b")), (BYTES, COUNT, 0, 0));
    // Several failed attempts (backoff 1 s, 2 s, ...), counted in the daemon's
    // own metrics, while the Prometheus endpoint keeps answering.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = http_get(port, "/metrics");
        let failures = text
            .lines()
            .find_map(|l| l.strip_prefix("agent_export_failures_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if failures >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "failures not counted:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(counts(net_of(&daemon.stats(), "/a")), (0, 0, BYTES, COUNT));
    // The collector comes up: the queued exports and the next ones arrive,
    // and the recovery is logged once.
    let receiver = otlp::Receiver::grpc_on(dead);
    #[expect(clippy::cast_precision_loss, reason = "small exact integers")]
    let bytes = BYTES as f64;
    receiver.wait_for(Duration::from_secs(40), |r| {
        otlp::sum_value(
            r,
            "container.network.io",
            &[
                ("agent.cgroup.path", "/a"),
                ("network.io.direction", "transmit"),
            ],
        ) == Some(bytes)
    });
    // (The receiver has the request before the daemon has the answer.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log().contains("works again") {
        assert!(
            Instant::now() < deadline,
            "no recovery line:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = daemon.stop();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "one warning per outage:\n{log}");
    assert!(
        warnings[0].contains(&format!(
            "OTLP export to http://127.0.0.1:{dead_port} failed"
        )),
        "{log}"
    );
    assert_eq!(log.matches("works again").count(), 1, "{log}");
}

/// A value of the daemon's own Prometheus text, or 0.
fn scraped(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_collector_that_never_answers_delays_neither_stats_nor_enforcement() {
    require_root();
    let root = Cgroup::new_root("agent-test-otlp-slow");
    let (a, b, c) = (root.child("a"), root.child("b"), root.child("c"));
    let pair = VethPair::new();
    // Accepted by the kernel (backlog) and never read: every export times out.
    let black_hole = TcpListener::bind("127.0.0.1:0").expect("bind the black hole");
    let endpoint = format!(
        "http://{}/v1/metrics",
        black_hole.local_addr().expect("address")
    );
    let file = agent_tests::PolicyFile::new(
        r#"{"version": 1, "policies": [{"name": "t", "cgroups": ["/c"],
            "devices": {"default": "allow", "rules": [{"deny": "c 1:5 r"}]}}]}"#,
    );
    let reserved_port = otlp::ReservedPort::new();
    let port = reserved_port.port;
    let mut daemon = Daemon::start(
        &root.path,
        &[
            "--policy",
            file.0.to_str().expect("utf-8 temp path"),
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-timeout",
            "300ms",
            "--export-interval",
            "100ms",
            "--interval",
            "100ms",
            "--prometheus-listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    udp(&pair, &a, &b);
    // Enforcement: the policy's verdicts, at once.
    let out = c
        .command(netpeer_bin().with_file_name("devpeer"), None)
        .args(["try", "r:/dev/zero", "r:/dev/null"])
        .output()
        .expect("run devpeer");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "EPERM\nok\n");
    let started = Instant::now();
    let stats = daemon.stats();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(counts(net_of(&stats, "/a")), (0, 0, BYTES, COUNT));
    // Several timed-out attempts, counted; the denial is exported too.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = http_get(port, "/metrics");
        let denials = scraped(
            &text,
            "agent_cgroup_policy_denials_total{agent_cgroup_path=\"/c\",agent_policy_kind=\"device\"}",
        );
        if scraped(&text, "agent_export_failures_total") >= 3 && denials == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not counted:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = daemon.stop();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "one warning per outage:\n{log}");
    assert!(warnings[0].contains("no answer within 300ms"), "{log}");
    drop(black_hole);
}

/// The daemon's Prometheus text once it has a snapshot.
fn metrics_text(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(text) = try_http_get(port, "/metrics").filter(|t| t.contains("target_info")) {
            return text;
        }
        assert!(Instant::now() < deadline, "no metrics on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn include_exclude_and_depth_choose_the_exported_cgroups() {
    require_root();
    let root = Cgroup::new_root("agent-test-export-select");
    let keep = root.child("keep");
    let _deep = keep.child("deep");
    let _skip = root.child("skip");
    let reserved_port = otlp::ReservedPort::new();
    let port = reserved_port.port;
    let _daemon = Daemon::start(
        &root.path,
        &[
            "--prometheus-listen",
            &format!("127.0.0.1:{port}"),
            "--interval",
            "100ms",
            "--exclude",
            "/skip",
            "--max-depth",
            "1",
        ],
    );
    let text = metrics_text(port);
    let paths: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.split_once("agent_cgroup_path=\"")?.1.split_once('"'))
        .map(|(path, _)| path)
        .collect();
    assert_eq!(
        paths.into_iter().collect::<Vec<_>>(),
        ["/", "/keep"],
        "{text}"
    );
    drop(keep);
}

#[test]
fn an_agent_run_workload_is_exported_with_its_name() {
    require_root();
    let runs = agent_tests::Runs::new();
    let reserved_port = otlp::ReservedPort::new();
    let port = reserved_port.port;
    let daemon = runs.daemon(&[
        "--prometheus-listen",
        &format!("127.0.0.1:{port}"),
        "--interval",
        "100ms",
    ]);
    let mut run = runs.spawn(&["--name", "exported", "--net", "none"], &["sleep", "30"]);
    runs.wait_running("exported");
    let series =
        "agent_cgroup_tasks{agent_cgroup_path=\"/exported\",agent_workload_name=\"exported\"} 1";
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = metrics_text(port);
    while !text.lines().any(|l| l == series) {
        assert!(Instant::now() < deadline, "no {series:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
        text = metrics_text(port);
    }
    // agent run makes its cgroups in every hierarchy: the memory figure is there.
    let memory = scraped(
        &text,
        "container_memory_usage_bytes{agent_cgroup_path=\"/exported\",agent_workload_name=\"exported\"}",
    );
    assert!(memory > 0, "{text}");
    runs.stop("exported", &mut run);
    drop(daemon);
}

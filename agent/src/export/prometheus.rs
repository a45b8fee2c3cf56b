//! The Prometheus text format (0.0.4) of the same metric families, served at
//! `/metrics`, with the names OpenTelemetry's Prometheus exporters use: dots
//! become underscores, the unit is appended (`_seconds`, `_bytes`; an
//! annotation such as `{packet}` adds nothing), counters end in `_total`, and
//! the resource becomes a `target_info` series.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::watch,
};

use super::{
    metrics::{Family, Instrument, Value},
    Published, View,
};

/// A metric or label name: characters outside `[a-zA-Z0-9_]` become `_`.
#[must_use]
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The Prometheus name of a metric (without `_bucket`/`_count` suffixes).
#[must_use]
pub fn name(metric: &str, unit: &str, instrument: Instrument) -> String {
    let mut name = sanitize(metric);
    let suffix = match unit {
        "s" => "seconds",
        "By" => "bytes",
        "1" => "ratio",
        _ => "",
    };
    if !suffix.is_empty() && !name.ends_with(suffix) {
        name.push('_');
        name.push_str(suffix);
    }
    if instrument == Instrument::Counter {
        name.push_str("_total");
    }
    name
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(out: &mut String, attributes: &[(&str, String)], le: Option<&str>) {
    if attributes.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (key, value) in attributes {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{}=\"{}\"", sanitize(key), escape(value));
    }
    if let Some(le) = le {
        if !first {
            out.push(',');
        }
        let _ = write!(out, "le=\"{le}\"");
    }
    out.push('}');
}

fn family(out: &mut String, family: &Family) {
    let name = name(family.name, family.unit, family.instrument);
    let kind = match family.instrument {
        Instrument::Counter => "counter",
        Instrument::UpDownCounter => "gauge",
        Instrument::Histogram => "histogram",
    };
    let _ = writeln!(out, "# HELP {name} {}", family.description);
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (attributes, value) in &family.points {
        match value {
            Value::Int(v) => {
                out.push_str(&name);
                labels(out, attributes, None);
                let _ = writeln!(out, " {v}");
            }
            Value::Double(v) => {
                out.push_str(&name);
                labels(out, attributes, None);
                let _ = writeln!(out, " {v}");
            }
            Value::Histogram {
                bounds,
                counts,
                count,
                max: _,
            } => {
                // Prometheus buckets are cumulative; the kernel's are not.
                let mut below = 0u64;
                for (bound, n) in bounds.iter().zip(counts) {
                    below += n;
                    let _ = write!(out, "{name}_bucket");
                    labels(out, attributes, Some(&bound.to_string()));
                    let _ = writeln!(out, " {below}");
                }
                let _ = write!(out, "{name}_bucket");
                labels(out, attributes, Some("+Inf"));
                let _ = writeln!(out, " {count}");
                // No `_sum`: the kernel counts waits per bucket, not their total.
                let _ = write!(out, "{name}_count");
                labels(out, attributes, None);
                let _ = writeln!(out, " {count}");
            }
        }
    }
}

/// The text of one scrape.
#[must_use]
pub fn render(view: &View, published: &Published) -> String {
    let mut out = String::with_capacity(64 * 1024);
    out.push_str("# HELP target_info Target metadata\n# TYPE target_info gauge\ntarget_info");
    let resource: Vec<(&str, String)> = view
        .resource
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    labels(&mut out, &resource, None);
    out.push_str(" 1\n");
    for f in view.families(&published.snapshot) {
        if !f.points.is_empty() {
            family(&mut out, &f);
        }
    }
    out
}

/// Serves `/metrics` until aborted.
pub async fn serve(
    listener: std::net::TcpListener,
    view: Arc<View>,
    latest: watch::Receiver<Option<Arc<Published>>>,
) {
    let address = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(err) => {
            log::error!("serving Prometheus metrics on {address} failed: {err}");
            return;
        }
    };
    log::info!("serving Prometheus metrics at http://{address}/metrics");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let view = view.clone();
        let latest = latest.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, &view, &latest)).await;
        });
    }
}

/// Answers one request (one per connection).
async fn answer(
    mut stream: TcpStream,
    view: &View,
    latest: &watch::Receiver<Option<Arc<Published>>>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buffer).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body) = if method != "GET" {
        ("405 Method Not Allowed", "only GET\n".to_owned())
    } else if path != "/metrics" {
        ("404 Not Found", "metrics are at /metrics\n".to_owned())
    } else {
        let published = latest.borrow().clone();
        match published {
            Some(published) => ("200 OK", render(view, &published)),
            None => (
                "503 Service Unavailable",
                "no snapshot taken yet\n".to_owned(),
            ),
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prometheus_conventions() {
        assert_eq!(
            name("container.cpu.time", "s", Instrument::Counter),
            "container_cpu_time_seconds_total"
        );
        assert_eq!(
            name("container.network.io", "By", Instrument::Counter),
            "container_network_io_bytes_total"
        );
        assert_eq!(
            name("container.memory.usage", "By", Instrument::UpDownCounter),
            "container_memory_usage_bytes"
        );
        assert_eq!(
            name(
                "agent.cgroup.network.packets",
                "{packet}",
                Instrument::Counter
            ),
            "agent_cgroup_network_packets_total"
        );
        assert_eq!(
            name(
                "agent.cgroup.cpu.runqueue.latency",
                "s",
                Instrument::Histogram
            ),
            "agent_cgroup_cpu_runqueue_latency_seconds"
        );
        assert_eq!(sanitize("k8s.pod.uid"), "k8s_pod_uid");
    }

    #[test]
    fn families_render_as_text() {
        let mut out = String::new();
        family(
            &mut out,
            &Family {
                name: "agent.cgroup.cpu.runqueue.latency",
                unit: "s",
                instrument: Instrument::Histogram,
                description: "Waits.",
                points: vec![(
                    vec![("agent.cgroup.path", "/a\"b".into())],
                    Value::Histogram {
                        bounds: vec![0.5, 1.0],
                        counts: vec![2, 3, 1],
                        count: 6,
                        max: Some(1.5),
                    },
                )],
            },
        );
        assert_eq!(
            out,
            "# HELP agent_cgroup_cpu_runqueue_latency_seconds Waits.\n\
             # TYPE agent_cgroup_cpu_runqueue_latency_seconds histogram\n\
             agent_cgroup_cpu_runqueue_latency_seconds_bucket{agent_cgroup_path=\"/a\\\"b\",le=\"0.5\"} 2\n\
             agent_cgroup_cpu_runqueue_latency_seconds_bucket{agent_cgroup_path=\"/a\\\"b\",le=\"1\"} 5\n\
             agent_cgroup_cpu_runqueue_latency_seconds_bucket{agent_cgroup_path=\"/a\\\"b\",le=\"+Inf\"} 6\n\
             agent_cgroup_cpu_runqueue_latency_seconds_count{agent_cgroup_path=\"/a\\\"b\"} 6\n"
        );
        let mut out = String::new();
        family(
            &mut out,
            &Family {
                name: "container.network.io",
                unit: "By",
                instrument: Instrument::Counter,
                description: "Bytes.",
                points: vec![(
                    vec![
                        ("agent.cgroup.path", "/a".into()),
                        ("network.io.direction", "transmit".into()),
                    ],
                    Value::Int(12800),
                )],
            },
        );
        assert!(out.ends_with(
            "container_network_io_bytes_total{agent_cgroup_path=\"/a\",network_io_direction=\"transmit\"} 12800\n"
        ));
    }
}

//! OTLP: metric families → `ExportMetricsServiceRequest` (opentelemetry-proto
//! messages), delivered over gRPC (tonic) or HTTP/protobuf.
//!
//! Every value is cumulative from the kernel's counters, so each request is
//! a complete picture: a queued request that is dropped (queue full) loses
//! resolution, never counts. Delivery runs on the exporter thread; a failing
//! collector costs retries with backoff there and one warning per outage.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        metrics_service_client::MetricsServiceClient, ExportMetricsServiceRequest,
    },
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    metrics::v1::{
        metric::Data, number_data_point, AggregationTemporality, Histogram, HistogramDataPoint,
        Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    },
    resource::v1::Resource,
};
use prost::Message as _;
use tokio::sync::watch;

use super::{
    config::{Otlp, Protocol},
    metrics::{Family, Instrument, Value},
    Health, Published, View,
};

/// Requests kept while the collector is unreachable (oldest dropped first).
pub const QUEUE: usize = 16;
/// The first retry's delay; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn key_value(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..KeyValue::default()
    }
}

fn metric(family: &Family, start: u64, time: u64) -> Metric {
    let attributes = |attrs: &[(&'static str, String)]| -> Vec<KeyValue> {
        attrs.iter().map(|(k, v)| key_value(k, v)).collect()
    };
    let number = |attrs: &[(&'static str, String)], value: &Value| {
        let value = match value {
            Value::Int(v) => Some(number_data_point::Value::AsInt(
                i64::try_from(*v).unwrap_or(i64::MAX),
            )),
            Value::Double(v) => Some(number_data_point::Value::AsDouble(*v)),
            Value::Histogram { .. } => None,
        };
        NumberDataPoint {
            attributes: attributes(attrs),
            start_time_unix_nano: start,
            time_unix_nano: time,
            value,
            ..NumberDataPoint::default()
        }
    };
    let data = match family.instrument {
        Instrument::Counter | Instrument::UpDownCounter => Data::Sum(Sum {
            data_points: family.points.iter().map(|(a, v)| number(a, v)).collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: family.instrument == Instrument::Counter,
        }),
        Instrument::Histogram => Data::Histogram(Histogram {
            data_points: family
                .points
                .iter()
                .filter_map(|(attrs, value)| match value {
                    Value::Histogram {
                        bounds,
                        counts,
                        count,
                        max,
                    } => Some(HistogramDataPoint {
                        attributes: attributes(attrs),
                        start_time_unix_nano: start,
                        time_unix_nano: time,
                        count: *count,
                        // The kernel counts waits per bucket, not their sum.
                        sum: None,
                        bucket_counts: counts.clone(),
                        explicit_bounds: bounds.clone(),
                        max: *max,
                        ..HistogramDataPoint::default()
                    }),
                    _ => None,
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        }),
    };
    Metric {
        name: family.name.to_owned(),
        description: family.description.to_owned(),
        unit: family.unit.to_owned(),
        data: Some(data),
        ..Metric::default()
    }
}

/// The request for one snapshot.
#[must_use]
pub fn request(view: &View, published: &Published) -> ExportMetricsServiceRequest {
    let start = nanos(view.start);
    let time = nanos(published.taken);
    let metrics = view
        .families(&published.snapshot)
        .iter()
        .filter(|family| !family.points.is_empty())
        .map(|family| metric(family, start, time))
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: view.resource.iter().map(|(k, v)| key_value(k, v)).collect(),
                ..Resource::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "agent".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                metrics,
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    }
}

/// Sends requests to one endpoint.
enum Sender {
    Grpc(MetricsServiceClient<tonic::transport::Channel>),
    Http(Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>),
}

impl Sender {
    fn new(config: &Otlp) -> Result<Self, String> {
        match config.protocol {
            Protocol::Grpc => {
                let channel = tonic::transport::Channel::from_shared(config.endpoint.clone())
                    .map_err(|err| format!("{}: {err}", config.endpoint))?
                    .connect_timeout(config.timeout)
                    .timeout(config.timeout)
                    .connect_lazy();
                Ok(Self::Grpc(MetricsServiceClient::new(channel)))
            }
            Protocol::HttpProtobuf => Ok(Self::Http(
                Client::builder(TokioExecutor::new()).build_http(),
            )),
        }
    }

    /// What is queued: the message for gRPC (tonic encodes it), its
    /// encoding for HTTP.
    fn prepare(&self, request: ExportMetricsServiceRequest) -> Pending {
        match self {
            Self::Grpc(_) => Pending::Message(request),
            Self::Http(_) => Pending::Encoded(Bytes::from(request.encode_to_vec())),
        }
    }

    async fn send(&mut self, config: &Otlp, pending: &Pending) -> Result<(), String> {
        match (self, pending) {
            (Self::Grpc(client), Pending::Message(request)) => {
                let mut grpc = tonic::Request::new(request.clone());
                for (key, value) in &config.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes())
                        .map_err(|err| format!("header {key}: {err}"))?;
                    let value = value
                        .parse()
                        .map_err(|err| format!("header {key}: {err}"))?;
                    grpc.metadata_mut().insert(key, value);
                }
                let response = tokio::time::timeout(config.timeout, client.export(grpc))
                    .await
                    .map_err(|_| format!("no answer within {:?}", config.timeout))?
                    .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
                rejected(
                    response
                        .into_inner()
                        .partial_success
                        .map(|p| (p.rejected_data_points, p.error_message)),
                )
            }
            (Self::Http(client), Pending::Encoded(body)) => {
                let mut builder = http::Request::post(&config.endpoint)
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf");
                for (key, value) in &config.headers {
                    builder = builder.header(key.as_str(), value.as_str());
                }
                let http_request = builder
                    .body(Full::new(body.clone()))
                    .map_err(|err| err.to_string())?;
                let exchange = async {
                    let response = client
                        .request(http_request)
                        .await
                        .map_err(|err| format!("{err:?}"))?;
                    let status = response.status();
                    let answer = response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|err| err.to_string())?
                        .to_bytes();
                    if status.is_success() {
                        Ok(answer)
                    } else {
                        Err(format!(
                            "HTTP {status}: {}",
                            String::from_utf8_lossy(&answer[..answer.len().min(200)])
                        ))
                    }
                };
                let answer = tokio::time::timeout(config.timeout, exchange)
                    .await
                    .map_err(|_| format!("no answer within {:?}", config.timeout))??;
                let response = opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse::decode(answer)
                    .unwrap_or_default();
                rejected(
                    response
                        .partial_success
                        .map(|p| (p.rejected_data_points, p.error_message)),
                )
            }
            _ => Err("internal error: an export prepared for the other protocol".into()),
        }
    }
}

/// One queued export.
enum Pending {
    Message(ExportMetricsServiceRequest),
    Encoded(Bytes),
}

/// A partial success that rejected points is a failure worth a warning.
fn rejected(partial: Option<(i64, String)>) -> Result<(), String> {
    match partial {
        Some((rejected, message)) if rejected > 0 => Err(format!(
            "the collector rejected {rejected} data points: {message}"
        )),
        _ => Ok(()),
    }
}

/// Exports the latest snapshot every interval until aborted.
pub async fn run(
    config: Otlp,
    view: Arc<View>,
    health: Arc<Health>,
    mut latest: watch::Receiver<Option<Arc<Published>>>,
) {
    let mut sender = match Sender::new(&config) {
        Ok(sender) => sender,
        Err(err) => {
            log::error!("OTLP export to {} cannot start: {err}", config.endpoint);
            return;
        }
    };
    log::info!(
        "exporting metrics over OTLP ({}) to {} every {:?}",
        config.protocol.name(),
        config.endpoint,
        config.interval
    );
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut queue: VecDeque<Pending> = VecDeque::new();
    let mut backoff = FIRST_BACKOFF;
    let mut retry_at: Option<tokio::time::Instant> = None;
    // Failed attempts in the current outage (0: none).
    let mut outage = 0u64;
    let mut last_sent: Option<SystemTime> = None;
    loop {
        let retry = retry_at.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            _ = tick.tick() => {
                let mut published = latest.borrow_and_update().clone();
                if published.as_ref().map(|p| p.taken) == last_sent {
                    // The daemon's next snapshot is due any moment (its tick
                    // and this one are not in phase): wait for it rather
                    // than skip an interval.
                    let _ = tokio::time::timeout(config.interval, latest.changed()).await;
                    published = latest.borrow_and_update().clone();
                }
                if let Some(published) = published {
                    if last_sent != Some(published.taken) {
                        last_sent = Some(published.taken);
                        let pending = sender.prepare(request(&view, &published));
                        if queue.len() == QUEUE {
                            queue.pop_front();
                            health.export_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        queue.push_back(pending);
                    }
                }
            }
            () = tokio::time::sleep_until(retry), if retry_at.is_some() => retry_at = None,
        }
        if retry_at.is_some() {
            continue;
        }
        while let Some(pending) = queue.front() {
            match sender.send(&config, pending).await {
                Ok(()) => {
                    queue.pop_front();
                    if outage > 0 {
                        log::info!(
                            "OTLP export to {} works again (after {outage} failed attempts)",
                            config.endpoint
                        );
                    }
                    outage = 0;
                    backoff = FIRST_BACKOFF;
                }
                Err(err) => {
                    health.export_failures.fetch_add(1, Ordering::Relaxed);
                    if outage == 0 {
                        log::warn!(
                            "OTLP export to {} failed: {err}; retrying with backoff up to {:?} \
                             and keeping the latest {QUEUE} exports (further failures of this \
                             outage are counted in agent.export.failures, not logged)",
                            config.endpoint,
                            MAX_BACKOFF
                        );
                    }
                    outage += 1;
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        sync::Arc,
        time::{Duration, Instant, SystemTime},
    };

    use common::{NetCounters, SchedCounters};

    use super::*;
    use crate::{
        cgroupfs::Resources,
        collect::{CgroupSample, Sample},
        export::attrib::Selection,
        model::Snapshot,
    };

    const ID: &str = "3f4e8c2a9b1d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";

    fn cgroup(id: u64, path: &str) -> CgroupSample {
        let mut sched = SchedCounters::ZERO;
        sched.cpu_ns = 1_500_000_000;
        sched.latency[1] = 4;
        sched.latency_max_ns = 3_500;
        CgroupSample {
            id,
            path: path.into(),
            name: (path == "/web").then(|| "web".to_owned()),
            net: NetCounters {
                rx_bytes: 1280,
                rx_packets: 10,
                tx_bytes: 2560,
                tx_packets: 20,
            },
            sched,
            resources: Resources {
                memory_current: Some(4096),
                ..Resources::default()
            },
            devices: common::devices::DevCounters {
                allowed: 5,
                denied: 2,
                suppressed: 0,
            },
            net_drops: common::netpolicy::NetDrops {
                policy_packets: 0,
                policy_bytes: 0,
                rate_packets: 0,
                rate_bytes: 0,
                rate_marked: 0,
                refused_connects: 0,
                suppressed: 0,
            },
            rule_hits: Vec::new(),
        }
    }

    fn published(cgroups: Vec<CgroupSample>) -> Published {
        let taken = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_504_000);
        let sample = Sample {
            taken,
            at: Instant::now(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroups,
            uncounted: NetCounters::ZERO,
            sched_uncounted: SchedCounters::ZERO,
        };
        Published {
            snapshot: Snapshot::new(&sample, None),
            taken,
        }
    }

    fn attribute<'a>(point: &'a [KeyValue], key: &str) -> Option<&'a str> {
        point.iter().find(|kv| kv.key == key).and_then(|kv| {
            match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.as_str()),
                _ => None,
            }
        })
    }

    #[test]
    fn a_snapshot_becomes_cumulative_otlp_metrics_with_attributes() {
        let view = View::new(
            Selection {
                exclude: vec!["/skip".into()],
                ..Selection::default()
            },
            vec![("service.name".into(), "agent".into())],
            Arc::default(),
        );
        let docker = format!("/system.slice/docker-{ID}.scope");
        let request = request(
            &view,
            &published(vec![
                cgroup(1, "/web"),
                cgroup(2, &docker),
                cgroup(3, "/skip"),
            ]),
        );
        // It survives the wire.
        let request =
            ExportMetricsServiceRequest::decode(request.encode_to_vec().as_slice()).unwrap();
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let find = |name: &str| metrics.iter().find(|m| m.name == name).unwrap();

        let io = find("container.network.io");
        assert_eq!(io.unit, "By");
        let Some(Data::Sum(sum)) = &io.data else {
            panic!("{io:?}")
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        // Two cgroups (the third excluded), two directions.
        assert_eq!(sum.data_points.len(), 4);
        let web_tx = sum
            .data_points
            .iter()
            .find(|p| {
                attribute(&p.attributes, "agent.cgroup.path") == Some("/web")
                    && attribute(&p.attributes, "network.io.direction") == Some("transmit")
            })
            .unwrap();
        assert_eq!(web_tx.value, Some(number_data_point::Value::AsInt(2560)));
        assert_eq!(
            attribute(&web_tx.attributes, "agent.workload.name"),
            Some("web")
        );
        let container = sum
            .data_points
            .iter()
            .find(|p| attribute(&p.attributes, "agent.cgroup.path") == Some(docker.as_str()))
            .unwrap();
        assert_eq!(attribute(&container.attributes, "container.id"), Some(ID));
        assert_eq!(
            attribute(&container.attributes, "container.runtime"),
            Some("docker")
        );

        let Some(Data::Sum(cpu)) = &find("container.cpu.time").data else {
            panic!()
        };
        assert_eq!(
            cpu.data_points[0].value,
            Some(number_data_point::Value::AsDouble(1.5))
        );
        let Some(Data::Sum(memory)) = &find("container.memory.usage").data else {
            panic!()
        };
        assert!(!memory.is_monotonic);

        let Some(Data::Histogram(latency)) = &find("agent.cgroup.cpu.runqueue.latency").data else {
            panic!()
        };
        let point = &latency.data_points[0];
        assert_eq!(point.count, 4);
        assert_eq!(point.bucket_counts[1], 4);
        assert_eq!(point.explicit_bounds.len() + 1, point.bucket_counts.len());
        assert_eq!(point.max, Some(3.5e-6));
        assert_eq!(point.sum, None);

        // The daemon's own metrics carry no cgroup attributes; figures the
        // host did not give (throttling here) have no points at all.
        let Some(Data::Sum(failures)) = &find("agent.export.failures").data else {
            panic!()
        };
        assert!(failures.data_points[0].attributes.is_empty());
        assert!(metrics
            .iter()
            .all(|m| m.name != "agent.cgroup.cpu.throttled.time"));
        assert_eq!(
            request.resource_metrics[0]
                .resource
                .as_ref()
                .unwrap()
                .attributes[0]
                .key,
            "service.name"
        );
    }
}

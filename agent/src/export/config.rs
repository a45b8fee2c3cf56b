//! Export settings: `agent daemon`'s flags and the standard `OTEL_*`
//! variables (a flag wins over a variable, a metrics-specific variable over
//! the general one). Everything is checked before the daemon changes
//! anything, and a bad value gets one sentence.

use std::{net::SocketAddr, time::Duration};

use clap::Args;
use opentelemetry_otlp::{
    OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_PROTOCOL_GRPC, OTEL_EXPORTER_OTLP_PROTOCOL_HTTP_PROTOBUF,
    OTEL_EXPORTER_OTLP_TIMEOUT,
};
use opentelemetry_sdk::resource::{EnvResourceDetector, Resource, ResourceDetector as _};

use super::attrib::Selection;

// The standard variables opentelemetry-otlp names only with its own
// exporters compiled in (which this crate does not use, see ARCHITECTURE.md).
pub const OTEL_EXPORTER_OTLP_METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL";
pub const OTEL_EXPORTER_OTLP_METRICS_HEADERS: &str = "OTEL_EXPORTER_OTLP_METRICS_HEADERS";
pub const OTEL_EXPORTER_OTLP_METRICS_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT";
pub const OTEL_METRIC_EXPORT_INTERVAL: &str = "OTEL_METRIC_EXPORT_INTERVAL";
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
pub const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";

/// `agent daemon`'s export flags.
#[derive(Debug, Clone, Default, Args)]
pub struct ExportArgs {
    /// Export metrics over OTLP to this URL (`http://127.0.0.1:4317` for
    /// gRPC, `http://127.0.0.1:4318` for HTTP, where `/v1/metrics` is added
    /// when the URL has no path). Default: OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
    /// else OTEL_EXPORTER_OTLP_ENDPOINT (plus `/v1/metrics` for HTTP); with
    /// neither, OTLP export is off.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// `grpc` or `http/protobuf`. Default: OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    /// else OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf.
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<String>,

    /// Headers sent with every export, `key=value,key=value`. Default:
    /// OTEL_EXPORTER_OTLP_METRICS_HEADERS, else OTEL_EXPORTER_OTLP_HEADERS.
    #[arg(long, value_name = "LIST")]
    pub otlp_headers: Option<String>,

    /// How long one export may take. Default: OTEL_EXPORTER_OTLP_METRICS_TIMEOUT
    /// or OTEL_EXPORTER_OTLP_TIMEOUT (milliseconds), else 10s.
    #[arg(long, value_name = "DURATION", value_parser = crate::cli::parse_duration)]
    pub otlp_timeout: Option<Duration>,

    /// How often to export over OTLP. Default: OTEL_METRIC_EXPORT_INTERVAL
    /// (milliseconds), else 60s.
    #[arg(long, value_name = "DURATION", value_parser = crate::cli::parse_duration)]
    pub export_interval: Option<Duration>,

    /// Resource attributes, `key=value,key=value`, on top of
    /// OTEL_RESOURCE_ATTRIBUTES (host.name, service.name and service.version
    /// are set unless given).
    #[arg(long, value_name = "LIST")]
    pub resource_attributes: Option<String>,

    /// service.name. Default: OTEL_SERVICE_NAME, else `agent`.
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,

    /// Serve the metrics in the Prometheus text format at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub prometheus_listen: Option<SocketAddr>,

    /// Export only cgroups whose path (relative to the watched root) matches
    /// one of these globs (`*` within a segment, `**` across). Repeatable.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,

    /// Do not export cgroups whose path matches one of these globs. Repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,

    /// Export cgroups at most this deep below the watched root (its
    /// children are depth 1).
    #[arg(long, value_name = "N")]
    pub max_depth: Option<usize>,
}

/// OTLP's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Where and how to export over OTLP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Otlp {
    /// The full URL (for HTTP, with its path).
    pub endpoint: String,
    pub protocol: Protocol,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub interval: Duration,
}

/// Everything the exporters need.
#[derive(Debug)]
pub struct Config {
    pub otlp: Option<Otlp>,
    /// Bound already, so that a busy address stops the start.
    pub prometheus: Option<std::net::TcpListener>,
    pub resource: Vec<(String, String)>,
    pub selection: Selection,
}

impl Config {
    /// Whether anything is exported.
    #[must_use]
    pub const fn enabled(&self) -> bool {
        self.otlp.is_some() || self.prometheus.is_some()
    }
}

fn pick(
    flag: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
    names: &[&str],
) -> Option<(String, String)> {
    flag.map(|v| ("--".to_owned(), v)).or_else(|| {
        names.iter().find_map(|name| {
            env(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| ((*name).to_owned(), v.trim().to_owned()))
        })
    })
}

/// `key=value,key=value` (values percent-decoded as the spec asks).
fn parse_pairs(text: &str, what: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{what}: {item:?} is not key=value"))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(format!("{what}: {item:?} has an empty key"));
            }
            Ok((key.to_owned(), percent_decode(value.trim())))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn millis(name: &str, text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(format!(
            "{name}={text:?} is not a positive number of milliseconds"
        )),
    }
}

fn endpoint(
    args: &ExportArgs,
    env: &dyn Fn(&str) -> Option<String>,
    protocol: Protocol,
) -> Result<Option<String>, String> {
    let (from, url, base) = if let Some(url) = &args.otlp_endpoint {
        ("--otlp-endpoint", url.clone(), false)
    } else if let Some(url) = env(OTEL_EXPORTER_OTLP_METRICS_ENDPOINT).filter(|u| !u.is_empty()) {
        (OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, url, false)
    } else if let Some(url) = env(OTEL_EXPORTER_OTLP_ENDPOINT).filter(|u| !u.is_empty()) {
        (OTEL_EXPORTER_OTLP_ENDPOINT, url, true)
    } else {
        return Ok(None);
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|err| format!("{from}: {url:?} is not a URL ({err})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{from}: {url:?} uses https, which this build does not support: \
                 export to a collector over http (on loopback or a trusted network)"
            ))
        }
        _ => {
            return Err(format!(
                "{from}: {url:?} is not an http:// URL such as http://127.0.0.1:4317"
            ))
        }
    }
    if uri.host().is_none() {
        return Err(format!("{from}: {url:?} names no host"));
    }
    Ok(Some(match protocol {
        Protocol::Grpc => url,
        Protocol::HttpProtobuf => {
            let path = uri.path();
            if base || path.is_empty() || path == "/" {
                format!("{}/v1/metrics", url.trim_end_matches('/'))
            } else {
                url
            }
        }
    }))
}

/// The resource: defaults, then OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME,
/// then the flags (later wins).
fn resource(
    args: &ExportArgs,
    env: &dyn Fn(&str) -> Option<String>,
    detected: Resource,
) -> Result<Vec<(String, String)>, String> {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into());
    let mut attributes: Vec<(String, String)> = vec![
        ("host.name".into(), host),
        ("service.name".into(), "agent".into()),
        ("service.version".into(), env!("CARGO_PKG_VERSION").into()),
    ];
    let mut set = |key: String, value: String| {
        if let Some(slot) = attributes.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            attributes.push((key, value));
        }
    };
    for (key, value) in detected.iter() {
        set(key.as_str().to_owned(), value.as_str().into_owned());
    }
    if let Some(name) = env(OTEL_SERVICE_NAME).filter(|n| !n.trim().is_empty()) {
        set("service.name".into(), name.trim().to_owned());
    }
    if let Some(text) = &args.resource_attributes {
        for (key, value) in parse_pairs(text, "--resource-attributes")? {
            set(key, value);
        }
    }
    if let Some(name) = &args.service_name {
        if name.trim().is_empty() {
            return Err("--service-name is empty".into());
        }
        set("service.name".into(), name.clone());
    }
    Ok(attributes)
}

impl Config {
    /// Checks the flags and the process's `OTEL_*` variables, and binds the
    /// Prometheus address.
    pub fn resolve(args: &ExportArgs) -> anyhow::Result<Self> {
        // OTEL_RESOURCE_ATTRIBUTES, parsed by the SDK's own detector.
        let detected = EnvResourceDetector::new().detect();
        let mut config = Self::from_env(args, &|name| std::env::var(name).ok(), detected)
            .map_err(|err| anyhow::anyhow!("{err}"))?;
        if let Some(addr) = args.prometheus_listen {
            let listener = std::net::TcpListener::bind(addr).map_err(|err| {
                anyhow::anyhow!("--prometheus-listen {addr}: listening failed: {err}")
            })?;
            config.prometheus = Some(listener);
        }
        Ok(config)
    }

    /// As [`Config::resolve`] with the variables from `env` (and without
    /// binding).
    pub fn from_env(
        args: &ExportArgs,
        env: &dyn Fn(&str) -> Option<String>,
        detected: Resource,
    ) -> Result<Self, String> {
        let protocol = match pick(
            args.otlp_protocol.clone(),
            env,
            &[
                OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
                OTEL_EXPORTER_OTLP_PROTOCOL,
            ],
        ) {
            None => Protocol::HttpProtobuf,
            Some((_, p)) if p == OTEL_EXPORTER_OTLP_PROTOCOL_GRPC => Protocol::Grpc,
            Some((_, p)) if p == OTEL_EXPORTER_OTLP_PROTOCOL_HTTP_PROTOBUF => {
                Protocol::HttpProtobuf
            }
            Some((from, p)) => {
                let from = if from == "--" {
                    "--otlp-protocol"
                } else {
                    &from
                };
                return Err(format!(
                    "{from}: {p:?} is not a supported OTLP protocol (grpc or http/protobuf)"
                ));
            }
        };
        let headers = match pick(
            args.otlp_headers.clone(),
            env,
            &[
                OTEL_EXPORTER_OTLP_METRICS_HEADERS,
                OTEL_EXPORTER_OTLP_HEADERS,
            ],
        ) {
            None => Vec::new(),
            Some((from, text)) => {
                let from = if from == "--" {
                    "--otlp-headers"
                } else {
                    &from
                };
                let headers = parse_pairs(&text, from)?;
                for (key, value) in &headers {
                    let valid = http::HeaderName::from_bytes(key.as_bytes()).is_ok()
                        && http::HeaderValue::from_str(value).is_ok();
                    if !valid {
                        return Err(format!("{from}: {key:?}={value:?} is not a valid header"));
                    }
                }
                headers
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect()
            }
        };
        let timeout = match args.otlp_timeout {
            Some(t) => t,
            None => match pick(
                None,
                env,
                &[
                    OTEL_EXPORTER_OTLP_METRICS_TIMEOUT,
                    OTEL_EXPORTER_OTLP_TIMEOUT,
                ],
            ) {
                Some((name, text)) => millis(&name, &text)?,
                None => Duration::from_secs(10),
            },
        };
        let interval = match args.export_interval {
            Some(i) => i,
            None => match env(OTEL_METRIC_EXPORT_INTERVAL).filter(|v| !v.trim().is_empty()) {
                Some(text) => millis(OTEL_METRIC_EXPORT_INTERVAL, text.trim())?,
                None => Duration::from_secs(60),
            },
        };
        let otlp = endpoint(args, env, protocol)?.map(|endpoint| Otlp {
            endpoint,
            protocol,
            headers,
            timeout,
            interval,
        });
        for (flag, globs) in [("--include", &args.include), ("--exclude", &args.exclude)] {
            if let Some(glob) = globs.iter().find(|g| !g.starts_with('/')) {
                return Err(format!(
                    "{flag} {glob:?}: a cgroup path glob starts with / (the watched root)"
                ));
            }
        }
        Ok(Self {
            otlp,
            prometheus: None,
            resource: resource(args, env, detected)?,
            selection: Selection {
                include: args.include.clone(),
                exclude: args.exclude.clone(),
                max_depth: args.max_depth,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)], args: &ExportArgs) -> Result<Config, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let env = move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let detected = Resource::builder_empty()
            .with_attributes(
                env(OTEL_RESOURCE_ATTRIBUTES)
                    .map(|text| parse_pairs(&text, "test").unwrap_or_default())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| opentelemetry::KeyValue::new(k, v)),
            )
            .build();
        Config::from_env(args, &env, detected)
    }

    #[test]
    fn export_is_off_without_an_endpoint() {
        let config = with(&[], &ExportArgs::default()).unwrap();
        assert!(config.otlp.is_none());
        assert!(!config.enabled());
    }

    #[test]
    fn the_base_endpoint_gets_the_metrics_path_for_http_only() {
        let config = with(
            &[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://collector:4318/")],
            &ExportArgs::default(),
        )
        .unwrap();
        let otlp = config.otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://collector:4318/v1/metrics");
        assert_eq!(otlp.protocol, Protocol::HttpProtobuf);
        assert_eq!(otlp.interval, Duration::from_secs(60));
        assert_eq!(otlp.timeout, Duration::from_secs(10));

        let config = with(
            &[
                (OTEL_EXPORTER_OTLP_ENDPOINT, "http://collector:4317"),
                (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
                (OTEL_METRIC_EXPORT_INTERVAL, "5000"),
                (
                    OTEL_EXPORTER_OTLP_HEADERS,
                    "Authorization=Bearer%20x, tenant=a",
                ),
            ],
            &ExportArgs::default(),
        )
        .unwrap();
        let otlp = config.otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://collector:4317");
        assert_eq!(otlp.protocol, Protocol::Grpc);
        assert_eq!(otlp.interval, Duration::from_secs(5));
        assert_eq!(
            otlp.headers,
            vec![
                ("authorization".into(), "Bearer x".into()),
                ("tenant".into(), "a".into())
            ]
        );
    }

    #[test]
    fn flags_win_over_specific_variables_over_general_ones() {
        let vars = [
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://general:4318"),
            (
                OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
                "http://specific:4318/custom",
            ),
            (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
            (OTEL_EXPORTER_OTLP_METRICS_PROTOCOL, "http/protobuf"),
        ];
        let otlp = with(&vars, &ExportArgs::default()).unwrap().otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://specific:4318/custom");
        assert_eq!(otlp.protocol, Protocol::HttpProtobuf);
        let args = ExportArgs {
            otlp_endpoint: Some("http://flag:4317".into()),
            otlp_protocol: Some("grpc".into()),
            export_interval: Some(Duration::from_millis(250)),
            ..ExportArgs::default()
        };
        let otlp = with(&vars, &args).unwrap().otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://flag:4317");
        assert_eq!(otlp.protocol, Protocol::Grpc);
        assert_eq!(otlp.interval, Duration::from_millis(250));
    }

    #[test]
    fn the_resource_has_defaults_variables_and_flags() {
        let args = ExportArgs {
            resource_attributes: Some("deployment.environment=prod,team=net".into()),
            ..ExportArgs::default()
        };
        let config = with(
            &[
                (OTEL_RESOURCE_ATTRIBUTES, "team=infra,region=eu"),
                (OTEL_SERVICE_NAME, "node-agent"),
            ],
            &args,
        )
        .unwrap();
        let get = |key: &str| {
            config
                .resource
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("service.name"), Some("node-agent"));
        assert_eq!(get("service.version"), Some(env!("CARGO_PKG_VERSION")));
        assert!(get("host.name").is_some_and(|h| !h.is_empty()));
        assert_eq!(get("team"), Some("net"));
        assert_eq!(get("region"), Some("eu"));
        assert_eq!(get("deployment.environment"), Some("prod"));
    }

    #[test]
    fn bad_values_get_one_sentence() {
        let bad = |vars: &[(&str, &str)], args: ExportArgs| with(vars, &args).unwrap_err();
        let err = bad(
            &[(OTEL_EXPORTER_OTLP_PROTOCOL, "http/json")],
            ExportArgs::default(),
        );
        assert!(err.contains("OTEL_EXPORTER_OTLP_PROTOCOL: \"http/json\" is not a supported"));
        let err = bad(
            &[],
            ExportArgs {
                otlp_endpoint: Some("collector:4317".into()),
                ..ExportArgs::default()
            },
        );
        assert!(err.contains("--otlp-endpoint"), "{err}");
        let err = bad(
            &[(OTEL_EXPORTER_OTLP_ENDPOINT, "https://collector:4317")],
            ExportArgs::default(),
        );
        assert!(err.contains("https"), "{err}");
        let err = bad(
            &[(OTEL_METRIC_EXPORT_INTERVAL, "soon")],
            ExportArgs::default(),
        );
        assert!(err.contains("OTEL_METRIC_EXPORT_INTERVAL"), "{err}");
        let err = bad(
            &[(OTEL_EXPORTER_OTLP_HEADERS, "novalue")],
            ExportArgs::default(),
        );
        assert!(err.contains("is not key=value"), "{err}");
        let err = bad(
            &[],
            ExportArgs {
                include: vec!["web".into()],
                ..ExportArgs::default()
            },
        );
        assert!(err.contains("--include \"web\""), "{err}");
    }
}

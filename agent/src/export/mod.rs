//! Exporters: OpenTelemetry (OTLP over gRPC or HTTP/protobuf) and a
//! Prometheus endpoint. Both are consumers of [`Snapshot`]s, like `stats` and
//! `top`: the daemon publishes its latest snapshot (a non-blocking write of
//! one slot), and the exporters run on their own thread, so a collector that
//! is down, slow or refusing never holds up collection or enforcement.
//!
//! - [`metrics`]: every metric, defined once (docs/metrics.md is checked
//!   against it).
//! - [`attrib`]: what a cgroup path says (container, pod, unit) and which
//!   cgroups are exported.
//! - [`otlp`]: OTLP messages and their delivery (bounded queue, backoff).
//! - [`prometheus`]: the text format and its HTTP endpoint.

pub mod attrib;
pub mod config;
pub mod metrics;
pub mod otlp;
pub mod prometheus;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

pub use config::{Config, ExportArgs};
use metrics::{Attributes, DaemonStats, Exported};
use tokio::sync::watch;

use crate::model::Snapshot;

/// A snapshot as the daemon published it.
#[derive(Debug, Clone)]
pub struct Published {
    pub snapshot: Snapshot,
    /// When its sample was taken.
    pub taken: SystemTime,
}

/// Counters the exporters keep about themselves.
#[derive(Debug, Default)]
pub struct Health {
    pub export_failures: AtomicU64,
    pub export_dropped: AtomicU64,
}

impl Health {
    #[must_use]
    pub fn stats(&self) -> DaemonStats {
        DaemonStats {
            export_failures: self.export_failures.load(Ordering::Relaxed),
            export_dropped: self.export_dropped.load(Ordering::Relaxed),
            ..DaemonStats::default()
        }
    }
}

/// What the exporters share: the selection of cgroups, the resource, and
/// attributions already worked out (by path).
pub struct View {
    selection: attrib::Selection,
    pub resource: Vec<(String, String)>,
    /// When the counters were first exported (the start of every cumulative series).
    pub start: SystemTime,
    health: Arc<Health>,
    cache: std::sync::Mutex<HashMap<String, attrib::Attribution>>,
}

impl View {
    #[must_use]
    pub fn new(
        selection: attrib::Selection,
        resource: Vec<(String, String)>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            selection,
            resource,
            start: SystemTime::now(),
            health,
            cache: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The metric families of a snapshot: the selected cgroups with their
    /// attributes, and the daemon's own figures.
    pub fn families(&self, snapshot: &Snapshot) -> Vec<metrics::Family> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Gone cgroups leave the cache with the snapshot.
        if cache.len() > 2 * snapshot.cgroups.len() + 64 {
            cache.clear();
        }
        let exported: Vec<Exported<'_>> = snapshot
            .cgroups
            .iter()
            .filter(|c| self.selection.selects(&c.path))
            .map(|cgroup| {
                let mut attributes: Attributes = vec![(attrib::CGROUP_PATH, cgroup.path.clone())];
                if let Some(name) = &cgroup.name {
                    attributes.push((attrib::WORKLOAD, name.clone()));
                }
                cache
                    .entry(cgroup.path.clone())
                    .or_insert_with(|| attrib::attribute(&cgroup.path))
                    .clone()
                    .extend(&mut attributes);
                Exported { cgroup, attributes }
            })
            .collect();
        metrics::families(
            &exported,
            &metrics::uncounted(snapshot, self.health.stats()),
        )
    }
}

/// The running exporters (none when export is off).
pub struct Exporters {
    latest: watch::Sender<Option<Arc<Published>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    /// How often the daemon should publish a full snapshot.
    every: Option<Duration>,
    last: Option<Instant>,
}

impl Exporters {
    /// Starts the exporters `config` asks for on their own thread.
    pub fn start(config: Config) -> anyhow::Result<Self> {
        let (latest, receiver) = watch::channel(None);
        let every = match (&config.otlp, &config.prometheus) {
            (_, Some(_)) => Some(Duration::ZERO),
            (Some(otlp), None) => Some(otlp.interval),
            (None, None) => None,
        };
        if every.is_none() {
            return Ok(Self {
                latest,
                stop: None,
                thread: None,
                every,
                last: None,
            });
        }
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = thread::Builder::new()
            .name("agent-export".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        log::error!(
                            "starting the exporters' runtime failed: {err}; nothing is exported"
                        );
                        return;
                    }
                };
                runtime.block_on(serve(config, receiver, stopped));
            })
            .map_err(|err| anyhow::anyhow!("starting the exporter thread failed: {err}"))?;
        Ok(Self {
            latest,
            stop: Some(stop),
            thread: Some(thread),
            every,
            last: None,
        })
    }

    /// Whether a full snapshot is due (the caller then samples and publishes).
    #[must_use]
    pub fn due(&self) -> bool {
        match (self.every, self.last) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(every), Some(last)) => last.elapsed() + Duration::from_millis(5) >= every,
        }
    }

    /// Hands the latest snapshot to the exporters (never blocks).
    pub fn publish(&mut self, published: Published) {
        self.last = Some(Instant::now());
        self.latest.send_replace(Some(Arc::new(published)));
    }

    /// Stops the exporters (a pending export is abandoned).
    pub fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    config: Config,
    latest: watch::Receiver<Option<Arc<Published>>>,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let health = Arc::new(Health::default());
    let view = Arc::new(View::new(
        config.selection.clone(),
        config.resource.clone(),
        health.clone(),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(listener) = config.prometheus {
        tasks.spawn(prometheus::serve(listener, view.clone(), latest.clone()));
    }
    if let Some(otlp) = config.otlp {
        tasks.spawn(otlp::run(otlp, view, health, latest));
    }
    let _ = stopped.await;
    tasks.abort_all();
}

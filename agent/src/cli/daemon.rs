//! `agent daemon`: load and attach the programs, pin them, keep the maps
//! tidy, enforce the policy file, publish denial events, and run until
//! SIGINT or SIGTERM.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use clap::Args;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use super::{LoadArgs, PinArgs};
use crate::{
    cgroup,
    collect::{Collector, Role, Sample},
    enforce::{DeviceEnforcer, Domain, Enforcer, NetworkEnforcer},
    events::{self, Hub, Record},
    export::{self, Exporters},
    loader::{Attached, Guards, Options},
    model::Snapshot,
    policy::{self, Policy, PolicyFile},
};

/// Attach the accounting programs and keep them attached until stopped.
///
/// Pins the maps and links under --pin-dir so that `agent stats` and
/// `agent top` can read them. With --policy, also enforces the device and
/// network policies of that file (attaching a device program and two
/// cgroup_skb guards at the cgroup root),
/// reloads it on SIGHUP and when it changes, and publishes every denial to
/// `agent events` and the audit log. On SIGINT or SIGTERM the programs are
/// detached and the pins removed, unless --keep-pinned: then the programs
/// keep counting (and enforcing) and the next daemon started with the same
/// --pin-dir takes them over without losing a packet.
///
/// With --otlp-endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) it exports every
/// per-cgroup metric over OTLP, and with --prometheus-listen it serves them
/// in the Prometheus text format (see docs/metrics.md).
#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub load: LoadArgs,

    #[command(flatten)]
    pub pins: PinArgs,

    #[command(flatten)]
    pub state: super::StateArgs,

    /// Policy file to enforce (see `agent policy check`).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Where to append denial events, as JSON lines.
    #[arg(long, value_name = "FILE", default_value = events::DEFAULT_AUDIT_LOG)]
    pub audit_log: PathBuf,

    /// Unix socket `agent events` reads from.
    #[arg(long, value_name = "PATH", default_value = events::DEFAULT_SOCKET)]
    pub events_socket: PathBuf,

    /// Denial events per second per CPU the kernel sends (and its burst);
    /// beyond it, events are counted as suppressed.
    #[arg(long, value_name = "N", default_value_t = common::DEFAULT_EVENT_RATE,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub event_rate: u64,

    /// On exit leave the programs attached and the maps pinned.
    #[arg(long)]
    pub keep_pinned: bool,

    /// Where the per-cgroup CPU figures come from each interval: `ebpf` (the
    /// maps, the default) or `files` (walking the tree and reading every
    /// cgroup's CPU files, the way file-polling monitors do). Only
    /// `cargo xtask bench sched` uses `files`, to compare the two.
    #[arg(long, value_enum, default_value = "ebpf", hide = true)]
    pub cpu_source: CpuSource,

    /// How often to read the maps and drop the entries of removed cgroups.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = super::parse_duration)]
    pub interval: Duration,

    #[command(flatten)]
    pub export: export::ExportArgs,
}

/// See [`DaemonArgs::cpu_source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuSource {
    Ebpf,
    Files,
}

/// How often a daemon enforcing policies looks for new cgroups (one map
/// read): a cgroup made under a policed path gets its policy within this.
const POLICY_WATCH: Duration = Duration::from_millis(20);

pub fn run(args: &DaemonArgs) -> anyhow::Result<()> {
    super::require_root("agent daemon", super::FOR_EBPF)?;
    // An invalid policy file stops the start, with every problem.
    let policy = args.policy.as_deref().map(PolicySource::load).transpose()?;
    // So do bad export settings (and a Prometheus address in use).
    let export = export::Config::resolve(&args.export)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime failed")?;
    runtime.block_on(serve(args, policy, export))
}

/// The policy file and what was last read from it.
struct PolicySource {
    path: PathBuf,
    /// (inode, size, mtime) when read, to notice changes.
    stamp: Option<(u64, u64, i64, i64)>,
    file: PolicyFile,
}

fn stamp(path: &Path) -> Option<(u64, u64, i64, i64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

impl PolicySource {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let stamp = stamp(path);
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading policy file {}", path.display()))?;
        let file = policy::parse(&text).map_err(|invalid| {
            anyhow::anyhow!("policy file {} is invalid: {invalid}", path.display())
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            stamp,
            file,
        })
    }

    fn changed(&self) -> bool {
        stamp(&self.path) != self.stamp
    }

    /// Reads the file again; an invalid file leaves the policy in force.
    fn reload(&mut self, why: &str) -> bool {
        match Self::load(&self.path) {
            Ok(fresh) => {
                *self = fresh;
                log::info!("policy file {} reloaded ({why})", self.path.display());
                true
            }
            Err(err) => {
                // Read once per change, not again every tick.
                self.stamp = stamp(&self.path);
                log::error!("{err:#}; the policy in force stays in force");
                false
            }
        }
    }
}

/// The daemon's enforcers, one per kind of policy.
struct Enforcers {
    devices: DeviceEnforcer,
    network: NetworkEnforcer,
}

impl Enforcers {
    /// Puts the file's policies in force for the cgroups of `sample`.
    fn reconcile(&mut self, file: &PolicyFile, sample: &Sample) {
        let cgroups: Vec<(u64, &str, Option<&str>)> = sample
            .cgroups
            .iter()
            .map(|c| (c.id, c.path.as_str(), c.name.as_deref()))
            .collect();
        let resolved = file.resolve(&cgroups);
        let alive: HashSet<u64> = sample.cgroups.iter().map(|c| c.id).collect();
        let resolved_for = |run_owned: HashSet<u64>| -> HashMap<u64, usize> {
            let skip = under_workloads(&run_owned, &cgroups);
            resolved
                .iter()
                .filter(|(id, _)| !skip.contains(id))
                .map(|(id, index)| (*id, *index))
                .collect()
        };
        let devices = resolved_for(self.devices.run_owned());
        apply(&mut self.devices, "device", file, &devices, &alive, |p| {
            p.devices.as_ref()
        });
        let network = resolved_for(self.network.run_owned());
        apply(&mut self.network, "network", file, &network, &alive, |p| {
            p.network.as_ref()
        });
    }
}

/// The cgroups at and under those of `run_owned` (workloads `agent run`
/// polices itself): a workload's own policy covers its whole subtree, so the
/// file's policies leave it alone (the programs find the workload's entry
/// as the nearest one).
fn under_workloads(
    run_owned: &HashSet<u64>,
    cgroups: &[(u64, &str, Option<&str>)],
) -> HashSet<u64> {
    let roots: Vec<&str> = cgroups
        .iter()
        .filter(|(id, _, _)| run_owned.contains(id))
        .map(|(_, path, _)| *path)
        .collect();
    cgroups
        .iter()
        .filter(|(_, path, _)| {
            roots.iter().any(|root| {
                *root == "/"
                    || path == root
                    || path
                        .strip_prefix(root)
                        .is_some_and(|rest| rest.starts_with('/'))
            })
        })
        .map(|(id, _, _)| *id)
        .collect()
}

/// Puts one kind of the file's policies in force.
fn apply<'a, D: Domain>(
    enforcer: &mut Enforcer<D>,
    kind: &str,
    file: &'a PolicyFile,
    resolved: &HashMap<u64, usize>,
    alive: &HashSet<u64>,
    pick: impl Fn(&'a Policy) -> Option<&'a D::Policy>,
) {
    let wanted: HashMap<u64, &D::Policy> = resolved
        .iter()
        .filter_map(|(id, index)| Some((*id, pick(&file.policies[*index])?)))
        .collect();
    match enforcer.apply(&wanted, alive) {
        Ok(changes) if changes.cgroups_switched + changes.cgroups_released > 0 => log::info!(
            "{kind} policy in force for {} cgroups ({} switched, {} released)",
            enforcer.assigned(),
            changes.cgroups_switched,
            changes.cgroups_released
        ),
        Ok(_) => {}
        Err(err) => log::error!(
            "applying the {kind} policies failed: {err}; the {kind} policy in force stays in force"
        ),
    }
}

/// Drains the ring buffer into the hub.
fn drain(ring: &mut RingBuf<MapData>, hub: &mut Hub, collector: &mut Collector) {
    while let Some(item) = ring.next() {
        if let Some(event) = events::decode(&item) {
            hub.publish(Record::new(&event, collector.resolve(event.cgroup_id)));
        }
    }
}

async fn serve(
    args: &DaemonArgs,
    mut policy: Option<PolicySource>,
    export: export::Config,
) -> anyhow::Result<()> {
    // Handlers first: a signal during set-up must still end in a clean exit.
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let root = cgroup::resolve_root(args.load.cgroup_root.as_deref())?;
    let mut hub = Hub::new(Some(&args.audit_log))?;
    let listener = events::listen(&args.events_socket)?;
    super::progress("agent: loading and attaching the eBPF programs...");
    let (attached, loaded) = Attached::load(&Options {
        cgroup_root: root.clone(),
        max_cgroups: args.load.max_cgroups,
        net_slots: args.load.net_slots,
        pin_dir: Some(args.pins.pin_dir.clone()),
        guards: Guards {
            devices: policy.is_some(),
            network: policy.is_some(),
        },
        event_rate: args.event_rate,
    })?;
    let mut collector =
        Collector::new(loaded.counters, &root, Role::Owner).with_state_dir(&args.state.state_dir);
    let mut enforcer = match &policy {
        Some(_) => Some(Enforcers {
            devices: DeviceEnforcer::new(loaded.devices)?,
            network: NetworkEnforcer::new(loaded.network)?,
        }),
        None => None,
    };
    if let (Some(enforcer), Some(policy)) = (enforcer.as_mut(), policy.as_ref()) {
        enforcer.reconcile(&policy.file, &collector.housekeep()?);
    }
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd lives.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(loaded.events, tokio::io::Interest::READABLE) }
            .map_err(|err| anyhow::anyhow!("watching the event ring buffer failed: {err}"))?;
    log::info!(
        "counting network and scheduler activity of every cgroup under {} (pins in {}){}",
        root.display(),
        args.pins.pin_dir.display(),
        policy
            .as_ref()
            .map(|p| format!("; enforcing {}", p.path.display()))
            .unwrap_or_default()
    );

    // The exporters run on their own thread; the loop only hands them a
    // snapshot when one is due.
    let tick_every = match &export.otlp {
        Some(otlp) => args.interval.min(otlp.interval),
        None => args.interval,
    };
    let mut exporters = Exporters::start(export)?;
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = tokio::time::interval(POLICY_WATCH);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generation = collector.tree_generation();
    let mut failing = false;
    loop {
        let mut reload = None;
        tokio::select! {
            _ = tick.tick() => {
                let result = match args.cpu_source {
                    CpuSource::Ebpf if exporters.due() => collector.sample().map(|sample| {
                        exporters.publish(export::Published {
                            snapshot: Snapshot::new(&sample, None),
                            taken: sample.taken,
                        });
                        Some(sample)
                    }),
                    CpuSource::Ebpf => collector.housekeep().map(Some),
                    CpuSource::Files => collector.poll_cpu_files().map(|_| None),
                };
                match result {
                    Ok(sample) => {
                        failing = false;
                        if let (Some(enforcer), Some(policy), Some(sample)) = (enforcer.as_mut(), policy.as_ref(), sample) {
                            enforcer.reconcile(&policy.file, &sample);
                        }
                    }
                    Err(err) if !failing => {
                        log::warn!("collecting failed, retrying every interval: {err}");
                        failing = true;
                    }
                    Err(_) => {}
                }
                if policy.as_ref().is_some_and(PolicySource::changed) {
                    reload = Some("the file changed");
                }
            }
            _ = watch.tick(), if enforcer.is_some() => {
                // A new cgroup under a policed path gets its policy now, not
                // at the next tick.
                let now = collector.tree_generation();
                if now != generation {
                    generation = now;
                    if let (Some(enforcer), Some(policy), Ok(sample)) = (enforcer.as_mut(), policy.as_ref(), collector.housekeep()) {
                        enforcer.reconcile(&policy.file, &sample);
                    }
                }
            }
            _ = hangup.recv() => reload = Some("SIGHUP"),
            ready = ring.readable_mut() => {
                if let Ok(mut guard) = ready {
                    drain(guard.get_inner_mut(), &mut hub, &mut collector);
                    guard.clear_ready();
                }
            }
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    hub.serve(stream);
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
        if let (Some(why), Some(source)) = (reload, policy.as_mut()) {
            if source.reload(why) {
                if let (Some(enforcer), Ok(sample)) = (enforcer.as_mut(), collector.housekeep()) {
                    enforcer.reconcile(&source.file, &sample);
                }
            }
        }
    }
    exporters.shutdown();
    let _ = std::fs::remove_file(&args.events_socket);
    let keep = args.keep_pinned;
    attached.shutdown(keep)?;
    if keep {
        log::info!(
            "stopped; the programs stay attached through the pins in {}",
            args.pins.pin_dir.display()
        );
    } else {
        log::info!("stopped; programs detached and pins removed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workloads_subtree_is_its_cgroup_and_those_under_it_only() {
        let cgroups = [
            (1, "/", None),
            (2, "/a", Some("build")),
            (3, "/a/b", None),
            (4, "/a/b/c", None),
            (5, "/ab", None),
            (6, "/x", None),
        ];
        let run_owned = HashSet::from([2]);
        assert_eq!(
            under_workloads(&run_owned, &cgroups),
            HashSet::from([2, 3, 4])
        );
        assert_eq!(
            under_workloads(&HashSet::from([1]), &cgroups).len(),
            cgroups.len()
        );
        assert!(under_workloads(&HashSet::new(), &cgroups).is_empty());
    }
}

//! The collector: reads the maps and the cgroup tree into a [`Sample`] of
//! cumulative counters. It is the only reader of the maps; consumers get
//! samples (and snapshots made from them by [`crate::model`]).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use aya::{
    maps::{MapData, MapError, PerCpuHashMap},
    Pod,
};
use common::{
    devices::DevCounters,
    maps,
    netpolicy::{HitKey, Hits, NetDrops, RateKey, DIR_EGRESS, DIR_INGRESS, RULE_DEFAULT},
    NetCounters, SchedCounters, SLOT_RECLAIMING,
};

use crate::{
    cgroup::CgroupTree,
    cgroupfs::{FileKind, Layout, Reader, Resources},
    loader::Maps,
    workload::registry::{self, DEFAULT_STATE_DIR},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading map {name} failed: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::Error),
}

/// One cgroup's cumulative counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSample {
    pub id: u64,
    /// Relative to the watched root, starting with `/`.
    pub path: String,
    /// The name of the `agent run` workload in this cgroup.
    pub name: Option<String>,
    pub net: NetCounters,
    pub sched: SchedCounters,
    pub resources: Resources,
    pub devices: DevCounters,
    /// Packets the network policy dropped or marked.
    pub net_drops: NetDrops,
    /// Packets each network rule decided, by direction and rule.
    pub rule_hits: Vec<RuleHits>,
}

/// What one network rule (or default) of a cgroup's policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleHits {
    /// `DIR_EGRESS` or `DIR_INGRESS`.
    pub direction: u8,
    /// Index in its direction's rules; `RULE_DEFAULT` for the default.
    pub rule: u16,
    pub hits: Hits,
}

/// Sums a per-CPU hash whose keys belong to cgroups (`cgroup_of`): the
/// totals of live cgroups, and the keys of cgroups that are gone.
fn sum_per_cpu<K, V>(
    map: &PerCpuHashMap<MapData, K, V>,
    name: &'static str,
    cgroup_of: impl Fn(&K) -> u64,
    tree: &CgroupTree,
    plus: impl Fn(V, V) -> V,
) -> Result<(HashMap<K, V>, Vec<K>), Error>
where
    K: Pod + Eq + std::hash::Hash,
    V: Pod + Default,
{
    let mut totals = HashMap::new();
    let mut dead = Vec::new();
    for entry in map.iter() {
        let (key, per_cpu) = match entry {
            Ok(entry) => entry,
            Err(MapError::KeyNotFound) => continue,
            Err(source) => return Err(Error::Map { name, source }),
        };
        if tree.contains(cgroup_of(&key)) {
            let sum = per_cpu
                .iter()
                .fold(V::default(), |sum, cpu| plus(sum, *cpu));
            totals.insert(key, sum);
        } else {
            dead.push(key);
        }
    }
    Ok((totals, dead))
}

/// Cumulative counters of every cgroup under the root at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Wall-clock time, for display.
    pub taken: SystemTime,
    /// Monotonic time, for rates.
    pub at: Instant,
    pub cgroup_root: PathBuf,
    /// Sorted by path.
    pub cgroups: Vec<CgroupSample>,
    /// Traffic that found the per-cgroup maps full and could not be attributed.
    pub uncounted: NetCounters,
    /// Scheduler events likewise.
    pub sched_uncounted: SchedCounters,
}

/// Whether this collector may remove map entries of cgroups that are gone:
/// only the process that owns the programs does (the daemon, or `agent top`
/// on its own); readers of a daemon's pins never change its maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Reader,
}

/// How often at most the "map full" warning repeats while it keeps growing.
const UNCOUNTED_WARNING_EVERY: Duration = Duration::from_secs(60);

/// One cgroup's CPU figures as read from its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolledCpu {
    pub id: u64,
    pub usage_ns: Option<u64>,
    pub throttled_ns: Option<u64>,
}

/// How much a sample reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// Maps and cgroup files.
    Full,
    /// Maps only: resource figures are left empty.
    MapsOnly,
}

/// What a slot table and its overflow hash held, summed per cgroup over CPUs.
struct TableRead<T> {
    totals: HashMap<u64, T>,
    /// (slot index, owner) of slots held by cgroups that are gone.
    dead_slots: Vec<(u32, u64)>,
    /// Overflow entries of cgroups that are gone.
    dead_overflow: Vec<u64>,
}

/// Sums a per-CPU slot table and its overflow hash per cgroup of `tree`.
/// Removes the overflow entries of removed cgroups.
fn forget_overflow<T: aya::Pod>(
    overflow: &mut PerCpuHashMap<MapData, u64, T>,
    dead: &[u64],
    name: &'static str,
) -> Result<(), Error> {
    for id in dead {
        match overflow.remove(id) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(Error::Map { name, source }),
        }
    }
    Ok(())
}

fn read_table<T: Copy + aya::Pod>(
    slots: impl Iterator<Item = (usize, u64, T)>,
    overflow: &PerCpuHashMap<MapData, u64, T>,
    overflow_name: &'static str,
    tree: &CgroupTree,
    zero: T,
    plus: impl Fn(T, &T) -> T,
) -> Result<TableRead<T>, Error> {
    let mut read = read_slots(slots, tree, zero, &plus);
    for entry in overflow.iter() {
        let (id, per_cpu) = match entry {
            Ok(entry) => entry,
            // Removed between get_next_key and lookup.
            Err(MapError::KeyNotFound) => continue,
            Err(source) => {
                return Err(Error::Map {
                    name: overflow_name,
                    source,
                })
            }
        };
        if !tree.contains(id) {
            read.dead_overflow.push(id);
            continue;
        }
        let total = read.totals.entry(id).or_insert(zero);
        *total = per_cpu.iter().fold(*total, &plus);
    }
    Ok(read)
}

/// Sums a per-CPU slot table per cgroup of `tree` (no overflow).
fn read_slots<T: Copy>(
    slots: impl Iterator<Item = (usize, u64, T)>,
    tree: &CgroupTree,
    zero: T,
    plus: impl Fn(T, &T) -> T,
) -> TableRead<T> {
    let mut read = TableRead {
        totals: HashMap::with_capacity(tree.len()),
        dead_slots: Vec::new(),
        dead_overflow: Vec::new(),
    };
    for (index, owner, counters) in slots {
        if owner == 0 || owner == SLOT_RECLAIMING {
            continue;
        }
        if !tree.contains(owner) {
            read.dead_slots.push((index as u32, owner));
            continue;
        }
        let total = read.totals.entry(owner).or_insert(zero);
        *total = plus(*total, &counters);
    }
    read
}

pub struct Collector {
    maps: Maps,
    root: PathBuf,
    /// The root relative to the v2 mount (where the cgroup files are).
    root_in_mount: PathBuf,
    role: Role,
    tree: CgroupTree,
    /// The tree-change counter when `tree` was walked.
    tree_generation: Option<u64>,
    /// The tree generation `NET_RATE` was last swept at.
    rates_swept: Option<u64>,
    max_cgroups: u32,
    /// Removed cgroups already posted in NET_EVICT and SCHED_EVICT, by slot index.
    net_evictions: HashMap<u32, u64>,
    sched_evictions: HashMap<u32, u64>,
    dev_evictions: HashMap<u32, u64>,
    guard_evictions: HashMap<u32, u64>,
    workloads: Workloads,
    files: Option<Reader>,
    uncounted_warned: Option<(u64, Instant)>,
}

impl Collector {
    #[must_use]
    pub fn new(maps: Maps, root: &Path, role: Role) -> Self {
        let max_cgroups = maps.overflow_capacity();
        let files = Layout::detect().map(Reader::new);
        let root_in_mount = files
            .as_ref()
            .and_then(|files| root.strip_prefix(files.v2_mount()).ok())
            .map_or_else(PathBuf::new, Path::to_path_buf);
        Self {
            maps,
            root: root.to_path_buf(),
            root_in_mount,
            role,
            tree: CgroupTree::default(),
            tree_generation: None,
            rates_swept: None,
            max_cgroups,
            net_evictions: HashMap::new(),
            sched_evictions: HashMap::new(),
            dev_evictions: HashMap::new(),
            guard_evictions: HashMap::new(),
            workloads: Workloads::new(root, Path::new(DEFAULT_STATE_DIR)),
            files,
            uncounted_warned: None,
        }
    }

    /// Reads `agent run`'s records from `state_dir` instead of the default.
    #[must_use]
    pub fn with_state_dir(mut self, state_dir: &Path) -> Self {
        self.workloads = Workloads::new(&self.root, state_dir);
        self
    }

    /// The kernel's cgroup tree-change counter (`None` when unreadable).
    #[must_use]
    pub fn tree_generation(&self) -> Option<u64> {
        self.generation().ok()
    }

    /// The path of cgroup `id` as of the last walk.
    #[must_use]
    pub fn path_of(&self, id: u64) -> Option<&str> {
        self.tree.path(id)
    }

    /// The path of cgroup `id`, walking the tree again first when `id` is
    /// not in the last walk and a cgroup was created, removed or renamed
    /// since (an event of a cgroup made since the last sample).
    pub fn resolve(&mut self, id: u64) -> Option<&str> {
        if self.tree.path(id).is_none() {
            let _ = self.walk_if_changed();
        }
        self.tree.path(id)
    }

    /// Walks the tree again if the kernel's tree-change counter moved since
    /// the last walk; returns the counter the tree is now as of.
    fn walk_if_changed(&mut self) -> Result<u64, Error> {
        let generation = self.generation()?;
        if self.tree_generation != Some(generation) {
            self.tree = CgroupTree::walk(&self.root)?;
            self.tree_generation = Some(generation);
            if let Some(files) = self.files.as_mut() {
                let tree = &self.tree;
                files.retain(|id| tree.contains(id));
            }
        }
        Ok(generation)
    }

    /// The cgroup root the programs are attached to.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn generation(&self) -> Result<u64, Error> {
        let values = self
            .maps
            .cgroup_generation
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: maps::CGROUP_GENERATION,
                source,
            })?;
        Ok(values
            .iter()
            .fold(0u64, |sum, value| sum.wrapping_add(*value)))
    }

    /// Reads every counter once.
    ///
    /// The tree is walked again only when a cgroup was created, removed or
    /// renamed since the last walk (the kernel's tree-change counter moved).
    /// As owner, the counters of cgroups that are gone are dropped (overflow
    /// entries deleted, slots posted for reclaim), but only when no cgroup
    /// changed between the walk and the map reads, so that a cgroup created
    /// meanwhile is never mistaken for a removed one.
    pub fn sample(&mut self) -> Result<Sample, Error> {
        self.sample_with(Detail::Full)
    }

    /// Reads the maps only (no cgroup files): what the daemon needs every
    /// tick to drop the counters of removed cgroups, at a fraction of the cost.
    pub fn housekeep(&mut self) -> Result<Sample, Error> {
        self.sample_with(Detail::MapsOnly)
    }

    fn sample_with(&mut self, detail: Detail) -> Result<Sample, Error> {
        let generation = self.walk_if_changed()?;
        self.workloads.refresh();
        let taken = SystemTime::now();
        let at = Instant::now();

        let net_tables = self
            .maps
            .net_slots
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: maps::NET_SLOTS,
                source,
            })?;
        let net = read_table(
            net_tables.iter().flat_map(|table| {
                table
                    .slots
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i, s.cgroup_id, s.counters()))
            }),
            &self.maps.net_overflow,
            maps::NET_OVERFLOW,
            &self.tree,
            NetCounters::ZERO,
            |sum, more| sum.plus(*more),
        )?;
        let sched_tables = self
            .maps
            .sched_slots
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: maps::SCHED_SLOTS,
                source,
            })?;
        let sched = read_table(
            sched_tables.iter().flat_map(|table| {
                table
                    .slots
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i, s.cgroup_id, s.counters))
            }),
            &self.maps.sched_overflow,
            maps::SCHED_OVERFLOW,
            &self.tree,
            SchedCounters::ZERO,
            SchedCounters::plus,
        )?;
        let dev_tables = self
            .maps
            .dev_slots
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: maps::DEV_SLOTS,
                source,
            })?;
        let devices = read_table(
            dev_tables.iter().flat_map(|table| {
                table
                    .slots
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i, s.cgroup_id, s.counters))
            }),
            &self.maps.dev_counts,
            maps::DEV_COUNTS,
            &self.tree,
            DevCounters::ZERO,
            |sum, c| sum.plus(*c),
        )?;
        let (net_drops, dead_drops) = sum_per_cpu(
            &self.maps.net_drops,
            maps::NET_DROPS,
            |id| *id,
            &self.tree,
            NetDrops::plus,
        )?;
        let (hits, dead_hits) = sum_per_cpu(
            &self.maps.net_hits,
            maps::NET_HITS,
            |key: &HitKey| key.cgroup_id,
            &self.tree,
            Hits::plus,
        )?;
        let guard_tables = self
            .maps
            .net_guard_slots
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: maps::NET_GUARD_SLOTS,
                source,
            })?;
        let defaults = read_slots(
            guard_tables.iter().flat_map(|table| {
                table
                    .slots
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i, s.cgroup_id, s.defaults))
            }),
            &self.tree,
            [Hits::ZERO; 2],
            |sum, d| [sum[0].plus(d[0]), sum[1].plus(d[1])],
        );
        let mut rule_hits: HashMap<u64, Vec<RuleHits>> = HashMap::new();
        for (key, hits) in hits {
            rule_hits.entry(key.cgroup_id).or_default().push(RuleHits {
                direction: key.direction,
                rule: key.rule,
                hits,
            });
        }
        // Default hits counted in a guard slot join those of the overflow.
        for (id, by_direction) in &defaults.totals {
            let rules = rule_hits.entry(*id).or_default();
            for (direction, hits) in [DIR_EGRESS, DIR_INGRESS].into_iter().zip(by_direction) {
                if *hits == Hits::ZERO {
                    continue;
                }
                match rules
                    .iter_mut()
                    .find(|r| r.direction == direction && r.rule == RULE_DEFAULT)
                {
                    Some(r) => r.hits = r.hits.plus(*hits),
                    None => rules.push(RuleHits {
                        direction,
                        rule: RULE_DEFAULT,
                        hits: *hits,
                    }),
                }
            }
        }
        let uncounted = self
            .maps
            .net_uncounted
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: maps::NET_UNCOUNTED,
                source,
            })?
            .iter()
            .fold(NetCounters::ZERO, |sum, cpu| sum.plus(*cpu));
        let sched_uncounted = self
            .maps
            .sched_uncounted
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: maps::SCHED_UNCOUNTED,
                source,
            })?
            .iter()
            .fold(SchedCounters::ZERO, |sum, cpu| sum.plus(cpu));

        if self.role == Role::Owner
            && !(net.dead_slots.is_empty()
                && sched.dead_slots.is_empty()
                && net.dead_overflow.is_empty()
                && sched.dead_overflow.is_empty()
                && devices.dead_slots.is_empty()
                && devices.dead_overflow.is_empty()
                && dead_drops.is_empty()
                && dead_hits.is_empty()
                && defaults.dead_slots.is_empty())
            && self.generation()? == generation
        {
            self.forget(&net, &sched, &devices, &defaults.dead_slots)?;
            for id in &dead_drops {
                let _ = self.maps.net_drops.remove(id);
            }
            for key in &dead_hits {
                let _ = self.maps.net_hits.remove(key);
            }
        }
        if self.role == Role::Owner
            && self.rates_swept != Some(generation)
            && self.generation()? == generation
        {
            self.sweep_rates()?;
            self.rates_swept = Some(generation);
        }
        self.warn_uncounted(&uncounted, at);

        let mut cgroups: Vec<CgroupSample> = Vec::with_capacity(self.tree.len());
        for (id, path) in self.tree.iter() {
            let relative = self.root_in_mount.join(path.trim_start_matches('/'));
            let resources = match (&mut self.files, detail) {
                (Some(files), Detail::Full) => files.resources(id, &relative),
                _ => Resources::default(),
            };
            cgroups.push(CgroupSample {
                id,
                path: path.to_owned(),
                name: self.workloads.name(path).map(str::to_owned),
                net: net.totals.get(&id).copied().unwrap_or(NetCounters::ZERO),
                sched: sched
                    .totals
                    .get(&id)
                    .copied()
                    .unwrap_or(SchedCounters::ZERO),
                resources,
                devices: devices.totals.get(&id).copied().unwrap_or_default(),
                net_drops: net_drops.get(&id).copied().unwrap_or_default(),
                rule_hits: {
                    let mut hits = rule_hits.remove(&id).unwrap_or_default();
                    hits.sort_by_key(|h| (h.direction, h.rule));
                    hits
                },
            });
        }
        if let Some(files) = self.files.as_mut() {
            files.report_missing();
        }
        cgroups.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Sample {
            taken,
            at,
            cgroup_root: self.root.clone(),
            cgroups,
            uncounted,
            sched_uncounted,
        })
    }

    /// The CPU figures the cgroup files give (usage, and throttling from
    /// cpu.stat), read the way file-polling monitors do: walking the tree and
    /// opening every file each time. For the benchmarks' comparison.
    pub fn poll_cpu_files(&mut self) -> Result<Vec<PolledCpu>, Error> {
        let tree = CgroupTree::walk(&self.root)?;
        let Some(layout) = Layout::detect() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(tree.len());
        for (id, path) in tree.iter() {
            let relative = self.root_in_mount.join(path.trim_start_matches('/'));
            let read = |kind| std::fs::read_to_string(layout.path(kind, &relative)).ok();
            let usage =
                read(FileKind::CpuUsage).and_then(|text| crate::cgroupfs::parse_cpu_usage(&text));
            let throttled =
                read(FileKind::CpuStat).and_then(|text| crate::cgroupfs::parse_throttling(&text).1);
            out.push(PolledCpu {
                id,
                usage_ns: usage,
                throttled_ns: throttled,
            });
        }
        Ok(out)
    }

    /// Drops what the maps hold for removed cgroups: overflow entries are
    /// deleted; slots (which only their CPU's programs may write) are posted
    /// in the evict arrays, and the next cgroup that needs one takes it over.
    fn forget(
        &mut self,
        net: &TableRead<NetCounters>,
        sched: &TableRead<SchedCounters>,
        devices: &TableRead<DevCounters>,
        dead_guard_slots: &[(u32, u64)],
    ) -> Result<(), Error> {
        forget_overflow(
            &mut self.maps.net_overflow,
            &net.dead_overflow,
            maps::NET_OVERFLOW,
        )?;
        forget_overflow(
            &mut self.maps.sched_overflow,
            &sched.dead_overflow,
            maps::SCHED_OVERFLOW,
        )?;
        forget_overflow(
            &mut self.maps.dev_counts,
            &devices.dead_overflow,
            maps::DEV_COUNTS,
        )?;
        for (dead, evict, posted, name) in [
            (
                net.dead_slots.as_slice(),
                &mut self.maps.net_evict,
                &mut self.net_evictions,
                maps::NET_EVICT,
            ),
            (
                sched.dead_slots.as_slice(),
                &mut self.maps.sched_evict,
                &mut self.sched_evictions,
                maps::SCHED_EVICT,
            ),
            (
                devices.dead_slots.as_slice(),
                &mut self.maps.dev_evict,
                &mut self.dev_evictions,
                maps::DEV_EVICT,
            ),
            (
                dead_guard_slots,
                &mut self.maps.net_guard_evict,
                &mut self.guard_evictions,
                maps::NET_GUARD_EVICT,
            ),
        ] {
            for &(index, id) in dead {
                if posted.get(&index) != Some(&id) {
                    evict
                        .set(index, id, 0)
                        .map_err(|source| Error::Map { name, source })?;
                    posted.insert(index, id);
                }
            }
        }
        Ok(())
    }

    /// Drops the rate buckets of cgroups that are gone (once per change of
    /// the tree): without this, `NET_RATE` would fill up over a long run,
    /// and caps of new cgroups would stop applying.
    fn sweep_rates(&mut self) -> Result<(), Error> {
        let dead: Vec<RateKey> = self
            .maps
            .net_rate
            .keys()
            .filter(|key| !matches!(key, Err(MapError::KeyNotFound)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::Map {
                name: maps::NET_RATE,
                source,
            })?
            .into_iter()
            .filter(|key| !self.tree.contains(key.cgroup_id))
            .collect();
        for key in &dead {
            match self.maps.net_rate.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(Error::Map {
                        name: maps::NET_RATE,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn warn_uncounted(&mut self, uncounted: &NetCounters, now: Instant) {
        let packets = uncounted.rx_packets.saturating_add(uncounted.tx_packets);
        let due = match self.uncounted_warned {
            None => packets > 0,
            Some((warned, when)) => {
                packets > warned && now.duration_since(when) >= UNCOUNTED_WARNING_EVERY
            }
        };
        if due {
            log::warn!(
                "{packets} packets could not be attributed to their cgroup because map {} is \
                 full ({} cgroups); they are reported as \"uncounted\": restart the daemon with \
                 a larger --max-cgroups",
                maps::NET_OVERFLOW,
                self.max_cgroups,
            );
            self.uncounted_warned = Some((packets, now));
        }
    }
}

impl Maps {
    /// How many cgroups the overflow map holds (0 when the kernel won't say).
    fn overflow_capacity(&self) -> u32 {
        use aya::maps::IterableMap as _;
        self.net_overflow
            .map()
            .info()
            .map_or(0, |info| info.max_entries())
    }
}

/// Names of `agent run` workloads by cgroup path (relative to the root),
/// re-read only when the record directory changed.
struct Workloads {
    root: PathBuf,
    dir: PathBuf,
    state_dir: PathBuf,
    modified: Option<SystemTime>,
    names: HashMap<String, String>,
}

impl Workloads {
    fn new(root: &Path, state_dir: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            dir: state_dir.join("workloads"),
            state_dir: state_dir.to_path_buf(),
            modified: None,
            names: HashMap::new(),
        }
    }

    fn refresh(&mut self) {
        let modified = std::fs::metadata(&self.dir)
            .and_then(|meta| meta.modified())
            .ok();
        if modified == self.modified && modified.is_some() {
            return;
        }
        self.modified = modified;
        self.names = registry::all(&self.state_dir)
            .into_iter()
            .filter_map(|record| {
                let relative = record.cgroups.v2.strip_prefix(&self.root).ok()?;
                Some((format!("/{}", relative.display()), record.name))
            })
            .collect();
    }

    fn name(&self, path: &str) -> Option<&str> {
        self.names.get(path).map(String::as_str)
    }
}

//! The collector: reads the maps and the cgroup tree into a [`Sample`] of
//! cumulative counters. It is the only reader of the maps; consumers get
//! samples (and snapshots made from them by [`crate::model`]).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::MapError;
use common::{maps, NetCounters, NET_SLOT_RECLAIMING};

use crate::{
    cgroup::CgroupTree,
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
    /// Traffic that found the per-cgroup map full and could not be attributed.
    pub uncounted: NetCounters,
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

pub struct Collector {
    maps: Maps,
    root: PathBuf,
    role: Role,
    tree: CgroupTree,
    /// The tree-change counter when `tree` was walked.
    tree_generation: Option<u64>,
    max_cgroups: u32,
    /// Removed cgroups already posted in NET_EVICT, by slot index.
    evictions: HashMap<u32, u64>,
    workloads: Workloads,
    uncounted_warned: Option<(u64, Instant)>,
}

impl Collector {
    #[must_use]
    pub fn new(maps: Maps, root: &Path, role: Role) -> Self {
        let max_cgroups = maps.overflow_capacity();
        Self {
            maps,
            root: root.to_path_buf(),
            role,
            tree: CgroupTree::default(),
            tree_generation: None,
            max_cgroups,
            evictions: HashMap::new(),
            workloads: Workloads::new(root, Path::new(DEFAULT_STATE_DIR)),
            uncounted_warned: None,
        }
    }

    /// Reads `agent run`'s records from `state_dir` instead of the default.
    #[must_use]
    pub fn with_state_dir(mut self, state_dir: &Path) -> Self {
        self.workloads = Workloads::new(&self.root, state_dir);
        self
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
        let generation = self.generation()?;
        if self.tree_generation != Some(generation) {
            self.tree = CgroupTree::walk(&self.root)?;
            self.tree_generation = Some(generation);
        }
        self.workloads.refresh();
        let taken = SystemTime::now();
        let at = Instant::now();
        let mut net: HashMap<u64, NetCounters> = HashMap::with_capacity(self.tree.len());
        let mut dead_slots = Vec::new();
        let tables = self
            .maps
            .net_slots
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: maps::NET_SLOTS,
                source,
            })?;
        for table in tables.iter() {
            for (index, slot) in table.slots.iter().enumerate() {
                if slot.cgroup_id == 0 || slot.cgroup_id == NET_SLOT_RECLAIMING {
                    continue;
                }
                if !self.tree.contains(slot.cgroup_id) {
                    dead_slots.push((index as u32, slot.cgroup_id));
                    continue;
                }
                let total = net.entry(slot.cgroup_id).or_insert(NetCounters::ZERO);
                *total = total.plus(slot.counters());
            }
        }
        let mut dead_overflow = Vec::new();
        for entry in self.maps.net_overflow.iter() {
            let (id, per_cpu) = match entry {
                Ok(entry) => entry,
                // Removed between get_next_key and lookup.
                Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(Error::Map {
                        name: maps::NET_OVERFLOW,
                        source,
                    })
                }
            };
            if !self.tree.contains(id) {
                dead_overflow.push(id);
                continue;
            }
            let total = net.entry(id).or_insert(NetCounters::ZERO);
            *total = per_cpu.iter().fold(*total, |sum, cpu| sum.plus(*cpu));
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

        if self.role == Role::Owner
            && !(dead_slots.is_empty() && dead_overflow.is_empty())
            && self.generation()? == generation
        {
            self.forget(&dead_slots, &dead_overflow)?;
        }
        self.warn_uncounted(&uncounted, at);

        let mut cgroups: Vec<CgroupSample> = self
            .tree
            .iter()
            .map(|(id, path)| CgroupSample {
                id,
                path: path.to_owned(),
                name: self.workloads.name(path).map(str::to_owned),
                net: net.get(&id).copied().unwrap_or(NetCounters::ZERO),
            })
            .collect();
        cgroups.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Sample {
            taken,
            at,
            cgroup_root: self.root.clone(),
            cgroups,
            uncounted,
        })
    }

    /// Drops what the maps hold for removed cgroups: overflow entries are
    /// deleted; slots (which only their CPU's programs may write) are posted
    /// in NET_EVICT, and the next cgroup that needs one takes it over.
    fn forget(&mut self, dead_slots: &[(u32, u64)], dead_overflow: &[u64]) -> Result<(), Error> {
        for id in dead_overflow {
            match self.maps.net_overflow.remove(id) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(Error::Map {
                        name: maps::NET_OVERFLOW,
                        source,
                    })
                }
            }
        }
        for &(index, id) in dead_slots {
            if self.evictions.get(&index) != Some(&id) {
                self.maps
                    .net_evict
                    .set(index, id, 0)
                    .map_err(|source| Error::Map {
                        name: maps::NET_EVICT,
                        source,
                    })?;
                self.evictions.insert(index, id);
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

//! The enforcer: puts compiled device policies into the maps the kernel
//! program reads, atomically, and keeps them in step with the cgroup tree.
//!
//! A policy's rules are written under a fresh *version* (keys are never
//! changed in place); then each cgroup's `DEV_POLICY` entry, one value, is
//! switched to that version. Every access therefore meets the whole old
//! policy or the whole new one. Rules of versions no longer in use are
//! deleted after a grace period, long after any program that read the old
//! version has finished. Entries that `agent run` set (owner "run") are never
//! touched, except to clean up after cgroups that are gone.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use aya::maps::MapError;
use common::{
    devices::{DevKey, DevPolicyRef, OWNER_DAEMON, OWNER_RUN},
    maps,
};

use crate::{
    loader::DeviceMaps,
    policy::{devices::Table, DevicePolicy},
};

/// How long the rules of a replaced version stay before they are deleted.
const GRACE: Duration = Duration::from_secs(2);
/// Versions at or above this are `agent run`'s (one per run, from its pid).
pub const RUN_VERSIONS: u32 = 0x8000_0000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing map {name} failed: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// What the enforcer did in one [`DeviceEnforcer::apply`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub versions_written: usize,
    pub cgroups_switched: usize,
    pub cgroups_released: usize,
}

/// Writes `table` under `version`; on failure removes what it wrote.
fn write_version(
    maps: &mut DeviceMaps,
    version: u32,
    table: &[((u32, u32, u32), u8)],
) -> Result<Vec<DevKey>, Error> {
    let mut keys = Vec::with_capacity(table.len());
    for &((dev_type, major, minor), allowed) in table {
        let key = DevKey {
            version,
            dev_type,
            major,
            minor,
        };
        if let Err(source) = maps.rules.insert(key, u32::from(allowed), 0) {
            for key in &keys {
                let _ = maps.rules.remove(key);
            }
            return Err(Error::Map {
                name: maps::DEV_RULES,
                source,
            });
        }
        keys.push(key);
    }
    Ok(keys)
}

/// Puts a workload's device policy in force for its cgroup (`agent run`),
/// under version `version` (>= [`RUN_VERSIONS`]).
pub fn set_for_run(
    maps: &mut DeviceMaps,
    cgroup_id: u64,
    version: u32,
    policy: &DevicePolicy,
) -> Result<(), Error> {
    write_version(maps, version, &policy.compile())?;
    maps.policy
        .insert(
            cgroup_id,
            DevPolicyRef {
                version,
                owner: OWNER_RUN,
            },
            0,
        )
        .map_err(map_err(maps::DEV_POLICY))
}

/// Removes what [`set_for_run`] wrote.
pub fn clear_for_run(maps: &mut DeviceMaps, cgroup_id: u64, version: u32, policy: &DevicePolicy) {
    let _ = maps.policy.remove(&cgroup_id);
    for ((dev_type, major, minor), _) in policy.compile() {
        let _ = maps.rules.remove(&DevKey {
            version,
            dev_type,
            major,
            minor,
        });
    }
}

pub struct DeviceEnforcer {
    maps: DeviceMaps,
    next_version: u32,
    /// Compiled tables in force, by content, and their version.
    versions: HashMap<Table, (u32, Vec<DevKey>)>,
    /// What this daemon set, by cgroup id.
    assigned: HashMap<u64, u32>,
    /// Replaced versions, deleted after the grace period.
    retired: Vec<(Vec<DevKey>, Instant)>,
}

impl DeviceEnforcer {
    /// Takes over the maps. Daemon entries and versions left by a previous
    /// daemon (pins kept) are adopted, and replaced by the first [`Self::apply`].
    pub fn new(maps: DeviceMaps) -> Result<Self, Error> {
        let mut left: HashMap<u32, Vec<DevKey>> = HashMap::new();
        for key in maps.rules.keys() {
            let key = key.map_err(map_err(maps::DEV_RULES))?;
            if key.version < RUN_VERSIONS {
                left.entry(key.version).or_default().push(key);
            }
        }
        let mut assigned = HashMap::new();
        for entry in maps.policy.iter() {
            let (id, policy) = entry.map_err(map_err(maps::DEV_POLICY))?;
            if policy.owner == OWNER_DAEMON {
                assigned.insert(id, policy.version);
            }
        }
        let next_version = left.keys().max().map_or(1, |v| v + 1);
        let now = Instant::now();
        Ok(Self {
            maps,
            next_version,
            versions: HashMap::new(),
            assigned,
            // Anything of the previous daemon's goes once no cgroup uses it.
            retired: left.into_values().map(|keys| (keys, now)).collect(),
        })
    }

    /// Makes `wanted` (cgroup id → device policy) what is in force: new rule
    /// versions first, then one switch per cgroup, then releases. On an
    /// error the cgroups already switched go back, and nothing else changed.
    pub fn apply(
        &mut self,
        wanted: &HashMap<u64, &DevicePolicy>,
        alive: &HashSet<u64>,
    ) -> Result<Changes, Error> {
        let mut changes = Changes::default();
        // 1. Rule versions for every distinct table wanted.
        let mut fresh = Vec::new();
        let mut version_of: HashMap<u64, u32> = HashMap::new();
        for (id, policy) in wanted {
            let table = policy.compile();
            let version = match self.versions.get(&table) {
                Some((version, _)) => *version,
                None => {
                    let version = self.next_version;
                    let keys = match write_version(&mut self.maps, version, &table) {
                        Ok(keys) => keys,
                        Err(err) => {
                            self.undo_fresh(fresh);
                            return Err(err);
                        }
                    };
                    self.next_version += 1;
                    self.versions.insert(table.clone(), (version, keys));
                    fresh.push(table);
                    changes.versions_written += 1;
                    version
                }
            };
            version_of.insert(*id, version);
        }
        // 2. Switch each cgroup (leaving `agent run`'s own alone).
        let mut switched: Vec<(u64, Option<u32>)> = Vec::new();
        for (id, version) in &version_of {
            if self.assigned.get(id) == Some(version) {
                continue;
            }
            // SAFETY of ownership: a workload's own policy wins over the file's.
            if self
                .maps
                .policy
                .get(id, 0)
                .is_ok_and(|p| p.owner == OWNER_RUN)
            {
                continue;
            }
            if let Err(source) = self.maps.policy.insert(
                *id,
                DevPolicyRef {
                    version: *version,
                    owner: OWNER_DAEMON,
                },
                0,
            ) {
                for (id, previous) in switched {
                    match previous {
                        Some(version) => {
                            let _ = self.maps.policy.insert(
                                id,
                                DevPolicyRef {
                                    version,
                                    owner: OWNER_DAEMON,
                                },
                                0,
                            );
                        }
                        None => {
                            let _ = self.maps.policy.remove(&id);
                        }
                    }
                }
                self.undo_fresh(fresh);
                return Err(Error::Map {
                    name: maps::DEV_POLICY,
                    source,
                });
            }
            switched.push((*id, self.assigned.insert(*id, *version)));
            changes.cgroups_switched += 1;
        }
        // 3. Release cgroups no policy wants any more.
        let released: Vec<u64> = self
            .assigned
            .keys()
            .copied()
            .filter(|id| !version_of.contains_key(id))
            .collect();
        for id in released {
            let _ = self.maps.policy.remove(&id);
            self.assigned.remove(&id);
            changes.cgroups_released += 1;
        }
        // 4. Retire versions nobody uses.
        let used: HashSet<u32> = self.assigned.values().copied().collect();
        let now = Instant::now();
        let unused: Vec<_> = self
            .versions
            .iter()
            .filter(|(_, (v, _))| !used.contains(v))
            .map(|(t, _)| t.clone())
            .collect();
        for table in unused {
            if let Some((_, keys)) = self.versions.remove(&table) {
                self.retired.push((keys, now));
            }
        }
        self.collect_garbage(alive);
        Ok(changes)
    }

    fn undo_fresh(&mut self, fresh: Vec<Table>) {
        for table in fresh {
            if let Some((_, keys)) = self.versions.remove(&table) {
                for key in keys {
                    let _ = self.maps.rules.remove(&key);
                }
            }
        }
    }

    /// Deletes the rules of versions retired longer ago than the grace
    /// period, and the entries (and `agent run` versions) of cgroups that
    /// are gone.
    pub fn collect_garbage(&mut self, alive: &HashSet<u64>) {
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = self
            .retired
            .drain(..)
            .partition(|(_, when)| now.duration_since(*when) >= GRACE);
        self.retired = keep;
        let in_use: HashSet<u32> = self.assigned.values().copied().collect();
        for (keys, _) in due {
            for key in keys
                .into_iter()
                .filter(|key| !in_use.contains(&key.version))
            {
                let _ = self.maps.rules.remove(&key);
            }
        }
        let gone: Vec<(u64, DevPolicyRef)> = self
            .maps
            .policy
            .iter()
            .filter_map(Result::ok)
            .filter(|(id, _)| !alive.contains(id))
            .collect();
        for (id, policy) in gone {
            let _ = self.maps.policy.remove(&id);
            self.assigned.remove(&id);
            if policy.owner == OWNER_RUN {
                let keys: Vec<DevKey> = self
                    .maps
                    .rules
                    .keys()
                    .filter_map(Result::ok)
                    .filter(|k| k.version == policy.version)
                    .collect();
                self.retired.push((keys, now));
            }
        }
    }

    /// Cgroups this daemon has a policy in force for.
    #[must_use]
    pub fn assigned(&self) -> usize {
        self.assigned.len()
    }
}

//! The enforcer: puts compiled policies (device and network) into the maps
//! the kernel programs read, atomically, and keeps them in step with the
//! cgroup tree.
//!
//! A policy's rules are written under a fresh *version* (keys are never
//! changed in place); then each cgroup's reference, one map value holding the
//! version (and, for networks, the defaults, class id, mark and rates), is
//! switched. Every packet or access therefore meets the whole old policy or
//! the whole new one. Rules of versions no longer in use are deleted after a
//! grace period, long after any program that read the old version has
//! finished. References that `agent run` set (owner "run") are never
//! touched, except to clean up after cgroups that are gone.
//!
//! The two kinds of policy share this machinery through [`Domain`], which
//! says how a policy compiles and which maps it lives in.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    time::{Duration, Instant},
};

use aya::maps::{lpm_trie::Key, Array, MapData, MapError};
use common::{
    devices::{DevKey, DevPolicyRef, OWNER_DAEMON, OWNER_RUN},
    maps,
    netpolicy::{
        NetPolicyRef, NetRuleEntry, NetRuleKey, NetRuleSet, DIR_EGRESS, DIR_INGRESS, FAMILY_V4,
        FAMILY_V6, FLAG_CLASSID, FLAG_EGRESS_DENY, FLAG_EGRESS_RULES, FLAG_INGRESS_DENY,
        FLAG_INGRESS_RULES, FLAG_MARK, KEY_HEADER_BITS, RULES_PER_PREFIX,
    },
};

use crate::{
    loader::{DeviceMaps, NetworkMaps},
    policy::{
        devices::Table as DeviceTable,
        network::{self, Cidr},
        Action, DevicePolicy, NetworkPolicy,
    },
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

/// A kind of policy: how it compiles, and the maps it is written to.
pub trait Domain {
    type Policy: 'static;
    /// What a version holds: equal tables share one version.
    type Table: Clone + Eq + Hash;
    type Key: Copy;
    type Value: Copy;
    /// A cgroup's reference to its version (and per-cgroup settings).
    type Ref: Copy + PartialEq;
    const RULES: &'static str;
    const REFS: &'static str;

    fn table(policy: &Self::Policy) -> Self::Table;
    fn entries(table: &Self::Table, version: u32) -> Vec<(Self::Key, Self::Value)>;
    fn reference(policy: &Self::Policy, version: u32, owner: u32) -> Self::Ref;
    fn ref_version(reference: &Self::Ref) -> u32;
    fn ref_owner(reference: &Self::Ref) -> u32;
    fn key_version(key: &Self::Key) -> u32;

    fn insert_rule(&mut self, key: &Self::Key, value: &Self::Value) -> Result<(), MapError>;
    fn remove_rule(&mut self, key: &Self::Key);
    fn rule_keys(&self) -> Result<Vec<Self::Key>, MapError>;
    fn get_ref(&self, id: u64) -> Option<Self::Ref>;
    fn set_ref(&mut self, id: u64, reference: &Self::Ref) -> Result<(), MapError>;
    fn remove_ref(&mut self, id: u64);
    fn refs(&self) -> Result<Vec<(u64, Self::Ref)>, MapError>;
}

impl Domain for DeviceMaps {
    type Policy = DevicePolicy;
    type Table = DeviceTable;
    type Key = DevKey;
    type Value = u32;
    type Ref = DevPolicyRef;
    const RULES: &'static str = maps::DEV_RULES;
    const REFS: &'static str = maps::DEV_POLICY;

    fn table(policy: &DevicePolicy) -> DeviceTable {
        policy.compile()
    }

    fn entries(table: &DeviceTable, version: u32) -> Vec<(DevKey, u32)> {
        table
            .iter()
            .map(|&((dev_type, major, minor), allowed)| {
                (
                    DevKey {
                        version,
                        dev_type,
                        major,
                        minor,
                    },
                    u32::from(allowed),
                )
            })
            .collect()
    }

    fn reference(_policy: &DevicePolicy, version: u32, owner: u32) -> DevPolicyRef {
        DevPolicyRef { version, owner }
    }

    fn ref_version(reference: &DevPolicyRef) -> u32 {
        reference.version
    }

    fn ref_owner(reference: &DevPolicyRef) -> u32 {
        reference.owner
    }

    fn key_version(key: &DevKey) -> u32 {
        key.version
    }

    fn insert_rule(&mut self, key: &DevKey, value: &u32) -> Result<(), MapError> {
        self.rules.insert(key, value, 0)
    }

    fn remove_rule(&mut self, key: &DevKey) {
        let _ = self.rules.remove(key);
    }

    fn rule_keys(&self) -> Result<Vec<DevKey>, MapError> {
        settled(self.rules.keys())
    }

    fn get_ref(&self, id: u64) -> Option<DevPolicyRef> {
        self.policy.get(&id, 0).ok()
    }

    fn set_ref(&mut self, id: u64, reference: &DevPolicyRef) -> Result<(), MapError> {
        write_reference(&mut self.policy, &mut self.generation, id, reference)
    }

    fn remove_ref(&mut self, id: u64) {
        remove_reference(&mut self.policy, &mut self.generation, id);
    }

    fn refs(&self) -> Result<Vec<(u64, DevPolicyRef)>, MapError> {
        settled(self.policy.iter())
    }
}

/// A network policy's compiled rules, per direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetTable {
    pub egress: Option<network::Table>,
    pub ingress: Option<network::Table>,
}

/// The trie key of `cidr` in `direction` under `version`.
#[must_use]
pub fn net_key(version: u32, direction: u8, cidr: &Cidr) -> Key<NetRuleKey> {
    let mut addr = [0u8; 16];
    let family = match cidr.addr {
        std::net::IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            FAMILY_V4
        }
        std::net::IpAddr::V6(v6) => {
            addr.copy_from_slice(&v6.octets());
            FAMILY_V6
        }
    };
    Key::new(
        KEY_HEADER_BITS + u32::from(cidr.len),
        NetRuleKey {
            version,
            direction,
            family,
            _pad: 0,
            addr,
        },
    )
}

impl Domain for NetworkMaps {
    type Policy = NetworkPolicy;
    type Table = NetTable;
    type Key = Key<NetRuleKey>;
    type Value = NetRuleSet;
    type Ref = NetPolicyRef;
    const RULES: &'static str = maps::NET_RULES;
    const REFS: &'static str = maps::NET_POLICY;

    fn table(policy: &NetworkPolicy) -> NetTable {
        // A policy that reached here was checked: its directions compile.
        let compile =
            |d: &Option<network::Direction>| d.as_ref().and_then(|d| network::compile(d).ok());
        NetTable {
            egress: compile(&policy.egress),
            ingress: compile(&policy.ingress),
        }
    }

    fn entries(table: &NetTable, version: u32) -> Vec<(Key<NetRuleKey>, NetRuleSet)> {
        let mut out = Vec::new();
        for (direction, table) in [(DIR_EGRESS, &table.egress), (DIR_INGRESS, &table.ingress)] {
            for (cidr, rules) in table.iter().flatten() {
                let mut set = NetRuleSet {
                    count: rules.len().min(RULES_PER_PREFIX) as u32,
                    ..NetRuleSet::default()
                };
                for (slot, rule) in set.rules.iter_mut().zip(rules) {
                    *slot = NetRuleEntry {
                        protocol: rule.protocol,
                        allow: u8::from(rule.allow),
                        index: rule.index,
                        port_low: rule.port_low,
                        port_high: rule.port_high,
                    };
                }
                out.push((net_key(version, direction, cidr), set));
            }
        }
        out
    }

    fn reference(policy: &NetworkPolicy, version: u32, owner: u32) -> NetPolicyRef {
        let mut flags = 0;
        if let Some(egress) = &policy.egress {
            flags |= FLAG_EGRESS_RULES;
            if egress.default == Action::Deny {
                flags |= FLAG_EGRESS_DENY;
            }
        }
        if let Some(ingress) = &policy.ingress {
            flags |= FLAG_INGRESS_RULES;
            if ingress.default == Action::Deny {
                flags |= FLAG_INGRESS_DENY;
            }
        }
        if policy.classid.is_some() {
            flags |= FLAG_CLASSID;
        }
        if policy.mark.is_some() {
            flags |= FLAG_MARK;
        }
        NetPolicyRef {
            version,
            owner,
            flags,
            classid: policy.classid.unwrap_or(0),
            mark: policy.mark.unwrap_or(0),
            _pad: 0,
            egress_rate: policy.egress_rate.map(|r| r.spec(true)).unwrap_or_default(),
            ingress_rate: policy
                .ingress_rate
                .map(|r| r.spec(false))
                .unwrap_or_default(),
        }
    }

    fn ref_version(reference: &NetPolicyRef) -> u32 {
        reference.version
    }

    fn ref_owner(reference: &NetPolicyRef) -> u32 {
        reference.owner
    }

    fn key_version(key: &Key<NetRuleKey>) -> u32 {
        key.data().version
    }

    fn insert_rule(&mut self, key: &Key<NetRuleKey>, value: &NetRuleSet) -> Result<(), MapError> {
        self.rules.insert(key, value, 0)
    }

    fn remove_rule(&mut self, key: &Key<NetRuleKey>) {
        let _ = self.rules.remove(key);
    }

    fn rule_keys(&self) -> Result<Vec<Key<NetRuleKey>>, MapError> {
        settled(self.rules.keys())
    }

    fn get_ref(&self, id: u64) -> Option<NetPolicyRef> {
        self.policy.get(&id, 0).ok()
    }

    fn set_ref(&mut self, id: u64, reference: &NetPolicyRef) -> Result<(), MapError> {
        write_reference(&mut self.policy, &mut self.generation, id, reference)
    }

    fn remove_ref(&mut self, id: u64) {
        remove_reference(&mut self.policy, &mut self.generation, id);
    }

    fn refs(&self) -> Result<Vec<(u64, NetPolicyRef)>, MapError> {
        settled(self.policy.iter())
    }
}

/// Writes cgroup `id`'s reference, then a new generation (see
/// [`new_generation`]). If the generation cannot be written, the reference
/// that was there before is put back (or the new one removed), so that
/// nothing changed and the caller's rollback holds.
fn write_reference<V: aya::Pod>(
    refs: &mut aya::maps::HashMap<MapData, u64, V>,
    generation: &mut Array<MapData, u64>,
    id: u64,
    reference: &V,
) -> Result<(), MapError> {
    let before = refs.get(&id, 0).ok();
    refs.insert(id, reference, 0)?;
    new_generation(generation).inspect_err(|_| {
        let _ = match before {
            Some(before) => refs.insert(id, before, 0),
            None => refs.remove(&id),
        };
    })
}

/// Removes cgroup `id`'s reference, then writes a new generation.
fn remove_reference<V: aya::Pod>(
    refs: &mut aya::maps::HashMap<MapData, u64, V>,
    generation: &mut Array<MapData, u64>,
    id: u64,
) {
    let _ = refs.remove(&id);
    let _ = new_generation(generation);
}

/// Tells the programs that answers they cached are stale: writes a policy
/// generation never used before (random, as `agent run` processes and the
/// daemon write it independently), after the reference it follows.
fn new_generation(generation: &mut Array<MapData, u64>) -> Result<(), MapError> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom(2) writes at most `bytes.len()` bytes to the buffer.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let value = if filled == 8 {
        u64::from_ne_bytes(bytes)
    } else {
        // Never expected; still a value unlikely to have been used.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        now ^ (u64::from(std::process::id()) << 40)
    };
    generation.set(0, value, 0)
}

/// Collects a map walk, skipping entries deleted while it ran (`agent run`
/// removes its own concurrently).
fn settled<T>(walk: impl Iterator<Item = Result<T, MapError>>) -> Result<Vec<T>, MapError> {
    walk.filter(|item| !matches!(item, Err(MapError::KeyNotFound)))
        .collect()
}

/// What the enforcer did in one [`Enforcer::apply`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub versions_written: usize,
    pub cgroups_switched: usize,
    pub cgroups_released: usize,
}

/// Writes `table` under `version`; on failure removes what it wrote.
fn write_version<D: Domain>(
    maps: &mut D,
    version: u32,
    table: &D::Table,
) -> Result<Vec<D::Key>, Error> {
    let entries = D::entries(table, version);
    let mut keys = Vec::with_capacity(entries.len());
    for (key, value) in &entries {
        if let Err(source) = maps.insert_rule(key, value) {
            for key in &keys {
                maps.remove_rule(key);
            }
            return Err(Error::Map {
                name: D::RULES,
                source,
            });
        }
        keys.push(*key);
    }
    Ok(keys)
}

/// Puts a workload's policy in force for its cgroup (`agent run`), under
/// version `version` (>= [`RUN_VERSIONS`]).
pub fn set_for_run<D: Domain>(
    maps: &mut D,
    cgroup_id: u64,
    version: u32,
    policy: &D::Policy,
) -> Result<(), Error> {
    let keys = write_version(maps, version, &D::table(policy))?;
    maps.set_ref(cgroup_id, &D::reference(policy, version, OWNER_RUN))
        .map_err(|source| {
            for key in &keys {
                maps.remove_rule(key);
            }
            Error::Map {
                name: D::REFS,
                source,
            }
        })
}

/// Removes what [`set_for_run`] wrote.
pub fn clear_for_run<D: Domain>(maps: &mut D, cgroup_id: u64, version: u32, policy: &D::Policy) {
    maps.remove_ref(cgroup_id);
    for (key, _) in D::entries(&D::table(policy), version) {
        maps.remove_rule(&key);
    }
}

pub struct Enforcer<D: Domain> {
    maps: D,
    next_version: u32,
    /// Compiled tables in force, by content, and their version.
    versions: HashMap<D::Table, (u32, Vec<D::Key>)>,
    /// What this daemon set, by cgroup id.
    assigned: HashMap<u64, D::Ref>,
    /// Replaced versions, deleted after the grace period.
    retired: Vec<(Vec<D::Key>, Instant)>,
}

/// Enforces device policies.
pub type DeviceEnforcer = Enforcer<DeviceMaps>;
/// Enforces network policies.
pub type NetworkEnforcer = Enforcer<NetworkMaps>;

impl<D: Domain> Enforcer<D> {
    /// Takes over the maps. References and versions left by a previous
    /// daemon (pins kept) are adopted, and replaced by the first [`Self::apply`].
    pub fn new(maps: D) -> Result<Self, Error> {
        let mut left: HashMap<u32, Vec<D::Key>> = HashMap::new();
        for key in maps.rule_keys().map_err(|source| Error::Map {
            name: D::RULES,
            source,
        })? {
            if D::key_version(&key) < RUN_VERSIONS {
                left.entry(D::key_version(&key)).or_default().push(key);
            }
        }
        let mut assigned = HashMap::new();
        for (id, reference) in maps.refs().map_err(|source| Error::Map {
            name: D::REFS,
            source,
        })? {
            if D::ref_owner(&reference) == OWNER_DAEMON {
                assigned.insert(id, reference);
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

    /// Cgroups whose reference `agent run` wrote (its workloads' own policies).
    pub fn run_owned(&self) -> HashSet<u64> {
        self.maps
            .refs()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, reference)| D::ref_owner(reference) == OWNER_RUN)
            .map(|(id, _)| id)
            .collect()
    }

    /// Makes `wanted` (cgroup id → policy) what is in force: new rule
    /// versions first, then one switch per cgroup, then releases. On an
    /// error the cgroups already switched go back, and nothing else changed.
    pub fn apply(
        &mut self,
        wanted: &HashMap<u64, &D::Policy>,
        alive: &HashSet<u64>,
    ) -> Result<Changes, Error> {
        let mut changes = Changes::default();
        // 1. Rule versions for every distinct table wanted.
        let mut fresh = Vec::new();
        let mut reference_of: HashMap<u64, D::Ref> = HashMap::new();
        for (id, policy) in wanted {
            let table = D::table(policy);
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
            reference_of.insert(*id, D::reference(policy, version, OWNER_DAEMON));
        }
        // 2. Switch each cgroup (leaving `agent run`'s own alone).
        let mut switched: Vec<(u64, Option<D::Ref>)> = Vec::new();
        for (id, reference) in &reference_of {
            if self.assigned.get(id) == Some(reference) {
                continue;
            }
            // A workload's own policy wins over the file's.
            if self
                .maps
                .get_ref(*id)
                .is_some_and(|r| D::ref_owner(&r) == OWNER_RUN)
            {
                continue;
            }
            if let Err(source) = self.maps.set_ref(*id, reference) {
                for (id, previous) in switched {
                    match previous {
                        Some(previous) => {
                            let _ = self.maps.set_ref(id, &previous);
                        }
                        None => self.maps.remove_ref(id),
                    }
                }
                self.undo_fresh(fresh);
                return Err(Error::Map {
                    name: D::REFS,
                    source,
                });
            }
            switched.push((*id, self.assigned.insert(*id, *reference)));
            changes.cgroups_switched += 1;
        }
        // 3. Release cgroups no policy wants any more.
        let released: Vec<u64> = self
            .assigned
            .keys()
            .copied()
            .filter(|id| !reference_of.contains_key(id))
            .collect();
        for id in released {
            self.maps.remove_ref(id);
            self.assigned.remove(&id);
            changes.cgroups_released += 1;
        }
        // 4. Retire versions nobody uses.
        let used = self.used_versions();
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

    fn used_versions(&self) -> HashSet<u32> {
        self.assigned.values().map(D::ref_version).collect()
    }

    fn undo_fresh(&mut self, fresh: Vec<D::Table>) {
        for table in fresh {
            if let Some((_, keys)) = self.versions.remove(&table) {
                for key in keys {
                    self.maps.remove_rule(&key);
                }
            }
        }
    }

    /// Deletes the rules of versions retired longer ago than the grace
    /// period, and the references (and `agent run` versions) of cgroups that
    /// are gone.
    pub fn collect_garbage(&mut self, alive: &HashSet<u64>) {
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = self
            .retired
            .drain(..)
            .partition(|(_, when)| now.duration_since(*when) >= GRACE);
        self.retired = keep;
        let in_use = self.used_versions();
        for (keys, _) in due {
            for key in keys
                .into_iter()
                .filter(|key| !in_use.contains(&D::key_version(key)))
            {
                self.maps.remove_rule(&key);
            }
        }
        let gone: Vec<(u64, D::Ref)> = self
            .maps
            .refs()
            .unwrap_or_default()
            .into_iter()
            .filter(|(id, _)| !alive.contains(id))
            .collect();
        for (id, reference) in gone {
            self.maps.remove_ref(id);
            self.assigned.remove(&id);
            if D::ref_owner(&reference) == OWNER_RUN {
                let version = D::ref_version(&reference);
                let keys: Vec<D::Key> = self
                    .maps
                    .rule_keys()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|k| D::key_version(k) == version)
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

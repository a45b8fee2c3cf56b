//! Loading and attaching the kernel programs, and pinning them. This is the
//! only module that touches `aya::Ebpf`; it hands the maps to the collector as
//! typed handles ([`Maps`]) and keeps the links alive for as long as it lives.
//!
//! Pin layout under the pin directory (default `/sys/fs/bpf/agent`):
//! `maps/<MAP>` for every map in [`common::maps::ALL`], `links/<program>` for
//! every attached program.

use std::{
    fs, io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        BtfTracePoint, CgroupDevice, CgroupSkb, CgroupSockAddr, ProgramError, RawTracePoint,
    },
    Ebpf, EbpfLoader,
};
use common::{
    devices::{DevCounters, DevKey, DevPolicyRef, DevSlotTable},
    maps,
    netpolicy::{
        GuardSlotTable, HitKey, Hits, NetDrops, NetPolicyRef, NetRuleKey, NetRuleSet, RateKey,
        RateState,
    },
    programs, AgentInfo, NetCounters, NetSlotTable, SchedCounters, SchedSlotTable,
    AGENT_INFO_PATH_MAX, DEV_UNIT, EVENT_RATE, GUARD_OWNER, GUARD_OWNER_DAEMON, LAYOUT_VERSION,
    NET_SLOTS, NET_SLOT_MASK, SCHED_ROOT_ID, SCHED_ROOT_LEVEL, TASK_EXEC_OFFSET,
    TASK_RUN_DELAY_OFFSET,
};

use crate::{bpffs, sys};

/// The kernel programs, built by `build.rs` from `../ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// The cgroup_skb programs of the network accounting, with their hooks.
const NET_PROGRAMS: [(&str, u32); 2] = [
    (programs::NET_INGRESS, sys::ATTACH_CGROUP_INET_INGRESS),
    (programs::NET_EGRESS, sys::ATTACH_CGROUP_INET_EGRESS),
];

/// The programs that enforce policies (they can deny, so they are attached
/// only where asked), with their hooks.
const GUARD_PROGRAMS: [(&str, u32); 5] = [
    (programs::DEV_GUARD, sys::ATTACH_CGROUP_DEVICE),
    (programs::NET_GUARD_EGRESS, sys::ATTACH_CGROUP_INET_EGRESS),
    (programs::NET_GUARD_INGRESS, sys::ATTACH_CGROUP_INET_INGRESS),
    (
        programs::NET_GUARD_CONNECT4,
        sys::ATTACH_CGROUP_INET4_CONNECT,
    ),
    (
        programs::NET_GUARD_CONNECT6,
        sys::ATTACH_CGROUP_INET6_CONNECT,
    ),
];

/// Which policies to enforce where the guards are attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Guards {
    pub devices: bool,
    pub network: bool,
}

impl Guards {
    fn wants(self, program: &str) -> bool {
        if program == programs::DEV_GUARD {
            self.devices
        } else {
            self.network
        }
    }
}

/// Raw tracepoint programs, each named as its tracepoint: the cgroup tree changes.
const RAW_TRACEPOINTS: [&str; 3] = [
    programs::CGROUP_MKDIR,
    programs::CGROUP_RMDIR,
    programs::CGROUP_RENAME,
];

/// BTF tracepoint programs, each named as its tracepoint: the scheduler accounting.
const BTF_TRACEPOINTS: [&str; 4] = [
    programs::SCHED_SWITCH,
    programs::SCHED_TICK,
    programs::TASK_NEWTASK,
    programs::SCHED_PROCESS_EXIT,
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object failed: {source}{hint}", hint = root_hint(.source))]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("loading program {name} into the kernel failed: {source}")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {name} to cgroup {cgroup} failed: {source}{hint}", hint = attach_hint(.source.as_ref()))]
    AttachCgroup {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("attaching {name} to raw tracepoint {tracepoint} failed: {source}")]
    AttachTracepoint {
        name: &'static str,
        tracepoint: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("opening cgroup {path} failed: {source}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinning {what} at {path} failed: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("replacing the program of the pinned link {path} failed: {source}")]
    LinkUpdate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Bpffs(#[from] bpffs::Error),
    #[error(
        "no agent daemon is running: nothing is pinned at {pin_dir}; start one with \
         `agent daemon` (or pass the --pin-dir it uses)"
    )]
    NoDaemon { pin_dir: PathBuf },
    #[error(
        "the pins at {pin_dir} were made by an incompatible agent (layout {found}, this agent \
         reads layout {LAYOUT_VERSION}); stop that daemon, or remove the stale pins with \
         `rm -r {pin_dir}`"
    )]
    IncompatiblePins { pin_dir: PathBuf, found: u32 },
    #[error("another agent daemon (pid {pid}) already runs with its pins at {pin_dir}; stop it first, or pass another --pin-dir")]
    DaemonRunning { pin_dir: PathBuf, pid: u32 },
    #[error(
        "the programs pinned at {pin_dir} are attached to {pinned_root}, not {requested_root}; \
         pass --cgroup-root {pinned_root}, or remove the pins with `rm -r {pin_dir}`"
    )]
    OtherRoot {
        pin_dir: PathBuf,
        pinned_root: String,
        requested_root: PathBuf,
    },
    #[error(
        "reading the kernel's BTF failed: {source}; the scheduler accounting needs a kernel \
         with CONFIG_DEBUG_INFO_BTF and CONFIG_SCHED_INFO"
    )]
    Btf {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("--net-slots {slots} is not a power of two between 1 and {NET_SLOTS}")]
    BadSlots { slots: u32 },
    #[error("cgroup root path {path} is longer than {AGENT_INFO_PATH_MAX} bytes")]
    RootTooLong { path: PathBuf },
    #[error("removing the pins at {pin_dir} failed: {source}")]
    Unpin {
        pin_dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn is_permission_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::PermissionDenied {
                return true;
            }
        }
        source = err.source();
    }
    false
}

fn root_hint(err: &aya::EbpfError) -> &'static str {
    if is_permission_error(err) {
        " (loading eBPF programs needs root: run the agent with sudo)"
    } else {
        ""
    }
}

fn attach_hint(err: &(dyn std::error::Error + Send + Sync + 'static)) -> &'static str {
    if is_permission_error(err) {
        " (attaching eBPF programs needs root: run the agent with sudo)"
    } else {
        ""
    }
}

/// Typed handles to the maps the collector reads.
pub struct Maps {
    pub dev_slots: PerCpuArray<MapData, DevSlotTable>,
    pub dev_counts: PerCpuHashMap<MapData, u64, DevCounters>,
    pub dev_evict: Array<MapData, u64>,
    pub net_slots: PerCpuArray<MapData, NetSlotTable>,
    pub net_overflow: PerCpuHashMap<MapData, u64, NetCounters>,
    pub net_evict: Array<MapData, u64>,
    pub net_uncounted: PerCpuArray<MapData, NetCounters>,
    pub cgroup_generation: PerCpuArray<MapData, u64>,
    pub sched_slots: PerCpuArray<MapData, SchedSlotTable>,
    pub sched_overflow: PerCpuHashMap<MapData, u64, SchedCounters>,
    pub sched_evict: Array<MapData, u64>,
    pub sched_uncounted: PerCpuArray<MapData, SchedCounters>,
    pub net_drops: PerCpuHashMap<MapData, u64, NetDrops>,
    pub net_hits: PerCpuHashMap<MapData, HitKey, Hits>,
    pub net_guard_slots: PerCpuArray<MapData, GuardSlotTable>,
    pub net_guard_evict: Array<MapData, u64>,
    /// The bandwidth caps' buckets, dropped with their cgroups.
    pub net_rate: HashMap<MapData, RateKey, RateState>,
}

impl Maps {
    fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, Error> {
        Ok(Self {
            dev_slots: take_map(ebpf, maps::DEV_SLOTS)?,
            dev_counts: take_map(ebpf, maps::DEV_COUNTS)?,
            dev_evict: take_map(ebpf, maps::DEV_EVICT)?,
            net_slots: take_map(ebpf, maps::NET_SLOTS)?,
            net_overflow: take_map(ebpf, maps::NET_OVERFLOW)?,
            net_evict: take_map(ebpf, maps::NET_EVICT)?,
            net_uncounted: take_map(ebpf, maps::NET_UNCOUNTED)?,
            cgroup_generation: take_map(ebpf, maps::CGROUP_GENERATION)?,
            sched_slots: take_map(ebpf, maps::SCHED_SLOTS)?,
            sched_overflow: take_map(ebpf, maps::SCHED_OVERFLOW)?,
            sched_evict: take_map(ebpf, maps::SCHED_EVICT)?,
            sched_uncounted: take_map(ebpf, maps::SCHED_UNCOUNTED)?,
            net_drops: take_map(ebpf, maps::NET_DROPS)?,
            net_hits: take_map(ebpf, maps::NET_HITS)?,
            net_guard_slots: take_map(ebpf, maps::NET_GUARD_SLOTS)?,
            net_guard_evict: take_map(ebpf, maps::NET_GUARD_EVICT)?,
            net_rate: take_map(ebpf, maps::NET_RATE)?,
        })
    }

    fn from_pins(pin_dir: &Path) -> Result<Self, Error> {
        Ok(Self {
            dev_slots: open_pinned(pin_dir, maps::DEV_SLOTS)?,
            dev_counts: open_pinned(pin_dir, maps::DEV_COUNTS)?,
            dev_evict: open_pinned(pin_dir, maps::DEV_EVICT)?,
            net_slots: open_pinned(pin_dir, maps::NET_SLOTS)?,
            net_overflow: open_pinned(pin_dir, maps::NET_OVERFLOW)?,
            net_evict: open_pinned(pin_dir, maps::NET_EVICT)?,
            net_uncounted: open_pinned(pin_dir, maps::NET_UNCOUNTED)?,
            cgroup_generation: open_pinned(pin_dir, maps::CGROUP_GENERATION)?,
            sched_slots: open_pinned(pin_dir, maps::SCHED_SLOTS)?,
            sched_overflow: open_pinned(pin_dir, maps::SCHED_OVERFLOW)?,
            sched_evict: open_pinned(pin_dir, maps::SCHED_EVICT)?,
            sched_uncounted: open_pinned(pin_dir, maps::SCHED_UNCOUNTED)?,
            net_drops: open_pinned(pin_dir, maps::NET_DROPS)?,
            net_hits: open_pinned(pin_dir, maps::NET_HITS)?,
            net_guard_slots: open_pinned(pin_dir, maps::NET_GUARD_SLOTS)?,
            net_guard_evict: open_pinned(pin_dir, maps::NET_GUARD_EVICT)?,
            net_rate: open_pinned(pin_dir, maps::NET_RATE)?,
        })
    }
}

/// The maps device policies are written to (by the daemon, or `agent run`).
pub struct DeviceMaps {
    pub policy: HashMap<MapData, u64, DevPolicyRef>,
    pub rules: HashMap<MapData, DevKey, u32>,
    /// Changed after every change of `policy` (the programs' caches).
    pub generation: Array<MapData, u64>,
}

impl DeviceMaps {
    fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, Error> {
        Ok(Self {
            policy: take_map(ebpf, maps::DEV_POLICY)?,
            rules: take_map(ebpf, maps::DEV_RULES)?,
            generation: take_map(ebpf, maps::DEV_GENERATION)?,
        })
    }
}

/// The maps network policies are written to (by the daemon, or `agent run`).
pub struct NetworkMaps {
    pub policy: HashMap<MapData, u64, NetPolicyRef>,
    pub rules: LpmTrie<MapData, NetRuleKey, NetRuleSet>,
    /// Changed after every change of `policy` (the programs' caches).
    pub generation: Array<MapData, u64>,
}

impl NetworkMaps {
    fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, Error> {
        Ok(Self {
            policy: take_map(ebpf, maps::NET_POLICY)?,
            rules: take_map(ebpf, maps::NET_RULES)?,
            generation: take_map(ebpf, maps::NET_GENERATION)?,
        })
    }
}

/// Everything a loaded object hands to the stages that use its maps.
pub struct Loaded {
    /// For the collector.
    pub counters: Maps,
    /// For the policy enforcers.
    pub devices: DeviceMaps,
    pub network: NetworkMaps,
    /// For the event reader.
    pub events: RingBuf<MapData>,
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

fn open_pinned<T>(pin_dir: &Path, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = bpffs::maps_dir(pin_dir).join(name);
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
    let map = match name {
        maps::NET_OVERFLOW
        | maps::SCHED_OVERFLOW
        | maps::DEV_COUNTS
        | maps::NET_DROPS
        | maps::NET_HITS => Map::PerCpuHashMap(data),
        maps::AGENT_INFO
        | maps::NET_EVICT
        | maps::SCHED_EVICT
        | maps::DEV_EVICT
        | maps::DEV_GENERATION
        | maps::NET_GENERATION
        | maps::NET_GUARD_EVICT => Map::Array(data),
        maps::DEV_POLICY | maps::DEV_RULES | maps::NET_POLICY | maps::NET_RATE => {
            Map::HashMap(data)
        }
        maps::NET_RULES => Map::LpmTrie(data),
        maps::EVENTS => Map::RingBuf(data),
        _ => Map::PerCpuArray(data),
    };
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

/// The description a daemon leaves in its pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInfo {
    pub pid: u32,
    pub cgroup_root: PathBuf,
    pub attached: SystemTime,
}

impl DaemonInfo {
    /// Whether the daemon that wrote this is still running.
    #[must_use]
    pub fn is_alive(&self) -> bool {
        sys::pid_running(self.pid)
    }
}

fn decode_info(raw: &AgentInfo) -> DaemonInfo {
    use std::os::unix::ffi::OsStrExt as _;
    let len = (raw.cgroup_root_len as usize).min(AGENT_INFO_PATH_MAX);
    DaemonInfo {
        pid: raw.pid,
        cgroup_root: PathBuf::from(std::ffi::OsStr::from_bytes(&raw.cgroup_root[..len])),
        attached: UNIX_EPOCH + std::time::Duration::from_nanos(raw.attached_unix_ns),
    }
}

fn encode_info(info: &DaemonInfo) -> Result<AgentInfo, Error> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = info.cgroup_root.as_os_str().as_bytes();
    if bytes.len() > AGENT_INFO_PATH_MAX {
        return Err(Error::RootTooLong {
            path: info.cgroup_root.clone(),
        });
    }
    let mut raw = AgentInfo::EMPTY;
    raw.layout = LAYOUT_VERSION;
    raw.pid = info.pid;
    raw.attached_unix_ns = info.attached.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    });
    raw.cgroup_root_len = bytes.len() as u32;
    raw.cgroup_root[..bytes.len()].copy_from_slice(bytes);
    Ok(raw)
}

/// Reads the description of the daemon whose pins are at `pin_dir`, if any.
fn read_pinned_info(pin_dir: &Path) -> Result<Option<DaemonInfo>, Error> {
    if !bpffs::maps_dir(pin_dir).join(maps::AGENT_INFO).exists() {
        return Ok(None);
    }
    let info: Array<MapData, AgentInfo> = open_pinned(pin_dir, maps::AGENT_INFO)?;
    let raw = info.get(&0, 0).map_err(|source| Error::Map {
        name: maps::AGENT_INFO,
        source,
    })?;
    if raw.layout != LAYOUT_VERSION {
        return Err(Error::IncompatiblePins {
            pin_dir: pin_dir.into(),
            found: raw.layout,
        });
    }
    Ok(Some(decode_info(&raw)))
}

/// The maps of a running daemon, opened from its pins (for `agent stats` and
/// `agent top` next to a daemon).
pub fn open_pins(pin_dir: &Path) -> Result<(Maps, DaemonInfo), Error> {
    let info = read_pinned_info(pin_dir)?.ok_or_else(|| Error::NoDaemon {
        pin_dir: pin_dir.into(),
    })?;
    Ok((Maps::from_pins(pin_dir)?, info))
}

/// Whether a daemon's pins exist at `pin_dir`.
#[must_use]
pub fn pins_exist(pin_dir: &Path) -> bool {
    bpffs::maps_dir(pin_dir).join(maps::AGENT_INFO).exists()
}

/// How to load the programs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cgroup v2 directory to attach to (already validated).
    pub cgroup_root: PathBuf,
    /// Capacity of the overflow map (cgroups without a slot).
    pub max_cgroups: u32,
    /// Slots per CPU in use: a power of two, at most [`NET_SLOTS`].
    pub net_slots: u32,
    /// Pin everything here (the daemon), or nothing (`agent top` on its own).
    pub pin_dir: Option<PathBuf>,
    /// Attach the policy programs at the root (only with a policy file: they
    /// can deny).
    pub guards: Guards,
    /// Denial events per second per CPU (and burst).
    pub event_rate: u64,
}

/// The programs, loaded and attached. Dropping it detaches whatever is not
/// pinned; [`Attached::shutdown`] also removes the pins.
pub struct Attached {
    /// Keeps the programs and their unpinned links alive.
    _ebpf: Ebpf,
    /// Links we pinned (held open so the shutdown order is ours to choose).
    _pinned_links: Vec<PinnedLink>,
    /// Cgroup links (pinned or not): the last fd and pin going detaches.
    _links: Vec<OwnedFd>,
    info_map: Option<Array<MapData, AgentInfo>>,
    info: DaemonInfo,
    pin_dir: Option<PathBuf>,
}

/// Pins created during a start that has not finished: removed if it fails.
struct StartGuard {
    created: Vec<PathBuf>,
    pin_dir: Option<PathBuf>,
    armed: bool,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for path in self.created.iter().rev() {
            let _ = fs::remove_file(path);
        }
        if let Some(pin_dir) = &self.pin_dir {
            // Only empty directories go; a previous daemon's pins stay.
            for dir in [
                bpffs::maps_dir(pin_dir),
                bpffs::links_dir(pin_dir),
                pin_dir.clone(),
            ] {
                let _ = fs::remove_dir(dir);
            }
        }
    }
}

impl Attached {
    /// Loads the programs and attaches them at `options.cgroup_root`.
    ///
    /// With a pin directory that already holds the pins of a daemon that is
    /// gone (`--keep-pinned`, or a crash), this takes them over: the maps and
    /// their counts are reused, and each pinned cgroup link gets the new
    /// program atomically (BPF_LINK_UPDATE), so no packet goes uncounted or is
    /// counted twice across the restart.
    pub fn load(options: &Options) -> Result<(Self, Loaded), Error> {
        if !options.net_slots.is_power_of_two() || options.net_slots as usize > NET_SLOTS {
            return Err(Error::BadSlots {
                slots: options.net_slots,
            });
        }
        let mut previous = None;
        if let Some(pin_dir) = &options.pin_dir {
            bpffs::prepare_pin_dir(pin_dir)?;
            previous = read_pinned_info(pin_dir)?;
            if let Some(info) = &previous {
                if info.is_alive() && info.pid != std::process::id() {
                    return Err(Error::DaemonRunning {
                        pin_dir: pin_dir.clone(),
                        pid: info.pid,
                    });
                }
                if info.cgroup_root != options.cgroup_root {
                    return Err(Error::OtherRoot {
                        pin_dir: pin_dir.clone(),
                        pinned_root: info.cgroup_root.display().to_string(),
                        requested_root: options.cgroup_root.clone(),
                    });
                }
            }
        }
        let mut guard = StartGuard {
            created: Vec::new(),
            pin_dir: options.pin_dir.clone(),
            armed: true,
        };

        let (run_delay, exec) = task_offsets()?;
        let mut loader = EbpfLoader::new();
        // The task local storage map has no aya type; only the kernel uses it.
        loader.allow_unsupported_maps();
        loader.override_global(TASK_RUN_DELAY_OFFSET, &run_delay, true);
        loader.override_global(TASK_EXEC_OFFSET, &exec, true);
        loader.map_max_entries(maps::NET_OVERFLOW, options.max_cgroups);
        loader.map_max_entries(maps::SCHED_OVERFLOW, options.max_cgroups);
        let (root_level, root_id) = root_position(&options.cgroup_root)?;
        loader.override_global(SCHED_ROOT_LEVEL, &root_level, true);
        loader.override_global(SCHED_ROOT_ID, &root_id, true);
        let mask = u64::from(options.net_slots - 1);
        loader.override_global(NET_SLOT_MASK, &mask, true);
        loader.override_global(EVENT_RATE, &options.event_rate, true);
        // The policies this daemon writes are the ones its programs count.
        loader.override_global(GUARD_OWNER, &GUARD_OWNER_DAEMON, true);
        let map_pins: Vec<(&str, PathBuf)> = options
            .pin_dir
            .iter()
            .flat_map(|dir| maps::ALL.map(|name| (name, bpffs::maps_dir(dir).join(name))))
            .collect();
        // A fresh AGENT_INFO is pinned last, once everything else is pinned,
        // attached and described: readers take its pin to mean "ready".
        let mut info_pin = None;
        for (name, path) in &map_pins {
            if !path.exists() {
                if *name == maps::AGENT_INFO {
                    info_pin = Some(path.clone());
                    continue;
                }
                guard.created.push(path.clone());
            }
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| Error::Load { source })?;

        let cgroup = fs::File::open(&options.cgroup_root).map_err(|source| Error::OpenCgroup {
            path: options.cgroup_root.clone(),
            source,
        })?;
        let mut pinned_links = Vec::new();
        let mut links = Vec::new();
        for (name, attach_type) in NET_PROGRAMS {
            let program: &mut CgroupSkb = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| Error::LoadProgram { name, source })?;
            let fd = program
                .fd()
                .map_err(|source| Error::LoadProgram { name, source })?;
            let pin = options
                .pin_dir
                .as_ref()
                .map(|dir| bpffs::links_dir(dir).join(name));
            links.extend(attach_or_update(
                name,
                fd.as_fd(),
                &cgroup,
                &options.cgroup_root,
                attach_type,
                pin,
                &mut guard,
            )?);
        }
        for (name, attach_type) in GUARD_PROGRAMS {
            let pin = options
                .pin_dir
                .as_ref()
                .map(|dir| bpffs::links_dir(dir).join(name));
            if options.guards.wants(name) {
                let fd = load_guard(&mut ebpf, name)?;
                links.extend(attach_or_update(
                    name,
                    fd.as_fd(),
                    &cgroup,
                    &options.cgroup_root,
                    attach_type,
                    pin,
                    &mut guard,
                )?);
            } else if let Some(pin) = pin.filter(|pin| pin.exists()) {
                // A previous daemon enforced these policies; this one does not.
                fs::remove_file(&pin).map_err(|source| Error::Unpin {
                    pin_dir: pin,
                    source,
                })?;
            }
        }
        let kernel_btf = aya::Btf::from_sys_fs().map_err(|source| Error::Btf {
            source: Box::new(source),
        })?;
        for (name, btf) in RAW_TRACEPOINTS
            .map(|name| (name, false))
            .into_iter()
            .chain(BTF_TRACEPOINTS.map(|name| (name, true)))
        {
            let pin = options
                .pin_dir
                .as_ref()
                .map(|dir| bpffs::links_dir(dir).join(name));
            if let Some(pin) = pin.as_ref().filter(|pin| pin.exists()) {
                // Tracepoint links cannot be updated in place: the old program
                // goes before the new one comes, so the events in between are
                // not counted (rather than counted twice). A missed mkdir is
                // harmless: the collector walks the tree at start anyway.
                fs::remove_file(pin).map_err(|source| Error::Unpin {
                    pin_dir: pin.clone(),
                    source,
                })?;
            }
            let link = if btf {
                let program: &mut BtfTracePoint = program_mut(&mut ebpf, name)?;
                program
                    .load(name, &kernel_btf)
                    .map_err(|source| Error::LoadProgram { name, source })?;
                let id = program.attach().map_err(|source| Error::AttachTracepoint {
                    name,
                    tracepoint: name,
                    source,
                })?;
                pin.as_ref()
                    .map(|_| program.take_link(id).map(FdLink::from))
                    .transpose()
                    .map_err(|source| Error::LoadProgram { name, source })?
            } else {
                let program: &mut RawTracePoint = program_mut(&mut ebpf, name)?;
                program
                    .load()
                    .map_err(|source| Error::LoadProgram { name, source })?;
                let id = program
                    .attach(name)
                    .map_err(|source| Error::AttachTracepoint {
                        name,
                        tracepoint: name,
                        source,
                    })?;
                pin.as_ref()
                    .map(|_| program.take_link(id).map(FdLink::from))
                    .transpose()
                    .map_err(|source| Error::LoadProgram { name, source })?
            };
            if let (Some(pin), Some(link)) = (pin, link) {
                pinned_links.push(pin_link(link, &pin, name, &mut guard)?);
            }
        }

        let loaded = Loaded {
            counters: Maps::from_ebpf(&mut ebpf)?,
            devices: DeviceMaps::from_ebpf(&mut ebpf)?,
            network: NetworkMaps::from_ebpf(&mut ebpf)?,
            events: take_map(&mut ebpf, maps::EVENTS)?,
        };
        let info = DaemonInfo {
            pid: std::process::id(),
            cgroup_root: options.cgroup_root.clone(),
            attached: previous.map_or_else(SystemTime::now, |previous| previous.attached),
        };
        let mut info_map = None;
        if options.pin_dir.is_some() {
            let mut map: Array<MapData, AgentInfo> = take_map(&mut ebpf, maps::AGENT_INFO)?;
            map.set(0, encode_info(&info)?, 0)
                .map_err(|source| Error::Map {
                    name: maps::AGENT_INFO,
                    source,
                })?;
            if let Some(path) = info_pin {
                map.pin(&path).map_err(|source| Error::Pin {
                    what: maps::AGENT_INFO,
                    path: path.clone(),
                    source: Box::new(source),
                })?;
                guard.created.push(path);
                map = open_pinned(
                    options.pin_dir.as_deref().unwrap_or(Path::new("/")),
                    maps::AGENT_INFO,
                )?;
            }
            info_map = Some(map);
        }
        guard.armed = false;
        Ok((
            Self {
                _ebpf: ebpf,
                _pinned_links: pinned_links,
                _links: links,
                info_map,
                info,
                pin_dir: options.pin_dir.clone(),
            },
            loaded,
        ))
    }

    /// What this process recorded about itself.
    #[must_use]
    pub const fn info(&self) -> &DaemonInfo {
        &self.info
    }

    /// Stops: with `keep_pinned` the programs stay attached through their
    /// pins (and keep counting) for the next daemon to take over; otherwise
    /// the pins are removed and the programs detach.
    pub fn shutdown(mut self, keep_pinned: bool) -> Result<(), Error> {
        let Some(pin_dir) = self.pin_dir.take() else {
            return Ok(());
        };
        if keep_pinned {
            if let Some(map) = self.info_map.as_mut() {
                let gone = DaemonInfo {
                    pid: 0,
                    ..self.info.clone()
                };
                map.set(0, encode_info(&gone)?, 0)
                    .map_err(|source| Error::Map {
                        name: maps::AGENT_INFO,
                        source,
                    })?;
            }
            return Ok(());
        }
        bpffs::remove_pin_dir(&pin_dir).map_err(|source| Error::Unpin { pin_dir, source })
        // Dropping self closes the last link fds: the programs detach.
    }
}

/// Loads policy program `name` and returns its fd.
fn load_guard(ebpf: &mut Ebpf, name: &'static str) -> Result<OwnedFd, Error> {
    let fd = if name == programs::DEV_GUARD {
        let program: &mut CgroupDevice = program_mut(ebpf, name)?;
        program
            .load()
            .map_err(|source| Error::LoadProgram { name, source })?;
        program
            .fd()
            .and_then(|fd| Ok(fd.as_fd().try_clone_to_owned()?))
    } else if name == programs::NET_GUARD_CONNECT4 || name == programs::NET_GUARD_CONNECT6 {
        let program: &mut CgroupSockAddr = program_mut(ebpf, name)?;
        program
            .load()
            .map_err(|source| Error::LoadProgram { name, source })?;
        program
            .fd()
            .and_then(|fd| Ok(fd.as_fd().try_clone_to_owned()?))
    } else {
        let program: &mut CgroupSkb = program_mut(ebpf, name)?;
        program
            .load()
            .map_err(|source| Error::LoadProgram { name, source })?;
        program
            .fd()
            .and_then(|fd| Ok(fd.as_fd().try_clone_to_owned()?))
    };
    fd.map_err(|source| Error::LoadProgram { name, source })
}

/// The policy programs attached to one workload's cgroup by `agent run`:
/// they stay attached for as long as this value lives.
pub struct WorkloadGuard {
    _ebpf: Ebpf,
    _links: Vec<OwnedFd>,
}

/// Maps the policy programs attached by `agent run` share with a running
/// daemon, so that their counts and events show in `agent stats` and
/// `agent events`.
const POLICY_MAPS: [&str; 16] = [
    maps::DEV_POLICY,
    maps::DEV_RULES,
    maps::DEV_GENERATION,
    maps::NET_GENERATION,
    maps::DEV_SLOTS,
    maps::DEV_COUNTS,
    maps::DEV_EVICT,
    maps::EVENTS,
    maps::EVENT_BUCKET,
    maps::NET_POLICY,
    maps::NET_RULES,
    maps::NET_RATE,
    maps::NET_DROPS,
    maps::NET_HITS,
    maps::NET_GUARD_SLOTS,
    maps::NET_GUARD_EVICT,
];

/// Which cgroup the device program of [`guard_workload_with`] counts an
/// access under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceUnit {
    /// The workload's cgroup, for every task under it: what `agent run`
    /// loads. The program does not ask the kernel for the task's cgroup.
    Workload,
    /// Each task's own cgroup, asked of the kernel, as the daemon's program
    /// does (`cargo xtask bench dev` compares the two).
    EachCgroup,
}

/// Attaches the policy programs `guards` asks for to `cgroup` (a v2
/// directory this process created) for `agent run`. With a daemon's pins at
/// `pin_dir`, the programs use the daemon's maps; otherwise maps of their own.
pub fn guard_workload(
    cgroup: &Path,
    pin_dir: Option<&Path>,
    guards: Guards,
) -> Result<(WorkloadGuard, DeviceMaps, NetworkMaps), Error> {
    guard_workload_with(cgroup, pin_dir, guards, DeviceUnit::Workload)
}

/// [`guard_workload`], with the device program counting under `unit`.
pub fn guard_workload_with(
    cgroup: &Path,
    pin_dir: Option<&Path>,
    guards: Guards,
    unit: DeviceUnit,
) -> Result<(WorkloadGuard, DeviceMaps, NetworkMaps), Error> {
    let mut loader = EbpfLoader::new();
    loader.allow_unsupported_maps();
    // These programs count the workload's own policy; a daemon's programs,
    // which may run for the same accesses, count the daemon's.
    let cgroup_id = fs::metadata(cgroup)
        .map(|meta| std::os::unix::fs::MetadataExt::ino(&meta))
        .map_err(|source| Error::OpenCgroup {
            path: cgroup.into(),
            source,
        })?;
    loader.override_global(GUARD_OWNER, &cgroup_id, true);
    if unit == DeviceUnit::Workload {
        loader.override_global(DEV_UNIT, &cgroup_id, true);
    }
    let shared_dir = pin_dir.filter(|dir| pins_exist(dir));
    if let Some(dir) = shared_dir {
        // A daemon of another layout: refuse, rather than misread its maps.
        read_pinned_info(dir)?;
    }
    let shared: Vec<(&str, PathBuf)> = shared_dir
        .map(|dir| {
            POLICY_MAPS
                .map(|name| (name, bpffs::maps_dir(dir).join(name)))
                .to_vec()
        })
        .unwrap_or_default();
    for (name, path) in &shared {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|source| Error::Load { source })?;
    let dir = fs::File::open(cgroup).map_err(|source| Error::OpenCgroup {
        path: cgroup.into(),
        source,
    })?;
    let mut links = Vec::new();
    for (name, attach_type) in GUARD_PROGRAMS {
        if !guards.wants(name) {
            continue;
        }
        let fd = load_guard(&mut ebpf, name)?;
        let link = sys::link_create(fd.as_fd(), dir.as_fd(), attach_type).map_err(|source| {
            Error::AttachCgroup {
                name,
                cgroup: cgroup.into(),
                source: Box::new(source),
            }
        })?;
        links.push(link);
    }
    let devices = DeviceMaps::from_ebpf(&mut ebpf)?;
    let network = NetworkMaps::from_ebpf(&mut ebpf)?;
    Ok((
        WorkloadGuard {
            _ebpf: ebpf,
            _links: links,
        },
        devices,
        network,
    ))
}

/// Where this kernel keeps `task_struct.sched_info.run_delay` and
/// `task_struct.se.sum_exec_runtime`.
fn task_offsets() -> Result<(u64, u64), Error> {
    let btf = crate::btf::Btf::from_sys_fs().map_err(|source| Error::Btf {
        source: Box::new(source),
    })?;
    let offset = |path: &[&str]| -> Result<u64, Error> {
        let (offset, size) =
            btf.member_offset("task_struct", path)
                .map_err(|source| Error::Btf {
                    source: Box::new(source),
                })?;
        if size != 8 {
            return Err(Error::Btf {
                source: format!("task_struct.{} is not 8 bytes", path.join(".")).into(),
            });
        }
        Ok(offset as u64)
    };
    Ok((
        offset(&["sched_info", "run_delay"])?,
        offset(&["se", "sum_exec_runtime"])?,
    ))
}

/// The level of `root` in the v2 hierarchy (0 for its mount point) and its id.
fn root_position(root: &Path) -> Result<(u64, u64), Error> {
    let id = crate::cgroup::cgroup_id(root).map_err(|source| Error::OpenCgroup {
        path: root.into(),
        source: io::Error::other(source.to_string()),
    })?;
    let mount = fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| crate::cgroup::find_v2_mount(&text))
        .and_then(|mount| fs::canonicalize(mount).ok());
    let level = mount
        .and_then(|mount| {
            root.strip_prefix(mount)
                .ok()
                .map(|rest| rest.components().count())
        })
        .unwrap_or(0);
    Ok((level as u64, id))
}

/// Attaches program `name` to `cgroup` through a bpf_link pinned at `pin`
/// (kept by the caller when there is no pin), or, when a previous daemon's
/// link is pinned there, swaps this program into it atomically
/// (BPF_LINK_UPDATE): every packet or access meets the old program or the
/// new, never neither, never both. Returns the new link's fd, if any.
fn attach_or_update(
    name: &'static str,
    program: BorrowedFd<'_>,
    cgroup: &fs::File,
    cgroup_path: &Path,
    attach_type: u32,
    pin: Option<PathBuf>,
    guard: &mut StartGuard,
) -> Result<Option<OwnedFd>, Error> {
    if let Some(pin) = pin.as_ref().filter(|pin| pin.exists()) {
        let link = sys::obj_get(pin).map_err(|source| Error::LinkUpdate {
            path: pin.clone(),
            source,
        })?;
        sys::link_update(link.as_fd(), program).map_err(|source| Error::LinkUpdate {
            path: pin.clone(),
            source,
        })?;
        return Ok(None);
    }
    // Through bpf_link a cgroup attachment is always multi-attach: it stacks
    // with other programs (a container runtime's) and never replaces them.
    let link = sys::link_create(program, cgroup.as_fd(), attach_type).map_err(|source| {
        Error::AttachCgroup {
            name,
            cgroup: cgroup_path.into(),
            source: Box::new(source),
        }
    })?;
    if let Some(pin) = pin {
        sys::obj_pin(link.as_fd(), &pin).map_err(|source| Error::Pin {
            what: name,
            path: pin.clone(),
            source: Box::new(source),
        })?;
        guard.created.push(pin);
    }
    Ok(Some(link))
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram { name })?;
    program
        .try_into()
        .map_err(|source| Error::LoadProgram { name, source })
}

fn pin_link(
    link: FdLink,
    pin: &Path,
    name: &'static str,
    guard: &mut StartGuard,
) -> Result<PinnedLink, Error> {
    let pinned = link.pin(pin).map_err(|source| Error::Pin {
        what: name,
        path: pin.into(),
        source: Box::new(source),
    })?;
    guard.created.push(pin.into());
    Ok(pinned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_info_round_trips_through_the_map_layout() {
        let info = DaemonInfo {
            pid: 4242,
            cgroup_root: PathBuf::from("/sys/fs/cgroup/unified/some where"),
            attached: UNIX_EPOCH + std::time::Duration::from_nanos(1_700_000_000_123_456_789),
        };
        let raw = encode_info(&info).unwrap();
        assert_eq!(raw.layout, LAYOUT_VERSION);
        assert_eq!(decode_info(&raw), info);
    }

    #[test]
    fn a_root_longer_than_path_max_is_refused() {
        let info = DaemonInfo {
            pid: 1,
            cgroup_root: PathBuf::from("/".repeat(AGENT_INFO_PATH_MAX + 1)),
            attached: UNIX_EPOCH,
        };
        assert!(matches!(encode_info(&info), Err(Error::RootTooLong { .. })));
    }
}

//! Layouts and names shared by the kernel programs (`ebpf`) and the userspace
//! agent. Everything here is `#[repr(C)]` with explicit padding and integer
//! flags (never `bool`), so both sides agree byte for byte.
//!
//! The `user` feature adds `aya::Pod` impls for userspace.
#![no_std]

pub mod devices;
pub mod events;
pub mod net;
pub mod netpolicy;
pub mod sched;

pub use net::{NetCounters, NetSlot, NetSlotTable, NET_SLOTS};
pub use sched::{
    SchedCounters, SchedSlot, SchedSlotTable, TaskState, LATENCY_BUCKETS, SCHED_SLOTS,
};

/// Owner of a slot being handed from a removed cgroup to a new one (slot
/// tables of every kind).
pub const SLOT_RECLAIMING: u64 = u64::MAX;

/// Bumped whenever a map's key or value layout changes. The daemon records it
/// in [`AgentInfo::layout`]; a reader built with another layout refuses the
/// daemon's pins instead of misreading them.
pub const LAYOUT_VERSION: u32 = 8;

/// Default capacity of the overflow map: how many cgroups without a slot of
/// their own can be counted at once. Overridden at load time with `--max-cgroups`.
pub const DEFAULT_MAX_CGROUPS: u32 = 8192;

/// Names of the maps, as declared in `ebpf` and pinned under `<pin-dir>/maps/`.
pub mod maps {
    /// Per-CPU array of one [`crate::NetSlotTable`]: the fast path.
    pub const NET_SLOTS: &str = "NET_SLOTS";
    /// Per-CPU hash: cgroup id (u64) → [`crate::NetCounters`], for cgroups
    /// whose slot another cgroup holds, and for nested egress.
    pub const NET_OVERFLOW: &str = "NET_OVERFLOW";
    /// Array of [`crate::NET_SLOTS`] u64: userspace posts the id of a removed
    /// cgroup at its slot index, and the kernel hands such a slot to the
    /// next cgroup that needs it.
    pub const NET_EVICT: &str = "NET_EVICT";
    /// Per-CPU array of one [`crate::NetCounters`]: traffic that could not be
    /// counted because `NET_OVERFLOW` was full.
    pub const NET_UNCOUNTED: &str = "NET_UNCOUNTED";
    /// Per-CPU array of one u64: incremented on every cgroup mkdir, rmdir and
    /// rename, so userspace re-walks the cgroup tree only when it changed.
    pub const CGROUP_GENERATION: &str = "CGROUP_GENERATION";
    /// Array of one [`crate::AgentInfo`], written by the daemon at start.
    pub const AGENT_INFO: &str = "AGENT_INFO";
    /// Per-CPU array of one [`crate::SchedSlotTable`].
    pub const SCHED_SLOTS: &str = "SCHED_SLOTS";
    /// Per-CPU hash: cgroup id → [`crate::SchedCounters`], for cgroups whose
    /// sched slot another cgroup holds.
    pub const SCHED_OVERFLOW: &str = "SCHED_OVERFLOW";
    /// Array of [`crate::SCHED_SLOTS`] u64, as `NET_EVICT` for sched slots.
    pub const SCHED_EVICT: &str = "SCHED_EVICT";
    /// Per-CPU array of one [`crate::SchedCounters`]: what `SCHED_OVERFLOW`
    /// had no room for.
    pub const SCHED_UNCOUNTED: &str = "SCHED_UNCOUNTED";
    /// Task local storage of [`crate::TaskState`] (only the kernel reads it).
    pub const SCHED_TASKS: &str = "SCHED_TASKS";
    /// Hash: cgroup id → [`crate::devices::DevPolicyRef`].
    pub const DEV_POLICY: &str = "DEV_POLICY";
    /// Hash: [`crate::devices::DevKey`] → allowed access bits (u32).
    pub const DEV_RULES: &str = "DEV_RULES";
    /// Per-CPU array of one [`crate::devices::DevSlotTable`].
    pub const DEV_SLOTS: &str = "DEV_SLOTS";
    /// Array of [`crate::devices::DEV_SLOTS`] u64, as `NET_EVICT` for device slots.
    pub const DEV_EVICT: &str = "DEV_EVICT";
    /// Per-CPU hash: cgroup id → [`crate::devices::DevCounters`], for cgroups
    /// whose device slot another cgroup holds.
    pub const DEV_COUNTS: &str = "DEV_COUNTS";
    /// Array of one u64, changed (to a random value) after every change of
    /// `DEV_POLICY`: the device program's cached answers of another
    /// generation are stale.
    pub const DEV_GENERATION: &str = "DEV_GENERATION";
    /// As `DEV_GENERATION`, for `NET_POLICY`.
    pub const NET_GENERATION: &str = "NET_GENERATION";
    /// Ring buffer of [`crate::events::Event`].
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU array of one [`crate::events::Bucket`].
    pub const EVENT_BUCKET: &str = "EVENT_BUCKET";
    /// Hash: cgroup id → [`crate::netpolicy::NetPolicyRef`].
    pub const NET_POLICY: &str = "NET_POLICY";
    /// LPM trie: [`crate::netpolicy::NetRuleKey`] → [`crate::netpolicy::NetRuleSet`].
    pub const NET_RULES: &str = "NET_RULES";
    /// Hash: [`crate::netpolicy::RateKey`] → [`crate::netpolicy::RateState`].
    pub const NET_RATE: &str = "NET_RATE";
    /// Per-CPU array of one [`crate::netpolicy::GuardSlotTable`].
    pub const NET_GUARD_SLOTS: &str = "NET_GUARD_SLOTS";
    /// Array of [`crate::netpolicy::GUARD_SLOTS`] u64, as `NET_EVICT` for guard slots.
    pub const NET_GUARD_EVICT: &str = "NET_GUARD_EVICT";
    /// Per-CPU hash: cgroup id → [`crate::netpolicy::NetDrops`].
    pub const NET_DROPS: &str = "NET_DROPS";
    /// Per-CPU hash: [`crate::netpolicy::HitKey`] → [`crate::netpolicy::Hits`].
    pub const NET_HITS: &str = "NET_HITS";

    /// Every map, in the order they are pinned.
    pub const ALL: [&str; 27] = [
        NET_SLOTS,
        NET_OVERFLOW,
        NET_EVICT,
        NET_UNCOUNTED,
        CGROUP_GENERATION,
        AGENT_INFO,
        SCHED_SLOTS,
        SCHED_OVERFLOW,
        SCHED_EVICT,
        SCHED_UNCOUNTED,
        SCHED_TASKS,
        DEV_POLICY,
        DEV_RULES,
        DEV_SLOTS,
        DEV_COUNTS,
        DEV_EVICT,
        EVENTS,
        EVENT_BUCKET,
        NET_POLICY,
        NET_RULES,
        NET_RATE,
        NET_DROPS,
        NET_HITS,
        NET_GUARD_SLOTS,
        NET_GUARD_EVICT,
        DEV_GENERATION,
        NET_GENERATION,
    ];
}

/// Names of the programs (their function names in `ebpf`).
pub mod programs {
    /// cgroup_skb/ingress: counts received bytes and packets per cgroup.
    pub const NET_INGRESS: &str = "net_ingress";
    /// cgroup_skb/egress: counts sent bytes and packets per cgroup.
    pub const NET_EGRESS: &str = "net_egress";
    /// cgroup_skb that only allows: the baseline of `cargo xtask bench net`.
    pub const NET_EMPTY: &str = "net_empty";
    /// Raw tracepoints that bump `CGROUP_GENERATION`.
    pub const CGROUP_MKDIR: &str = "cgroup_mkdir";
    pub const CGROUP_RMDIR: &str = "cgroup_rmdir";
    pub const CGROUP_RENAME: &str = "cgroup_rename";
    /// BTF tracepoints of the scheduler accounting (named as their tracepoints).
    pub const SCHED_SWITCH: &str = "sched_switch";
    /// The tick: charges the CPU time of a task that runs without switching.
    pub const SCHED_TICK: &str = "hrtimer_expire_entry";
    pub const TASK_NEWTASK: &str = "task_newtask";
    pub const SCHED_PROCESS_EXIT: &str = "sched_process_exit";
    /// cgroup_device: enforces device policies (attached only where asked).
    pub const DEV_GUARD: &str = "dev_guard";
    /// cgroup_device that allows everything: the baseline of `cargo xtask bench dev`.
    pub const DEV_EMPTY: &str = "dev_empty";
    /// Asks for the task's cgroup id and allows: the least a per-cgroup
    /// device program does (a baseline of `cargo xtask bench dev`).
    pub const DEV_CGROUP_ID: &str = "dev_cgroup_id";
    /// cgroup_skb egress and ingress: enforce network policies (attached
    /// only where asked: they can drop).
    pub const NET_GUARD_EGRESS: &str = "net_guard_egress";
    pub const NET_GUARD_INGRESS: &str = "net_guard_ingress";
    /// cgroup/connect4 and connect6: refuse a `connect()` the egress rules
    /// deny with EPERM, at once, rather than let TCP retry a dropped SYN.
    pub const NET_GUARD_CONNECT4: &str = "net_guard_connect4";
    pub const NET_GUARD_CONNECT6: &str = "net_guard_connect6";
    /// Empty programs on the same tracepoints (tracepoint, program), the
    /// baseline of `cargo xtask bench sched`.
    pub const SCHED_EMPTY: [(&str, &str); 4] = [
        (SCHED_SWITCH, "sched_empty_switch"),
        (SCHED_TICK, "sched_empty_tick"),
        (TASK_NEWTASK, "sched_empty_newtask"),
        (SCHED_PROCESS_EXIT, "sched_empty_exit"),
    ];
}

/// Name of the global (in `.rodata`) holding the slot index mask, a power of
/// two minus one no larger than `NET_SLOTS - 1`. Tests shrink it to force
/// collisions onto the overflow path.
pub const NET_SLOT_MASK: &str = "NET_SLOT_MASK";

/// Names of the globals (in `.rodata`) telling the sched programs which
/// cgroups to count: the watched root's level in the v2 hierarchy and its id.
pub const SCHED_ROOT_LEVEL: &str = "SCHED_ROOT_LEVEL";
pub const SCHED_ROOT_ID: &str = "SCHED_ROOT_ID";
/// Name of the global holding the offset of `task_struct.sched_info.run_delay`.
pub const TASK_RUN_DELAY_OFFSET: &str = "TASK_RUN_DELAY_OFFSET";
/// Name of the global (in `.rodata`) holding the offset of
/// `task_struct.se.sum_exec_runtime`, from the kernel's BTF.
pub const TASK_EXEC_OFFSET: &str = "TASK_EXEC_OFFSET";

/// Name of the global (in `.rodata`) telling a policy program which
/// accesses it counts, reports and charges rate caps for:
/// [`GUARD_OWNER_DAEMON`] in the daemon (policies it wrote), the workload's
/// cgroup id in `agent run` (that cgroup's policy). Every attached program
/// enforces.
pub const GUARD_OWNER: &str = "GUARD_OWNER";
/// [`GUARD_OWNER`] of the daemon's programs.
pub const GUARD_OWNER_DAEMON: u64 = u64::MAX;

/// Name of the global (in `.rodata`) naming the cgroup the device program
/// polices and counts as one unit: `agent run`'s workload cgroup, for every
/// task under it, so that the program need not ask the kernel for the
/// task's cgroup. 0 (the daemon's): each task's own cgroup.
pub const DEV_UNIT: &str = "DEV_UNIT";

/// Name of the global with the event rate limit, in events per second per
/// CPU (also the burst).
pub const EVENT_RATE: &str = "EVENT_RATE";
/// Default of [`EVENT_RATE`].
pub const DEFAULT_EVENT_RATE: u64 = 100;

/// Longest cgroup root path [`AgentInfo`] can record (PATH_MAX).
pub const AGENT_INFO_PATH_MAX: usize = 4096;

/// What a running daemon records about itself in the `AGENT_INFO` map, so that
/// `agent stats` and `agent top` can read its pins without being told how it
/// was started.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AgentInfo {
    /// [`LAYOUT_VERSION`] of the daemon that created the maps.
    pub layout: u32,
    /// Process id of the daemon; 0 when no daemon owns the pins any more
    /// (left behind with `--keep-pinned`).
    pub pid: u32,
    /// When the programs were first attached, in ns since the Unix epoch.
    pub attached_unix_ns: u64,
    /// Length of `cgroup_root` in bytes.
    pub cgroup_root_len: u32,
    pub _pad: u32,
    /// The cgroup v2 directory the programs are attached to (not NUL-terminated).
    pub cgroup_root: [u8; AGENT_INFO_PATH_MAX],
}

impl AgentInfo {
    pub const EMPTY: Self = Self {
        layout: 0,
        pid: 0,
        attached_unix_ns: 0,
        cgroup_root_len: 0,
        _pad: 0,
        cgroup_root: [0; AGENT_INFO_PATH_MAX],
    };
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays with explicit padding.
    unsafe impl aya::Pod for crate::NetCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::AgentInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::NetSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::NetSlotTable {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::SchedCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::SchedSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::SchedSlotTable {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::TaskState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::devices::DevPolicyRef {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::devices::DevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::devices::DevCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::devices::DevSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::devices::DevSlotTable {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::events::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::events::Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::netpolicy::NetPolicyRef {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::netpolicy::NetRuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::netpolicy::NetRuleSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::netpolicy::RateKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::netpolicy::RateState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::netpolicy::NetDrops {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::netpolicy::HitKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::netpolicy::Hits {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::netpolicy::GuardSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::netpolicy::GuardSlotTable {}
}

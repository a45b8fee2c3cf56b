//! Device policy: the kernel's cgroup_device request encoding, and the maps'
//! keys and values.

/// `bpf_cgroup_dev_ctx.access_type & 0xffff`: block or char (BPF_DEVCG_DEV_*).
pub const TYPE_BLOCK: u32 = 1;
pub const TYPE_CHAR: u32 = 2;
/// `bpf_cgroup_dev_ctx.access_type >> 16` bits (BPF_DEVCG_ACC_*).
pub const ACCESS_MKNOD: u8 = 1;
pub const ACCESS_READ: u8 = 2;
pub const ACCESS_WRITE: u8 = 4;
/// A major or minor of `*` in the rule table.
pub const DEV_ANY: u32 = u32::MAX;

/// The policy in force for a cgroup (`DEV_POLICY`, by cgroup id). Rules of a
/// policy version are never changed in place: a change writes a new version
/// and then swaps this one value, so that every access sees either the old
/// rules or the new, whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevPolicyRef {
    pub version: u32,
    /// [`OWNER_DAEMON`] or [`OWNER_RUN`]: who set it, and may change it.
    pub owner: u32,
}

/// Set by the daemon from the policy file.
pub const OWNER_DAEMON: u32 = 1;
/// Set by `agent run --device` for its workload.
pub const OWNER_RUN: u32 = 2;

/// A `DEV_RULES` key: allowed access bits of a device under a policy version.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DevKey {
    pub version: u32,
    pub dev_type: u32,
    pub major: u32,
    pub minor: u32,
}

/// Slots in the per-CPU device slot table (see [`DevSlotTable`]).
pub const DEV_SLOTS: usize = 256;

/// One cgroup's device counters on one CPU, as slot `id & (DEV_SLOTS - 1)`,
/// and the program's last answer for it on that CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevSlot {
    /// Owner: a cgroup id, 0 for a free slot, or [`crate::SLOT_RECLAIMING`].
    pub cgroup_id: u64,
    pub counters: DevCounters,
    /// Kept by the program only (userspace never reads it).
    pub answer: DevAnswer,
}

/// The program's last answer for a cgroup on one CPU: its policy's access
/// bits to the device it last asked about, valid while the policy
/// generation is the same. Guarded by a sequence count, odd while a write
/// is under way (see ebpf/src/cache.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevAnswer {
    pub seq: u64,
    /// The cgroup it was computed for: a slot handed to another cgroup
    /// keeps the old owner's answer, which then never matches.
    pub cgroup_id: u64,
    /// `DEV_GENERATION` when it was computed.
    pub generation: u64,
    /// `major << 32 | minor` of the device.
    pub device: u64,
    /// Who counts the cgroup's accesses (see `GUARD_OWNER`): the
    /// program whose key this is.
    pub counter: u64,
    /// Its type ([`TYPE_CHAR`], [`TYPE_BLOCK`]; 0 before the first answer).
    pub dev_type: u32,
    /// The access bits the policy allows it, or [`DEV_NO_POLICY`].
    pub bits: u32,
}

/// [`DevAnswer::bits`] of a cgroup without a policy: allowed everything,
/// whatever the device, and not counted.
pub const DEV_NO_POLICY: u32 = 1 << 31;

/// Every device slot of one CPU (20 KiB): a decision reads the cgroup's
/// last answer and adds to its counters one array element and an offset
/// away, with no hash lookup. Cgroups whose slot another holds count in
/// `DEV_COUNTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DevSlotTable {
    pub slots: [DevSlot; DEV_SLOTS],
}

/// Per cgroup and CPU (`DEV_SLOTS`, else `DEV_COUNTS`): device accesses decided.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevCounters {
    pub allowed: u64,
    pub denied: u64,
    /// Denials whose event the rate limit held back.
    pub suppressed: u64,
}

impl DevCounters {
    pub const ZERO: Self = Self {
        allowed: 0,
        denied: 0,
        suppressed: 0,
    };

    #[must_use]
    pub const fn plus(self, other: Self) -> Self {
        Self {
            allowed: self.allowed.saturating_add(other.allowed),
            denied: self.denied.saturating_add(other.denied),
            suppressed: self.suppressed.saturating_add(other.suppressed),
        }
    }
}

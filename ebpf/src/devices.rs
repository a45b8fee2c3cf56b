//! Device policy: a cgroup_device program that looks up the policy of the
//! current task's cgroup (or of the workload it is under, in `agent run`'s
//! copy) and its rules in maps. It is attached once (at the
//! watched root by the daemon, or at a workload's cgroup by `agent run`), and
//! however often policies change, only the maps change: never a stack of
//! programs.
//!
//! A cgroup without a policy of its own has its nearest ancestor's (a
//! policy covers its subtree); one with neither is allowed everything (and
//! not counted). `agent run`'s program polices its workload's subtree as one
//! unit ([`DEV_UNIT`]): every task under the workload's cgroup is counted
//! there, so the program does not ask the kernel for the task's cgroup. The
//! rule table is compiled by userspace (see agent/src/policy/devices.rs) so
//! that the answer is one exact lookup, falling back to `major:*`, `*:minor`
//! and `*:*` for numbers no rule names.
//!
//! This is on the path of every open of a device node by every task under
//! the attach point, so the common case is kept to one per-CPU array element:
//! the cgroup's slot holds its counters and its last answer on this CPU (the
//! access bits its policy gives the device it last asked about, or "no
//! policy"). The same cgroup asking about the same device again, under the
//! same policy generation (see [`crate::cache`]), does no hash lookup; an
//! allowed access then costs the slot's lookup, a few compares and one
//! atomic add. Everything else takes [`decide`].

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    macros::{cgroup_device, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::DeviceContext,
    Global,
};
use common::{
    devices::{
        DevCounters, DevKey, DevPolicyRef, DevSlot, DevSlotTable, DEV_ANY, DEV_NO_POLICY, DEV_SLOTS,
    },
    events::{Event, EVENT_DEVICE_DENIED},
    DEFAULT_MAX_CGROUPS,
};
use core::ptr::{read_volatile, write_volatile};

use crate::{
    cache, cgroup, events, owner,
    slots::{self, atomic_add, Slot},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
/// Compiled rule entries of every policy version in force (and the previous
/// ones until userspace drops them).
const MAX_RULE_ENTRIES: u32 = 65_536;

#[map(name = "DEV_POLICY")]
static DEV_POLICY: HashMap<u64, DevPolicyRef> =
    HashMap::with_max_entries(DEFAULT_MAX_CGROUPS, BPF_F_NO_PREALLOC);

#[map(name = "DEV_RULES")]
static DEV_RULES: HashMap<DevKey, u32> = HashMap::with_max_entries(MAX_RULE_ENTRIES, 0);

#[map(name = "DEV_SLOTS")]
static DEV_SLOTS_MAP: PerCpuArray<DevSlotTable> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "DEV_EVICT")]
static DEV_EVICT: Array<u64> = Array::with_max_entries(DEV_SLOTS as u32, 0);

/// Changed by userspace (to a value never used before) after every change
/// of `DEV_POLICY`: answers cached under another generation are stale.
#[map(name = "DEV_GENERATION")]
static DEV_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// The cgroup this program polices and counts as one unit, set by the
/// loader: `agent run`'s workload cgroup (the program is attached there, so
/// every task it runs for is under it). 0 (the daemon's): each task's own
/// cgroup, from `bpf_get_current_cgroup_id`. A constant of the loaded
/// program: the verifier drops the branch not taken.
#[unsafe(no_mangle)]
static DEV_UNIT: Global<u64> = Global::new(0);

#[map(name = "DEV_COUNTS")]
static DEV_COUNTS: PerCpuHashMap<u64, DevCounters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_CGROUPS, 0);

// SAFETY: DevSlotTable is #[repr(C)] with its DEV_SLOTS slots first.
unsafe impl slots::Table for DevSlotTable {
    type Slot = DevSlot;
    const LEN: usize = DEV_SLOTS;
}

// SAFETY: DevSlot is #[repr(C)] with its owner first.
unsafe impl Slot for DevSlot {
    unsafe fn clear(this: *mut Self) {
        // SAFETY: the trait's contract.
        unsafe { write_volatile(&raw mut (*this).counters, DevCounters::ZERO) }
    }
}

#[inline(always)]
fn allowed(version: u32, dev_type: u32, major: u32, minor: u32) -> u32 {
    for (major, minor) in [
        (major, minor),
        (major, DEV_ANY),
        (DEV_ANY, minor),
        (DEV_ANY, DEV_ANY),
    ] {
        // SAFETY: plain data read.
        if let Some(bits) = unsafe {
            DEV_RULES.get(&DevKey {
                version,
                dev_type,
                major,
                minor,
            })
        } {
            return *bits;
        }
    }
    // A compiled policy always has `*:*`; a policy being removed allows nothing.
    0
}

/// The counters of `cgroup_id` when no slot of this CPU is free for it.
#[inline(never)]
fn overflow(cgroup_id: u64) -> Option<*mut DevCounters> {
    if let Some(counters) = DEV_COUNTS.get_ptr_mut(cgroup_id) {
        return Some(counters);
    }
    let _ = DEV_COUNTS.insert(cgroup_id, DevCounters::ZERO, 0);
    DEV_COUNTS.get_ptr_mut(cgroup_id)
}

/// Adds one to a counter (atomic: cgroup_device runs in process context,
/// where another task's program can preempt it on this CPU).
#[inline(always)]
fn count(counters: Option<*mut DevCounters>, field: fn(*mut DevCounters) -> *mut u64) {
    if let Some(counters) = counters {
        // SAFETY: a map value of this CPU.
        unsafe { atomic_add(field(counters), 1) };
    }
}

/// The access bits (or [`DEV_NO_POLICY`]) that `slot`'s last answer gives
/// `cgroup_id` for the device, and who counts them, if that answer is for
/// this device (or for every device) under this generation.
///
/// # Safety
/// `slot` is a slot of this CPU's table.
#[inline(always)]
unsafe fn remembered(
    slot: *mut DevSlot,
    cgroup_id: u64,
    generation: u64,
    dev_type: u32,
    device: u64,
) -> Option<(u32, u64)> {
    // SAFETY (whole block): the caller's contract; read field by field
    // (volatile) between two reads of the sequence count.
    unsafe {
        let answer = &raw mut (*slot).answer;
        let seq = cache::read_begin(&raw const (*answer).seq)?;
        let bits = read_volatile(&raw const (*answer).bits);
        let counter = read_volatile(&raw const (*answer).counter);
        let hit = read_volatile(&raw const (*answer).cgroup_id) == cgroup_id
            && read_volatile(&raw const (*answer).generation) == generation
            && (bits & DEV_NO_POLICY != 0
                || (read_volatile(&raw const (*answer).device) == device
                    && read_volatile(&raw const (*answer).dev_type) == dev_type));
        (hit && cache::unchanged(&raw const (*answer).seq, seq)).then_some((bits, counter))
    }
}

/// Keeps `bits` and `counter` as `slot`'s last answer, unless another write
/// is under way.
///
/// # Safety
/// As for [`remembered`].
#[inline(always)]
unsafe fn remember(
    slot: *mut DevSlot,
    cgroup_id: u64,
    generation: u64,
    (dev_type, device): (u32, u64),
    (bits, counter): (u32, u64),
) {
    // SAFETY (whole block): the caller's contract; written field by field.
    unsafe {
        let answer = &raw mut (*slot).answer;
        if let Some(seq) = cache::write_begin(&raw mut (*answer).seq) {
            write_volatile(&raw mut (*answer).cgroup_id, cgroup_id);
            write_volatile(&raw mut (*answer).generation, generation);
            write_volatile(&raw mut (*answer).device, device);
            write_volatile(&raw mut (*answer).dev_type, dev_type);
            write_volatile(&raw mut (*answer).bits, bits);
            write_volatile(&raw mut (*answer).counter, counter);
            cache::write_end(&raw mut (*answer).seq, seq);
        }
    }
}

/// The policy in force for cgroup `cgroup_id` (the current task's, or the
/// unit it is under): its own, else its nearest ancestor's; with who counts
/// under it (see [`owner::counter`]). The walk goes down the task's
/// ancestors and stops at `cgroup_id`, which is one of them. A policy covers its
/// subtree, so a cgroup created under a policed one (by a workload, or
/// before the daemon has written its entry) is policed from its first
/// access (see [`cgroup::nearest`] for how deep it looks).
#[inline(always)]
fn policy_of(cgroup_id: u64) -> Option<(u32, u64)> {
    // SAFETY (lookups): plain data reads.
    let (holder, policy) = match unsafe { DEV_POLICY.get(&cgroup_id) } {
        Some(policy) => (cgroup_id, *policy),
        None => cgroup::nearest(
            cgroup_id,
            // SAFETY: a helper without pointer arguments.
            |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) },
            |id| unsafe { DEV_POLICY.get(&id) }.copied(),
        )?,
    };
    Some((policy.version, owner::counter(policy.owner, holder)))
}

/// The whole decision, from the maps: the cgroup's policy and rules, its
/// slot (claimed when free), and, when this program counts under the
/// policy, the counts and for a denial its event.
#[inline(never)]
fn decide(cgroup_id: u64, generation: u64, access_type: u32, major: u32, minor: u32) -> i32 {
    let dev_type = access_type & 0xffff;
    let access = access_type >> 16;
    let device = (u64::from(major) << 32) | u64::from(minor);
    let (bits, counter) = match policy_of(cgroup_id) {
        Some((version, counter)) => (allowed(version, dev_type, major, minor), counter),
        None => (DEV_NO_POLICY, 0),
    };
    let slot = slots::of(&DEV_SLOTS_MAP, u64::MAX, cgroup_id, &DEV_EVICT);
    if let Some(slot) = slot {
        // SAFETY: a slot of this CPU's table.
        unsafe {
            remember(
                slot,
                cgroup_id,
                generation,
                (dev_type, device),
                (bits, counter),
            );
        }
    }
    if bits & DEV_NO_POLICY != 0 {
        return ALLOW;
    }
    if !owner::mine(counter) {
        // Another program counts it (and, if it must, denies it too).
        return if access & !bits == 0 { ALLOW } else { DENY };
    }
    let counters = match slot {
        // SAFETY: a slot of this CPU's table.
        Some(slot) => Some(unsafe { &raw mut (*slot).counters }),
        None => overflow(cgroup_id),
    };
    if access & !bits == 0 {
        // SAFETY (field projections): pointers into the map value.
        count(counters, |c| unsafe { &raw mut (*c).allowed });
        return ALLOW;
    }
    count(counters, |c| unsafe { &raw mut (*c).denied });
    let event = Event {
        kind: EVENT_DEVICE_DENIED,
        // The task's own cgroup, also under a unit.
        // SAFETY: a helper without pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        dev_type,
        major,
        minor,
        access,
        ..Event::ZERO
    };
    if !events::send(event, true) {
        count(counters, |c| unsafe { &raw mut (*c).suppressed });
    }
    DENY
}

#[cgroup_device]
pub fn dev_guard(ctx: DeviceContext) -> i32 {
    let unit = DEV_UNIT.load();
    let cgroup_id = if unit != 0 {
        unit
    } else {
        // SAFETY: a helper without pointer arguments.
        unsafe { bpf_get_current_cgroup_id() }
    };
    // SAFETY: the context is the kernel's bpf_cgroup_dev_ctx.
    let (access_type, major, minor) = unsafe {
        (
            (*ctx.device).access_type,
            (*ctx.device).major,
            (*ctx.device).minor,
        )
    };
    // Read before any lookup: see crate::cache.
    let generation = DEV_GENERATION.get(0).copied().unwrap_or(0);
    if let Some(table) = DEV_SLOTS_MAP.get_ptr_mut(0) {
        let index = (cgroup_id & (DEV_SLOTS as u64 - 1)) as usize;
        // SAFETY (whole block): a slot of this CPU's table (index < DEV_SLOTS).
        unsafe {
            let slot = (&raw mut (*table).slots).cast::<DevSlot>().add(index);
            if read_volatile(&raw const (*slot).cgroup_id) == cgroup_id {
                let device = (u64::from(major) << 32) | u64::from(minor);
                let answer = remembered(slot, cgroup_id, generation, access_type & 0xffff, device);
                if let Some((bits, counter)) = answer {
                    if bits & DEV_NO_POLICY != 0 {
                        return ALLOW;
                    }
                    if (access_type >> 16) & !bits == 0 {
                        if owner::mine(counter) {
                            atomic_add(&raw mut (*slot).counters.allowed, 1);
                        }
                        return ALLOW;
                    }
                }
            }
        }
    }
    decide(cgroup_id, generation, access_type, major, minor)
}

/// Allows everything and touches nothing: the baseline of `cargo xtask bench dev`.
#[cgroup_device]
pub fn dev_empty(_ctx: DeviceContext) -> i32 {
    ALLOW
}

/// Asks for the task's cgroup id and allows everything: the least any
/// per-cgroup policy program does (a baseline of `cargo xtask bench dev`).
#[cgroup_device]
pub fn dev_cgroup_id(_ctx: DeviceContext) -> i32 {
    // SAFETY: a helper without pointer arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // The id's use: never 0 for a task's cgroup.
    if id == 0 {
        DENY
    } else {
        ALLOW
    }
}

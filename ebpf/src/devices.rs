//! Device policy: a cgroup_device program that looks up the policy of the
//! current task's cgroup and its rules in maps. It is attached once (at the
//! watched root by the daemon, or at a workload's cgroup by `agent run`), and
//! however often policies change, only the maps change: never a stack of
//! programs.
//!
//! A cgroup without a policy is allowed everything (and not counted). The
//! rule table is compiled by userspace (see agent/src/policy/devices.rs) so
//! that the answer is one exact lookup, falling back to `major:*`, `*:minor`
//! and `*:*` for numbers no rule names.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::generated::bpf_get_current_cgroup_id,
    macros::{cgroup_device, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::DeviceContext,
};
use common::{
    devices::{DevCounters, DevKey, DevPolicyRef, DevSlot, DevSlotTable, DEV_ANY, DEV_SLOTS},
    events::{Event, EVENT_DEVICE_DENIED},
    DEFAULT_MAX_CGROUPS,
};
use core::ptr::write_volatile;

use crate::{
    events,
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

#[map(name = "DEV_COUNTS")]
static DEV_COUNTS: PerCpuHashMap<u64, DevCounters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_CGROUPS, 0);

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

/// Counts one decision for `cgroup_id` in its slot of this CPU's table, else
/// in its overflow entry (atomic adds: cgroup_device runs in process context,
/// where another task's program can preempt it on this CPU).
#[inline(always)]
fn count(cgroup_id: u64, field: fn(*mut DevCounters) -> *mut u64) {
    let Some(counters) = slot(cgroup_id).or_else(|| overflow(cgroup_id)) else {
        return;
    };
    // SAFETY: a map value of this CPU.
    unsafe { atomic_add(field(counters), 1) };
}

#[inline(always)]
fn slot(cgroup_id: u64) -> Option<*mut DevCounters> {
    let table = DEV_SLOTS_MAP.get_ptr_mut(0)?;
    let index = (cgroup_id & (DEV_SLOTS as u64 - 1)) as usize;
    // SAFETY: this CPU's table, and index < DEV_SLOTS.
    let slot = unsafe {
        slots::find(
            (&raw mut (*table).slots).cast::<DevSlot>(),
            index,
            cgroup_id,
            &DEV_EVICT,
        )
    }?;
    // SAFETY: a slot of this CPU's table.
    Some(unsafe { &raw mut (*slot).counters })
}

#[inline(never)]
fn overflow(cgroup_id: u64) -> Option<*mut DevCounters> {
    if let Some(counters) = DEV_COUNTS.get_ptr_mut(cgroup_id) {
        return Some(counters);
    }
    let _ = DEV_COUNTS.insert(cgroup_id, DevCounters::ZERO, 0);
    DEV_COUNTS.get_ptr_mut(cgroup_id)
}

#[cgroup_device]
pub fn dev_guard(ctx: DeviceContext) -> i32 {
    // SAFETY: a helper without pointer arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: plain data read.
    let Some(policy) = (unsafe { DEV_POLICY.get(&cgroup_id) }) else {
        return ALLOW;
    };
    // SAFETY: the context is the kernel's bpf_cgroup_dev_ctx.
    let (access_type, major, minor) = unsafe {
        (
            (*ctx.device).access_type,
            (*ctx.device).major,
            (*ctx.device).minor,
        )
    };
    let dev_type = access_type & 0xffff;
    let access = access_type >> 16;
    if access & !allowed(policy.version, dev_type, major, minor) == 0 {
        // SAFETY (field projections): pointers into the map value.
        count(cgroup_id, |c| unsafe { &raw mut (*c).allowed });
        return ALLOW;
    }
    count(cgroup_id, |c| unsafe { &raw mut (*c).denied });
    let event = Event {
        kind: EVENT_DEVICE_DENIED,
        cgroup_id,
        dev_type,
        major,
        minor,
        access,
        ..Event::ZERO
    };
    if !events::send(event, true) {
        count(cgroup_id, |c| unsafe { &raw mut (*c).suppressed });
    }
    DENY
}

/// Allows everything and touches nothing: the baseline of `cargo xtask bench dev`.
#[cgroup_device]
pub fn dev_empty(_ctx: DeviceContext) -> i32 {
    ALLOW
}

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
//!
//! A per-CPU cache (see [`crate::cache`]) keeps, per cgroup slot, the last
//! policy looked up and the access bits of the last device asked for: a
//! cgroup opening the same device again (or one without a policy opening
//! anything) does no lookup at all.

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
    cache::{self, Entry},
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

/// Changed by userspace (to a value never used before) after every change
/// of `DEV_POLICY`: answers cached under another generation are stale.
#[map(name = "DEV_GENERATION")]
static DEV_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// Cache entries per CPU, chosen by the cgroup id's low bits.
const CACHE_ENTRIES: usize = 16;

/// The last answer for a cgroup: its policy, and its last device's bits.
#[derive(Clone, Copy)]
#[repr(C)]
struct Answer {
    cgroup_id: u64,
    generation: u64,
    /// 0: no policy (allowed everything).
    has_policy: u32,
    version: u32,
    /// The last device asked for (`dev_type` 0: none yet), and its bits.
    dev_type: u32,
    major: u32,
    minor: u32,
    bits: u32,
}

#[map(name = "DEV_CACHE")]
static DEV_CACHE: PerCpuArray<[Entry<Answer>; CACHE_ENTRIES]> = PerCpuArray::with_max_entries(1, 0);

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

/// The access bits `cgroup_id` has to the device: from this CPU's cache when
/// it holds the answer, else from the maps (and then cached). `None`: the
/// cgroup has no policy.
#[inline(always)]
fn bits_for(cgroup_id: u64, dev_type: u32, major: u32, minor: u32) -> Option<u32> {
    // Read before any lookup: see crate::cache.
    let generation = DEV_GENERATION.get(0).copied().unwrap_or(0);
    let entry = DEV_CACHE.get_ptr_mut(0).map(|entries| {
        // SAFETY: the index is below CACHE_ENTRIES.
        unsafe {
            entries
                .cast::<Entry<Answer>>()
                .add((cgroup_id & (CACHE_ENTRIES as u64 - 1)) as usize)
        }
    });
    // SAFETY: an entry of this CPU's cache.
    let cached = entry.and_then(|entry| unsafe { cache::load(entry) });
    let mut answer = match cached {
        Some(answer) if answer.cgroup_id == cgroup_id && answer.generation == generation => {
            if answer.has_policy == 0 {
                return None;
            }
            if answer.dev_type == dev_type && answer.major == major && answer.minor == minor {
                return Some(answer.bits);
            }
            answer
        }
        _ => {
            // SAFETY: plain data read.
            let policy = unsafe { DEV_POLICY.get(&cgroup_id) };
            Answer {
                cgroup_id,
                generation,
                has_policy: u32::from(policy.is_some()),
                version: policy.map_or(0, |p| p.version),
                dev_type: 0,
                major: 0,
                minor: 0,
                bits: 0,
            }
        }
    };
    if answer.has_policy != 0 {
        answer.bits = allowed(answer.version, dev_type, major, minor);
        answer.dev_type = dev_type;
        answer.major = major;
        answer.minor = minor;
    }
    if let Some(entry) = entry {
        // SAFETY: as above.
        unsafe { cache::store(entry, &answer) };
    }
    (answer.has_policy != 0).then_some(answer.bits)
}

#[cgroup_device]
pub fn dev_guard(ctx: DeviceContext) -> i32 {
    // SAFETY: a helper without pointer arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
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
    let Some(bits) = bits_for(cgroup_id, dev_type, major, minor) else {
        return ALLOW;
    };
    if access & !bits == 0 {
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

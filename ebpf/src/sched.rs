//! Per-cgroup CPU and scheduler accounting from the scheduler's BTF
//! tracepoints (tp_btf): on-CPU time, voluntary and involuntary switches,
//! run-queue latency, and processes started and exited.
//!
//! Everything is charged to the *current* task's cgroup
//! (`bpf_get_current_cgroup_id`), at a moment when the current task is the one
//! concerned, and nothing reads a clock:
//! - on-CPU time is the growth of the task's `se.sum_exec_runtime` (read
//!   through BTF), the very deltas the kernel charges to its cgroup
//!   (cpuacct.usage, cpu.stat usage_usec). It is charged when the task
//!   switches out, and at each tick (the `hrtimer_expire_entry` tracepoint,
//!   in interrupts) for a task that runs without switching, so the two agree
//!   within a tick (see ARCHITECTURE.md for where they differ). The scheduler's own `sched_stat_runtime` would give
//!   the same deltas, but fires two to four times per switch: one program
//!   run per switch instead of three is most of what accounting costs;
//! - at `sched_switch`, `prev` is still current: its switch is counted, and
//!   its run-queue wait before this run is the growth of its
//!   `sched_info.run_delay` (kept by the kernel, read through BTF at an offset
//!   userspace finds in the kernel's BTF) since its last switch out;
//! - `task_newtask` runs in the parent, whose cgroup the child starts in, and
//!   `sched_process_exit` in the exiting task.
//!
//! Per-task state lives in task local storage (no hash lookups). These
//! programs run on every context switch: per-CPU counters, no per-event output.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_task_btf, bpf_task_storage_get,
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::{Array, PerCpuArray, PerCpuHashMap},
    programs::BtfTracePointContext,
    Global,
};
use common::{
    sched::latency_bucket, SchedCounters, SchedSlot, SchedSlotTable, TaskState,
    DEFAULT_MAX_CGROUPS, LATENCY_BUCKETS, SCHED_SLOTS,
};
use core::{
    ffi::c_void,
    ptr::{read_volatile, write_volatile},
};

use crate::slots::{self, add, atomic_add, cmpxchg, Slot};

/// Level and id of the watched cgroup root. At level 0 (the whole v2
/// hierarchy) every task counts; deeper, only tasks under it.
#[unsafe(no_mangle)]
static SCHED_ROOT_LEVEL: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static SCHED_ROOT_ID: Global<u64> = Global::new(0);
/// Offset of `task_struct.sched_info.run_delay`, from the kernel's BTF.
#[unsafe(no_mangle)]
static TASK_RUN_DELAY_OFFSET: Global<u64> = Global::new(0);
/// Offset of `task_struct.se.sum_exec_runtime`, from the kernel's BTF.
#[unsafe(no_mangle)]
static TASK_EXEC_OFFSET: Global<u64> = Global::new(0);

/// `clone_flags` bit of a new thread (not a process).
const CLONE_THREAD: u64 = 0x0001_0000;
/// Map flag: allocate hash entries on demand (sched counters are large).
const BPF_F_NO_PREALLOC: u32 = 1;
/// `bpf_task_storage_get` flag: create the storage when absent.
const STORAGE_CREATE: u64 = 1;

#[map(name = "SCHED_SLOTS")]
static SLOTS: PerCpuArray<SchedSlotTable> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SCHED_OVERFLOW")]
static OVERFLOW: PerCpuHashMap<u64, SchedCounters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_CGROUPS, BPF_F_NO_PREALLOC);

#[map(name = "SCHED_EVICT")]
static EVICT: Array<u64> = Array::with_max_entries(SCHED_SLOTS as u32, 0);

#[map(name = "SCHED_UNCOUNTED")]
static UNCOUNTED: PerCpuArray<SchedCounters> = PerCpuArray::with_max_entries(1, 0);

/// A task local storage map (BPF_MAP_TYPE_TASK_STORAGE, Linux 5.11), declared
/// the way libbpf reads BTF map definitions: each field's pointee type
/// carries one parameter. aya-ebpf 0.2 has no such map type.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; 29],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; 1],
}

// SAFETY: placeholder pointers the loader reads from BTF; never dereferenced.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The storage of `task` (a BTF task pointer), created when absent.
    #[inline(always)]
    fn get_or_create(&self, task: *mut c_void) -> Option<*mut T> {
        self.get_with(task, STORAGE_CREATE)
    }

    /// The storage of `task`, if it has one.
    #[inline(always)]
    fn get(&self, task: *mut c_void) -> Option<*mut T> {
        self.get_with(task, 0)
    }

    #[inline(always)]
    fn get_with(&self, task: *mut c_void, flags: u64) -> Option<*mut T> {
        // SAFETY: `task` comes from a tp_btf argument (a trusted pointer).
        let value = unsafe {
            bpf_task_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                task.cast(),
                core::ptr::null_mut(),
                flags,
            )
        };
        (!value.is_null()).then_some(value.cast())
    }
}

#[btf_map]
static SCHED_TASKS: TaskStorage<TaskState> = TaskStorage::new();

// SAFETY: SchedSlotTable is #[repr(C)] with its SCHED_SLOTS slots first.
unsafe impl slots::Table for SchedSlotTable {
    type Slot = SchedSlot;
    const LEN: usize = SCHED_SLOTS;
}

// SAFETY: SchedSlot is #[repr(C)] with its owner first.
unsafe impl Slot for SchedSlot {
    unsafe fn clear(this: *mut Self) {
        // SAFETY: the trait's contract.
        unsafe { write_volatile(&raw mut (*this).counters, SchedCounters::ZERO) }
    }
}

/// Whether the current task is under the watched root.
#[inline(always)]
fn in_scope() -> bool {
    let level = SCHED_ROOT_LEVEL.load();
    // SAFETY: a helper without pointer arguments.
    level == 0
        || unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) } == SCHED_ROOT_ID.load()
}

/// This CPU's counters of cgroup `id`: its slot, else an overflow entry, else
/// the uncounted bin.
#[inline(always)]
fn counters(id: u64) -> Option<*mut SchedCounters> {
    if let Some(slot) = slots::of(&SLOTS, u64::MAX, id, &EVICT) {
        // SAFETY: a slot of this CPU's table.
        return Some(unsafe { &raw mut (*slot).counters });
    }
    overflow(id)
}

#[inline(never)]
fn overflow(id: u64) -> Option<*mut SchedCounters> {
    if let Some(counters) = OVERFLOW.get_ptr_mut(id) {
        return Some(counters);
    }
    let _ = OVERFLOW.insert(id, SchedCounters::ZERO, u64::from(BPF_NOEXIST));
    OVERFLOW
        .get_ptr_mut(id)
        .or_else(|| UNCOUNTED.get_ptr_mut(0))
}

/// A `u64` field of a task at `offset` (one of the offsets from the BTF).
///
/// # Safety
/// `task` is a trusted task pointer and `offset` that of a `u64` field.
#[inline(always)]
unsafe fn task_u64(task: *mut c_void, offset: u64) -> u64 {
    // SAFETY: the caller's contract.
    unsafe { *task.cast::<u8>().add(offset as usize).cast::<u64>() }
}

/// The storage of the current task (`task`) in cgroup `id`, if it is counted:
/// one that has storage and was last charged in this cgroup needs no further
/// check (the common case, two helper calls fewer). Else it must be a real
/// task (pid 0 is the idle task, which belongs to no cgroup) under the
/// watched root; its storage is created then, with no baselines. A task
/// found outside the watched root loses its baselines, so that if it comes
/// back it is charged from then on, not for its time outside.
#[inline(always)]
fn current_state(task: *mut c_void, id: u64) -> Option<*mut TaskState> {
    let existing = SCHED_TASKS.get(task);
    if let Some(state) = existing {
        // SAFETY: the task's storage.
        if unsafe { (*state).cgroup_id } == id {
            return Some(state);
        }
    }
    // SAFETY: a helper without pointer arguments.
    if unsafe { bpf_get_current_pid_tgid() } as u32 == 0 {
        return None;
    }
    if !in_scope() {
        if let Some(state) = existing {
            // SAFETY: the task's storage.
            unsafe { (*state).cgroup_id = 0 };
        }
        return None;
    }
    SCHED_TASKS.get_or_create(task)
}

/// Charges `counters` (of the task's cgroup) the CPU time the current task has had since it was
/// last charged (the growth of its `sum_exec_runtime`, the same deltas the
/// kernel adds to the cgroup's usage), and moves the baseline on. A task
/// seen for the first time only gets its baseline.
///
/// # Safety
/// `task` is the current task (a trusted pointer) and `state` its storage.
#[inline(always)]
unsafe fn charge(task: *mut c_void, state: *mut TaskState, counters: *mut SchedCounters) {
    // SAFETY (whole block): the caller's contract; the offset is
    // task_struct.se.sum_exec_runtime, a u64, per the kernel's BTF.
    unsafe {
        let exec = task_u64(task, TASK_EXEC_OFFSET.load());
        if (*state).cgroup_id != 0 && exec > (*state).exec_ns {
            add(&raw mut (*counters).cpu_ns, exec - (*state).exec_ns);
        }
        (*state).exec_ns = exec;
    }
}

/// [`charge`] for the tick, which can run inside itself: a soft hrtimer's
/// run (in softirq, interrupts on) interrupted by the tick's hard one, on
/// kernels that do not skip a program's nested runs. The baseline moves by
/// compare-and-exchange, and only the run that moved it charges, atomically.
///
/// # Safety
/// As for [`charge`].
#[inline(always)]
unsafe fn charge_nested(task: *mut c_void, state: *mut TaskState, counters: *mut SchedCounters) {
    // SAFETY (whole block): as in charge.
    unsafe {
        let exec = task_u64(task, TASK_EXEC_OFFSET.load());
        let known = read_volatile(&raw const (*state).exec_ns);
        if exec > known
            && cmpxchg(&raw mut (*state).exec_ns, known, exec) == known
            && read_volatile(&raw const (*state).cgroup_id) != 0
        {
            atomic_add(&raw mut (*counters).cpu_ns, exec - known);
        }
    }
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state)
    let preempt: u64 = ctx.arg(0);
    let prev: *mut c_void = ctx.arg(1);
    let prev_state: u64 = ctx.arg(3);
    // prev is still current. The scheduler has just brought its runtime up
    // to date (put_prev_task runs before this tracepoint).
    // SAFETY: a helper without arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    let Some(state) = current_state(prev, id) else {
        return 0;
    };
    let Some(counters) = counters(id) else {
        return 0;
    };
    // As the kernel counts nvcsw/nivcsw: involuntary when prev was preempted
    // or is still runnable (TASK_RUNNING is 0).
    let involuntary = preempt & 0xff != 0 || prev_state & 0xffff_ffff == 0;
    // SAFETY (whole block): this CPU's counters (sched_switch runs with
    // interrupts off, never nested); `prev` is a trusted task pointer and the
    // offset is task_struct.sched_info.run_delay, a u64, per the kernel's BTF.
    unsafe {
        add(
            if involuntary {
                &raw mut (*counters).involuntary
            } else {
                &raw mut (*counters).voluntary
            },
            1,
        );
        charge(prev, state, counters);
        let run_delay = task_u64(prev, TASK_RUN_DELAY_OFFSET.load());
        // Known since its last switch out (or its creation): the wait before
        // this run is what run_delay grew by. A task first seen now has no
        // known baseline, so its first wait is not sampled.
        let known = (*state).run_delay_ns;
        if (*state).cgroup_id != 0 && known != TaskState::UNKNOWN && run_delay >= known {
            let wait = run_delay - known;
            let bucket = latency_bucket(wait);
            if bucket < LATENCY_BUCKETS {
                add(&raw mut (*counters).latency[bucket], 1);
            }
            if wait > (*counters).latency_max_ns {
                (*counters).latency_max_ns = wait;
            }
        }
        (*state).run_delay_ns = run_delay;
        (*state).cgroup_id = id;
    }
    0
}

/// The tick (and every other hrtimer's expiry: in hard interrupts, or in
/// softirq for soft hrtimers): charges the CPU time of the interrupted task,
/// so that a task that runs for long without switching is counted as it
/// goes, not only when it leaves the CPU. Its runtime is as of the
/// scheduler's last update (at most a tick behind; on a `nohz_full` CPU a
/// lone task gets few ticks and is counted when it switches).
#[btf_tracepoint(function = "hrtimer_expire_entry")]
pub fn hrtimer_expire_entry(_ctx: BtfTracePointContext) -> i32 {
    // SAFETY: helpers without pointer arguments; the task is current.
    let (task, id) = unsafe {
        (
            bpf_get_current_task_btf().cast::<c_void>(),
            bpf_get_current_cgroup_id(),
        )
    };
    let Some(state) = current_state(task, id) else {
        return 0;
    };
    let Some(counters) = counters(id) else {
        return 0;
    };
    // SAFETY: the current task and its storage; this CPU's counters, whose
    // cpu_ns only sched_switch (interrupts off) and this program write.
    unsafe {
        if read_volatile(&raw const (*state).cgroup_id) == 0 {
            // First seen, mid-run: its wait before this run is unknown, and
            // its baseline is now.
            write_volatile(&raw mut (*state).run_delay_ns, TaskState::UNKNOWN);
            write_volatile(
                &raw mut (*state).exec_ns,
                task_u64(task, TASK_EXEC_OFFSET.load()),
            );
        } else {
            charge_nested(task, state, counters);
        }
        write_volatile(&raw mut (*state).cgroup_id, id);
    }
    0
}

#[btf_tracepoint(function = "task_newtask")]
pub fn task_newtask(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct task_struct *task, u64 clone_flags); in the parent.
    let task: *mut c_void = ctx.arg(0);
    let clone_flags: u64 = ctx.arg(1);
    if !in_scope() {
        return 0;
    }
    // SAFETY: a helper without pointer arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // A new task has waited nothing yet: its first wait is sampled too.
    if let Some(state) = SCHED_TASKS.get_or_create(task) {
        // SAFETY: the new task's storage.
        unsafe {
            (*state).run_delay_ns = 0;
            (*state).exec_ns = 0;
            (*state).cgroup_id = id;
        }
    }
    if clone_flags & CLONE_THREAD == 0 {
        if let Some(counters) = counters(id) {
            // SAFETY: this CPU's counters; preemption is off in tracepoints.
            unsafe { add(&raw mut (*counters).started, 1) };
        }
    }
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct task_struct *p, bool group_dead); in the exiting task.
    let group_dead: u64 = ctx.arg(1);
    if group_dead & 0xff != 0 && in_scope() {
        // SAFETY: a helper without pointer arguments.
        if let Some(counters) = counters(unsafe { bpf_get_current_cgroup_id() }) {
            // SAFETY: as in task_newtask.
            unsafe { add(&raw mut (*counters).exited, 1) };
        }
    }
    0
}

/// Empty programs on the same tracepoints: the baseline of `cargo xtask bench sched`.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_empty_switch(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "hrtimer_expire_entry")]
pub fn sched_empty_tick(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "task_newtask")]
pub fn sched_empty_newtask(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_empty_exit(_ctx: BtfTracePointContext) -> i32 {
    0
}

//! Cgroup tree changes. Userspace keeps a table of cgroup id → path and
//! re-walks the tree only when this generation counter moved, instead of every
//! tick. mkdir/rmdir/rename are rare, so these programs cost nothing that matters.
//!
//! Raw tracepoints (not tracefs tracepoints) so nothing needs tracefs mounted.

use aya_ebpf::{
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};

#[map(name = "CGROUP_GENERATION")]
static CGROUP_GENERATION: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn bump() {
    if let Some(generation) = CGROUP_GENERATION.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; raw tracepoints run with preemption disabled.
        unsafe { *generation += 1 };
    }
}

#[raw_tracepoint(tracepoint = "cgroup_mkdir")]
pub fn cgroup_mkdir(_ctx: RawTracePointContext) -> i32 {
    bump();
    0
}

#[raw_tracepoint(tracepoint = "cgroup_rmdir")]
pub fn cgroup_rmdir(_ctx: RawTracePointContext) -> i32 {
    bump();
    0
}

#[raw_tracepoint(tracepoint = "cgroup_rename")]
pub fn cgroup_rename(_ctx: RawTracePointContext) -> i32 {
    bump();
    0
}

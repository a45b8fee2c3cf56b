//! Cgroup tree changes. Userspace keeps a table of cgroup id → path and
//! re-walks the tree only when this generation counter moved, instead of every
//! tick. mkdir/rmdir/rename are rare, so these programs cost nothing that matters.
//!
//! Raw tracepoints (not tracefs tracepoints) so nothing needs tracefs mounted.
//!
//! Also here: [`nearest`], the walk up a cgroup's ancestors that the policy
//! programs share.

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

/// Levels of the v2 hierarchy [`nearest`] consults (the root is level 0).
pub const MAX_LEVELS: i32 = 32;

/// The nearest ancestor of cgroup `id` for which `found` gives something,
/// with what it gave: `ancestor(level)` gives the id of `id`'s ancestor at
/// `level` (0 past `id`'s own level; a helper such as
/// `bpf_get_current_ancestor_cgroup_id`). Levels from [`MAX_LEVELS`] on are
/// not consulted.
#[inline(always)]
pub fn nearest<T>(
    id: u64,
    ancestor: impl Fn(i32) -> u64,
    found: impl Fn(u64) -> Option<T>,
) -> Option<(u64, T)> {
    let mut nearest = None;
    for level in 0..MAX_LEVELS {
        let above = ancestor(level);
        if above == 0 || above == id {
            break;
        }
        if let Some(value) = found(above) {
            nearest = Some((above, value));
        }
    }
    nearest
}

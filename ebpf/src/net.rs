//! Per-cgroup network accounting: cgroup_skb programs attached once at the
//! watched cgroup root, so they run for every socket below it.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::bpf_skb_cgroup_id,
    macros::{cgroup_skb, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::SkBuffContext,
};
use common::{NetCounters, DEFAULT_MAX_CGROUPS};

/// cgroup_skb verdict: let the packet through.
const ALLOW: i32 = 1;

#[map(name = "NET_STATS")]
static NET_STATS: PerCpuHashMap<u64, NetCounters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_CGROUPS, 0);

#[map(name = "NET_UNCOUNTED")]
static NET_UNCOUNTED: PerCpuArray<NetCounters> = PerCpuArray::with_max_entries(1, 0);

#[derive(Clone, Copy)]
enum Direction {
    Rx,
    Tx,
}

#[cgroup_skb(ingress)]
pub fn net_ingress(ctx: SkBuffContext) -> i32 {
    count(&ctx, Direction::Rx);
    ALLOW
}

#[cgroup_skb(egress)]
pub fn net_egress(ctx: SkBuffContext) -> i32 {
    count(&ctx, Direction::Tx);
    ALLOW
}

/// Allows everything and touches nothing: the baseline that `cargo xtask bench
/// net` compares the accounting programs against.
#[cgroup_skb]
pub fn net_empty(_ctx: SkBuffContext) -> i32 {
    ALLOW
}

#[inline(always)]
fn count(ctx: &SkBuffContext, direction: Direction) {
    // The socket's cgroup, not the current task's: ingress runs in softirq,
    // where the current task is whatever happened to be running.
    // SAFETY: the context pointer is the program's own __sk_buff.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let len = u64::from(ctx.len());
    let counters = match NET_STATS.get_ptr_mut(cgroup_id) {
        Some(counters) => counters,
        None => {
            // First packet of this cgroup on this CPU. NOEXIST: if the other
            // direction (softirq on this CPU) inserted it meanwhile, keep theirs.
            let _ = NET_STATS.insert(cgroup_id, NetCounters::ZERO, u64::from(BPF_NOEXIST));
            match NET_STATS.get_ptr_mut(cgroup_id) {
                Some(counters) => counters,
                None => match NET_UNCOUNTED.get_ptr_mut(0) {
                    // The map is full: count what was missed where userspace
                    // reports it, rather than being silently wrong.
                    Some(counters) => counters,
                    None => return,
                },
            }
        }
    };
    // SAFETY: a per-CPU map value of this CPU; preemption by the other
    // direction touches the other fields only.
    unsafe {
        match direction {
            Direction::Rx => {
                (*counters).rx_bytes += len;
                (*counters).rx_packets += 1;
            }
            Direction::Tx => {
                (*counters).tx_bytes += len;
                (*counters).tx_packets += 1;
            }
        }
    }
}

//! Per-cgroup network accounting: cgroup_skb programs attached once at the
//! watched cgroup root, so they run for every packet of every socket below it.
//!
//! Fast path: each CPU has a table of [`NET_SLOTS`] one-cache-line slots in a
//! single per-CPU array element; a cgroup owns slot `id & mask` on each CPU
//! where it sent or received. The lookup is a fixed map element plus an
//! offset, with no hashing. A cgroup whose slot is held by another live
//! cgroup, and egress nested inside egress, go to the overflow hash with
//! atomic adds; when that is full, to `NET_UNCOUNTED`.
//!
//! Exactness under nesting (see [`NetSlot`]): ingress runs with bottom halves
//! disabled and never nests; egress in process context can be interrupted by
//! ingress (other fields) and by egress in softirq (guarded by `busy`).
//! Ownership changes only by compare-and-exchange.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::bpf_skb_cgroup_id,
    macros::{cgroup_skb, map},
    maps::{Array, PerCpuArray, PerCpuHashMap},
    programs::SkBuffContext,
    Global,
};
use common::{NetCounters, NetSlot, NetSlotTable, DEFAULT_MAX_CGROUPS, NET_SLOTS};
use core::ptr::{read_volatile, write_volatile};

use crate::slots::{self, atomic_add, Slot};

/// cgroup_skb verdict: let the packet through.
const ALLOW: i32 = 1;

/// Slot index mask, frozen in .rodata at load time (so the verifier and JIT
/// see a constant). Userspace may shrink it; it never exceeds the table.
#[unsafe(no_mangle)]
static NET_SLOT_MASK: Global<u64> = Global::new(NET_SLOTS as u64 - 1);

#[map(name = "NET_SLOTS")]
static SLOTS: PerCpuArray<NetSlotTable> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "NET_OVERFLOW")]
static OVERFLOW: PerCpuHashMap<u64, NetCounters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_CGROUPS, 0);

#[map(name = "NET_EVICT")]
static EVICT: Array<u64> = Array::with_max_entries(NET_SLOTS as u32, 0);

#[map(name = "NET_UNCOUNTED")]
static UNCOUNTED: PerCpuArray<NetCounters> = PerCpuArray::with_max_entries(1, 0);

#[cgroup_skb(ingress)]
pub fn net_ingress(ctx: SkBuffContext) -> i32 {
    // The socket's cgroup, not the current task's: ingress runs in softirq,
    // where the current task is whatever happened to be running.
    // SAFETY: the context pointer is the program's own __sk_buff.
    let id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let len = u64::from(ctx.len());
    match slot(id) {
        // SAFETY: this CPU's slot; no other program touches rx_* while this
        // one runs (ingress does not nest).
        Some(slot) => unsafe {
            write_volatile(
                &raw mut (*slot).rx_bytes,
                read_volatile(&raw const (*slot).rx_bytes) + len,
            );
            write_volatile(
                &raw mut (*slot).rx_packets,
                read_volatile(&raw const (*slot).rx_packets) + 1,
            );
        },
        None => overflow(id, len, Direction::Rx),
    }
    ALLOW
}

#[cgroup_skb(egress)]
pub fn net_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: as in net_ingress.
    let id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let len = u64::from(ctx.len());
    if let Some(slot) = slot(id) {
        // SAFETY: this CPU's slot. Marked busy before the tx read-modify-write
        // so that egress nesting in softirq stays out; the owner is checked
        // again once busy, since a reclaim may have come in between.
        unsafe {
            if read_volatile(&raw const (*slot).busy) == 0 {
                write_volatile(&raw mut (*slot).busy, 1);
                let still_ours = read_volatile(&raw const (*slot).cgroup_id) == id;
                if still_ours {
                    write_volatile(
                        &raw mut (*slot).tx_bytes,
                        read_volatile(&raw const (*slot).tx_bytes) + len,
                    );
                    write_volatile(
                        &raw mut (*slot).tx_packets,
                        read_volatile(&raw const (*slot).tx_packets) + 1,
                    );
                }
                write_volatile(&raw mut (*slot).busy, 0);
                if still_ours {
                    return ALLOW;
                }
            }
        }
    }
    overflow(id, len, Direction::Tx);
    ALLOW
}

/// Allows everything and touches nothing: the baseline that `cargo xtask bench
/// net` compares the accounting programs against.
#[cgroup_skb]
pub fn net_empty(_ctx: SkBuffContext) -> i32 {
    ALLOW
}

#[derive(Clone, Copy)]
enum Direction {
    Rx,
    Tx,
}

/// This CPU's slot for cgroup `id`, or `None` when another live cgroup holds it.
#[inline(always)]
fn slot(id: u64) -> Option<*mut NetSlot> {
    slots::of(&SLOTS, NET_SLOT_MASK.load(), id, &EVICT)
}

// SAFETY: NetSlotTable is #[repr(C)] with its NET_SLOTS slots first.
unsafe impl slots::Table for NetSlotTable {
    type Slot = NetSlot;
    const LEN: usize = NET_SLOTS;
}

// SAFETY: NetSlot is #[repr(C)] with its owner first.
unsafe impl Slot for NetSlot {
    unsafe fn clear(this: *mut Self) {
        // SAFETY: the trait's contract.
        unsafe {
            write_volatile(&raw mut (*this).rx_bytes, 0);
            write_volatile(&raw mut (*this).rx_packets, 0);
            write_volatile(&raw mut (*this).tx_bytes, 0);
            write_volatile(&raw mut (*this).tx_packets, 0);
        }
    }

    unsafe fn busy(this: *const Self) -> bool {
        // SAFETY: the trait's contract.
        unsafe { read_volatile(&raw const (*this).busy) != 0 }
    }
}

/// The slow path: a cgroup without a slot on this CPU, or nested egress.
/// Atomic adds, since programs on this path can interrupt each other.
#[inline(never)]
fn overflow(id: u64, len: u64, direction: Direction) {
    let counters = match OVERFLOW.get_ptr_mut(id) {
        Some(counters) => counters,
        None => {
            // NOEXIST: if a nested program inserted it meanwhile, keep theirs.
            let _ = OVERFLOW.insert(id, NetCounters::ZERO, u64::from(BPF_NOEXIST));
            match OVERFLOW.get_ptr_mut(id) {
                Some(counters) => counters,
                // Full: count what was missed where userspace reports it.
                None => match UNCOUNTED.get_ptr_mut(0) {
                    Some(counters) => counters,
                    None => return,
                },
            }
        }
    };
    // SAFETY: map value pointers of this CPU.
    unsafe {
        match direction {
            Direction::Rx => {
                atomic_add(&raw mut (*counters).rx_bytes, len);
                atomic_add(&raw mut (*counters).rx_packets, 1);
            }
            Direction::Tx => {
                atomic_add(&raw mut (*counters).tx_bytes, len);
                atomic_add(&raw mut (*counters).tx_packets, 1);
            }
        }
    }
}

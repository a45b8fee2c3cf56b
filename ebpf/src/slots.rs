//! Per-CPU slot tables keyed by cgroup id: the fast path of every per-cgroup
//! counter. A table is one per-CPU array element holding `N` slots; cgroup
//! `id` uses slot `id & mask` on each CPU. The lookup is a fixed element plus
//! an offset, with no hashing. cgroup ids are sequential inode numbers, so
//! live cgroups rarely share a slot; one that finds its slot held by another
//! live cgroup goes to the caller's overflow path.
//!
//! Ownership changes only by compare-and-exchange. Userspace never writes a
//! table (it can only write every CPU's copy of the whole element at once);
//! it posts the id of a removed cgroup in an evict array at the slot's index,
//! and the next cgroup that needs that slot takes it over.

use aya_ebpf::maps::{Array, PerCpuArray};
use common::SLOT_RECLAIMING;
use core::ptr::{read_volatile, write_volatile};

/// A `#[repr(C)]` slot whose first field is its owner (`u64`).
///
/// # Safety
/// Implementors must be `#[repr(C)]` with the owner as their first field.
pub unsafe trait Slot {
    /// Zeroes every counter (not the owner).
    ///
    /// # Safety
    /// `this` points to a slot of this CPU's table.
    unsafe fn clear(this: *mut Self);

    /// Whether a program is inside an update of this slot that a reclaim
    /// would break (nested egress); tables without nesting say no.
    ///
    /// # Safety
    /// As for `clear`.
    unsafe fn busy(_this: *const Self) -> bool {
        false
    }
}

/// A per-CPU slot table: `#[repr(C)]`, its first field `[Self::Slot; LEN]`.
///
/// # Safety
/// Implementors must have that layout, with `LEN` a power of two.
pub unsafe trait Table {
    type Slot: Slot;
    const LEN: usize;
}

/// This CPU's slot of cgroup `id` in `tables` (a per-CPU array of one
/// table), at `id & mask` within the table: see [`find`].
#[inline(always)]
pub fn of<T: Table>(
    tables: &PerCpuArray<T>,
    mask: u64,
    id: u64,
    evict: &Array<u64>,
) -> Option<*mut T::Slot> {
    let table = tables.get_ptr_mut(0)?;
    // The constant bound keeps the index inside the table for the verifier,
    // whatever `mask` is.
    let index = (id & mask & (T::LEN as u64 - 1)) as usize;
    // SAFETY: this CPU's table, whose slots come first (the trait's
    // contract), and index < LEN.
    unsafe { find(table.cast::<T::Slot>(), index, id, evict) }
}

/// Slot `index` of `table` for cgroup `id`: its own, or claimed when free or
/// left by a removed cgroup (posted in `evict`); `None` when another live
/// cgroup holds it.
///
/// # Safety
/// `table` points to this CPU's table and `index` is inside it.
#[inline(always)]
pub unsafe fn find<S: Slot>(
    table: *mut S,
    index: usize,
    id: u64,
    evict: &Array<u64>,
) -> Option<*mut S> {
    // SAFETY: the caller's contract.
    let slot = unsafe { table.add(index) };
    let owner_field = slot.cast::<u64>();
    // SAFETY: the owner is the slot's first field.
    let owner = unsafe { read_volatile(owner_field) };
    if owner == id {
        return Some(slot);
    }
    // SAFETY: as above.
    unsafe { claim(slot, owner_field, owner, id, index as u32, evict) }
}

#[inline(always)]
unsafe fn claim<S: Slot>(
    slot: *mut S,
    owner_field: *mut u64,
    owner: u64,
    id: u64,
    index: u32,
    evict: &Array<u64>,
) -> Option<*mut S> {
    // SAFETY (whole block): `slot` is a slot of this CPU's table.
    unsafe {
        if owner == 0 {
            let previous = cmpxchg(owner_field, 0, id);
            return (previous == 0 || previous == id).then_some(slot);
        }
        if owner == SLOT_RECLAIMING || evict.get(index).copied() != Some(owner) {
            return None;
        }
        if S::busy(slot) || cmpxchg(owner_field, owner, SLOT_RECLAIMING) != owner {
            return None;
        }
        // Readers skip RECLAIMING; the counters are zero before the new owner
        // is published (stores are not reordered with stores on x86).
        S::clear(slot);
        write_volatile(owner_field, id);
        Some(slot)
    }
}

/// `lock *(u64 *)(ptr) += value` (BPF_ATOMIC | BPF_ADD). The bpf target's core
/// has no atomic read-modify-write, so this is the instruction itself.
///
/// # Safety
/// `ptr` is a valid map value pointer.
#[inline(always)]
pub unsafe fn atomic_add(ptr: *mut u64, value: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's contract.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({ptr} + 0) += {value}",
            ptr = in(reg) ptr,
            value = in(reg) value,
            options(nostack),
        );
    }
    // Host builds (cargo check --workspace) only.
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's contract.
    unsafe {
        *ptr += value;
    }
}

/// Compare-and-exchange (BPF_ATOMIC | BPF_CMPXCHG, ISA v3, Linux 5.12):
/// stores `new` if `*ptr == expected`; returns what `*ptr` held.
///
/// # Safety
/// `ptr` is a valid map value pointer.
#[inline(always)]
pub unsafe fn cmpxchg(ptr: *mut u64, expected: u64, new: u64) -> u64 {
    let mut previous = expected;
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's contract.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({ptr} + 0, r0, {new})",
            ptr = in(reg) ptr,
            new = in(reg) new,
            inout("r0") previous,
            options(nostack),
        );
    }
    // Host builds (cargo check --workspace) only.
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's contract.
    unsafe {
        previous = *ptr;
        if previous == expected {
            *ptr = new;
        }
    }
    previous
}

/// `*ptr += value` with a plain load and store, for fields only one
/// non-nesting program writes.
///
/// # Safety
/// `ptr` is a valid map value pointer of this CPU.
#[inline(always)]
pub unsafe fn add(ptr: *mut u64, value: u64) {
    // SAFETY: the caller's contract.
    unsafe { write_volatile(ptr, read_volatile(ptr) + value) }
}

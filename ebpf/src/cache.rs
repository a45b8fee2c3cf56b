//! Per-CPU decision caches of the policy programs: the last answer for a
//! cgroup (its policy, and the verdict for the last device or remote
//! address), so that the common case of the same cgroup asking the same
//! question again costs no hash or trie lookup.
//!
//! An answer is valid while the policy generation it was computed under is
//! current: userspace writes a generation never used before (a random u64)
//! after every change of a policy reference, and a program reads the
//! generation *before* its lookups, so an answer computed from a reference
//! older than the current generation can never match it.
//!
//! An entry is written by a program that another program on the same CPU
//! can interrupt or preempt (cgroup_device runs preemptible; egress can nest
//! in egress). A sequence count guards it: odd while a write is under way.
//! A writer takes the entry by moving the count from the even value it read
//! to the next odd one with one compare-and-exchange, so that two writers
//! never interleave, however they are preempted; one that fails, or finds
//! the count odd, leaves the entry alone. A reader takes an entry only when
//! the count was even and unchanged around its copy. All other accesses are
//! volatile, so none is reordered across the count's.

use core::ptr::{read_volatile, write_volatile};

use crate::slots::cmpxchg;

/// One cache entry: a sequence count and a value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Entry<T: Copy> {
    seq: u64,
    value: T,
}

/// The entry's sequence count, for the functions below.
///
/// # Safety
/// `entry` points to an entry of this CPU's cache.
#[inline(always)]
pub unsafe fn seq<T: Copy>(entry: *mut Entry<T>) -> *mut u64 {
    // SAFETY: the caller's contract.
    unsafe { &raw mut (*entry).seq }
}

/// The entry's value, to read or write field by field (volatile).
///
/// # Safety
/// As for [`seq`].
#[inline(always)]
pub unsafe fn value<T: Copy>(entry: *mut Entry<T>) -> *mut T {
    // SAFETY: the caller's contract.
    unsafe { &raw mut (*entry).value }
}

/// Starts a read: the sequence count when no write is under way. Read the
/// fields with volatile loads, then check them with [`unchanged`].
///
/// # Safety
/// `seq` points to the sequence count of an entry of this CPU's cache.
#[inline(always)]
pub unsafe fn read_begin(seq: *const u64) -> Option<u64> {
    // SAFETY: the caller's contract.
    let count = unsafe { read_volatile(seq) };
    (count & 1 == 0).then_some(count)
}

/// Whether no write happened since [`read_begin`] returned `count`.
///
/// # Safety
/// As for [`read_begin`].
#[inline(always)]
pub unsafe fn unchanged(seq: *const u64, count: u64) -> bool {
    // SAFETY: the caller's contract.
    unsafe { read_volatile(seq) == count }
}

/// Starts a write: `None` when another write is under way or got in first
/// (then the entry must be left alone); else pass the count to
/// [`write_end`] once every field is written (volatile).
///
/// # Safety
/// As for [`read_begin`].
#[inline(always)]
pub unsafe fn write_begin(seq: *mut u64) -> Option<u64> {
    // SAFETY (whole block): the caller's contract.
    unsafe {
        let count = read_volatile(seq);
        if count & 1 != 0 || cmpxchg(seq, count, count + 1) != count {
            return None;
        }
        Some(count)
    }
}

/// Ends a write started by [`write_begin`].
///
/// # Safety
/// As for [`read_begin`].
#[inline(always)]
pub unsafe fn write_end(seq: *mut u64, count: u64) {
    // SAFETY: the caller's contract.
    unsafe { write_volatile(seq, count + 2) }
}

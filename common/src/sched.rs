//! Per-cgroup CPU and scheduler accounting, from the sched tracepoints.

/// Buckets of the run-queue latency histogram. Bucket `i` counts waits of
/// `[2^i, 2^(i+1))` microseconds; bucket 0 also takes everything under 1 µs
/// and the last one everything from 2^24 µs (about 17 s) on.
pub const LATENCY_BUCKETS: usize = 25;

/// Slots in the per-CPU sched slot table (see [`SchedSlotTable`]).
pub const SCHED_SLOTS: usize = 128;

/// The bucket of a wait of `ns` nanoseconds.
#[inline(always)]
#[must_use]
pub const fn latency_bucket(ns: u64) -> usize {
    // log2 of whole microseconds by halving steps: straight-line code the
    // BPF verifier takes. `ns / 1000 >= 2^k` exactly when `ns >= 1000 << k`,
    // so no step divides (a 64-bit division is the slowest instruction of
    // the switch path).
    let mut bucket = 0;
    if ns >= 1000 << 16 {
        bucket = 16;
    }
    if ns >= 1000 << (bucket + 8) {
        bucket += 8;
    }
    if ns >= 1000 << (bucket + 4) {
        bucket += 4;
    }
    if ns >= 1000 << (bucket + 2) {
        bucket += 2;
    }
    if ns >= 1000 << (bucket + 1) {
        bucket += 1;
    }
    if bucket >= LATENCY_BUCKETS {
        LATENCY_BUCKETS - 1
    } else {
        bucket
    }
}

/// The smallest wait, in ns, of the bucket after `bucket` (its upper bound).
#[must_use]
pub const fn latency_bucket_le_ns(bucket: usize) -> u64 {
    (1u64 << (bucket + 1)) * 1000
}

/// One cgroup's scheduler counters on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedCounters {
    /// Time its tasks ran on this CPU, in ns (closed intervals: up to their
    /// last switch out).
    pub cpu_ns: u64,
    /// Its tasks left the CPU because they blocked (sleep, I/O, lock).
    pub voluntary: u64,
    /// Its tasks left the CPU while still runnable (preempted).
    pub involuntary: u64,
    /// Processes (not threads) its tasks created.
    pub started: u64,
    /// Processes whose last thread exited in it.
    pub exited: u64,
    /// Longest run-queue wait seen, in ns.
    pub latency_max_ns: u64,
    /// Run-queue waits by [`latency_bucket`].
    pub latency: [u64; LATENCY_BUCKETS],
}

impl SchedCounters {
    pub const ZERO: Self = Self {
        cpu_ns: 0,
        voluntary: 0,
        involuntary: 0,
        started: 0,
        exited: 0,
        latency_max_ns: 0,
        latency: [0; LATENCY_BUCKETS],
    };

    /// Field-wise sum (maximum for `latency_max_ns`).
    #[must_use]
    pub fn plus(mut self, other: &Self) -> Self {
        self.cpu_ns = self.cpu_ns.saturating_add(other.cpu_ns);
        self.voluntary = self.voluntary.saturating_add(other.voluntary);
        self.involuntary = self.involuntary.saturating_add(other.involuntary);
        self.started = self.started.saturating_add(other.started);
        self.exited = self.exited.saturating_add(other.exited);
        if other.latency_max_ns > self.latency_max_ns {
            self.latency_max_ns = other.latency_max_ns;
        }
        let mut i = 0;
        while i < LATENCY_BUCKETS {
            self.latency[i] = self.latency[i].saturating_add(other.latency[i]);
            i += 1;
        }
        self
    }
}

/// One cgroup's slot: 256 bytes, four cache lines.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SchedSlot {
    /// Owner: a cgroup id, 0 for a free slot, or [`crate::SLOT_RECLAIMING`].
    pub cgroup_id: u64,
    pub counters: SchedCounters,
}

/// Every sched slot of one CPU (32 KiB, the largest per-CPU map value).
///
/// Plain adds are exact: sched_switch runs with interrupts off, task_newtask
/// and sched_process_exit with preemption off, and the one program that runs
/// in interrupts (the tick, on hrtimer_expire_entry) writes only `cpu_ns`,
/// atomically, as it can interrupt itself.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SchedSlotTable {
    pub slots: [SchedSlot; SCHED_SLOTS],
}

/// What the sched programs keep per task (task local storage).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskState {
    /// Its `sched_info.run_delay` (total ns waited in run queues) at its last
    /// switch out; [`TaskState::UNKNOWN`] when first seen running (at a tick),
    /// so that its next wait is not sampled.
    pub run_delay_ns: u64,
    /// Its `se.sum_exec_runtime` (total ns on a CPU, as the kernel charges
    /// its cgroup) when last charged: at its last switch out or tick.
    pub exec_ns: u64,
    /// Its cgroup when last charged, or its parent's for a new task; 0 while
    /// unknown (then neither baseline is known).
    pub cgroup_id: u64,
}

impl TaskState {
    /// A baseline not known yet.
    pub const UNKNOWN: u64 = u64::MAX;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_fall_in_log2_microsecond_buckets() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1_999), 0);
        assert_eq!(latency_bucket(2_000), 1);
        assert_eq!(latency_bucket(3_999), 1);
        assert_eq!(latency_bucket(4_000), 2);
        assert_eq!(latency_bucket(1_500_000), 10);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        // Every power of two of microseconds, and either side of it.
        for k in 0..40 {
            for ns in [(1000u64 << k) - 1, 1000 << k, (1000 << k) + 1, 1500 << k] {
                let us = ns / 1000;
                let log2 = if us == 0 { 0 } else { us.ilog2() as usize };
                assert_eq!(latency_bucket(ns), log2.min(LATENCY_BUCKETS - 1), "{ns} ns");
            }
        }
        assert_eq!(latency_bucket_le_ns(0), 2_000);
        assert_eq!(latency_bucket_le_ns(10), 2_048_000);
    }

    #[test]
    fn the_layouts_fit_the_per_cpu_value_limit() {
        assert_eq!(core::mem::size_of::<SchedSlot>(), 256);
        assert_eq!(core::mem::size_of::<SchedSlotTable>(), 32 * 1024);
    }
}

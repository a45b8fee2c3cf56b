//! Denial events to userspace: a ring buffer, behind a per-CPU token bucket so
//! that a tight loop of denials cannot flood userspace. Events held back are
//! counted by the caller.

use aya_ebpf::{
    helpers::generated::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{PerCpuArray, RingBuf},
    Global,
};
use common::events::{Bucket, Event, COMM_LEN};

/// Events per second per CPU, and the burst (set by the loader).
#[unsafe(no_mangle)]
static EVENT_RATE: Global<u64> = Global::new(common::DEFAULT_EVENT_RATE);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map(name = "EVENT_BUCKET")]
static EVENT_BUCKET: PerCpuArray<Bucket> = PerCpuArray::with_max_entries(1, 0);

/// Takes one token from this CPU's bucket; `false` when it is empty.
#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(bucket) = EVENT_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    let rate = EVENT_RATE.load();
    let full = rate * 1000;
    // SAFETY: this CPU's bucket; a program preempting this one (a packet
    // in softirq) at worst grants or refuses one token too many.
    unsafe {
        let elapsed = now.saturating_sub((*bucket).last_ns);
        // rate tokens per second = rate * 1000 milli-tokens per 1e9 ns.
        let refill = elapsed.min(1_000_000_000) * rate / 1_000_000;
        let tokens = ((*bucket).milli_tokens + refill).min(full);
        (*bucket).last_ns = now;
        if tokens >= 1000 {
            (*bucket).milli_tokens = tokens - 1000;
            true
        } else {
            (*bucket).milli_tokens = tokens;
            false
        }
    }
}

/// Sends `event` (time, and with `task` the current pid and command, filled
/// in here) unless the rate limit holds it back; returns whether it was sent.
#[inline(always)]
pub fn send(mut event: Event, task: bool) -> bool {
    // SAFETY: helpers without pointer arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_token(now) {
        return false;
    }
    event.time_ns = now;
    if task {
        // SAFETY: as above.
        event.pid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
        let mut comm = [0u8; COMM_LEN];
        // SAFETY: a buffer of COMM_LEN bytes.
        unsafe { bpf_get_current_comm(comm.as_mut_ptr().cast(), COMM_LEN as u32) };
        event.comm = comm;
    }
    EVENTS.output::<Event>(&event, 0).is_ok()
}

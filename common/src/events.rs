//! Events the kernel programs send to userspace on the `EVENTS` ring buffer:
//! denials, rate-limited in the kernel.

/// [`Event::kind`]: a device access was denied.
pub const EVENT_DEVICE_DENIED: u32 = 1;

/// Longest task name (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;

/// One event (fixed size; fields a kind does not use are zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    /// The pid (thread group id) of the task, as the host sees it.
    pub pid: u32,
    /// CLOCK_MONOTONIC ns.
    pub time_ns: u64,
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
    /// Device: `TYPE_BLOCK` or `TYPE_CHAR`, numbers, and the access asked for.
    pub dev_type: u32,
    pub major: u32,
    pub minor: u32,
    pub access: u32,
}

impl Event {
    pub const ZERO: Self = Self {
        kind: 0,
        pid: 0,
        time_ns: 0,
        cgroup_id: 0,
        comm: [0; COMM_LEN],
        dev_type: 0,
        major: 0,
        minor: 0,
        access: 0,
    };
}

/// Per-CPU token bucket of the event rate limit (`EVENT_BUCKET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens, in thousandths of an event.
    pub milli_tokens: u64,
    pub last_ns: u64,
}

//! Events the kernel programs send to userspace on the `EVENTS` ring buffer:
//! denials, rate-limited in the kernel.

/// [`Event::kind`]: a device access was denied.
pub const EVENT_DEVICE_DENIED: u32 = 1;
/// [`Event::kind`]: a packet was dropped by network policy.
pub const EVENT_NET_DENIED: u32 = 2;

/// [`Event::net_reason`]: a rule or default denied the packet.
pub const REASON_POLICY: u8 = 1;
/// [`Event::net_reason`]: a `connect()` the rules deny was refused (EPERM)
/// before any packet was sent.
pub const REASON_CONNECT: u8 = 2;

/// Longest task name (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;

/// One event (fixed size; fields a kind does not use are zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    /// The pid (thread group id) of the task, as the host sees it; 0 when
    /// not known (a packet received, or sent from interrupt context).
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
    /// Network: `FAMILY_V4` or `FAMILY_V6`, the IP protocol, the direction
    /// (`DIR_EGRESS`/`DIR_INGRESS`), the reason, and the rule that decided
    /// (`RULE_DEFAULT`: the default).
    pub net_family: u8,
    pub net_protocol: u8,
    pub net_direction: u8,
    pub net_reason: u8,
    pub net_rule: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: [u8; 6],
    /// Addresses in network order (IPv4 in the first four bytes).
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
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
        net_family: 0,
        net_protocol: 0,
        net_direction: 0,
        net_reason: 0,
        net_rule: 0,
        src_port: 0,
        dst_port: 0,
        _pad: [0; 6],
        src_addr: [0; 16],
        dst_addr: [0; 16],
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

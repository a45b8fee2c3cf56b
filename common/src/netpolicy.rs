//! Network policy: the maps' keys and values shared by the cgroup_skb guard
//! programs and the enforcer.
//!
//! A cgroup's [`NetPolicyRef`] (`NET_POLICY`, by cgroup id) says which rule
//! version applies, the defaults, the class id and mark to set, and the
//! bandwidth caps. Rules live in one LPM trie (`NET_RULES`) whose key is the
//! version, the direction, the family and the address: the longest prefix
//! holding a packet's remote address yields the (at most
//! [`RULES_PER_PREFIX`]) rules that can match it, in order.

/// Protocol codes of compiled rules (IP protocol numbers; ICMPv6 is folded
/// into [`PROTO_ICMP`]).
pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Most rules the kernel checks for one address block.
pub const RULES_PER_PREFIX: usize = 16;

/// Directions, in keys and counters.
pub const DIR_EGRESS: u8 = 0;
pub const DIR_INGRESS: u8 = 1;

/// Address families, in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Bits of [`NetPolicyRef::flags`].
/// Egress rules apply (look the trie up).
pub const FLAG_EGRESS_RULES: u32 = 1;
/// The egress default is deny.
pub const FLAG_EGRESS_DENY: u32 = 2;
pub const FLAG_INGRESS_RULES: u32 = 4;
pub const FLAG_INGRESS_DENY: u32 = 8;
/// Set `skb->priority` to `classid` on egress.
pub const FLAG_CLASSID: u32 = 16;
/// Set `skb->mark` to `mark` on egress.
pub const FLAG_MARK: u32 = 32;

/// The rule index of a direction's default in hit counters and events.
pub const RULE_DEFAULT: u16 = u16::MAX;

/// A token bucket's parameters (GCRA): each byte costs `ns_per_byte_q16 /
/// 65536` ns of the budget, and a packet conforms while the bucket's
/// theoretical arrival time is at most `burst_ns` ahead of now. Up to
/// `drop_ns` ahead, egress packets pass with congestion notification;
/// beyond, they are dropped. Zero `ns_per_byte_q16`: no cap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateSpec {
    pub ns_per_byte_q16: u64,
    pub burst_ns: u64,
    pub drop_ns: u64,
}

/// The network policy in force for a cgroup. Written whole, in one update:
/// every packet sees one version of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetPolicyRef {
    pub version: u32,
    /// [`crate::devices::OWNER_DAEMON`] or [`crate::devices::OWNER_RUN`].
    pub owner: u32,
    pub flags: u32,
    /// `(major << 16) | minor`, as net_cls took it.
    pub classid: u32,
    pub mark: u32,
    pub _pad: u32,
    pub egress_rate: RateSpec,
    pub ingress_rate: RateSpec,
}

/// Length of [`NetRuleKey::data`] in bits before the address: version (32),
/// direction (8), family (8), padding (16).
pub const KEY_HEADER_BITS: u32 = 64;

/// A `NET_RULES` LPM trie key's data (the trie adds the prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetRuleKey {
    pub version: u32,
    pub direction: u8,
    pub family: u8,
    pub _pad: u16,
    /// The address in network order (IPv4 in the first four bytes).
    pub addr: [u8; 16],
}

/// One compiled rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetRuleEntry {
    /// [`PROTO_ANY`], [`PROTO_TCP`], ...
    pub protocol: u8,
    /// 1: allow, 0: deny.
    pub allow: u8,
    /// The rule's index in its direction.
    pub index: u16,
    /// Inclusive; `0..=65535` for a rule without ports.
    pub port_low: u16,
    pub port_high: u16,
}

/// The rules that can match an address block, in order (`NET_RULES` value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetRuleSet {
    pub count: u32,
    pub _pad: u32,
    pub rules: [NetRuleEntry; RULES_PER_PREFIX],
}

/// `NET_RATE` key: a cgroup's bucket in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateKey {
    pub cgroup_id: u64,
    pub direction: u32,
    pub _pad: u32,
}

/// `NET_RATE` value: the theoretical arrival time (CLOCK_MONOTONIC ns) of
/// the next byte, shared by every CPU (updated by compare-and-exchange).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub tat_ns: u64,
}

/// Per cgroup and CPU (`NET_DROPS`): packets the guard dropped, and why.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetDrops {
    pub policy_packets: u64,
    pub policy_bytes: u64,
    pub rate_packets: u64,
    pub rate_bytes: u64,
    /// Egress packets let through with congestion notification (over the
    /// rate, inside the notification band).
    pub rate_marked: u64,
    /// `connect()` calls refused (EPERM) because the rules deny the address.
    pub refused_connects: u64,
    /// Denials whose event the rate limit held back.
    pub suppressed: u64,
}

impl NetDrops {
    #[must_use]
    pub const fn plus(self, other: Self) -> Self {
        Self {
            policy_packets: self.policy_packets.saturating_add(other.policy_packets),
            policy_bytes: self.policy_bytes.saturating_add(other.policy_bytes),
            rate_packets: self.rate_packets.saturating_add(other.rate_packets),
            rate_bytes: self.rate_bytes.saturating_add(other.rate_bytes),
            rate_marked: self.rate_marked.saturating_add(other.rate_marked),
            refused_connects: self.refused_connects.saturating_add(other.refused_connects),
            suppressed: self.suppressed.saturating_add(other.suppressed),
        }
    }
}

/// Slots in the per-CPU table of default-rule hits (see [`GuardSlotTable`]).
pub const GUARD_SLOTS: usize = 256;

/// One cgroup's hits of its default rules on one CPU, as slot
/// `id & (GUARD_SLOTS - 1)`, by direction ([`DIR_EGRESS`], [`DIR_INGRESS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardSlot {
    /// Owner: a cgroup id, 0 for a free slot, or [`crate::SLOT_RECLAIMING`].
    pub cgroup_id: u64,
    pub defaults: [Hits; 2],
    /// Kept by the programs only (userspace never reads it).
    pub holder: PolicyHolder,
}

/// Which cgroup's policy covers a cgroup that has no `NET_POLICY` entry of
/// its own: its nearest ancestor with one, or none. The programs remember
/// it per CPU in the cgroup's slot, valid under the policy generation it was
/// found under, and guarded by a sequence count (odd while a write is under
/// way; see ebpf/src/cache.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyHolder {
    pub seq: u64,
    /// The cgroup it was found for (a slot handed on keeps the old one's).
    pub cgroup_id: u64,
    /// `NET_GENERATION` when it was found.
    pub generation: u64,
    /// The ancestor's id, or 0: no policy covers the cgroup.
    pub holder: u64,
}

/// Every guard slot of one CPU (18 KiB). Most packets of a policed cgroup
/// are decided by its default; counting them is then one array element and
/// an offset away instead of a hash lookup, which cost as much as the rest
/// of the guard. A cgroup whose slot another holds, and the hits of explicit
/// rules, count in `NET_HITS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GuardSlotTable {
    pub slots: [GuardSlot; GUARD_SLOTS],
}

/// `NET_HITS` key: a rule of a cgroup's policy ([`RULE_DEFAULT`]: the default).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HitKey {
    pub cgroup_id: u64,
    pub direction: u8,
    pub _pad: u8,
    pub rule: u16,
    pub _pad2: u32,
}

/// `NET_HITS` value per CPU: packets and bytes a rule decided.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hits {
    pub packets: u64,
    pub bytes: u64,
}

impl Hits {
    pub const ZERO: Self = Self {
        packets: 0,
        bytes: 0,
    };

    #[must_use]
    pub const fn plus(self, other: Self) -> Self {
        Self {
            packets: self.packets.saturating_add(other.packets),
            bytes: self.bytes.saturating_add(other.bytes),
        }
    }
}

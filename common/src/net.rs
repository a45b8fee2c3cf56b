//! Per-cgroup network counters.

/// Bytes and packets of one cgroup on one CPU, as the cgroup_skb programs
/// count them. Bytes are `skb->len` at the network layer: the IP header and
/// everything after it, no link-layer header.
///
/// Ingress only touches `rx_*` and egress only `tx_*`. Egress can be
/// interrupted on the same CPU by ingress in softirq, so the two directions
/// must never share a field: plain (non-atomic) per-CPU adds are then exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

impl NetCounters {
    pub const ZERO: Self = Self {
        rx_bytes: 0,
        rx_packets: 0,
        tx_bytes: 0,
        tx_packets: 0,
    };

    /// Field-wise sum, saturating (counters of one cgroup across CPUs).
    #[must_use]
    pub const fn plus(self, other: Self) -> Self {
        Self {
            rx_bytes: self.rx_bytes.saturating_add(other.rx_bytes),
            rx_packets: self.rx_packets.saturating_add(other.rx_packets),
            tx_bytes: self.tx_bytes.saturating_add(other.tx_bytes),
            tx_packets: self.tx_packets.saturating_add(other.tx_packets),
        }
    }
}

/// Slots in the per-CPU slot table: the fast path of network accounting.
/// A cgroup's slot is `id & (NET_SLOTS - 1)` (ids are sequential inode
/// numbers, so live cgroups rarely collide); a cgroup whose slot is taken by
/// another live cgroup is counted in the overflow hash instead.
pub const NET_SLOTS: usize = 512;

/// One cgroup's counters on one CPU, one cache line.
///
/// `busy` is set by egress while it updates `tx_*`: egress in process
/// context can be interrupted by egress in softirq (a TCP ACK, a
/// retransmission) on the same CPU, and the interrupting program, seeing
/// `busy`, counts in the overflow hash with atomic adds instead of racing the
/// interrupted read-modify-write. Ingress never nests (it runs with bottom
/// halves disabled) and owns `rx_*`, so its adds need no guard.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetSlot {
    /// Owner: a cgroup id, 0 for a free slot, or [`crate::SLOT_RECLAIMING`].
    pub cgroup_id: u64,
    pub busy: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub _pad: [u64; 2],
}

impl NetSlot {
    #[must_use]
    pub const fn counters(&self) -> NetCounters {
        NetCounters {
            rx_bytes: self.rx_bytes,
            rx_packets: self.rx_packets,
            tx_bytes: self.tx_bytes,
            tx_packets: self.tx_packets,
        }
    }
}

/// Every slot of one CPU: the single value of the `NET_SLOTS` per-CPU array
/// (32 KiB, the largest per-CPU value the kernel allows). One map element
/// means the lookup is always the same hot pointer, and userspace reads every
/// CPU's table with one syscall.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NetSlotTable {
    pub slots: [NetSlot; NET_SLOTS],
}

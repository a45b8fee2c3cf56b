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
    pub const ZERO: Self = Self { rx_bytes: 0, rx_packets: 0, tx_bytes: 0, tx_packets: 0 };

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

//! Network policy: cgroup_skb guard programs, one per direction, attached
//! once (at the watched root by the daemon, or at a workload's cgroup by
//! `agent run`). However often policies change, only the maps change.
//!
//! Per packet of a cgroup with a policy: classify (egress: `skb->priority`
//! = class id, `skb->mark`), then the rules (one LPM trie lookup on the
//! remote address, then at most `RULES_PER_PREFIX` compiled rules in
//! order), then the bandwidth cap (a GCRA token bucket shared by all CPUs).
//! A cgroup without a policy of its own has its nearest ancestor's (see
//! [`policy_for`]); one with neither costs a hash lookup and its slot's.
//!
//! A per-CPU cache (see [`crate::cache`]) keeps, per direction and cgroup
//! slot, the verdict of the rules for the last remote address, protocol and
//! destination port: the packets of a flow after its first skip the trie.
//!
//! These run beside the accounting programs, which count every packet the
//! cgroup sends or receives, dropped or not; drops are counted here.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_ktime_get_ns,
        bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
    programs::{SkBuffContext, SockAddrContext},
};
use common::{
    events::{Event, EVENT_NET_DENIED, REASON_CONNECT, REASON_POLICY},
    netpolicy::{
        GuardSlot, GuardSlotTable, HitKey, Hits, NetDrops, NetPolicyRef, NetRuleKey, NetRuleSet,
        RateKey, RateSpec, RateState, DIR_EGRESS, DIR_INGRESS, FAMILY_V4, FAMILY_V6, FLAG_CLASSID,
        FLAG_EGRESS_DENY, FLAG_EGRESS_RULES, FLAG_INGRESS_DENY, FLAG_INGRESS_RULES, FLAG_MARK,
        GUARD_SLOTS, KEY_HEADER_BITS, PROTO_ICMP, PROTO_TCP, PROTO_UDP, RULES_PER_PREFIX,
        RULE_DEFAULT,
    },
    DEFAULT_MAX_CGROUPS,
};
use core::ptr::{read_volatile, write_volatile};

use crate::{
    cache::{self, Entry},
    cgroup, events, owner,
    slots::{self, atomic_add, cmpxchg, Slot},
};

/// cgroup_skb verdicts; bit 1 asks for congestion notification (egress).
const DROP: i32 = 0;
const PASS: i32 = 1;
const DROP_CN: i32 = 2;
const PASS_CN: i32 = 3;

/// Address blocks of every rule version in force (and the previous ones
/// until userspace drops them).
const MAX_PREFIXES: u32 = 262_144;
/// Rules (and defaults) with hit counters, across cgroups.
const MAX_HITS: u32 = 65_536;
const IPPROTO_ICMPV6: u8 = 58;

#[map(name = "NET_POLICY")]
static NET_POLICY: HashMap<u64, NetPolicyRef> =
    HashMap::with_max_entries(DEFAULT_MAX_CGROUPS, BPF_F_NO_PREALLOC);

#[map(name = "NET_RULES")]
static NET_RULES: LpmTrie<NetRuleKey, NetRuleSet> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);

#[map(name = "NET_RATE")]
static NET_RATE: HashMap<RateKey, RateState> =
    HashMap::with_max_entries(DEFAULT_MAX_CGROUPS * 2, 0);

#[map(name = "NET_DROPS")]
static NET_DROPS: PerCpuHashMap<u64, NetDrops> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_CGROUPS, 0);

#[map(name = "NET_HITS")]
static NET_HITS: PerCpuHashMap<HitKey, Hits> = PerCpuHashMap::with_max_entries(MAX_HITS, 0);

/// Changed by userspace (to a value never used before) after every change
/// of `NET_POLICY`: verdicts cached under another generation are stale.
#[map(name = "NET_GENERATION")]
static NET_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// Cache entries per CPU and direction, chosen by the cgroup id's low bits.
const CACHE_ENTRIES: usize = 16;

/// The rules' last verdict for a cgroup in one direction, and what it was
/// for: the policy generation and version, the remote address, the protocol
/// and the destination port. The generation alone would date the answer;
/// the version and default are kept too so that a packet that meets a new
/// reference before its generation is written still gets that reference's
/// verdict, never the one before (each packet sees one whole policy).
#[derive(Clone, Copy)]
#[repr(C)]
struct CachedVerdict {
    cgroup_id: u64,
    generation: u64,
    /// version | family << 32 | protocol << 40 | destination port << 48.
    key: u64,
    remote: u128,
    /// `allow << 16 | rule`.
    answer: u32,
    default_allow: u8,
    _pad: [u8; 3],
}

#[map(name = "NET_GUARD_CACHE")]
static GUARD_CACHE: PerCpuArray<[Entry<CachedVerdict>; 2 * CACHE_ENTRIES]> =
    PerCpuArray::with_max_entries(1, 0);

#[map(name = "NET_GUARD_SLOTS")]
static GUARD_SLOT_TABLE: PerCpuArray<GuardSlotTable> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "NET_GUARD_EVICT")]
static GUARD_EVICT: Array<u64> = Array::with_max_entries(GUARD_SLOTS as u32, 0);

// SAFETY: GuardSlotTable is #[repr(C)] with its GUARD_SLOTS slots first.
unsafe impl slots::Table for GuardSlotTable {
    type Slot = GuardSlot;
    const LEN: usize = GUARD_SLOTS;
}

// SAFETY: GuardSlot is #[repr(C)] with its owner first.
unsafe impl Slot for GuardSlot {
    unsafe fn clear(this: *mut Self) {
        // SAFETY: the trait's contract.
        unsafe { write_volatile(&raw mut (*this).defaults, [Hits::ZERO; 2]) }
    }
}

/// The policy covering cgroup `id` and the cgroup holding it: `id`'s own
/// entry, else its nearest ancestor's (`ancestor(level)` gives the id at a
/// level, 0 past `id`'s own). A policy covers its subtree, so a cgroup made
/// under a policed one, by a workload or before the daemon has written its
/// entry, is policed from its first packet. Which ancestor holds it (or
/// that none does) is remembered per CPU in `id`'s guard slot under the
/// generation, so a cgroup without an entry costs one slot lookup more
/// than the hash miss, and the walk happens once per CPU and generation
/// (each time for a cgroup whose slot another live cgroup holds).
#[inline(always)]
fn policy_for(
    id: u64,
    generation: u64,
    ancestor: impl Fn(i32) -> u64,
) -> Option<(u64, &'static NetPolicyRef)> {
    // SAFETY (lookups): plain data reads; the map does not preallocate, so
    // an entry replaced meanwhile stays whole until this program is done (RCU).
    if let Some(policy) = unsafe { NET_POLICY.get(&id) } {
        return Some((id, policy));
    }
    let slot = slots::of(&GUARD_SLOT_TABLE, u64::MAX, id, &GUARD_EVICT);
    // SAFETY: a slot of this CPU's table.
    let remembered = slot.and_then(|slot| unsafe { remembered_holder(slot, id, generation) });
    let holder = match remembered {
        Some(holder) => holder,
        None => {
            let nearest = cgroup::nearest(id, ancestor, |above| {
                unsafe { NET_POLICY.get(&above) }.map(|_| ())
            })
            .map_or(0, |(above, ())| above);
            if let Some(slot) = slot {
                // SAFETY: as above.
                unsafe { remember_holder(slot, id, generation, nearest) };
            }
            nearest
        }
    };
    if holder == 0 {
        return None;
    }
    unsafe { NET_POLICY.get(&holder) }.map(|policy| (holder, policy))
}

/// The holder `slot` remembers for cgroup `id` under `generation` (0: none).
///
/// # Safety
/// `slot` is a slot of this CPU's table.
#[inline(always)]
unsafe fn remembered_holder(slot: *mut GuardSlot, id: u64, generation: u64) -> Option<u64> {
    // SAFETY (whole block): the caller's contract; read field by field
    // (volatile) between two reads of the sequence count.
    unsafe {
        let memory = &raw mut (*slot).holder;
        let seq = cache::read_begin(&raw const (*memory).seq)?;
        let hit = read_volatile(&raw const (*memory).cgroup_id) == id
            && read_volatile(&raw const (*memory).generation) == generation;
        let holder = read_volatile(&raw const (*memory).holder);
        (hit && cache::unchanged(&raw const (*memory).seq, seq)).then_some(holder)
    }
}

/// Remembers `holder` for cgroup `id` under `generation` in `slot`, unless
/// another write is under way.
///
/// # Safety
/// As for [`remembered_holder`].
#[inline(always)]
unsafe fn remember_holder(slot: *mut GuardSlot, id: u64, generation: u64, holder: u64) {
    // SAFETY (whole block): the caller's contract; written field by field.
    unsafe {
        let memory = &raw mut (*slot).holder;
        if let Some(seq) = cache::write_begin(&raw mut (*memory).seq) {
            write_volatile(&raw mut (*memory).cgroup_id, id);
            write_volatile(&raw mut (*memory).generation, generation);
            write_volatile(&raw mut (*memory).holder, holder);
            cache::write_end(&raw mut (*memory).seq, seq);
        }
    }
}

#[cgroup_skb(egress)]
pub fn net_guard_egress(ctx: SkBuffContext) -> i32 {
    guard(&ctx, DIR_EGRESS)
}

#[cgroup_skb(ingress)]
pub fn net_guard_ingress(ctx: SkBuffContext) -> i32 {
    guard(&ctx, DIR_INGRESS)
}

/// Refuses a `connect()` the egress rules deny: the caller gets EPERM at
/// once (a dropped SYN alone would leave TCP retrying for minutes). The
/// packet guards stay the backstop for everything sent otherwise.
#[cgroup_sock_addr(connect4)]
pub fn net_guard_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, FAMILY_V4)
}

#[cgroup_sock_addr(connect6)]
pub fn net_guard_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, FAMILY_V6)
}

#[inline(always)]
fn connect(ctx: &SockAddrContext, family: u8) -> i32 {
    // The task's cgroup: connect() runs in the caller's context.
    // SAFETY: a helper without arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // Read before the policy: see crate::cache.
    let generation = NET_GENERATION.get(0).copied().unwrap_or(0);
    // SAFETY (ancestors): a helper without pointer arguments.
    let Some((holder, policy)) = policy_for(id, generation, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    }) else {
        return PASS;
    };
    if policy.flags & FLAG_EGRESS_RULES == 0 {
        return PASS;
    }
    let address = ctx.sock_addr;
    let mut packet = Packet {
        family,
        protocol: 0,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
    };
    // SAFETY: the context is the kernel's bpf_sock_addr; fields read whole.
    unsafe {
        let protocol = (*address).protocol as u8;
        packet.protocol = if protocol == IPPROTO_ICMPV6 {
            PROTO_ICMP
        } else {
            protocol
        };
        // user_port holds the port in network order in its low 16 bits.
        packet.dst_port = u16::from_be((*address).user_port as u16);
        if family == FAMILY_V4 {
            packet.dst[..4].copy_from_slice(&(*address).user_ip4.to_ne_bytes());
        } else {
            let words = [
                (*address).user_ip6[0],
                (*address).user_ip6[1],
                (*address).user_ip6[2],
                (*address).user_ip6[3],
            ];
            if words[0] == 0 && words[1] == 0 && words[2] == u32::from_be(0xffff) {
                // An IPv4-mapped address: its packets are IPv4.
                packet.family = FAMILY_V4;
                packet.dst[..4].copy_from_slice(&words[3].to_ne_bytes());
            } else {
                for (i, word) in words.iter().enumerate() {
                    packet.dst[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
                }
            }
        }
    }
    if packet.protocol != PROTO_TCP && packet.protocol != PROTO_UDP {
        packet.dst_port = 0;
    }
    let (allow, rule) = decide(
        policy.version,
        DIR_EGRESS,
        &packet,
        policy.flags & FLAG_EGRESS_DENY == 0,
    );
    if allow {
        return PASS;
    }
    if owner::mine(owner::counter(policy.owner, holder)) {
        count_drop(id, |d| unsafe { &raw mut (*d).refused_connects }, None);
        report(id, DIR_EGRESS, rule, &packet, REASON_CONNECT, true);
    }
    DROP
}

/// What the headers say about a packet.
struct Packet {
    family: u8,
    protocol: u8,
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
}

#[inline(always)]
fn guard(ctx: &SkBuffContext, direction: u8) -> i32 {
    // SAFETY: the context pointer is the program's own __sk_buff.
    let id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    // Read before the policy: see crate::cache.
    let generation = NET_GENERATION.get(0).copied().unwrap_or(0);
    // SAFETY (ancestors): the context pointer is the program's own __sk_buff.
    let Some((holder, policy)) = policy_for(id, generation, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(ctx.skb.skb.cast(), level)
    }) else {
        return PASS;
    };
    let len = u64::from(ctx.len());
    let egress = direction == DIR_EGRESS;
    // Both the daemon's and a workload's programs may run for this packet:
    // both enforce the rules, one counts, reports and charges the cap.
    let mine = owner::mine(owner::counter(policy.owner, holder));
    if egress {
        // SAFETY: priority and mark are writable for cgroup_skb.
        unsafe {
            if policy.flags & FLAG_CLASSID != 0 {
                (*ctx.skb.skb).priority = policy.classid;
            }
            if policy.flags & FLAG_MARK != 0 {
                (*ctx.skb.skb).mark = policy.mark;
            }
        }
    }
    let (rules, deny) = if egress {
        (FLAG_EGRESS_RULES, FLAG_EGRESS_DENY)
    } else {
        (FLAG_INGRESS_RULES, FLAG_INGRESS_DENY)
    };
    if policy.flags & rules != 0 {
        if let Some(packet) = parse(ctx) {
            let question = (u64::from(policy.version) << 16)
                | (u64::from(direction) << 8)
                | u64::from(policy.flags & deny == 0);
            let answer = cached_decide(id, generation, question, &packet);
            let (allow, rule) = (answer >> 16 != 0, answer as u16);
            if mine {
                count_hit(id, direction, rule, len);
            }
            if !allow {
                if mine {
                    denied(id, direction, rule, &packet, len);
                }
                return DROP;
            }
        }
    }
    let rate = if egress {
        &policy.egress_rate
    } else {
        &policy.ingress_rate
    };
    if rate.ns_per_byte_q16 == 0 || !mine {
        return PASS;
    }
    match limit(id, direction, rate, len) {
        Verdict::Pass => PASS,
        Verdict::Mark => {
            count_drop(id, |d| unsafe { &raw mut (*d).rate_marked }, None);
            // Only egress may ask for congestion notification.
            if egress {
                PASS_CN
            } else {
                PASS
            }
        }
        Verdict::Drop => {
            count_drop(
                id,
                |d| unsafe { &raw mut (*d).rate_packets },
                Some((|d| unsafe { &raw mut (*d).rate_bytes }, len)),
            );
            if egress {
                DROP_CN
            } else {
                DROP
            }
        }
    }
}

/// `N` bytes at `offset` of the packet's linear data, read directly (no
/// helper call), if the linear data holds them.
#[inline(always)]
fn direct<const N: usize>(data: usize, end: usize, offset: usize) -> Option<[u8; N]> {
    let start = data + offset;
    if start + N > end {
        return None;
    }
    // SAFETY: within [data, data_end), which the verifier checks too.
    Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
}

/// Reads the IP header and, for the first fragment of TCP and UDP, the
/// ports: straight from the linear data when it holds them (nearly always:
/// the stack has pulled the headers by the time cgroup_skb runs), else
/// through `bpf_skb_load_bytes`. Extension headers of IPv6 are not walked:
/// a packet with one matches rules of protocol `any` without ports only.
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Packet> {
    // SAFETY: __sk_buff fields the verifier turns into packet pointers.
    let (data, end) = unsafe {
        (
            (*ctx.skb.skb).data as usize,
            (*ctx.skb.skb).data_end as usize,
        )
    };
    if let Some(header) = direct::<20>(data, end, 0) {
        if header[0] >> 4 == 4 {
            let mut packet = Packet {
                family: FAMILY_V4,
                protocol: header[9],
                src: [0; 16],
                dst: [0; 16],
                src_port: 0,
                dst_port: 0,
            };
            packet.src[..4].copy_from_slice(&header[12..16]);
            packet.dst[..4].copy_from_slice(&header[16..20]);
            let offset = (u16::from(header[6] & 0x1f) << 8) | u16::from(header[7]);
            if offset == 0 && (packet.protocol == PROTO_TCP || packet.protocol == PROTO_UDP) {
                let at = usize::from(header[0] & 0x0f) * 4;
                let ports = match direct::<4>(data, end, at) {
                    Some(ports) => ports,
                    None => ctx.load::<[u8; 4]>(at).ok()?,
                };
                packet.src_port = u16::from_be_bytes([ports[0], ports[1]]);
                packet.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
            }
            return Some(packet);
        }
    }
    parse_loaded(ctx)
}

/// [`parse`] through `bpf_skb_load_bytes`: IPv6, and headers outside the
/// linear data.
#[inline(always)]
fn parse_loaded(ctx: &SkBuffContext) -> Option<Packet> {
    let first: u8 = ctx.load(0).ok()?;
    let mut packet = Packet {
        family: 0,
        protocol: 0,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
    };
    let (ports_at, fragment) = match first >> 4 {
        4 => {
            let header: [u8; 20] = ctx.load(0).ok()?;
            packet.family = FAMILY_V4;
            packet.protocol = header[9];
            packet.src[..4].copy_from_slice(&header[12..16]);
            packet.dst[..4].copy_from_slice(&header[16..20]);
            let offset = (u16::from(header[6] & 0x1f) << 8) | u16::from(header[7]);
            (usize::from(header[0] & 0x0f) * 4, offset != 0)
        }
        6 => {
            let header: [u8; 40] = ctx.load(0).ok()?;
            packet.family = FAMILY_V6;
            packet.protocol = if header[6] == IPPROTO_ICMPV6 {
                PROTO_ICMP
            } else {
                header[6]
            };
            packet.src.copy_from_slice(&header[8..24]);
            packet.dst.copy_from_slice(&header[24..40]);
            (40, false)
        }
        _ => return None,
    };
    if !fragment && (packet.protocol == PROTO_TCP || packet.protocol == PROTO_UDP) {
        if let Ok(ports) = ctx.load::<[u8; 4]>(ports_at) {
            packet.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            packet.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
        }
    }
    Some(packet)
}

/// [`decide`] for cgroup `id`'s packet, through this CPU's cache. The
/// question packs the policy's version (bits 16 to 47), the direction (bits
/// 8 to 15) and whether the default allows (bit 0); the answer is
/// `allow << 16 | rule`. A call of its own (its stack is not the guard's).
#[inline(never)]
fn cached_decide(id: u64, generation: u64, question: u64, packet: &Packet) -> u32 {
    let version = (question >> 16) as u32;
    let direction = (question >> 8) as u8 & 1;
    let default_allow = question as u8 & 1;
    let remote = if direction == DIR_EGRESS {
        packet.dst
    } else {
        packet.src
    };
    let entry = GUARD_CACHE.get_ptr_mut(0).map(|entries| {
        let index =
            usize::from(direction) * CACHE_ENTRIES + (id & (CACHE_ENTRIES as u64 - 1)) as usize;
        // SAFETY: the index is below 2 * CACHE_ENTRIES.
        unsafe { entries.cast::<Entry<CachedVerdict>>().add(index) }
    });
    // The key, as the entry holds it in its first 32 bytes after the ids.
    let ports = u64::from(version)
        | (u64::from(packet.family) << 32)
        | (u64::from(packet.protocol) << 40)
        | (u64::from(packet.dst_port) << 48);
    let remote = u128::from_ne_bytes(remote);
    if let Some(entry) = entry {
        // SAFETY (whole block): an entry of this CPU's cache, read field by
        // field (volatile) between two reads of its sequence count.
        unsafe {
            if let Some(seq) = cache::read_begin(cache::seq(entry)) {
                let cached = cache::value(entry);
                let hit = read_volatile(&raw const (*cached).cgroup_id) == id
                    && read_volatile(&raw const (*cached).generation) == generation
                    && read_volatile(&raw const (*cached).key) == ports
                    && read_volatile(&raw const (*cached).default_allow) == default_allow
                    && read_volatile(&raw const (*cached).remote) == remote;
                let answer = read_volatile(&raw const (*cached).answer);
                if hit && cache::unchanged(cache::seq(entry), seq) {
                    return answer;
                }
            }
        }
    }
    let (allow, rule) = decide(version, direction, packet, default_allow != 0);
    let answer = (u32::from(allow) << 16) | u32::from(rule);
    if let Some(entry) = entry {
        // SAFETY (whole block): as above, written field by field.
        unsafe {
            if let Some(seq) = cache::write_begin(cache::seq(entry)) {
                let cached = cache::value(entry);
                write_volatile(&raw mut (*cached).cgroup_id, id);
                write_volatile(&raw mut (*cached).generation, generation);
                write_volatile(&raw mut (*cached).key, ports);
                write_volatile(&raw mut (*cached).default_allow, default_allow);
                write_volatile(&raw mut (*cached).remote, remote);
                write_volatile(&raw mut (*cached).answer, answer);
                cache::write_end(cache::seq(entry), seq);
            }
        }
    }
    answer
}

/// The first rule (of the longest prefix holding the remote address) that
/// matches the protocol and the destination port; else the default.
#[inline(always)]
fn decide(version: u32, direction: u8, packet: &Packet, default_allow: bool) -> (bool, u16) {
    let addr = if direction == DIR_EGRESS {
        packet.dst
    } else {
        packet.src
    };
    let bits = if packet.family == FAMILY_V4 { 32 } else { 128 };
    let key = Key::new(
        KEY_HEADER_BITS + bits,
        NetRuleKey {
            version,
            direction,
            family: packet.family,
            _pad: 0,
            addr,
        },
    );
    // Trie entries are RCU-freed: a replaced one stays whole meanwhile.
    let Some(set) = NET_RULES.get(&key) else {
        return (default_allow, RULE_DEFAULT);
    };
    let port = packet.dst_port;
    for i in 0..RULES_PER_PREFIX {
        if i as u32 >= set.count {
            break;
        }
        let rule = &set.rules[i];
        if (rule.protocol == 0 || rule.protocol == packet.protocol)
            && port >= rule.port_low
            && port <= rule.port_high
        {
            return (rule.allow != 0, rule.index);
        }
    }
    (default_allow, RULE_DEFAULT)
}

enum Verdict {
    Pass,
    /// Over the rate but inside the notification band (egress only).
    Mark,
    Drop,
}

/// GCRA: a packet conforms while the bucket's theoretical arrival time is at
/// most `burst` ahead of now; a conforming packet moves it on by its cost.
/// Up to `drop` ahead, packets pass marked for congestion notification
/// (egress; userspace makes the band empty for ingress).
#[inline(always)]
fn limit(id: u64, direction: u8, rate: &RateSpec, len: u64) -> Verdict {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = RateKey {
        cgroup_id: id,
        direction: u32::from(direction),
        _pad: 0,
    };
    let state = match NET_RATE.get_ptr_mut(&key) {
        Some(state) => state,
        None => {
            let _ = NET_RATE.insert(&key, &RateState { tat_ns: now }, u64::from(BPF_NOEXIST));
            match NET_RATE.get_ptr_mut(&key) {
                Some(state) => state,
                None => return Verdict::Pass,
            }
        }
    };
    let cost = (len * rate.ns_per_byte_q16) >> 16;
    let band = rate.drop_ns;
    // SAFETY: a map value shared by every CPU: read once, replaced only by
    // compare-and-exchange.
    let tat_field = unsafe { &raw mut (*state).tat_ns };
    for _ in 0..4 {
        // SAFETY: as above.
        let tat = unsafe { read_volatile(tat_field) };
        let base = if tat > now { tat } else { now };
        let ahead = base - now;
        if ahead > band {
            return Verdict::Drop;
        }
        // SAFETY: as above.
        if unsafe { cmpxchg(tat_field, tat, base + cost) } == tat {
            return if ahead > rate.burst_ns {
                Verdict::Mark
            } else {
                Verdict::Pass
            };
        }
    }
    // Contended four times over: charge it anyway, and let it pass.
    // SAFETY: as above.
    unsafe { atomic_add(tat_field, cost) };
    Verdict::Pass
}

#[inline(always)]
fn count_hit(id: u64, direction: u8, rule: u16, len: u64) {
    if rule == RULE_DEFAULT {
        if let Some(slot) = slots::of(&GUARD_SLOT_TABLE, u64::MAX, id, &GUARD_EVICT) {
            // SAFETY: a slot of this CPU's table; direction is 0 or 1.
            // Atomic, as egress can nest in egress.
            unsafe {
                let hits = (&raw mut (*slot).defaults)
                    .cast::<Hits>()
                    .add(usize::from(direction & 1));
                atomic_add(&raw mut (*hits).packets, 1);
                atomic_add(&raw mut (*hits).bytes, len);
            }
            return;
        }
    }
    let key = HitKey {
        cgroup_id: id,
        direction,
        _pad: 0,
        rule,
        _pad2: 0,
    };
    let hits = match NET_HITS.get_ptr_mut(&key) {
        Some(hits) => hits,
        None => {
            let _ = NET_HITS.insert(&key, &Hits::default(), u64::from(BPF_NOEXIST));
            match NET_HITS.get_ptr_mut(&key) {
                Some(hits) => hits,
                None => return,
            }
        }
    };
    // SAFETY: this CPU's value; atomic, as egress can nest in egress.
    unsafe {
        atomic_add(&raw mut (*hits).packets, 1);
        atomic_add(&raw mut (*hits).bytes, len);
    }
}

/// Adds one to a drop counter of `id` (and `bytes.1` to `bytes.0`).
#[inline(always)]
fn count_drop(
    id: u64,
    field: fn(*mut NetDrops) -> *mut u64,
    bytes: Option<(fn(*mut NetDrops) -> *mut u64, u64)>,
) {
    let drops = match NET_DROPS.get_ptr_mut(&id) {
        Some(drops) => drops,
        None => {
            let _ = NET_DROPS.insert(&id, &NetDrops::default(), u64::from(BPF_NOEXIST));
            match NET_DROPS.get_ptr_mut(&id) {
                Some(drops) => drops,
                None => return,
            }
        }
    };
    // SAFETY: this CPU's value; atomic, as egress can nest in egress.
    unsafe {
        atomic_add(field(drops), 1);
        if let Some((field, len)) = bytes {
            atomic_add(field(drops), len);
        }
    }
}

/// Counts a packet the rules denied, and reports it (rate-limited).
#[inline(never)]
fn denied(id: u64, direction: u8, rule: u16, packet: &Packet, len: u64) {
    count_drop(
        id,
        |d| unsafe { &raw mut (*d).policy_packets },
        Some((|d| unsafe { &raw mut (*d).policy_bytes }, len)),
    );
    // The task is the sender only when it is of the packet's cgroup: egress
    // from process context. Received packets have no task.
    // SAFETY: a helper without arguments.
    let task = direction == DIR_EGRESS && unsafe { bpf_get_current_cgroup_id() } == id;
    report(id, direction, rule, packet, REASON_POLICY, task);
}

/// Sends a denial event, or counts it as suppressed.
#[inline(always)]
fn report(id: u64, direction: u8, rule: u16, packet: &Packet, reason: u8, task: bool) {
    let event = Event {
        kind: EVENT_NET_DENIED,
        cgroup_id: id,
        net_family: packet.family,
        net_protocol: packet.protocol,
        net_direction: direction,
        net_reason: reason,
        net_rule: rule,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        src_addr: packet.src,
        dst_addr: packet.dst,
        ..Event::ZERO
    };
    if !events::send(event, task) {
        count_drop(id, |d| unsafe { &raw mut (*d).suppressed }, None);
    }
}

//! Network rules: address (CIDR), protocol and port matching per direction,
//! net_cls-style classification and bandwidth caps; and their compilation
//! into the LPM trie the kernel program looks up.
//!
//! Matching order, exactly: per direction, the rules are tried in order; the
//! first whose CIDR contains the remote address (the destination on egress,
//! the source on ingress), whose protocol is the packet's (or `any`), and
//! whose port range holds the packet's port (the remote port on egress, the
//! local port on ingress: the destination port either way; a rule without
//! ports matches any) decides, allow or deny. When none does, the
//! direction's default decides.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use common::netpolicy::{RateSpec, PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP, RULES_PER_PREFIX};
use serde_json::Value;

use super::{devices::Action, kind, shown, Checker};

/// A protocol a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "any" => Ok(Self::Any),
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "icmp" => Ok(Self::Icmp),
            other => Err(format!("protocol {other:?} is none of tcp, udp, icmp, any")),
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        }
    }

    const fn code(self) -> u8 {
        match self {
            Self::Any => PROTO_ANY,
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Icmp => PROTO_ICMP,
        }
    }
}

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `fd00::/8`, or a single address.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("{text:?} is not an address or CIDR such as 10.0.0.0/8 or fd00::/8")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{text:?}: prefix length {len:?} is not 0 to {max}"))?,
        };
        Ok(Self {
            addr: mask(addr, len),
            len,
        })
    }

    /// Whether this block holds all of `other`.
    #[must_use]
    pub fn contains(&self, other: &Self) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && self.len <= other.len
            && mask(other.addr, self.len) == self.addr
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRule {
    pub action: Action,
    /// `None`: any address of either family.
    pub cidr: Option<Cidr>,
    pub protocol: Protocol,
    /// Inclusive port range.
    pub ports: Option<(u16, u16)>,
}

/// `80` or `8000-9000`.
pub fn parse_ports(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("ports {text:?} are not a port or a range such as 80 or 8000-9000");
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let (low, high) = (
        low.trim().parse::<u16>().map_err(|_| bad())?,
        high.trim().parse::<u16>().map_err(|_| bad())?,
    );
    if low > high || low == 0 {
        return Err(bad());
    }
    Ok((low, high))
}

/// The rules and default of one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Direction {
    pub default: Action,
    pub rules: Vec<NetRule>,
}

/// A bandwidth cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub bits_per_s: u64,
    pub burst_bytes: u64,
}

/// Parses `50mbit`, `1gbit`, `800kbit`, `10mbps` (bytes), or plain bits per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let bad = || format!("rate {text:?} is not a rate such as 50mbit, 1gbit or 10mbps");
    let lower = text.trim().to_ascii_lowercase();
    let digits = lower
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(digits);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let multiplier: f64 = match unit {
        "" | "bit" | "bps" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        _ => return Err(bad()),
    };
    let bits = value * multiplier;
    if !(1000.0..=1e12).contains(&bits) {
        return Err(format!("rate {text:?} is outside 1kbit to 1000gbit"));
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "range checked"
    )]
    Ok(bits as u64)
}

/// A network policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkPolicy {
    pub egress: Option<Direction>,
    pub ingress: Option<Direction>,
    pub egress_rate: Option<Rate>,
    pub ingress_rate: Option<Rate>,
    /// net_cls class id, as `(major << 16) | minor`.
    pub classid: Option<u32>,
    pub mark: Option<u32>,
}

/// `1:10` → `0x0001_000a` (hex digits, as tc and net_cls write them).
pub fn parse_classid(text: &str) -> Result<u32, String> {
    let bad = || {
        format!("classid {text:?} is not MAJOR:MINOR such as 1:10 (hex digits, as tc writes them)")
    };
    let (major, minor) = text.split_once(':').ok_or_else(bad)?;
    let major = u32::from_str_radix(major, 16)
        .ok()
        .filter(|v| *v <= 0xffff && *v > 0)
        .ok_or_else(bad)?;
    let minor = u32::from_str_radix(minor, 16)
        .ok()
        .filter(|v| *v <= 0xffff)
        .ok_or_else(bad)?;
    Ok((major << 16) | minor)
}

/// Most rules per direction (rule indexes are 16 bits, one kept for the default).
pub const MAX_RULES: usize = 65_535;

/// A direction's compiled trie entries, by address block.
pub type Table = BTreeMap<Cidr, Vec<CompiledRule>>;

/// A compiled rule: what the kernel checks after the trie lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompiledRule {
    pub protocol: u8,
    pub port_low: u16,
    pub port_high: u16,
    pub allow: bool,
    /// Index of the rule in its direction's list.
    pub index: u16,
}

/// The trie entries of one direction: for every CIDR a rule names (and `/0`
/// of each family), the rules that contain it, in order. The longest prefix
/// holding a packet's address then holds exactly the rules that match that
/// address, in order.
///
/// Linear in the rules (each prefix looks up its at most 129 ancestors), so
/// that 100,000 CIDRs compile in well under a second.
pub fn compile(direction: &Direction) -> Result<Table, String> {
    if direction.rules.len() > MAX_RULES {
        return Err(format!(
            "{} rules, more than the {MAX_RULES} a direction may have",
            direction.rules.len()
        ));
    }
    let mut by_cidr: HashMap<Cidr, Vec<usize>> = HashMap::new();
    let mut everywhere = Vec::new();
    for (index, rule) in direction.rules.iter().enumerate() {
        match rule.cidr {
            Some(cidr) => by_cidr.entry(cidr).or_default().push(index),
            None => everywhere.push(index),
        }
    }
    let mut prefixes: Vec<Cidr> = by_cidr.keys().copied().collect();
    prefixes.push(Cidr {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        len: 0,
    });
    prefixes.push(Cidr {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        len: 0,
    });
    prefixes.sort();
    prefixes.dedup();
    let mut table = BTreeMap::new();
    for prefix in prefixes {
        let mut indexes = everywhere.clone();
        for len in 0..=prefix.len {
            let ancestor = Cidr {
                addr: mask(prefix.addr, len),
                len,
            };
            if let Some(found) = by_cidr.get(&ancestor) {
                indexes.extend(found);
            }
        }
        indexes.sort_unstable();
        let rules: Vec<CompiledRule> = indexes
            .into_iter()
            .map(|index| {
                let rule = &direction.rules[index];
                CompiledRule {
                    protocol: rule.protocol.code(),
                    port_low: rule.ports.map_or(0, |p| p.0),
                    port_high: rule.ports.map_or(u16::MAX, |p| p.1),
                    allow: rule.action == Action::Allow,
                    index: u16::try_from(index).unwrap_or(u16::MAX),
                }
            })
            .collect();
        if rules.len() > RULES_PER_PREFIX {
            let shown = format!("{}/{}", prefix.addr, prefix.len);
            return Err(format!(
                "{} rules apply to {shown}, more than the {RULES_PER_PREFIX} the kernel checks per address block: \
                 fold them, or narrow their addresses",
                rules.len()
            ));
        }
        table.insert(prefix, rules);
    }
    Ok(table)
}

/// The decision of `direction` for a packet, by the matching order above
/// (the reference the kernel's table must agree with).
#[must_use]
pub fn decide(
    direction: &Direction,
    addr: IpAddr,
    protocol: Protocol,
    port: u16,
) -> (Action, Option<usize>) {
    let host = Cidr {
        addr,
        len: if addr.is_ipv4() { 32 } else { 128 },
    };
    direction
        .rules
        .iter()
        .enumerate()
        .find(|(_, rule)| {
            rule.cidr.is_none_or(|cidr| cidr.contains(&host))
                && (rule.protocol == Protocol::Any || rule.protocol == protocol)
                && rule
                    .ports
                    .is_none_or(|(low, high)| (low..=high).contains(&port))
        })
        .map_or((direction.default, None), |(index, rule)| {
            (rule.action, Some(index))
        })
}

/// `agent run`'s compact rule: `CIDR[:PORTS][/PROTO]`, with brackets around
/// an IPv6 block that has ports (`[fd00::/8]:443/tcp`).
pub fn parse_compact(text: &str, action: Action) -> Result<NetRule, String> {
    let (rest, protocol) = match text.rsplit_once('/') {
        Some((rest, proto)) if ["tcp", "udp", "icmp", "any"].contains(&proto) => {
            (rest, Protocol::parse(proto)?)
        }
        _ => (text, Protocol::Any),
    };
    let (cidr, ports) = if let Some(inner) = rest.strip_prefix('[') {
        let (cidr, after) = inner
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: missing ]"))?;
        (cidr, after.strip_prefix(':'))
    } else if rest.parse::<Ipv6Addr>().is_ok()
        || rest.contains("::")
        || rest.matches(':').count() > 1
    {
        (rest, None)
    } else {
        match rest.rsplit_once(':') {
            Some((cidr, ports)) => (cidr, Some(ports)),
            None => (rest, None),
        }
    };
    let cidr = if cidr == "any" || cidr == "*" {
        None
    } else {
        Some(Cidr::parse(cidr)?)
    };
    let ports = ports.map(parse_ports).transpose()?;
    if ports.is_some() && matches!(protocol, Protocol::Icmp) {
        return Err(format!("{text:?}: icmp has no ports"));
    }
    Ok(NetRule {
        action,
        cidr,
        protocol,
        ports,
    })
}

/// The default burst. Egress: 5 ms at the rate, and at least 64 KiB (the
/// largest packet the stack hands down at once with segmentation offload).
/// Ingress: 20 ms at the rate, and at least 1 MiB. A received packet cannot
/// be marked, only dropped, and a TCP sender over veth or with receive
/// offload delivers 64 KiB at a time: with the egress default, a 50 Mbit/s
/// ingress cap let through 6% of its rate (each drop cost the sender whole
/// windows and timeouts); with 1 MiB, about 85% (`cargo xtask bench net`).
#[must_use]
pub fn default_burst(bits_per_s: u64, egress: bool) -> u64 {
    if egress {
        (bits_per_s / 8 / 200).max(64 * 1024)
    } else {
        (bits_per_s / 8 / 50).max(1024 * 1024)
    }
}

/// How far past the burst egress packets still pass, with congestion
/// notification, before drops begin. A TCP sender whose packet is dropped
/// locally with nothing in flight retries only from its probe timer (200 ms
/// or more): a band that covers that long at the rate keeps the link busy
/// through the wait. The cap still holds over time; it is exceeded by at
/// most burst plus this band, once.
pub const NOTIFY_BAND_NS: u64 = 250_000_000;

impl Rate {
    /// The kernel's form: nanoseconds per byte (16.16 fixed point), the
    /// burst as time, and where drops begin: after the notification band on
    /// egress, right after the burst on ingress (a received packet cannot be
    /// told to slow down).
    #[must_use]
    pub fn spec(&self, egress: bool) -> RateSpec {
        let bits = u128::from(self.bits_per_s.max(1));
        let per_byte = 8_000_000_000u128 * 65_536 / bits;
        let burst =
            u64::try_from(u128::from(self.burst_bytes) * 8_000_000_000 / bits).unwrap_or(u64::MAX);
        let drop = if egress {
            burst.saturating_add(burst.max(NOTIFY_BAND_NS))
        } else {
            burst
        };
        RateSpec {
            ns_per_byte_q16: u64::try_from(per_byte).unwrap_or(u64::MAX),
            burst_ns: burst,
            drop_ns: drop,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Display for NetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = if self.action == Action::Allow {
            "allow"
        } else {
            "deny"
        };
        let cidr = self
            .cidr
            .map_or_else(|| "any".to_owned(), |c| c.to_string());
        write!(f, "{action} {cidr}")?;
        if self.protocol != Protocol::Any {
            write!(f, " {}", self.protocol.name())?;
        }
        match self.ports {
            Some((low, high)) if low == high => write!(f, " port {low}"),
            Some((low, high)) => write!(f, " ports {low}-{high}"),
            None => Ok(()),
        }
    }
}

impl Checker {
    /// A policy's `"network"` section.
    pub(super) fn network(&mut self, value: &Value, place: &str) -> Option<NetworkPolicy> {
        let Value::Object(fields) = value else {
            self.problem(
                place,
                format!(
                    "{} is not an object with \"egress\", \"ingress\", \"classid\" or \"mark\"",
                    kind(value)
                ),
            );
            return None;
        };
        const KNOWN: [&str; 4] = ["egress", "ingress", "classid", "mark"];
        for key in fields.keys().filter(|k| !KNOWN.contains(&k.as_str())) {
            self.problem(
                format!("{place}.{key}"),
                "unknown field (known: egress, ingress, classid, mark)",
            );
        }
        let before = self.problems.len();
        let mut policy = NetworkPolicy::default();
        for (name, rules, rate) in [
            ("egress", &mut policy.egress, &mut policy.egress_rate),
            ("ingress", &mut policy.ingress, &mut policy.ingress_rate),
        ] {
            if let Some(value) = fields.get(name) {
                (*rules, *rate) =
                    self.direction(value, &format!("{place}.{name}"), name == "egress");
            }
        }
        match fields.get("classid") {
            None => {}
            Some(Value::String(text)) => match parse_classid(text) {
                Ok(classid) => policy.classid = Some(classid),
                Err(message) => self.problem(format!("{place}.classid"), message),
            },
            Some(other) => self.problem(
                format!("{place}.classid"),
                format!("{} is not a string such as \"1:10\"", kind(other)),
            ),
        }
        match fields.get("mark") {
            None => {}
            Some(Value::Number(n)) if n.as_u64().is_some_and(|m| m <= u64::from(u32::MAX)) => {
                policy.mark = n.as_u64().and_then(|m| u32::try_from(m).ok());
            }
            Some(Value::String(text)) if parse_mark(text).is_some() => {
                policy.mark = parse_mark(text)
            }
            Some(other) => self.problem(
                format!("{place}.mark"),
                format!(
                    "{} is not a 32-bit mark such as 42 or \"0x2a\"",
                    shown(other)
                ),
            ),
        }
        if policy == NetworkPolicy::default() && self.problems.len() == before {
            self.problem(
                place,
                "it sets nothing: give \"egress\", \"ingress\", \"classid\" or \"mark\"",
            );
        }
        (self.problems.len() == before).then_some(policy)
    }

    fn direction(
        &mut self,
        value: &Value,
        place: &str,
        egress: bool,
    ) -> (Option<Direction>, Option<Rate>) {
        let Value::Object(fields) = value else {
            self.problem(
                place,
                format!(
                    "{} is not an object with \"default\", \"rules\", \"rate\" and \"burst\"",
                    kind(value)
                ),
            );
            return (None, None);
        };
        const KNOWN: [&str; 4] = ["default", "rules", "rate", "burst"];
        for key in fields.keys().filter(|k| !KNOWN.contains(&k.as_str())) {
            self.problem(
                format!("{place}.{key}"),
                "unknown field (known: default, rules, rate, burst)",
            );
        }
        let rate = match fields.get("rate") {
            None => None,
            Some(Value::String(text)) => match parse_rate(text) {
                Ok(bits) => Some(bits),
                Err(message) => {
                    self.problem(format!("{place}.rate"), message);
                    None
                }
            },
            Some(other) => {
                self.problem(
                    format!("{place}.rate"),
                    format!("{} is not a string such as \"50mbit\"", kind(other)),
                );
                None
            }
        };
        let burst = match fields.get("burst") {
            None => None,
            Some(value) => {
                let bytes = match value {
                    Value::Number(n) => n.as_u64(),
                    Value::String(text) => crate::units::parse_size(text),
                    _ => None,
                };
                match bytes {
                    Some(bytes) if bytes >= 1500 => Some(bytes),
                    _ => {
                        self.problem(
                            format!("{place}.burst"),
                            format!(
                                "{} is not a size of at least 1500 bytes such as \"64k\"",
                                shown(value)
                            ),
                        );
                        None
                    }
                }
            }
        };
        if burst.is_some() && fields.get("rate").is_none() {
            self.problem(
                format!("{place}.burst"),
                "a burst without a \"rate\": give the rate too",
            );
        }
        let rate = rate.map(|bits_per_s| Rate {
            bits_per_s,
            burst_bytes: burst.unwrap_or_else(|| default_burst(bits_per_s, egress)),
        });
        let default = fields
            .get("default")
            .and_then(|value| self.default_action(value, place));
        let mut rules = Vec::new();
        match fields.get("rules") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(rule) = self.net_rule(item, &format!("{place}.rules[{i}]")) {
                        rules.push(rule);
                    }
                }
            }
            Some(other) => self.problem(
                format!("{place}.rules"),
                format!("{} is not a list", kind(other)),
            ),
        }
        let direction = match (default, fields.contains_key("default")) {
            (Some(default), _) => Some(Direction { default, rules }),
            (None, false) if fields.get("rules").is_some_and(|r| !r.is_null()) => {
                self.problem(
                    place,
                    "\"default\" is missing: say \"allow\" or \"deny\" for packets no rule matches",
                );
                None
            }
            _ => None,
        };
        if let Some(direction) = &direction {
            if let Err(message) = compile(direction) {
                self.problem(format!("{place}.rules"), message);
            }
        }
        (direction, rate)
    }

    fn net_rule(&mut self, item: &Value, place: &str) -> Option<NetRule> {
        let Value::Object(rule) = item else {
            self.problem(place, format!("{} is not an object such as {{\"deny\": \"10.0.0.0/8\", \"protocol\": \"tcp\", \"ports\": \"80\"}}", kind(item)));
            return None;
        };
        let mut action = None;
        for key in rule.keys() {
            match key.as_str() {
                "allow" | "deny" if action.is_some() => {
                    self.problem(place, "both \"allow\" and \"deny\": a rule has one action");
                    return None;
                }
                "allow" => action = Some((Action::Allow, &rule["allow"])),
                "deny" => action = Some((Action::Deny, &rule["deny"])),
                "protocol" | "ports" => {}
                other => self.problem(
                    format!("{place}.{other}"),
                    "unknown field (known: allow, deny, protocol, ports)",
                ),
            }
        }
        let Some((action, target)) = action else {
            self.problem(
                place,
                "no action: give {\"allow\": CIDR} or {\"deny\": CIDR}",
            );
            return None;
        };
        let Value::String(target) = target else {
            self.problem(
                place,
                format!(
                    "the address is {}, not a string such as \"10.0.0.0/8\" or \"any\"",
                    kind(target)
                ),
            );
            return None;
        };
        let mut parsed = match parse_compact(target, action) {
            Ok(parsed) => parsed,
            Err(message) => {
                self.problem(place, message);
                return None;
            }
        };
        match rule.get("protocol") {
            None => {}
            Some(Value::String(text)) => match Protocol::parse(text) {
                Ok(protocol) => parsed.protocol = protocol,
                Err(message) => {
                    self.problem(format!("{place}.protocol"), message);
                    return None;
                }
            },
            Some(other) => {
                self.problem(
                    format!("{place}.protocol"),
                    format!("{} is not a string (tcp, udp, icmp or any)", kind(other)),
                );
                return None;
            }
        }
        match rule.get("ports") {
            None => {}
            Some(value) => {
                let text = match value {
                    Value::Number(n) => n.to_string(),
                    Value::String(text) => text.clone(),
                    other => kind(other).to_owned(),
                };
                match parse_ports(&text) {
                    Ok(ports) => parsed.ports = Some(ports),
                    Err(message) => {
                        self.problem(format!("{place}.ports"), message);
                        return None;
                    }
                }
            }
        }
        if parsed.ports.is_some() && parsed.protocol == Protocol::Icmp {
            self.problem(place, "icmp has no ports");
            return None;
        }
        Some(parsed)
    }
}

/// A mark as a decimal or `0x` hex string.
fn parse_mark(text: &str) -> Option<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: Action, cidr: &str, protocol: Protocol, ports: Option<(u16, u16)>) -> NetRule {
        NetRule {
            action,
            cidr: Some(Cidr::parse(cidr).unwrap()),
            protocol,
            ports,
        }
    }

    #[test]
    fn cidrs_ports_rates_and_classids_parse() {
        assert_eq!(
            Cidr::parse("10.1.2.3/8").unwrap(),
            Cidr {
                addr: "10.0.0.0".parse().unwrap(),
                len: 8
            }
        );
        assert_eq!(
            Cidr::parse("fd00::1/16").unwrap(),
            Cidr {
                addr: "fd00::".parse().unwrap(),
                len: 16
            }
        );
        assert_eq!(Cidr::parse("192.0.2.7").unwrap().len, 32);
        assert!(Cidr::parse("10.0.0.0/33")
            .unwrap_err()
            .contains("prefix length"));
        assert!(Cidr::parse("ten")
            .unwrap_err()
            .contains("is not an address"));
        assert_eq!(parse_ports("80"), Ok((80, 80)));
        assert_eq!(parse_ports("8000-9000"), Ok((8000, 9000)));
        assert!(parse_ports("9000-8000").is_err());
        assert_eq!(parse_rate("50mbit"), Ok(50_000_000));
        assert_eq!(parse_rate("1.5gbit"), Ok(1_500_000_000));
        assert_eq!(parse_rate("10mbps"), Ok(80_000_000));
        assert!(parse_rate("fast").unwrap_err().contains("is not a rate"));
        assert_eq!(parse_classid("1:10"), Ok(0x0001_0010));
        assert_eq!(parse_classid("ffff:a"), Ok(0xffff_000a));
        assert!(parse_classid("1").is_err());
        assert!(parse_classid("0:1").is_err());
    }

    #[test]
    fn compact_rules_for_agent_run() {
        let r = parse_compact("10.0.0.0/8:80-443/tcp", Action::Deny).unwrap();
        assert_eq!(
            r,
            rule(Action::Deny, "10.0.0.0/8", Protocol::Tcp, Some((80, 443)))
        );
        let r = parse_compact("[fd00::/8]:53/udp", Action::Allow).unwrap();
        assert_eq!(
            r,
            rule(Action::Allow, "fd00::/8", Protocol::Udp, Some((53, 53)))
        );
        let r = parse_compact("fd00::/8", Action::Allow).unwrap();
        assert_eq!(r, rule(Action::Allow, "fd00::/8", Protocol::Any, None));
        let r = parse_compact("192.0.2.1", Action::Deny).unwrap();
        assert_eq!(r, rule(Action::Deny, "192.0.2.1/32", Protocol::Any, None));
        let r = parse_compact("any:22/tcp", Action::Deny).unwrap();
        assert_eq!(
            r,
            NetRule {
                action: Action::Deny,
                cidr: None,
                protocol: Protocol::Tcp,
                ports: Some((22, 22))
            }
        );
        assert!(parse_compact("10.0.0.0/8:80/icmp", Action::Deny)
            .unwrap_err()
            .contains("icmp has no ports"));
    }

    /// The kernel's lookup: the longest prefix holding the address, then its
    /// rules in order.
    fn kernel(
        table: &Table,
        default: Action,
        addr: IpAddr,
        protocol: u8,
        port: u16,
    ) -> (Action, Option<usize>) {
        let host = Cidr {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        };
        let rules = table
            .iter()
            .filter(|(prefix, _)| prefix.contains(&host))
            .max_by_key(|(prefix, _)| prefix.len)
            .map(|(_, r)| r)
            .unwrap();
        rules
            .iter()
            .find(|r| {
                (r.protocol == PROTO_ANY || r.protocol == protocol)
                    && (r.port_low..=r.port_high).contains(&port)
            })
            .map_or((default, None), |r| {
                (
                    if r.allow { Action::Allow } else { Action::Deny },
                    Some(usize::from(r.index)),
                )
            })
    }

    #[test]
    fn the_compiled_trie_agrees_with_the_ordered_rules() {
        let direction = Direction {
            default: Action::Allow,
            rules: vec![
                rule(
                    Action::Allow,
                    "10.1.2.0/24",
                    Protocol::Tcp,
                    Some((443, 443)),
                ),
                rule(Action::Deny, "10.0.0.0/8", Protocol::Any, None),
                rule(Action::Deny, "0.0.0.0/0", Protocol::Udp, Some((5000, 6000))),
                rule(Action::Allow, "10.1.2.3/32", Protocol::Any, None),
                rule(Action::Deny, "fd00::/8", Protocol::Tcp, None),
                NetRule {
                    action: Action::Deny,
                    cidr: None,
                    protocol: Protocol::Icmp,
                    ports: None,
                },
            ],
        };
        let table = compile(&direction).unwrap();
        for addr in [
            "10.1.2.3",
            "10.1.2.4",
            "10.9.9.9",
            "192.0.2.1",
            "fd00::1",
            "fe80::1",
        ] {
            let addr: IpAddr = addr.parse().unwrap();
            for (protocol, code) in [
                (Protocol::Tcp, PROTO_TCP),
                (Protocol::Udp, PROTO_UDP),
                (Protocol::Icmp, PROTO_ICMP),
            ] {
                for port in [0, 22, 443, 5500, 7000] {
                    assert_eq!(
                        kernel(&table, direction.default, addr, code, port),
                        decide(&direction, addr, protocol, port),
                        "{addr} {protocol:?} {port}"
                    );
                }
            }
        }
        // Rule order: the allow of 10.1.2.0/24 tcp 443 comes before the broader deny.
        assert_eq!(
            decide(&direction, "10.1.2.9".parse().unwrap(), Protocol::Tcp, 443),
            (Action::Allow, Some(0))
        );
        assert_eq!(
            decide(&direction, "10.1.2.9".parse().unwrap(), Protocol::Tcp, 80),
            (Action::Deny, Some(1))
        );
        // And the later allow of 10.1.2.3 never wins over the earlier deny.
        assert_eq!(
            decide(&direction, "10.1.2.3".parse().unwrap(), Protocol::Udp, 53),
            (Action::Deny, Some(1))
        );
    }

    #[test]
    fn too_many_overlapping_rules_are_refused() {
        let rules = (0..=RULES_PER_PREFIX)
            .map(|i| {
                rule(
                    Action::Deny,
                    "10.0.0.0/8",
                    Protocol::Tcp,
                    Some((i as u16 + 1, i as u16 + 1)),
                )
            })
            .collect();
        let err = compile(&Direction {
            default: Action::Allow,
            rules,
        })
        .unwrap_err();
        assert!(err.contains("rules apply to 10.0.0.0/8"), "{err}");
    }
}

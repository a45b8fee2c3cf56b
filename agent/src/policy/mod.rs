//! The policy file: which cgroups get which device (and network) rules.
//! Pure: parsing and validation, no maps and no aya.
//!
//! ```json
//! {
//!   "version": 1,
//!   "policies": [
//!     {
//!       "name": "sandbox",
//!       "cgroups": ["/web", "/batch/*"],
//!       "workloads": ["build"],
//!       "devices": {
//!         "default": "deny",
//!         "rules": [{"allow": "c 1:3 rw"}, {"deny": "c 1:9 w"}, {"allow": "c 1:9 r"}]
//!       }
//!     }
//!   ]
//! }
//! ```
//!
//! `cgroups` are paths relative to the watched root, with `*` matching within
//! one path segment, `**` across segments and `?` one character;
//! `workloads` are `agent run` names. A cgroup gets the first policy (in file
//! order) that selects it, and a cgroup no policy selects gets its nearest
//! selected ancestor's (a policy covers a subtree, as a v1 devices cgroup
//! did). An invalid file is rejected whole, with every error and where it is.

pub mod devices;
pub mod network;

use std::{collections::HashMap, fmt};

use serde_json::Value;

pub use self::{
    devices::{Action, DevicePolicy},
    network::NetworkPolicy,
};

/// The only file format version so far.
pub const VERSION: u64 = 1;

/// One problem in a policy file, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `line 3, column 7` for syntax, a field path (`policies[2].devices.rules[1]`) for meaning.
    pub place: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.place, self.message)
    }
}

/// Every problem of a rejected file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid(pub Vec<Problem>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "{}", text.join("; "))
    }
}

/// Which cgroups a policy covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selectors {
    pub cgroups: Vec<String>,
    pub workloads: Vec<String>,
}

/// One policy of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub select: Selectors,
    pub devices: Option<DevicePolicy>,
    pub network: Option<NetworkPolicy>,
}

/// A valid policy file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyFile {
    pub policies: Vec<Policy>,
}

pub(crate) struct Checker {
    pub(crate) problems: Vec<Problem>,
}

impl Checker {
    pub(crate) fn problem(&mut self, place: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            place: place.into(),
            message: message.into(),
        });
    }

    /// The `default` of a rule list at `place`: "allow" or "deny", else a
    /// problem at `place.default`.
    pub(crate) fn default_action(&mut self, value: &Value, place: &str) -> Option<Action> {
        match value {
            Value::String(text) if text == "allow" => Some(Action::Allow),
            Value::String(text) if text == "deny" => Some(Action::Deny),
            other => {
                self.problem(
                    format!("{place}.default"),
                    format!("{} is neither \"allow\" nor \"deny\"", shown(other)),
                );
                None
            }
        }
    }

    fn strings(&mut self, value: Option<&Value>, place: &str) -> Vec<String> {
        match value {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| match item {
                    Value::String(text) => Some(text.clone()),
                    other => {
                        self.problem(
                            format!("{place}[{i}]"),
                            format!("{} is not a string", kind(other)),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.problem(place, format!("{} is not a list of strings", kind(other)));
                Vec::new()
            }
        }
    }

    fn devices(&mut self, value: &Value, place: &str) -> Option<DevicePolicy> {
        let Value::Object(fields) = value else {
            self.problem(
                place,
                format!(
                    "{} is not an object with \"default\" and \"rules\"",
                    kind(value)
                ),
            );
            return None;
        };
        for key in fields
            .keys()
            .filter(|k| !["default", "rules"].contains(&k.as_str()))
        {
            self.problem(
                format!("{place}.{key}"),
                "unknown field (known: default, rules)",
            );
        }
        let default = match fields.get("default") {
            Some(value) => self.default_action(value, place),
            None => {
                self.problem(place, "\"default\" is missing: say \"allow\" or \"deny\"");
                None
            }
        };
        let mut rules = Vec::new();
        match fields.get("rules") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let rule_place = format!("{place}.rules[{i}]");
                    let parsed = match item {
                        Value::Object(rule) if rule.len() == 1 => {
                            let (key, text) = rule
                                .iter()
                                .next()
                                .map(|(k, v)| (k.as_str(), v))
                                .unwrap_or(("", &Value::Null));
                            let action = match key {
                                "allow" => Some(Action::Allow),
                                "deny" => Some(Action::Deny),
                                other => {
                                    self.problem(
                                        &rule_place,
                                        format!("{other:?} is neither \"allow\" nor \"deny\""),
                                    );
                                    None
                                }
                            };
                            match (action, text) {
                                (Some(action), Value::String(text)) => {
                                    match devices::parse_rule(text, action) {
                                        Ok(rule) => Some(rule),
                                        Err(message) => {
                                            self.problem(&rule_place, message);
                                            None
                                        }
                                    }
                                }
                                (Some(_), other) => {
                                    self.problem(
                                        &rule_place,
                                        format!(
                                            "the rule is {}, not a string such as \"c 1:3 rw\"",
                                            kind(other)
                                        ),
                                    );
                                    None
                                }
                                (None, _) => None,
                            }
                        }
                        other => {
                            self.problem(
                                &rule_place,
                                format!(
                                    "{} is not {{\"allow\": RULE}} or {{\"deny\": RULE}}",
                                    kind(other)
                                ),
                            );
                            None
                        }
                    };
                    rules.extend(parsed);
                }
            }
            Some(other) => self.problem(
                format!("{place}.rules"),
                format!("{} is not a list", kind(other)),
            ),
        }
        let policy = DevicePolicy {
            default: default?,
            rules,
        };
        let entries = policy.compile().len();
        if entries > MAX_COMPILED_ENTRIES {
            self.problem(
                place,
                format!(
                    "the rules name too many distinct majors and minors ({entries} table entries, at most {MAX_COMPILED_ENTRIES}): \
                     use fewer, or wildcards"
                ),
            );
            return None;
        }
        Some(policy)
    }
}

/// Most compiled entries one device policy may take in the kernel's table.
pub const MAX_COMPILED_ENTRIES: usize = 16_384;

pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn shown(value: &Value) -> String {
    match value {
        Value::String(text) => format!("{text:?}"),
        Value::Number(n) => n.to_string(),
        other => kind(other).to_owned(),
    }
}

/// Parses and checks a policy file's text; every problem is reported.
pub fn parse(text: &str) -> Result<PolicyFile, Invalid> {
    let value: Value = serde_json::from_str(text).map_err(|err| {
        Invalid(vec![Problem {
            place: format!("line {}, column {}", err.line(), err.column()),
            message: err
                .to_string()
                .split(" at line ")
                .next()
                .unwrap_or_default()
                .to_owned(),
        }])
    })?;
    let mut checker = Checker {
        problems: Vec::new(),
    };
    let Value::Object(top) = &value else {
        return Err(Invalid(vec![Problem {
            place: "top level".into(),
            message: format!("{} is not an object", kind(&value)),
        }]));
    };
    match top.get("version") {
        Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
        Some(other) => checker.problem(
            "version",
            format!(
                "{} is not a version this agent reads (it reads {VERSION})",
                shown(other)
            ),
        ),
        None => checker.problem(
            "version",
            format!("missing: the file must say \"version\": {VERSION}"),
        ),
    }
    for key in top
        .keys()
        .filter(|k| !["version", "policies"].contains(&k.as_str()))
    {
        checker.problem(key.clone(), "unknown field (known: version, policies)");
    }
    let mut file = PolicyFile::default();
    match top.get("policies") {
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let place = format!("policies[{i}]");
                let Value::Object(fields) = item else {
                    checker.problem(&place, format!("{} is not an object", kind(item)));
                    continue;
                };
                for key in fields.keys().filter(|k| {
                    !["name", "cgroups", "workloads", "devices", "network"].contains(&k.as_str())
                }) {
                    checker.problem(
                        format!("{place}.{key}"),
                        "unknown field (known: name, cgroups, workloads, devices, network)",
                    );
                }
                let name = match fields.get("name") {
                    None => format!("policies[{i}]"),
                    Some(Value::String(name)) => name.clone(),
                    Some(other) => {
                        checker.problem(
                            format!("{place}.name"),
                            format!("{} is not a string", kind(other)),
                        );
                        String::new()
                    }
                };
                let cgroups = checker.strings(fields.get("cgroups"), &format!("{place}.cgroups"));
                for (j, pattern) in cgroups.iter().enumerate() {
                    if !pattern.starts_with('/') {
                        checker.problem(format!("{place}.cgroups[{j}]"), format!("{pattern:?} does not start with / (paths are relative to the watched root, as in \"/web\")"));
                    }
                }
                let workloads =
                    checker.strings(fields.get("workloads"), &format!("{place}.workloads"));
                if cgroups.is_empty() && workloads.is_empty() {
                    checker.problem(&place, "it selects no cgroup: give \"cgroups\" (paths or globs) or \"workloads\" (agent run names)");
                }
                let devices = fields
                    .get("devices")
                    .and_then(|value| checker.devices(value, &format!("{place}.devices")));
                let network = fields
                    .get("network")
                    .and_then(|value| checker.network(value, &format!("{place}.network")));
                if fields.get("devices").is_none() && fields.get("network").is_none() {
                    checker.problem(
                        &place,
                        "it has no \"devices\" or \"network\" section: a policy must set something",
                    );
                }
                file.policies.push(Policy {
                    name,
                    select: Selectors { cgroups, workloads },
                    devices,
                    network,
                });
            }
        }
        Some(other) => checker.problem("policies", format!("{} is not a list", kind(other))),
        None => checker.problem(
            "policies",
            "missing: the file must have a \"policies\" list",
        ),
    }
    if checker.problems.is_empty() {
        Ok(file)
    } else {
        Err(Invalid(checker.problems))
    }
}

/// Whether `path` (a cgroup path relative to the root, starting with `/`)
/// matches `pattern`: `*` within a segment, `**` across segments, `?` one
/// character of a segment. A segment that is only `*` needs a non-empty
/// segment (`/*` is every child of the root, not the root itself).
#[must_use]
pub fn glob_matches(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8], segment_start: bool) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                (0..=s.len()).any(|i| go(&p[2..], &s[i..], false))
            }
            Some(b'*') => {
                let whole_segment = segment_start && matches!(p.get(1), None | Some(b'/'));
                (0..=s.len())
                    .take_while(|i| *i == 0 || s[i - 1] != b'/')
                    .filter(|i| !whole_segment || *i > 0)
                    .any(|i| go(&p[1..], &s[i..], false))
            }
            Some(b'?') => s.first().is_some_and(|c| *c != b'/') && go(&p[1..], &s[1..], false),
            Some(c) => s.first() == Some(c) && go(&p[1..], &s[1..], *c == b'/'),
        }
    }
    go(pattern.as_bytes(), path.as_bytes(), false)
}

impl PolicyFile {
    /// The policy (by index) each cgroup selects itself: the first in file
    /// order whose paths or workload names match it.
    fn selected(&self, path: &str, name: Option<&str>) -> Option<usize> {
        self.policies.iter().position(|policy| {
            policy
                .select
                .cgroups
                .iter()
                .any(|pattern| glob_matches(pattern, path))
                || name.is_some_and(|name| policy.select.workloads.iter().any(|w| w == name))
        })
    }

    /// The policy (by index) of every cgroup (`(id, path, workload name)`):
    /// its own selection, else its nearest selected ancestor's.
    #[must_use]
    pub fn resolve(&self, cgroups: &[(u64, &str, Option<&str>)]) -> HashMap<u64, usize> {
        let by_path: HashMap<&str, usize> = cgroups
            .iter()
            .filter_map(|(_, path, name)| Some((*path, self.selected(path, *name)?)))
            .collect();
        let mut out = HashMap::new();
        for (id, path, _) in cgroups {
            let mut at = *path;
            loop {
                if let Some(index) = by_path.get(at) {
                    out.insert(*id, *index);
                    break;
                }
                match at.rfind('/') {
                    Some(0) if at.len() > 1 => at = "/",
                    Some(cut) if cut > 0 => at = &at[..cut],
                    _ => break,
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
  "version": 1,
  "policies": [
    {"name": "web", "cgroups": ["/web", "/batch/*"], "devices": {"default": "deny", "rules": [{"allow": "c 1:3 rw"}, {"allow": "c 1:9 r"}]}},
    {"workloads": ["build"], "devices": {"default": "allow", "rules": [{"deny": "b *:* w"}]}}
  ]
}"#;

    #[test]
    fn a_good_file_parses() {
        let file = parse(GOOD).unwrap();
        assert_eq!(file.policies.len(), 2);
        assert_eq!(file.policies[0].name, "web");
        assert_eq!(file.policies[1].name, "policies[1]");
        let devices = file.policies[0].devices.as_ref().unwrap();
        assert_eq!(devices.default, Action::Deny);
        assert_eq!(
            devices
                .rules
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["c 1:3 rw", "c 1:9 r"]
        );
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let err = parse("{\n  \"version\": 1,\n  \"policies\": [,]\n}").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].place, "line 3, column 16");
        assert_eq!(err.0[0].message, "expected value");
    }

    #[test]
    fn every_meaning_error_names_its_field() {
        let text = r#"{"version": 2, "extra": 1, "policies": [
            {"cgroups": ["/a"], "devices": {"default": "deny", "rules": [{"allow": "c 1:3 rw"}, {"allow": "c x:3 r"}]}},
            {"cgroups": ["web"], "devices": {"default": "maybe"}},
            {"devices": {"default": "deny", "rules": [{"permit": "c 1:3 r"}, "c 1:3 r"]}},
            {"cgroups": ["/b"], "devices": {"default": "deny", "rules": [{"allow": "c 1:3 rx"}]}, "firewall": {}}
        ]}"#;
        let err = parse(text).unwrap_err();
        let shown: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "version: 2 is not a version this agent reads (it reads 1)",
                "extra: unknown field (known: version, policies)",
                "policies[0].devices.rules[1]: major \"x\" is neither a number nor *",
                "policies[1].cgroups[0]: \"web\" does not start with / (paths are relative to the watched root, as in \"/web\")",
                "policies[1].devices.default: \"maybe\" is neither \"allow\" nor \"deny\"",
                "policies[2]: it selects no cgroup: give \"cgroups\" (paths or globs) or \"workloads\" (agent run names)",
                "policies[2].devices.rules[0]: \"permit\" is neither \"allow\" nor \"deny\"",
                "policies[2].devices.rules[1]: a string is not {\"allow\": RULE} or {\"deny\": RULE}",
                "policies[3].firewall: unknown field (known: name, cgroups, workloads, devices, network)",
                "policies[3].devices.rules[0]: access 'x' is none of r, w, m",
            ]
        );
    }

    #[test]
    fn network_sections_parse_and_every_error_names_its_field() {
        use network::{Cidr, Protocol, Rate};
        let text = r#"{"version": 1, "policies": [{"cgroups": ["/web"], "network": {
            "egress": {"default": "deny", "rules": [
                {"allow": "10.0.0.0/8", "protocol": "tcp", "ports": "443"},
                {"allow": "[fd00::/8]:53/udp"},
                {"deny": "any", "protocol": "icmp"}],
              "rate": "50mbit", "burst": "128k"},
            "ingress": {"rate": "1gbit"},
            "classid": "1:10", "mark": "0x2a"}}]}"#;
        let file = parse(text).unwrap();
        let network = file.policies[0].network.as_ref().unwrap();
        let egress = network.egress.as_ref().unwrap();
        assert_eq!(egress.default, Action::Deny);
        assert_eq!(
            egress
                .rules
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "allow 10.0.0.0/8 tcp port 443",
                "allow fd00::/8 udp port 53",
                "deny any icmp"
            ]
        );
        assert_eq!(egress.rules[1].cidr, Some(Cidr::parse("fd00::/8").unwrap()));
        assert_eq!(egress.rules[2].protocol, Protocol::Icmp);
        assert_eq!(
            network.egress_rate,
            Some(Rate {
                bits_per_s: 50_000_000,
                burst_bytes: 128 * 1024
            })
        );
        assert_eq!(network.ingress, None, "a rate alone sets no rules");
        assert_eq!(
            network.ingress_rate,
            Some(Rate {
                bits_per_s: 1_000_000_000,
                burst_bytes: 1_000_000_000 / 8 / 50
            }),
            "ingress: 20 ms at the rate"
        );
        assert_eq!(
            (network.classid, network.mark),
            (Some(0x0001_0010), Some(42))
        );

        let text = r#"{"version": 1, "policies": [
            {"cgroups": ["/a"], "network": {"egress": {"rules": [{"deny": "10.0.0.0/8"}]}}},
            {"cgroups": ["/b"], "network": {"egress": {"default": "deny", "rules": [
                {"deny": "10.0.0.0/33"}, {"allow": "10.0.0.0/8", "ports": "0"},
                {"allow": "10.0.0.0/8", "deny": "10.0.0.0/8"}, {"allow": 7},
                {"allow": "any", "protocol": "sctp"}, {"deny": "any", "protocol": "icmp", "ports": 80},
                {"permit": "any"}]}}},
            {"cgroups": ["/c"], "network": {"egress": {"rate": "fast", "burst": 10},
                "ingress": {"burst": "64k"}, "classid": "1", "mark": -1, "qos": 1}},
            {"cgroups": ["/d"], "network": {}}
        ]}"#;
        let shown: Vec<String> = parse(text)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            shown,
            [
                "policies[0].network.egress: \"default\" is missing: say \"allow\" or \"deny\" for packets no rule matches",
                "policies[1].network.egress.rules[0]: \"10.0.0.0/33\": prefix length \"33\" is not 0 to 32",
                "policies[1].network.egress.rules[1].ports: ports \"0\" are not a port or a range such as 80 or 8000-9000",
                "policies[1].network.egress.rules[2]: both \"allow\" and \"deny\": a rule has one action",
                "policies[1].network.egress.rules[3]: the address is a number, not a string such as \"10.0.0.0/8\" or \"any\"",
                "policies[1].network.egress.rules[4].protocol: protocol \"sctp\" is none of tcp, udp, icmp, any",
                "policies[1].network.egress.rules[5]: icmp has no ports",
                "policies[1].network.egress.rules[6].permit: unknown field (known: allow, deny, protocol, ports)",
                "policies[1].network.egress.rules[6]: no action: give {\"allow\": CIDR} or {\"deny\": CIDR}",
                "policies[2].network.qos: unknown field (known: egress, ingress, classid, mark)",
                "policies[2].network.egress.rate: rate \"fast\" is not a rate such as 50mbit, 1gbit or 10mbps",
                "policies[2].network.egress.burst: 10 is not a size of at least 1500 bytes such as \"64k\"",
                "policies[2].network.ingress.burst: a burst without a \"rate\": give the rate too",
                "policies[2].network.classid: classid \"1\" is not MAJOR:MINOR such as 1:10 (hex digits, as tc writes them)",
                "policies[2].network.mark: -1 is not a 32-bit mark such as 42 or \"0x2a\"",
                "policies[3].network: it sets nothing: give \"egress\", \"ingress\", \"classid\" or \"mark\"",
            ]
        );
    }

    #[test]
    fn globs_match_within_and_across_segments() {
        assert!(glob_matches("/web", "/web"));
        assert!(!glob_matches("/web", "/web/x"));
        assert!(glob_matches("/batch/*", "/batch/job-1"));
        assert!(!glob_matches("/batch/*", "/batch/job-1/sub"));
        assert!(glob_matches("/batch/**", "/batch/job-1/sub"));
        assert!(glob_matches("/**/leaf", "/a/b/leaf"));
        assert!(glob_matches("/job-?", "/job-7"));
        assert!(!glob_matches("/job-?", "/job-77"));
        assert!(glob_matches("/*", "/anything"));
        assert!(!glob_matches("/*", "/"));
    }

    #[test]
    fn the_first_policy_that_selects_a_cgroup_wins_and_covers_its_subtree() {
        let file = parse(GOOD).unwrap();
        let tree = [
            (1, "/", None),
            (2, "/web", None),
            (3, "/batch/a", None),
            (4, "/agent/build", Some("build")),
            (5, "/other", None),
            (6, "/web/child/grandchild", None),
            (7, "/agent/build/worker", None),
            (8, "/batch", None),
        ];
        let resolved = file.resolve(&tree);
        assert_eq!(
            resolved,
            HashMap::from([(2, 0), (3, 0), (4, 1), (6, 0), (7, 1)])
        );
    }
}

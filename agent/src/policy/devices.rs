//! Device rules as `devices.allow` takes them (`c 1:3 rwm`), and their
//! compilation into the exact-match table the kernel program looks up.
//!
//! Matching order, exactly: the rules are tried in order. For each access the
//! request asks for (`r` read, `w` write, `m` mknod), the first rule whose
//! type (`a` matches both), major and minor (`*` matches any) match the device
//! and whose access letters include that access decides it, allow or deny;
//! when no rule does, the policy's default decides. A request is allowed only
//! when every access it asks for is allowed (opening for reading and writing
//! needs both `r` and `w`).

use std::{collections::BTreeSet, fmt};

use common::devices::{ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE, DEV_ANY, TYPE_BLOCK, TYPE_CHAR};

/// A rule's device type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevType {
    All,
    Block,
    Char,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// One `TYPE MAJOR:MINOR ACCESS` rule with its action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub dev_type: DevType,
    /// `None` is `*`.
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// Bits of [`ACCESS_READ`], [`ACCESS_WRITE`], [`ACCESS_MKNOD`].
    pub access: u8,
}

/// A compiled rule table: `(type, major, minor) → allowed access bits`.
pub type Table = Vec<((u32, u32, u32), u8)>;

/// A device policy: a default and ordered rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePolicy {
    pub default: Action,
    pub rules: Vec<Rule>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = match self.dev_type {
            DevType::All => 'a',
            DevType::Block => 'b',
            DevType::Char => 'c',
        };
        let n = |v: Option<u32>| v.map_or_else(|| "*".to_owned(), |v| v.to_string());
        let mut access = String::new();
        for (bit, letter) in [(ACCESS_READ, 'r'), (ACCESS_WRITE, 'w'), (ACCESS_MKNOD, 'm')] {
            if self.access & bit != 0 {
                access.push(letter);
            }
        }
        write!(f, "{t} {}:{} {access}", n(self.major), n(self.minor))
    }
}

/// Parses `TYPE MAJOR:MINOR ACCESS` (`c 1:3 rw`, `a *:* m`, `b 8:* r`).
/// ACCESS may be left out, meaning `rwm`, as devices.allow reads it.
pub fn parse_rule(text: &str, action: Action) -> Result<Rule, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let (type_word, numbers, access_word) = match words.as_slice() {
        [t, n, a] => (*t, *n, *a),
        [t, n] => (*t, *n, "rwm"),
        ["a"] => ("a", "*:*", "rwm"),
        _ => {
            return Err(format!(
                "{text:?} is not TYPE MAJOR:MINOR ACCESS, as in \"c 1:3 rw\""
            ))
        }
    };
    let dev_type = match type_word {
        "a" => DevType::All,
        "b" => DevType::Block,
        "c" => DevType::Char,
        other => return Err(format!("type {other:?} is none of a, b, c")),
    };
    let (major, minor) = numbers
        .split_once(':')
        .ok_or_else(|| format!("{numbers:?} is not MAJOR:MINOR"))?;
    let number = |what: &str, text: &str| -> Result<Option<u32>, String> {
        if text == "*" {
            return Ok(None);
        }
        match text.parse::<u32>() {
            Ok(n) if n != DEV_ANY => Ok(Some(n)),
            _ => Err(format!("{what} {text:?} is neither a number nor *")),
        }
    };
    let (major, minor) = (number("major", major)?, number("minor", minor)?);
    if dev_type == DevType::All && (major.is_some() || minor.is_some()) {
        return Err(format!(
            "type a covers every device: write \"a *:* {access_word}\""
        ));
    }
    let mut access = 0;
    for letter in access_word.chars() {
        access |= match letter {
            'r' => ACCESS_READ,
            'w' => ACCESS_WRITE,
            'm' => ACCESS_MKNOD,
            other => return Err(format!("access {other:?} is none of r, w, m")),
        };
    }
    if access == 0 {
        return Err("the access letters are empty: use some of r, w, m".into());
    }
    Ok(Rule {
        action,
        dev_type,
        major,
        minor,
        access,
    })
}

impl Rule {
    fn matches(&self, dev_type: u32, major: Option<u32>, minor: Option<u32>) -> bool {
        let type_ok = match self.dev_type {
            DevType::All => true,
            DevType::Block => dev_type == TYPE_BLOCK,
            DevType::Char => dev_type == TYPE_CHAR,
        };
        // `None` in the query is "a number no rule names": only `*` matches it.
        type_ok
            && (self.major.is_none() || self.major == major)
            && (self.minor.is_none() || self.minor == minor)
    }
}

impl DevicePolicy {
    /// The access bits allowed for a device, by the matching order above.
    /// `major`/`minor` `None` stand for a number no rule names.
    #[must_use]
    pub fn allowed(&self, dev_type: u32, major: Option<u32>, minor: Option<u32>) -> u8 {
        let mut allowed = 0;
        for bit in [ACCESS_READ, ACCESS_WRITE, ACCESS_MKNOD] {
            let action = self
                .rules
                .iter()
                .find(|rule| rule.access & bit != 0 && rule.matches(dev_type, major, minor))
                .map_or(self.default, |rule| rule.action);
            if action == Action::Allow {
                allowed |= bit;
            }
        }
        allowed
    }

    /// Whether a request for `access` on a device is allowed.
    #[must_use]
    pub fn decide(&self, dev_type: u32, major: u32, minor: u32, access: u8) -> bool {
        let named_major = self
            .rules
            .iter()
            .any(|r| r.major == Some(major))
            .then_some(major);
        let named_minor = self
            .rules
            .iter()
            .any(|r| r.minor == Some(minor))
            .then_some(minor);
        self.allowed(dev_type, named_major, named_minor) & access == access
    }

    /// The table the kernel looks up: `(type, major, minor) → allowed bits`
    /// for every type, every major a rule names plus `*` ([`DEV_ANY`]), and
    /// every minor a rule names plus `*`. The kernel tries the device's exact
    /// numbers, then `major:*`, then `*:minor`, then `*:*`; the first entry
    /// found is the answer, and it equals [`Self::allowed`] for that device.
    #[must_use]
    pub fn compile(&self) -> Table {
        let majors: BTreeSet<Option<u32>> = self
            .rules
            .iter()
            .filter_map(|r| r.major)
            .map(Some)
            .chain([None])
            .collect();
        let minors: BTreeSet<Option<u32>> = self
            .rules
            .iter()
            .filter_map(|r| r.minor)
            .map(Some)
            .chain([None])
            .collect();
        let mut table = Vec::with_capacity(2 * majors.len() * minors.len());
        for dev_type in [TYPE_BLOCK, TYPE_CHAR] {
            for major in &majors {
                for minor in &minors {
                    table.push((
                        (dev_type, major.unwrap_or(DEV_ANY), minor.unwrap_or(DEV_ANY)),
                        self.allowed(dev_type, *major, *minor),
                    ));
                }
            }
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(default: Action, rules: &[(&str, Action)]) -> DevicePolicy {
        DevicePolicy {
            default,
            rules: rules
                .iter()
                .map(|(text, action)| parse_rule(text, *action).unwrap())
                .collect(),
        }
    }

    #[test]
    fn rules_parse_as_devices_allow_writes_them() {
        let rule = parse_rule("c 1:3 rw", Action::Allow).unwrap();
        assert_eq!(
            rule,
            Rule {
                action: Action::Allow,
                dev_type: DevType::Char,
                major: Some(1),
                minor: Some(3),
                access: ACCESS_READ | ACCESS_WRITE
            }
        );
        assert_eq!(rule.to_string(), "c 1:3 rw");
        assert_eq!(
            parse_rule("b 8:*", Action::Deny).unwrap().to_string(),
            "b 8:* rwm"
        );
        assert_eq!(
            parse_rule("a", Action::Allow).unwrap().to_string(),
            "a *:* rwm"
        );
        assert_eq!(
            parse_rule("c x:3 r", Action::Allow).unwrap_err(),
            "major \"x\" is neither a number nor *"
        );
        assert_eq!(
            parse_rule("c 1:y r", Action::Allow).unwrap_err(),
            "minor \"y\" is neither a number nor *"
        );
        assert_eq!(
            parse_rule("d 1:3 r", Action::Allow).unwrap_err(),
            "type \"d\" is none of a, b, c"
        );
        assert_eq!(
            parse_rule("c 1:3 rx", Action::Allow).unwrap_err(),
            "access 'x' is none of r, w, m"
        );
        assert_eq!(
            parse_rule("c 13 r", Action::Allow).unwrap_err(),
            "\"13\" is not MAJOR:MINOR"
        );
        assert_eq!(
            parse_rule("a 1:3 r", Action::Allow).unwrap_err(),
            "type a covers every device: write \"a *:* r\""
        );
        assert!(parse_rule("", Action::Allow).is_err());
    }

    #[test]
    fn the_first_matching_rule_decides_each_access() {
        // The tests' policy: default deny, /dev/null rw, /dev/urandom r.
        let p = policy(
            Action::Deny,
            &[("c 1:3 rw", Action::Allow), ("c 1:9 r", Action::Allow)],
        );
        assert!(p.decide(TYPE_CHAR, 1, 3, ACCESS_READ | ACCESS_WRITE));
        assert!(p.decide(TYPE_CHAR, 1, 9, ACCESS_READ));
        assert!(!p.decide(TYPE_CHAR, 1, 9, ACCESS_WRITE));
        assert!(
            !p.decide(TYPE_CHAR, 1, 9, ACCESS_READ | ACCESS_WRITE),
            "every bit must be allowed"
        );
        assert!(
            !p.decide(TYPE_CHAR, 1, 5, ACCESS_READ),
            "/dev/zero is not listed"
        );
        assert!(!p.decide(TYPE_CHAR, 1, 3, ACCESS_MKNOD));
        // Order: an allow before a broader deny wins, and the other way round.
        let p = policy(
            Action::Allow,
            &[("c 1:3 r", Action::Allow), ("c 1:* r", Action::Deny)],
        );
        assert!(p.decide(TYPE_CHAR, 1, 3, ACCESS_READ));
        assert!(!p.decide(TYPE_CHAR, 1, 4, ACCESS_READ));
        assert!(
            p.decide(TYPE_CHAR, 1, 4, ACCESS_WRITE),
            "the deny names only r"
        );
        let p = policy(
            Action::Allow,
            &[("c 1:* r", Action::Deny), ("c 1:3 r", Action::Allow)],
        );
        assert!(
            !p.decide(TYPE_CHAR, 1, 3, ACCESS_READ),
            "the broader deny came first"
        );
        // Wildcards: c 1:* r and a *:* m.
        let p = policy(
            Action::Deny,
            &[("c 1:* r", Action::Allow), ("a *:* m", Action::Allow)],
        );
        assert!(p.decide(TYPE_CHAR, 1, 77, ACCESS_READ));
        assert!(!p.decide(TYPE_CHAR, 2, 1, ACCESS_READ));
        assert!(p.decide(TYPE_BLOCK, 8, 0, ACCESS_MKNOD));
        assert!(!p.decide(TYPE_BLOCK, 8, 0, ACCESS_READ));
    }

    /// The kernel's lookup chain over the compiled table.
    fn kernel(table: &[((u32, u32, u32), u8)], dev_type: u32, major: u32, minor: u32) -> u8 {
        let find = |key| table.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        find((dev_type, major, minor))
            .or_else(|| find((dev_type, major, DEV_ANY)))
            .or_else(|| find((dev_type, DEV_ANY, minor)))
            .or_else(|| find((dev_type, DEV_ANY, DEV_ANY)))
            .expect("*:* is always there")
    }

    #[test]
    fn the_compiled_table_gives_the_same_answer_for_every_device() {
        let p = policy(
            Action::Deny,
            &[
                ("c 1:3 rw", Action::Allow),
                ("c *:5 w", Action::Deny),
                ("c 1:* r", Action::Allow),
                ("b 8:0 rwm", Action::Allow),
                ("a *:* m", Action::Allow),
                ("c 4:* w", Action::Allow),
                ("c *:7 r", Action::Allow),
            ],
        );
        let table = p.compile();
        for dev_type in [TYPE_BLOCK, TYPE_CHAR] {
            for major in [0, 1, 4, 8, 9, 200] {
                for minor in [0, 3, 5, 7, 9, 1000] {
                    let expected: u8 = [ACCESS_READ, ACCESS_WRITE, ACCESS_MKNOD]
                        .into_iter()
                        .filter(|bit| p.decide(dev_type, major, minor, *bit))
                        .fold(0, |all, bit| all | bit);
                    assert_eq!(
                        kernel(&table, dev_type, major, minor),
                        expected,
                        "{dev_type} {major}:{minor}"
                    );
                }
            }
        }
        // 2 types x (majors 1, 4, 8 and *) x (minors 3, 5, 0, 7 and *).
        assert_eq!(table.len(), 2 * 4 * 5);
    }
}

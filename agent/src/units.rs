//! Human units for tables: binary prefixes for bytes, SI for counts.

/// `1536` → `1.5 KiB`; below 1 KiB the exact count of bytes.
#[must_use]
pub fn bytes(value: f64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if value < 1024.0 {
        return format!("{value:.0} B");
    }
    let mut scaled = value / 1024.0;
    let mut unit = 0;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    format!("{scaled:.1} {}", UNITS[unit])
}

/// Like [`bytes`] in at most 8 characters, for narrow columns: `1.5 KiB`,
/// `99.9 MiB`, `1023 KiB` (no decimal from 100 on).
#[must_use]
pub fn bytes_short(value: f64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if value < 1024.0 {
        return format!("{value:.0} B");
    }
    let mut scaled = value / 1024.0;
    let mut unit = 0;
    // 1023.95 KiB would print as "1024.0 KiB": move up a unit first.
    while scaled >= 1023.5 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    if scaled < 99.95 {
        format!("{scaled:.1} {}", UNITS[unit])
    } else {
        format!("{scaled:.0} {}", UNITS[unit])
    }
}

/// `1500` → `1.5k`, `2_500_000` → `2.5M`; below 1000 the exact count.
#[must_use]
pub fn count(value: f64) -> String {
    const UNITS: [&str; 6] = ["k", "M", "G", "T", "P", "E"];
    if value < 1000.0 {
        return format!("{value:.0}");
    }
    let mut scaled = value / 1000.0;
    let mut unit = 0;
    while scaled >= 1000.0 && unit + 1 < UNITS.len() {
        scaled /= 1000.0;
        unit += 1;
    }
    format!("{scaled:.1}{}", UNITS[unit])
}

/// `850` → `850ns`, `12_300` → `12µs`, `1_500_000` → `1.5ms`, `2.25e9` → `2.2s`.
#[must_use]
pub fn duration_ns(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let value = ns as f64;
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.0}µs", value / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.1}ms", value / 1e6)
    } else {
        format!("{:.1}s", value / 1e9)
    }
}

/// Parses a size in bytes: a number with an optional binary suffix, `K`,
/// `M`, `G`, `T` (each 1024 times the last), optionally followed by `i`, `B`
/// or `iB` (`512M`, `1GiB`, `64k`, `1048576`). `None` when it is not one.
#[must_use]
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits);
    let multiplier: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        "t" | "tb" | "ti" | "tib" => 1 << 40,
        _ => return None,
    };
    if number.is_empty() {
        return None;
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier);
    }
    let value: f64 = number.parse().ok()?;
    #[expect(clippy::cast_precision_loss, reason = "multipliers are powers of two")]
    let bytes = value * multiplier as f64;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "range checked"
    )]
    (0.0..1.8e19).contains(&bytes).then(|| bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_pick_a_readable_unit() {
        assert_eq!(duration_ns(850), "850ns");
        assert_eq!(duration_ns(12_300), "12µs");
        assert_eq!(duration_ns(1_500_000), "1.5ms");
        assert_eq!(duration_ns(2_250_000_000), "2.2s");
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2k"), Some(2048));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("5QB"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn bytes_use_binary_prefixes() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1023.0), "1023 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(5.0 * 1024.0 * 1024.0 * 1024.0), "5.0 GiB");
    }

    #[test]
    fn short_bytes_fit_eight_characters() {
        assert_eq!(bytes_short(0.0), "0 B");
        assert_eq!(bytes_short(1023.0), "1023 B");
        assert_eq!(bytes_short(1536.0), "1.5 KiB");
        assert_eq!(bytes_short(99.9 * 1024.0), "99.9 KiB");
        assert_eq!(bytes_short(1000.0 * 1024.0), "1000 KiB");
        assert_eq!(bytes_short(1023.9 * 1024.0), "1.0 MiB");
        assert_eq!(bytes_short(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        for value in [1.0, 1e3, 1e5, 1e6, 1e7, 1e8, 1e9, 1e12, 1e15, 1e18] {
            assert!(bytes_short(value).chars().count() <= 8, "{value}");
        }
    }

    #[test]
    fn counts_use_si_prefixes() {
        assert_eq!(count(999.0), "999");
        assert_eq!(count(1500.0), "1.5k");
        assert_eq!(count(2_500_000.0), "2.5M");
    }
}

//! What the benchmarks share: the kernel's per-program run statistics,
//! medians, spreads and paired ratios, and the table's preamble.

use std::{fmt::Write as _, fs};

/// Run time and count of every program attached directly to `cgroup`.
pub fn program_stats(cgroup: &std::path::Path) -> (u64, u64) {
    let out = agent_tests::run(
        "bpftool",
        &["-j", "cgroup", "show", &cgroup.display().to_string()],
    );
    let attached: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut ids: Vec<u32> = attached
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|p| p["id"].as_u64())
                .filter_map(|id| u32::try_from(id).ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids.dedup();
    let mut time = 0;
    let mut count = 0;
    for info in aya::programs::loaded_programs().flatten() {
        if ids.contains(&info.id()) {
            time += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            count += info.run_count();
        }
    }
    (time, count)
}

/// Sets `kernel.bpf_stats_enabled` and restores the previous value on drop.
pub struct BpfStats(String);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    pub fn enable() -> Self {
        let previous = fs::read_to_string(Self::PATH).unwrap_or_else(|_| "0".into());
        fs::write(Self::PATH, "1").expect("enable kernel.bpf_stats_enabled");
        Self(previous.trim().to_owned())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(Self::PATH, &self.0);
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// `median (min to max)`.
pub fn spread(values: &[f64], digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:.digits$} ({min:.digits$} to {max:.digits$})",
        median(values)
    )
}

/// Median of `a[k] / b[k]`: runs of one repeat ran back to back.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    median(&ratios)
}

/// Ids of the programs attached directly to `cgroup` at `hook` (bpftool's
/// attach type, `cgroup_inet_egress`; older bpftools say `egress`).
pub fn attached_ids(cgroup: &std::path::Path, hook: &str) -> Vec<u32> {
    let out = agent_tests::run(
        "bpftool",
        &["-j", "cgroup", "show", &cgroup.display().to_string()],
    );
    let attached: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let short = hook.rsplit('_').next().unwrap_or(hook);
    attached
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["attach_type"] == hook || p["attach_type"] == short)
        .filter_map(|p| p["id"].as_u64())
        .filter_map(|id| u32::try_from(id).ok())
        .collect()
}

/// Run time and count of the loaded programs with these ids.
pub fn program_stats_by_id(ids: &[u32]) -> (u64, u64) {
    let mut time = 0;
    let mut count = 0;
    for info in aya::programs::loaded_programs().flatten() {
        if ids.contains(&info.id()) {
            time += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            count += info.run_count();
        }
    }
    (time, count)
}

/// `# cargo xtask bench NAME, DATE` and the machine it ran on.
pub fn preamble(name: &str) -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = agent_tests::run("date", &["-u", "+%Y-%m-%d"]);
    let date = String::from_utf8_lossy(&date.stdout).trim().to_owned();
    let mut text = String::new();
    let _ = writeln!(text, "# cargo xtask bench {name}, {date}");
    let _ = writeln!(text);
    let _ = write!(
        text,
        "Kernel {}, {} CPUs. ",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    text
}

/// Prints the table and writes it to `out` when given.
pub fn publish(table: &str, out: Option<&std::path::Path>) -> Result<(), String> {
    print!("{table}");
    if let Some(out) = out {
        fs::write(out, table).map_err(|e| format!("writing {}: {e}", out.display()))?;
        eprintln!("table written to {}", out.display());
    }
    Ok(())
}

//! The cgroups of one workload: created with cgroups-rs, limited, joined,
//! frozen and removed. Only directories this module created are ever touched.
//!
//! On a unified host everything lives in the one v2 hierarchy. On a hybrid
//! host (v1 controllers under /sys/fs/cgroup/<controller>, v2 at
//! /sys/fs/cgroup/unified with no controllers) the limits go to the v1
//! controllers and the same relative path is made in the v2 hierarchy too, so
//! that the eBPF programs (which only see v2) attribute the workload to it.

use std::{
    fs, io,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use cgroups_rs::fs::{
    hierarchies, memory::MemController, BlkIoDeviceThrottleResource, Cgroup, Controller as _,
    MaxValue, Resources,
};

use super::spec::Limits;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("a workload named {name:?} already exists ({path} is there): pick another --name, or see `agent ps`")]
    Exists { name: String, path: PathBuf },
    #[error("creating cgroup {path} failed: {message}")]
    Create { path: String, message: String },
    #[error("setting the limits of cgroup {path} failed: {message}")]
    Limit { path: String, message: String },
    #[error("moving process {pid} into cgroup {path} failed: {source}")]
    Join {
        pid: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} did not become {state} within 5 s")]
    Freeze { path: PathBuf, state: &'static str },
    #[error(transparent)]
    Mount(#[from] crate::cgroup::Error),
}

/// Where a workload's cgroups are, recorded so that other commands (`ps`,
/// `pause`, `stop`, `stats`) and a later clean-up can find them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// Every directory the workload's process is in, one per hierarchy.
    pub dirs: Vec<PathBuf>,
    /// Its directory in the v2 hierarchy (what the eBPF programs see).
    pub v2: PathBuf,
    /// The file that freezes it: v1 `freezer.state`, or v2 `cgroup.freeze`.
    pub freezer: PathBuf,
    /// The file that counts OOM kills: v1 `memory.oom_control`, or v2 `memory.events`.
    pub oom_events: Option<PathBuf>,
}

/// The v1 cpu.shares equivalent of a v2 cpu.weight (100 ↔ 1024), as systemd maps them.
#[must_use]
pub fn weight_to_shares(weight: u64) -> u64 {
    (weight * 1024 / 100).max(2)
}

/// The v1 `blkio.weight` (CFQ: 10 to 1000, default 500) equivalent of a v2
/// io.weight (1 to 10000, default 100), scaled around the defaults as systemd does.
#[must_use]
pub fn weight_to_blkio(weight: u64) -> u64 {
    (weight * 5).clamp(10, 1000)
}

/// The v1 `blkio.bfq.weight` (BFQ: 1 to 1000, default 100) equivalent.
#[must_use]
pub fn weight_to_bfq(weight: u64) -> u64 {
    weight.clamp(1, 1000)
}

/// The CPUs of a kernel CPU list (`0-2,5` → 0, 1, 2, 5).
#[must_use]
pub fn expand_cpus(list: &str) -> Vec<u32> {
    let mut cpus: Vec<u32> = list
        .split(',')
        .filter_map(|part| {
            let (a, b) = part
                .trim()
                .split_once('-')
                .unwrap_or((part.trim(), part.trim()));
            Some(a.parse::<u32>().ok()?..=b.parse::<u32>().ok()?)
        })
        .flatten()
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// The CFS period the agent uses, and the quota that gives `cpus` of it.
#[must_use]
pub fn cfs_quota(cpus: f64) -> (u64, i64) {
    const PERIOD_US: u64 = 100_000;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_precision_loss,
        reason = "bounded by the host's CPUs"
    )]
    let quota = (cpus * PERIOD_US as f64).round() as i64;
    (PERIOD_US, quota)
}

fn resources(limits: &Limits, v2: bool, memsw: bool) -> Resources {
    let mut res = Resources::default();
    if let Some(cpus) = limits.cpus {
        let (period, quota) = cfs_quota(cpus);
        res.cpu.period = Some(period);
        res.cpu.quota = Some(quota);
    }
    if let Some(weight) = limits.cpu_weight {
        // cgroups-rs writes `shares` to cpu.weight on v2 as is.
        res.cpu.shares = Some(if v2 { weight } else { weight_to_shares(weight) });
    }
    res.cpu.cpus.clone_from(&limits.cpuset);
    if let Some(bytes) = limits.memory_bytes {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        res.memory.memory_hard_limit = Some(bytes);
        if memsw {
            // Memory plus swap: without it the workload could swap past its limit.
            res.memory.memory_swap_limit = Some(bytes);
        }
    }
    if let Some(pids) = limits.pids {
        res.pid.maximum_number_of_processes =
            Some(MaxValue::Value(i64::try_from(pids).unwrap_or(i64::MAX)));
    }
    for limit in &limits.io_limits {
        let throttle = |rate| BlkIoDeviceThrottleResource {
            major: u64::from(limit.major),
            minor: u64::from(limit.minor),
            rate,
        };
        res.blkio
            .throttle_read_bps_device
            .extend(limit.read_bps.map(throttle));
        res.blkio
            .throttle_write_bps_device
            .extend(limit.write_bps.map(throttle));
    }
    res
}

/// The cgroups of a workload, created and limited; removed by [`Self::remove`]
/// (and on drop unless [`Self::disarm`]ed, so a failed start leaves nothing).
pub struct WorkloadCgroups {
    cgroup: Cgroup,
    placement: Placement,
    armed: bool,
}

impl WorkloadCgroups {
    /// Creates `<parent>/<name>` in every hierarchy and applies `limits`.
    /// Fails, creating nothing, when any of those directories exists.
    pub fn create(parent: &str, name: &str, limits: &Limits) -> Result<Self, Error> {
        let relative = format!("{}/{name}", parent.trim_matches('/'));
        let hierarchy = hierarchies::auto();
        let unified = hierarchy.v2();
        let cgroup = Cgroup::load(hierarchies::auto(), &relative);
        let v2_root = if unified {
            hierarchy.root()
        } else {
            crate::cgroup::resolve_root(None)?
        };
        let v2 = v2_root.join(&relative);
        let mut dirs: Vec<PathBuf> = if unified {
            vec![v2.clone()]
        } else {
            cgroup
                .subsystems()
                .iter()
                .map(|s| s.to_controller().path().to_path_buf())
                .collect()
        };
        if !unified {
            dirs.push(v2.clone());
        }
        dirs.sort();
        dirs.dedup();
        if let Some(existing) = dirs.iter().find(|dir| dir.exists()) {
            return Err(Error::Exists {
                name: name.into(),
                path: existing.clone(),
            });
        }
        let freezer = if unified {
            v2.join("cgroup.freeze")
        } else {
            cgroup
                .subsystems()
                .iter()
                .map(|s| s.to_controller().path().join("freezer.state"))
                .find(|path| path.to_string_lossy().contains("/freezer/"))
                .unwrap_or_else(|| v2.join("cgroup.freeze"))
        };
        let oom_events = cgroup.controller_of::<MemController>().map(|memory| {
            memory.path().join(if unified {
                "memory.events"
            } else {
                "memory.oom_control"
            })
        });
        let created = Self {
            cgroup,
            placement: Placement {
                dirs,
                v2,
                freezer,
                oom_events,
            },
            armed: true,
        };
        created.cgroup.create().map_err(|e| Error::Create {
            path: relative.clone(),
            message: e.to_string(),
        })?;
        if !unified {
            fs::create_dir_all(&created.placement.v2).map_err(|source| Error::Io {
                path: created.placement.v2.clone(),
                source,
            })?;
        }
        let memsw = !unified
            && created
                .cgroup
                .controller_of::<MemController>()
                .is_some_and(|memory| memory.path().join("memory.memsw.limit_in_bytes").exists());
        created
            .cgroup
            .apply(&resources(limits, unified, memsw))
            .map_err(|e| Error::Limit {
                path: relative.clone(),
                message: error_chain(&e),
            })?;
        if let Some(weight) = limits.io_weight {
            created.set_io_weight(weight, unified)?;
        }
        // cgroups-rs ignores some write failures: read every limit back.
        created.verify(limits, unified)?;
        Ok(created)
    }

    /// The directory of the hierarchy holding `file` (v1), or the v2 directory.
    fn dir_with(&self, file: &str) -> Option<PathBuf> {
        self.placement
            .dirs
            .iter()
            .find(|dir| dir.join(file).exists())
            .cloned()
    }

    /// cgroups-rs writes only `blkio.weight`, which the CFQ scheduler had;
    /// today's kernels with BFQ take `blkio.bfq.weight` (v1, 1 to 1000) or
    /// `io.weight` / `io.bfq.weight` (v2).
    fn set_io_weight(&self, weight: u64, unified: bool) -> Result<(), Error> {
        let candidates: [(&str, String); 2] = if unified {
            [
                ("io.weight", format!("default {weight}")),
                ("io.bfq.weight", format!("default {weight}")),
            ]
        } else {
            [
                ("blkio.weight", weight_to_blkio(weight).to_string()),
                ("blkio.bfq.weight", weight_to_bfq(weight).to_string()),
            ]
        };
        for (file, value) in candidates {
            if let Some(dir) = self.dir_with(file) {
                let path = dir.join(file);
                fs::write(&path, &value).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                let now = fs::read_to_string(&path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                // v2 prints "default N"; v1 prints N.
                if now
                    .split_whitespace()
                    .any(|word| word == value.trim_start_matches("default "))
                {
                    return Ok(());
                }
                return Err(Error::Limit {
                    path: path.display().to_string(),
                    message: format!("it reads {:?} after the agent set {value}", now.trim()),
                });
            }
        }
        Err(Error::Limit {
            path: self.placement.v2.display().to_string(),
            message: "--io-weight: this host has no I/O weight file (blkio.weight, blkio.bfq.weight, io.weight): \
                      its block I/O scheduler does not do weights"
                .into(),
        })
    }

    /// Reads back what the kernel holds for every limit asked for.
    fn verify(&self, limits: &Limits, unified: bool) -> Result<(), Error> {
        let read = |file: &str| -> Option<(PathBuf, String)> {
            let dir = self.dir_with(file)?;
            let text = fs::read_to_string(dir.join(file)).ok()?;
            Some((dir.join(file), text.trim().to_owned()))
        };
        let check = |file: &str, ok: &dyn Fn(&str) -> bool, wanted: String| -> Result<(), Error> {
            match read(file) {
                Some((_, value)) if ok(&value) => Ok(()),
                Some((path, value)) => Err(Error::Limit {
                    path: path.display().to_string(),
                    message: format!("it reads {value:?} after the agent set {wanted}"),
                }),
                None => Err(Error::Limit {
                    path: self.placement.v2.display().to_string(),
                    message: format!("{file} is missing, so {wanted} cannot be set on this host"),
                }),
            }
        };
        if let Some(bytes) = limits.memory_bytes {
            // The kernel rounds the limit down to whole pages.
            let page = 4096;
            let file = if unified {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            check(
                file,
                &|v| v.parse::<u64>().is_ok_and(|got| got / page == bytes / page),
                format!("--memory {bytes}"),
            )?;
        }
        if let Some(pids) = limits.pids {
            check(
                "pids.max",
                &|v| v == pids.to_string(),
                format!("--pids {pids}"),
            )?;
        }
        if let Some(cpus) = limits.cpus {
            let (period, quota) = cfs_quota(cpus);
            if unified {
                check(
                    "cpu.max",
                    &|v| v == format!("{quota} {period}"),
                    format!("--cpus {cpus}"),
                )?;
            } else {
                check(
                    "cpu.cfs_quota_us",
                    &|v| v == quota.to_string(),
                    format!("--cpus {cpus}"),
                )?;
            }
        }
        if let Some(weight) = limits.cpu_weight {
            if unified {
                check(
                    "cpu.weight",
                    &|v| v == weight.to_string(),
                    format!("--cpu-weight {weight}"),
                )?;
            } else {
                let shares = weight_to_shares(weight);
                check(
                    "cpu.shares",
                    &|v| v == shares.to_string(),
                    format!("--cpu-weight {weight}"),
                )?;
            }
        }
        if let Some(cpuset) = &limits.cpuset {
            let wanted = expand_cpus(cpuset);
            check(
                "cpuset.cpus",
                &|v| expand_cpus(v) == wanted,
                format!("--cpuset {cpuset}"),
            )?;
        }
        for limit in &limits.io_limits {
            let device = format!("{}:{}", limit.major, limit.minor);
            let has = |text: &str, key: &str, rate: u64| {
                text.lines().any(|line| {
                    line.starts_with(&format!("{device} "))
                        && (line.split_whitespace().nth(1) == Some(&rate.to_string())
                            || line.contains(&format!("{key}={rate}")))
                })
            };
            for (rate, v1_file, key) in [
                (limit.read_bps, "blkio.throttle.read_bps_device", "rbps"),
                (limit.write_bps, "blkio.throttle.write_bps_device", "wbps"),
            ] {
                if let Some(rate) = rate {
                    let file = if unified { "io.max" } else { v1_file };
                    check(
                        file,
                        &|v| has(v, key, rate),
                        format!("--io-limit {device}:{key}={rate}"),
                    )?;
                }
            }
        }
        Ok(())
    }

    #[must_use]
    pub const fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Moves process `pid` (all its threads) into every one of the workload's cgroups.
    pub fn join(&self, pid: u32) -> Result<(), Error> {
        join(&self.placement, pid)
    }

    /// Leaves the cgroups in place when this value is dropped (`--keep`).
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Removes every directory, waiting (up to 5 s) for the kernel to let go
    /// of processes that just exited.
    pub fn remove(mut self) -> Result<(), Error> {
        self.armed = false;
        remove(&self.placement)
    }
}

impl Drop for WorkloadCgroups {
    fn drop(&mut self) {
        if self.armed {
            let _ = remove(&self.placement);
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Moves `pid` into every directory of `placement`.
pub fn join(placement: &Placement, pid: u32) -> Result<(), Error> {
    for dir in &placement.dirs {
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(|source| Error::Join {
            pid,
            path: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Removes the directories of `placement` (deepest first), retrying while the
/// kernel still counts exiting processes in them.
pub fn remove(placement: &Placement) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(5);
    for dir in placement.dirs.iter().rev() {
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(err) if err.kind() == io::ErrorKind::NotFound => break,
                Err(err)
                    if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(Error::Io {
                        path: dir.clone(),
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

/// How many times the kernel's OOM killer killed a process of the workload.
#[must_use]
pub fn oom_kills(placement: &Placement) -> Option<u64> {
    let text = fs::read_to_string(placement.oom_events.as_ref()?).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// Freezes (`true`) or thaws the workload, and waits until the kernel says it is.
pub fn set_frozen(placement: &Placement, frozen: bool) -> Result<(), Error> {
    let path = &placement.freezer;
    let v1 = path.file_name().is_some_and(|name| name == "freezer.state");
    let (value, state) = match (v1, frozen) {
        (true, true) => ("FROZEN", "FROZEN"),
        (true, false) => ("THAWED", "THAWED"),
        (false, true) => ("1", "frozen 1"),
        (false, false) => ("0", "frozen 0"),
    };
    fs::write(path, value).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let events = if v1 {
        path.clone()
    } else {
        path.with_file_name("cgroup.events")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = fs::read_to_string(&events).map_err(|source| Error::Io {
            path: events.clone(),
            source,
        })?;
        if now.lines().any(|line| line.trim() == state) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Freeze {
                path: path.clone(),
                state: if frozen { "frozen" } else { "thawed" },
            });
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the workload is frozen now.
#[must_use]
pub fn is_frozen(placement: &Placement) -> bool {
    let path = &placement.freezer;
    if path.file_name().is_some_and(|name| name == "freezer.state") {
        fs::read_to_string(path).is_ok_and(|state| state.trim() == "FROZEN")
    } else {
        fs::read_to_string(path.with_file_name("cgroup.events"))
            .is_ok_and(|events| events.lines().any(|l| l == "frozen 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_map_to_v1_scales() {
        assert_eq!(weight_to_shares(100), 1024);
        assert_eq!(weight_to_shares(1), 10);
        assert_eq!(weight_to_shares(10_000), 102_400);
        assert_eq!(weight_to_blkio(1), 10);
        assert_eq!(weight_to_blkio(10_000), 1000);
        assert_eq!(weight_to_blkio(100), 500);
        assert_eq!(weight_to_bfq(100), 100);
        assert_eq!(weight_to_bfq(5000), 1000);
    }

    #[test]
    fn cpu_lists_expand() {
        assert_eq!(expand_cpus("0-2,5"), [0, 1, 2, 5]);
        assert_eq!(expand_cpus("1,0"), [0, 1]);
        assert_eq!(expand_cpus(""), Vec::<u32>::new());
    }

    #[test]
    fn cpus_become_a_quota_per_100ms() {
        assert_eq!(cfs_quota(0.5), (100_000, 50_000));
        assert_eq!(cfs_quota(1.25), (100_000, 125_000));
    }

    #[test]
    fn limits_become_cgroups_rs_resources() {
        let limits = Limits {
            cpus: Some(0.5),
            cpu_weight: Some(200),
            memory_bytes: Some(64 << 20),
            pids: Some(20),
            ..Limits::default()
        };
        let v1 = resources(&limits, false, true);
        assert_eq!(
            (v1.cpu.quota, v1.cpu.period, v1.cpu.shares),
            (Some(50_000), Some(100_000), Some(2048))
        );
        assert_eq!(
            (v1.memory.memory_hard_limit, v1.memory.memory_swap_limit),
            (Some(64 << 20), Some(64 << 20))
        );
        assert_eq!(
            v1.pid.maximum_number_of_processes,
            Some(MaxValue::Value(20))
        );
        let v2 = resources(&limits, true, false);
        assert_eq!(
            (v2.cpu.shares, v2.memory.memory_swap_limit),
            (Some(200), None)
        );
    }
}

//! The running workloads, one JSON file each under `<state-dir>/workloads/`,
//! written by `agent run` and read by `agent ps`, `pause`, `resume`, `stop`
//! and `stats`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::sys::pid_running;

use super::{
    cgroups::Placement,
    spec::{Limits, NetMode},
};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/agent";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing workload record {path} failed: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no workload named {name:?} is running (see `agent ps`)")]
    Unknown { name: String },
}

/// One running workload.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub name: String,
    /// The workload's first process, as the host sees it.
    pub pid: u32,
    /// The `agent run` process that started it and will clean up after it.
    pub agent_pid: u32,
    /// Milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    pub command: Vec<String>,
    pub cgroups: Placement,
    pub limits: Limits,
    pub net: NetMode,
    /// The workload's address on its veth (`--net isolated`), and the host's.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub host_address: Option<String>,
}

impl Record {
    /// Whether the `agent run` that owns this record is still running.
    #[must_use]
    pub fn is_alive(&self) -> bool {
        pid_running(self.agent_pid) && pid_running(self.pid)
    }
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("workloads")
}

fn file(state_dir: &Path, name: &str) -> PathBuf {
    dir(state_dir).join(format!("{name}.json"))
}

/// Records `record` (atomically: a reader never sees half a file).
pub fn write(state_dir: &Path, record: &Record) -> Result<(), Error> {
    let path = file(state_dir, &record.name);
    let tmp = path.with_extension("json.tmp");
    let write = || -> io::Result<()> {
        fs::create_dir_all(dir(state_dir))?;
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(record).map_err(io::Error::other)?,
        )?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|source| Error::Write { path, source })
}

/// Forgets the workload `name`.
pub fn remove(state_dir: &Path, name: &str) {
    let _ = fs::remove_file(file(state_dir, name));
}

/// Every record, living or not, sorted by name. Unreadable files are skipped.
#[must_use]
pub fn all(state_dir: &Path) -> Vec<Record> {
    let Ok(entries) = fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    let mut records: Vec<Record> = entries
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "json"))
        .filter_map(|entry| fs::read(entry.path()).ok())
        .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
        .collect();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    records
}

/// The running workload `name`.
pub fn find(state_dir: &Path, name: &str) -> Result<Record, Error> {
    all(state_dir)
        .into_iter()
        .find(|record| record.name == name && record.is_alive())
        .ok_or_else(|| Error::Unknown { name: name.into() })
}

/// Whether `name` is taken by a running workload.
#[must_use]
pub fn in_use(state_dir: &Path, name: &str) -> bool {
    find(state_dir, name).is_ok()
}

/// Removes the records (and the cgroups, which only it created) of workloads
/// whose `agent run` died without cleaning up, e.g. killed with SIGKILL. Their
/// processes died with it (PR_SET_PDEATHSIG), so the cgroups are empty.
pub fn collect_garbage(state_dir: &Path) {
    for record in all(state_dir) {
        if !pid_running(record.agent_pid) && super::cgroups::remove(&record.cgroups).is_ok() {
            remove(state_dir, &record.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, agent_pid: u32) -> Record {
        Record {
            name: name.into(),
            pid: std::process::id(),
            agent_pid,
            started_unix_ms: 1,
            command: vec!["sleep".into(), "1".into()],
            cgroups: Placement {
                dirs: vec![],
                v2: PathBuf::from("/sys/fs/cgroup/agent/x"),
                freezer: PathBuf::from("/sys/fs/cgroup/agent/x/cgroup.freeze"),
                oom_events: None,
            },
            limits: Limits {
                pids: Some(3),
                ..Limits::default()
            },
            net: NetMode::Host,
            address: None,
            host_address: None,
        }
    }

    #[test]
    fn records_round_trip_and_dead_ones_are_not_found() {
        let state = std::env::temp_dir().join(format!("agent-registry-{}", std::process::id()));
        let _ = fs::remove_dir_all(&state);
        write(&state, &record("b", std::process::id())).unwrap();
        write(&state, &record("a", std::process::id())).unwrap();
        write(&state, &record("dead", u32::MAX)).unwrap();
        assert_eq!(
            all(&state)
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "dead"]
        );
        assert_eq!(find(&state, "a").unwrap(), record("a", std::process::id()));
        assert!(in_use(&state, "b"));
        assert!(!in_use(&state, "dead"));
        assert_eq!(
            find(&state, "nope").unwrap_err().to_string(),
            "no workload named \"nope\" is running (see `agent ps`)"
        );
        collect_garbage(&state);
        assert_eq!(all(&state).len(), 2, "the dead one's record is gone");
        remove(&state, "a");
        assert_eq!(all(&state).len(), 1);
        fs::remove_dir_all(&state).unwrap();
    }
}

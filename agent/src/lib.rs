//! The agent: per-cgroup observability and enforcement with eBPF.
//!
//! The data path, one stage per module (see ARCHITECTURE.md):
//! kernel programs (`ebpf/`) → maps → [`collect`] (maps and cgroup tree →
//! [`collect::Sample`]) → [`model`] (samples → [`model::Snapshot`] with rates)
//! → consumers ([`cli`]: `stats`, `top`; [`export`]: OTLP and Prometheus). [`loader`] is the only module that
//! touches `aya::Ebpf`; [`cgroup`] finds the hierarchy and walks it;
//! [`workload`] creates the cgroups and namespaces of `agent run`.

pub mod bpffs;
pub mod btf;
pub mod cgroup;
pub mod cgroupfs;
pub mod cli;
pub mod collect;
pub mod enforce;
pub mod events;
pub mod export;
pub mod loader;
pub mod model;
pub mod policy;
pub mod units;
pub mod workload;

mod sys;

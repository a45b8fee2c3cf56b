//! Workloads started by `agent run`: their limits ([`spec`]), cgroups
//! ([`cgroups`]), namespaces and first process ([`process`]), network
//! ([`net`]), and the record other commands find them by ([`registry`]).

pub mod cgroups;
pub mod net;
pub mod process;
pub mod registry;
pub mod spec;

//! The daemon's description of itself, read by `agent stats` and `agent top`
//! from the pins. Only userspace reads or writes it; it lives in the object so
//! that it is created, pinned and removed with the other maps.

use aya_ebpf::{macros::map, maps::Array};
use common::AgentInfo;

#[map(name = "AGENT_INFO")]
static AGENT_INFO: Array<AgentInfo> = Array::with_max_entries(1, 0);

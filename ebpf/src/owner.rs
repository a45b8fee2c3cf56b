//! Which policy program counts an access. The daemon's programs (attached
//! at the watched root) and `agent run`'s (at a workload's cgroup) can both
//! run for one access, sharing their maps. Both enforce (every attached
//! program must allow); exactly one counts the access, reports its denial
//! and charges its rate cap: the daemon's for policies the daemon wrote, the
//! workload's for its own cgroup's policy. (An `agent run` workload inside
//! another is the exception for devices: the outer workload's device
//! program applies its own policy to the whole subtree, as one unit, so
//! each workload's program counts the access under its own workload.)

use aya_ebpf::Global;
use common::{devices::OWNER_DAEMON, GUARD_OWNER_DAEMON};

/// Who this program counts for (set by the loader): [`GUARD_OWNER_DAEMON`]
/// in the daemon, the workload's cgroup id in `agent run`.
#[unsafe(no_mangle)]
static GUARD_OWNER: Global<u64> = Global::new(GUARD_OWNER_DAEMON);

/// Who counts under a policy entry owned by `owner` (`OWNER_DAEMON` or
/// `OWNER_RUN`) and held by cgroup `holder`.
#[inline(always)]
pub fn counter(owner: u32, holder: u64) -> u64 {
    if owner == OWNER_DAEMON {
        GUARD_OWNER_DAEMON
    } else {
        holder
    }
}

/// Whether this program counts under `counter`.
#[inline(always)]
pub fn mine(counter: u64) -> bool {
    counter == GUARD_OWNER.load()
}

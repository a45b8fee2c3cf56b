//! The agent's kernel programs. Built for `bpfel-unknown-none` by
//! `agent/build.rs` (aya-build) and embedded in the `agent` binary.
//!
//! Everything here runs on hot paths (every packet of every socket under the
//! watched cgroup root): keep it small, per-CPU, and never emit per-event output.
#![no_std]
#![no_main]
// BPF inline assembly (atomic add, compare-and-exchange) is unstable; see
// RUSTC_BOOTSTRAP in .cargo/config.toml.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod cache;
mod cgroup;
mod devices;
mod events;
mod info;
mod net;
mod netguard;
mod owner;
mod sched;
mod slots;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

//! Builds the kernel programs in `../ebpf` for bpfel-unknown-none with the
//! `debian-bpf` toolchain that `cargo xtask` links (see ../shared/TOOLCHAIN.md
//! and xtask/src/setup.rs), and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let toolchain = std::env::var("AGENT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian-bpf".into());
    println!("cargo:rerun-if-env-changed=AGENT_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-changed=../common/src");
    let ebpf = Package {
        name: "ebpf",
        root_dir: "../ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom(&toolchain))
        .map_err(|e| anyhow!("{e:#}"))
        .context(
            "building the eBPF programs failed; run `cargo xtask setup` to install the \
             toolchain they need (bpf-linker and the `debian-bpf` rustup toolchain)",
        )
}

//! Installs what building and testing the agent needs, idempotently: quick
//! (a few checks) when everything is present. The recipe is the verified one
//! in ../shared/TOOLCHAIN.md: Debian's rustc 1.96 ships a precompiled `core`
//! for bpfel-unknown-none, bpf-linker is built against Debian's LLVM 22, and
//! Debian's compiler becomes the rustup toolchain `debian-bpf`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

/// The rustup toolchain name `agent/build.rs` builds the eBPF programs with.
pub const EBPF_TOOLCHAIN: &str = "debian-bpf";

/// The bpf-linker release that builds against LLVM 22 and links for rustc 1.96.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages: the eBPF toolchain, then what the tests and benchmarks run.
const PACKAGES: &[&str] = &[
    // Debian's rustc 1.96 with core for bpfel-unknown-none, and LLVM 22 for bpf-linker.
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Tests and benchmarks.
    "bpftool",
    "iproute2",
    "iperf3",
    // tests/tests/export.rs starts its own prometheus (2.42) on loopback.
    "prometheus",
    "tmux",
    "iputils-ping",
    "busybox-static",
    "procps",
    "linux-perf",
    // `bench net`'s per-cgroup iptables rules (nf_tables backend, xt cgroup match).
    "iptables",
];

/// Checks each requirement, installs what is missing, and says in one
/// sentence what to do when something cannot be installed.
pub fn ensure() -> Result<()> {
    let started = Instant::now();
    check_kernel()?;
    let missing = missing_packages()?;
    if !missing.is_empty() {
        require_root(&format!(
            "installing the Debian packages {}",
            missing.join(" ")
        ))?;
        install_packages(&missing)?;
    }
    ensure_bpf_linker()?;
    ensure_toolchain()?;
    if started.elapsed().as_secs() >= 2 {
        progress(&format!("set-up done in {:.0?}", started.elapsed()));
    }
    Ok(())
}

pub fn progress(message: &str) {
    eprintln!("xtask: {message}");
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root: run it as root (for example `sudo -E cargo xtask ...`)");
    }
    Ok(())
}

fn check_kernel() -> Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): the agent needs a \
             kernel built with CONFIG_DEBUG_INFO_BTF=y"
        );
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo failed")?;
    let has_v2 = mountinfo
        .lines()
        .filter_map(|line| line.split_once(" - "))
        .any(|(_, right)| right.starts_with("cgroup2 "));
    if !has_v2 {
        bail!(
            "no cgroup v2 hierarchy is mounted: mount one with \
             `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`"
        );
    }
    Ok(())
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\n"])
        .args(PACKAGES)
        .output()
        .context("running dpkg-query failed: is this a Debian system?")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(name, _)| name)
        .collect();
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

fn install_packages(packages: &[&str]) -> Result<()> {
    progress(&format!(
        "installing Debian packages (a minute or two): {}",
        packages.join(" ")
    ));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600", "-q"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get failed")?;
        if !status.success() {
            bail!(
                "`apt-get {}` failed ({status}): check that this machine reaches its Debian \
                 mirror, then run `cargo xtask setup` again",
                args.join(" ")
            );
        }
        Ok(())
    };
    apt(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt(&args)
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn ensure_bpf_linker() -> Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    if installed.as_deref() == Some(&format!("bpf-linker {BPF_LINKER_VERSION}")) {
        return Ok(());
    }
    progress(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about two minutes)"
    ));
    // Without LLVM 22 first in PATH, bpf-linker's build finds Debian's
    // default llvm-config (14) and fails to link -lLLVM.
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "install",
            "--locked",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22", "--force"])
        .env("PATH", path)
        .status()
        .context("running cargo install failed")?;
    if !status.success() {
        bail!(
            "building bpf-linker failed ({status}): check that crates.io is reachable and that \
             llvm-22-dev is installed, then run `cargo xtask setup` again"
        );
    }
    let linker = cargo_home().join("bin/bpf-linker");
    if !linker.exists() {
        bail!("bpf-linker was built but {} is missing", linker.display());
    }
    Ok(())
}

fn ensure_toolchain() -> Result<()> {
    let output = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup failed: the eBPF build needs rustup (https://rustup.rs)")?;
    let listed = String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.split_whitespace().next() == Some(EBPF_TOOLCHAIN));
    if listed {
        return Ok(());
    }
    progress(&format!(
        "linking Debian's rustc in /usr as the rustup toolchain {EBPF_TOOLCHAIN}"
    ));
    let status = Command::new("rustup")
        .args(["toolchain", "link", EBPF_TOOLCHAIN, "/usr"])
        .status()
        .context("running rustup toolchain link failed")?;
    if !status.success() {
        bail!("`rustup toolchain link {EBPF_TOOLCHAIN} /usr` failed ({status})");
    }
    Ok(())
}

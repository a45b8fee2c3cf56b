//! The workload's network: `lo` only (`--net none`), or a veth pair to the
//! host (`--net isolated`) with a /30 from 169.254.77.0/24 and no route
//! beyond it, so that the workload and the host reach each other and nothing
//! else. Uses iproute2's `ip` and util-linux's `nsenter`.

use std::{fs::File, net::Ipv4Addr, path::Path, process::Command};

use super::spec::NetMode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("all 64 workload subnets of 169.254.77.0/24 are in use")]
    Exhausted,
    #[error("locking {path} failed: {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The veth of an isolated workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veth {
    pub host_device: String,
    pub host_address: Ipv4Addr,
    pub address: Ipv4Addr,
}

fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let shown = || format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::Command {
            command: shown(),
            message: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(Error::Command {
            command: shown(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn inside(pid: u32, args: &[&str]) -> Result<String, Error> {
    let net = format!("--net=/proc/{pid}/ns/net");
    let mut all = vec![net.as_str(), "ip"];
    all.extend_from_slice(args);
    run("nsenter", &all)
}

/// The /30 blocks of 169.254.77.0/24 whose host address is already on an
/// interface of this host, from `ip -4 -o addr` output.
#[must_use]
pub fn used_blocks(ip_addr_output: &str) -> Vec<u8> {
    ip_addr_output
        .split_whitespace()
        .filter_map(|word| word.split('/').next())
        .filter_map(|addr| addr.parse::<Ipv4Addr>().ok())
        .filter(|addr| addr.octets()[..3] == [169, 254, 77])
        .map(|addr| addr.octets()[3] / 4)
        .collect()
}

/// Wires the network namespace of process `pid` as `mode` says.
pub fn setup(mode: NetMode, pid: u32, lock_dir: &Path) -> Result<Option<Veth>, Error> {
    match mode {
        NetMode::Host => Ok(None),
        NetMode::None => {
            inside(pid, &["link", "set", "lo", "up"])?;
            Ok(None)
        }
        NetMode::Isolated => {
            // One allocation at a time across concurrent `agent run`s.
            let lock_path = lock_dir.join("net.lock");
            let lock = std::fs::create_dir_all(lock_dir)
                .and_then(|()| File::create(&lock_path))
                .map_err(|source| Error::Lock {
                    path: lock_path.display().to_string(),
                    source,
                })?;
            let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| Error::Lock {
                    path: lock_path.display().to_string(),
                    source: errno.into(),
                })?;
            let used = used_blocks(&run("ip", &["-4", "-o", "addr", "show"])?);
            let block = (0u8..64)
                .find(|b| !used.contains(b))
                .ok_or(Error::Exhausted)?;
            let host_address = Ipv4Addr::new(169, 254, 77, block * 4 + 1);
            let address = Ipv4Addr::new(169, 254, 77, block * 4 + 2);
            let host_device = format!("agw{pid}");
            let peer = format!("agp{pid}");
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &host_device,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &peer,
                ],
            )?;
            let wire = || -> Result<(), Error> {
                run("ip", &["link", "set", &peer, "netns", &pid.to_string()])?;
                run(
                    "ip",
                    &[
                        "addr",
                        "add",
                        &format!("{host_address}/30"),
                        "dev",
                        &host_device,
                    ],
                )?;
                run("ip", &["link", "set", &host_device, "up"])?;
                inside(pid, &["link", "set", &peer, "name", "eth0"])?;
                inside(
                    pid,
                    &["addr", "add", &format!("{address}/30"), "dev", "eth0"],
                )?;
                inside(pid, &["link", "set", "eth0", "up"])?;
                inside(pid, &["link", "set", "lo", "up"])?;
                Ok(())
            };
            if let Err(err) = wire() {
                // Deleting one end deletes the pair.
                let _ = run("ip", &["link", "del", &host_device]);
                return Err(err);
            }
            Ok(Some(Veth {
                host_device,
                host_address,
                address,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_blocks_in_use() {
        let output = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
7: agw51    inet 169.254.77.1/30 scope global agw51\\       valid_lft forever
9: agw88    inet 169.254.77.9/30 scope global agw88\\       valid_lft forever
";
        assert_eq!(used_blocks(output), [0, 2]);
    }
}

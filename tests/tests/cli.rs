//! The command line against the kernel: `agent top` with and without a
//! daemon, and the one-sentence errors that leave nothing behind.

use std::{
    io::Read as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent_tests::{
    agent_bin, attachments, netpeer_bin, require_root, unique, Cgroup, Daemon, Netns,
};

fn send(cgroup: &Cgroup, ns: &Netns, count: u32, size: u32) {
    let status = cgroup
        .command(netpeer_bin(), Some(ns))
        .args([
            "udp-send",
            "127.0.0.1:7100",
            &count.to_string(),
            &size.to_string(),
        ])
        .status()
        .expect("run netpeer");
    assert!(status.success());
}

/// The table row of `path` in the last table `agent top` printed.
fn last_row<'a>(output: &'a str, path: &str) -> Vec<&'a str> {
    output
        .lines()
        .rev()
        .find(|line| line.ends_with(&format!("  {path}")))
        .unwrap_or_else(|| panic!("no row for {path} in:\n{output}"))
        .split_whitespace()
        .collect()
}

#[test]
fn top_without_a_daemon_attaches_for_as_long_as_it_runs() {
    require_root();
    let root = Cgroup::new_root("agent-test-top");
    let a = root.child("a");
    let ns = Netns::new("agt-top");
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("agent-none"));
    let mut top = Command::new(agent_bin())
        .args(["top", "-n", "4", "-d", "0.5", "--cgroup-root"])
        .arg(&root.path)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent top");
    let deadline = Instant::now() + Duration::from_secs(20);
    while attachments(&root.path) != 2 {
        assert!(
            Instant::now() < deadline,
            "agent top did not attach its programs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    send(&a, &ns, 10, 100);
    let status = top.wait().expect("wait for agent top");
    let mut output = String::new();
    top.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut output)
        .expect("read top output");
    assert!(status.success(), "agent top failed: {output}");
    // Piped: plain tables, one per refresh, totals since top attached.
    assert!(
        output.contains("RX/s       TX/s         RX         TX  RX PKTS  TX PKTS  CGROUP"),
        "{output}"
    );
    let row = last_row(&output, "/a");
    assert_eq!(
        &row[row.len() - 5..],
        ["1.2", "KiB", "0", "10", "/a"],
        "10 datagrams of 128 bytes: {output}"
    );
    assert_eq!(attachments(&root.path), 0, "agent top detached on exit");
    assert!(!pin_dir.exists(), "and pinned nothing");
}

#[test]
fn top_reads_a_running_daemon() {
    require_root();
    let root = Cgroup::new_root("agent-test-topd");
    let a = root.child("a");
    let ns = Netns::new("agt-topd");
    let daemon = Daemon::start(&root.path, &[]);
    send(&a, &ns, 3, 1000);
    let out = Command::new(agent_bin())
        .args(["top", "-n", "1", "-d", "0.1", "--pin-dir"])
        .arg(&daemon.pin_dir)
        .output()
        .expect("run agent top");
    let output = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{output}");
    let row = last_row(&output, "/a");
    assert_eq!(
        &row[row.len() - 5..],
        ["3.0", "KiB", "0", "3", "/a"],
        "{output}"
    );
    assert_eq!(
        attachments(&root.path),
        2,
        "top added no attachment of its own"
    );
}

#[test]
fn a_second_daemon_on_the_same_pins_is_refused() {
    require_root();
    let root = Cgroup::new_root("agent-test-twice");
    let daemon = Daemon::start(&root.path, &[]);
    let out = Command::new(agent_bin())
        .args(["daemon", "--cgroup-root"])
        .arg(&root.path)
        .arg("--pin-dir")
        .arg(&daemon.pin_dir)
        .output()
        .expect("run a second agent daemon");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .trim()
            .starts_with("agent: another agent daemon (pid ")
            && stderr.contains(&format!(
                "already runs with its pins at {}",
                daemon.pin_dir.display()
            )),
        "{stderr}"
    );
    assert_eq!(
        attachments(&root.path),
        2,
        "the running daemon's programs are untouched"
    );
}

#[test]
fn stats_without_a_daemon_says_so_and_exits_2() {
    require_root();
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("agent-none"));
    let output = Command::new(agent_bin())
        .args(["stats", "--json", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .expect("run agent stats");
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim(),
        format!(
            "agent: no agent daemon is running: nothing is pinned at {}; start one with `agent daemon` (or pass the --pin-dir it uses)",
            pin_dir.display()
        )
    );
}

#[test]
fn a_cgroup_root_outside_cgroup2_is_refused_and_nothing_is_left() {
    require_root();
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("agent-bad"));
    let output = Command::new(agent_bin())
        .args(["daemon", "--cgroup-root", "/tmp", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .expect("run agent daemon");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .trim()
            .starts_with("agent: cgroup root /tmp is not in a cgroup v2 hierarchy"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!pin_dir.exists(), "no pins are left behind");
}

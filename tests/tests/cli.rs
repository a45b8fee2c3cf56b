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

/// The `RX/s` and `TX/s` columns of `path` in each table `agent top` printed.
fn rates_of(output: &str, path: &str) -> Vec<(String, String)> {
    output
        .lines()
        .filter(|line| line.ends_with(&format!("  {path}")))
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            // ... RX/s as "N unit/s", TX/s likewise, then the path.
            let n = words.len();
            (
                format!("{} {}", words[n - 5], words[n - 4]),
                format!("{} {}", words[n - 3], words[n - 2]),
            )
        })
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
        .args(["top", "-n", "3", "-d", "1", "--cgroup-root"])
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
    // Well inside the first refresh interval (top samples right after attaching).
    std::thread::sleep(Duration::from_millis(300));
    send(&a, &ns, 10, 100);
    let status = top.wait().expect("wait for agent top");
    let mut output = String::new();
    top.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut output)
        .expect("read top output");
    assert!(status.success(), "agent top failed: {output}");
    // Piped: plain tables, one per refresh, with rates over each second.
    assert!(
        output.contains("  CPU%  RUNQ P99        MEM   PIDS       RX/s       TX/s  CGROUP"),
        "{output}"
    );
    let rates = rates_of(&output, "/a");
    let sent = |tx: &str| (String::from("0 B/s"), String::from(tx));
    assert_eq!(
        rates,
        [sent("1.2 KiB/s"), sent("0 B/s"), sent("0 B/s")],
        "10 datagrams of 128 bytes in the first second: {output}"
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
    let top = Command::new(agent_bin())
        .args(["top", "-n", "1", "-d", "1", "--pin-dir"])
        .arg(&daemon.pin_dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run agent top");
    std::thread::sleep(Duration::from_millis(300));
    send(&a, &ns, 3, 1000);
    let out = top.wait_with_output().expect("wait for agent top");
    let output = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{output}");
    assert_eq!(
        rates_of(&output, "/a"),
        [(String::from("0 B/s"), String::from("3.0 KiB/s"))],
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

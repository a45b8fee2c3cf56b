//! The command line against the kernel: `agent top` with and without a
//! daemon, and the one-sentence errors that leave nothing behind.

use std::{
    io::{BufRead as _, BufReader, Read as _},
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

/// For each table `agent top` printed: the interval its rates are over (from
/// its header line) and the `RX/s` and `TX/s` columns of `path`.
fn rates_of(output: &str, path: &str) -> Vec<(f64, String, String)> {
    let mut interval = None;
    let mut found = Vec::new();
    for line in output.lines() {
        if let Some((_, over)) = line.split_once(" - rates over ") {
            interval = over.strip_suffix('s').and_then(|s| s.parse().ok());
        } else if line.ends_with(&format!("  {path}")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            // ... RX/s as "N unit/s", TX/s likewise, DROP, DENY, the path.
            let n = words.len();
            found.push((
                interval.expect("a table header before its rows"),
                format!("{} {}", words[n - 7], words[n - 6]),
                format!("{} {}", words[n - 5], words[n - 4]),
            ));
        }
    }
    found
}

/// Whether a rate as shown (`1.2 KiB/s`) is `bytes` over `seconds`, to the
/// precision shown (the interval is measured, so not quite the `-d` asked).
fn shows(rate: &str, bytes: f64, seconds: f64) -> bool {
    let Some((number, unit)) = rate.split_once(' ') else {
        return false;
    };
    let Ok(value) = number.parse::<f64>() else {
        return false;
    };
    let scale = match unit {
        "B/s" => 1.0,
        "KiB/s" => 1024.0,
        "MiB/s" => 1024.0 * 1024.0,
        _ => return false,
    };
    // Half the last digit shown, and the interval's 1 ms of rounding.
    let digit = if number.contains('.') { 0.1 } else { 1.0 };
    let expected = bytes / seconds;
    (value * scale - expected).abs() <= digit * scale / 2.0 + expected * 0.001
}

/// Runs `send` once `top` printed its first table, and returns all it
/// printed. By then its second interval has begun: traffic sent earlier
/// could fall before its first sample (which a loaded host may delay after
/// the programs attach), in no interval at all.
fn send_after_first_table(top: &mut std::process::Child, send: impl FnOnce()) -> String {
    let mut stdout = BufReader::new(top.stdout.take().expect("stdout"));
    let mut output = String::new();
    while !output.contains("rates over") {
        assert!(
            stdout.read_line(&mut output).expect("read top output") > 0,
            "agent top ended early: {output}"
        );
    }
    send();
    stdout.read_to_string(&mut output).expect("read top output");
    output
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
    let output = send_after_first_table(&mut top, || send(&a, &ns, 10, 100));
    let status = top.wait().expect("wait for agent top");
    assert!(status.success(), "agent top failed: {output}");
    // Piped: plain tables, one per refresh, with rates over each second.
    assert!(
        output.contains(
            "  CPU%  RUNQ P99        MEM   PIDS       RX/s       TX/s   DROP   DENY  CGROUP"
        ),
        "{output}"
    );
    let rates = rates_of(&output, "/a");
    assert_eq!(rates.len(), 3, "{output}");
    // 10 datagrams of 128 bytes in the second interval, none in the others.
    for (i, (seconds, rx, tx)) in rates.iter().enumerate() {
        let sent = if i == 1 { 1280.0 } else { 0.0 };
        assert!(
            shows(rx, 0.0, *seconds) && shows(tx, sent, *seconds),
            "table {i}: {output}"
        );
    }
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
    let mut top = Command::new(agent_bin())
        .args(["top", "-n", "2", "-d", "1", "--pin-dir"])
        .arg(&daemon.pin_dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run agent top");
    let output = send_after_first_table(&mut top, || send(&a, &ns, 3, 1000));
    let status = top.wait().expect("wait for agent top");
    assert!(status.success(), "{output}");
    // 3 datagrams of 1,028 bytes in the second interval.
    let rates = rates_of(&output, "/a");
    assert_eq!(rates.len(), 2, "{output}");
    for (i, (seconds, rx, tx)) in rates.iter().enumerate() {
        let sent = if i == 1 { 3084.0 } else { 0.0 };
        assert!(
            shows(rx, 0.0, *seconds) && shows(tx, sent, *seconds),
            "table {i}: {output}"
        );
    }
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

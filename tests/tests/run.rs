//! `agent run` against the kernel: limits that bite, namespaces that isolate,
//! a lifecycle that cleans up, and bad input that leaves nothing behind.
//! Every test uses its own cgroup parent and state directory.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use agent_tests::{agent_bin, Runs};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_workload_past_its_memory_limit_is_oom_killed_and_reported() {
    let runs = Runs::new();
    // tail keeps the last line of its input in memory, and /dev/zero has no newline.
    let out = runs.output(
        &["--name", "hog", "--memory", "64M"],
        &["sh", "-c", "exec tail < /dev/zero"],
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "killed by SIGKILL: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("agent: workload hog was killed by the kernel's OOM killer: it reached its memory limit of 64.0 MiB (--memory)"),
        "{}",
        stderr(&out)
    );
    runs.assert_gone("hog");
}

#[test]
fn half_a_cpu_holds_a_busy_loop_to_half_a_cpu() {
    let runs = Runs::new();
    let mut run = runs.spawn(
        &["--name", "spin", "--cpus", "0.5"],
        &["sh", "-c", "while :; do :; done"],
    );
    let workload = runs.wait_running("spin");
    // The cgroup's own usage counter: cpuacct.usage on v1, cpu.stat's
    // usage_usec on v2 (v1's cpu.stat has no usage).
    let dirs: Vec<PathBuf> = workload["cgroups"]["dirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .collect();
    let usage_file = dirs
        .iter()
        .map(|dir| dir.join("cpuacct.usage"))
        .chain(dirs.iter().map(|dir| dir.join("cpu.stat")))
        .find(|file| {
            fs::read_to_string(file)
                .is_ok_and(|t| t.trim().parse::<u64>().is_ok() || t.contains("usage_usec"))
        })
        .expect("a CPU usage counter");
    let usage_ns = || {
        let text = fs::read_to_string(&usage_file).unwrap();
        match text.lines().find_map(|l| l.strip_prefix("usage_usec ")) {
            Some(usec) => usec.trim().parse::<u64>().unwrap() * 1000,
            None => text.trim().parse::<u64>().unwrap(),
        }
    };
    thread::sleep(Duration::from_millis(300));
    let (start, t0) = (usage_ns(), Instant::now());
    thread::sleep(Duration::from_secs(3));
    let (end, elapsed) = (usage_ns(), t0.elapsed());
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let cpus = (end - start) as f64 / elapsed.as_nanos() as f64;
    assert!(
        cpus <= 0.55,
        "the loop used {cpus:.3} CPUs over 3 s (limit 0.5)"
    );
    // Other tests share the CPUs: only check that it ran at all.
    assert!(
        cpus >= 0.25,
        "the loop used only {cpus:.3} CPUs: was it running?"
    );
    let out = runs.agent(&["stop", "spin", "--timeout", "100ms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        run.wait().unwrap().code(),
        Some(137),
        "sh as PID 1 ignores SIGTERM, so stop killed it"
    );
    runs.assert_gone("spin");
}

#[test]
fn the_fork_past_the_pids_limit_fails() {
    let runs = Runs::new();
    // sh is process 1 of 20; each `sleep &` is one more.
    let out = runs.output(
        &["--pids", "20"],
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 30 ]; do sleep 5 & i=$((i+1)); echo $i; done",
        ],
    );
    let text = stdout(&out);
    let printed: Vec<&str> = text.lines().map(str::trim).collect();
    let last = printed.last().copied().unwrap_or_default();
    assert_eq!(
        last, "19",
        "19 children fit beside sh, the 20th fork fails: {printed:?}"
    );
    assert!(stderr(&out).contains("Cannot fork"), "{}", stderr(&out));
}

#[test]
fn inside_the_namespaces_the_workload_sees_only_itself() {
    let runs = Runs::new();
    let host_name = stdout(&Command::new("hostname").output().unwrap());
    let out = runs.output(&["--hostname", "inner"], &["hostname"]);
    assert_eq!(stdout(&out).trim(), "inner");
    assert_eq!(
        stdout(&Command::new("hostname").output().unwrap()),
        host_name,
        "the host's name is unchanged"
    );

    let out = runs.output(&[], &["ps", "-e", "-o", "pid=,comm="]);
    assert_eq!(
        stdout(&out).split_whitespace().collect::<Vec<_>>(),
        ["1", "ps"],
        "only the workload, as PID 1"
    );

    let out = runs.output(&[], &["cat", "/proc/self/cgroup"]);
    assert!(
        stdout(&out).lines().any(|l| l == "0::/"),
        "its cgroup is its root: {}",
        stdout(&out)
    );

    // A System V shared memory segment of the host is invisible inside.
    let made = Command::new("ipcmk").args(["-M", "4096"]).output().unwrap();
    let id = stdout(&made)
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned();
    let out = runs.output(&[], &["ipcs", "-m"]);
    let _ = Command::new("ipcrm").args(["-m", &id]).status();
    assert!(
        !id.is_empty() && !stdout(&out).contains(&format!(" {id} ")),
        "segment {id} is visible inside:\n{}",
        stdout(&out)
    );
    assert!(
        stdout(&Command::new("ipcs").arg("-m").output().unwrap())
            .lines()
            .count()
            > 0
    );
}

#[test]
fn net_none_has_only_lo_and_isolated_reaches_the_host_and_nothing_else() {
    let runs = Runs::new();
    let out = runs.output(&["--net", "none"], &["ip", "-o", "link"]);
    let text = stdout(&out);
    let links: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(str::trim)
        .collect();
    assert_eq!(links, ["lo"]);

    let script = "host=$(ip -4 -o addr show dev eth0 | sed -E 's/.* inet ([0-9.]+)\\/30.*/\\1/' | awk -F. '{print $1\".\"$2\".\"$3\".\"$4-1}'); \
                  ping -c 1 -W 2 $host > /dev/null && echo reached $host; \
                  ping -c 1 -W 1 10.255.255.1 2>&1 | grep -o 'Network is unreachable'";
    let out = runs.output(&["--net", "isolated"], &["sh", "-c", script]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{}\n{}", stdout(&out), stderr(&out));
    assert!(lines[0].starts_with("reached 169.254.77."), "{lines:?}");
    assert_eq!(
        lines[1], "Network is unreachable",
        "no route beyond the host"
    );
}

#[test]
fn root_inside_a_user_namespace_is_uid_100000_outside() {
    let runs = Runs::new();
    let out = runs.output(&["--userns"], &["id", "-u"]);
    assert_eq!(stdout(&out).trim(), "0", "{}", stderr(&out));
    let mut run = runs.spawn(&["--userns", "--name", "u"], &["sleep", "30"]);
    let workload = runs.wait_running("u");
    let status = fs::read_to_string(format!("/proc/{}/status", workload["pid"])).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(uid, "100000");
    runs.stop("u", &mut run);
    runs.assert_gone("u");
}

#[test]
fn a_rootfs_becomes_the_workloads_root() {
    let runs = Runs::new();
    let root = runs.state.with_extension("rootfs");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("proc")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let out = runs.output(
        &["--rootfs", &root.display().to_string()],
        &["/bin/busybox", "ls", "/"],
    );
    let _ = fs::remove_dir_all(&root);
    assert_eq!(
        stdout(&out).split_whitespace().collect::<Vec<_>>(),
        ["bin", "proc"],
        "{}",
        stderr(&out)
    );
}

#[test]
fn exit_status_signals_and_clean_up() {
    let runs = Runs::new();
    assert_eq!(
        runs.output(&[], &["sh", "-c", "exit 7"]).status.code(),
        Some(7)
    );

    // SIGTERM to the agent reaches a workload that handles it.
    let mut run = runs.spawn(
        &["--name", "trap"],
        &[
            "sh",
            "-c",
            "trap 'exit 3' TERM; while :; do sleep 0.05; done",
        ],
    );
    let workload = runs.wait_running("trap");
    thread::sleep(Duration::from_millis(200));
    let agent_pid = nix::unistd::Pid::from_raw(workload["agent_pid"].as_i64().unwrap() as i32);
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(run.wait().unwrap().code(), Some(3));
    runs.assert_gone("trap");

    // A second SIGINT kills one that ignores the first.
    let mut run = runs.spawn(&["--name", "stubborn"], &["sleep", "60"]);
    let workload = runs.wait_running("stubborn");
    let agent_pid = nix::unistd::Pid::from_raw(workload["agent_pid"].as_i64().unwrap() as i32);
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGINT).unwrap();
    thread::sleep(Duration::from_millis(200));
    assert!(
        run.try_wait().unwrap().is_none(),
        "sleep as PID 1 ignores SIGINT"
    );
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGINT).unwrap();
    assert_eq!(run.wait().unwrap().code(), Some(137));
    runs.assert_gone("stubborn");
}

#[test]
fn pause_stops_a_counter_and_resume_lets_it_go_on() {
    let runs = Runs::new();
    let counter = runs.state.with_extension("counter");
    let script = format!(
        "i=0; while :; do i=$((i+1)); echo $i > {}; sleep 0.02; done",
        counter.display()
    );
    let mut run = runs.spawn(&["--name", "count"], &["sh", "-c", &script]);
    runs.wait_running("count");
    let read = || {
        fs::read_to_string(&counter)
            .unwrap_or_default()
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    thread::sleep(Duration::from_millis(300));
    assert!(runs.agent(&["pause", "count"]).status.success());
    let paused = read();
    assert_eq!(runs.wait_running("count")["state"], "paused");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(read(), paused, "a frozen workload does not count");
    assert!(runs.agent(&["resume", "count"]).status.success());
    thread::sleep(Duration::from_millis(500));
    assert!(read() > paused + 5, "it counts again after resume");
    runs.stop("count", &mut run);
    let _ = fs::remove_file(&counter);
    runs.assert_gone("count");
}

#[test]
fn a_workload_appears_in_stats_under_its_path_with_its_name() {
    let runs = Runs::new();
    // The daemon watches the test's own cgroup parent in the v2 hierarchy
    // (removed with the rest by Runs).
    let daemon = runs.daemon(&[]);
    let mut run = runs.spawn(&["--name", "web", "--net", "none"], &["sleep", "30"]);
    runs.wait_running("web");
    let stats = Command::new(agent_bin())
        .args(["stats", "--json", "--pin-dir"])
        .arg(&daemon.pin_dir)
        .arg("--state-dir")
        .arg(&runs.state)
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    let web = agent_tests::cgroup_in(&stats, "/web").expect("the workload's cgroup");
    assert_eq!(web["name"], "web");
    runs.stop("web", &mut run);
    drop(daemon);
}

/// Runs `agent run` with bad input and checks the one sentence, the status,
/// and that nothing was left.
fn refused(runs: &Runs, name: &str, flags: &[&str], command: &[&str], status: i32, message: &str) {
    let mut all = vec!["--name", name];
    all.extend_from_slice(flags);
    let out = runs.output(&all, command);
    assert_eq!(
        out.status.code(),
        Some(status),
        "{flags:?}: {}",
        stderr(&out)
    );
    assert_eq!(
        stderr(&out).trim(),
        format!("agent: {message}"),
        "{flags:?}"
    );
    runs.assert_gone(name);
}

#[test]
fn bad_input_is_one_sentence_and_leaves_nothing_behind() {
    let runs = Runs::new();
    refused(
        &runs,
        "b1",
        &["--memory", "5QB"],
        &["true"],
        125,
        r#"--memory "5QB" is not a size such as 512M, 1G or 1048576"#,
    );
    let cpus = std::thread::available_parallelism().unwrap().get();
    refused(
        &runs,
        "b2",
        &["--cpus", "0"],
        &["true"],
        125,
        &format!("--cpus 0: must be more than 0 and at most {cpus} (the CPUs this host has)"),
    );
    refused(
        &runs,
        "b3",
        &["--cpus", "1000"],
        &["true"],
        125,
        &format!("--cpus 1000: must be more than 0 and at most {cpus} (the CPUs this host has)"),
    );
    refused(
        &runs,
        "b4",
        &[],
        &["no-such-command-xyz"],
        127,
        "no-such-command-xyz: command not found (looked in PATH)",
    );
    refused(
        &runs,
        "b5",
        &["--rootfs", "/etc/hostname"],
        &["true"],
        125,
        "--rootfs /etc/hostname: not a directory",
    );

    let mut run = runs.spawn(&["--name", "taken"], &["sleep", "30"]);
    runs.wait_running("taken");
    let out = runs.output(&["--name", "taken"], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        stderr(&out).trim(),
        r#"agent: a workload named "taken" is already running: pick another --name, or see `agent ps`"#
    );
    runs.stop("taken", &mut run);

    // Not root: setpriv drops to nobody.
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(agent_bin())
        .args([
            "run",
            "--name",
            "b6",
            "--cgroup-parent",
            &runs.parent,
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        stderr(&out).trim(),
        "agent: agent run needs root to create cgroups and namespaces: run it with sudo"
    );
    runs.assert_gone("b6");
    assert!(
        Path::new(&runs.state)
            .join("workloads")
            .read_dir()
            .map_or(true, |mut d| d.next().is_none()),
        "no record is left"
    );
}

/// The block device holding `/`, as MAJOR:MINOR.
fn root_device() -> String {
    use std::os::unix::fs::MetadataExt as _;
    let dev = fs::metadata("/").unwrap().dev();
    format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    )
}

#[test]
fn every_limit_lands_in_the_kernels_files() {
    let runs = Runs::new();
    let device = root_device();
    let io_limit = format!("{device}:rbps=1M,wbps=2M");
    let out = runs.output(
        &[
            "--name",
            "limits",
            "--keep",
            "--cpus",
            "0.25",
            "--cpu-weight",
            "200",
            "--cpuset",
            "0",
            "--memory",
            "96M",
            "--pids",
            "42",
            "--io-weight",
            "300",
            "--io-limit",
            &io_limit,
        ],
        &["sh", "-c", "grep Cpus_allowed_list /proc/self/status"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).split_whitespace().collect::<Vec<_>>(),
        ["Cpus_allowed_list:", "0"]
    );
    // Kept: read what the kernel holds, wherever this host keeps it.
    let read = |file: &str| -> String {
        runs.dirs("limits")
            .iter()
            .map(|dir| dir.join(file))
            .find_map(|path| fs::read_to_string(path).ok())
            .unwrap_or_else(|| panic!("no {file}"))
            .trim()
            .to_owned()
    };
    if agent_tests::v2_mount() == Path::new("/sys/fs/cgroup") {
        assert_eq!(read("cpu.max"), "25000 100000");
        assert_eq!(read("cpu.weight"), "200");
        assert_eq!(read("memory.max"), (96u64 << 20).to_string());
        assert_eq!(
            read("io.max"),
            format!("{device} rbps=1048576 wbps=2097152 riops=max wiops=max")
        );
    } else {
        assert_eq!(read("cpu.cfs_quota_us"), "25000");
        assert_eq!(read("cpu.cfs_period_us"), "100000");
        assert_eq!(
            read("cpu.shares"),
            "2048",
            "weight 200 is twice the default share"
        );
        assert_eq!(read("memory.limit_in_bytes"), (96u64 << 20).to_string());
        assert_eq!(
            read("memory.memsw.limit_in_bytes"),
            (96u64 << 20).to_string(),
            "no escape into swap"
        );
        assert_eq!(
            read("blkio.throttle.read_bps_device"),
            format!("{device} 1048576")
        );
        assert_eq!(
            read("blkio.throttle.write_bps_device"),
            format!("{device} 2097152")
        );
        // CFQ's blkio.weight is 5 times the v2 weight (capped at 1000); BFQ's
        // blkio.bfq.weight is the v2 weight.
        let cfq = runs
            .dirs("limits")
            .iter()
            .any(|dir| dir.join("blkio.weight").exists());
        if cfq {
            assert_eq!(read("blkio.weight"), "1000");
        } else {
            assert_eq!(read("blkio.bfq.weight"), "300");
        }
    }
    assert_eq!(read("pids.max"), "42");
    assert_eq!(read("cpuset.cpus"), "0");
}

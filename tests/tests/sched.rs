//! CPU and scheduler accounting, memory, pids and io against the kernel's own
//! numbers. Workloads run under `agent run` (so they sit in a cgroup of every
//! hierarchy); the daemon watches the test's own cgroup parent.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use agent_tests::{cgroup_in, Cgroup, Daemon, Runs};

/// A daemon watching the v2 directory of `runs`' cgroup parent.
fn daemon_for(runs: &Runs) -> Daemon {
    runs.daemon(&[])
}

/// The cgroup object of workload `name` in `agent stats --json`.
fn stats_of(daemon: &Daemon, name: &str) -> serde_json::Value {
    let stats = daemon.stats();
    cgroup_in(&stats, &format!("/{name}"))
        .unwrap_or_else(|| panic!("no cgroup /{name} in {stats}"))
        .clone()
}

/// The file `name` of workload `workload`, in whichever hierarchy has it.
fn cgroup_file(runs: &Runs, workload: &str, name: &str) -> String {
    runs.dirs(workload)
        .iter()
        .map(|dir| dir.join(name))
        .find_map(|path| fs::read_to_string(path).ok())
        .unwrap_or_else(|| panic!("no {name} for {workload}"))
}

fn u64_of(value: &serde_json::Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

/// The cgroup's own CPU usage: cpuacct.usage on v1, cpu.stat usage_usec on v2.
fn kernel_cpu_ns(runs: &Runs, workload: &str) -> u64 {
    let dirs = runs.dirs(workload);
    if let Some(text) = dirs
        .iter()
        .find_map(|dir| fs::read_to_string(dir.join("cpuacct.usage")).ok())
    {
        return text.trim().parse().unwrap();
    }
    let stat = cgroup_file(runs, workload, "cpu.stat");
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
        * 1000
}

#[test]
fn on_cpu_time_agrees_with_the_cgroups_own_counter() {
    let runs = Runs::new();
    let daemon = daemon_for(&runs);
    // A CPU-bound loop for 2 s, capped at half a CPU so the kernel also
    // throttles it; kept so both counters can be read after it ends.
    let out = runs.output(
        &["--name", "burn", "--keep", "--cpus", "0.5"],
        &["timeout", "2", "sh", "-c", "while :; do :; done"],
    );
    assert_eq!(out.status.code(), Some(124), "timeout ends the loop");
    let ebpf = u64_of(&stats_of(&daemon, "burn")["cpu"]["usage_ns"]);
    let kernel = kernel_cpu_ns(&runs, "burn");
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let ratio = ebpf as f64 / kernel as f64;
    eprintln!("on-CPU time: eBPF {ebpf} ns, cgroup {kernel} ns, ratio {ratio:.5}");
    assert!(
        (0.98..=1.02).contains(&ratio),
        "eBPF {ebpf} ns vs the cgroup's {kernel} ns ({ratio:.4})"
    );
    assert!(kernel > 500_000_000, "it ran: {kernel} ns");

    let stats = stats_of(&daemon, "burn");
    let cpu_stat = cgroup_file(&runs, "burn", "cpu.stat");
    let nr_throttled: u64 = cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(nr_throttled > 0, "half a CPU throttles a busy loop");
    assert_eq!(
        u64_of(&stats["cpu"]["throttled_periods"]),
        nr_throttled,
        "the kernel's own throttling figures"
    );
}

#[test]
fn a_loop_that_keeps_its_cpu_is_counted_while_it_runs() {
    let runs = Runs::new();
    let daemon = daemon_for(&runs);
    // Uncapped and alone on CPU 1: it switches out rarely, so only the tick
    // keeps its count current.
    let mut child = runs.spawn(
        &["--name", "spin", "--cpuset", "1"],
        &["timeout", "4", "sh", "-c", "while :; do :; done"],
    );
    runs.wait_running("spin");
    thread::sleep(Duration::from_millis(1500));
    // Ours between two readings of the kernel's counter: ours lags by at
    // most a tick or two (4 ms each at HZ=250), so it is within 2% of the
    // first, and it cannot be ahead of the second.
    let first = kernel_cpu_ns(&runs, "spin");
    let ebpf = u64_of(&stats_of(&daemon, "spin")["cpu"]["usage_ns"]);
    let second = kernel_cpu_ns(&runs, "spin");
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let ratio = ebpf as f64 / first as f64;
    eprintln!(
        "running: the cgroup's {first} ns, eBPF {ebpf} ns ({ratio:.5}), the cgroup's {second} ns"
    );
    assert!(first > 1_000_000_000, "it ran: {first} ns");
    assert!(
        ratio >= 0.98 && ebpf <= second,
        "eBPF {ebpf} ns between the cgroup's {first} and {second} ns ({ratio:.4})"
    );
    assert_eq!(
        child.wait().unwrap().code(),
        Some(124),
        "timeout ends the loop"
    );
}

#[test]
fn time_spent_outside_the_watched_root_is_not_charged_on_return() {
    let watched = Cgroup::new_root("agent-test-sched-in");
    let inside = watched.child("w");
    let outside = Cgroup::new_root("agent-test-sched-out");
    let daemon = Daemon::start(&watched.path, &[]);
    // Spins 0.3 s inside, 0.6 s outside the watched root, 0.3 s inside again.
    let script = r#"
        use Time::HiRes qw(time);
        sub go { open(my $f, ">", "$_[0]/cgroup.procs") or die "$_[0]: $!"; print $f "0"; close($f) or die "$_[0]: $!" }
        sub spin { my $end = time + $_[0]; 1 while time < $end }
        go($ARGV[0]); spin(0.3); go($ARGV[1]); spin(0.6); go($ARGV[0]); spin(0.3);
    "#;
    let status = std::process::Command::new("perl")
        .args(["-e", script])
        .arg(&inside.path)
        .arg(&outside.path)
        .status()
        .unwrap();
    assert!(status.success());
    let stats = daemon.stats();
    let ebpf = cgroup_in(&stats, "/w")
        .map(|c| u64_of(&c["cpu"]["usage_ns"]))
        .unwrap_or_else(|| panic!("no /w in {stats}"));
    let kernel = fs::read_to_string(inside.path.join("cpu.stat"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
        * 1000;
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let ratio = ebpf as f64 / kernel as f64;
    eprintln!("in, out, in again: eBPF {ebpf} ns, cgroup {kernel} ns ({ratio:.4})");
    assert!(kernel > 100_000_000, "it ran inside: {kernel} ns");
    // The 0.6 s outside would make it 1.5 or more; each move can lose up to
    // a tick (4 ms) of what ran before the next switch or tick.
    assert!(
        (0.9..=1.001).contains(&ratio),
        "eBPF {ebpf} ns vs the cgroup's {kernel} ns ({ratio:.4})"
    );
}

#[test]
fn two_loops_on_one_cpu_wait_milliseconds_and_a_sleeper_microseconds() {
    let runs = Runs::new();
    let daemon = daemon_for(&runs);
    let pair = "a() { while :; do :; done; }; a & x=$!; a & y=$!; sleep 2; kill $x $y";
    let out = runs.output(
        &["--name", "pair", "--keep", "--cpuset", "1"],
        &["sh", "-c", pair],
    );
    assert!(out.status.success());
    // One process that sleeps 1 ms a thousand times, on the other CPU.
    let sleeper = "select(undef, undef, undef, 0.001) for 1 .. 1000";
    let out = runs.output(
        &["--name", "sleeper", "--keep", "--cpuset", "0"],
        &["perl", "-e", sleeper],
    );
    assert!(out.status.success());

    let pair = stats_of(&daemon, "pair")["cpu"]["runqueue_latency"].clone();
    let sleeper = stats_of(&daemon, "sleeper")["cpu"]["runqueue_latency"].clone();
    let pair_p50 = u64_of(&pair["p50_ns"]);
    let sleeper_p50 = u64_of(&sleeper["p50_ns"]);
    eprintln!("run-queue p50: busy pair {pair_p50} ns, sleeper {sleeper_p50} ns");
    assert!(
        (500_000..50_000_000).contains(&pair_p50),
        "each loop waits out the other's slice: p50 {pair_p50} ns in {pair}"
    );
    assert!(
        sleeper_p50 * 10 <= pair_p50,
        "a lone sleeper waits far less: p50 {sleeper_p50} ns vs {pair_p50} ns"
    );
    assert!(
        u64_of(&sleeper["count"]) >= 1000,
        "one wait per wakeup: {sleeper}"
    );
    let buckets: u64 = sleeper["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| u64_of(&b["count"]))
        .sum();
    assert_eq!(buckets, u64_of(&sleeper["count"]));
}

#[test]
fn a_sleeping_workload_switches_voluntarily() {
    let runs = Runs::new();
    let daemon = daemon_for(&runs);
    let out = runs.output(
        &["--name", "nap", "--keep"],
        &[
            "perl",
            "-e",
            "select(undef, undef, undef, 0.001) for 1 .. 1000",
        ],
    );
    assert!(out.status.success());
    let cpu = stats_of(&daemon, "nap")["cpu"].clone();
    let (voluntary, involuntary) = (
        u64_of(&cpu["voluntary_switches"]),
        u64_of(&cpu["involuntary_switches"]),
    );
    eprintln!("switches: {voluntary} voluntary, {involuntary} involuntary");
    assert!(voluntary >= 1000, "one switch per sleep at least: {cpu}");
    assert!(
        involuntary * 20 <= voluntary,
        "almost no preemptions: {involuntary} of {voluntary}"
    );
    assert_eq!(u64_of(&cpu["switches"]), voluntary + involuntary);
}

#[test]
fn fifty_children_are_fifty_started_and_fifty_exited() {
    let runs = Runs::new();
    let daemon = daemon_for(&runs);
    // dash forks once per /bin/true; the loop and the arithmetic are builtins,
    // and exec replaces the shell without a fork.
    let script = "i=0; while [ $i -lt 50 ]; do /bin/true; i=$((i+1)); done; exec sleep 30";
    let mut run = runs.spawn(&["--name", "forks"], &["sh", "-c", script]);
    runs.wait_running("forks");
    let deadline = Instant::now() + Duration::from_secs(20);
    let processes = loop {
        let processes = stats_of(&daemon, "forks")["processes"].clone();
        if u64_of(&processes["exited"]) >= 50 || Instant::now() > deadline {
            break processes;
        }
        thread::sleep(Duration::from_millis(100));
    };
    thread::sleep(Duration::from_millis(300));
    assert_eq!(processes, serde_json::json!({"started": 50, "exited": 50}));
    assert_eq!(
        stats_of(&daemon, "forks")["processes"],
        processes,
        "and nothing more"
    );
    runs.stop("forks", &mut run);
}

#[test]
fn memory_pids_and_io_are_the_cgroup_files_own_values() {
    let runs = Runs::new();
    let daemon = daemon_for(&runs);
    let mut run = runs.spawn(
        &["--name", "idle", "--memory", "64M", "--pids", "10"],
        &["sleep", "30"],
    );
    runs.wait_running("idle");
    thread::sleep(Duration::from_millis(300));
    let v1 = !runs
        .dirs("idle")
        .iter()
        .any(|d| d.join("memory.current").exists());
    let (memory_file, io_file) = if v1 {
        (
            "memory.usage_in_bytes",
            "blkio.throttle.io_service_bytes_recursive",
        )
    } else {
        ("memory.current", "io.stat")
    };
    // The same moment: a reading of ours between two equal readings of the
    // file. Even an idle sleep's charge moves now and then (the kernel's
    // per-CPU charge caches are flushed), so a few tries are allowed.
    let (before, stats) = (0..20)
        .find_map(|_| {
            let before = cgroup_file(&runs, "idle", memory_file);
            let stats = stats_of(&daemon, "idle");
            let after = cgroup_file(&runs, "idle", memory_file);
            if before == after {
                Some((before, stats))
            } else {
                thread::sleep(Duration::from_millis(50));
                None
            }
        })
        .expect("an idle sleep's memory holds still between two readings");
    assert_eq!(
        stats["memory"]["current_bytes"].as_u64(),
        before.trim().parse().ok()
    );
    assert_eq!(stats["memory"]["limit_bytes"], 64 << 20);
    assert_eq!(
        stats["pids"],
        serde_json::json!({"current": 1, "limit": 10})
    );
    let (read, write) = agent::cgroupfs::parse_io(&cgroup_file(&runs, "idle", io_file));
    assert_eq!(
        stats["io"],
        serde_json::json!({"read_bytes": read, "write_bytes": write})
    );
    runs.stop("idle", &mut run);
}

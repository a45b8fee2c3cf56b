//! Device policy against the kernel: verdicts (the errno the kernel returns),
//! wildcards, atomic switches without a growing stack of programs, exact
//! counters, rate-limited events, and invalid files that change nothing.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use agent_tests::{
    agent_bin, attachments, loop_report, require_root, unique, v2_mount, Cgroup, Daemon,
    PolicyFile, Runs,
};

/// The device helper binary, next to the agent.
fn devpeer() -> PathBuf {
    agent_bin().with_file_name("devpeer")
}

fn policy(path: &str, default: &str, rules: &[(&str, &str)]) -> String {
    let rules: Vec<String> = rules
        .iter()
        .map(|(action, rule)| format!("{{\"{action}\": \"{rule}\"}}"))
        .collect();
    format!(
        r#"{{"version": 1, "policies": [{{"name": "test", "cgroups": ["{path}"], "devices": {{"default": "{default}", "rules": [{}]}}}}]}}"#,
        rules.join(", ")
    )
}

/// Runs devpeer inside `cgroup` and returns its output lines.
fn devpeer_in(cgroup: &Cgroup, args: &[&str]) -> Vec<String> {
    let out = cgroup
        .command(devpeer(), None)
        .args(args)
        .output()
        .expect("run devpeer");
    assert!(
        out.status.success(),
        "devpeer {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A daemon enforcing `file` at the test root `root`.
fn enforcing(root: &Cgroup, file: &PolicyFile, extra: &[&str]) -> Daemon {
    let mut args = vec!["--policy", file.0.to_str().unwrap(), "--interval", "200ms"];
    args.extend_from_slice(extra);
    Daemon::start(&root.path, &args)
}

#[test]
fn the_kernel_returns_eperm_for_what_the_policy_denies() {
    require_root();
    let root = Cgroup::new_root("agent-test-dev");
    let box_ = root.child("box");
    let file = PolicyFile::new(&policy(
        "/box",
        "deny",
        &[("allow", "c 1:3 rw"), ("allow", "c 1:9 r")],
    ));
    let _daemon = enforcing(&root, &file, &[]);
    let node = std::env::temp_dir().join(unique("agent-test-node"));
    let mknod = format!("mknod:{}:c:1:3", node.display());
    let verdicts = devpeer_in(
        &box_,
        &[
            "try",
            "rw:/dev/null",
            "r:/dev/urandom",
            "w:/dev/urandom",
            "r:/dev/zero",
            &mknod,
        ],
    );
    assert_eq!(verdicts, ["ok", "ok", "EPERM", "EPERM", "EPERM"]);
    // A cgroup made under the policed one has its policy from its first
    // access (the program's fallback to the nearest policed ancestor, until
    // the daemon has written its own entry).
    let inner = box_.child("inner");
    let verdicts = devpeer_in(
        &inner,
        &["try", "rw:/dev/null", "w:/dev/urandom", "r:/dev/zero"],
    );
    assert_eq!(verdicts, ["ok", "EPERM", "EPERM"]);
    drop(inner);
    // Outside the policed cgroup, the same accesses are allowed.
    let free = root.child("free");
    let verdicts = devpeer_in(&free, &["try", "w:/dev/urandom", "r:/dev/zero", &mknod]);
    assert_eq!(verdicts, ["ok", "ok", "ok"]);
}

#[test]
fn wildcard_rules_behave_as_written() {
    require_root();
    let root = Cgroup::new_root("agent-test-devwild");
    let box_ = root.child("box");
    let file = PolicyFile::new(&policy(
        "/box",
        "deny",
        &[("allow", "c 1:* r"), ("allow", "a *:* m")],
    ));
    let _daemon = enforcing(&root, &file, &[]);
    let node = std::env::temp_dir().join(unique("agent-test-node"));
    let verdicts = devpeer_in(
        &box_,
        &[
            "try",
            "r:/dev/null",
            "r:/dev/zero",
            "w:/dev/null",
            "r:/dev/tty",
            &format!("mknod:{}:c:1:3", node.display()),
            &format!("mknod:{}:b:7:0", node.display()),
        ],
    );
    // c 1:* r: any memory device (major 1) for reading, not for writing, and
    // not /dev/tty (5:0); a *:* m: mknod of any device.
    assert_eq!(verdicts, ["ok", "ok", "EPERM", "EPERM", "ok", "ok"]);
}

/// The version of the policy in force for cgroup `id`, read from the pinned map.
fn version_in_force(pin_dir: &Path, id: u64) -> Option<u32> {
    let data = aya::maps::MapData::from_pin(pin_dir.join("maps/DEV_POLICY")).ok()?;
    let map: aya::maps::HashMap<_, u64, common::devices::DevPolicyRef> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).ok()?;
    map.get(&id, 0).ok().map(|p| p.version)
}

#[test]
fn a_thousand_policy_switches_give_no_wrong_verdict_and_no_extra_program() {
    require_root();
    let root = Cgroup::new_root("agent-test-devswitch");
    let box_ = root.child("box");
    // Both versions allow /dev/null and deny /dev/zero; they differ elsewhere.
    let a = policy(
        "/box",
        "deny",
        &[("allow", "c 1:3 rw"), ("allow", "c 1:9 r")],
    );
    let b = policy(
        "/box",
        "deny",
        &[
            ("allow", "c 1:3 rw"),
            ("deny", "c 1:9 r"),
            ("allow", "c 5:* rw"),
        ],
    );
    let file = PolicyFile::new(&a);
    let daemon = enforcing(&root, &file, &[]);
    let programs_at_start = attachments(&root.path);
    assert_eq!(
        programs_at_start, 7,
        "accounting (2), devices (1), network guards (egress, ingress, connect4, connect6)"
    );

    let mut worker = box_
        .command(devpeer(), None)
        .args(["loop", "stdin", "/dev/null", "/dev/zero"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the device loop");
    file.switch(&daemon, (&a, &b), 1000, || {
        version_in_force(&daemon.pin_dir, box_.id())
    });
    assert_eq!(
        attachments(&root.path),
        programs_at_start,
        "one attachment per hook after 1,000 switches"
    );
    // Closing its input ends the loop that ran through all the switches.
    drop(worker.stdin.take());
    let out = worker.wait_with_output().expect("the device loop ends");
    let (opens, wrong) = loop_report(&out.stdout, "opens");
    assert_eq!(wrong, 0, "wrong verdicts in {opens} opens");
    assert!(opens > 1000, "it kept opening throughout: {opens} opens");
}

#[test]
fn no_verdict_is_wrong_while_the_policy_switches() {
    require_root();
    let root = Cgroup::new_root("agent-test-devrace");
    let box_ = root.child("box");
    let a = policy(
        "/box",
        "deny",
        &[("allow", "c 1:3 rw"), ("allow", "c 1:9 r")],
    );
    let b = policy(
        "/box",
        "deny",
        &[
            ("allow", "c 1:3 rw"),
            ("deny", "c 1:9 r"),
            ("allow", "c 5:* rw"),
        ],
    );
    let file = PolicyFile::new(&a);
    let daemon = enforcing(&root, &file, &[]);
    let worker = box_
        .command(devpeer(), None)
        .args(["loop", "4", "/dev/null", "/dev/zero"])
        .output();
    let switcher = thread::spawn({
        let (path, pid) = (file.0.clone(), daemon.pid());
        move || {
            let deadline = Instant::now() + Duration::from_millis(3500);
            let mut switches = 0;
            while Instant::now() < deadline {
                let text = if switches % 2 == 0 { &b } else { &a };
                fs::write(path.with_extension("tmp"), text).unwrap();
                fs::rename(path.with_extension("tmp"), &path).unwrap();
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGHUP,
                );
                switches += 1;
                thread::sleep(Duration::from_millis(2));
            }
            switches
        }
    });
    let out = worker.expect("run the device loop");
    let switches = switcher.join().unwrap();
    let (opens, wrong) = loop_report(&out.stdout, "opens");
    assert_eq!(
        wrong, 0,
        "wrong verdicts in {opens} opens during {switches} switches"
    );
    assert!(opens > 1000, "{opens} opens");
    assert!(
        daemon.log().matches("reloaded (SIGHUP)").count() > 100,
        "the policy did switch"
    );
}

#[test]
fn denials_are_counted_exactly_and_events_up_to_the_rate_limit() {
    require_root();
    let root = Cgroup::new_root("agent-test-devcount");
    let box_ = root.child("box");
    let file = PolicyFile::new(&policy("/box", "deny", &[("allow", "c 1:3 rw")]));
    let daemon = enforcing(&root, &file, &["--event-rate", "20"]);
    let denied = devpeer_in(&box_, &["deny", "500", "/dev/zero"]);
    assert_eq!(denied, ["500"]);
    devpeer_in(&box_, &["try", "rw:/dev/null", "rw:/dev/null"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = daemon.stats();
        let devices = stats["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["path"] == "/box")
            .unwrap()["devices"]
            .clone();
        let events = daemon
            .audit()
            .iter()
            .filter(|e| e["cgroup"] == "/box")
            .count() as u64;
        let suppressed = devices["suppressed_events"].as_u64().unwrap();
        assert_eq!(devices["denied"], 500, "every denial counted: {devices}");
        assert_eq!(devices["allowed"], 2);
        if events + suppressed == 500 {
            // The burst is 20 per CPU, refilled at 20 per second.
            assert!(
                (20..=100).contains(&events),
                "{events} events got through the rate limit"
            );
            let event = daemon
                .audit()
                .into_iter()
                .find(|e| e["cgroup"] == "/box")
                .unwrap();
            assert_eq!(event["kind"], "device_denied");
            assert_eq!(event["comm"], "devpeer");
            assert_eq!(
                event["device"],
                serde_json::json!({"type": "c", "major": 1, "minor": 5, "access": "r"})
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{events} events and {suppressed} suppressed for 500 denials"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // `agent events --since` replays them from the daemon's buffer.
    let out = Command::new(agent_bin())
        .args(["events", "--since", "1h", "--no-follow", "--events-socket"])
        .arg(daemon.events_socket())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(
        lines,
        daemon.audit().len(),
        "the same events as the audit log"
    );
}

#[test]
fn an_invalid_policy_file_changes_nothing_in_force() {
    require_root();
    let root = Cgroup::new_root("agent-test-devbad");
    let box_ = root.child("box");
    let file = PolicyFile::new(&policy("/box", "deny", &[("allow", "c 1:3 rw")]));
    let daemon = enforcing(&root, &file, &[]);
    assert_eq!(
        devpeer_in(&box_, &["try", "rw:/dev/null", "r:/dev/zero"]),
        ["ok", "EPERM"]
    );
    let broken = policy("/box", "allow", &[("allow", "c x:3 rw")]);
    file.write(&broken);
    daemon.hangup();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.log().contains("the policy in force stays in force") {
        assert!(
            Instant::now() < deadline,
            "the daemon did not report the invalid file:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        daemon
            .log()
            .contains("policies[0].devices.rules[0]: major \"x\" is neither a number nor *"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        devpeer_in(&box_, &["try", "rw:/dev/null", "r:/dev/zero"]),
        ["ok", "EPERM"],
        "the old policy still holds"
    );

    let out = Command::new(agent_bin())
        .args(["policy", "check", &file.arg()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "{}: policies[0].devices.rules[0]: major \"x\" is neither a number nor *",
            file.arg()
        )
    );
    let out = Command::new(agent_bin())
        .args(["policy", "check", &file.arg()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 problem(s); nothing was applied"));

    // A syntax error names its line and column.
    file.write("{\n  \"version\": 1,\n  \"policies\": [\n    {\"cgroups\": [\"/box\"] \"devices\": {}}\n  ]\n}\n");
    let out = Command::new(agent_bin())
        .args(["policy", "check", &file.arg()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}: line 4, column 26: expected `,` or `}}`", file.arg())
    );
}

#[test]
fn agent_run_device_rules_hold_for_the_workload() {
    let runs = Runs::new();
    let node = std::env::temp_dir().join(unique("agent-test-node"));
    let out = runs.output(
        &["--device", "c 1:3 rw", "--device", "c 1:9 r"],
        &[
            devpeer().to_str().unwrap(),
            "try",
            "rw:/dev/null",
            "r:/dev/urandom",
            "w:/dev/urandom",
            "r:/dev/zero",
            &format!("mknod:{}:c:1:3", node.display()),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        ["ok", "ok", "EPERM", "EPERM", "EPERM"]
    );
}

#[test]
fn a_cgroup_made_inside_a_workload_keeps_its_device_rules() {
    let runs = Runs::new();
    let mut run = runs.spawn(
        &["--name", "nest", "--net", "none", "--device", "c 1:3 rw"],
        &["sleep", "30"],
    );
    runs.wait_running("nest");
    // A cgroup the workload's own policy entry does not name: the program
    // finds its nearest policed ancestor, from the first access on.
    let inner = Cgroup::create(v2_mount().join(&runs.parent).join("nest").join("inner"));
    let verdicts = devpeer_in(
        &inner,
        &["try", "rw:/dev/null", "w:/dev/urandom", "r:/dev/zero"],
    );
    assert_eq!(verdicts, ["ok", "EPERM", "EPERM"]);
    let deeper = inner.child("deeper");
    let verdicts = devpeer_in(&deeper, &["try", "rw:/dev/null", "r:/dev/zero"]);
    assert_eq!(verdicts, ["ok", "EPERM"]);
    drop(deeper);
    drop(inner);
    runs.stop("nest", &mut run);
}

#[test]
fn a_workload_under_an_enforcing_daemon_is_counted_once() {
    let runs = Runs::new();
    let v2_parent = runs.v2_parent();
    let file = PolicyFile::new(&policy("/other", "deny", &[("allow", "c 1:3 rw")]));
    let daemon = runs.daemon(&[
        "--policy",
        file.0.to_str().unwrap(),
        "--interval",
        "200ms",
        "--event-rate",
        "1000",
    ]);
    // The daemon's program at the root and the workload's own both run for
    // each of the workload's accesses; one of them counts it.
    let script = format!(
        "{peer} deny 50 /dev/zero && {peer} try rw:/dev/null rw:/dev/null && exec sleep 30",
        peer = devpeer().display()
    );
    let mut run = runs.spawn(
        &[
            "--name",
            "counted",
            "--net",
            "none",
            "--pin-dir",
            daemon.pin_dir.to_str().unwrap(),
            "--device",
            "c 1:3 rw",
        ],
        &["sh", "-c", &script],
    );
    // Every access is done once devpeer has said so: 50 denials, 2 opens.
    let mut lines = BufReader::new(run.stdout.take().expect("piped stdout")).lines();
    for said in ["50", "ok", "ok"] {
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some(said));
    }
    // Both programs are attached on the workload's path: the daemon's at
    // the root, the workload's at its cgroup.
    assert_eq!(
        agent_tests::attached_at(&v2_parent, "cgroup_device"),
        1,
        "the daemon's dev_guard"
    );
    assert_eq!(
        agent_tests::attached_at(&v2_parent.join("counted"), "cgroup_device"),
        1,
        "the workload's dev_guard"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = daemon.stats();
        let devices = stats["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["path"] == "/counted")
            .map(|c| c["devices"].clone());
        let events = daemon
            .audit()
            .iter()
            .filter(|e| e["cgroup"] == "/counted")
            .count();
        if let Some(devices) = devices
            .as_ref()
            .filter(|d| d["denied"] != 0 && events >= 50)
        {
            assert_eq!(devices["denied"], 50, "{devices}");
            assert_eq!(devices["allowed"], 2, "{devices}");
            assert_eq!(devices["suppressed_events"], 0, "{devices}");
            // Any second event of an access would be in the log by now.
            thread::sleep(Duration::from_millis(500));
            let events = daemon
                .audit()
                .iter()
                .filter(|e| e["cgroup"] == "/counted")
                .count();
            assert_eq!(events, 50);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the workload's counts never showed: {devices:?}, {events} events"
        );
        thread::sleep(Duration::from_millis(100));
    }
    runs.stop("counted", &mut run);
    drop(daemon);
}

#[test]
fn a_workloads_subtree_is_counted_under_the_workload_and_its_events_name_the_cgroup() {
    let runs = Runs::new();
    let v2_parent = runs.v2_parent();
    let file = PolicyFile::new(&policy("/other", "deny", &[("allow", "c 1:3 rw")]));
    let daemon = runs.daemon(&[
        "--policy",
        file.0.to_str().unwrap(),
        "--interval",
        "200ms",
        "--event-rate",
        "1000",
    ]);
    let mut run = runs.spawn(
        &[
            "--name",
            "unit",
            "--net",
            "none",
            "--pin-dir",
            daemon.pin_dir.to_str().unwrap(),
            "--device",
            "c 1:3 rw",
        ],
        &["sleep", "30"],
    );
    runs.wait_running("unit");
    // `agent run`'s program polices the workload's subtree as one unit: a
    // cgroup made inside it is counted under the workload, and each denial's
    // event names the cgroup the task is in.
    let inner = Cgroup::create(v2_parent.join("unit").join("inner"));
    assert_eq!(devpeer_in(&inner, &["deny", "20", "/dev/zero"]), ["20"]);
    assert_eq!(
        devpeer_in(
            &inner,
            &["try", "rw:/dev/null", "rw:/dev/null", "rw:/dev/null"]
        ),
        ["ok", "ok", "ok"]
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = daemon.stats();
        let devices_of = |path: &str| {
            stats["cgroups"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["path"] == path)
                .map(|c| c["devices"].clone())
        };
        let unit = devices_of("/unit");
        let events: Vec<_> = daemon
            .audit()
            .iter()
            .filter(|e| e["kind"] == "device_denied")
            .map(|e| e["cgroup"].clone())
            .collect();
        if let Some(devices) = unit
            .as_ref()
            .filter(|d| d["denied"] != 0 && events.len() >= 20)
        {
            assert_eq!(devices["denied"], 20, "{devices}");
            assert_eq!(devices["allowed"], 3, "{devices}");
            let inner_devices = devices_of("/unit/inner");
            assert!(
                inner_devices
                    .as_ref()
                    .is_none_or(|d| d.is_null() || (d["denied"] == 0 && d["allowed"] == 0)),
                "the inner cgroup has counts of its own: {inner_devices:?}"
            );
            // Any second event of a denial would be in the log by now.
            thread::sleep(Duration::from_millis(500));
            let events: Vec<_> = daemon
                .audit()
                .iter()
                .filter(|e| e["kind"] == "device_denied")
                .map(|e| e["cgroup"].clone())
                .collect();
            assert_eq!(events, vec![serde_json::json!("/unit/inner"); 20]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the workload's counts never showed: {unit:?}, events {events:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    drop(inner);
    runs.stop("unit", &mut run);
    drop(daemon);
}

#[test]
fn an_event_names_a_cgroup_made_since_the_daemons_last_walk() {
    let runs = Runs::new();
    let v2_parent = runs.v2_parent();
    // No policy and an hour between samples: the daemon walks the cgroup
    // tree at its start and then only when an event names a cgroup it has
    // not seen.
    let daemon = runs.daemon(&["--interval", "1h", "--event-rate", "1000"]);
    let mut run = runs.spawn(
        &[
            "--name",
            "late",
            "--net",
            "none",
            "--pin-dir",
            daemon.pin_dir.to_str().unwrap(),
            "--device",
            "c 1:3 rw",
        ],
        &["sleep", "30"],
    );
    runs.wait_running("late");
    let inner = Cgroup::create(v2_parent.join("late").join("inner"));
    assert_eq!(devpeer_in(&inner, &["deny", "3", "/dev/zero"]), ["3"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events: Vec<_> = daemon
            .audit()
            .iter()
            .filter(|e| e["kind"] == "device_denied")
            .map(|e| e["cgroup"].clone())
            .collect();
        if events.len() >= 3 {
            assert_eq!(events, vec![serde_json::json!("/late/inner"); 3]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the events never came: {events:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    drop(inner);
    runs.stop("late", &mut run);
    drop(daemon);
}

#[test]
fn a_workload_inside_another_meets_both_device_policies_and_each_counts_it() {
    let runs = Runs::new();
    runs.v2_parent();
    let file = PolicyFile::new(&policy("/other", "deny", &[("allow", "c 1:3 rw")]));
    let daemon = runs.daemon(&[
        "--policy",
        file.0.to_str().unwrap(),
        "--interval",
        "200ms",
        "--event-rate",
        "1000",
    ]);
    let pins = daemon.pin_dir.to_str().unwrap();
    let mut outer = runs.spawn(
        &[
            "--name",
            "outer",
            "--net",
            "none",
            "--pin-dir",
            pins,
            "--device",
            "c 1:3 rw",
            "--device",
            "c 1:5 r",
        ],
        &["sleep", "30"],
    );
    runs.wait_running("outer");
    // The inner workload's cgroup is made inside the outer's. /dev/zero is
    // allowed by the outer policy only, /dev/urandom by the inner only.
    let script = format!(
        "{peer} try rw:/dev/null r:/dev/zero r:/dev/urandom && exec sleep 30",
        peer = devpeer().display()
    );
    let mut inner = Command::new(agent_bin())
        .args(["run", "--cgroup-parent", &format!("{}/outer", runs.parent)])
        .arg("--state-dir")
        .arg(&runs.state)
        .args([
            "--name",
            "inner",
            "--net",
            "none",
            "--pin-dir",
            pins,
            "--device",
            "c 1:3 rw",
            "--device",
            "c 1:9 r",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the inner agent run");
    let mut lines = BufReader::new(inner.stdout.take().expect("piped stdout")).lines();
    for said in ["ok", "EPERM", "EPERM"] {
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some(said));
    }
    // Each workload's program counts every access under its own workload
    // and reports what its own policy denies.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = daemon.stats();
        let devices_of = |path: &str| {
            stats["cgroups"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["path"] == path)
                .map(|c| c["devices"].clone())
        };
        let (outer_devices, inner_devices) = (devices_of("/outer"), devices_of("/outer/inner"));
        let events = || -> Vec<_> {
            daemon
                .audit()
                .iter()
                .filter(|e| e["kind"] == "device_denied")
                .map(|e| {
                    (
                        e["cgroup"].clone(),
                        e["device"]["major"].clone(),
                        e["device"]["minor"].clone(),
                    )
                })
                .collect()
        };
        let shown = |d: &Option<serde_json::Value>| d.as_ref().is_some_and(|d| d["denied"] != 0);
        if shown(&outer_devices) && shown(&inner_devices) && events().len() >= 2 {
            let (outer_devices, inner_devices) = (outer_devices.unwrap(), inner_devices.unwrap());
            assert_eq!(
                (&outer_devices["allowed"], &outer_devices["denied"]),
                (&2.into(), &1.into()),
                "{outer_devices}"
            );
            assert_eq!(
                (&inner_devices["allowed"], &inner_devices["denied"]),
                (&2.into(), &1.into()),
                "{inner_devices}"
            );
            thread::sleep(Duration::from_millis(500));
            let mut events = events();
            events.sort_by_key(|e| e.2.as_u64());
            let inner_path = serde_json::json!("/outer/inner");
            assert_eq!(
                events,
                [
                    (inner_path.clone(), 1.into(), 5.into()),
                    (inner_path, 1.into(), 9.into())
                ]
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the counts never showed: {outer_devices:?}, {inner_devices:?}, {:?}",
            events()
        );
        thread::sleep(Duration::from_millis(100));
    }
    runs.stop("inner", &mut inner);
    runs.stop("outer", &mut outer);
    drop(daemon);
}

#[test]
fn a_workloads_own_policy_covers_its_subtree_under_a_daemon() {
    let runs = Runs::new();
    let v2_parent = runs.v2_parent();
    // The file gives the workload (by name) a lenient policy; its own flags
    // are strict, and win for it and for every cgroup made under it.
    // It also selects /probe, which shows when the daemon has acted on the
    // cgroups made before it.
    let file = PolicyFile::new(
        r#"{"version": 1, "policies": [{"name": "lenient", "workloads": ["strict"],
            "cgroups": ["/probe"],
            "devices": {"default": "allow", "rules": [{"deny": "b *:* w"}]}}]}"#,
    );
    let daemon = runs.daemon(&["--policy", file.0.to_str().unwrap(), "--interval", "200ms"]);
    let mut run = runs.spawn(
        &[
            "--name",
            "strict",
            "--net",
            "none",
            "--pin-dir",
            daemon.pin_dir.to_str().unwrap(),
            "--device",
            "c 1:3 rw",
        ],
        &["sleep", "30"],
    );
    runs.wait_running("strict");
    let inner = Cgroup::create(v2_parent.join("strict").join("inner"));
    let probe = Cgroup::create(v2_parent.join("probe"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while version_in_force(&daemon.pin_dir, probe.id()).is_none() {
        assert!(Instant::now() < deadline, "the daemon never policed /probe");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        version_in_force(&daemon.pin_dir, inner.id()),
        None,
        "the daemon left the workload's subtree to the workload's policy"
    );
    let verdicts = devpeer_in(&inner, &["try", "rw:/dev/null", "r:/dev/zero"]);
    assert_eq!(verdicts, ["ok", "EPERM"]);
    drop(inner);
    drop(probe);
    runs.stop("strict", &mut run);
    drop(daemon);
}

/// A pin directory the test made; removed on drop, even on panic.
struct FakePins(PathBuf);

impl Drop for FakePins {
    fn drop(&mut self) {
        agent_tests::remove_pins(&self.0);
    }
}

#[test]
fn agent_run_refuses_the_maps_of_a_daemon_of_another_layout() {
    let runs = Runs::new();
    // What a daemon of the previous layout leaves: its AGENT_INFO says 7.
    let pins = FakePins(Path::new("/sys/fs/bpf").join(unique("agent-test-oldpins")));
    agent::bpffs::prepare_pin_dir(&pins.0).expect("bpffs");
    let maps = agent::bpffs::maps_dir(&pins.0);
    fs::create_dir_all(&maps).unwrap();
    let info = maps.join("AGENT_INFO");
    let size = std::mem::size_of::<common::AgentInfo>();
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&info)
        .args(["type", "array", "key", "4", "value", &size.to_string()])
        .args(["entries", "1", "name", "AGENT_INFO"])
        .status()
        .unwrap();
    assert!(made.success(), "bpftool map create");
    let mut value = vec!["0".to_owned(); size];
    value[0] = "7".to_owned();
    let written = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&info)
        .args(["key", "0", "0", "0", "0", "value"])
        .args(&value)
        .status()
        .unwrap();
    assert!(written.success(), "bpftool map update");
    let out = runs.output(
        &[
            "--name",
            "stale",
            "--pin-dir",
            pins.0.to_str().unwrap(),
            "--device",
            "c 1:3 rw",
        ],
        &["true"],
    );
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "agent: the pins at {dir} were made by an incompatible agent (layout 7, this agent \
             reads layout {}); stop that daemon, or remove the stale pins with `rm -r {dir}`",
            common::LAYOUT_VERSION,
            dir = pins.0.display()
        )
    );
    runs.assert_gone("stale");
}

//! Device policy against the kernel: verdicts (the errno the kernel returns),
//! wildcards, atomic switches without a growing stack of programs, exact
//! counters, rate-limited events, and invalid files that change nothing.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use agent_tests::{
    agent_bin, attachments, cgroup_in, loop_report, require_root, unique, v2_mount, Cgroup, Daemon,
    PolicyFile, Runs,
};
use serde_json::Value;

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
        let devices = devices_in(&stats, "/box").unwrap_or_else(|| panic!("no /box: {stats}"));
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

/// A daemon at `runs`' parent whose maps workloads share (`--pin-dir`),
/// reporting up to 1,000 denials per second per CPU, with `extra` flags.
fn sharing_daemon(runs: &Runs, extra: &[&str]) -> Daemon {
    let mut args = vec!["--event-rate", "1000"];
    args.extend_from_slice(extra);
    runs.daemon(&args)
}

/// A [`sharing_daemon`] enforcing a policy for `/other` only: its own
/// program is attached at the root and runs for every workload's access.
fn enforcing_elsewhere(runs: &Runs) -> (Daemon, PolicyFile) {
    let file = PolicyFile::new(&policy("/other", "deny", &[("allow", "c 1:3 rw")]));
    let daemon = sharing_daemon(runs, &["--policy", &file.arg(), "--interval", "200ms"]);
    (daemon, file)
}

/// Starts workload `name` (in `parent`, else the runs' own) sharing
/// `daemon`'s maps, with the device rules `devices`; stdout piped.
fn spawn_sharing(
    runs: &Runs,
    parent: Option<&str>,
    daemon: &Daemon,
    name: &str,
    devices: &[&str],
    command: &[&str],
) -> Child {
    let pins = daemon.pin_dir.to_str().unwrap();
    let mut flags = vec!["--name", name, "--net", "none", "--pin-dir", pins];
    for rule in devices {
        flags.extend(["--device", rule]);
    }
    runs.command_in(parent.unwrap_or(&runs.parent), &flags, command)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent run")
}

/// The `devices` object of the cgroup with `path`, when it has one.
fn devices_in(stats: &Value, path: &str) -> Option<Value> {
    cgroup_in(stats, path)
        .map(|c| c["devices"].clone())
        .filter(|d| !d.is_null())
}

/// Whether the cgroup with `path` shows denials.
fn denials_shown(stats: &Value, path: &str) -> bool {
    devices_in(stats, path).is_some_and(|d| d["denied"] != 0)
}

/// The daemon's device denial events, oldest first.
fn denials(daemon: &Daemon) -> Vec<Value> {
    daemon
        .audit()
        .into_iter()
        .filter(|e| e["kind"] == "device_denied")
        .collect()
}

/// The daemon's stats and denial events once `ready` holds for them (10 s
/// at most), read again 500 ms later, by when any late or second event of
/// a denial is in the log too.
fn settled(daemon: &Daemon, ready: impl Fn(&Value, &[Value]) -> bool) -> (Value, Vec<Value>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (stats, events) = (daemon.stats(), denials(daemon));
        if ready(&stats, &events) {
            thread::sleep(Duration::from_millis(500));
            return (daemon.stats(), denials(daemon));
        }
        assert!(
            Instant::now() < deadline,
            "never settled: {stats}, events {events:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_workload_under_an_enforcing_daemon_is_counted_once() {
    let runs = Runs::new();
    let v2_parent = runs.v2_parent();
    let (daemon, _file) = enforcing_elsewhere(&runs);
    // The daemon's program at the root and the workload's own both run for
    // each of the workload's accesses; one of them counts it.
    let script = format!(
        "{peer} deny 50 /dev/zero && {peer} try rw:/dev/null rw:/dev/null && exec sleep 30",
        peer = devpeer().display()
    );
    let mut run = spawn_sharing(
        &runs,
        None,
        &daemon,
        "counted",
        &["c 1:3 rw"],
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
    let (stats, events) = settled(&daemon, |stats, events| {
        denials_shown(stats, "/counted") && events.len() >= 50
    });
    let devices = devices_in(&stats, "/counted").unwrap();
    assert_eq!(
        (
            &devices["denied"],
            &devices["allowed"],
            &devices["suppressed_events"]
        ),
        (&50.into(), &2.into(), &0.into()),
        "{devices}"
    );
    assert_eq!(events.len(), 50, "one event per denial: {events:?}");
    assert!(
        events.iter().all(|e| e["cgroup"] == "/counted"),
        "{events:?}"
    );
    runs.stop("counted", &mut run);
    drop(daemon);
}

#[test]
fn a_workloads_subtree_is_counted_under_the_workload_and_its_events_name_the_cgroup() {
    let runs = Runs::new();
    let v2_parent = runs.v2_parent();
    let (daemon, _file) = enforcing_elsewhere(&runs);
    let mut run = spawn_sharing(
        &runs,
        None,
        &daemon,
        "unit",
        &["c 1:3 rw"],
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
    let (stats, events) = settled(&daemon, |stats, events| {
        denials_shown(stats, "/unit") && events.len() >= 20
    });
    let unit = devices_in(&stats, "/unit").unwrap();
    assert_eq!(
        (&unit["denied"], &unit["allowed"]),
        (&20.into(), &3.into()),
        "{unit}"
    );
    let inner_devices = devices_in(&stats, "/unit/inner");
    assert!(
        inner_devices
            .as_ref()
            .is_none_or(|d| d["denied"] == 0 && d["allowed"] == 0),
        "the inner cgroup has counts of its own: {inner_devices:?}"
    );
    let cgroups: Vec<&Value> = events.iter().map(|e| &e["cgroup"]).collect();
    assert_eq!(cgroups, vec!["/unit/inner"; 20]);
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
    let daemon = sharing_daemon(&runs, &["--interval", "1h"]);
    let mut run = spawn_sharing(
        &runs,
        None,
        &daemon,
        "late",
        &["c 1:3 rw"],
        &["sleep", "30"],
    );
    runs.wait_running("late");
    let inner = Cgroup::create(v2_parent.join("late").join("inner"));
    assert_eq!(devpeer_in(&inner, &["deny", "3", "/dev/zero"]), ["3"]);
    let (_, events) = settled(&daemon, |_, events| events.len() >= 3);
    let cgroups: Vec<&Value> = events.iter().map(|e| &e["cgroup"]).collect();
    assert_eq!(cgroups, vec!["/late/inner"; 3]);
    drop(inner);
    runs.stop("late", &mut run);
    drop(daemon);
}

#[test]
fn a_workload_inside_another_meets_both_device_policies_and_each_counts_it() {
    let runs = Runs::new();
    runs.v2_parent();
    let (daemon, _file) = enforcing_elsewhere(&runs);
    let mut outer = spawn_sharing(
        &runs,
        None,
        &daemon,
        "outer",
        &["c 1:3 rw", "c 1:5 r"],
        &["sleep", "30"],
    );
    runs.wait_running("outer");
    // The inner workload's cgroup is made inside the outer's. /dev/zero is
    // allowed by the outer policy only, /dev/urandom by the inner only.
    let script = format!(
        "{peer} try rw:/dev/null r:/dev/zero r:/dev/urandom && exec sleep 30",
        peer = devpeer().display()
    );
    let mut inner = spawn_sharing(
        &runs,
        Some(&format!("{}/outer", runs.parent)),
        &daemon,
        "inner",
        &["c 1:3 rw", "c 1:9 r"],
        &["sh", "-c", &script],
    );
    let mut lines = BufReader::new(inner.stdout.take().expect("piped stdout")).lines();
    for said in ["ok", "EPERM", "EPERM"] {
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some(said));
    }
    // Each workload's program counts every access under its own workload
    // and reports what its own policy denies.
    let (stats, events) = settled(&daemon, |stats, events| {
        denials_shown(stats, "/outer") && denials_shown(stats, "/outer/inner") && events.len() >= 2
    });
    for path in ["/outer", "/outer/inner"] {
        let devices = devices_in(&stats, path).unwrap();
        assert_eq!(
            (&devices["allowed"], &devices["denied"]),
            (&2.into(), &1.into()),
            "{path}: {devices}"
        );
    }
    let mut denied: Vec<(&Value, &Value, &Value)> = events
        .iter()
        .map(|e| (&e["cgroup"], &e["device"]["major"], &e["device"]["minor"]))
        .collect();
    denied.sort_by_key(|(_, _, minor)| minor.as_u64());
    let inner_path = Value::from("/outer/inner");
    assert_eq!(
        denied,
        [
            (&inner_path, &Value::from(1), &Value::from(5)),
            (&inner_path, &Value::from(1), &Value::from(9))
        ]
    );
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
    let mut run = spawn_sharing(
        &runs,
        None,
        &daemon,
        "strict",
        &["c 1:3 rw"],
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

//! Network policy against the kernel: verdicts (the errno the kernel
//! returns), ingress, IPv6, port ranges and rule order, net_cls-style
//! classification into an HTB class, bandwidth caps measured by iperf3,
//! atomic switches under traffic, and `agent run`'s flags. Traffic stays on
//! loopback and on veth pairs between namespaces the tests create.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use agent_tests::{
    attachments, loop_report, net_of, netpeer_bin, require_root, wait_for_line, Cgroup, Daemon,
    Netns, PolicyFile, Runs, VethPair,
};
use serde_json::{json, Value};

/// A policy file selecting `path` with `network` as its network section.
fn net_policy(path: &str, network: &str) -> String {
    format!(
        r#"{{"version": 1, "policies": [{{"name": "test", "cgroups": ["{path}"], "network": {network}}}]}}"#
    )
}

/// A daemon enforcing `file` at the test root `root`.
fn enforcing(root: &Cgroup, file: &PolicyFile) -> Daemon {
    Daemon::start(
        &root.path,
        &["--policy", &file.arg(), "--interval", "200ms"],
    )
}

/// Runs netpeer inside `cgroup` and `netns`, returning its output lines.
fn netpeer_in(cgroup: &Cgroup, netns: &Netns, args: &[&str]) -> Vec<String> {
    let out = cgroup
        .command(netpeer_bin(), Some(netns))
        .args(args)
        .output()
        .expect("run netpeer");
    assert!(
        out.status.success(),
        "netpeer {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A helper process the test started; killed (by its pid) on drop.
struct Peer(Child);

impl Peer {
    /// Starts netpeer in `cgroup` and `netns` and waits for its `ready`.
    fn ready(cgroup: &Cgroup, netns: &Netns, args: &[&str]) -> Self {
        let mut child = cgroup
            .command(netpeer_bin(), Some(netns))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start netpeer");
        wait_for_line(&mut child, "ready");
        Self(child)
    }

    /// Waits for it to end and returns what it printed after `ready`.
    fn output(mut self) -> String {
        let child = std::mem::replace(
            &mut self.0,
            Command::new("true").spawn().expect("spawn true"),
        );
        let out = child.wait_with_output().expect("netpeer ends");
        assert!(out.status.success(), "netpeer failed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The audit log's network events of cgroup `path`, once there are `count`.
fn net_events(daemon: &Daemon, path: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events: Vec<Value> = daemon
            .audit()
            .into_iter()
            .filter(|e| e["cgroup"] == path && e["kind"] == "net_denied")
            .collect();
        if events.len() >= count {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{} events of {count} for {path}: {events:?}",
            events.len()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The version of the network policy in force for cgroup `id`.
fn version_in_force(pin_dir: &Path, id: u64) -> Option<u32> {
    let data = aya::maps::MapData::from_pin(pin_dir.join("maps/NET_POLICY")).ok()?;
    let map: aya::maps::HashMap<_, u64, common::netpolicy::NetPolicyRef> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).ok()?;
    map.get(&id, 0).ok().map(|p| p.version)
}

/// IP and UDP headers in front of a payload, as the cgroup programs count.
const UDP_V4: u64 = 28;

#[test]
fn a_denied_connect_gets_eperm_and_a_denied_datagram_is_dropped_and_counted() {
    require_root();
    let root = Cgroup::new_root("agent-test-netdeny");
    let box_ = root.child("box");
    let free = root.child("free");
    let pair = VethPair::new();
    let b = pair.b_addr.clone();
    let file = PolicyFile::new(&net_policy(
        "/box",
        &format!(
            r#"{{"egress": {{"default": "allow", "rules": [
                {{"deny": "{b}", "protocol": "tcp", "ports": "5201"}},
                {{"deny": "{b}/32", "protocol": "udp", "ports": 5300}}]}}}}"#
        ),
    ));
    let daemon = enforcing(&root, &file);
    let _listener = Peer::ready(&free, &pair.b, &["listen", &format!("{b}:5201")]);
    let (tcp, udp_denied, udp_other) = (
        format!("tcp:{b}:5201"),
        format!("udp:{b}:5300"),
        format!("udp:{b}:5301"),
    );
    let started = Instant::now();
    assert_eq!(
        netpeer_in(&box_, &pair.a, &["try", &tcp, &udp_denied, &udp_other]),
        ["EPERM", "EPERM", "ok"]
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the connect failed at once, not after SYN retries"
    );
    // A cgroup made under the policed one has its policy from its first
    // packet (the programs' fallback to the nearest policed ancestor, until
    // the daemon has written its own entry).
    let inner = box_.child("inner");
    assert_eq!(
        netpeer_in(&inner, &pair.a, &["try", &tcp, &udp_denied, &udp_other]),
        ["EPERM", "EPERM", "ok"]
    );
    drop(inner);
    assert_eq!(
        netpeer_in(&free, &pair.a, &["try", &tcp, &udp_denied]),
        ["ok", "ok"],
        "another cgroup is not policed"
    );

    let stats = daemon.stats();
    let net = net_of(&stats, "/box");
    assert_eq!(net["refused_connects"], 1, "{net}");
    assert_eq!(net["dropped_packets"], 1, "{net}");
    assert_eq!(net["dropped_bytes"], 100 + UDP_V4, "{net}");
    assert_eq!(net["drops_by_reason"], json!({"policy": 1, "rate": 0}));
    assert_eq!(
        net["rules"],
        json!([
            {"direction": "egress", "rule": 1, "packets": 1, "bytes": 128},
            {"direction": "egress", "rule": null, "packets": 1, "bytes": 128}
        ]),
        "per-rule hits: the udp deny, and the default for the other datagram"
    );
    assert_eq!(net_of(&stats, "/free")["dropped_packets"], 0);

    let events = net_events(&daemon, "/box", 2);
    assert_eq!(events[0]["comm"], "netpeer");
    assert_eq!(
        events[0]["net"],
        json!({"direction": "egress", "protocol": "tcp", "dst": b, "dst_port": 5201,
               "rule": 0, "outcome": "connect_refused"})
    );
    assert_eq!(events[1]["net"]["outcome"], "dropped", "{}", events[1]);
    assert_eq!(
        (
            &events[1]["net"]["src"],
            &events[1]["net"]["dst_port"],
            &events[1]["net"]["rule"]
        ),
        (&json!(pair.a_addr), &json!(5300), &json!(1))
    );
    assert!(
        events[1]["pid"].is_u64(),
        "the sender is known: {}",
        events[1]
    );

    // An invalid file is rejected whole; the policy in force stays.
    file.write(&net_policy(
        "/box",
        r#"{"egress": {"default": "deny", "rules": [{"deny": "10.0.0.0/33"}]}}"#,
    ));
    daemon.hangup();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.log().contains("the policy in force stays in force") {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        daemon.log().contains(
            "policies[0].network.egress.rules[0]: \"10.0.0.0/33\": prefix length \"33\" is not 0 to 32"
        ),
        "{}",
        daemon.log()
    );
    assert_eq!(
        netpeer_in(&box_, &pair.a, &["try", &udp_denied, &udp_other]),
        ["EPERM", "ok"],
        "the old policy holds"
    );
}

#[test]
fn ingress_rules_deny_a_local_port() {
    require_root();
    let root = Cgroup::new_root("agent-test-netin");
    let box_ = root.child("box");
    let free = root.child("free");
    let pair = VethPair::new();
    let b = pair.b_addr.clone();
    let file = PolicyFile::new(&net_policy(
        "/box",
        r#"{"ingress": {"default": "allow", "rules": [
            {"deny": "any", "protocol": "udp", "ports": "6000"},
            {"deny": "any:6001/tcp"}]}}"#,
    ));
    let daemon = enforcing(&root, &file);
    let denied = Peer::ready(&box_, &pair.b, &["udp-count", &format!("{b}:6000"), "1500"]);
    let allowed = Peer::ready(&box_, &pair.b, &["udp-count", &format!("{b}:6002"), "1500"]);
    let _listener = Peer::ready(&box_, &pair.b, &["listen", &format!("{b}:6001")]);
    for port in [6000, 6002] {
        netpeer_in(
            &free,
            &pair.a,
            &["udp-send", &format!("{b}:{port}"), "10", "100"],
        );
    }
    assert_eq!(denied.output(), "0", "nothing reached the denied port");
    assert_eq!(allowed.output(), "10");
    // The SYN and its one retry are dropped on the way in: the connect
    // times out.
    assert_eq!(
        netpeer_in(&free, &pair.a, &["try", &format!("tcp:{b}:6001")]),
        ["ETIMEDOUT"]
    );
    let stats = daemon.stats();
    let net = net_of(&stats, "/box");
    let rules = net["rules"].as_array().unwrap();
    assert_eq!(
        rules[0],
        json!({"direction": "ingress", "rule": 0, "packets": 10, "bytes": 10 * (100 + UDP_V4)})
    );
    // The SYNs the client sent before it gave up (the first and its
    // retries), each 60 bytes with its options.
    let syns = rules[1]["packets"].as_u64().unwrap();
    assert!((2..=3).contains(&syns), "{net}");
    assert_eq!(rules[1]["bytes"], 60 * syns, "{net}");
    assert_eq!(net["drops_by_reason"]["policy"], 10 + syns, "{net}");
    let events = net_events(&daemon, "/box", 12);
    assert!(
        events
            .iter()
            .all(|e| e["pid"].is_null() && e["net"]["direction"] == "ingress"),
        "received packets have no task: {events:?}"
    );
    assert_eq!(events[0]["net"]["src"], json!(pair.a_addr));
}

#[test]
fn ipv6_rules_match_ipv6_only() {
    require_root();
    let root = Cgroup::new_root("agent-test-net6");
    let box_ = root.child("box");
    let ns = Netns::new("agt-v6");
    let file = PolicyFile::new(&net_policy(
        "/box",
        r#"{"egress": {"default": "allow", "rules": [
            {"deny": "::1/128", "protocol": "udp", "ports": "7000"},
            {"deny": "[fd00::/8]:1-65535/tcp"}]}}"#,
    ));
    let daemon = enforcing(&root, &file);
    assert_eq!(
        netpeer_in(
            &box_,
            &ns,
            &[
                "try",
                "udp:[::1]:7000",
                "udp:[::1]:7001",
                "udp:127.0.0.1:7000",
                "tcp:[::1]:7002",
            ]
        ),
        ["EPERM", "ok", "ok", "ECONNREFUSED"],
        "the v6 rule denies [::1]:7000 only; nothing listens on 7002"
    );
    let stats = daemon.stats();
    assert_eq!(net_of(&stats, "/box")["dropped_bytes"], 100 + 48);
}

#[test]
fn port_ranges_and_rule_order() {
    require_root();
    let root = Cgroup::new_root("agent-test-netrange");
    let box_ = root.child("box");
    let ns = Netns::new("agt-rng");
    let file = PolicyFile::new(&net_policy(
        "/box",
        r#"{"egress": {"default": "deny", "rules": [
            {"allow": "127.0.0.0/8", "protocol": "udp", "ports": "8050"},
            {"deny": "127.0.0.1", "protocol": "udp", "ports": "8000-8100"},
            {"allow": "any", "protocol": "udp", "ports": "8000-9000"}]}}"#,
    ));
    let daemon = enforcing(&root, &file);
    let targets = [8050, 8000, 8100, 8101, 7999, 9000, 9001].map(|p| format!("udp:127.0.0.1:{p}"));
    let mut args = vec!["try"];
    args.extend(targets.iter().map(String::as_str));
    assert_eq!(
        netpeer_in(&box_, &ns, &args),
        ["ok", "EPERM", "EPERM", "ok", "EPERM", "ok", "EPERM"],
        "the allow of 8050 comes before the broader deny; the range's ends are in it"
    );
    let stats = daemon.stats();
    let hits: Vec<(Value, u64)> = net_of(&stats, "/box")["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["rule"].clone(), r["packets"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        hits,
        [
            (json!(0), 1),
            (json!(1), 2),
            (json!(2), 2),
            (Value::Null, 2)
        ]
    );
}

/// `Sent N bytes M pkt` of HTB class `class` in `tc -s class show`.
fn class_sent(netns: &Netns, dev: &str, class: &str) -> (u64, u64) {
    let out = netns.exec(&["tc", "-s", "class", "show", "dev", dev]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.starts_with(&format!("class htb {class} ")) {
            let sent = lines.next().unwrap_or_default();
            let words: Vec<&str> = sent.split_whitespace().collect();
            assert_eq!(
                (words[0], words[2], words[4]),
                ("Sent", "bytes", "pkt"),
                "{sent}"
            );
            return (words[1].parse().unwrap(), words[3].parse().unwrap());
        }
    }
    panic!("no class {class} in {text}");
}

#[test]
fn the_classid_files_exactly_the_cgroups_packets_into_the_htb_class() {
    require_root();
    let root = Cgroup::new_root("agent-test-netcls");
    let box_ = root.child("box");
    let free = root.child("free");
    let pair = VethPair::new();
    let dev = pair.a_dev.as_str();
    pair.a.exec(&[
        "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20",
    ]);
    for class in ["1:10", "1:20"] {
        pair.a.exec(&[
            "tc", "class", "add", "dev", dev, "parent", "1:", "classid", class, "htb", "rate",
            "1gbit",
        ]);
    }
    let file = PolicyFile::new(&net_policy("/box", r#"{"classid": "1:10"}"#));
    let _daemon = enforcing(&root, &file);
    let to = format!("{}:9", pair.b_addr);
    netpeer_in(&box_, &pair.a, &["udp-send", &to, "7", "200"]);
    netpeer_in(&free, &pair.a, &["udp-send", &to, "5", "300"]);
    // On the wire: Ethernet (14), IP (20) and UDP (8) headers and the payload.
    assert_eq!(class_sent(&pair.a, dev, "1:10"), (7 * (200 + 42), 7));
    assert_eq!(class_sent(&pair.a, dev, "1:20"), (5 * (300 + 42), 5));
}

#[test]
fn iperf3_from_a_cgroup_capped_at_50_mbit_measures_50_mbit() {
    require_root();
    let root = Cgroup::new_root("agent-test-netrate");
    let box_ = root.child("box");
    let free = root.child("free");
    let pair = VethPair::new();
    let file = PolicyFile::new(&net_policy("/box", r#"{"egress": {"rate": "50mbit"}}"#));
    let daemon = enforcing(&root, &file);
    let mut server = free
        .command("iperf3", Some(&pair.b))
        .args(["-s", "-1", "-B", &pair.b_addr])
        .stdout(Stdio::null())
        .spawn()
        .expect("start iperf3 -s");
    thread::sleep(Duration::from_millis(500));
    let out = box_
        .command("iperf3", Some(&pair.a))
        .args(["-c", &pair.b_addr, "-t", "10", "-J"])
        .output()
        .expect("run iperf3 -c");
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J prints JSON");
    let received = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap();
    let retransmits = report["end"]["sum_sent"]["retransmits"].as_u64().unwrap();
    let sent_bytes = report["end"]["sum_sent"]["bytes"].as_u64().unwrap();
    let net = net_of(&daemon.stats(), "/box").clone();
    eprintln!(
        "iperf3 through a 50 Mbit/s cap: {:.2} Mbit/s received, {retransmits} retransmits \
         ({:.3}% of {} segments), {} packets notified, {} dropped",
        received / 1e6,
        retransmits as f64 * 100.0 / (sent_bytes as f64 / 1448.0),
        sent_bytes / 1448,
        net["congestion_notified"],
        net["drops_by_reason"]["rate"]
    );
    assert!(
        (45e6..=55e6).contains(&received),
        "{:.2} Mbit/s is not within 10% of 50",
        received / 1e6
    );
    assert!(
        (retransmits as f64) < sent_bytes as f64 / 1448.0 / 100.0,
        "{retransmits} retransmits: more than 1% of the segments"
    );
}

#[test]
fn a_thousand_switches_under_traffic_give_no_wrong_verdict_and_no_extra_program() {
    require_root();
    let root = Cgroup::new_root("agent-test-netswitch");
    let box_ = root.child("box");
    let ns = Netns::new("agt-sw");
    // Both versions allow udp 9101 and deny udp 9100; they differ elsewhere.
    let a = net_policy(
        "/box",
        r#"{"egress": {"default": "allow", "rules": [
            {"deny": "127.0.0.1", "protocol": "udp", "ports": "9100"},
            {"deny": "10.0.0.0/8"}]}}"#,
    );
    let b = net_policy(
        "/box",
        r#"{"egress": {"default": "deny", "rules": [
            {"allow": "127.0.0.1", "protocol": "udp", "ports": "9101"},
            {"deny": "127.0.0.0/8", "protocol": "udp", "ports": "9000-9200"},
            {"allow": "any"}]}, "classid": "1:20"}"#,
    );
    let file = PolicyFile::new(&a);
    let daemon = enforcing(&root, &file);
    let programs_at_start = attachments(&root.path);
    assert_eq!(
        programs_at_start, 7,
        "accounting (2), devices (1), network guards (egress, ingress, connect4, connect6)"
    );
    let mut worker = box_
        .command(netpeer_bin(), Some(&ns))
        .args(["verdicts", "127.0.0.1:9101", "127.0.0.1:9100"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the verdict loop");
    file.switch(&daemon, (&a, &b), 1000, || {
        version_in_force(&daemon.pin_dir, box_.id())
    });
    assert_eq!(
        attachments(&root.path),
        programs_at_start,
        "one attachment per hook after 1,000 switches"
    );
    drop(worker.stdin.take());
    let out = worker.wait_with_output().expect("the verdict loop ends");
    let (sends, wrong) = loop_report(&out.stdout, "sends");
    assert_eq!(wrong, 0, "wrong verdicts in {sends} sends");
    assert!(sends > 2000, "it kept sending throughout: {sends} sends");
}

#[test]
fn agent_run_network_flags_police_the_workload_in_command_line_order() {
    let runs = Runs::new();
    let netpeer = netpeer_bin();
    let netpeer = netpeer.to_str().unwrap();
    let verdicts = |flags: &[&str], targets: &[&str]| {
        let mut command = vec![netpeer, "try"];
        command.extend_from_slice(targets);
        let out = runs.output(flags, &command);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let targets = [
        "udp:127.0.0.1:9000",
        "udp:127.0.0.1:9001",
        "tcp:127.0.0.1:9001",
    ];
    assert_eq!(
        verdicts(
            &[
                "--net-allow",
                "127.0.0.1:9000/udp",
                "--net-deny",
                "127.0.0.0/8:9000-9001"
            ],
            &targets
        ),
        ["ok", "EPERM", "EPERM"]
    );
    assert_eq!(
        verdicts(
            &[
                "--net-deny",
                "127.0.0.0/8:9000-9001",
                "--net-allow",
                "127.0.0.1:9000/udp"
            ],
            &targets
        ),
        ["EPERM", "EPERM", "EPERM"],
        "the deny given first wins"
    );
    // An allow list: what it does not name is denied.
    assert_eq!(
        verdicts(&["--net-allow", "127.0.0.1:9001/udp"], &targets),
        ["EPERM", "ok", "EPERM"]
    );
    let out = runs.output(&["--egress-rate", "fast"], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "agent: --egress-rate: rate \"fast\" is not a rate such as 50mbit, 1gbit or 10mbps"
    );
    let out = runs.output(&["--net-deny", "10.0.0.0/40"], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "agent: --net-deny \"10.0.0.0/40\": \"10.0.0.0/40\": prefix length \"40\" is not 0 to 32"
    );
}

#[test]
fn a_workload_under_an_enforcing_daemon_is_counted_once() {
    let runs = Runs::new();
    let v2_parent = runs.v2_parent();
    let file = PolicyFile::new(&net_policy(
        "/other",
        r#"{"egress": {"default": "allow", "rules": [{"deny": "10.0.0.0/8"}]}}"#,
    ));
    let daemon = runs.daemon(&[
        "--policy",
        &file.arg(),
        "--interval",
        "200ms",
        "--event-rate",
        "1000",
    ]);
    // The daemon's programs at the root and the workload's own both run for
    // each of its datagrams; one of them counts each.
    let script = format!(
        "{peer} try udp:127.0.0.1:9001 udp:127.0.0.1:9001 udp:127.0.0.1:9001 udp:127.0.0.1:9002 \
         && exec sleep 30",
        peer = netpeer_bin().display()
    );
    let mut run = runs.spawn(
        &[
            "--name",
            "netcounted",
            "--pin-dir",
            daemon.pin_dir.to_str().unwrap(),
            "--net-deny",
            "127.0.0.1:9001/udp",
        ],
        &["sh", "-c", &script],
    );
    let mut lines = BufReader::new(run.stdout.take().expect("piped stdout")).lines();
    for verdict in ["EPERM", "EPERM", "EPERM", "ok"] {
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some(verdict));
    }
    // Both guards are on the datagrams' path: the daemon's at the root
    // (beside its accounting program), the workload's at its cgroup.
    assert_eq!(
        agent_tests::attached_at(&v2_parent, "cgroup_inet_egress"),
        2
    );
    assert_eq!(
        agent_tests::attached_at(&v2_parent.join("netcounted"), "cgroup_inet_egress"),
        1
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = daemon.stats();
        let net = net_of(&stats, "/netcounted").clone();
        let events = net_events_now(&daemon, "/netcounted");
        if net["dropped_packets"] != 0 && events >= 3 {
            assert_eq!(net["dropped_packets"], 3, "{net}");
            assert_eq!(net["dropped_bytes"], 3 * (100 + UDP_V4), "{net}");
            assert_eq!(
                net["rules"],
                json!([
                    {"direction": "egress", "rule": 0, "packets": 3, "bytes": 3 * 128},
                    {"direction": "egress", "rule": null, "packets": 1, "bytes": 128}
                ]),
                "each datagram's hit counted once"
            );
            // Any second event of a datagram would be in the log by now.
            thread::sleep(Duration::from_millis(500));
            assert_eq!(net_events_now(&daemon, "/netcounted"), 3);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the workload's drops never showed: {net}, {events} events"
        );
        thread::sleep(Duration::from_millis(100));
    }
    runs.stop("netcounted", &mut run);
    drop(daemon);
}

/// How many network events of the cgroup at `path` the daemon has logged.
fn net_events_now(daemon: &Daemon, path: &str) -> usize {
    daemon
        .audit()
        .iter()
        .filter(|e| e["cgroup"] == path && e["kind"] == "net_denied")
        .count()
}

#[test]
fn a_cgroup_made_inside_a_workload_keeps_its_network_rules() {
    let runs = Runs::new();
    let mut run = runs.spawn(
        &["--name", "netnest", "--net-deny", "127.0.0.1:9001/udp"],
        &["sleep", "30"],
    );
    runs.wait_running("netnest");
    // A cgroup the workload's own entry does not name: the programs find
    // its nearest policed ancestor, from the first packet on.
    let inner = Cgroup::create(
        agent_tests::v2_mount()
            .join(&runs.parent)
            .join("netnest")
            .join("inner"),
    );
    let out = inner
        .command(netpeer_bin(), None)
        .args(["try", "udp:127.0.0.1:9001", "udp:127.0.0.1:9002"])
        .output()
        .expect("run netpeer");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        ["EPERM", "ok"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(inner);
    runs.stop("netnest", &mut run);
}

/// Whether `NET_RATE` holds a bucket of cgroup `id` (either direction).
fn has_rate_bucket(pin_dir: &Path, id: u64) -> bool {
    let data = aya::maps::MapData::from_pin(pin_dir.join("maps/NET_RATE")).expect("NET_RATE pin");
    let map: aya::maps::HashMap<_, common::netpolicy::RateKey, common::netpolicy::RateState> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("NET_RATE");
    map.keys().flatten().any(|key| key.cgroup_id == id)
}

#[test]
fn a_removed_cgroups_rate_bucket_goes_with_it() {
    require_root();
    let root = Cgroup::new_root("agent-test-netratebucket");
    let file = PolicyFile::new(&net_policy("/capped", r#"{"egress": {"rate": "1gbit"}}"#));
    let daemon = enforcing(&root, &file);
    let capped = root.child("capped");
    let id = capped.id();
    let netns = Netns::new("agent-test-rb");
    // Wait for the daemon's entry, then send through the cap.
    let deadline = Instant::now() + Duration::from_secs(5);
    while version_in_force(&daemon.pin_dir, id).is_none() {
        assert!(
            Instant::now() < deadline,
            "the daemon never policed /capped"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        netpeer_in(&capped, &netns, &["try", "udp:127.0.0.1:9"]),
        ["ok"]
    );
    assert!(
        has_rate_bucket(&daemon.pin_dir, id),
        "the datagram made a bucket"
    );
    drop(capped);
    let deadline = Instant::now() + Duration::from_secs(5);
    while has_rate_bucket(&daemon.pin_dir, id) {
        assert!(
            Instant::now() < deadline,
            "the removed cgroup's bucket stayed in NET_RATE"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

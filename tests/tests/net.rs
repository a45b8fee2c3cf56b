//! Network accounting against the kernel: exact counts through the daemon's
//! real code path (`agent daemon` attaching at a test cgroup root, `agent
//! stats --json` reading its pins), traffic only between namespaces the tests
//! create or over their loopback.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use agent_tests::{
    attachments, cgroup_in, counts, net_of, netpeer_bin, require_root, run, wait_for_line,
    wait_success, Cgroup, Daemon, VethPair,
};

/// IPv4 + UDP headers: cgroup_skb sees skb->len from the network header on.
const UDP_OVERHEAD: u64 = 20 + 8;
/// Ethernet header, counted by the veth interface but not by cgroup_skb.
const ETH_HEADER: u64 = 14;

fn spawn_receiver(cgroup: &Cgroup, ns: &agent_tests::Netns, args: &[&str]) -> std::process::Child {
    let mut child = cgroup
        .command(netpeer_bin(), Some(ns))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start netpeer receiver");
    wait_for_line(&mut child, "ready");
    child
}

fn run_sender(cgroup: &Cgroup, ns: Option<&agent_tests::Netns>, args: &[&str]) {
    let status = cgroup
        .command(netpeer_bin(), ns)
        .args(args)
        .status()
        .expect("run netpeer sender");
    assert!(status.success(), "netpeer {} failed", args.join(" "));
}

#[test]
fn udp_datagrams_are_counted_exactly_for_sender_and_receiver() {
    require_root();
    let root = Cgroup::new_root("agent-test-udp");
    let (a, b) = (root.child("a"), root.child("b"));
    let pair = VethPair::new();
    let daemon = Daemon::start(&root.path, &[]);

    const COUNT: u64 = 100;
    const SIZE: u64 = 1000;
    let target = format!("{}:5001", pair.b_addr);
    let mut receiver = spawn_receiver(
        &b,
        &pair.b,
        &[
            "udp-recv",
            "0.0.0.0:5001",
            &COUNT.to_string(),
            &SIZE.to_string(),
        ],
    );
    run_sender(
        &a,
        Some(&pair.a),
        &["udp-send", &target, &COUNT.to_string(), &SIZE.to_string()],
    );
    wait_success(&mut receiver, "udp receiver", Duration::from_secs(20));

    let stats = daemon.stats();
    let bytes = COUNT * (SIZE + UDP_OVERHEAD);
    assert_eq!(
        counts(net_of(&stats, "/a")),
        (0, 0, bytes, COUNT),
        "sender cgroup: {stats}"
    );
    assert_eq!(
        counts(net_of(&stats, "/b")),
        (bytes, COUNT, 0, 0),
        "receiver cgroup: {stats}"
    );
    assert_eq!(
        counts(net_of(&stats, "/")),
        (0, 0, 0, 0),
        "nothing ran in the root: {stats}"
    );
    assert_eq!(stats["cgroup_root"], root.path.display().to_string());
    assert_eq!(
        stats["cgroups"].as_array().map(Vec::len),
        Some(3),
        "{stats}"
    );
    let id_of = |path: &str| cgroup_in(&stats, path).unwrap()["id"].as_u64();
    assert_eq!(id_of("/a"), Some(a.id()));
    // The wire agrees: what left a's veth is what a sent, plus Ethernet headers.
    assert_eq!(pair.a.counter(&pair.a_dev, "tx_packets"), COUNT);
    assert_eq!(
        pair.a.counter(&pair.a_dev, "tx_bytes"),
        bytes + COUNT * ETH_HEADER
    );
}

#[test]
fn tcp_bulk_transfer_matches_the_interface_counters_and_other_cgroups_stay_apart() {
    require_root();
    let root = Cgroup::new_root("agent-test-tcp");
    let (a, b, c) = (root.child("a"), root.child("b"), root.child("c"));
    let pair = VethPair::new();
    let daemon = Daemon::start(&root.path, &[]);

    // Meanwhile cgroup c, in a's namespace, talks over loopback: none of it
    // may land in a or b, and none of it crosses the veth.
    const C_COUNT: u64 = 500;
    const C_SIZE: u64 = 200;
    let mut c_receiver = spawn_receiver(
        &c,
        &pair.a,
        &[
            "udp-recv",
            "127.0.0.1:6001",
            &C_COUNT.to_string(),
            &C_SIZE.to_string(),
        ],
    );
    let mut c_sender = c
        .command(netpeer_bin(), Some(&pair.a))
        .args([
            "udp-send",
            "127.0.0.1:6001",
            &C_COUNT.to_string(),
            &C_SIZE.to_string(),
        ])
        .spawn()
        .expect("start loopback sender");

    const BYTES: u64 = 64 * 1024 * 1024;
    let mut receiver = spawn_receiver(
        &b,
        &pair.b,
        &["tcp-recv", "0.0.0.0:5002", &BYTES.to_string()],
    );
    run_sender(
        &a,
        Some(&pair.a),
        &[
            "tcp-send",
            &format!("{}:5002", pair.b_addr),
            &BYTES.to_string(),
        ],
    );
    wait_success(&mut receiver, "tcp receiver", Duration::from_secs(60));
    wait_success(&mut c_sender, "loopback sender", Duration::from_secs(20));
    wait_success(
        &mut c_receiver,
        "loopback receiver",
        Duration::from_secs(20),
    );

    let stats = daemon.stats();
    let (a_rx, a_rxp, a_tx, a_txp) = counts(net_of(&stats, "/a"));
    let (b_rx, b_rxp, b_tx, b_txp) = counts(net_of(&stats, "/b"));
    // The veth pair carries nothing but this connection (IPv6 off, static
    // neighbours: no ARP, no neighbour discovery), so each side's counters
    // equal its interface's, less 14 bytes of Ethernet header per packet.
    // With TSO a 64 KiB segment is one skb for both the program and the veth.
    let wire = |dev_ns: &agent_tests::Netns, dev: &str, dir: &str| {
        let packets = dev_ns.counter(dev, &format!("{dir}_packets"));
        (
            dev_ns.counter(dev, &format!("{dir}_bytes")) - packets * ETH_HEADER,
            packets,
        )
    };
    assert_eq!(
        (a_tx, a_txp),
        wire(&pair.a, &pair.a_dev, "tx"),
        "a sent what left va: {stats}"
    );
    assert_eq!(
        (a_rx, a_rxp),
        wire(&pair.a, &pair.a_dev, "rx"),
        "a received what arrived at va: {stats}"
    );
    assert_eq!(
        (b_tx, b_txp),
        wire(&pair.b, &pair.b_dev, "tx"),
        "b sent what left vb: {stats}"
    );
    assert_eq!(
        (b_rx, b_rxp),
        wire(&pair.b, &pair.b_dev, "rx"),
        "b received what arrived at vb: {stats}"
    );
    assert_eq!(
        (a_tx, a_txp),
        (b_rx, b_rxp),
        "every byte a sent, b received"
    );
    assert!(
        a_tx > BYTES,
        "the payload ({BYTES}) plus headers were sent: {a_tx}"
    );
    let c_bytes = C_COUNT * (C_SIZE + UDP_OVERHEAD);
    assert_eq!(
        counts(net_of(&stats, "/c")),
        (c_bytes, C_COUNT, c_bytes, C_COUNT),
        "loopback cgroup: {stats}"
    );
}

#[test]
fn a_removed_cgroup_leaves_the_snapshot_and_its_slot_is_posted_for_reuse() {
    require_root();
    let root = Cgroup::new_root("agent-test-rm");
    let daemon = Daemon::start(&root.path, &["--interval", "100ms"]);
    let gone = root.child("gone");
    let gone_id = gone.id();
    let receiver_cgroup = root.child("keep");
    let ns = agent_tests::Netns::new("agt-rm");
    let mut receiver = spawn_receiver(
        &receiver_cgroup,
        &ns,
        &["udp-recv", "127.0.0.1:7001", "3", "10"],
    );
    run_sender(&gone, Some(&ns), &["udp-send", "127.0.0.1:7001", "3", "10"]);
    wait_success(&mut receiver, "receiver", Duration::from_secs(10));
    assert_eq!(counts(net_of(&daemon.stats(), "/gone")), (0, 0, 3 * 38, 3));
    let evict = daemon.pin_dir.join("maps/NET_EVICT");
    let slot = (gone_id % common::NET_SLOTS as u64) as usize;
    assert_ne!(
        array_u64(&evict)[slot],
        gone_id,
        "a live cgroup is not posted for eviction"
    );

    drop(gone);
    let stats = daemon.stats();
    assert!(
        stats["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["path"] != "/gone"),
        "a removed cgroup is not in the next snapshot: {stats}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while array_u64(&evict)[slot] != gone_id {
        assert!(
            Instant::now() < deadline,
            "the daemon did not post the removed cgroup's slot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(counts(net_of(&daemon.stats(), "/keep")), (3 * 38, 3, 0, 0));
}

/// The values of a pinned array of u64, asked of bpftool.
fn array_u64(map: &std::path::Path) -> Vec<u64> {
    dump(map)
        .iter()
        .map(|entry| u64::from_ne_bytes(bytes(&entry["value"]).try_into().expect("u64 value")))
        .collect()
}

/// The keys (u64) of a pinned hash, asked of bpftool.
fn hash_keys(map: &std::path::Path) -> Vec<u64> {
    dump(map)
        .iter()
        .map(|entry| u64::from_ne_bytes(bytes(&entry["key"]).try_into().expect("u64 key")))
        .collect()
}

fn dump(map: &std::path::Path) -> Vec<serde_json::Value> {
    let out = run(
        "bpftool",
        &["-j", "map", "dump", "pinned", &map.display().to_string()],
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .expect("bpftool json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn bytes(value: &serde_json::Value) -> Vec<u8> {
    value
        .as_array()
        .expect("bytes")
        .iter()
        .map(|b| {
            u8::from_str_radix(b.as_str().expect("hex byte").trim_start_matches("0x"), 16)
                .expect("hex")
        })
        .collect()
}

/// Sends `count` datagrams of 72 bytes (100 on the wire) from `cgroup` on CPU
/// 0, to a port nobody listens on in the test's own namespace.
fn send_on_cpu0(cgroup: &Cgroup, ns: &agent_tests::Netns, count: u64) {
    let mut command = cgroup.command(netpeer_bin(), Some(ns));
    command.args(["udp-send", "127.0.0.1:7002", &count.to_string(), "72"]);
    let status = agent_tests::on_cpu(&mut command, 0)
        .status()
        .expect("run netpeer");
    assert!(status.success());
}

#[test]
fn colliding_cgroups_spill_to_the_overflow_map_and_a_full_one_is_reported() {
    require_root();
    let root = Cgroup::new_root("agent-test-full");
    // One slot per CPU and room for one cgroup in the overflow map: on CPU 0,
    // x takes the slot, y the overflow entry, and z finds no room.
    let mut daemon = Daemon::start(
        &root.path,
        &[
            "--net-slots",
            "1",
            "--max-cgroups",
            "1",
            "--interval",
            "100ms",
        ],
    );
    let ns = agent_tests::Netns::new("agt-full");
    let cgroups = [root.child("x"), root.child("y"), root.child("z")];
    for cgroup in &cgroups {
        send_on_cpu0(cgroup, &ns, 5);
    }
    let stats = daemon.stats();
    assert_eq!(counts(net_of(&stats, "/x")), (0, 0, 500, 5));
    assert_eq!(counts(net_of(&stats, "/y")), (0, 0, 500, 5));
    assert_eq!(
        counts(net_of(&stats, "/z")),
        (0, 0, 0, 0),
        "z found no room: {stats}"
    );
    assert_eq!(
        counts(&stats["uncounted"]),
        (0, 0, 500, 5),
        "z's traffic is reported as uncounted: {stats}"
    );
    assert_eq!(
        hash_keys(&daemon.pin_dir.join("maps/NET_OVERFLOW")),
        [cgroups[1].id()]
    );
    std::thread::sleep(Duration::from_millis(300));
    let log = daemon.stop();
    assert!(
        log.contains("5 packets could not be attributed to their cgroup because map NET_OVERFLOW is full (1 cgroups)"),
        "the daemon warns once: {log}"
    );
    assert_eq!(log.matches("could not be attributed").count(), 1, "{log}");
}

#[test]
fn a_removed_cgroups_slot_goes_to_the_next_cgroup_with_clean_counters() {
    require_root();
    let root = Cgroup::new_root("agent-test-reuse");
    let daemon = Daemon::start(&root.path, &["--net-slots", "1", "--interval", "100ms"]);
    let ns = agent_tests::Netns::new("agt-reuse");
    let first = root.child("first");
    let first_id = first.id();
    send_on_cpu0(&first, &ns, 3);
    assert_eq!(counts(net_of(&daemon.stats(), "/first")), (0, 0, 300, 3));
    drop(first);
    let evict = daemon.pin_dir.join("maps/NET_EVICT");
    let deadline = Instant::now() + Duration::from_secs(5);
    while array_u64(&evict)[0] != first_id {
        assert!(
            Instant::now() < deadline,
            "the daemon did not post the removed cgroup's slot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = root.child("second");
    send_on_cpu0(&second, &ns, 4);
    assert_eq!(
        counts(net_of(&daemon.stats(), "/second")),
        (0, 0, 400, 4),
        "none of first's counts"
    );
    assert!(
        hash_keys(&daemon.pin_dir.join("maps/NET_OVERFLOW")).is_empty(),
        "second took over the slot instead of spilling to the overflow map"
    );
}

#[test]
fn keep_pinned_hands_the_counters_to_the_next_daemon_without_a_second_attachment() {
    require_root();
    let root = Cgroup::new_root("agent-test-keep");
    let a = root.child("a");
    let ns = agent_tests::Netns::new("agt-keep");
    let pin_dir = std::path::Path::new("/sys/fs/bpf").join(agent_tests::unique("agent-test"));
    let send = |count: u64| {
        run_sender(
            &a,
            Some(&ns),
            &["udp-send", "127.0.0.1:7003", &count.to_string(), "72"],
        )
    };

    let mut first = Daemon::start_with_pins(&root.path, &pin_dir, &["--keep-pinned"]);
    send(4);
    let (status, _) = first.stop_with_status();
    assert!(status.is_some_and(|s| s.success()));
    // No daemon, but the pinned programs still count.
    send(3);
    assert_eq!(
        attachments(&root.path),
        2,
        "one ingress and one egress program"
    );

    let second = Daemon::start_with_pins(&root.path, &pin_dir, &[]);
    send(2);
    assert_eq!(
        counts(net_of(&second.stats(), "/a")),
        (0, 0, 9 * 100, 9),
        "no packet lost or counted twice"
    );
    assert_eq!(
        attachments(&root.path),
        2,
        "the new programs replaced the old ones in their links"
    );
    drop(second);
    assert_eq!(
        attachments(&root.path),
        0,
        "stopping without --keep-pinned detaches"
    );
    assert!(!pin_dir.exists(), "and removes the pins");
    drop(first);
}

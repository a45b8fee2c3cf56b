//! Harness for the kernel integration tests in `tests/tests/`: cgroups,
//! network namespaces and a running `agent daemon`, each behind a guard that
//! removes what it made when dropped, also when the test panics.
//!
//! The tests need root. They never skip: without root, a cgroup v2 mount or
//! bpffs they fail, so CI cannot pass by not running them.

pub mod otlp;

use std::{
    ffi::CString,
    fs,
    io::{BufRead as _, BufReader},
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

/// Fails the test unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().as_raw() == 0,
        "the kernel integration tests load eBPF programs and create cgroups and network \
         namespaces: run them as root (`sudo -E cargo xtask test`)"
    );
}

/// A name unique to this process and call, for cgroups, namespaces and pins.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cgroup v2 mount of this host.
pub fn v2_mount() -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    agent::cgroup::find_v2_mount(&text).expect("this host has no cgroup v2 mount")
}

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("AGENT_BIN") {
        return PathBuf::from(path);
    }
    // Next to a helper binary (target/<profile>/agent-bench), or one level
    // up from a test (target/<profile>/deps/<test>-<hash>).
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    let path = [dir.join("agent"), dir.parent().unwrap_or(dir).join("agent")]
        .into_iter()
        .find(|path| path.exists())
        .unwrap_or_else(|| dir.join("agent"));
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p agent` (cargo xtask test does)",
        path.display()
    );
    path
}

/// The traffic helper binary (`src/bin/netpeer.rs`), built next to the agent.
pub fn netpeer_bin() -> PathBuf {
    let path = agent_bin().with_file_name("netpeer");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p agent-tests --bins`",
        path.display()
    );
    path
}

/// A cgroup v2 directory this test created; removed (with its children) on drop.
/// Processes started in it through [`Cgroup::command`] are killed first.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// A new cgroup directly under the v2 mount.
    pub fn new_root(name: &str) -> Self {
        Self::create(v2_mount().join(unique(name)))
    }

    /// A new cgroup at `path` (whose parent exists), removed when dropped.
    pub fn create(path: PathBuf) -> Self {
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// A child cgroup; removed before its parent (drop children first, or let
    /// the parent's drop remove what is left).
    pub fn child(&self, name: &str) -> Self {
        Self::create(self.path.join(name))
    }

    /// The cgroup id (inode of the directory).
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(&self.path).expect("stat cgroup").ino()
    }

    /// `program` set up to start inside this cgroup (and, with `netns`, inside
    /// that network namespace), before it executes.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, netns: Option<&Netns>) -> Command {
        let mut command = Command::new(program);
        let procs =
            CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes()).expect("path");
        let netns_path =
            netns.map(|ns| CString::new(format!("/run/netns/{}", ns.name)).expect("name"));
        // SAFETY: only async-signal-safe calls (open, write, setns, close)
        // between fork and exec, on buffers prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                if let Some(ns) = &netns_path {
                    let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                Ok(())
            });
        }
        command
    }

    /// The pids in this cgroup (not its children).
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// Removes a cgroup directory tree the tests created, depth first. Processes
/// still inside (only ever ones the test started there) are killed by pid.
fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for pid in fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!(
                    "warning: could not remove test cgroup {}: {e}",
                    path.display()
                );
                return;
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Makes `command` run on CPU `cpu` only (sched_setaffinity before exec), for
/// tests whose expectations depend on per-CPU state.
pub fn on_cpu(command: &mut Command, cpu: usize) -> &mut Command {
    // SAFETY: sched_setaffinity on a stack cpu_set_t is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// How many programs are attached directly to `cgroup` (bpftool cgroup show).
pub fn attachments(cgroup: &Path) -> usize {
    let out = run(
        "bpftool",
        &["-j", "cgroup", "show", &cgroup.display().to_string()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return 0;
    }
    serde_json::from_str::<serde_json::Value>(&text)
        .expect("bpftool json")
        .as_array()
        .map_or(0, Vec::len)
}

/// How many programs are attached at `cgroup` itself at `hook` (bpftool's
/// attach type, such as `cgroup_device`; older bpftools drop `cgroup_`).
pub fn attached_at(cgroup: &Path, hook: &str) -> usize {
    let out = run(
        "bpftool",
        &["-j", "cgroup", "show", &cgroup.display().to_string()],
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let short = hook.strip_prefix("cgroup_").unwrap_or(hook);
    listed.as_array().map_or(0, |programs| {
        programs
            .iter()
            .filter(|p| p["attach_type"] == hook || p["attach_type"] == short)
            .count()
    })
}

/// Runs a command to completion, panicking with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A network namespace (`ip netns add`), deleted on drop with everything in it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace, panicking when it fails.
    pub fn exec(&self, command: &[&str]) -> Output {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    /// Reads `/sys/class/net/<dev>/statistics/<counter>` inside the namespace.
    pub fn counter(&self, dev: &str, counter: &str) -> u64 {
        let out = self.exec(&["cat", &format!("/sys/class/net/{dev}/statistics/{counter}")]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("counter")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair, `10.77.<n>.1` (a) and `10.77.<n>.2`
/// (b), and nothing else on the wire: IPv6 is off and both neighbour
/// entries are static, so the interface counters hold only the traffic of
/// the test's own sockets (no ARP, no neighbour discovery, no router
/// solicitations).
pub struct VethPair {
    pub a: Netns,
    pub b: Netns,
    pub a_dev: String,
    pub b_dev: String,
    pub a_addr: String,
    pub b_addr: String,
}

impl VethPair {
    pub fn new() -> Self {
        static SUBNET: AtomicU32 = AtomicU32::new(1);
        let n = SUBNET.fetch_add(1, Ordering::Relaxed) % 250;
        let a = Netns::new("agt-a");
        let b = Netns::new("agt-b");
        let (a_dev, b_dev) = ("va".to_owned(), "vb".to_owned());
        let (a_mac, b_mac) = ("02:00:00:77:00:0a", "02:00:00:77:00:0b");
        for ns in [&a, &b] {
            ns.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]);
            ns.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"]);
        }
        run(
            "ip",
            &[
                "link", "add", &a_dev, "netns", &a.name, "address", a_mac, "type", "veth", "peer",
                "name", &b_dev, "netns", &b.name, "address", b_mac,
            ],
        );
        let a_addr = format!("10.77.{n}.1");
        let b_addr = format!("10.77.{n}.2");
        for (ns, dev, addr, peer_addr, peer_mac) in [
            (&a, &a_dev, &a_addr, &b_addr, b_mac),
            (&b, &b_dev, &b_addr, &a_addr, a_mac),
        ] {
            ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ns.exec(&[
                "ip",
                "neigh",
                "replace",
                peer_addr,
                "lladdr",
                peer_mac,
                "nud",
                "permanent",
                "dev",
                dev,
            ]);
            ns.exec(&["ip", "link", "set", dev, "up"]);
        }
        Self {
            a,
            b,
            a_dev,
            b_dev,
            a_addr,
            b_addr,
        }
    }
}

impl Default for VethPair {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `agent daemon` watching `cgroup_root`, with its own pin
/// directory; stopped with SIGTERM on drop, and its pins removed if it left any.
pub struct Daemon {
    pub pin_dir: PathBuf,
    /// Holds its events socket (`events.sock`) and audit log (`audit.jsonl`).
    pub run_dir: PathBuf,
    child: Option<Child>,
    stderr: Option<thread::JoinHandle<String>>,
    /// Everything it logged so far.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    pub fn start(cgroup_root: &Path, extra: &[&str]) -> Self {
        Self::start_with_pins(
            cgroup_root,
            &Path::new("/sys/fs/bpf").join(unique("agent-test")),
            extra,
        )
    }

    pub fn start_with_pins(cgroup_root: &Path, pin_dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(cgroup_root, pin_dir, extra, &[])
    }

    /// As [`Daemon::start_with_pins`], with these environment variables set.
    pub fn start_with_env(
        cgroup_root: &Path,
        pin_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let run_dir = std::env::temp_dir().join(unique("agent-test-daemon"));
        fs::create_dir_all(&run_dir).expect("create the daemon's run dir");
        let mut child = Command::new(agent_bin())
            .arg("daemon")
            .arg("--cgroup-root")
            .arg(cgroup_root)
            .arg("--pin-dir")
            .arg(pin_dir)
            .arg("--events-socket")
            .arg(run_dir.join("events.sock"))
            .arg("--audit-log")
            .arg(run_dir.join("audit.jsonl"))
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent daemon");
        let stderr = child.stderr.take().expect("stderr");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let shared = log.clone();
        let stderr = thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("counting network and scheduler activity") {
                    let _ = ready_tx.send(());
                }
                if let Ok(mut all) = shared.lock() {
                    all.push_str(&line);
                    all.push('\n');
                }
            }
            shared.lock().map(|all| all.clone()).unwrap_or_default()
        });
        let mut daemon = Self {
            pin_dir: pin_dir.into(),
            run_dir,
            child: Some(child),
            stderr: Some(stderr),
            log,
        };
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let log = daemon.stop();
            panic!("agent daemon did not start:\n{log}");
        }
        daemon
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends it SIGHUP (reload the policy file).
    pub fn hangup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP the daemon");
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|all| all.clone()).unwrap_or_default()
    }

    /// Its events socket.
    pub fn events_socket(&self) -> PathBuf {
        self.run_dir.join("events.sock")
    }

    /// Its audit log's lines, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.run_dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("audit lines are JSON"))
            .collect()
    }

    /// `agent stats --json` against this daemon.
    pub fn stats(&self) -> serde_json::Value {
        let output = Command::new(agent_bin())
            .args(["stats", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .expect("run agent stats");
        assert!(
            output.status.success(),
            "agent stats failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("agent stats --json prints JSON")
    }

    /// Stops the daemon with SIGTERM and returns everything it logged.
    pub fn stop(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Stops the daemon and returns its exit status and log.
    pub fn stop_with_status(&mut self) -> (Option<std::process::ExitStatus>, String) {
        let mut status = None;
        if let Some(child) = self.child.as_mut() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            status = child.wait().ok();
            self.child = None;
        }
        (
            status,
            self.stderr
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        remove_pins(&self.pin_dir);
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

/// Removes a pin directory the tests made (unpinning detaches what is left).
pub fn remove_pins(pin_dir: &Path) {
    if pin_dir.exists() {
        let _ = agent::bpffs::remove_pin_dir(pin_dir);
    }
}

/// `agent run` for a test: its own cgroup parent (`--cgroup-parent`) and
/// state directory;
/// removes whatever is left of both on drop.
pub struct Runs {
    pub parent: String,
    pub state: PathBuf,
}

impl Runs {
    pub fn new() -> Self {
        require_root();
        let parent = unique("agent-test-run");
        let state = std::env::temp_dir().join(&parent);
        Self { parent, state }
    }

    pub fn command(&self, flags: &[&str], command: &[&str]) -> Command {
        self.command_in(&self.parent, flags, command)
    }

    /// [`Runs::command`] with the workload's cgroup under `parent` (relative
    /// to each hierarchy's root), such as inside another workload's.
    pub fn command_in(&self, parent: &str, flags: &[&str], command: &[&str]) -> Command {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run")
            .arg("--cgroup-parent")
            .arg(parent)
            .arg("--state-dir")
            .arg(&self.state);
        cmd.args(flags).arg("--").args(command);
        cmd
    }

    /// The v2 directory of the cgroup parent (made when absent; removed with
    /// the rest of the parent when this is dropped).
    pub fn v2_parent(&self) -> PathBuf {
        let path = v2_mount().join(&self.parent);
        fs::create_dir_all(&path).expect("the test's v2 cgroup parent");
        path
    }

    /// A daemon watching [`Runs::v2_parent`], sharing this state directory
    /// (so that it knows the workloads' names), with `extra` flags.
    pub fn daemon(&self, extra: &[&str]) -> Daemon {
        let state = self.state.display().to_string();
        let mut args = vec!["--state-dir", state.as_str()];
        args.extend_from_slice(extra);
        Daemon::start(&self.v2_parent(), &args)
    }

    /// Stops workload `name` (`agent stop`, which must succeed) and reaps
    /// `run`, the `agent run` that started it.
    pub fn stop(&self, name: &str, run: &mut Child) {
        let out = self.agent(&["stop", name, "--timeout", "100ms"]);
        assert!(
            out.status.success(),
            "agent stop {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = run.wait();
    }

    pub fn output(&self, flags: &[&str], command: &[&str]) -> Output {
        self.command(flags, command)
            .output()
            .expect("run agent run")
    }

    pub fn spawn(&self, flags: &[&str], command: &[&str]) -> Child {
        self.command(flags, command)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent run")
    }

    pub fn agent(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .output()
            .expect("run agent")
    }

    /// `agent ps --json`, once the workload `name` is listed.
    pub fn wait_running(&self, name: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.agent(&["ps", "--json"]);
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ps --json");
            if let Some(found) = list
                .as_array()
                .and_then(|l| l.iter().find(|w| w["name"] == name))
            {
                return found.clone();
            }
            assert!(Instant::now() < deadline, "workload {name} did not start");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The directories a workload would have, one per hierarchy.
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        cgroup_mounts()
            .into_iter()
            .map(|mount| mount.join(&self.parent).join(name))
            .collect()
    }

    /// Asserts nothing of workload `name` is left: no cgroup in any
    /// hierarchy, no record.
    pub fn assert_gone(&self, name: &str) {
        for dir in self.dirs(name) {
            assert!(!dir.exists(), "{} is left behind", dir.display());
        }
        assert!(
            !self
                .state
                .join("workloads")
                .join(format!("{name}.json"))
                .exists(),
            "the record of {name} is left behind"
        );
    }
}

impl Default for Runs {
    fn default() -> Self {
        Self::new()
    }
}

/// Kills every process in the cgroup `dir` and its descendants (this test's
/// workloads, by pid), and removes the descendants' directories, deepest
/// first.
fn empty_cgroup_tree(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
    {
        empty_cgroup_tree(&entry.path());
        for pid in fs::read_to_string(entry.path().join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // Busy until the killed processes are gone; not found once their
        // `agent run` has removed it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(entry.path()).is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound)
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        for mount in cgroup_mounts() {
            let dir = mount.join(&self.parent);
            empty_cgroup_tree(&dir);
            let _ = fs::remove_dir(&dir);
        }
        let _ = fs::remove_dir_all(&self.state);
    }
}

/// Every cgroup hierarchy mounted under /sys/fs/cgroup (v1 controllers and v2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// The cgroup object with `path` in an `agent stats --json` snapshot.
pub fn cgroup_in<'a>(stats: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    stats["cgroups"]
        .as_array()
        .expect("cgroups array")
        .iter()
        .find(|c| c["path"] == path)
}

/// The `net` object of the cgroup with `path` in a `agent stats --json` snapshot.
pub fn net_of<'a>(stats: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    cgroup_in(stats, path)
        .map(|c| &c["net"])
        .unwrap_or_else(|| panic!("no cgroup {path} in {stats}"))
}

/// `(rx_bytes, rx_packets, tx_bytes, tx_packets)` of a `net` object.
pub fn counts(net: &serde_json::Value) -> (u64, u64, u64, u64) {
    let get = |key: &str| {
        net[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} missing in {net}"))
    };
    (
        get("rx_bytes"),
        get("rx_packets"),
        get("tx_bytes"),
        get("tx_packets"),
    )
}

/// Waits for a line on a child's stdout (the helpers print `ready`).
pub fn wait_for_line(child: &mut Child, expected: &str) {
    let stdout = child.stdout.as_mut().expect("piped stdout");
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    reader.read_line(&mut line).expect("read helper stdout");
    assert_eq!(line.trim(), expected, "helper said {line:?}");
}

/// Waits for a child to exit successfully within `timeout`.
pub fn wait_success(child: &mut Child, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(status.success(), "{what} exited with {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A policy file in a temp dir, removed on drop.
pub struct PolicyFile(pub PathBuf);

impl PolicyFile {
    pub fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.json", unique("agent-test-policy")));
        let file = Self(path);
        file.write(text);
        file
    }

    /// Replaces the file atomically (as editors and config managers do).
    pub fn write(&self, text: &str) {
        let tmp = self.0.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &self.0).unwrap();
    }

    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }

    /// Switches the daemon reading this file between policies `a` and `b`
    /// `times` times (a rewrite and SIGHUP each), each time waiting until
    /// `version` (the version in force for the cgroup under test) changes;
    /// panics with the daemon's log when one does not take effect in 5 s.
    pub fn switch(
        &self,
        daemon: &Daemon,
        (a, b): (&str, &str),
        times: usize,
        version: impl Fn() -> Option<u32>,
    ) {
        let mut current = version().expect("a policy in force");
        for switch in 0..times {
            self.write(if switch % 2 == 0 { b } else { a });
            daemon.hangup();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let now = version().expect("a policy in force");
                if now != current {
                    current = now;
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "switch {switch} did not take effect:\n{}",
                    daemon.log()
                );
                thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// The last line of a verdict loop (`devpeer loop`, `netpeer verdicts`):
/// `VERB COUNT wrong N`. Returns `(COUNT, N)` after checking its shape.
pub fn loop_report(stdout: &[u8], verb: &str) -> (u64, u64) {
    let report = String::from_utf8_lossy(stdout).trim().to_owned();
    let words: Vec<&str> = report.split_whitespace().collect();
    assert!(
        words.len() == 4 && words[0] == verb && words[2] == "wrong",
        "not a \"{verb} N wrong N\" report: {report:?}"
    );
    let number = |word: &str| word.parse::<u64>().unwrap_or_else(|_| panic!("{report:?}"));
    (number(words[1]), number(words[3]))
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

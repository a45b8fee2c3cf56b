//! `agent top`'s live view, end to end: the real binary in a real terminal
//! (tmux), driven by keys, read from the screen, against the kernel's own
//! accounting of a busy process in a test cgroup.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use agent_tests::{agent_bin, attachments, require_root, run, unique, Cgroup, Daemon, PolicyFile};

const PROMPT: &str = "top-test$";

/// A tmux server and session of this test's own (its own socket, so nothing
/// of anyone else's tmux is touched), killed on drop, also on panic.
struct Tmux {
    socket: PathBuf,
    session: String,
}

impl Tmux {
    /// An 80x24 terminal running a plain shell with a known prompt.
    fn new() -> Self {
        let socket = std::env::temp_dir().join(unique("agent-top-tmux"));
        let session = unique("top");
        run(
            "tmux",
            &[
                "-S",
                &socket.display().to_string(),
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                &session,
                "-x",
                "80",
                "-y",
                "24",
                &format!("env PS1='{PROMPT} ' HISTFILE=/dev/null bash --norc --noprofile"),
            ],
        );
        let tmux = Self { socket, session };
        tmux.wait_for("the shell's prompt", |screen| last_line(screen) == PROMPT);
        tmux
    }

    fn tmux(&self, args: &[&str]) -> String {
        let socket = self.socket.display().to_string();
        let mut all = vec!["-S", &socket];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&run("tmux", &all).stdout).into_owned()
    }

    /// Presses keys (tmux key names: `Enter`, `Escape`, `C-c`, or a letter).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        self.tmux(&args);
        // Give the view a moment to act on them before the next ones.
        thread::sleep(Duration::from_millis(150));
    }

    /// Types text literally.
    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", &self.session, "-l", text]);
        thread::sleep(Duration::from_millis(150));
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", &self.session])
    }

    /// A tmux format of the pane (`#{alternate_on}`, `#{pane_pid}`...).
    fn pane(&self, format: &str) -> String {
        self.tmux(&["display-message", "-p", "-t", &self.session, format])
            .trim()
            .to_owned()
    }

    /// Waits until the screen satisfies `ready`, and returns that screen.
    fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen();
            if ready(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "waited 20s for {what}; the screen:\n{screen}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(["kill-session", "-t", &self.session])
            .status();
        // The server ends with its last session but leaves its socket.
        let _ = fs::remove_file(&self.socket);
    }
}

/// A process this test started, killed by its pid on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn last_line(screen: &str) -> &str {
    screen
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("")
        .trim()
}

/// One table row of the screen: its CPU% and cgroup column.
#[derive(Debug, Clone)]
struct Row {
    cpu: String,
    name: String,
    /// Where the cgroup column's text starts (its indentation in the tree).
    name_at: usize,
}

/// The table rows on the screen, top to bottom.
fn rows(screen: &str) -> Vec<Row> {
    screen
        .lines()
        .skip_while(|line| !line.contains("CGROUP"))
        .skip(1)
        .take_while(|line| !line.trim().is_empty() && !line.starts_with("sort:"))
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let name = (*words.last()?).to_owned();
            Some(Row {
                cpu: (*words.first()?).to_owned(),
                // The screen column (in characters: µs is two bytes).
                name_at: line[..line.rfind(&name)?].chars().count(),
                name,
            })
        })
        .collect()
}

fn row<'a>(rows: &'a [Row], name: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no row {name} in {rows:#?}"))
}

fn cpu(row: &Row) -> f64 {
    row.cpu
        .parse()
        .unwrap_or_else(|_| panic!("CPU% of {row:?} is not a number"))
}

/// The shell is back as it was: the normal screen, a visible cursor, the
/// prompt on the last line, none of the view left on screen, and the
/// terminal out of raw mode (as `stty` sees it).
fn assert_clean_prompt(tmux: &Tmux, stty_file: &Path) {
    let screen = tmux.wait_for("the prompt after agent top ended", |screen| {
        last_line(screen) == PROMPT
    });
    assert_eq!(
        tmux.pane("#{alternate_on}"),
        "0",
        "left the alternate screen"
    );
    assert_eq!(tmux.pane("#{cursor_flag}"), "1", "the cursor shows again");
    assert!(
        !screen.contains("CGROUP") && !screen.contains("sort:"),
        "nothing of the view is left: {screen}"
    );
    let _ = fs::remove_file(stty_file);
    tmux.type_text(&format!("stty -a > {}", stty_file.display()));
    tmux.keys(&["Enter"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(stty_file).is_ok_and(|s| s.contains("icanon")) {
        assert!(
            Instant::now() < deadline,
            "stty did not run: {}",
            tmux.screen()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let modes = fs::read_to_string(stty_file).unwrap_or_default();
    let words: Vec<&str> = modes
        .split(|c: char| c.is_whitespace() || c == ';')
        .collect();
    for mode in ["icanon", "echo", "isig", "opost"] {
        assert!(
            words.contains(&mode),
            "{mode} is on again (not raw mode): {modes}"
        );
    }
    tmux.keys(&["C-l"]);
}

/// The agent started from the shell in the pane (the shell's only child).
fn agent_pid(tmux: &Tmux) -> i32 {
    let shell: i32 = tmux.pane("#{pane_pid}").parse().expect("pane pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().expect("pid");
        }
        assert!(Instant::now() < deadline, "agent top did not start");
        thread::sleep(Duration::from_millis(50));
    }
}

struct Setup {
    // Dropped in this order: the terminal, the workload, then the cgroups.
    tmux: Tmux,
    _spinner_process: Process,
    idle: Cgroup,
    _spinner: Cgroup,
    _group: Cgroup,
    root: Cgroup,
    command: String,
    stty_file: TempFile,
}

/// A file this test names, removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A test root with `/grp/spinner` (a shell spinning on a CPU) and
/// `/grp/idle` (empty), and a terminal to run `agent top` in, loading its
/// own programs at that root (a pin dir where no daemon is).
fn setup(name: &str) -> Setup {
    require_root();
    let root = Cgroup::new_root(name);
    let group = root.child("grp");
    let spinner = group.child("spinner");
    let idle = group.child("idle");
    let spinner_process = Process(
        spinner
            .command("sh", None)
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("start the busy loop"),
    );
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("agent-none"));
    let command = format!(
        "{} top -d 0.5 --cgroup-root {} --pin-dir {}",
        agent_bin().display(),
        root.path.display(),
        pin_dir.display()
    );
    Setup {
        tmux: Tmux::new(),
        _spinner_process: spinner_process,
        idle,
        _spinner: spinner,
        _group: group,
        root,
        command,
        stty_file: TempFile(std::env::temp_dir().join(unique("agent-top-stty"))),
    }
}

impl Setup {
    /// Types the command and waits for the view's first rates.
    fn start_top(&self) {
        self.tmux.type_text(&self.command);
        self.tmux.keys(&["Enter"]);
        self.tmux.wait_for("the view with rates", |screen| {
            rows(screen)
                .iter()
                .any(|r| r.name == "/grp/spinner" && r.cpu.parse::<f64>().is_ok())
        });
    }
}

#[test]
fn the_live_view_sorts_filters_rolls_up_and_quits_cleanly() {
    let setup = setup("agent-test-tui");
    let tmux = &setup.tmux;
    setup.start_top();
    assert_eq!(
        attachments(&setup.root.path),
        2,
        "top attached its programs"
    );

    // Sorted by name, then by CPU: the spinning shell is first.
    tmux.keys(&["n"]);
    let screen = tmux.wait_for("rows sorted by name", |s| {
        rows(s).first().is_some_and(|r| r.name == "/")
    });
    assert!(screen.contains("CGROUP▼"), "{screen}");
    tmux.keys(&["c"]);
    let screen = tmux.wait_for("rows sorted by CPU", |s| s.contains("CPU%▼"));
    let table = rows(&screen);
    let names: Vec<&str> = table.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names.len(), 4, "{screen}");
    assert_eq!(names[0], "/grp/spinner", "the busiest first: {screen}");
    let busy = cpu(&table[0]);
    assert!(
        busy > 5.0,
        "a spinning shell uses a CPU (shared on a busy host): {screen}"
    );
    for other in &table[1..] {
        assert_eq!(
            cpu(other),
            0.0,
            "nothing else runs in the test root: {screen}"
        );
    }
    assert!(screen.contains("4 cgroups"), "{screen}");

    // Filtering to its name leaves only it.
    tmux.keys(&["/"]);
    tmux.type_text("spinner");
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for("the filtered table", |s| rows(s).len() == 1);
    assert_eq!(rows(&screen)[0].name, "/grp/spinner", "{screen}");
    assert!(screen.contains("filter: spinner"), "{screen}");

    // Cleared, then the tree: it sits under grp, which rolls it up.
    tmux.keys(&["Escape"]);
    tmux.wait_for("the whole table again", |s| rows(s).len() == 4);
    tmux.keys(&["t"]);
    let screen = tmux.wait_for("the tree view", |s| {
        rows(s).iter().any(|r| r.name == "spinner")
    });
    let tree = rows(&screen);
    let names: Vec<&str> = tree.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["/", "grp", "spinner", "idle"], "{screen}");
    let (root, group, spinner, idle) = (&tree[0], &tree[1], &tree[2], &tree[3]);
    assert_eq!(group.name_at, root.name_at + 2, "{screen}");
    assert_eq!(spinner.name_at, group.name_at + 2, "under grp: {screen}");
    assert_eq!(idle.name_at, spinner.name_at, "{screen}");
    assert!(cpu(spinner) > 5.0, "{screen}");
    assert_eq!(cpu(idle), 0.0, "{screen}");
    // grp has no process of its own: its figure is its children's.
    assert_eq!(
        group.cpu, spinner.cpu,
        "grp rolls up its children: {screen}"
    );
    assert_eq!(root.cpu, spinner.cpu, "and the root everything: {screen}");
    assert!(screen.contains(" tree "), "{screen}");
    // Back in the flat view grp shows its own figure again.
    tmux.keys(&["t"]);
    let screen = tmux.wait_for("the flat view", |s| {
        rows(s).iter().any(|r| r.name == "/grp")
    });
    assert_eq!(row(&rows(&screen), "/grp").cpu, "0.0", "{screen}");

    // The detail pane, the help overlay and pause do not disturb the rest.
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for("the detail pane", |s| s.contains("latest deny events"));
    assert!(screen.contains("/grp/spinner (own, id "), "{screen}");
    tmux.keys(&["Enter", "?"]);
    tmux.wait_for("the help", |s| s.contains("agent top: keys"));
    // Apart: an Escape followed at once by a key reads as Alt+key.
    tmux.keys(&["Escape"]);
    tmux.keys(&["Space"]);
    tmux.wait_for("paused", |s| s.contains("PAUSED"));

    // Running again, a cgroup removed meanwhile drops out quietly.
    tmux.keys(&["Space"]);
    fs::remove_dir(&setup.idle.path).expect("remove /grp/idle");
    let screen = tmux.wait_for("/grp/idle to drop out", |s| {
        s.contains("3 cgroups") && rows(s).len() == 3
    });
    assert!(!screen.contains("idle"), "{screen}");

    tmux.keys(&["q"]);
    assert_clean_prompt(tmux, &setup.stty_file.0);
    assert_eq!(
        attachments(&setup.root.path),
        0,
        "top detached its programs on q"
    );
}

#[test]
fn ctrl_c_and_sigterm_restore_the_terminal_and_detach() {
    let setup = setup("agent-test-tui-sig");
    let tmux = &setup.tmux;

    setup.start_top();
    tmux.keys(&["C-c"]);
    assert_clean_prompt(tmux, &setup.stty_file.0);
    assert_eq!(attachments(&setup.root.path), 0, "detached on Ctrl-C");

    setup.start_top();
    let pid = agent_pid(tmux);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM agent top");
    assert_clean_prompt(tmux, &setup.stty_file.0);
    assert_eq!(attachments(&setup.root.path), 0, "detached on SIGTERM");
}

#[test]
fn closing_the_terminal_ends_top_and_detaches() {
    let setup = setup("agent-test-tui-hup");
    let tmux = &setup.tmux;
    setup.start_top();
    let pid = agent_pid(tmux);
    assert!(attachments(&setup.root.path) > 0, "attached while it runs");
    // The window closes: the terminal hangs up under the running view.
    tmux.tmux(&["kill-session", "-t", &tmux.session]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // A zombie has ended (its parent, the shell, is gone too).
        if state.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        if Instant::now() >= deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("agent top (pid {pid}) still runs 5 s after its terminal hung up");
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        attachments(&setup.root.path),
        0,
        "detached when the terminal hung up"
    );
}

/// Runs devpeer in `cgroup`: one line per access, `ok` or the errno.
fn devpeer_in(cgroup: &Cgroup, args: &[&str]) -> Vec<String> {
    let out = cgroup
        .command(agent_bin().with_file_name("devpeer"), None)
        .args(args)
        .output()
        .expect("run devpeer");
    assert!(out.status.success(), "devpeer {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A daemon enforcing a device policy on `/box` (only /dev/null allowed),
/// and three denied reads of /dev/zero (1:5) from there.
fn daemon_with_denials(root: &Cgroup, box_: &Cgroup) -> (Daemon, PolicyFile) {
    let file = PolicyFile::new(
        r#"{"version": 1, "policies": [{"name": "box", "cgroups": ["/box"],
            "devices": {"default": "deny", "rules": [{"allow": "c 1:3 rw"}]}}]}"#,
    );
    let daemon = Daemon::start(
        &root.path,
        &["--policy", &file.arg(), "--interval", "200ms"],
    );
    assert_eq!(
        devpeer_in(box_, &["try", "r:/dev/zero", "r:/dev/zero", "r:/dev/zero"]),
        ["EPERM", "EPERM", "EPERM"]
    );
    (daemon, file)
}

#[test]
fn against_a_daemon_the_detail_pane_shows_the_latest_deny_events() {
    require_root();
    let root = Cgroup::new_root("agent-test-tui-daemon");
    let box_ = root.child("box");
    let (daemon, _file) = daemon_with_denials(&root, &box_);
    let attached = attachments(&root.path);
    let tmux = Tmux::new();
    tmux.type_text(&format!(
        "{} top -d 0.5 --pin-dir {} --events-socket {}",
        agent_bin().display(),
        daemon.pin_dir.display(),
        daemon.events_socket().display()
    ));
    tmux.keys(&["Enter"]);
    tmux.wait_for("the view with rates", |s| {
        rows(s)
            .iter()
            .any(|r| r.name == "/box" && r.cpu.parse::<f64>().is_ok())
    });
    // Sorted by denials, /box comes first, showing its three.
    tmux.keys(&["e"]);
    let screen = tmux.wait_for("rows sorted by denials", |s| s.contains("DENY▼"));
    let first = rows(&screen)[0].clone();
    assert_eq!(first.name, "/box", "{screen}");
    let line = screen
        .lines()
        .find(|l| l.ends_with(" /box") || l.trim_end().ends_with(" /box"))
        .unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[words.len() - 2], "3", "DENY of /box: {screen}");
    // The selection stayed on its cgroup through the sort: move it to /box.
    tmux.keys(&["Home", "Enter"]);
    let screen = tmux.wait_for("its deny events", |s| {
        s.matches("c 1:5 r devpeer[").count() == 3
    });
    assert!(screen.contains("/box (own, id "), "{screen}");
    tmux.keys(&["q"]);
    tmux.wait_for("the prompt", |s| last_line(s) == PROMPT);
    assert_eq!(tmux.pane("#{alternate_on}"), "0");
    assert_eq!(
        attachments(&root.path),
        attached,
        "top added and removed nothing of the daemon's"
    );
}

/// The keys of a JSON value, recursively (array elements by the first one's).
fn shape(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), shape(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        serde_json::Value::Array(items) => items.first().map(shape).into_iter().collect(),
        _ => serde_json::Value::Null,
    }
}

#[test]
fn once_json_is_the_stats_json_and_batch_prints_plain_tables() {
    require_root();
    let root = Cgroup::new_root("agent-test-top-batch");
    let box_ = root.child("box");
    let (daemon, _file) = daemon_with_denials(&root, &box_);
    let out = Command::new(agent_bin())
        .args(["top", "--once", "--json", "--pin-dir"])
        .arg(&daemon.pin_dir)
        .output()
        .expect("run agent top --once --json");
    assert!(out.status.success(), "{out:?}");
    let once: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("agent top --once --json prints JSON");
    let stats = daemon.stats();
    assert_eq!(shape(&once), shape(&stats));
    let cgroups = |v: &serde_json::Value| -> Vec<(u64, String, u64)> {
        v["cgroups"]
            .as_array()
            .expect("cgroups")
            .iter()
            .map(|c| {
                (
                    c["id"].as_u64().unwrap_or(0),
                    c["path"].as_str().unwrap_or("").to_owned(),
                    c["devices"]["denied"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    assert_eq!(cgroups(&once), cgroups(&stats));
    assert_eq!(
        cgroups(&once),
        [(root.id(), "/".into(), 0), (box_.id(), "/box".into(), 3)]
    );
    assert_eq!(once["cgroup_root"], stats["cgroup_root"]);

    let out = Command::new(agent_bin())
        .args([
            "top",
            "--batch",
            "--iterations",
            "2",
            "-d",
            "0.2",
            "--pin-dir",
        ])
        .arg(&daemon.pin_dir)
        .output()
        .expect("run agent top --batch");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let headers: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("agent top - "))
        .collect();
    assert_eq!(headers.len(), 2, "{text}");
    assert!(
        headers[0].contains(&format!(
            " - 2 cgroups under {} - rates over ",
            root.path.display()
        )),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("  CPU%  RUNQ P99"))
            .count(),
        2,
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.ends_with("  /box")).count(),
        2,
        "{text}"
    );
    assert!(!text.contains('\x1b'), "no escape sequences: {text:?}");
}

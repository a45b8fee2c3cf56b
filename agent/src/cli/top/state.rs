//! What `agent top` shows, as plain data: rows built from snapshots, the
//! tree with its roll-ups, sorting, filtering, the selection, recent history
//! and deny events, and what each key does. No terminal here: `view.rs`
//! draws this state, and the unit tests below drive it with keys.

use std::{
    cmp::Ordering,
    collections::{HashMap, HashSet, VecDeque},
    time::Duration,
};

use common::LATENCY_BUCKETS;

use crate::{
    events::Record,
    model::{quantile, CgroupSnapshot, Snapshot},
};

/// Points of history kept per cgroup for the sparklines.
pub const HISTORY: usize = 120;
/// Deny events kept (of every cgroup); the detail pane shows the selected one's.
pub const EVENTS_KEPT: usize = 1024;
/// The refresh intervals `+` and `-` step through.
const INTERVALS_MS: [u64; 10] = [
    100, 250, 500, 1_000, 2_000, 3_000, 5_000, 10_000, 30_000, 60_000,
];

/// A column of the table; every one can be sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Column {
    Cpu,
    RunqP99,
    Memory,
    Pids,
    Rx,
    Tx,
    Dropped,
    Denied,
    Name,
}

impl Column {
    /// In the order they are drawn.
    pub const ALL: [Self; 9] = [
        Self::Cpu,
        Self::RunqP99,
        Self::Memory,
        Self::Pids,
        Self::Rx,
        Self::Tx,
        Self::Dropped,
        Self::Denied,
        Self::Name,
    ];

    /// The key that sorts by it.
    #[must_use]
    pub fn key(self) -> char {
        match self {
            Self::Cpu => 'c',
            Self::RunqP99 => 'l',
            Self::Memory => 'm',
            Self::Pids => 'p',
            Self::Rx => 'r',
            Self::Tx => 's',
            Self::Dropped => 'x',
            Self::Denied => 'e',
            Self::Name => 'n',
        }
    }

    /// Its heading.
    #[must_use]
    pub fn title(self) -> &'static str {
        match self {
            Self::Cpu => "CPU%",
            Self::RunqP99 => "RUNQ99",
            Self::Memory => "MEM",
            Self::Pids => "PIDS",
            Self::Rx => "RX/s",
            Self::Tx => "TX/s",
            Self::Dropped => "DROP",
            Self::Denied => "DENY",
            Self::Name => "CGROUP",
        }
    }

    fn from_key(key: char) -> Option<Self> {
        Self::ALL.into_iter().find(|column| column.key() == key)
    }

    fn next(self, step: isize) -> Self {
        let at = Self::ALL.iter().position(|c| *c == self).unwrap_or(0);
        let len = Self::ALL.len().cast_signed();
        Self::ALL[(at.cast_signed() + step).rem_euclid(len).cast_unsigned()]
    }
}

/// The figures of one row: a cgroup's own, or its subtree's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// Of one CPU, over the last interval.
    pub cpu_percent: Option<f64>,
    /// Run-queue waits that ended in the last interval, per log2 bucket.
    pub runq_buckets: Option<[u64; LATENCY_BUCKETS]>,
    /// The kernel's figure, which already counts the cgroup's descendants.
    pub memory_bytes: Option<u64>,
    /// Likewise hierarchical in the kernel.
    pub pids: Option<u64>,
    pub rx_bytes_per_s: Option<f64>,
    pub tx_bytes_per_s: Option<f64>,
    /// Packets its network policy dropped, since the programs attached.
    pub dropped_packets: u64,
    /// Device accesses its device policy denied, since the programs attached.
    pub device_denials: u64,
}

impl Figures {
    fn of(cgroup: &CgroupSnapshot) -> Self {
        let runq_buckets = cgroup
            .cpu
            .runqueue_latency_interval
            .as_ref()
            .map(|latency| {
                let mut counts = [0u64; LATENCY_BUCKETS];
                for (count, bucket) in counts.iter_mut().zip(&latency.buckets) {
                    *count = bucket.count;
                }
                counts
            });
        Self {
            cpu_percent: cgroup.cpu.percent,
            runq_buckets,
            memory_bytes: cgroup.memory.current_bytes,
            pids: cgroup.pids.current,
            rx_bytes_per_s: cgroup.net.rates.map(|r| r.rx_bytes_per_s),
            tx_bytes_per_s: cgroup.net.rates.map(|r| r.tx_bytes_per_s),
            dropped_packets: cgroup.net.dropped_packets,
            device_denials: cgroup.devices.denied,
        }
    }

    /// Adds a child subtree's figures into this (its parent's) subtree.
    /// CPU, traffic, drops and denials are counted per cgroup, so they add
    /// up (but for device denials under an `agent run` workload nested in
    /// another, which both workloads count: see ARCHITECTURE.md); run-queue histograms merge bucket by bucket (so the p99 is the
    /// subtree's, not a sum of percentiles). Memory and pids stay the
    /// parent's own, `own`: the kernel's figures already include every
    /// descendant. Where the parent has none (the root of a cgroup2-only
    /// hierarchy has no memory.current), its children's add up instead.
    fn roll_up(&mut self, child: &Self, own: &Self) {
        fn plus<T: std::ops::Add<Output = T>>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a + b),
                (a, None) => a,
                (None, b) => b,
            }
        }
        if own.memory_bytes.is_none() {
            self.memory_bytes = plus(self.memory_bytes, child.memory_bytes);
        }
        if own.pids.is_none() {
            self.pids = plus(self.pids, child.pids);
        }
        self.cpu_percent = plus(self.cpu_percent, child.cpu_percent);
        self.rx_bytes_per_s = plus(self.rx_bytes_per_s, child.rx_bytes_per_s);
        self.tx_bytes_per_s = plus(self.tx_bytes_per_s, child.tx_bytes_per_s);
        self.runq_buckets = match (self.runq_buckets, child.runq_buckets) {
            (Some(mut mine), Some(theirs)) => {
                for (a, b) in mine.iter_mut().zip(theirs) {
                    *a = a.saturating_add(b);
                }
                Some(mine)
            }
            (mine, None) => mine,
            (None, theirs) => theirs,
        };
        self.dropped_packets = self.dropped_packets.saturating_add(child.dropped_packets);
        self.device_denials = self.device_denials.saturating_add(child.device_denials);
    }

    /// The 99th percentile of the run-queue waits of the interval.
    #[must_use]
    pub fn runq_p99_ns(&self) -> Option<u64> {
        self.runq_buckets
            .as_ref()
            .and_then(|counts| quantile(counts, 0.99, None))
    }

    /// The value sorted by (`None` when the host cannot give it).
    fn sort_value(&self, column: Column) -> Option<f64> {
        #[expect(clippy::cast_precision_loss, reason = "sorting only")]
        match column {
            Column::Cpu => self.cpu_percent,
            Column::RunqP99 => self.runq_p99_ns().map(|ns| ns as f64),
            Column::Memory => self.memory_bytes.map(|b| b as f64),
            Column::Pids => self.pids.map(|p| p as f64),
            Column::Rx => self.rx_bytes_per_s,
            Column::Tx => self.tx_bytes_per_s,
            Column::Dropped => Some(self.dropped_packets as f64),
            Column::Denied => Some(self.device_denials as f64),
            Column::Name => None,
        }
    }
}

/// One cgroup of the latest snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Cgroup {
    pub id: u64,
    /// Relative to the watched root; the root is `/`.
    pub path: String,
    /// The `agent run` workload in it.
    pub name: Option<String>,
    /// Its nearest ancestor in the snapshot (by index in [`State::cgroups`]).
    pub parent: Option<usize>,
    pub depth: usize,
    pub own: Figures,
    /// Its own and every descendant's.
    pub subtree: Figures,
}

impl Cgroup {
    /// The last segment of its path (`/` for the root).
    #[must_use]
    pub fn leaf(&self) -> &str {
        match self.path.rsplit_once('/') {
            Some((_, leaf)) if !leaf.is_empty() => leaf,
            _ => &self.path,
        }
    }

    fn matches(&self, filter: &str) -> bool {
        self.path.contains(filter) || self.name.as_deref().is_some_and(|n| n.contains(filter))
    }
}

/// One visible row: a cgroup and how deep it is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// Index in [`State::cgroups`].
    pub cgroup: usize,
    /// Indentation: the tree depth in the tree view, 0 in the flat view.
    pub depth: usize,
}

/// Recent values for the sparklines, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub cpu_percent: VecDeque<f64>,
    pub rx_bytes_per_s: VecDeque<f64>,
    pub tx_bytes_per_s: VecDeque<f64>,
}

impl Series {
    fn push(&mut self, figures: &Figures) {
        for (series, value) in [
            (&mut self.cpu_percent, figures.cpu_percent),
            (&mut self.rx_bytes_per_s, figures.rx_bytes_per_s),
            (&mut self.tx_bytes_per_s, figures.tx_bytes_per_s),
        ] {
            if let Some(value) = value {
                if series.len() == HISTORY {
                    series.pop_front();
                }
                series.push_back(value);
            }
        }
    }
}

/// A cgroup's history: of its own figures and of its subtree's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub own: Series,
    pub subtree: Series,
}

/// What the keys are doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Typing the filter after `/`.
    Filter,
    /// The help overlay.
    Help,
}

/// A key, as the state understands it (the terminal's are mapped in `top.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Enter,
    Esc,
    Backspace,
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
    /// Ctrl-C: quits from anywhere.
    Interrupt,
}

/// What the caller must do after a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Quit,
}

/// Everything `agent top` shows.
#[derive(Debug, Clone)]
pub struct State {
    /// The latest snapshot's cgroups, sorted by path.
    pub cgroups: Vec<Cgroup>,
    /// What is drawn, top to bottom.
    pub lines: Vec<Line>,
    pub sort: Column,
    /// Sort the other way round (names descending, figures ascending).
    pub reverse: bool,
    pub tree: bool,
    pub filter: String,
    pub mode: Mode,
    pub paused: bool,
    pub detail: bool,
    pub interval: Duration,
    /// The selected cgroup, followed when rows move.
    pub selected: Option<u64>,
    /// Its row in `lines`.
    pub cursor: usize,
    /// Rows the table shows at once (for page up and down).
    pub page: usize,
    pub history: HashMap<u64, History>,
    /// Deny events, oldest first.
    pub events: VecDeque<Record>,
    /// Why there are no deny events to show, when that is known.
    pub events_note: Option<String>,
    pub timestamp: String,
    pub cgroup_root: String,
    /// Packets that found the per-cgroup maps full.
    pub uncounted_packets: u64,
    /// Whether the snapshot has rates yet (not on the first refresh).
    pub has_rates: bool,
}

impl State {
    #[must_use]
    pub fn new(interval: Duration) -> Self {
        Self {
            cgroups: Vec::new(),
            lines: Vec::new(),
            sort: Column::Cpu,
            reverse: false,
            tree: false,
            filter: String::new(),
            mode: Mode::Normal,
            paused: false,
            detail: false,
            interval,
            selected: None,
            cursor: 0,
            page: 10,
            history: HashMap::new(),
            events: VecDeque::new(),
            events_note: None,
            timestamp: String::new(),
            cgroup_root: String::new(),
            uncounted_packets: 0,
            has_rates: false,
        }
    }

    /// Takes in a new snapshot. Cgroups that are gone drop out (with their
    /// history); the selection stays on its cgroup wherever it moved.
    pub fn update(&mut self, snapshot: &Snapshot) {
        let mut cgroups: Vec<Cgroup> = snapshot
            .cgroups
            .iter()
            .map(|c| {
                let own = Figures::of(c);
                Cgroup {
                    id: c.id,
                    path: c.path.clone(),
                    name: c.name.clone(),
                    parent: None,
                    depth: 0,
                    own,
                    subtree: own,
                }
            })
            .collect();
        cgroups.sort_by(|a, b| a.path.cmp(&b.path));
        let by_path: HashMap<&str, usize> = cgroups
            .iter()
            .enumerate()
            .map(|(i, c)| (c.path.as_str(), i))
            .collect();
        let parents: Vec<Option<usize>> = cgroups
            .iter()
            .map(|c| {
                // The nearest ancestor present (a snapshot taken while a
                // tree changes may miss a middle one).
                let mut path = c.path.as_str();
                while let Some((up, _)) = path.rsplit_once('/') {
                    let up = if up.is_empty() { "/" } else { up };
                    if up == path {
                        break;
                    }
                    if let Some(&i) = by_path.get(up) {
                        return Some(i);
                    }
                    path = up;
                }
                None
            })
            .collect();
        drop(by_path);
        for i in 0..cgroups.len() {
            cgroups[i].parent = parents[i];
            let mut depth = 0;
            let mut up = parents[i];
            while let Some(p) = up {
                depth += 1;
                up = parents[p];
            }
            cgroups[i].depth = depth;
        }
        // Deepest first, so that each subtree is whole before it is added to its parent.
        let mut order: Vec<usize> = (0..cgroups.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(cgroups[i].depth));
        for i in order {
            if let Some(p) = cgroups[i].parent {
                let (child, own) = (cgroups[i].subtree, cgroups[p].own);
                cgroups[p].subtree.roll_up(&child, &own);
            }
        }

        let live: HashSet<u64> = cgroups.iter().map(|c| c.id).collect();
        self.history.retain(|id, _| live.contains(id));
        for c in &cgroups {
            let history = self.history.entry(c.id).or_default();
            history.own.push(&c.own);
            history.subtree.push(&c.subtree);
        }
        self.cgroups = cgroups;
        self.timestamp.clone_from(&snapshot.timestamp);
        self.cgroup_root.clone_from(&snapshot.cgroup_root);
        self.uncounted_packets = snapshot
            .uncounted
            .rx_packets
            .saturating_add(snapshot.uncounted.tx_packets);
        self.has_rates = snapshot.interval_s.is_some();
        self.relayout();
    }

    /// Keeps a deny event (the oldest go first).
    pub fn push_event(&mut self, record: Record) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(record);
    }

    /// The figures a row shows: the subtree's in the tree view.
    #[must_use]
    pub fn figures<'a>(&self, cgroup: &'a Cgroup) -> &'a Figures {
        if self.tree {
            &cgroup.subtree
        } else {
            &cgroup.own
        }
    }

    /// The selected cgroup.
    #[must_use]
    pub fn selection(&self) -> Option<&Cgroup> {
        self.lines
            .get(self.cursor)
            .map(|line| &self.cgroups[line.cgroup])
    }

    /// The selected cgroup's series (its subtree's in the tree view).
    #[must_use]
    pub fn selected_series(&self) -> Option<&Series> {
        let history = self.history.get(&self.selection()?.id)?;
        Some(if self.tree {
            &history.subtree
        } else {
            &history.own
        })
    }

    /// The latest deny events of the selected cgroup (and, in the tree
    /// view, of its descendants), newest first.
    #[must_use]
    pub fn selected_events(&self, at_most: usize) -> Vec<&Record> {
        let Some(cgroup) = self.selection() else {
            return Vec::new();
        };
        let below = if cgroup.path == "/" {
            "/".to_owned()
        } else {
            format!("{}/", cgroup.path)
        };
        self.events
            .iter()
            .rev()
            .filter(|r| {
                r.cgroup_id == cgroup.id || (self.tree && r.cgroup.starts_with(below.as_str()))
            })
            .take(at_most)
            .collect()
    }

    fn compare(&self, a: &Cgroup, b: &Cgroup) -> Ordering {
        let by_path = || a.path.cmp(&b.path);
        let order = if self.sort == Column::Name {
            by_path()
        } else {
            let (x, y) = (
                self.figures(a).sort_value(self.sort),
                self.figures(b).sort_value(self.sort),
            );
            match (x, y) {
                // Biggest first; what the host cannot give goes last.
                (Some(x), Some(y)) => y.total_cmp(&x).then_with(by_path),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => by_path(),
            }
        };
        if self.reverse {
            order.reverse()
        } else {
            order
        }
    }

    /// Rebuilds the visible rows after anything that changes them, keeping
    /// the selection on its cgroup (or, when it is gone, on the same row).
    pub fn relayout(&mut self) {
        let shown: Vec<bool> = if self.filter.is_empty() {
            vec![true; self.cgroups.len()]
        } else {
            let mut shown: Vec<bool> = self
                .cgroups
                .iter()
                .map(|c| c.matches(&self.filter))
                .collect();
            if self.tree {
                // Ancestors of a match stay, so that it is seen in its place.
                for i in 0..self.cgroups.len() {
                    if shown[i] {
                        let mut up = self.cgroups[i].parent;
                        while let Some(p) = up {
                            shown[p] = true;
                            up = self.cgroups[p].parent;
                        }
                    }
                }
            }
            shown
        };
        let mut lines = Vec::with_capacity(self.cgroups.len());
        if self.tree {
            let mut children: Vec<Vec<usize>> = vec![Vec::new(); self.cgroups.len()];
            let mut roots = Vec::new();
            for (i, c) in self.cgroups.iter().enumerate() {
                if shown[i] {
                    match c.parent {
                        Some(p) => children[p].push(i),
                        None => roots.push(i),
                    }
                }
            }
            for list in children.iter_mut().chain(std::iter::once(&mut roots)) {
                list.sort_by(|&a, &b| self.compare(&self.cgroups[a], &self.cgroups[b]));
            }
            let mut stack: Vec<(usize, usize)> = roots.iter().rev().map(|&i| (i, 0)).collect();
            while let Some((i, depth)) = stack.pop() {
                lines.push(Line { cgroup: i, depth });
                stack.extend(children[i].iter().rev().map(|&c| (c, depth + 1)));
            }
        } else {
            let mut order: Vec<usize> = (0..self.cgroups.len()).filter(|&i| shown[i]).collect();
            order.sort_by(|&a, &b| self.compare(&self.cgroups[a], &self.cgroups[b]));
            lines.extend(order.into_iter().map(|cgroup| Line { cgroup, depth: 0 }));
        }
        self.lines = lines;
        let found = self.selected.and_then(|id| {
            self.lines
                .iter()
                .position(|line| self.cgroups[line.cgroup].id == id)
        });
        self.cursor = match found {
            Some(at) => at,
            None => self.cursor.min(self.lines.len().saturating_sub(1)),
        };
        self.selected = self.selection().map(|c| c.id);
    }

    fn move_cursor(&mut self, to: usize) {
        self.cursor = to.min(self.lines.len().saturating_sub(1));
        self.selected = self.selection().map(|c| c.id);
    }

    /// A shorter (`faster`) or longer refresh interval, the next step of
    /// the ladder from wherever `-d` put it.
    pub fn step_interval(&mut self, faster: bool) {
        let now = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        let next = if faster {
            INTERVALS_MS.iter().rev().find(|&&ms| ms < now)
        } else {
            INTERVALS_MS.iter().find(|&&ms| ms > now)
        };
        if let Some(&ms) = next {
            self.interval = Duration::from_millis(ms);
        }
    }

    /// Acts on one key.
    pub fn handle(&mut self, key: Key) -> Outcome {
        if key == Key::Interrupt {
            return Outcome::Quit;
        }
        match self.mode {
            Mode::Help => {
                if key == Key::Char('q') {
                    return Outcome::Quit;
                }
                self.mode = Mode::Normal;
            }
            Mode::Filter => {
                match key {
                    Key::Char(c) => self.filter.push(c),
                    Key::Backspace => {
                        self.filter.pop();
                    }
                    Key::Enter => self.mode = Mode::Normal,
                    Key::Esc => {
                        self.filter.clear();
                        self.mode = Mode::Normal;
                    }
                    _ => return self.handle_normal(key),
                }
                self.relayout();
            }
            Mode::Normal => return self.handle_normal(key),
        }
        Outcome::Continue
    }

    fn handle_normal(&mut self, key: Key) -> Outcome {
        let page = self.page.max(1);
        match key {
            Key::Char('q') => return Outcome::Quit,
            Key::Char('?' | 'h') => self.mode = Mode::Help,
            Key::Char('/') => self.mode = Mode::Filter,
            Key::Char('t') => {
                self.tree = !self.tree;
                self.relayout();
            }
            Key::Char(' ') => self.paused = !self.paused,
            Key::Char('+' | '=') => self.step_interval(false),
            Key::Char('-' | '_') => self.step_interval(true),
            Key::Char('i') => {
                self.reverse = !self.reverse;
                self.relayout();
            }
            Key::Char('<') => {
                self.sort = self.sort.next(-1);
                self.relayout();
            }
            Key::Char('>') => {
                self.sort = self.sort.next(1);
                self.relayout();
            }
            Key::Enter => self.detail = !self.detail,
            Key::Esc => {
                if self.detail {
                    self.detail = false;
                } else {
                    self.filter.clear();
                    self.relayout();
                }
            }
            Key::Up | Key::Char('k') => self.move_cursor(self.cursor.saturating_sub(1)),
            Key::Down | Key::Char('j') => self.move_cursor(self.cursor + 1),
            Key::PageUp => self.move_cursor(self.cursor.saturating_sub(page)),
            Key::PageDown => self.move_cursor(self.cursor + page),
            Key::Home | Key::Char('g') => self.move_cursor(0),
            Key::End | Key::Char('G') => self.move_cursor(usize::MAX),
            Key::Char(c) => {
                if let Some(column) = Column::from_key(c) {
                    if self.sort == column {
                        self.reverse = !self.reverse;
                    } else {
                        self.sort = column;
                        self.reverse = false;
                    }
                    self.relayout();
                }
            }
            Key::Backspace | Key::Interrupt => {}
        }
        Outcome::Continue
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        time::{Instant, SystemTime},
    };

    use common::{NetCounters, SchedCounters};

    use super::*;
    use crate::{
        cgroupfs::Resources,
        collect::{CgroupSample, Sample},
    };

    /// `(id, path, cpu ns, rx bytes, tx bytes)` as cumulative counters.
    type Spec<'a> = (u64, &'a str, u64, u64, u64);

    fn sample(at: Instant, cgroups: &[Spec<'_>]) -> Sample {
        Sample {
            taken: SystemTime::UNIX_EPOCH,
            at,
            cgroup_root: PathBuf::from("/sys/fs/cgroup/unified/test"),
            cgroups: cgroups
                .iter()
                .map(|&(id, path, cpu_ns, rx_bytes, tx_bytes)| {
                    let mut sched = SchedCounters::ZERO;
                    sched.cpu_ns = cpu_ns;
                    // Waits: id µs-ish, so each cgroup has its own p99.
                    sched.latency[usize::try_from(id).unwrap() % LATENCY_BUCKETS] = cpu_ns / 1000;
                    CgroupSample {
                        id,
                        path: path.into(),
                        name: (path == "/web").then(|| "web".into()),
                        net: NetCounters {
                            rx_bytes,
                            rx_packets: rx_bytes / 100,
                            tx_bytes,
                            tx_packets: tx_bytes / 100,
                        },
                        sched,
                        resources: Resources {
                            memory_current: Some(id * 1024),
                            pids_current: (path != "/b").then_some(id),
                            ..Resources::default()
                        },
                        devices: common::devices::DevCounters {
                            allowed: 0,
                            denied: id,
                            suppressed: 0,
                        },
                        net_drops: common::netpolicy::NetDrops::default(),
                        rule_hits: Vec::new(),
                    }
                })
                .collect(),
            uncounted: NetCounters::ZERO,
            sched_uncounted: SchedCounters::ZERO,
        }
    }

    /// A snapshot over one second: `before` then `after` counters.
    fn snapshot(before: &[Spec<'_>], after: &[Spec<'_>]) -> Snapshot {
        let start = Instant::now();
        Snapshot::new(
            &sample(start + Duration::from_secs(1), after),
            Some(&sample(start, before)),
        )
    }

    const BEFORE: [Spec<'static>; 5] = [
        (1, "/", 0, 0, 0),
        (2, "/a", 0, 0, 0),
        (3, "/a/x", 0, 0, 0),
        (4, "/a/y", 0, 0, 0),
        (5, "/b", 0, 0, 0),
    ];
    /// Over the second: /a/x 30% CPU, /a/y 20%, /b 40%, /a itself 5%.
    const AFTER: [Spec<'static>; 5] = [
        (1, "/", 0, 1000, 0),
        (2, "/a", 50_000_000, 0, 2048),
        (3, "/a/x", 300_000_000, 4096, 0),
        (4, "/a/y", 200_000_000, 0, 1024),
        (5, "/b", 400_000_000, 512, 0),
    ];

    fn shown(state: &State) -> Vec<(usize, &str)> {
        state
            .lines
            .iter()
            .map(|l| (l.depth, state.cgroups[l.cgroup].path.as_str()))
            .collect()
    }

    fn state() -> State {
        let mut state = State::new(Duration::from_secs(1));
        state.update(&snapshot(&BEFORE, &AFTER));
        state
    }

    #[test]
    fn rates_come_from_two_snapshots() {
        let state = state();
        let x = &state.cgroups[2];
        assert_eq!(x.path, "/a/x");
        assert_eq!(x.own.cpu_percent, Some(30.0));
        assert_eq!(x.own.rx_bytes_per_s, Some(4096.0));
        assert_eq!(x.own.tx_bytes_per_s, Some(0.0));
        assert_eq!(x.own.memory_bytes, Some(3 * 1024));
        assert_eq!(x.own.device_denials, 3);
        assert!(state.has_rates);

        // One sample alone has no rates: those columns show `-`.
        let mut first = State::new(Duration::from_secs(1));
        first.update(&Snapshot::new(&sample(Instant::now(), &AFTER), None));
        assert_eq!(first.cgroups[2].own.cpu_percent, None);
        assert_eq!(first.cgroups[2].own.rx_bytes_per_s, None);
        assert_eq!(first.cgroups[2].own.runq_p99_ns(), None);
        assert!(!first.has_rates);
    }

    #[test]
    fn the_flat_view_sorts_by_cpu_first_and_by_any_column() {
        let mut state = state();
        assert_eq!(
            shown(&state),
            [(0, "/b"), (0, "/a/x"), (0, "/a/y"), (0, "/a"), (0, "/")]
        );
        state.handle(Key::Char('r'));
        assert_eq!(state.sort, Column::Rx);
        assert_eq!(
            shown(&state)[..3],
            [(0, "/a/x"), (0, "/"), (0, "/b")],
            "4096, 1000 and 512 bytes received"
        );
        state.handle(Key::Char('n'));
        assert_eq!(
            shown(&state),
            [(0, "/"), (0, "/a"), (0, "/a/x"), (0, "/a/y"), (0, "/b")]
        );
        state.handle(Key::Char('n'));
        assert!(state.reverse, "the same key again reverses");
        assert_eq!(shown(&state)[0], (0, "/b"));
        // Pids: /b cannot give it, so it goes last whatever the order.
        state.handle(Key::Char('p'));
        assert!(!state.reverse);
        assert_eq!(shown(&state)[0], (0, "/a/y"));
        assert_eq!(shown(&state)[4], (0, "/b"));
        state.handle(Key::Char('>'));
        assert_eq!(state.sort, Column::Rx);
        state.handle(Key::Char('<'));
        state.handle(Key::Char('<'));
        assert_eq!(state.sort, Column::Memory);
        assert_eq!(shown(&state)[0], (0, "/b"), "5 KiB is the most memory");
    }

    #[test]
    fn the_tree_rolls_children_up_into_parents() {
        let mut state = state();
        state.handle(Key::Char('t'));
        assert!(state.tree);
        // Siblings sorted by their subtree's CPU: /a (55%) before /b (40%).
        assert_eq!(
            shown(&state),
            [(0, "/"), (1, "/a"), (2, "/a/x"), (2, "/a/y"), (1, "/b")]
        );
        let a = &state.cgroups[1];
        assert_eq!(a.own.cpu_percent, Some(5.0));
        assert_eq!(a.subtree.cpu_percent, Some(55.0));
        assert_eq!(a.subtree.rx_bytes_per_s, Some(4096.0));
        assert_eq!(a.subtree.tx_bytes_per_s, Some(3072.0));
        assert_eq!(a.subtree.device_denials, 2 + 3 + 4);
        assert_eq!(
            a.subtree.memory_bytes,
            Some(2 * 1024),
            "memory is the kernel's figure, already hierarchical"
        );
        let root = &state.cgroups[0];
        assert_eq!(root.subtree.cpu_percent, Some(95.0));
        assert_eq!(root.subtree.rx_bytes_per_s, Some(1000.0 + 4096.0 + 512.0));
        // The run-queue histograms merge: the root's waits are everyone's.
        let waits: u64 = root.subtree.runq_buckets.unwrap().iter().sum();
        assert_eq!(waits, 50_000 + 300_000 + 200_000 + 400_000);
        assert_eq!(state.figures(&state.cgroups[1]).cpu_percent, Some(55.0));
        state.handle(Key::Char('t'));
        assert_eq!(state.figures(&state.cgroups[1]).cpu_percent, Some(5.0));
    }

    #[test]
    fn where_a_parent_has_no_memory_or_pids_its_children_add_up() {
        let mut state = State::new(Duration::from_secs(1));
        // /b gives no pids; give it children that do.
        let cgroups = [
            (1, "/", 0, 0, 0),
            (5, "/b", 0, 0, 0),
            (6, "/b/c", 0, 0, 0),
            (7, "/b/d", 0, 0, 0),
        ];
        state.update(&snapshot(&cgroups, &cgroups));
        let b = &state.cgroups[1];
        assert_eq!(b.path, "/b");
        assert_eq!(b.own.pids, None);
        assert_eq!(b.subtree.pids, Some(6 + 7));
        assert_eq!(b.subtree.memory_bytes, Some(5 * 1024), "its own");
        assert_eq!(state.cgroups[0].subtree.pids, Some(1), "the root's own");
    }

    #[test]
    fn filtering_keeps_matching_paths_and_in_the_tree_their_ancestors() {
        let mut state = state();
        for key in [Key::Char('/'), Key::Char('x')] {
            state.handle(key);
        }
        assert_eq!(state.mode, Mode::Filter);
        assert_eq!(shown(&state), [(0, "/a/x")]);
        state.handle(Key::Enter);
        assert_eq!(state.mode, Mode::Normal);
        state.handle(Key::Char('t'));
        assert_eq!(shown(&state), [(0, "/"), (1, "/a"), (2, "/a/x")]);
        state.handle(Key::Char('t'));
        // Backspace edits, Esc clears.
        state.handle(Key::Char('/'));
        state.handle(Key::Backspace);
        state.handle(Key::Char('/'));
        state.handle(Key::Char('a'));
        assert_eq!(state.filter, "/a");
        assert_eq!(shown(&state).len(), 3);
        state.handle(Key::Esc);
        assert_eq!(state.filter, "");
        assert_eq!(shown(&state).len(), 5);
        // A workload's name matches too.
        let mut state = State::new(Duration::from_secs(1));
        state.update(&snapshot(
            &[(1, "/", 0, 0, 0), (7, "/web", 0, 0, 0)],
            &[(1, "/", 0, 0, 0), (7, "/web", 0, 0, 0)],
        ));
        state.filter = "we".into();
        state.relayout();
        assert_eq!(shown(&state), [(0, "/web")]);
        assert_eq!(state.selection().map(|c| c.id), Some(7));
    }

    #[test]
    fn the_selection_follows_its_cgroup_when_rows_move() {
        let mut state = state();
        state.handle(Key::Down);
        state.handle(Key::Down);
        assert_eq!(state.selection().map(|c| c.path.as_str()), Some("/a/y"));
        // /a/y becomes the busiest: it moves to the top, the selection with it.
        let mut later = AFTER;
        later[3].2 += 900_000_000;
        state.update(&snapshot(&AFTER, &later));
        assert_eq!(state.lines.first().map(|l| l.cgroup), Some(3));
        assert_eq!(state.cursor, 0);
        assert_eq!(state.selection().map(|c| c.path.as_str()), Some("/a/y"));
        // Sorting and the tree keep it too.
        state.handle(Key::Char('n'));
        assert_eq!(state.cursor, 3);
        state.handle(Key::Char('t'));
        assert_eq!(state.selection().map(|c| c.path.as_str()), Some("/a/y"));
        // When it disappears, the row at the same place is selected, and its
        // history goes with it.
        state.handle(Key::Char('t'));
        let cursor = state.cursor;
        let gone: Vec<Spec<'_>> = AFTER.iter().copied().filter(|c| c.0 != 4).collect();
        state.update(&snapshot(&gone, &gone));
        assert_eq!(state.cursor, cursor);
        assert_eq!(state.selection().map(|c| c.path.as_str()), Some("/b"));
        assert!(!state.history.contains_key(&4));
        // The end of the list, and an empty one.
        state.handle(Key::End);
        assert_eq!(state.cursor, 3);
        state.update(&snapshot(&[], &[]));
        assert_eq!(state.selection(), None);
        state.handle(Key::Down);
        assert_eq!(state.cursor, 0);
    }

    #[test]
    fn history_and_events_belong_to_the_selected_cgroup() {
        let mut state = state();
        state.update(&snapshot(&AFTER, &AFTER));
        let series = &state.history[&3].own;
        assert_eq!(series.cpu_percent, [30.0, 0.0]);
        assert_eq!(series.rx_bytes_per_s, [4096.0, 0.0]);
        assert_eq!(state.history[&2].subtree.cpu_percent, [55.0, 0.0]);
        for _ in 0..HISTORY + 5 {
            state.update(&snapshot(&AFTER, &AFTER));
        }
        assert_eq!(state.history[&3].own.cpu_percent.len(), HISTORY);

        let event = |id: u64, path: &str, ms: u64| Record {
            time: String::new(),
            unix_ms: ms,
            kind: "device_denied".into(),
            cgroup: path.into(),
            cgroup_id: id,
            pid: None,
            comm: None,
            device: None,
            net: None,
        };
        state.push_event(event(3, "/a/x", 1));
        state.push_event(event(5, "/b", 2));
        state.push_event(event(3, "/a/x", 3));
        state.filter = "/a".into();
        state.sort = Column::Name;
        state.relayout();
        state.handle(Key::Home);
        assert_eq!(state.selection().map(|c| c.id), Some(2));
        assert!(state.selected_events(10).is_empty(), "/a has none itself");
        state.handle(Key::Char('t'));
        let times: Vec<u64> = state
            .selected_events(10)
            .iter()
            .map(|r| r.unix_ms)
            .collect();
        assert_eq!(
            times,
            [3, 1],
            "in the tree, its descendants' too, newest first"
        );
        assert_eq!(
            state.selected_series().map(|s| s.cpu_percent.len()),
            Some(HISTORY)
        );
        for i in 0..EVENTS_KEPT + 1 {
            state.push_event(event(1, "/", i as u64));
        }
        assert_eq!(state.events.len(), EVENTS_KEPT);
    }

    #[test]
    fn keys_pause_help_detail_interval_and_quit() {
        let mut state = state();
        assert_eq!(state.handle(Key::Char(' ')), Outcome::Continue);
        assert!(state.paused);
        state.handle(Key::Char(' '));
        assert!(!state.paused);
        state.handle(Key::Char('?'));
        assert_eq!(state.mode, Mode::Help);
        state.handle(Key::Char('x'));
        assert_eq!(state.mode, Mode::Normal, "any key closes the help");
        assert_eq!(state.sort, Column::Cpu, "and does nothing else");
        state.handle(Key::Enter);
        assert!(state.detail);
        state.handle(Key::Esc);
        assert!(!state.detail);

        state.handle(Key::Char('+'));
        assert_eq!(state.interval, Duration::from_secs(2));
        state.handle(Key::Char('-'));
        state.handle(Key::Char('-'));
        assert_eq!(state.interval, Duration::from_millis(500));
        state.interval = Duration::from_millis(1_500);
        state.handle(Key::Char('-'));
        assert_eq!(state.interval, Duration::from_secs(1), "from -d 1.5");
        state.interval = Duration::from_millis(100);
        state.handle(Key::Char('-'));
        assert_eq!(state.interval, Duration::from_millis(100), "no shorter");

        // In the filter, q is a letter; Ctrl-C quits from anywhere.
        state.handle(Key::Char('/'));
        assert_eq!(state.handle(Key::Char('q')), Outcome::Continue);
        assert_eq!(state.filter, "q");
        assert_eq!(state.handle(Key::Interrupt), Outcome::Quit);
        state.handle(Key::Esc);
        assert_eq!(state.handle(Key::Char('q')), Outcome::Quit);
    }
}

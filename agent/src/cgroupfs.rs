//! What the kernel already keeps in cgroup files: memory, pids, block I/O and
//! CPU throttling, from the v2 files or, on hybrid hosts, the v1 controllers.
//!
//! Reading is cheap at scale: each file is opened once and re-read in place
//! (`pread` at offset 0 regenerates a cgroup file), so a tick over 1,000
//! cgroups is a few thousand `pread`s and no `open` or tree walk. A figure
//! the host cannot give is `None`, with the reason logged once per kind.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

/// The files the reader knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    MemoryCurrent,
    MemoryLimit,
    PidsCurrent,
    PidsLimit,
    Io,
    CpuStat,
    /// CPU usage from the files (the file-polling mode of the benchmarks).
    CpuUsage,
}

impl FileKind {
    const ALL: [Self; 6] = [
        Self::MemoryCurrent,
        Self::MemoryLimit,
        Self::PidsCurrent,
        Self::PidsLimit,
        Self::Io,
        Self::CpuStat,
    ];

    /// (v1 controller, v1 file) and the v2 file.
    const fn files(self) -> ((&'static str, &'static str), &'static str) {
        match self {
            Self::MemoryCurrent => (("memory", "memory.usage_in_bytes"), "memory.current"),
            Self::MemoryLimit => (("memory", "memory.limit_in_bytes"), "memory.max"),
            Self::PidsCurrent => (("pids", "pids.current"), "pids.current"),
            Self::PidsLimit => (("pids", "pids.max"), "pids.max"),
            Self::Io => (
                ("blkio", "blkio.throttle.io_service_bytes_recursive"),
                "io.stat",
            ),
            Self::CpuStat => (("cpu", "cpu.stat"), "cpu.stat"),
            Self::CpuUsage => (("cpuacct", "cpuacct.usage"), "cpu.stat"),
        }
    }
}

/// Where a cgroup's files are on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Mount point of the v2 hierarchy.
    pub v2_mount: PathBuf,
    /// v1 controller → its mount point (empty on unified hosts).
    pub v1: HashMap<String, PathBuf>,
}

impl Layout {
    /// From the text of /proc/self/mountinfo.
    #[must_use]
    pub fn from_mountinfo(text: &str) -> Option<Self> {
        let v2_mount = crate::cgroup::find_v2_mount(text)?;
        let mut v1 = HashMap::new();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mut right = right.split_whitespace();
            if right.next() != Some("cgroup") {
                continue;
            }
            let (Some(mount), Some(options)) = (left.split_whitespace().nth(4), right.nth(1))
            else {
                continue;
            };
            for option in options.split(',') {
                if ["memory", "pids", "blkio", "cpu", "cpuacct"].contains(&option) {
                    v1.insert(option.to_owned(), PathBuf::from(mount));
                }
            }
        }
        Some(Self { v2_mount, v1 })
    }

    /// This host's layout.
    #[must_use]
    pub fn detect() -> Option<Self> {
        Self::from_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
    }

    /// The file of `kind` for the cgroup at `relative` (to the v2 mount).
    /// v1 controllers win where mounted: v2 directories on hybrid hosts have
    /// no controller files.
    #[must_use]
    pub fn path(&self, kind: FileKind, relative: &Path) -> PathBuf {
        let ((controller, v1_file), v2_file) = kind.files();
        match self.v1.get(controller) {
            Some(mount) => mount.join(relative).join(v1_file),
            None => self.v2_mount.join(relative).join(v2_file),
        }
    }
}

/// The resource figures of one cgroup; `None` where the host cannot give one
/// (or, for limits, where there is no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory_current: Option<u64>,
    pub memory_limit: Option<u64>,
    pub pids_current: Option<u64>,
    pub pids_limit: Option<u64>,
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
    pub throttled_periods: Option<u64>,
    pub throttled_ns: Option<u64>,
}

/// v1 reports "no memory limit" as the page counter's maximum.
const UNLIMITED_FLOOR: u64 = 1 << 62;

/// A plain number (memory.current, pids.current, cpuacct.usage).
#[must_use]
pub fn parse_number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// A limit: `max` (v2) or a huge v1 value means none.
#[must_use]
pub fn parse_limit(text: &str) -> Option<u64> {
    parse_number(text).filter(|value| *value < UNLIMITED_FLOOR)
}

/// `key value` lines (cpu.stat, memory.events).
#[must_use]
pub fn parse_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        line.strip_prefix(key)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Bytes read and written: v2 io.stat (`8:0 rbytes=N wbytes=N ...` per
/// device) or v1 blkio `8:0 Read N` lines, summed over devices.
#[must_use]
pub fn parse_io(text: &str) -> (u64, u64) {
    let (mut read, mut write) = (0u64, 0u64);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if !first.contains(':') {
            continue; // v1's "Total N"
        }
        let rest: Vec<&str> = words.collect();
        match rest.as_slice() {
            ["Read", n] => read = read.saturating_add(n.parse().unwrap_or(0)),
            ["Write", n] => write = write.saturating_add(n.parse().unwrap_or(0)),
            fields => {
                for field in fields {
                    if let Some(n) = field.strip_prefix("rbytes=") {
                        read = read.saturating_add(n.parse().unwrap_or(0));
                    } else if let Some(n) = field.strip_prefix("wbytes=") {
                        write = write.saturating_add(n.parse().unwrap_or(0));
                    }
                }
            }
        }
    }
    (read, write)
}

/// (throttled periods, throttled ns) from cpu.stat: v2 `throttled_usec`, v1
/// `throttled_time` (ns).
#[must_use]
pub fn parse_throttling(text: &str) -> (Option<u64>, Option<u64>) {
    let periods = parse_key(text, "nr_throttled");
    let ns = parse_key(text, "throttled_usec")
        .map(|us| us.saturating_mul(1000))
        .or_else(|| parse_key(text, "throttled_time"));
    (periods, ns)
}

/// CPU usage in ns: v1 cpuacct.usage, or v2 cpu.stat `usage_usec`.
#[must_use]
pub fn parse_cpu_usage(text: &str) -> Option<u64> {
    parse_number(text).or_else(|| parse_key(text, "usage_usec").map(|us| us.saturating_mul(1000)))
}

enum Handle {
    Open(File),
    /// The file is not there (the reason was logged, once per kind).
    Missing,
}

/// Reads cgroup files through kept-open handles.
pub struct Reader {
    layout: Layout,
    handles: HashMap<(u64, FileKind), Handle>,
    /// Files found missing since the last [`Reader::report_missing`].
    missing: Vec<(FileKind, PathBuf, io::Error)>,
    /// Kinds already reported.
    reported: HashSet<FileKind>,
    buffer: Vec<u8>,
}

impl Reader {
    #[must_use]
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            handles: HashMap::new(),
            missing: Vec::new(),
            reported: HashSet::new(),
            buffer: vec![0; 4096],
        }
    }

    /// The v2 mount point this reader resolves paths against.
    #[must_use]
    pub fn v2_mount(&self) -> &Path {
        &self.layout.v2_mount
    }

    fn read(&mut self, id: u64, kind: FileKind, relative: &Path) -> Option<&str> {
        let layout = &self.layout;
        let missing = &mut self.missing;
        let handle = self.handles.entry((id, kind)).or_insert_with(|| {
            let path = layout.path(kind, relative);
            match File::open(&path) {
                Ok(file) => Handle::Open(file),
                Err(err) => {
                    // The root cgroup lacks some files by design: not worth a word.
                    if !relative.as_os_str().is_empty() {
                        missing.push((kind, path, err));
                    }
                    Handle::Missing
                }
            }
        });
        let Handle::Open(file) = handle else {
            return None;
        };
        let mut filled = 0;
        loop {
            if filled == self.buffer.len() {
                self.buffer.resize(self.buffer.len() * 2, 0);
            }
            match file.read_at(&mut self.buffer[filled..], filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                // The cgroup went away between the walk and now.
                Err(_) => return None,
            }
        }
        std::str::from_utf8(&self.buffer[..filled]).ok()
    }

    /// Every figure of the cgroup `id` at `relative` (to the v2 mount).
    pub fn resources(&mut self, id: u64, relative: &Path) -> Resources {
        let mut out = Resources::default();
        for kind in FileKind::ALL {
            let Some(text) = self.read(id, kind, relative) else {
                continue;
            };
            match kind {
                FileKind::MemoryCurrent => out.memory_current = parse_number(text),
                FileKind::MemoryLimit => out.memory_limit = parse_limit(text),
                FileKind::PidsCurrent => out.pids_current = parse_number(text),
                FileKind::PidsLimit => out.pids_limit = parse_limit(text),
                FileKind::Io => {
                    (out.io_read_bytes, out.io_write_bytes) = {
                        let (read, write) = parse_io(text);
                        (Some(read), Some(write))
                    }
                }
                FileKind::CpuStat => {
                    (out.throttled_periods, out.throttled_ns) = parse_throttling(text)
                }
                FileKind::CpuUsage => {}
            }
        }
        out
    }

    /// CPU usage from the files (the file-polling benchmark mode).
    pub fn cpu_usage(&mut self, id: u64, relative: &Path) -> Option<u64> {
        self.read(id, FileKind::CpuUsage, relative)
            .and_then(parse_cpu_usage)
    }

    /// Logs, in one line and once per kind of file, which figures are null
    /// because the host has no file for them.
    pub fn report_missing(&mut self) {
        let missing = std::mem::take(&mut self.missing);
        let new: Vec<_> = missing
            .iter()
            .filter(|(kind, _, _)| self.reported.insert(*kind))
            .collect();
        let Some((_, example, err)) = new.first() else {
            return;
        };
        let kinds: Vec<&str> = new.iter().map(|(kind, _, _)| kind.files().1).collect();
        let hint = if err.kind() == io::ErrorKind::NotFound && !self.layout.v1.is_empty() {
            " (on this hybrid host, a cgroup made only in the v2 hierarchy has no v1 controller files)"
        } else {
            ""
        };
        log::info!(
            "reported as null where the host has no file for them: {}; for example {}: {err}{hint}",
            kinds.join(", "),
            example.display()
        );
    }

    /// Closes the handles of cgroups that are gone.
    pub fn retain(&mut self, alive: impl Fn(u64) -> bool) {
        self.handles.retain(|(id, _), _| alive(*id));
    }
}

/// Lets the process keep a handle per cgroup file open: raises the soft limit
/// of open files to the hard limit.
pub fn raise_open_files_limit() {
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    const HYBRID: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_hosts_read_the_v1_controllers() {
        let layout = Layout::from_mountinfo(HYBRID).unwrap();
        let relative = Path::new("agent/web");
        assert_eq!(
            layout.path(FileKind::MemoryCurrent, relative),
            Path::new("/sys/fs/cgroup/memory/agent/web/memory.usage_in_bytes")
        );
        assert_eq!(
            layout.path(FileKind::Io, relative),
            Path::new("/sys/fs/cgroup/blkio/agent/web/blkio.throttle.io_service_bytes_recursive")
        );
        assert_eq!(
            layout.path(FileKind::CpuUsage, relative),
            Path::new("/sys/fs/cgroup/cpuacct/agent/web/cpuacct.usage")
        );
        let unified =
            Layout::from_mountinfo("25 30 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
                .unwrap();
        assert_eq!(
            unified.path(FileKind::PidsLimit, relative),
            Path::new("/sys/fs/cgroup/agent/web/pids.max")
        );
        assert_eq!(
            unified.path(FileKind::CpuUsage, relative),
            Path::new("/sys/fs/cgroup/agent/web/cpu.stat")
        );
    }

    #[test]
    fn parsers_take_both_hierarchies_formats() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None, "v1's unlimited");
        assert_eq!(parse_limit("67108864\n"), Some(64 << 20));
        assert_eq!(
            parse_io("8:0 rbytes=100 wbytes=20 rios=1 wios=1\n254:0 rbytes=5 wbytes=0\n"),
            (105, 20)
        );
        assert_eq!(
            parse_io(
                "254:0 Read 4096\n254:0 Write 512\n254:0 Sync 0\n254:0 Total 4608\nTotal 4608\n"
            ),
            (4096, 512)
        );
        assert_eq!(
            parse_throttling("nr_periods 10\nnr_throttled 3\nthrottled_time 1500\n"),
            (Some(3), Some(1500))
        );
        assert_eq!(
            parse_throttling("usage_usec 9\nnr_throttled 2\nthrottled_usec 7\n"),
            (Some(2), Some(7000))
        );
        assert_eq!(parse_cpu_usage("123456\n"), Some(123_456));
        assert_eq!(
            parse_cpu_usage("usage_usec 12\nuser_usec 1\n"),
            Some(12_000)
        );
    }

    #[test]
    fn a_fake_cgroupfs_is_read_through_kept_handles() {
        let root = std::env::temp_dir().join(format!("agent-cgroupfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let v2 = root.join("unified");
        fs::create_dir_all(v2.join("web")).unwrap();
        for (file, text) in [
            ("memory.current", "4096\n"),
            ("memory.max", "max\n"),
            ("pids.current", "3\n"),
            ("pids.max", "20\n"),
            ("io.stat", "8:0 rbytes=10 wbytes=30\n"),
            (
                "cpu.stat",
                "usage_usec 5\nnr_throttled 1\nthrottled_usec 2\n",
            ),
        ] {
            fs::write(v2.join("web").join(file), text).unwrap();
        }
        let mut reader = Reader::new(Layout {
            v2_mount: v2.clone(),
            v1: HashMap::new(),
        });
        let read = reader.resources(7, Path::new("web"));
        assert_eq!(
            read,
            Resources {
                memory_current: Some(4096),
                memory_limit: None,
                pids_current: Some(3),
                pids_limit: Some(20),
                io_read_bytes: Some(10),
                io_write_bytes: Some(30),
                throttled_periods: Some(1),
                throttled_ns: Some(2000),
            }
        );
        // The kept handle sees new contents (written in place, as the kernel's are).
        fs::OpenOptions::new()
            .write(true)
            .open(v2.join("web/pids.current"))
            .unwrap()
            .write_at(b"9\n", 0)
            .unwrap();
        assert_eq!(reader.resources(7, Path::new("web")).pids_current, Some(9));
        // A cgroup without files: everything null.
        fs::create_dir_all(v2.join("bare")).unwrap();
        assert_eq!(reader.resources(8, Path::new("bare")), Resources::default());
        reader.retain(|id| id == 8);
        assert_eq!(reader.handles.len(), FileKind::ALL.len());
        fs::remove_dir_all(&root).unwrap();
    }
}

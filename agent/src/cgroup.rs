//! Cgroup discovery: where the v2 hierarchy is mounted, and which cgroups
//! (id → path) live under the watched root.
//!
//! A cgroup v2 id is the kernfs node id of its directory, which is also the
//! directory's inode number on 64-bit hosts: it is what `bpf_skb_cgroup_id()`
//! and `bpf_get_current_cgroup_id()` return in the kernel programs, and what
//! `getdents` reports as `d_ino`. Ids are never reused while the system runs.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::{DirEntryExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

/// `statfs` magic of cgroup v2 (`CGROUP2_SUPER_MAGIC` in linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path} failed: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/self/mountinfo): mount one \
         with `mount -t cgroup2 none /sys/fs/cgroup/unified`, or pass --cgroup-root"
    )]
    NoV2Mount,
    #[error("cgroup root {path} does not exist or cannot be opened: {source}")]
    RootMissing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cgroup root {path} is not in a cgroup v2 hierarchy (eBPF cgroup programs attach only \
         to cgroup v2); pass a directory under the cgroup2 mount{hint}"
    )]
    NotV2 { path: PathBuf, hint: String },
}

/// The mount point of the cgroup v2 hierarchy, from the text of
/// `/proc/self/mountinfo`: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones. When several cgroup2 mounts exist
/// the one showing the whole hierarchy (root `/`) wins, the first if several do.
#[must_use]
pub fn find_v2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut fallback = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut fields = left.split_whitespace();
        let (Some(root), Some(mount_point)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape_mountinfo(mount_point));
        if root == "/" {
            return Some(mount_point);
        }
        fallback.get_or_insert(mount_point);
    }
    fallback
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|octal| std::str::from_utf8(octal).ok())
            .and_then(|octal| u8::from_str_radix(octal, 8).ok());
        match escaped {
            Some(value) => {
                out.push(value);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 root to watch: `explicit` when given (`--cgroup-root`),
/// otherwise the v2 mount found in /proc/self/mountinfo. Either way it must be
/// a directory of a cgroup2 file system.
pub fn resolve_root(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => {
            let path = Path::new("/proc/self/mountinfo");
            let text = fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.into(),
                source,
            })?;
            find_v2_mount(&text).ok_or(Error::NoV2Mount)?
        }
    };
    let path = fs::canonicalize(&path).map_err(|source| Error::RootMissing { path, source })?;
    let stat = nix::sys::statfs::statfs(&path).map_err(|errno| Error::RootMissing {
        path: path.clone(),
        source: io::Error::from(errno),
    })?;
    #[expect(
        clippy::useless_conversion,
        reason = "f_type is i64 on x86_64 but not everywhere"
    )]
    if i64::from(stat.filesystem_type().0) != CGROUP2_SUPER_MAGIC {
        let hint = fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|text| find_v2_mount(&text))
            .map(|mount| format!(" ({} on this host)", mount.display()))
            .unwrap_or_default();
        return Err(Error::NotV2 { path, hint });
    }
    Ok(path)
}

/// The id of the cgroup at `path` (its directory's inode number).
pub fn cgroup_id(path: &Path) -> Result<u64, Error> {
    fs::metadata(path)
        .map(|meta| meta.ino())
        .map_err(|source| Error::Read {
            path: path.into(),
            source,
        })
}

/// Every cgroup under a root, by id. Paths are relative to the root and start
/// with `/`; the root itself is `/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupTree {
    paths: HashMap<u64, String>,
}

impl CgroupTree {
    /// Walks the directories under `root`. A cgroup removed while the walk
    /// runs is left out quietly; only failing to read the root is an error.
    pub fn walk(root: &Path) -> Result<Self, Error> {
        let mut paths = HashMap::new();
        paths.insert(cgroup_id(root)?, "/".to_owned());
        let entries = fs::read_dir(root).map_err(|source| Error::Read {
            path: root.into(),
            source,
        })?;
        let mut stack = vec![(entries, String::new())];
        while let Some((entries, prefix)) = stack.last_mut() {
            let Some(entry) = entries.next() else {
                stack.pop();
                continue;
            };
            let Ok(entry) = entry else { continue };
            // cgroupfs reports DT_DIR in getdents, so this costs no stat.
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let path = format!("{prefix}/{}", entry.file_name().to_string_lossy());
            let id = entry.ino();
            let Ok(children) = fs::read_dir(entry.path()) else {
                continue;
            };
            paths.insert(id, path.clone());
            stack.push((children, path));
        }
        Ok(Self { paths })
    }

    /// The path of cgroup `id`, relative to the root.
    #[must_use]
    pub fn path(&self, id: u64) -> Option<&str> {
        self.paths.get(&id).map(String::as_str)
    }

    #[must_use]
    pub fn contains(&self, id: u64) -> bool {
        self.paths.contains_key(&id)
    }

    /// Every (id, path), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &str)> {
        self.paths.iter().map(|(id, path)| (*id, path.as_str()))
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        assert_eq!(
            find_v2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_v2_mount(UNIFIED),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            find_v2_mount("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn prefers_the_mount_of_the_whole_hierarchy() {
        let text = "\
50 1 0:40 /docker/abc /mnt/inner rw - cgroup2 cgroup2 rw
51 1 0:40 / /mnt/with\\040space rw - cgroup2 cgroup2 rw
";
        assert_eq!(find_v2_mount(text), Some(PathBuf::from("/mnt/with space")));
        assert_eq!(
            find_v2_mount("50 1 0:40 /docker/abc /mnt/inner rw - cgroup2 cgroup2 rw\n"),
            Some(PathBuf::from("/mnt/inner"))
        );
    }

    #[test]
    fn walks_a_tree_with_ids_and_relative_paths() {
        let dir = std::env::temp_dir().join(format!("agent-cgroup-walk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::create_dir_all(dir.join("c")).unwrap();
        fs::write(dir.join("a/cgroup.procs"), "").unwrap();
        let tree = CgroupTree::walk(&dir).unwrap();
        let mut paths: Vec<_> = tree.iter().map(|(_, path)| path.to_owned()).collect();
        paths.sort();
        assert_eq!(paths, ["/", "/a", "/a/b", "/c"]);
        let b = fs::metadata(dir.join("a/b")).unwrap().ino();
        assert_eq!(tree.path(b), Some("/a/b"));
        assert_eq!(tree.path(cgroup_id(&dir).unwrap()), Some("/"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_root_that_is_not_cgroup2_is_refused_with_its_path() {
        let err = resolve_root(Some(Path::new("/tmp"))).unwrap_err();
        assert!(matches!(err, Error::NotV2 { .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with("cgroup root /tmp is not in a cgroup v2 hierarchy"));
        let err = resolve_root(Some(Path::new("/nonexistent/x"))).unwrap_err();
        assert!(matches!(err, Error::RootMissing { .. }), "{err}");
    }
}

//! The bpffs directory where the daemon pins its maps and links, so that
//! `agent stats` and `agent top` can find them and the programs survive a
//! daemon restart (`--keep-pinned`).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// `statfs` magic of bpffs (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where bpffs is conventionally mounted, and mounted by the agent when absent.
pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

/// The default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/agent";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mounting bpffs at {path} failed: {source}; mount it yourself with `mount -t bpf bpf {path}`")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pin directory {path} is not on a bpffs: use a directory under a bpffs mount \
         (such as {DEFAULT_PIN_DIR}) or mount one with `mount -t bpf bpf {parent}`"
    )]
    NotBpffs { path: PathBuf, parent: String },
    #[error("creating pin directory {path} failed: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn is_bpffs(path: &Path) -> bool {
    #[expect(
        clippy::useless_conversion,
        reason = "f_type is i64 on x86_64 but not everywhere"
    )]
    nix::sys::statfs::statfs(path)
        .is_ok_and(|stat| i64::from(stat.filesystem_type().0) == BPF_FS_MAGIC)
}

/// Makes `pin_dir` (and its `maps/` and `links/` subdirectories) exist on a
/// bpffs. When the directory lies under `/sys/fs/bpf` and nothing is mounted
/// there (as on this project's test hosts), bpffs is mounted first.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), Error> {
    let default_mount = Path::new(DEFAULT_MOUNT);
    if pin_dir.starts_with(default_mount) && !is_bpffs(default_mount) {
        fs::create_dir_all(default_mount).map_err(|source| Error::Create {
            path: default_mount.into(),
            source,
        })?;
        nix::mount::mount(
            Some("bpf"),
            default_mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .map_err(|errno| Error::Mount {
            path: default_mount.into(),
            source: errno.into(),
        })?;
    }
    let existing = pin_dir
        .ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        return Err(Error::NotBpffs {
            path: pin_dir.into(),
            parent: pin_dir.parent().unwrap_or(pin_dir).display().to_string(),
        });
    }
    for dir in [pin_dir.to_path_buf(), maps_dir(pin_dir), links_dir(pin_dir)] {
        fs::create_dir_all(&dir).map_err(|source| Error::Create { path: dir, source })?;
    }
    Ok(())
}

/// `<pin-dir>/maps`
#[must_use]
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

/// `<pin-dir>/links`
#[must_use]
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Removes the pin directory and whatever is pinned in it. Removing a link's
/// pin detaches the program once no process holds the link open any more.
pub fn remove_pin_dir(pin_dir: &Path) -> io::Result<()> {
    for dir in [maps_dir(pin_dir), links_dir(pin_dir)] {
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    fs::remove_file(entry?.path())?;
                }
                fs::remove_dir(&dir)?;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    match fs::remove_dir(pin_dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

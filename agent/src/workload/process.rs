//! The workload's first process: cloned into new namespaces, held until the
//! parent has placed it in its cgroups (and mapped its ids and wired its
//! network), then set up (mounts, hostname, cgroup namespace) and exec'd.

use std::{
    ffi::{CString, OsString},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{clone, unshare, CloneFlags},
    sys::signal::{SigSet, SigmaskHow, Signal},
    unistd::{
        chdir, execv, pipe2, pivot_root, read, sethostname, setresgid, setresuid, write, Gid, Pid,
        Uid,
    },
};

/// The first uid (and gid) outside that root inside a `--userns` workload maps
/// to; 65536 ids are mapped, as /etc/subuid ranges usually are.
pub const USERNS_BASE: u32 = 100_000;
const USERNS_SIZE: u32 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the workload's namespaces failed: {0} (the kernel needs CONFIG_*_NS, and the agent root)")]
    Clone(nix::errno::Errno),
    #[error("setting up the workload failed: {0}")]
    Pipe(nix::errno::Errno),
    #[error("writing {path} failed: {source}")]
    IdMap {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the workload failed: {0}")]
    Setup(String),
}

/// What the child does before it becomes the workload.
#[derive(Debug, Clone)]
pub struct Config {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub hostname: Option<String>,
    pub rootfs: Option<PathBuf>,
    pub userns: bool,
    pub new_netns: bool,
}

/// A cloned child waiting for [`Held::start`].
pub struct Held {
    pid: Pid,
    go: OwnedFd,
    errors: OwnedFd,
}

fn cstring(bytes: &[u8]) -> CString {
    // Paths and arguments come from the OS and cannot hold NUL bytes.
    CString::new(bytes).unwrap_or_default()
}

/// Clones the workload's first process into new PID, mount, UTS, IPC (and
/// network, and user) namespaces. It waits for `start`.
pub fn spawn(config: &Config) -> Result<Held, Error> {
    let (go_read, go_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::Pipe)?;
    let (errors_read, errors_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::Pipe)?;
    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    if config.new_netns {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if config.userns {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    let program = cstring(config.program.as_os_str().as_bytes());
    let args: Vec<CString> = config
        .args
        .iter()
        .map(|arg| cstring(arg.as_bytes()))
        .collect();
    let (go_fd, errors_fd) = (go_read.as_raw_fd(), errors_write.as_raw_fd());
    let (parent_go, parent_errors) = (go_write.as_raw_fd(), errors_read.as_raw_fd());
    let config = config.clone();
    let mut stack = vec![0u8; 1 << 20];
    let child = Box::new(move || -> isize {
        // In the child (a copy of this single-threaded process).
        let _ = nix::unistd::close(parent_go);
        let _ = nix::unistd::close(parent_errors);
        match setup_and_exec(&config, &program, &args, go_fd) {
            Ok(never) => match never {},
            Err(message) => {
                // SAFETY: errors_fd is the child's copy of the pipe's write end.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(errors_fd) };
                let _ = write(fd, message.as_bytes());
                127
            }
        }
    });
    // SAFETY: the agent is single-threaded when it runs a workload, so the
    // child may allocate; the stack outlives the clone call (the child gets
    // its own copy of the address space).
    let pid = unsafe { clone(child, &mut stack, flags, Some(Signal::SIGCHLD as i32)) }
        .map_err(Error::Clone)?;
    drop(go_read);
    drop(errors_write);
    Ok(Held {
        pid,
        go: go_write,
        errors: errors_read,
    })
}

enum Never {}

fn step<T>(what: &str, result: nix::Result<T>) -> Result<T, String> {
    result.map_err(|errno| format!("{what}: {}", errno.desc()))
}

fn setup_and_exec(
    config: &Config,
    program: &CString,
    args: &[CString],
    go: i32,
) -> Result<Never, String> {
    // Die with the agent: nobody else would clean up after us.
    step(
        "setting the parent-death signal",
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL),
    )?;
    let mut byte = [0u8; 1];
    // SAFETY: the child's copy of the pipe's read end.
    let go = unsafe { std::os::fd::BorrowedFd::borrow_raw(go) };
    if step("waiting for the agent", read(go, &mut byte))? != 1 {
        return Err("the agent went away before the workload started".into());
    }
    if config.userns {
        // The maps are written: become root of the new user namespace, which
        // is an unprivileged uid outside.
        step("setgroups", nix::unistd::setgroups(&[]))?;
        step(
            "setresgid",
            setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)),
        )?;
        step(
            "setresuid",
            setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)),
        )?;
    }
    // Now that the agent moved us into our cgroups: they become our `/`.
    step(
        "creating the cgroup namespace",
        unshare(CloneFlags::CLONE_NEWCGROUP),
    )?;
    step(
        "making mounts private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    if let Some(rootfs) = &config.rootfs {
        step(
            "bind-mounting the rootfs",
            mount(
                Some(rootfs.as_path()),
                rootfs.as_path(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            ),
        )?;
        step("entering the rootfs", chdir(rootfs.as_path()))?;
        // pivot_root(".", ".") stacks the old root on top of the new one;
        // detaching it leaves only the rootfs.
        step("pivot_root", pivot_root(".", "."))?;
        step("detaching the old root", umount2(".", MntFlags::MNT_DETACH))?;
        step("chdir /", chdir("/"))?;
    }
    step(
        "mounting /proc",
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )?;
    if let Some(hostname) = &config.hostname {
        step("setting the hostname", sethostname(hostname))?;
    }
    step(
        "unblocking signals",
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None),
    )?;
    let errno = execv(program, args).map_or_else(|errno| errno, |never| match never {});
    Err(format!(
        "executing {}: {}",
        Path::new(std::ffi::OsStr::from_bytes(program.as_bytes())).display(),
        errno.desc()
    ))
}

impl Held {
    /// The child's pid, as this (the host's) PID namespace sees it.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// Maps root inside the child's user namespace to [`USERNS_BASE`] outside.
    pub fn map_ids(&self) -> Result<(), Error> {
        for file in ["uid_map", "gid_map"] {
            let path = PathBuf::from(format!("/proc/{}/{file}", self.pid));
            std::fs::write(&path, format!("0 {USERNS_BASE} {USERNS_SIZE}\n"))
                .map_err(|source| Error::IdMap { path, source })?;
        }
        Ok(())
    }

    /// Lets the child go on, and waits until it has exec'd the command (or
    /// failed to set up, which is reported in one sentence).
    pub fn start(self) -> Result<Pid, Error> {
        write(&self.go, &[1]).map_err(Error::Pipe)?;
        let mut message = Vec::new();
        let mut buffer = [0u8; 512];
        loop {
            match read(&self.errors, &mut buffer) {
                Ok(0) => break,
                Ok(n) => message.extend_from_slice(&buffer[..n]),
                Err(nix::errno::Errno::EINTR) => {}
                Err(errno) => return Err(Error::Pipe(errno)),
            }
        }
        if message.is_empty() {
            Ok(self.pid)
        } else {
            Err(Error::Setup(String::from_utf8_lossy(&message).into_owned()))
        }
    }
}

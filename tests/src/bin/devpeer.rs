//! Device accesses for the kernel integration tests, run inside a test cgroup.
//!
//!   devpeer try OP...                 one line per OP: `ok` or the errno name
//!       OP: r:PATH, w:PATH, rw:PATH (open), mknod:PATH:c|b:MAJOR:MINOR
//!   devpeer loop SECONDS|stdin OK_PATH DENIED_PATH
//!       opens OK_PATH (must succeed) and DENIED_PATH (must fail with EPERM)
//!       in turn until time is up (or stdin closes); prints `opens N wrong M`
//!   devpeer deny COUNT PATH           opens PATH for reading COUNT times;
//!       prints how many failed with EPERM
//!   devpeer bench COUNT PATH          opens and closes PATH COUNT times;
//!       prints the ns (of its CPU time) per open/close
//!   devpeer cycle COUNT ROUNDS PATH CGROUP...
//!       ROUNDS times: moves itself into each CGROUP (a v2 directory) in
//!       turn (round r starting with the r-th, modulo their number) and
//!       opens and closes PATH COUNT times there; prints a line per round
//!       with the ns (of its CPU time) per open/close in each cgroup, in
//!       the order given
use std::{
    fs::OpenOptions,
    process::ExitCode,
    time::{Duration, Instant},
};

fn open(path: &str, read: bool, write: bool) -> Result<(), nix::errno::Errno> {
    OpenOptions::new()
        .read(read)
        .write(write)
        .open(path)
        .map(drop)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)))
}

/// This thread's CPU time: with paravirtual steal-time accounting, time the
/// hypervisor gave to other guests is left out, as is interrupt time.
fn thread_cpu_ns() -> Result<u64, String> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_err(|e| format!("clock_gettime: {e}"))?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

fn name(result: Result<(), nix::errno::Errno>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(errno) => format!("{errno:?}"),
    }
}

fn try_op(op: &str) -> Result<String, String> {
    let parts: Vec<&str> = op.split(':').collect();
    Ok(match parts.as_slice() {
        ["r", path] => name(open(path, true, false)),
        ["w", path] => name(open(path, false, true)),
        ["rw", path] => name(open(path, true, true)),
        ["mknod", path, kind, major, minor] => {
            let kind = match *kind {
                "c" => nix::sys::stat::SFlag::S_IFCHR,
                "b" => nix::sys::stat::SFlag::S_IFBLK,
                other => return Err(format!("bad device type {other}")),
            };
            let major: u64 = major.parse().map_err(|e| format!("{e}"))?;
            let minor: u64 = minor.parse().map_err(|e| format!("{e}"))?;
            let result = nix::sys::stat::mknod(
                *path,
                kind,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                nix::sys::stat::makedev(major, minor),
            );
            let _ = std::fs::remove_file(path);
            name(result)
        }
        _ => return Err(format!("bad op {op:?}")),
    })
}

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("try") => {
            for op in &args[1..] {
                println!("{}", try_op(op)?);
            }
            Ok(())
        }
        Some("loop") => {
            let (ok_path, denied_path) = (
                args.get(2).ok_or("OK_PATH")?,
                args.get(3).ok_or("DENIED_PATH")?,
            );
            // SECONDS, or `stdin`: until standard input closes.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let deadline = match args.get(1).map(String::as_str) {
                Some("stdin") => {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    });
                    None
                }
                Some(seconds) => Some(
                    Instant::now()
                        + Duration::from_secs_f64(seconds.parse().map_err(|e| format!("{e}"))?),
                ),
                None => return Err("SECONDS".into()),
            };
            let (mut opens, mut wrong) = (0u64, 0u64);
            while deadline.is_none_or(|deadline| Instant::now() < deadline)
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                if open(ok_path, true, true).is_err() {
                    wrong += 1;
                }
                if open(denied_path, true, false) != Err(nix::errno::Errno::EPERM) {
                    wrong += 1;
                }
                opens += 2;
            }
            println!("opens {opens} wrong {wrong}");
            Ok(())
        }
        Some("deny") => {
            let count: u64 = args
                .get(1)
                .ok_or("COUNT")?
                .parse()
                .map_err(|e| format!("{e}"))?;
            let path = args.get(2).ok_or("PATH")?;
            let denied = (0..count)
                .filter(|_| open(path, true, false) == Err(nix::errno::Errno::EPERM))
                .count();
            println!("{denied}");
            Ok(())
        }
        Some("bench") => {
            let count: u32 = args
                .get(1)
                .ok_or("COUNT")?
                .parse()
                .map_err(|e| format!("{e}"))?;
            let path = args.get(2).ok_or("PATH")?;
            let start = thread_cpu_ns()?;
            for _ in 0..count {
                open(path, true, true).map_err(|e| format!("{path}: {e}"))?;
            }
            println!(
                "{:.1}",
                (thread_cpu_ns()? - start) as f64 / f64::from(count)
            );
            Ok(())
        }
        Some("cycle") => {
            let number = |i: usize, what: &str| -> Result<u32, String> {
                args.get(i)
                    .ok_or(what)?
                    .parse()
                    .map_err(|e| format!("{what}: {e}"))
            };
            let (count, rounds) = (number(1, "COUNT")?, number(2, "ROUNDS")?);
            let path = args.get(3).ok_or("PATH")?;
            let cgroups = &args[4.min(args.len())..];
            for round in 0..rounds as usize {
                let mut line = vec![String::new(); cgroups.len()];
                // Each round starts in the next cgroup, so that no mode
                // always follows the same one.
                for k in 0..cgroups.len() {
                    let i = (round + k) % cgroups.len();
                    let cgroup = &cgroups[i];
                    std::fs::write(format!("{cgroup}/cgroup.procs"), "0")
                        .map_err(|e| format!("{cgroup}/cgroup.procs: {e}"))?;
                    let start = thread_cpu_ns()?;
                    for _ in 0..count {
                        open(path, true, true).map_err(|e| format!("{path}: {e}"))?;
                    }
                    line[i] = format!(
                        "{:.1}",
                        (thread_cpu_ns()? - start) as f64 / f64::from(count)
                    );
                }
                println!("{}", line.join(" "));
            }
            Ok(())
        }
        _ => Err("usage: devpeer try|loop|deny|bench|cycle ...".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("devpeer: {err}");
            ExitCode::FAILURE
        }
    }
}

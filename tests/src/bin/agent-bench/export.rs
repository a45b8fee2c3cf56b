//! `agent-bench export`: what one export costs the daemon, in CPU
//! milliseconds and bytes, at 10, 100 and 1,000 live cgroups, for OTLP over
//! gRPC, OTLP over HTTP/protobuf and a Prometheus scrape. Each mode runs a
//! daemon exporting (or scraped) every [`EVERY`]; its CPU over the window,
//! less that of a daemon exporting nothing over the same window (modes
//! interleaved), divided by the exports made, is the cost of one export.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use agent_tests::{agent_bin, otlp::Receiver, unique};

use crate::{
    measure::{self, median, spread},
    sched::{cpu_time_ns, LiveCgroups},
    Options,
};

/// The export interval, the scrape interval and the daemon's tick.
const EVERY: Duration = Duration::from_millis(250);
const EVERY_ARG: &str = "250ms";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Grpc,
    Http,
    Prometheus,
}

impl Mode {
    const fn label(self) -> &'static str {
        match self {
            Self::None => "no export",
            Self::Grpc => "OTLP gRPC",
            Self::Http => "OTLP HTTP/protobuf",
            Self::Prometheus => "Prometheus scrape",
        }
    }
}

/// One measured run: daemon CPU in ms, exports made, bytes per export.
struct Run {
    cpu_ms: f64,
    exports: usize,
    bytes: f64,
}

fn scrape(port: u16) -> usize {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    );
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |head| response.len() - head - 4)
}

fn measure(root: &Path, mode: Mode, window: Duration) -> Result<Run, String> {
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("agent-bench-export"));
    let receiver = match mode {
        Mode::Grpc => Some(Receiver::grpc()),
        Mode::Http => Some(Receiver::http()),
        Mode::None | Mode::Prometheus => None,
    };
    // Held until the daemon listens on it.
    let reserved_port = agent_tests::otlp::ReservedPort::new();
    let port = reserved_port.port;
    let mut command = Command::new(agent_bin());
    command
        .args(["daemon", "--cgroup-root"])
        .arg(root)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["--interval", EVERY_ARG]);
    if let Some(receiver) = &receiver {
        command.args([
            "--otlp-endpoint",
            &receiver.endpoint,
            "--otlp-protocol",
            receiver.protocol,
            "--export-interval",
            EVERY_ARG,
        ]);
    }
    if mode == Mode::Prometheus {
        command.args(["--prometheus-listen", &format!("127.0.0.1:{port}")]);
    }
    let mut daemon = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting agent daemon: {e}"))?;
    let pid = daemon.id();
    // Past start-up (loading, the first walk, opening every cgroup file).
    thread::sleep(Duration::from_secs(3));
    if let Some(receiver) = &receiver {
        let deadline = Instant::now() + Duration::from_secs(30);
        while receiver.sizes().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
    }
    let before = receiver.as_ref().map_or(0, |r| r.sizes().len());
    let (start, t0) = (cpu_time_ns(pid), Instant::now());
    let mut scraped = Vec::new();
    while t0.elapsed() < window {
        thread::sleep(EVERY);
        if mode == Mode::Prometheus {
            scraped.push(scrape(port));
        }
    }
    let end = cpu_time_ns(pid);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    agent_tests::remove_pins(&pin_dir);
    let sizes: Vec<usize> = match &receiver {
        Some(r) => r.sizes().into_iter().skip(before).collect(),
        None => scraped,
    };
    #[expect(clippy::cast_precision_loss, reason = "means")]
    let bytes = if sizes.is_empty() {
        0.0
    } else {
        sizes.iter().sum::<usize>() as f64 / sizes.len() as f64
    };
    #[expect(clippy::cast_precision_loss, reason = "ms")]
    Ok(Run {
        cpu_ms: end.saturating_sub(start) as f64 / 1e6,
        exports: sizes.len(),
        bytes,
    })
}

pub fn run(options: &Options) -> Result<(), String> {
    agent_tests::require_root();
    let window = Duration::from_secs(u64::from(options.seconds));
    let modes = [Mode::None, Mode::Grpc, Mode::Http, Mode::Prometheus];
    let mut rows = Vec::new();
    for count in [10, 100, 1000] {
        let live = LiveCgroups::create(count)?;
        // Per mode: ms per export (against the paired no-export run), bytes.
        let mut per_export = [vec![], vec![], vec![], vec![]];
        let mut bytes = [vec![], vec![], vec![], vec![]];
        for repeat in 1..=options.repeats {
            let mut baseline = 0.0;
            for (i, mode) in modes.into_iter().enumerate() {
                let run = measure(&live.v2_root(), mode, window)?;
                if mode == Mode::None {
                    baseline = run.cpu_ms;
                    continue;
                }
                #[expect(clippy::cast_precision_loss, reason = "counts")]
                let exports = run.exports.max(1) as f64;
                per_export[i].push((run.cpu_ms - baseline) / exports);
                bytes[i].push(run.bytes);
                eprintln!(
                    "{count} cgroups, repeat {repeat}/{}: {}: {:.3} ms/export, {:.0} bytes, {} exports",
                    options.repeats,
                    mode.label(),
                    per_export[i][per_export[i].len() - 1],
                    run.bytes,
                    run.exports
                );
            }
        }
        rows.push((count, per_export, bytes));
    }
    let mut table = measure::preamble("export");
    let _ = writeln!(
        table,
        "Daemon CPU per export: one daemon per mode exporting (or scraped) every {} ms, with its \
         tick at the same interval, over {} s windows after start-up (3 s and the first export), less the CPU of a daemon exporting nothing over the paired \
         window (modes interleaved, {} repeats; median (min to max)). It includes reading the cgroup \
         files, building and encoding the export, and sending it to an in-process receiver on \
         loopback. Bytes: protobuf message size (OTLP) or body size (Prometheus text).",
        EVERY.as_millis(),
        options.seconds,
        options.repeats
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| cgroups | exporter | CPU ms per export | bytes per export |"
    );
    let _ = writeln!(table, "|---:|---|---:|---:|");
    for (count, per_export, bytes) in &rows {
        for (i, mode) in modes.iter().enumerate().skip(1) {
            let _ = writeln!(
                table,
                "| {count} | {} | {} | {:.0} |",
                mode.label(),
                spread(&per_export[i], 3),
                median(&bytes[i])
            );
        }
    }
    measure::publish(&table, options.out.as_deref())
}

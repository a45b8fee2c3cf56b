//! Traffic of exactly known size for the kernel integration tests, run by the
//! harness inside a test cgroup and network namespace.
//!
//!   netpeer udp-recv ADDR:PORT COUNT SIZE   receive COUNT datagrams of SIZE bytes
//!   netpeer udp-send ADDR:PORT COUNT SIZE   send COUNT datagrams of SIZE bytes
//!   netpeer tcp-recv ADDR:PORT BYTES        accept one connection, read BYTES, reply 1 byte
//!   netpeer tcp-send ADDR:PORT BYTES        connect, send BYTES, read the reply
//!   netpeer try PROTO:ADDR:PORT...          for each target, print the verdict:
//!                                           `ok` or the errno's name (EPERM, ...);
//!                                           tcp connects (one SYN retry), udp
//!                                           sends one 100-byte datagram
//!   netpeer listen ADDR:PORT                accept TCP connections until killed
//!   netpeer udp-count ADDR:PORT MS          print how many datagrams arrive
//!                                           within MS ms of `ready`
//!   netpeer verdicts ALLOWED DENIED         until stdin closes, send a datagram
//!                                           to each; print `sends N wrong W`
//!                                           (W: sends whose verdict was not
//!                                           ok and EPERM respectively)
//!
//! Receivers print `ready` once bound. Both TCP sides close only after the
//! other side's FIN has arrived on a socket they still hold open, so every
//! packet of the connection passes through a full socket of the test's
//! cgroups (none is answered by a TIME_WAIT mini-socket on the kernel's behalf).
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("netpeer {}: {err}", args.join(" "));
            ExitCode::FAILURE
        }
    }
}

fn number(text: Option<&String>, what: &str) -> Result<usize, String> {
    text.ok_or(format!("missing {what}"))?
        .parse()
        .map_err(|e| format!("{what}: {e}"))
}

/// The errno's name, as the tests expect it.
fn errno_name(err: &std::io::Error) -> String {
    err.raw_os_error().map_or_else(
        || err.to_string(),
        |code| format!("{:?}", nix::errno::Errno::from_raw(code)),
    )
}

/// The verdict of one `PROTO:ADDR:PORT` target (IPv6 in brackets).
fn try_one(target: &str) -> Result<String, String> {
    let (proto, addr) = target
        .split_once(':')
        .ok_or(format!("{target}: not PROTO:ADDR:PORT"))?;
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{target}: {e}"))?;
    let result = match proto {
        "tcp" => {
            let domain = if addr.is_ipv4() {
                socket2_domain::V4
            } else {
                socket2_domain::V6
            };
            let fd = nix::sys::socket::socket(
                domain,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| e.to_string())?;
            // One SYN retry: a dropped SYN times out in about 3 s, not 2 min.
            // SAFETY: setsockopt on a socket this function owns.
            let one: libc::c_int = 1;
            unsafe {
                use std::os::fd::AsRawFd as _;
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_SYNCNT,
                    std::ptr::from_ref(&one).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let storage = nix::sys::socket::SockaddrStorage::from(addr);
            nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &storage)
                .map_err(std::io::Error::from)
        }
        "udp" => {
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let socket = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
            socket.send_to(&[0x5a; 100], addr).map(|_| ())
        }
        other => return Err(format!("{target}: protocol {other} is not tcp or udp")),
    };
    Ok(match result {
        Ok(()) => "ok".into(),
        Err(err) => errno_name(&err),
    })
}

/// Address families for nix's socket().
mod socket2_domain {
    pub const V4: nix::sys::socket::AddressFamily = nix::sys::socket::AddressFamily::Inet;
    pub const V6: nix::sys::socket::AddressFamily = nix::sys::socket::AddressFamily::Inet6;
}

fn run(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) == Some("try") {
        for target in &args[1..] {
            println!("{}", try_one(target)?);
        }
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("verdicts") {
        let parse = |i: usize| -> Result<SocketAddr, String> {
            args.get(i)
                .ok_or("usage: verdicts ALLOWED DENIED")?
                .parse()
                .map_err(|e| format!("{e}"))
        };
        let (allowed, denied) = (parse(1)?, parse(2)?);
        let socket = UdpSocket::bind(if allowed.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })
        .map_err(|e| e.to_string())?;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let done = done.clone();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                done.store(true, std::sync::atomic::Ordering::Relaxed);
            })
        };
        let (mut sends, mut wrong) = (0u64, 0u64);
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            if socket.send_to(&[1; 64], allowed).is_err() {
                wrong += 1;
            }
            match socket.send_to(&[2; 64], denied) {
                Err(err) if err.raw_os_error() == Some(libc::EPERM) => {}
                _ => wrong += 1,
            }
            sends += 2;
        }
        let _ = watcher.join();
        println!("sends {sends} wrong {wrong}");
        return Ok(());
    }
    let addr: SocketAddr = args
        .get(1)
        .ok_or("missing ADDR:PORT")?
        .parse()
        .map_err(|e| format!("ADDR:PORT: {e}"))?;
    let io = |e: std::io::Error| e.to_string();
    match args.first().map(String::as_str) {
        Some("udp-recv") => {
            let (count, size) = (number(args.get(2), "COUNT")?, number(args.get(3), "SIZE")?);
            let socket = UdpSocket::bind(addr).map_err(io)?;
            // Room for every datagram even when this process is not scheduled
            // while the sender runs: a drop at a full receive buffer happens
            // after the cgroup program counted the packet.
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::RcvBufForce,
                &(32 << 20),
            )
            .map_err(|e| format!("SO_RCVBUFFORCE: {e}"))?;
            socket
                .set_read_timeout(Some(Duration::from_secs(20)))
                .map_err(io)?;
            println!("ready");
            let mut buf = vec![0u8; size + 1];
            for i in 0..count {
                let n = socket
                    .recv(&mut buf)
                    .map_err(|e| format!("datagram {i} of {count}: {e}"))?;
                if n != size {
                    return Err(format!("datagram {i} has {n} bytes, not {size}"));
                }
            }
            Ok(())
        }
        Some("udp-send") => {
            let (count, size) = (number(args.get(2), "COUNT")?, number(args.get(3), "SIZE")?);
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .map_err(|_| "bind")?;
            let socket = UdpSocket::bind(bind).map_err(io)?;
            let payload = vec![0x5a_u8; size];
            for _ in 0..count {
                let n = socket.send_to(&payload, addr).map_err(io)?;
                if n != size {
                    return Err(format!("sent {n} bytes, not {size}"));
                }
            }
            Ok(())
        }
        Some("tcp-recv") => {
            let bytes = number(args.get(2), "BYTES")?;
            let listener = TcpListener::bind(addr).map_err(io)?;
            println!("ready");
            let (mut stream, _) = listener.accept().map_err(io)?;
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .map_err(io)?;
            let mut total = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = stream.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                total += n;
            }
            if total != bytes {
                return Err(format!("received {total} bytes, not {bytes}"));
            }
            stream.write_all(b"k").map_err(io)?;
            stream.shutdown(Shutdown::Write).map_err(io)?;
            // Keep the socket until the peer's last ACK has arrived: wait
            // for the peer's close to be acknowledged by reading to EOF again.
            let _ = stream.read(&mut buf);
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        }
        Some("tcp-send") => {
            let bytes = number(args.get(2), "BYTES")?;
            let mut stream =
                TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(io)?;
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .map_err(io)?;
            let chunk = vec![0xa5_u8; 1 << 16];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                stream.write_all(&chunk[..n]).map_err(io)?;
                left -= n;
            }
            stream.shutdown(Shutdown::Write).map_err(io)?;
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply).map_err(io)?;
            if reply != b"k" {
                return Err(format!("reply was {reply:?}, not \"k\""));
            }
            // The peer's FIN has been read: the ACK for it left from this
            // full socket. Closing now moves it to TIME_WAIT silently.
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        }
        Some("listen") => {
            let listener = TcpListener::bind(addr).map_err(io)?;
            println!("ready");
            let mut held = Vec::new();
            for stream in listener.incoming() {
                held.push(stream.map_err(io)?);
            }
            Ok(())
        }
        Some("udp-count") => {
            let ms = number(args.get(2), "MS")?;
            let socket = UdpSocket::bind(addr).map_err(io)?;
            println!("ready");
            let deadline = std::time::Instant::now() + Duration::from_millis(ms as u64);
            let mut buf = vec![0u8; 65536];
            let mut count = 0u64;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                socket.set_read_timeout(Some(left)).map_err(io)?;
                match socket.recv(&mut buf) {
                    Ok(_) => count += 1,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                    Err(e) => return Err(e.to_string()),
                }
            }
            println!("{count}");
            Ok(())
        }
        _ => Err("usage: netpeer udp-recv|udp-send|tcp-recv|tcp-send|listen|udp-count ADDR:PORT ..., try TARGET..., verdicts ALLOWED DENIED".into()),
    }
}

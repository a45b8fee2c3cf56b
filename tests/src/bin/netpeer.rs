//! Traffic of exactly known size for the kernel integration tests, run by the
//! harness inside a test cgroup and network namespace.
//!
//!   netpeer udp-recv ADDR:PORT COUNT SIZE   receive COUNT datagrams of SIZE bytes
//!   netpeer udp-send ADDR:PORT COUNT SIZE   send COUNT datagrams of SIZE bytes
//!   netpeer tcp-recv ADDR:PORT BYTES        accept one connection, read BYTES, reply 1 byte
//!   netpeer tcp-send ADDR:PORT BYTES        connect, send BYTES, read the reply
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

fn run(args: &[String]) -> Result<(), String> {
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
        _ => Err("usage: netpeer udp-recv|udp-send|tcp-recv|tcp-send ADDR:PORT ...".into()),
    }
}

//! Denial events: read by the daemon from the kernel's ring buffer, kept in a
//! recent buffer, appended to the audit log as JSON lines, and served to
//! `agent events` over a Unix socket.
//!
//! Protocol on the socket: the client sends one JSON line
//! `{"since_unix_ms": N | null, "follow": true | false}`; the daemon answers
//! with the recent events at or after `since` (all of them when null), one
//! JSON object per line, and, with `follow`, every new event until the client
//! goes away.

use std::{
    collections::VecDeque,
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{
    devices::{ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE, TYPE_BLOCK},
    events::{Event, EVENT_DEVICE_DENIED, EVENT_NET_DENIED, REASON_CONNECT},
    netpolicy::{DIR_EGRESS, FAMILY_V4, PROTO_ICMP, PROTO_TCP, PROTO_UDP, RULE_DEFAULT},
};
use serde::{Deserialize, Serialize};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/agent/events.sock";
/// Default audit log.
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/agent/events.jsonl";
/// Events the daemon keeps for `agent events --since`.
const RECENT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no agent daemon answers on {path}: start one with `agent daemon` (or pass the --events-socket it uses)")]
    NoDaemon { path: PathBuf },
}

/// One event as people and logs read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339, UTC.
    pub time: String,
    pub unix_ms: u64,
    /// `device_denied` or `net_denied`.
    pub kind: String,
    /// The cgroup's path relative to the watched root (its id when unknown).
    pub cgroup: String,
    pub cgroup_id: u64,
    /// The task, where known (a received packet has none); its command.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device: Option<Device>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub net: Option<Packet>,
}

/// The packet a network denial dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    /// `egress` or `ingress`.
    pub direction: String,
    /// `tcp`, `udp`, `icmp`, or the IP protocol number.
    pub protocol: String,
    /// Absent for a refused connect (nothing was sent yet).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub src: Option<String>,
    pub dst: String,
    /// Absent for protocols without ports.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub src_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dst_port: Option<u16>,
    /// The rule's index in its direction; null when the default decided.
    pub rule: Option<u16>,
    /// `dropped`: the packet was dropped; `connect_refused`: a `connect()`
    /// to it failed with EPERM before anything was sent.
    pub outcome: String,
}

fn address(family: u8, bytes: &[u8; 16]) -> String {
    if family == FAMILY_V4 {
        std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()
    } else {
        std::net::Ipv6Addr::from(*bytes).to_string()
    }
}

fn packet(event: &Event) -> Packet {
    let protocol = match event.net_protocol {
        PROTO_TCP => "tcp".to_owned(),
        PROTO_UDP => "udp".to_owned(),
        PROTO_ICMP => "icmp".to_owned(),
        other => other.to_string(),
    };
    let ports = matches!(event.net_protocol, PROTO_TCP | PROTO_UDP);
    let sent = event.net_reason != REASON_CONNECT;
    Packet {
        direction: if event.net_direction == DIR_EGRESS {
            "egress"
        } else {
            "ingress"
        }
        .into(),
        protocol,
        src: sent.then(|| address(event.net_family, &event.src_addr)),
        dst: address(event.net_family, &event.dst_addr),
        src_port: (ports && sent).then_some(event.src_port),
        dst_port: ports.then_some(event.dst_port),
        rule: (event.net_rule != RULE_DEFAULT).then_some(event.net_rule),
        outcome: if event.net_reason == REASON_CONNECT {
            "connect_refused"
        } else {
            "dropped"
        }
        .into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// `b` or `c`.
    #[serde(rename = "type")]
    pub dev_type: String,
    pub major: u32,
    pub minor: u32,
    /// Access asked for, of `r`, `w`, `m`.
    pub access: String,
}

fn access_letters(access: u32) -> String {
    let mut out = String::new();
    for (bit, letter) in [(ACCESS_READ, 'r'), (ACCESS_WRITE, 'w'), (ACCESS_MKNOD, 'm')] {
        if access & u32::from(bit) != 0 {
            out.push(letter);
        }
    }
    out
}

/// The wall-clock time of a CLOCK_MONOTONIC instant from the kernel.
fn wall_clock(monotonic_ns: u64) -> SystemTime {
    let now_mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(monotonic_ns);
    SystemTime::now() - Duration::from_nanos(now_mono.saturating_sub(monotonic_ns))
}

impl Record {
    /// From a kernel event; `path` names the cgroup.
    #[must_use]
    pub fn new(event: &Event, path: Option<&str>) -> Self {
        let at = wall_clock(event.time_ns);
        let comm_len = event
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(event.comm.len());
        let device = (event.kind == EVENT_DEVICE_DENIED).then(|| Device {
            dev_type: if event.dev_type == TYPE_BLOCK {
                "b"
            } else {
                "c"
            }
            .into(),
            major: event.major,
            minor: event.minor,
            access: access_letters(event.access),
        });
        Self {
            time: humantime::format_rfc3339_millis(at).to_string(),
            unix_ms: at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
            kind: match event.kind {
                EVENT_DEVICE_DENIED => "device_denied",
                EVENT_NET_DENIED => "net_denied",
                _ => "unknown",
            }
            .into(),
            cgroup: path.map_or_else(|| format!("id:{}", event.cgroup_id), str::to_owned),
            cgroup_id: event.cgroup_id,
            pid: (event.pid != 0).then_some(event.pid),
            comm: (event.pid != 0)
                .then(|| String::from_utf8_lossy(&event.comm[..comm_len]).into_owned()),
            device,
            net: (event.kind == EVENT_NET_DENIED).then(|| packet(event)),
        }
    }
}

/// Decodes one ring buffer record.
#[must_use]
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: at least size_of::<Event>() bytes, and Event is plain data
    // (read unaligned: ring buffer records are 8-byte aligned, but be safe).
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// A client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub since_unix_ms: Option<u64>,
    pub follow: bool,
}

/// The daemon's side: recent events, the audit log, and the subscribers.
pub struct Hub {
    recent: VecDeque<Record>,
    audit: Option<(PathBuf, std::fs::File)>,
    live: tokio::sync::broadcast::Sender<Record>,
}

impl Hub {
    /// Opens (creating) the audit log for appending, when given.
    pub fn new(audit_log: Option<&Path>) -> Result<Self, Error> {
        let audit = match audit_log {
            Some(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                        what: "creating the directory of the audit log",
                        path: dir.into(),
                        source,
                    })?;
                }
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| Error::Io {
                        what: "opening the audit log",
                        path: path.into(),
                        source,
                    })?;
                Some((path.to_path_buf(), file))
            }
            None => None,
        };
        Ok(Self {
            recent: VecDeque::with_capacity(RECENT),
            audit,
            live: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// Records one event everywhere.
    pub fn publish(&mut self, record: Record) {
        if let Some((path, file)) = &mut self.audit {
            use std::io::Write as _;
            let line = serde_json::to_string(&record).unwrap_or_default();
            if let Err(err) = writeln!(file, "{line}") {
                log::warn!(
                    "appending to the audit log {} failed: {err}",
                    path.display()
                );
            }
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(record.clone());
        let _ = self.live.send(record);
    }

    /// Serves one client.
    pub fn serve(&self, stream: tokio::net::UnixStream) {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        let (read, mut write) = stream.into_split();
        // Subscribed before the backlog is copied: no event falls between.
        let mut live = self.live.subscribe();
        let recent: Vec<Record> = self.recent.iter().cloned().collect();
        tokio::spawn(async move {
            let mut line = String::new();
            if tokio::io::BufReader::new(read)
                .read_line(&mut line)
                .await
                .is_err()
            {
                return;
            }
            let Ok(request) = serde_json::from_str::<Request>(&line) else {
                return;
            };
            // Without `since`, only what comes from now on.
            for record in recent.iter().filter(|r| {
                request
                    .since_unix_ms
                    .is_some_and(|since| r.unix_ms >= since)
            }) {
                let text = serde_json::to_string(record).unwrap_or_default() + "\n";
                if write.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
            if !request.follow {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(record) => {
                        let text = serde_json::to_string(&record).unwrap_or_default() + "\n";
                        if write.write_all(text.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        log::warn!("an `agent events` client fell {missed} events behind; they were skipped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}

/// Binds the socket (replacing a stale one).
pub fn listen(path: &Path) -> Result<tokio::net::UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            what: "creating the directory of the events socket",
            path: dir.into(),
            source,
        })?;
    }
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path).map_err(|source| Error::Io {
        what: "listening on",
        path: path.into(),
        source,
    })
}

/// `agent events`: prints the daemon's events as JSON lines.
pub async fn follow(
    path: &Path,
    request: Request,
    mut out: impl std::io::Write,
) -> Result<(), Error> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|_| Error::NoDaemon { path: path.into() })?;
    let line = serde_json::to_string(&request).unwrap_or_default() + "\n";
    stream
        .write_all(line.as_bytes())
        .await
        .map_err(|source| Error::Io {
            what: "writing to",
            path: path.into(),
            source,
        })?;
    let mut lines = tokio::io::BufReader::new(stream).lines();
    while let Some(line) = lines.next_line().await.map_err(|source| Error::Io {
        what: "reading from",
        path: path.into(),
        source,
    })? {
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break; // The reader went away (a closed pipe).
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use common::events::COMM_LEN;

    use super::*;

    #[test]
    fn a_denial_reads_as_people_expect() {
        let mut comm = [0u8; COMM_LEN];
        comm[..4].copy_from_slice(b"head");
        let event = Event {
            kind: EVENT_DEVICE_DENIED,
            pid: 42,
            time_ns: 0,
            cgroup_id: 7,
            comm,
            dev_type: common::devices::TYPE_CHAR,
            major: 1,
            minor: 5,
            access: u32::from(ACCESS_READ | ACCESS_WRITE),
            ..Event::ZERO
        };
        let record = Record::new(&event, Some("/web"));
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["kind"], "device_denied");
        assert_eq!(json["cgroup"], "/web");
        assert_eq!(
            (json["pid"].as_u64(), json["comm"].as_str()),
            (Some(42), Some("head"))
        );
        assert_eq!(
            json["device"],
            serde_json::json!({"type": "c", "major": 1, "minor": 5, "access": "rw"})
        );
        assert_eq!(Record::new(&event, None).cgroup, "id:7");
    }

    #[test]
    fn a_network_denial_names_addresses_ports_and_rule() {
        let mut src_addr = [0u8; 16];
        src_addr[..4].copy_from_slice(&[169, 254, 77, 2]);
        let mut dst_addr = [0u8; 16];
        dst_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let event = Event {
            kind: EVENT_NET_DENIED,
            cgroup_id: 7,
            net_family: FAMILY_V4,
            net_protocol: PROTO_TCP,
            net_direction: DIR_EGRESS,
            net_rule: 2,
            src_port: 40000,
            dst_port: 443,
            src_addr,
            dst_addr,
            ..Event::ZERO
        };
        let json = serde_json::to_value(Record::new(&event, Some("/web"))).unwrap();
        assert_eq!(json["kind"], "net_denied");
        assert_eq!(
            (json["pid"].is_null(), json["comm"].is_null()),
            (true, true)
        );
        assert_eq!(
            json["net"],
            serde_json::json!({"direction": "egress", "protocol": "tcp", "src": "169.254.77.2",
                "dst": "10.1.2.3", "src_port": 40000, "dst_port": 443, "rule": 2,
                "outcome": "dropped"})
        );
    }

    #[test]
    fn ring_buffer_records_decode() {
        let event = Event {
            kind: EVENT_DEVICE_DENIED,
            major: 1,
            minor: 3,
            ..Event::ZERO
        };
        // SAFETY: reading the bytes of a plain-data value.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&event).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(decode(bytes), Some(event));
        assert_eq!(decode(&bytes[..8]), None);
    }
}

//! iperf3 between the two namespaces of a veth pair: the server in a cgroup
//! in namespace b (CPU 1), the client in a cgroup in namespace a (CPU 0). A
//! new one-off server (`-s -1`) for every run, so that nothing carries over.

use std::{
    fs,
    net::Ipv4Addr,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use agent_tests::{Cgroup, VethPair};
use serde_json::Value;

const PORT: u16 = 5201;
/// TCP payload per segment on this link (MTU 1500, timestamps on).
pub const MSS: f64 = 1448.0;

pub struct Iperf<'a> {
    pub pair: &'a VethPair,
}

/// A running iperf3 server; killed by its pid and reaped on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One TCP run's figures.
pub struct Tcp {
    /// Received over the whole run, bits per second.
    pub received: f64,
    /// Received after the first second, from the receiver's intervals
    /// (none in a run of a second).
    pub steady: Option<f64>,
    pub retransmits: u64,
    /// Segments the sender sent (bytes over the MSS).
    pub segments: f64,
}

impl Iperf<'_> {
    /// The server's address.
    pub fn server_addr(&self) -> Result<Ipv4Addr, String> {
        self.pair
            .b_addr
            .parse()
            .map_err(|e| format!("server address {}: {e}", self.pair.b_addr))
    }

    /// Starts a JSON server in `cgroup` and waits until it listens: its
    /// socket shows in `/proc/<pid>/net/tcp`, its own namespace's table.
    fn server(&self, cgroup: &Cgroup) -> Result<Server, String> {
        let mut command = cgroup.command("iperf3", Some(&self.pair.b));
        command
            .args(["-s", "-1", "-J", "-B", &self.pair.b_addr])
            .args(["-p", &PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut server = Server(
            command
                .spawn()
                .map_err(|e| format!("starting the iperf3 server: {e}"))?,
        );
        let listening = format!(
            "{:08X}:{PORT:04X}",
            u32::from_ne_bytes(self.server_addr()?.octets())
        );
        let table = format!("/proc/{}/net/tcp", server.0.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = fs::read_to_string(&table).unwrap_or_default();
            let ready = text.lines().any(|line| {
                let mut fields = line.split_whitespace().skip(1);
                fields.next() == Some(listening.as_str()) && fields.nth(1) == Some("0A")
            });
            if ready {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.0.try_wait() {
                return Err(format!(
                    "the iperf3 server exited ({status}) before it listened"
                ));
            }
            if Instant::now() > deadline {
                return Err("the iperf3 server did not listen within 10 s".into());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// One run, the client in `client` and the server in `server`; returns
    /// the client's JSON report (with the server's, `--get-server-output`).
    pub fn run(
        &self,
        client: &Cgroup,
        server: &Cgroup,
        extra: &[&str],
        seconds: u32,
    ) -> Result<Value, String> {
        let _server = self.server(server)?;
        let output = client
            .command("iperf3", Some(&self.pair.a))
            .args(["-c", &self.pair.b_addr, "-p", &PORT.to_string()])
            .args(["-J", "--get-server-output", "-A", "0,1"])
            .args(["-t", &seconds.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running the iperf3 client: {e}"))?;
        let report: Value = serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("iperf3 printed no JSON report ({e})"))?;
        if let Some(error) = report.get("error") {
            return Err(format!("iperf3 {}: {error}", extra.join(" ")));
        }
        Ok(report)
    }

    /// TCP throughput received, in Gbit/s.
    pub fn tcp(&self, client: &Cgroup, server: &Cgroup, seconds: u32) -> Result<f64, String> {
        Ok(self.tcp_run(client, server, &[], seconds)?.received / 1e9)
    }

    /// A TCP run's throughput, steady throughput and retransmits; `-R` in
    /// `extra` makes the server send.
    pub fn tcp_run(
        &self,
        client: &Cgroup,
        server: &Cgroup,
        extra: &[&str],
        seconds: u32,
    ) -> Result<Tcp, String> {
        let report = self.run(client, server, extra, seconds)?;
        let end = &report["end"];
        let number = |value: &Value, what: &str| {
            value
                .as_f64()
                .ok_or_else(|| format!("the iperf3 report has no {what}"))
        };
        let received = number(&end["sum_received"]["bits_per_second"], "end.sum_received")?;
        let sent_bytes = number(&end["sum_sent"]["bytes"], "end.sum_sent.bytes")?;
        let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
        // The receiver's intervals: the client's own with -R, else the server's.
        let intervals = if extra.contains(&"-R") {
            &report["intervals"]
        } else {
            &report["server_output_json"]["intervals"]
        };
        let (mut bytes, mut secs) = (0.0, 0.0);
        for interval in intervals.as_array().into_iter().flatten() {
            let sum = &interval["sum"];
            if sum["start"].as_f64().is_some_and(|start| start >= 0.999) {
                bytes += sum["bytes"].as_f64().unwrap_or(0.0);
                secs += sum["seconds"].as_f64().unwrap_or(0.0);
            }
        }
        Ok(Tcp {
            received,
            steady: (secs > 0.0).then(|| bytes * 8.0 / secs),
            retransmits,
            segments: sent_bytes / MSS,
        })
    }

    /// 64-byte UDP datagrams received per second, in thousands; with
    /// `reverse`, the server sends.
    pub fn udp64(
        &self,
        client: &Cgroup,
        server: &Cgroup,
        seconds: u32,
        reverse: bool,
    ) -> Result<f64, String> {
        let mut extra = vec!["-u", "-b", "0", "-l", "64"];
        if reverse {
            extra.push("-R");
        }
        let report = self.run(client, server, &extra, seconds)?;
        let sum = &report["end"]["sum"];
        match (
            sum["packets"].as_f64(),
            sum["lost_packets"].as_f64(),
            sum["seconds"].as_f64(),
        ) {
            (Some(packets), Some(lost), Some(secs)) if secs > 0.0 => {
                Ok((packets - lost) / secs / 1e3)
            }
            _ => Err("the iperf3 report has no end.sum packets".into()),
        }
    }

    /// Datagrams the client sent in a 64-byte UDP run (for checking counters).
    pub fn udp64_sent(
        &self,
        client: &Cgroup,
        server: &Cgroup,
        seconds: u32,
    ) -> Result<u64, String> {
        let report = self.run(client, server, &["-u", "-b", "0", "-l", "64"], seconds)?;
        report["end"]["sum"]["packets"]
            .as_u64()
            .ok_or_else(|| "the iperf3 report has no end.sum.packets".into())
    }
}

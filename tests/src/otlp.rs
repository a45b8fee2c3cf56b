//! An in-process OTLP metrics receiver on 127.0.0.1, over gRPC (a tonic
//! server with opentelemetry-proto's generated service) or HTTP/protobuf (a
//! small HTTP/1.1 server decoding the same message), keeping every request
//! it receives. Used by tests/tests/export.rs and `agent-bench export`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        metrics_service_server::{MetricsService, MetricsServiceServer},
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    },
    common::v1::{any_value, KeyValue},
    metrics::v1::{metric::Data, number_data_point, Metric},
};
use prost::Message as _;

/// A loopback TCP port held for a receiver that is not up yet: bound but
/// not listening, so that connects to it are refused and no other socket
/// (another test's, or an outgoing connection's) can take it meanwhile.
/// With SO_REUSEADDR, so that another process can still bind it and listen
/// (as a daemon's `--prometheus-listen` does, with std's listener).
pub struct ReservedPort {
    socket: std::os::fd::OwnedFd,
    pub port: u16,
}

impl ReservedPort {
    pub fn new() -> Self {
        use nix::sys::socket::{
            bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
        };
        use std::os::fd::AsRawFd as _;
        let socket = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("a TCP socket");
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReuseAddr, &true)
            .expect("SO_REUSEADDR");
        bind(socket.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).expect("bind a loopback port");
        let port = getsockname::<SockaddrIn>(socket.as_raw_fd())
            .expect("the bound port")
            .port();
        Self { socket, port }
    }

    /// Starts listening on the port.
    fn listen(self) -> TcpListener {
        nix::sys::socket::listen(
            &self.socket,
            nix::sys::socket::Backlog::new(128).expect("backlog"),
        )
        .expect("listen on the reserved port");
        TcpListener::from(self.socket)
    }
}

impl Default for ReservedPort {
    fn default() -> Self {
        Self::new()
    }
}

/// What the receiver got: each request and its size on the wire (protobuf bytes).
type Log = Arc<Mutex<Vec<(ExportMetricsServiceRequest, usize)>>>;

/// The headers (gRPC metadata) of the last request, lower-case names.
type Headers = Arc<Mutex<Vec<(String, String)>>>;

struct Service(Log, Headers);

#[tonic::async_trait]
impl MetricsService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        *self.1.lock().expect("receiver headers lock") = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let request = request.into_inner();
        let size = request.encoded_len();
        self.0
            .lock()
            .expect("receiver log lock")
            .push((request, size));
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// A running receiver; stops on drop.
pub struct Receiver {
    /// The URL to give `--otlp-endpoint`.
    pub endpoint: String,
    pub protocol: &'static str,
    log: Log,
    headers: Headers,
    stop: Arc<AtomicBool>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    addr: SocketAddr,
}

impl Receiver {
    /// A gRPC receiver.
    pub fn grpc() -> Self {
        Self::grpc_from(TcpListener::bind(("127.0.0.1", 0)).expect("bind the gRPC receiver"))
    }

    /// A gRPC receiver on the port `reserved` held.
    pub fn grpc_on(reserved: ReservedPort) -> Self {
        Self::grpc_from(reserved.listen())
    }

    fn grpc_from(listener: TcpListener) -> Self {
        let log: Log = Arc::default();
        let addr = listener.local_addr().expect("receiver address");
        listener.set_nonblocking(true).expect("nonblocking");
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let headers: Headers = Arc::default();
        let service = Service(log.clone(), headers.clone());
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("receiver runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                tonic::transport::Server::builder()
                    .add_service(MetricsServiceServer::new(service))
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .expect("gRPC receiver");
            });
        });
        Self {
            endpoint: format!("http://{addr}"),
            protocol: "grpc",
            log,
            headers,
            stop: Arc::default(),
            shutdown: Some(shutdown),
            addr,
        }
    }

    /// An HTTP/protobuf receiver at `/v1/metrics`.
    pub fn http() -> Self {
        let log: Log = Arc::default();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the HTTP receiver");
        let addr = listener.local_addr().expect("receiver address");
        let stop = Arc::new(AtomicBool::new(false));
        let headers: Headers = Arc::default();
        let (log2, stop2, headers2) = (log.clone(), stop.clone(), headers.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stream) = stream {
                    let (log, headers) = (log2.clone(), headers2.clone());
                    thread::spawn(move || serve_http(stream, &log, &headers));
                }
            }
        });
        Self {
            endpoint: format!("http://{addr}/v1/metrics"),
            protocol: "http/protobuf",
            log,
            headers,
            stop,
            shutdown: None,
            addr,
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.log
            .lock()
            .expect("receiver log lock")
            .iter()
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// The value of a header of the last request (`name` in lower case).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .lock()
            .expect("receiver headers lock")
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// Sizes (protobuf bytes) of every request so far.
    pub fn sizes(&self) -> Vec<usize> {
        self.log
            .lock()
            .expect("receiver log lock")
            .iter()
            .map(|(_, s)| *s)
            .collect()
    }

    /// Waits for a request that satisfies `found`, and returns it.
    pub fn wait_for(
        &self,
        timeout: Duration,
        found: impl Fn(&ExportMetricsServiceRequest) -> bool,
    ) -> ExportMetricsServiceRequest {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(request) = self.requests().into_iter().rev().find(&found) {
                return request;
            }
            assert!(
                Instant::now() < deadline,
                "no matching OTLP request within {timeout:?} ({} received; the last: {:#?})",
                self.requests().len(),
                self.requests().last()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        } else {
            // Wake the blocking accept.
            let _ = TcpStream::connect(self.addr);
        }
    }
}

/// Reads HTTP/1.1 requests off one connection (the exporter keeps it alive).
fn serve_http(stream: TcpStream, log: &Log, headers: &Headers) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
                seen.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let ok = request_line.starts_with("POST /v1/metrics ");
        let status = match ExportMetricsServiceRequest::decode(body.as_slice()) {
            Ok(request) if ok => {
                *headers.lock().expect("receiver headers lock") = seen;
                log.lock()
                    .expect("receiver log lock")
                    .push((request, length));
                "200 OK"
            }
            _ => "400 Bad Request",
        };
        let answer = ExportMetricsServiceResponse::default().encode_to_vec();
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
            answer.len()
        );
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(&answer).is_err() {
            return;
        }
    }
}

/// The string value of an attribute.
pub fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

/// The metric `name` of a request.
pub fn metric<'a>(request: &'a ExportMetricsServiceRequest, name: &str) -> Option<&'a Metric> {
    request
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .find(|m| m.name == name)
}

/// The value of the sum point of `name` whose attributes include all of `want`.
pub fn sum_value(
    request: &ExportMetricsServiceRequest,
    name: &str,
    want: &[(&str, &str)],
) -> Option<f64> {
    let Some(Data::Sum(sum)) = metric(request, name)?.data.as_ref() else {
        return None;
    };
    sum.data_points
        .iter()
        .find(|p| {
            want.iter()
                .all(|(k, v)| attribute(&p.attributes, k) == Some(v))
        })
        .and_then(|p| match p.value? {
            number_data_point::Value::AsInt(v) => Some(v as f64),
            number_data_point::Value::AsDouble(v) => Some(v),
        })
}

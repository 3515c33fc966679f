//! `signet-test-http`: the HTTP workloads of the traffic-management suite, both sides, each run
//! as a pod's process (`--cgroup`, then `--netns`). It prints one JSON line per run.
//!
//!     signet-test-http serve --name N --listen ADDR:PORT [--mode-file F] [--log F]
//!     signet-test-http load --url http://ADDR:PORT/PATH [--count N] [--concurrency C] [--h2]
//!                           [--header "name: value"]... [--method M] [--timeout-ms T]
//!                           [--hold-idle-ms N]
//!     signet-test-http grpc --addr ADDR:PORT --path /svc/Method [--messages K]
//!     signet-test-http ws --addr ADDR:PORT [--path P]
//!
//! `serve` speaks HTTP/1.1 and HTTP/2 (h2c, prior knowledge) on one port and answers with a
//! JSON body naming itself (`pod`), the method, the path, the protocol and the `x-` headers it
//! got. What it does is told by the mode file (read per request: `ok`, `fail` answers 503,
//! `stall` holds the request 30 s) or by the path (`/stall`, `/status/CODE`); `--log` appends
//! each request's method and path to a file. gRPC requests
//! (`application/grpc`) get every message echoed as `NAME:message`, as it arrives, and
//! `grpc-status: 0`; a WebSocket upgrade is accepted (RFC 6455 key) and echoes bytes.
//!
//! `load` sends `count` requests over `concurrency` kept-alive connections and reports the
//! statuses, which pod answered, errors and latency percentiles (`--hold-idle-ms`: one request,
//! then the connection held idle, reporting whether and when the other side closed it). `grpc` makes one call with
//! `messages` request messages (one: unary) and reports the replies and `grpc-status`; `ws`
//! upgrades and checks an echo.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use signet_tests::{Args, enter, fail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn main() {
    let args = Args::from_env();
    enter(args.value("--cgroup"), args.value("--netns"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(format!("runtime: {e}")));
    let report = rt.block_on(async {
        match args.command() {
            Some("serve") => serve(&args).await,
            Some("load") => load(&args).await,
            Some("grpc") => grpc(&args).await,
            Some("ws") => ws(&args).await,
            other => fail(format!("unknown command {other:?}")),
        }
    });
    println!("{report}");
}

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| fail(format!("`{s}` is not ADDR:PORT")))
}

// ---- serve ----

struct Server {
    name: String,
    mode_file: Option<String>,
    /// Each request's method and path are appended here.
    log: Option<std::sync::Mutex<std::fs::File>>,
}

async fn serve(args: &Args) -> serde_json::Value {
    let server = Arc::new(Server {
        name: args.need("--name").to_owned(),
        mode_file: args.value("--mode-file").map(str::to_owned),
        log: args.value("--log").map(|p| {
            std::sync::Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .unwrap_or_else(|e| fail(format!("--log {p}: {e}"))),
            )
        }),
    });
    let listener = tokio::net::TcpListener::bind(addr(args.need("--listen")))
        .await
        .unwrap_or_else(|e| fail(format!("bind: {e}")));
    println!("ready");
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let _ = sock.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.answer(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(sock), service)
                .await;
        });
    }
}

impl Server {
    fn mode(&self) -> String {
        self.mode_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|m| m.trim().to_owned())
            .unwrap_or_default()
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        if let Some(log) = &self.log {
            use std::io::Write as _;
            let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{} {path}", req.method());
        }
        let mode = self.mode();
        if mode == "stall" || path == "/stall" {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let is_grpc = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if is_grpc {
            return self.grpc(req);
        }
        if req.headers().contains_key(http::header::UPGRADE) {
            return upgrade(req);
        }
        let status = if mode == "fail" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            path.strip_prefix("/status/")
                .and_then(|c| c.parse().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK)
        };
        let headers: BTreeMap<String, String> = req
            .headers()
            .iter()
            .filter(|(n, _)| n.as_str().starts_with("x-") || n.as_str() == "host")
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = serde_json::json!({
            "pod": self.name,
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
            "proto": format!("{:?}", req.version()),
            "authority": req.uri().authority().map(|a| a.to_string()),
            "headers": headers,
        });
        let _ = req.into_body().collect().await;
        let mut resp = Response::new(full(body.to_string()));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            "x-pod",
            self.name.parse().expect("a pod name is a header value"),
        );
        resp
    }

    /// Echoes each gRPC message as it arrives, as `NAME:message`, then `grpc-status: 0`.
    fn grpc(&self, req: Request<Incoming>) -> Response<Body> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(16);
        let name = self.name.clone();
        let fail = req.uri().path().ends_with("/Fail");
        let mut body = req.into_body();
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(msg) = take_message(&mut buf) {
                    let reply = format!("{name}:{}", String::from_utf8_lossy(&msg));
                    if tx
                        .send(Frame::data(grpc_frame(reply.as_bytes())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            let mut trailers = http::HeaderMap::new();
            let code = if fail { "13" } else { "0" };
            trailers.insert("grpc-status", code.parse().expect("digits"));
            let _ = tx.send(Frame::trailers(trailers)).await;
        });
        let mut resp = Response::new(Channel(rx).boxed());
        resp.headers_mut()
            .insert("content-type", "application/grpc".parse().expect("static"));
        resp
    }
}

/// A response body fed by a channel.
struct Channel(tokio::sync::mpsc::Receiver<Frame<Bytes>>);

impl hyper::body::Body for Channel {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// One length-prefixed gRPC message (uncompressed).
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(msg.len()).unwrap_or(u32::MAX));
    b.extend_from_slice(msg);
    b.freeze()
}

fn take_message(buf: &mut BytesMut) -> Option<Bytes> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(buf.split_to(len).freeze())
}

/// Accepts a WebSocket upgrade (RFC 6455 §4.2.2) and echoes what comes after it.
fn upgrade(mut req: Request<Incoming>) -> Response<Body> {
    use base64::Engine as _;
    use sha1::Digest as _;
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec())
        .unwrap_or_default();
    let mut h = sha1::Sha1::new();
    h.update(&key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(h.finalize());
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 4096];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("upgrade", "websocket".parse().expect("static"));
    h.insert("connection", "upgrade".parse().expect("static"));
    h.insert("sec-websocket-accept", accept.parse().expect("base64"));
    resp
}

// ---- clients ----

enum Sender {
    H1(
        hyper::client::conn::http1::SendRequest<Body>,
        tokio::task::JoinHandle<()>,
    ),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

async fn connect(target: SocketAddr, h2: bool) -> Result<Sender, String> {
    let sock = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = sock.set_nodelay(true);
    let io = TokioIo::new(sock);
    if h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H2(s))
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Sender::H1(s, driver))
    }
}

impl Sender {
    async fn send(&mut self, req: Request<Body>) -> Result<Response<Incoming>, String> {
        match self {
            Sender::H1(s, _) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(|e| e.to_string())
            }
            Sender::H2(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(|e| e.to_string())
            }
        }
    }
}

/// One request's result.
#[derive(Default)]
struct Tally {
    statuses: BTreeMap<String, u64>,
    pods: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
    sample: Option<serde_json::Value>,
}

async fn load(args: &Args) -> serde_json::Value {
    let url: http::Uri = args
        .need("--url")
        .parse()
        .unwrap_or_else(|e| fail(format!("--url: {e}")));
    let authority = url
        .authority()
        .unwrap_or_else(|| fail("--url needs host:port".into()))
        .clone();
    let target = addr(authority.as_str());
    let count = args.number("--count", 1);
    let concurrency = args.number("--concurrency", 1).max(1);
    let h2 = args.flag("--h2");
    let timeout = Duration::from_millis(args.number("--timeout-ms", 10_000));
    let method: http::Method = args
        .value("--method")
        .unwrap_or("GET")
        .parse()
        .unwrap_or_else(|_| fail("--method".into()));
    let headers: Vec<(String, String)> = args
        .0
        .windows(2)
        .filter(|w| w[0] == "--header")
        .filter_map(|w| w[1].split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    // With one request on one connection: hold it idle and say whether (and when) the other
    // side closed it.
    if let Some(idle) = args.value("--hold-idle-ms") {
        let idle = Duration::from_millis(
            idle.parse()
                .unwrap_or_else(|_| fail("--hold-idle-ms".into())),
        );
        let Ok(Sender::H1(mut s, driver)) = connect(target, false).await else {
            return serde_json::json!({"error": "connect"});
        };
        let req = Request::builder()
            .uri(url.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", authority.as_str())
            .body(full(Bytes::new()))
            .expect("request");
        let status = match s.send_request(req).await {
            Ok(r) => {
                let status = r.status().as_u16();
                let _ = r.into_body().collect().await;
                status
            }
            Err(e) => return serde_json::json!({"error": e.to_string()}),
        };
        let t0 = Instant::now();
        let closed = tokio::time::timeout(idle, driver).await.is_ok();
        return serde_json::json!({
            "status": status,
            "closed": closed,
            "after_ms": t0.elapsed().as_millis() as u64,
        });
    }
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = vec![];
    for _ in 0..concurrency {
        let (tally, next, url, method, headers, authority) = (
            tally.clone(),
            next.clone(),
            url.clone(),
            method.clone(),
            headers.clone(),
            authority.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut sender: Option<Sender> = None;
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                let t0 = Instant::now();
                let result = tokio::time::timeout(timeout, async {
                    if sender.is_none() {
                        sender = Some(connect(target, h2).await?);
                    }
                    let mut b = Request::builder().method(method.clone());
                    b = if h2 {
                        b.uri(url.clone())
                    } else {
                        b.uri(url.path_and_query().map_or("/", |p| p.as_str()))
                            .header("host", authority.as_str())
                    };
                    for (n, v) in &headers {
                        b = b.header(n.as_str(), v.as_str());
                    }
                    let req = b.body(full(Bytes::new())).map_err(|e| e.to_string())?;
                    let resp = sender.as_mut().expect("connected").send(req).await;
                    let resp = match resp {
                        Ok(r) => r,
                        Err(e) => {
                            sender = None;
                            return Err(e);
                        }
                    };
                    let status = resp.status().as_u16();
                    let pod = resp
                        .headers()
                        .get("x-pod")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?
                        .to_bytes();
                    Ok::<_, String>((status, pod, body))
                })
                .await;
                let mut t = tally.lock().expect("tally");
                match result {
                    Ok(Ok((status, pod, body))) => {
                        *t.statuses.entry(status.to_string()).or_default() += 1;
                        *t.pods.entry(pod.unwrap_or_else(|| "-".into())).or_default() += 1;
                        t.latencies_us.push(t0.elapsed().as_micros() as u64);
                        if t.sample.is_none() || status != 200 {
                            t.sample = Some(serde_json::from_slice(&body).unwrap_or_else(|_| {
                                String::from_utf8_lossy(&body).into_owned().into()
                            }));
                        }
                    }
                    Ok(Err(e)) => *t.errors.entry(e).or_default() += 1,
                    Err(_) => {
                        *t.errors.entry("timeout".into()).or_default() += 1;
                        sender = None;
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed();
    let mut t = tally.lock().expect("tally");
    t.latencies_us.sort_unstable();
    let pct = |p: f64| {
        t.latencies_us
            .get(
                ((t.latencies_us.len() as f64 * p) as usize)
                    .min(t.latencies_us.len().saturating_sub(1)),
            )
            .copied()
            .unwrap_or(0)
    };
    serde_json::json!({
        "count": count,
        "statuses": t.statuses,
        "pods": t.pods,
        "errors": t.errors,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
        "max_us": t.latencies_us.last().copied().unwrap_or(0),
        "rps": count as f64 / elapsed.as_secs_f64(),
        "sample": t.sample,
    })
}

async fn grpc(args: &Args) -> serde_json::Value {
    let target = addr(args.need("--addr"));
    let path = args.need("--path");
    let messages = args.number("--messages", 1);
    let mut sender = match connect(target, true).await {
        Ok(s) => s,
        Err(e) => return serde_json::json!({"error": e}),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(16);
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{target}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(ChannelBody(rx).boxed())
        .expect("request");
    // Messages are sent one at a time, each after the reply to the previous one: a stream.
    let call = tokio::spawn(async move { sender.send(req).await });
    if tx.send(Frame::data(grpc_frame(b"m0"))).await.is_err() {
        return serde_json::json!({"error": "the call ended early"});
    }
    let resp = match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(Ok(r))) => r,
        other => {
            return serde_json::json!({"error": format!("{:?}", other.map(|r| r.map(|r| r.map(|_| ()))))});
        }
    };
    let status = resp.status().as_u16();
    let early = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let mut body = resp.into_body();
    let mut replies = vec![];
    let mut buf = BytesMut::new();
    let mut sent = 1;
    let mut tx = Some(tx);
    let mut grpc_status = early;
    let mut grpc_message = None;
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(10), body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return serde_json::json!({"error": e.to_string(), "replies": replies});
            }
            Err(_) => return serde_json::json!({"error": "timed out", "replies": replies}),
        };
        if let Some(t) = frame.trailers_ref() {
            let get = |n: &str| t.get(n).map(|v| v.to_str().unwrap_or("").to_owned());
            grpc_status = get("grpc-status");
            grpc_message = get("grpc-message");
            continue;
        }
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(m) = take_message(&mut buf) {
            replies.push(String::from_utf8_lossy(&m).into_owned());
            if sent < messages {
                if let Some(tx) = &tx {
                    let _ = tx
                        .send(Frame::data(grpc_frame(format!("m{sent}").as_bytes())))
                        .await;
                }
                sent += 1;
            } else {
                // Every message answered: half-close, and the server ends the call.
                tx = None;
            }
        }
    }
    serde_json::json!({
        "status": status,
        "grpc_status": grpc_status,
        "grpc_message": grpc_message,
        "replies": replies,
    })
}

/// A request body fed by a channel (a client stream).
struct ChannelBody(tokio::sync::mpsc::Receiver<Frame<Bytes>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

async fn ws(args: &Args) -> serde_json::Value {
    let target = addr(args.need("--addr"));
    let path = args.value("--path").unwrap_or("/ws");
    let Ok(mut sock) = tokio::net::TcpStream::connect(target).await else {
        return serde_json::json!({"error": "connect"});
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    if sock.write_all(req.as_bytes()).await.is_err() {
        return serde_json::json!({"error": "write"});
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => {
                return serde_json::json!({"error": "no response head", "head": String::from_utf8_lossy(&head)});
            }
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // The key of RFC 6455's example: its accept value is fixed.
    let accepted = head
        .to_ascii_lowercase()
        .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=");
    let mut echoed = false;
    if status == 101 {
        let _ = sock.write_all(b"ping through the mesh").await;
        let mut buf = vec![0u8; 21];
        echoed = tokio::time::timeout(Duration::from_secs(5), sock.read_exact(&mut buf))
            .await
            .is_ok_and(|r| r.is_ok())
            && buf == b"ping through the mesh";
    }
    serde_json::json!({"status": status, "accepted": accepted, "echoed": echoed})
}

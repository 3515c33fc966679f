//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` streams (`:authority` = destination `ip:port`) over
//! mutual TLS between node proxies, the wire format of Istio ambient's ztunnel.
//!
//! The client side presents the source workload's SVID and requires the destination workload's
//! SPIFFE ID from the server (`signet_ca::verify`); connections are pooled per (source
//! identity, destination identity, destination node) with a cap on concurrent streams each.
//! The server side hands every stream, with the authenticated peer identity, to an
//! [`Inbound`] that authorises it, opens the connection to the workload and gives back what runs
//! the accepted tunnel ([`Admission::Accept`]).
//!
//! What this module does not decide: which identities talk (policy) and which sockets to open
//! (the proxy around it).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use rustls_pki_types::ServerName;
use signet_ca::SpiffeId;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Bytes read from a socket at once; each read becomes one or a few DATA frames.
const CHUNK: usize = 64 * 1024;
/// Largest DATA frame either side accepts: fewer frames (and wake-ups) per byte than the
/// 16 KiB default; TLS still cuts records at 16 KiB.
const MAX_FRAME: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {node}: {source} (is the agent running on that node?)")]
    Connect {
        node: SocketAddr,
        source: std::io::Error,
    },
    #[error("mTLS handshake with {node} failed: {source}")]
    Tls {
        node: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP/2 with {node}: {source}")]
    H2 { node: SocketAddr, source: h2::Error },
    #[error("{node} refused CONNECT {authority}: HTTP {status}")]
    Refused {
        node: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    #[error("tunnel I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Counts a tunnel's bytes as they move, for the metrics and for the idle timeout.
#[derive(Debug, Default)]
pub struct Meter {
    /// Bytes read from the socket side and sent into the HTTP/2 stream.
    pub to_h2: AtomicU64,
    /// Bytes received from the HTTP/2 stream and written to the socket side.
    pub from_h2: AtomicU64,
    /// Where else the bytes are counted (the flow's metrics, which the transport does not
    /// know), and whether the socket side is the source (outbound) or the destination (inbound).
    pub flow: Option<(Arc<dyn ByteCounter>, bool)>,
}

/// Something that counts a flow's bytes by direction.
pub trait ByteCounter: Send + Sync + std::fmt::Debug {
    /// `n` bytes moved from the source towards the destination (`forward`) or back.
    fn add(&self, forward: bool, n: u64);
}

impl Meter {
    /// A meter adding to `flow` too; `socket_is_source` for the outbound side.
    pub fn for_flow(flow: Arc<dyn ByteCounter>, socket_is_source: bool) -> Self {
        Self {
            flow: Some((flow, socket_is_source)),
            ..Self::default()
        }
    }

    fn add(&self, to_h2: bool, n: usize) {
        let n = n as u64;
        let mine = if to_h2 { &self.to_h2 } else { &self.from_h2 };
        mine.fetch_add(n, Ordering::Relaxed);
        if let Some((flow, socket_is_source)) = &self.flow {
            flow.add(to_h2 == *socket_is_source, n);
        }
    }

    fn total(&self) -> u64 {
        self.to_h2.load(Ordering::Relaxed) + self.from_h2.load(Ordering::Relaxed)
    }
}

/// Moves bytes both ways between `io` and an HTTP/2 stream until both directions are closed,
/// propagating half-close (EOF becomes END_STREAM and back). Fails with `TimedOut` when no byte
/// moved either way for `idle`. Returns bytes (to h2, from h2).
pub async fn pump<S>(
    io: S,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    idle: Duration,
    meter: &Meter,
) -> std::io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let upstream = async {
        let mut total = 0u64;
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_io)?;
                return Ok::<_, std::io::Error>(total);
            }
            // What was read goes out as is (no copy), as fast as the peer's flow-control
            // window allows: that wait is the back-pressure.
            let mut data = buf.split().freeze();
            while !data.is_empty() {
                send.reserve_capacity(data.len());
                let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => return Err(h2_io(e)),
                    None => return Err(std::io::ErrorKind::BrokenPipe.into()),
                };
                let chunk = data.split_to(granted.min(data.len()));
                send.send_data(chunk, false).map_err(h2_io)?;
            }
            meter.add(true, n);
            total += n as u64;
        }
    };
    let downstream = async {
        let mut total = 0u64;
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(h2_io)?;
            wr.write_all(&chunk).await?;
            meter.add(false, chunk.len());
            total += chunk.len() as u64;
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(total)
    };
    let idle_watch = async {
        let mut seen = meter.total();
        loop {
            tokio::time::sleep(idle).await;
            let now = meter.total();
            if now == seen {
                return std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("idle for {idle:?}"),
                );
            }
            seen = now;
        }
    };
    tokio::select! {
        r = async { tokio::try_join!(upstream, downstream) } => r,
        e = idle_watch => Err(e),
    }
}

fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| std::io::ErrorKind::Other.into())
    } else {
        std::io::Error::other(e)
    }
}

/// Who is tunnelling to whom, through which node: the pool key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub source: SpiffeId,
    pub destination: SpiffeId,
    /// The destination node's HBONE address (`<node>:15008`).
    pub node: SocketAddr,
}

struct PooledConn {
    send: h2::client::SendRequest<Bytes>,
    /// Streams open on this connection.
    active: Arc<AtomicUsize>,
    /// Set when the connection task ends (peer closed, error, GOAWAY).
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// The earlier notAfter of the two certificates that authenticated it: no new stream goes
    /// over a connection whose proof of identity has expired (its open streams continue).
    expires: SystemTime,
}

impl PooledConn {
    fn usable(&self, now: SystemTime) -> bool {
        !self.closed.load(Ordering::Acquire) && now < self.expires
    }
}

/// Makes the client TLS configuration for a route (the source's SVID, the destination's ID),
/// with the notAfter of the certificate it presents.
pub type ClientTls =
    Arc<dyn Fn(&Route) -> Option<(Arc<rustls::ClientConfig>, SystemTime)> + Send + Sync>;

/// HBONE client with a connection pool.
#[derive(Clone)]
pub struct HboneClient {
    tls: ClientTls,
    max_streams: usize,
    pool: Arc<Mutex<HashMap<Route, Vec<PooledConn>>>>,
    /// One dial at a time per route: N simultaneous first connections open one HBONE
    /// connection, not N.
    dialing: Arc<Mutex<HashMap<Route, Arc<tokio::sync::Mutex<()>>>>>,
    dials: Arc<AtomicUsize>,
    connect_timeout: Duration,
    keepalive: Keepalive,
    /// The connections' driver tasks start here.
    drain: crate::drain::Drain,
}

/// HTTP/2 PINGs on pooled connections: a peer that stops answering (its node died, a link
/// black-holes) is noticed within `interval + timeout`, and its connection leaves the pool,
/// instead of waiting for TCP to give up (about 15 minutes).
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

impl std::fmt::Debug for HboneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneClient")
            .field("max_streams", &self.max_streams)
            .finish_non_exhaustive()
    }
}

/// One tunnel: the h2 stream halves, and (on the client side) a guard that frees the pool slot
/// when dropped.
#[derive(Debug)]
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    _slot: Option<Slot>,
}

impl Tunnel {
    /// The stream as a byte stream for an HTTP client to speak over (the routed mesh path's
    /// upstream connections): no copy through an in-memory pipe, no task of its own.
    pub fn into_io(self) -> TunnelIo {
        TunnelIo {
            send: self.send,
            recv: self.recv,
            pending: Bytes::new(),
            closed: false,
            _slot: self._slot,
        }
    }
}

/// An HBONE stream read and written as bytes: DATA frames in, DATA frames out (as much as the
/// peer's flow-control window allows: that wait is the back-pressure), END_STREAM on shutdown.
#[derive(Debug)]
pub struct TunnelIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What the last DATA frame held beyond what was read of it.
    pending: Bytes,
    closed: bool,
    _slot: Option<Slot>,
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if self.pending.is_empty() {
            match self.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io(e))),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(data.len());
        match self.send.poll_capacity(cx) {
            Poll::Ready(Some(Ok(granted))) if granted > 0 => {
                let n = granted.min(data.len());
                let chunk = Bytes::copy_from_slice(&data[..n]);
                self.send.send_data(chunk, false).map_err(h2_io)?;
                Poll::Ready(Ok(n))
            }
            // Nothing granted yet: ask again on the next turn rather than sleep unwoken.
            Poll::Ready(Some(Ok(_))) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(h2_io(e))),
            Poll::Ready(None) => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // The connection's task writes frames as they are queued.
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.closed {
            self.closed = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HboneClient {
    /// A pool that opens at most `max_streams` streams per connection and gives a TCP connect
    /// `connect_timeout`.
    pub fn new(
        tls: ClientTls,
        max_streams: usize,
        connect_timeout: Duration,
        drain: crate::drain::Drain,
    ) -> Self {
        Self {
            tls,
            max_streams: max_streams.max(1),
            pool: Arc::default(),
            dialing: Arc::default(),
            dials: Arc::default(),
            connect_timeout,
            keepalive: Keepalive::default(),
            drain,
        }
    }

    /// The same pool with other keepalive settings.
    pub fn with_keepalive(mut self, keepalive: Keepalive) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Connections dialled so far (a pool connection each), for tests and metrics.
    pub fn dials(&self) -> usize {
        self.dials.load(Ordering::Relaxed)
    }

    /// Open HTTP/2 connections in the pool (for tests and metrics).
    pub fn connections(&self) -> usize {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.values()
            .flatten()
            .filter(|c| !c.closed.load(Ordering::Acquire))
            .count()
    }

    /// A stream to `authority` (the destination `ip:port`) over a pooled or new connection.
    pub async fn open(&self, route: &Route, authority: SocketAddr) -> Result<Tunnel, HboneError> {
        let (send_req, active) = match self.pooled(route) {
            Some(c) => c,
            None => self.pooled_or_dial(route).await?,
        };
        let slot = Slot(active);
        let mut send_req = send_req.ready().await.map_err(|source| HboneError::H2 {
            node: route.node,
            source,
        })?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .body(())
            .expect("a socket address is a valid authority");
        let (response, send) =
            send_req
                .send_request(req, false)
                .map_err(|source| HboneError::H2 {
                    node: route.node,
                    source,
                })?;
        let response = response.await.map_err(|source| HboneError::H2 {
            node: route.node,
            source,
        })?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused {
                node: route.node,
                authority,
                status: response.status(),
            });
        }
        Ok(Tunnel {
            send,
            recv: response.into_body(),
            _slot: Some(slot),
        })
    }

    fn pooled(&self, route: &Route) -> Option<(h2::client::SendRequest<Bytes>, Arc<AtomicUsize>)> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.get_mut(route)?;
        // Expired connections leave the pool; the h2 connection itself lives on until its
        // last stream ends and the handle is dropped.
        let now = SystemTime::now();
        conns.retain(|c| c.usable(now));
        for c in conns.iter() {
            let n = c.active.load(Ordering::Acquire);
            if n < self.max_streams
                && c.active
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some((c.send.clone(), c.active.clone()));
            }
        }
        None
    }

    /// Under the route's dial lock: a connection someone else dialled meanwhile, or a new one.
    async fn pooled_or_dial(
        &self,
        route: &Route,
    ) -> Result<(h2::client::SendRequest<Bytes>, Arc<AtomicUsize>), HboneError> {
        let lock = self
            .dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(route.clone())
            .or_default()
            .clone();
        let result = {
            let _turn = lock.lock().await;
            match self.pooled(route) {
                Some(c) => Ok(c),
                None => self.dial(route).await,
            }
        };
        // The last one out removes the route's lock (the map holds one reference, we another).
        let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&lock) == 2 {
            dialing.remove(route);
        }
        result
    }

    async fn dial(
        &self,
        route: &Route,
    ) -> Result<(h2::client::SendRequest<Bytes>, Arc<AtomicUsize>), HboneError> {
        self.dials.fetch_add(1, Ordering::Relaxed);
        let node = route.node;
        let (tls, own_expiry) = (self.tls)(route).ok_or_else(|| HboneError::Tls {
            node,
            source: std::io::Error::other(format!("no certificate for {} yet", route.source)),
        })?;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(node))
            .await
            .map_err(|_| HboneError::Connect {
                node,
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| HboneError::Connect { node, source })?;
        let _ = tcp.set_nodelay(true);
        // The name selects the destination workload's certificate on the server (SNI);
        // verification is by SPIFFE ID, not by this name.
        let name = super::tls::sni_for(&route.destination).unwrap_or_else(|| {
            ServerName::try_from("hbone.signet.invalid").expect("a valid DNS name")
        });
        let tls_stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| HboneError::Tls { node, source })?;
        let peer_expiry = tls_stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(not_after)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .max_frame_size(MAX_FRAME)
            .handshake(super::coalesce::Coalesced::new(tls_stream))
            .await
            .map_err(|source| HboneError::H2 { node, source })?;
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed_by_task = closed.clone();
        let pings = conn.ping_pong();
        let keepalive = self.keepalive;
        let (drain, pool, pooled_route) = (self.drain.clone(), self.pool.clone(), route.clone());
        self.drain.spawn("hbone connection", async move {
            let pinging = keep_alive(pings, keepalive);
            tokio::pin!(conn, pinging);
            let mut draining = false;
            loop {
                tokio::select! {
                    r = &mut conn => {
                        if let Err(e) = r {
                            tracing::debug!(%node, error = %e, "HBONE connection closed");
                        }
                        break;
                    }
                    why = &mut pinging => {
                        // Dropping the connection closes it: its streams fail, and new ones dial.
                        tracing::warn!(%node, "HBONE connection closed: {why}");
                        break;
                    }
                    // The agent stops: no new streams here. With the pool's handles gone the
                    // connection ends once its open streams have (or the drain forces it).
                    () = drain.stopping(), if !draining => {
                        draining = true;
                        pool.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&pooled_route);
                    }
                }
            }
            closed_by_task.store(true, Ordering::Release);
        });
        let active = Arc::new(AtomicUsize::new(1));
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(route.clone())
            .or_default()
            .push(PooledConn {
                send: send.clone(),
                active: active.clone(),
                closed,
                expires: own_expiry.min(peer_expiry),
            });
        Ok((send, active))
    }
}

/// PINGs the peer every `interval` until one goes unanswered for `timeout`; returns why.
async fn keep_alive(pings: Option<h2::PingPong>, keepalive: Keepalive) -> String {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(keepalive.interval).await;
        match tokio::time::timeout(keepalive.timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("PING failed: {e}"),
            Err(_) => {
                return format!(
                    "the peer did not answer a PING within {:?}",
                    keepalive.timeout
                );
            }
        }
    }
}

/// A certificate's notAfter.
pub fn not_after(der: &rustls_pki_types::CertificateDer<'_>) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The inbound decision for one stream.
pub enum Admission {
    /// Answer 200 and hand the tunnel to this, which runs it to its end.
    Accept(TunnelHandler),
    /// Refused with this status (403 for policy, 503 when the workload is unreachable).
    Refuse(StatusCode, String),
}

/// What runs an accepted tunnel: given its stream halves and the drain it runs under.
pub type TunnelHandler =
    Box<dyn FnOnce(Tunnel, crate::drain::Drain) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

impl Admission {
    /// Accepts the stream and runs it with `run`.
    pub fn accept<F, Fut>(run: F) -> Self
    where
        F: FnOnce(Tunnel, crate::drain::Drain) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Admission::Accept(Box::new(move |tunnel, drain| Box::pin(run(tunnel, drain))))
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Admission::Accept(_) => f.write_str("Accept"),
            Admission::Refuse(c, r) => f.debug_tuple("Refuse").field(c).field(r).finish(),
        }
    }
}

pub type AdmitFuture = Pin<Box<dyn Future<Output = Admission> + Send>>;

/// Authorises and connects each inbound stream.
pub type Inbound = Arc<dyn Fn(SpiffeId, SocketAddr) -> AdmitFuture + Send + Sync>;

/// Serves one inbound HBONE connection whose TLS handshake already authenticated `peer`. When
/// `drain` fires the peer gets a GOAWAY: no new streams, and the open ones run to their end.
pub async fn serve_connection<T>(
    io: T,
    peer: SpiffeId,
    inbound: Inbound,
    drain: &crate::drain::Drain,
) -> Result<(), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(1024)
        .handshake(super::coalesce::Coalesced::new(io))
        .await?;
    let mut draining = false;
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            () = drain.stopping(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { break };
        let (req, respond) = next?;
        let (peer, inbound) = (peer.clone(), inbound.clone());
        let stream = handle_stream(req, respond, peer, inbound, drain.clone());
        drain.spawn("hbone stream", stream);
    }
    Ok(())
}

async fn handle_stream(
    req: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SpiffeId,
    inbound: Inbound,
    drain: crate::drain::Drain,
) {
    let reply = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
        let resp = Response::builder()
            .status(status)
            .body(())
            .expect("a status is a valid response");
        respond.send_response(resp, true)
    };
    if req.method() != Method::CONNECT {
        let _ = reply(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        let _ = reply(&mut respond, StatusCode::BAD_REQUEST);
        return;
    };
    match inbound(peer.clone(), target).await {
        Admission::Refuse(status, why) => {
            tracing::debug!(source = %peer, %target, %status, reason = %why, "HBONE stream refused");
            let _ = reply(&mut respond, status);
        }
        Admission::Accept(run) => {
            let resp = Response::builder()
                .status(StatusCode::OK)
                .body(())
                .expect("valid response");
            let send = match respond.send_response(resp, false) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "peer went away before the tunnel opened");
                    return;
                }
            };
            let tunnel = Tunnel {
                send,
                recv: req.into_body(),
                _slot: None,
            };
            run(tunnel, drain).await;
        }
    }
}

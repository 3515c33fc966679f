//! HTTP connections to endpoints, each over its own HBONE stream, pooled node-wide by (source
//! identity, destination, endpoint, protocol): the routed mesh path and the Gateway send their
//! requests here. HTTP/1.1 connections go back to the pool when a response's body has been
//! read; an HTTP/2 connection carries every concurrent request of its key.
//!
//! A request that never reached the endpoint comes back with the error (`Unsent`): a pooled
//! connection the endpoint had just closed, a tunnel that could not be opened, a stream the
//! endpoint refused (`REFUSED_STREAM`). Those are safe to send again whatever the body was;
//! anything else may have been processed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::ProxyContext;
use super::hbone::{HboneError, Route};

/// A request body as sent upstream.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The protocol spoken to the endpoint (the client's: an HTTP/2 client's gRPC must reach the
/// endpoint as HTTP/2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    route: Route,
    target: SocketAddr,
    proto: Proto,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// It never reached the endpoint; the request is handed back when it could be kept.
    #[error("{why}")]
    Unsent {
        why: String,
        request: Option<Box<Request<Body>>>,
        /// The tunnel could not be opened (no connection to the endpoint's node or pod).
        connect: bool,
    },
    /// The endpoint's node refused the tunnel (its ingress policy): not the endpoint's fault,
    /// and not worth another attempt.
    #[error("{0}")]
    Refused(String),
    /// It may have reached the endpoint.
    #[error("{0}")]
    Failed(String),
}

/// Why no tunnel could be had.
enum DialError {
    Refused(String),
    Other(String),
}

impl DialError {
    fn unsent(self, req: Request<Body>) -> SendError {
        match self {
            DialError::Refused(why) => SendError::Refused(why),
            DialError::Other(why) => unsent(why, req, true),
        }
    }
}

/// Marks a response that came over a connection made for it: its latency includes the
/// tunnel's and connection's setup, which says nothing of the endpoint's speed.
#[derive(Debug, Clone, Copy)]
pub struct FreshConnection;

/// At most this many idle HTTP/1.1 connections are kept per key.
const KEEP_IDLE: usize = 32;

/// The node's upstream connections.
#[derive(Clone, Default)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    h1: Mutex<HashMap<Key, Vec<http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<Key, http2::SendRequest<Body>>>,
    /// One HTTP/2 dial at a time per key.
    dialing: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

/// A response body that hands its HTTP/1.1 connection back to the pool once read to the end.
#[allow(missing_debug_implementations)]
pub struct Pooled {
    body: Incoming,
    back: Option<(Upstreams, Key, http1::SendRequest<Body>)>,
}

impl Pooled {
    fn give_back(&mut self) {
        if let Some((pool, key, sender)) = self.back.take()
            && !sender.is_closed()
        {
            let mut idle = pool.inner.h1.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(key).or_default();
            if list.len() < KEEP_IDLE {
                list.push(sender);
            }
        }
    }
}

impl hyper::body::Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            // A broken body means a broken connection: it is not given back.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // Dropped before its end: the connection still has a response in it. Only an empty
        // body's connection is reusable.
        if !self.body.is_end_stream() {
            self.back = None;
        }
        self.give_back();
    }
}

/// Whether `e` (or what caused it) is an HTTP/2 `REFUSED_STREAM`: the peer did not process it.
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

impl Upstreams {
    /// Sends `req` to `target` through a tunnel of `route`, over a pooled connection when one
    /// is free.
    pub async fn send(
        &self,
        ctx: &ProxyContext,
        route: &Route,
        target: SocketAddr,
        proto: Proto,
        req: Request<Body>,
    ) -> Result<Response<Pooled>, SendError> {
        let key = Key {
            route: route.clone(),
            target,
            proto,
        };
        match proto {
            Proto::Http1 => self.send_h1(ctx, key, req).await,
            Proto::Http2 => self.send_h2(ctx, key, req).await,
        }
    }

    async fn send_h1(
        &self,
        ctx: &ProxyContext,
        key: Key,
        mut req: Request<Body>,
    ) -> Result<Response<Pooled>, SendError> {
        // Kept connections first: one the endpoint closed hands the request back untouched.
        while let Some(mut sender) = self.idle_h1(&key) {
            if tokio::time::timeout(Duration::from_millis(100), sender.ready())
                .await
                .map_or(true, |r| r.is_err())
            {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.pooled(resp, key, sender)),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => {
                        return Err(SendError::Failed(format!("{}: {}", key.target, e.error())));
                    }
                },
            }
        }
        let io = match dial(ctx, &key.route, key.target).await {
            Ok(io) => io,
            Err(e) => return Err(e.unsent(req)),
        };
        let (mut sender, conn) = match http1::handshake(io).await {
            Ok(x) => x,
            Err(e) => return Err(unsent(format!("{}: {e}", key.target), req, true)),
        };
        ctx.drain.spawn("upstream http/1.1", async move {
            let _ = conn.with_upgrades().await;
        });
        match sender.try_send_request(req).await {
            Ok(mut resp) => {
                resp.extensions_mut().insert(FreshConnection);
                Ok(self.pooled(resp, key, sender))
            }
            Err(mut e) => {
                let why = format!("{}: {}", key.target, e.error());
                match e.take_message() {
                    Some(back) => Err(unsent(why, back, false)),
                    None => Err(SendError::Failed(why)),
                }
            }
        }
    }

    fn idle_h1(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.inner.h1.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        list.retain(|s| !s.is_closed());
        list.pop()
    }

    fn pooled(
        &self,
        resp: Response<Incoming>,
        key: Key,
        sender: http1::SendRequest<Body>,
    ) -> Response<Pooled> {
        // A switched connection is the client's now, and one that says so closes.
        let closing = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
            || resp
                .headers()
                .get(http::header::CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let back = (!closing).then(|| (self.clone(), key, sender));
        resp.map(|body| Pooled { body, back })
    }

    async fn send_h2(
        &self,
        ctx: &ProxyContext,
        key: Key,
        req: Request<Body>,
    ) -> Result<Response<Pooled>, SendError> {
        let (mut sender, fresh) = match self.h2_sender(ctx, &key).await {
            Ok(s) => s,
            Err(e) => return Err(e.unsent(req)),
        };
        match sender.try_send_request(req).await {
            Ok(mut resp) => {
                if fresh {
                    resp.extensions_mut().insert(FreshConnection);
                }
                Ok(resp.map(|body| Pooled { body, back: None }))
            }
            Err(mut e) => {
                let why = format!("{}: {}", key.target, e.error());
                let refused = refused_stream(e.error());
                match e.take_message() {
                    Some(back) => Err(unsent(why, back, false)),
                    None if refused => Err(SendError::Unsent {
                        why,
                        request: None,
                        connect: false,
                    }),
                    None => Err(SendError::Failed(why)),
                }
            }
        }
    }

    async fn h2_sender(
        &self,
        ctx: &ProxyContext,
        key: &Key,
    ) -> Result<(http2::SendRequest<Body>, bool), DialError> {
        let current = |inner: &Inner| {
            let pool = inner.h2.lock().unwrap_or_else(|p| p.into_inner());
            pool.get(key).filter(|s| !s.is_closed()).cloned()
        };
        if let Some(s) = current(&self.inner) {
            return Ok((s, false));
        }
        let lock = {
            let mut dialing = self.inner.dialing.lock().unwrap_or_else(|p| p.into_inner());
            dialing.entry(key.clone()).or_default().clone()
        };
        let _one = lock.lock().await;
        if let Some(s) = current(&self.inner) {
            return Ok((s, false));
        }
        let io = dial(ctx, &key.route, key.target).await?;
        let mut builder = http2::Builder::new(ctx.drain.clone());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(ctx.limits.idle / 2)
            .keep_alive_timeout(Duration::from_secs(20));
        let (sender, conn) = builder
            .handshake(io)
            .await
            .map_err(|e| DialError::Other(format!("{}: HTTP/2 handshake: {e}", key.target)))?;
        ctx.drain.spawn("upstream http/2", async move {
            let _ = conn.await;
        });
        self.inner
            .h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), sender.clone());
        Ok((sender, true))
    }
}

fn unsent(why: String, req: Request<Body>, connect: bool) -> SendError {
    SendError::Unsent {
        why,
        request: Some(Box::new(req)),
        connect,
    }
}

/// A byte stream to `target` through a new HBONE tunnel of `route`. An idle one is closed by the
/// endpoint's node (its tunnel idle timeout); the pool then drops it.
async fn dial(
    ctx: &ProxyContext,
    route: &Route,
    target: SocketAddr,
) -> Result<TokioIo<super::hbone::TunnelIo>, DialError> {
    let tunnel = tokio::time::timeout(ctx.limits.handshake, ctx.hbone.open(route, target))
        .await
        .map_err(|_| DialError::Other(format!("opening a tunnel to {target} timed out")))?
        .map_err(|e| match e {
            HboneError::Refused { status, .. } if status == http::StatusCode::FORBIDDEN => {
                DialError::Refused(e.to_string())
            }
            e => DialError::Other(e.to_string()),
        })?;
    Ok(TokioIo::new(tunnel.into_io()))
}

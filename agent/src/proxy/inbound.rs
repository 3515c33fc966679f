//! Inbound (15008): terminates mTLS (TLS 1.3, client certificate required, SPIFFE ID checked),
//! takes the peer's SPIFFE ID as the source identity, checks the destination workload's
//! ingress policy, and connects to the workload with the proxy's mark so tc lets it through.
//!
//! On ports with `http` rules every request is inspected (`l7`) and refused with 403 unless a
//! rule matches.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use signet_ca::SpiffeId;
use signet_ca::verify::peer_spiffe_id;
use signet_policy::compile::Action;
use signet_policy::eval::Direction;
use signet_policy::resource::Protocol;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::ProxyContext;
use super::hbone::{Admission, Inbound, serve_connection};
use super::l7::RequestCheck;
use super::tls::id_from_sni;

pub async fn serve(
    listener: TcpListener,
    ctx: ProxyContext,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let tls = match super::tls::server_config(
        ctx.certs.clone(),
        ctx.roots.clone(),
        ctx.trust_domain.clone(),
    ) {
        Ok(c) => tokio_rustls::TlsAcceptor::from(c),
        Err(e) => {
            tracing::error!(error = %e, "inbound TLS configuration failed; not serving");
            return;
        }
    };
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    continue;
                }
            },
        };
        let (tls, ctx) = (tls.clone(), ctx.clone());
        let span = tracing::info_span!("inbound", %peer);
        tracker.spawn(
            async move {
                let handshake =
                    tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return tracing::info!(error = %e, "mTLS handshake failed"),
                    Err(_) => return tracing::info!("mTLS handshake timed out"),
                };
                let (_, conn) = stream.get_ref();
                let Ok(source) = peer_spiffe_id(conn.peer_certificates()) else {
                    return tracing::info!("peer presented no SVID");
                };
                let Some(served) = conn
                    .server_name()
                    .and_then(|n| id_from_sni(n, &ctx.trust_domain))
                else {
                    return tracing::info!(%source, "no destination workload named in SNI");
                };
                let inbound = admission(ctx, served);
                if let Err(e) = serve_connection(stream, source, inbound).await {
                    tracing::debug!(error = %e, "HBONE connection ended");
                }
            }
            .instrument(span),
        );
    }
}

/// The per-stream decision for a connection that presented `served`'s certificate.
fn admission(ctx: ProxyContext, served: SpiffeId) -> Inbound {
    Arc::new(move |source: SpiffeId, target: SocketAddr| {
        let (ctx, served) = (ctx.clone(), served.clone());
        Box::pin(async move {
            let snap = ctx.snapshot();
            let Some(ep) = snap.local_by_ip(target.ip()) else {
                return Admission::Refuse(
                    StatusCode::NOT_FOUND,
                    format!("{target} is not a pod of this node"),
                );
            };
            let dst = &snap.workload(ep.workload).identity;
            if *dst != served {
                return Admission::Refuse(
                    StatusCode::FORBIDDEN,
                    format!("{target} is {dst}, but the connection was made to {served}"),
                );
            }
            let number = snap
                .identities
                .get(&source)
                .copied()
                .unwrap_or(signet_policy::identity::WORLD);
            let decision = snap.compiled.lookup(
                ep.id,
                Direction::Ingress,
                number,
                target.port(),
                Protocol::Tcp,
            );
            let rule = decision
                .and_then(|(_, e)| snap.compiled.rule(e.rule))
                .map_or("default".to_owned(), ToString::to_string);
            match decision.map(|(_, e)| e.action) {
                Some(Action::Deny) => {
                    tracing::info!(%source, destination = %dst, %target, %rule, verdict = "deny", "flow");
                    return Admission::Refuse(StatusCode::FORBIDDEN, format!("denied by {rule}"));
                }
                Some(Action::L7) => {
                    let check = l7_check(&snap, decision.map(|(k, _)| k));
                    drop(snap);
                    return match connect_marked(target, ctx.proxy_mark).await {
                        Ok(s) => Admission::AcceptHttp(s, check),
                        Err(e) => Admission::Refuse(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("{target}: {e}"),
                        ),
                    };
                }
                Some(Action::Audit) => {
                    tracing::info!(%source, destination = %dst, %target, %rule, verdict = "audit", "flow")
                }
                _ => {}
            }
            drop(snap);
            match connect_marked(target, ctx.proxy_mark).await {
                Ok(s) => Admission::Accept(s),
                Err(e) => {
                    Admission::Refuse(StatusCode::SERVICE_UNAVAILABLE, format!("{target}: {e}"))
                }
            }
        })
    })
}

/// The per-request check for an L7 entry: the `http` rules of the allow rules the compiler
/// listed for this (endpoint, peer, port).
fn l7_check(
    snap: &Arc<crate::state::snapshot::Snapshot>,
    key: Option<signet_policy::compile::Key>,
) -> RequestCheck {
    // Resolved once per stream, so a request costs only the matching itself.
    let policies: Vec<&signet_policy::model::Policy> =
        snap.state.policies.iter().map(|l| &l.policy).collect();
    let rules: Vec<(String, Vec<signet_policy::model::HttpMatch>)> = key
        .and_then(|k| snap.compiled.l7.get(&k))
        .into_iter()
        .flatten()
        .filter_map(|id| snap.compiled.rule(*id))
        .filter_map(|r| {
            Some((
                r.to_string(),
                signet_policy::eval::http_rules(&policies, r)?.to_vec(),
            ))
        })
        .collect();
    let names = rules
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    Arc::new(move |req| {
        rules
            .iter()
            .find(|(_, http)| http.iter().any(|h| h.matches(req)))
            .map(|(name, _)| name.clone())
            .ok_or_else(|| format!("no `http` rule of {names} matches"))
    })
}

/// Connects to a workload with `SO_MARK`, so the tc program knows the proxy authorised it.
async fn connect_marked(target: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_mark(mark)?;
    sock.set_nonblocking(true)?;
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    let stream = tokio::time::timeout(std::time::Duration::from_secs(5), sock.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

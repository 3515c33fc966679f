//! Inbound (15008): terminates mTLS (TLS 1.3, client certificate required, SPIFFE ID checked),
//! takes the peer's SPIFFE ID as the source identity, checks the destination workload's
//! ingress policy, and connects to the workload with the proxy's mark so tc lets it through.
//!
//! On ports with `http` rules every request is inspected (`l7`) and refused with 403 unless a
//! rule matches.

use std::net::SocketAddr;
use std::sync::Arc;

use signet_ca::SpiffeId;
use signet_ca::verify::peer_spiffe_id;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use super::conns::{Tracked, Verdict, decide};
use super::hbone::{Accepted, Admission, Inbound, serve_connection};
use super::l7::{L7Flow, check_for};
use super::refusal::Refusal;
use super::tls::id_from_sni;
use super::{FlowRecord, ProxyContext, refuse, refuse_unidentified};

/// Whether the peer's certificate still proves its identity at `now`. A resumed TLS session
/// carries the certificate of the handshake it resumes, which nothing verifies again: one past
/// its notAfter proves nothing any more, whatever the session says.
pub fn peer_certificate_current(
    conn: &rustls::ServerConnection,
    now: std::time::SystemTime,
) -> bool {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(super::hbone::not_after)
        .is_some_and(|t| t > now)
}
use crate::admin::metrics::UNKNOWN;
use crate::flow::Reporter;

/// Accepts until the drain stops; each connection runs in its own task.
pub async fn serve(listener: TcpListener, ctx: ProxyContext) {
    let stop = ctx.drain.stop_token();
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
        let Some((tcp, peer)) = super::accept_next(&listener, &stop, "inbound").await else {
            return;
        };
        let Ok(slot) = ctx.limits.inbound_slots.clone().try_acquire_owned() else {
            let why = Refusal::ConnectionLimit;
            refuse_unidentified(&ctx.metrics, Reporter::Inbound, peer, &why);
            continue;
        };
        // Small HBONE frames (a CONNECT's 200, a one-byte reply) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let (tls, ctx) = (tls.clone(), ctx.clone());
        let span = tracing::info_span!("inbound", %peer);
        let drain = ctx.drain.clone();
        drain.spawn(
            "inbound connection",
            async move {
                let _slot = slot;
                let handshake = tokio::time::timeout(ctx.limits.handshake, tls.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        ctx.metrics.handshake_failed(Reporter::Inbound, "tls_error");
                        return tracing::info!(error = %e, "mTLS handshake failed");
                    }
                    Err(_) => {
                        ctx.metrics.handshake_failed(Reporter::Inbound, "timeout");
                        return tracing::info!("mTLS handshake timed out");
                    }
                };
                let (_, conn) = stream.get_ref();
                let Ok(source) = peer_spiffe_id(conn.peer_certificates()) else {
                    ctx.metrics
                        .handshake_failed(Reporter::Inbound, "no_client_certificate");
                    return tracing::info!("peer presented no SVID");
                };
                if !peer_certificate_current(conn, std::time::SystemTime::now()) {
                    ctx.metrics
                        .handshake_failed(Reporter::Inbound, "expired_certificate");
                    return tracing::info!(%source, "peer's SVID has expired (resumed session)");
                }
                let Some(served) = conn
                    .server_name()
                    .and_then(|n| id_from_sni(n, &ctx.trust_domain))
                else {
                    ctx.metrics.handshake_failed(Reporter::Inbound, "no_sni");
                    return tracing::info!(%source, "no destination workload named in SNI");
                };
                let drain = ctx.drain.clone();
                let inbound = admission(ctx, served);
                if let Err(e) = serve_connection(stream, source, inbound, &drain).await {
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
            let src = source.to_string();
            // Refusals are counted, logged as a flow and answered on the stream with a status.
            let deny = |destination: &str, why: Refusal| {
                refuse(
                    &ctx.metrics,
                    Reporter::Inbound,
                    &src,
                    destination,
                    target,
                    &why,
                );
                Admission::Refuse(why.status(), why.to_string())
            };
            let Some(ep) = snap.local_by_ip(target.ip()) else {
                return deny(UNKNOWN, Refusal::NotLocal(target));
            };
            let dst = snap.workload(ep.workload).identity.clone();
            if dst != served {
                let why = Refusal::WrongDestination {
                    target,
                    is: dst.clone(),
                    served,
                };
                return deny(dst.as_str(), why);
            }
            let decision = decide(
                &snap,
                Reporter::Inbound,
                target.ip(),
                &source,
                target.port(),
            );
            let generation = snap.generation;
            drop(snap);
            if decision.verdict == Verdict::Deny {
                let why = Refusal::Policy {
                    rule: decision.rule.clone(),
                };
                return deny(dst.as_str(), why);
            }
            let tcp = match connect_marked(target, ctx.proxy_mark, ctx.limits.connect).await {
                Ok(s) => s,
                Err(error) => {
                    let why = Refusal::WorkloadUnreachable { target, error };
                    return deny(dst.as_str(), why);
                }
            };
            let l7 = match &decision.verdict {
                Verdict::L7(rules) => Some(L7Flow {
                    check: check_for(rules.clone()),
                    paths: super::l7::normalization_for(rules),
                    source: src.clone(),
                    destination: dst.to_string(),
                    metrics: Some(ctx.metrics.clone()),
                }),
                _ => None,
            };
            let registration = ctx.conns.register(Tracked {
                generation,
                reporter: Reporter::Inbound,
                local: target.ip(),
                peer: source,
                port: target.port(),
                verdict: decision.verdict.clone(),
                source: src.clone(),
                destination: dst.to_string(),
            });
            let record = FlowRecord::open(
                &ctx.metrics,
                Reporter::Inbound,
                src,
                dst.to_string(),
                target,
                &decision,
            );
            Admission::Accept(Box::new(Accepted {
                tcp,
                l7,
                registration: Some(registration),
                record,
                idle: ctx.limits.idle,
            }))
        })
    })
}

/// Connects to a workload with `SO_MARK`, so the tc program knows the proxy authorised it.
async fn connect_marked(
    target: SocketAddr,
    mark: u32,
    within: std::time::Duration,
) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_mark(mark)?;
    sock.set_nonblocking(true)?;
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    let stream = tokio::time::timeout(within, sock.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

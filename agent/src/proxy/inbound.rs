//! Inbound (15008): terminates mTLS (TLS 1.3, client certificate required, SPIFFE ID checked),
//! takes the peer's SPIFFE ID as the source identity, checks the destination workload's
//! ingress policy, and connects to the workload with the proxy's mark so tc lets it through.
//!
//! On ports with `http` rules every request is inspected (`l7`) and refused with 403 unless a
//! rule matches. HBONE only answers the CONNECT: an admitted stream ([`Admitted`]) is run here,
//! registered for policy changes and recorded as a flow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use signet_ca::SpiffeId;
use signet_ca::verify::peer_spiffe_id;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use super::conns::{Registration, Tracked};
use super::hbone::{Admission, Inbound, Tunnel, pump, serve_connection};
use super::l7::L7Flow;
use super::refusal::Refusal;
use super::tls::id_from_sni;
use super::{FlowRecord, ProxyContext, refuse, refuse_unidentified};
use crate::admin::metrics::UNKNOWN;
use crate::flow::Reporter;
use crate::policy::decide::{Verdict, decide};
use crate::policy::request::{check_for, normalization_for};

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
        let Some((tcp, peer)) = crate::net::accept_next(&listener, &stop, "inbound").await else {
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
                let now = ctx.snapshot();
                let peers = (
                    super::peer(&now, &src, None),
                    super::peer(&now, destination, Some(target)),
                );
                refuse(&ctx.metrics, Reporter::Inbound, peers, target, &why);
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
            let tcp = match crate::net::connect_marked(target, ctx.proxy_mark, ctx.limits.connect)
                .await
            {
                Ok(s) => s,
                Err(error) => {
                    let why = Refusal::WorkloadUnreachable { target, error };
                    return deny(dst.as_str(), why);
                }
            };
            let l7 = match &decision.verdict {
                Verdict::L7(rules) => Some(L7Flow {
                    check: check_for(rules.clone()),
                    paths: normalization_for(rules),
                    source: src.clone(),
                    destination: dst.to_string(),
                    metrics: Some(ctx.metrics.clone()),
                    peers: {
                        let now = ctx.snapshot();
                        (
                            super::peer(&now, &src, None),
                            super::peer(&now, dst.as_str(), Some(target)),
                        )
                    },
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
            )
            .described(&ctx.snapshot(), None);
            Admitted {
                tcp,
                l7,
                registration: Some(registration),
                record,
                idle: ctx.limits.idle,
            }
            .admission()
        })
    })
}

/// An admitted stream: the connection to the workload and what to enforce on it. HBONE answers
/// the CONNECT and hands the tunnel over; what happens to its bytes is decided here.
#[derive(Debug)]
pub struct Admitted {
    pub tcp: TcpStream,
    /// When set, every HTTP request must pass this check before it reaches the workload.
    pub l7: Option<L7Flow>,
    /// Closes the stream when a policy change no longer allows it.
    pub registration: Option<Registration>,
    /// Counted and logged as one flow when it ends.
    pub record: FlowRecord,
    pub idle: Duration,
}

impl Admitted {
    /// A plain TCP stream with nothing but an idle timeout.
    pub fn tcp(tcp: TcpStream, record: FlowRecord, idle: Duration) -> Self {
        Self {
            tcp,
            l7: None,
            registration: None,
            record,
            idle,
        }
    }

    /// HBONE's answer for this stream: 200, then [`Admitted::run`].
    pub fn admission(self) -> Admission {
        Admission::accept(move |tunnel, drain| self.run(tunnel, drain))
    }

    /// Runs the tunnel until it ends, idles out, or policy closes it.
    async fn run(self, tunnel: Tunnel, drain: crate::drain::Drain) {
        let Admitted {
            mut tcp,
            l7,
            registration,
            record,
            idle,
        } = self;
        let Tunnel { send, recv, .. } = tunnel;
        let meter = record.meter();
        let closed = async {
            match &registration {
                Some(r) => r.closed().await,
                None => std::future::pending().await,
            }
        };
        match l7 {
            None => {
                tokio::select! {
                    r = pump(&mut tcp, send, recv, idle, &meter) => record.finish(&meter, r.err().as_ref()),
                    () = closed => {
                        // Reset rather than finish: the workload must not take a truncated
                        // exchange for a complete one.
                        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                        record.finish_closed_by_policy(&meter);
                    }
                }
            }
            Some(flow) => {
                // The tunnel's bytes go through a local pipe into the HTTP server that checks them.
                let (near, far) = tokio::io::duplex(64 * 1024);
                let work = async {
                    tokio::join!(
                        pump(near, send, recv, idle, &meter),
                        super::l7::serve(far, tcp, flow, drain)
                    )
                };
                tokio::select! {
                    (r, ()) = work => record.finish(&meter, r.err().as_ref()),
                    () = closed => record.finish_closed_by_policy(&meter),
                }
            }
        }
    }
}

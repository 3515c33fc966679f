//! Outbound (15001): a workload's captured connection, whose original destination the datapath
//! recorded, becomes an HBONE stream to the destination's node, presenting the source
//! workload's SVID. A Service ClusterIP is resolved to one ready endpoint first, and the egress
//! policy is checked against that endpoint's identity. Anything unknown fails closed: the
//! connection is reset, with a log line saying why.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use super::conns::Tracked;
use super::hbone::{HboneError, Route, pump};
use super::refusal::Refusal;
use super::{FlowRecord, ProxyContext, refuse, refuse_unidentified};
use crate::admin::metrics::UNKNOWN;
use crate::datapath::loader::OriginalDestinations;
use crate::flow::Reporter;
use crate::policy::decide::{Verdict, decide};

/// Accepts until the drain stops; each connection runs in its own task.
pub async fn serve(listener: TcpListener, ctx: ProxyContext, orig: Arc<OriginalDestinations>) {
    let stop = ctx.drain.stop_token();
    loop {
        let Some((sock, client)) = crate::net::accept_next(&listener, &stop, "outbound").await
        else {
            return;
        };
        let Ok(slot) = ctx.limits.outbound_slots.clone().try_acquire_owned() else {
            refuse_unidentified(
                &ctx.metrics,
                Reporter::Outbound,
                client,
                &Refusal::ConnectionLimit,
            );
            reset(&sock);
            continue;
        };
        // One pod may not take every slot of its node.
        let Some(share) = ctx.limits.per_pod.try_take(client.ip()) else {
            let cap = ctx.limits.per_pod.cap();
            refuse_unidentified(
                &ctx.metrics,
                Reporter::Outbound,
                client,
                &Refusal::PodShare { cap },
            );
            reset(&sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let (ctx, orig) = (ctx.clone(), orig.clone());
        let span = tracing::info_span!("outbound", %client);
        let drain = ctx.drain.clone();
        drain.spawn(
            "outbound connection",
            async move {
                let _slots = (slot, share);
                handle(sock, client, ctx, &orig).await;
            }
            .instrument(span),
        );
    }
}

/// Closes with RST: the application sees a refused connection, not an empty reply.
fn reset(sock: &TcpStream) {
    let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
}

async fn handle(
    mut sock: TcpStream,
    client: SocketAddr,
    ctx: ProxyContext,
    orig: &OriginalDestinations,
) {
    let Some((asked, _)) = orig.lookup(client) else {
        let why = Refusal::NoOriginalDestination;
        refuse_unidentified(&ctx.metrics, Reporter::Outbound, client, &why);
        return reset(&sock);
    };
    // Refusals are counted, logged as a flow and answered with a reset.
    let deny = |source: &str, destination: &str, target, why: Refusal| {
        let snap = ctx.snapshot();
        let peers = (
            super::peer(&snap, source, Some(client)),
            super::peer(&snap, destination, Some(target)),
        );
        refuse(&ctx.metrics, Reporter::Outbound, peers, target, &why);
        reset(&sock);
    };
    let snap = ctx.snapshot();
    let Some(src_ep) = snap.local_by_ip(client.ip()) else {
        return deny(UNKNOWN, UNKNOWN, asked, Refusal::UnknownSource);
    };
    let src = snap.workload(src_ep.workload).identity.clone();
    // A Service that routes govern for this client is served as HTTP, request by request.
    let routed = snap
        .services
        .backend(asked)
        .and_then(|b| b.service.split_once('/'))
        .and_then(|(ns, name)| snap.gateway.mesh.get(ns, name, asked.port()))
        .is_some_and(|m| {
            m.router_for(&snap.workload(src_ep.workload).namespace)
                .is_some()
        });
    if routed {
        let namespace = snap.workload(src_ep.workload).namespace.clone();
        drop(snap);
        let target = super::mesh::Target::Routed { asked };
        return super::mesh::serve(sock, ctx.clone(), client, target, src, namespace).await;
    }
    let dst_addr = snap.services.pick(asked).unwrap_or(asked);
    if let Some(why) = snap.refused_ips.get(&dst_addr.ip()) {
        let why = Refusal::AddressConflict(why.clone());
        return deny(src.as_str(), UNKNOWN, asked, why);
    }
    let Some(dst_pod) = snap.pod_by_ip(dst_addr.ip()) else {
        return deny(src.as_str(), UNKNOWN, asked, Refusal::NoEndpoint);
    };
    let dst = dst_pod.identity.clone();
    let decision = decide(
        &snap,
        Reporter::Outbound,
        client.ip(),
        &dst,
        dst_addr.port(),
    );
    if decision.verdict == Verdict::Deny {
        let why = Refusal::Policy {
            rule: decision.rule.clone(),
        };
        return deny(src.as_str(), dst.as_str(), dst_addr, why);
    }
    // Egress `http` rules: this node's proxy checks each request before it leaves.
    if let Verdict::L7(_) = decision.verdict {
        let namespace = snap.workload(src_ep.workload).namespace.clone();
        drop(snap);
        let target = super::mesh::Target::Inspected {
            endpoint: dst_addr,
            identity: dst,
        };
        return super::mesh::serve(sock, ctx.clone(), client, target, src, namespace).await;
    }
    let Some(node_ip) = dst_pod.node.as_ref().and_then(|n| snap.nodes.get(n)) else {
        let why = Refusal::UnknownNode {
            node: dst_pod.node.clone(),
        };
        return deny(src.as_str(), dst.as_str(), dst_addr, why);
    };
    let route = Route {
        source: src.clone(),
        destination: dst.clone(),
        node: SocketAddr::new(*node_ip, ctx.inbound_port),
    };
    let generation = snap.generation;
    drop(snap);
    let tunnel = tokio::time::timeout(ctx.limits.handshake, ctx.hbone.open(&route, dst_addr)).await;
    let t = match tunnel {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            if matches!(e, HboneError::Tls { .. }) {
                ctx.metrics
                    .handshake_failed(Reporter::Outbound, "tls_error");
            }
            return deny(
                src.as_str(),
                dst.as_str(),
                dst_addr,
                Refusal::from_tunnel(e),
            );
        }
        Err(_) => {
            ctx.metrics.handshake_failed(Reporter::Outbound, "timeout");
            return deny(src.as_str(), dst.as_str(), dst_addr, Refusal::TunnelTimeout);
        }
    };
    let registration = ctx.conns.register(Tracked {
        generation,
        reporter: Reporter::Outbound,
        local: client.ip(),
        peer: dst.clone(),
        port: dst_addr.port(),
        verdict: decision.verdict.clone(),
        source: src.to_string(),
        destination: dst.to_string(),
    });
    let record = FlowRecord::open(
        &ctx.metrics,
        Reporter::Outbound,
        src.to_string(),
        dst.to_string(),
        dst_addr,
        &decision,
    )
    .described(&ctx.snapshot(), Some(client));
    let meter = record.meter();
    tokio::select! {
        r = pump(&mut sock, t.send, t.recv, ctx.limits.idle, &meter) => record.finish(&meter, r.err().as_ref()),
        () = registration.closed() => {
            reset(&sock);
            record.finish_closed_by_policy(&meter);
        }
    }
}

//! Outbound (15001): a workload's captured connection, whose original destination the datapath
//! recorded, becomes an HBONE stream to the destination's node, presenting the source
//! workload's SVID. A Service ClusterIP is resolved to one ready endpoint first, and the egress
//! policy is checked against that endpoint's identity. Anything unknown fails closed: the
//! connection is reset, with a log line saying why.

use std::net::SocketAddr;
use std::sync::Arc;

use signet_policy::compile::Action;
use signet_policy::eval::Direction;
use signet_policy::resource::Protocol;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::ProxyContext;
use super::hbone::{Route, pump};
use crate::datapath::loader::OriginalDestinations;

/// Accepts until `stop`; each connection runs in its own task on `tracker`.
pub async fn serve(
    listener: TcpListener,
    ctx: ProxyContext,
    orig: Arc<OriginalDestinations>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (sock, client) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let (ctx, orig) = (ctx.clone(), orig.clone());
        let span = tracing::info_span!("outbound", %client);
        tracker.spawn(async move { handle(sock, client, ctx, &orig).await }.instrument(span));
    }
}

async fn handle(
    sock: TcpStream,
    client: SocketAddr,
    ctx: ProxyContext,
    orig: &OriginalDestinations,
) {
    let Some((asked, _)) = orig.lookup(client) else {
        tracing::warn!("refused: no original destination recorded for this connection");
        return;
    };
    let snap = ctx.snapshot();
    let Some(src_ep) = snap.local_by_ip(client.ip()) else {
        tracing::warn!(dst = %asked, "refused: the client is not a pod of this node");
        return;
    };
    let src = snap.workload(src_ep.workload).identity.clone();
    let dst_addr = snap.services.pick(asked).unwrap_or(asked);
    let Some(dst_pod) = snap.pod_by_ip(dst_addr.ip()) else {
        tracing::warn!(dst = %dst_addr, "refused: no pod has this address (or the Service has no ready endpoint)");
        return;
    };
    let dst = dst_pod.identity.clone();
    let dst_number = snap
        .identities
        .get(&dst)
        .copied()
        .unwrap_or(signet_policy::identity::WORLD);
    if let Some((_, e)) = snap.compiled.lookup(
        src_ep.id,
        Direction::Egress,
        dst_number,
        dst_addr.port(),
        Protocol::Tcp,
    ) && e.action == Action::Deny
    {
        let rule = snap
            .compiled
            .rule(e.rule)
            .map_or("default deny".to_owned(), ToString::to_string);
        tracing::info!(source = %src, destination = %dst, dst = %dst_addr, %rule, verdict = "deny", "flow");
        return;
    }
    let Some(node_ip) = dst_pod.node.as_ref().and_then(|n| snap.nodes.get(n)) else {
        tracing::warn!(destination = %dst, "refused: the destination's node has no known address");
        return;
    };
    let route = Route {
        source: src.clone(),
        destination: dst.clone(),
        node: SocketAddr::new(*node_ip, ctx.inbound_port),
    };
    drop(snap);
    match ctx.hbone.open(&route, dst_addr).await {
        Ok(t) => {
            tracing::info!(source = %src, destination = %dst, dst = %dst_addr, verdict = "allow", "flow opened");
            match pump(sock, t.send, t.recv).await {
                Ok((up, down)) => {
                    tracing::info!(source = %src, destination = %dst, up, down, "flow closed")
                }
                Err(e) => tracing::debug!(error = %e, "flow ended with an error"),
            }
        }
        Err(e) => {
            tracing::warn!(source = %src, destination = %dst, error = %e, "refused: tunnel failed")
        }
    }
}

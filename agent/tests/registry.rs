//! The registry of open connections (`proxy::conns`): a policy change closes what it no longer
//! allows and keeps the rest; a connection decided under the old policy that registers while the
//! change is being applied is decided again and closed, not missed; the open counts follow
//! registrations without a scan.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::Snapshots;
use signet_agent::admin::metrics::Metrics;
use signet_agent::flow::Reporter;
use signet_agent::policy::decide::{Verdict, decide};
use signet_agent::proxy::conns::{Connections, Tracked};
use signet_agent::state::snapshot::Snapshot;
use signet_ca::SpiffeId;

const CLUSTER: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: node-a, serviceAccountName: db, containers: [{name: c, image: c}]}
status: {podIP: 10.1.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: web, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: api, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.3}
";

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn allowing(peers: &[&str]) -> String {
    let from: Vec<String> = peers.iter().map(|p| format!("{{identity: {p}}}")).collect();
    format!(
        "{CLUSTER}---
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {{name: db-in, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  ingress: [{{from: [{}], ports: [{{port: 5432}}]}}]
",
        from.join(", ")
    )
}

fn db() -> IpAddr {
    "10.1.0.9".parse().expect("ip")
}

fn tracked(snap: &Snapshot, peer: &str) -> Tracked {
    let peer = SpiffeId::parse(peer).expect("id");
    let decision = decide(snap, Reporter::Inbound, db(), &peer, 5432);
    assert_ne!(
        decision.verdict,
        Verdict::Deny,
        "{peer} is allowed under this snapshot"
    );
    Tracked {
        generation: snap.generation,
        reporter: Reporter::Inbound,
        local: db(),
        peer: peer.clone(),
        port: 5432,
        verdict: decision.verdict,
        source: peer.to_string(),
        destination: "spiffe://cluster.local/ns/shop/sa/db".into(),
    }
}

async fn closes_soon(r: &signet_agent::proxy::conns::Registration) -> bool {
    tokio::time::timeout(Duration::from_millis(100), r.closed())
        .await
        .is_ok()
}

#[tokio::test]
async fn a_policy_change_closes_what_it_no_longer_allows_and_keeps_the_rest() {
    let mut snaps = Snapshots::for_node("node-a");
    let both = Arc::new(snaps.build(&allowing(&[WEB, API]), None));
    let conns = Arc::new(Connections::default());
    let metrics = Metrics::default();
    let web = conns.register(tracked(&both, WEB));
    let api = conns.register(tracked(&both, API));
    assert_eq!(conns.count(Reporter::Inbound), 2);
    assert_eq!(conns.count(Reporter::Outbound), 0);

    let only_web = Arc::new(snaps.build(&allowing(&[WEB]), Some(&both)));
    assert_eq!(conns.recheck(&only_web, &metrics), 1);
    assert!(closes_soon(&api).await, "api is no longer allowed");
    assert!(!closes_soon(&web).await, "web still is");
    drop(api);
    assert_eq!(conns.count(Reporter::Inbound), 1);
    drop(web);
    assert_eq!(conns.count(Reporter::Inbound), 0);
}

#[tokio::test]
async fn a_connection_decided_under_the_old_policy_and_registered_after_the_recheck_is_closed() {
    let mut snaps = Snapshots::for_node("node-a");
    let before = Arc::new(snaps.build(&allowing(&[WEB, API]), None));
    // Decided while `before` was in force...
    let late = tracked(&before, API);
    let fine = tracked(&before, WEB);
    // ...and the change is applied before they register.
    let conns = Arc::new(Connections::default());
    let after = Arc::new(snaps.build(&allowing(&[WEB]), Some(&before)));
    assert_eq!(
        conns.recheck(&after, &Metrics::default()),
        0,
        "nothing open yet"
    );
    let late = conns.register(late);
    let fine = conns.register(fine);
    assert!(
        closes_soon(&late).await,
        "decided again under the new policy"
    );
    assert!(
        !closes_soon(&fine).await,
        "still allowed under the new policy"
    );
}

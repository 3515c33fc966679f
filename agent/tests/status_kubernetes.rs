//! `signet status --kubernetes`: the CA and the agents found through the API (against the fake
//! API server: real REST paths and objects), asked on their pods' addresses and the ports their
//! containers name `admin`. The CA is a real `signet-ca` server with its admin port; node-a's
//! agent is the agent's own admin server; node-b's agent is down. An RBAC refusal is named.

use std::sync::Arc;
use std::time::Duration;

use signet_agent::admin::status::{AgentStatus, DatapathStatus, Level, MapFill};
use signet_agent::admin::{AdminState, serve};
use signet_agent::cli::status::{discover, render, wait_with};
use signet_agent::drain::Drain;
use signet_ca::server::CaServer;
use signet_ca::server::config::ServerConfig;
use signet_test_support::api::FakeApi;

fn agent_pod(node: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: signet-agent-{node}, namespace: signet-system, labels: {{app.kubernetes.io/name: signet-agent}}}}\n\
         spec: {{nodeName: {node}, hostNetwork: true, containers: [{{name: signet-agent, image: signet, ports: [{{name: admin, containerPort: {port}}}]}}]}}\n\
         status: {{podIP: 127.0.0.1}}\n---\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_and_agents_are_found_through_the_api_and_asked_where_they_run() {
    // The CA: a real server with an admin port.
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(dir.path().join("cluster")).expect("mkdir");
    let yaml = "trustDomain: cluster.local\nlisten: 127.0.0.1:0\nadmin: 127.0.0.1:0\nstateDir: ca\n\
                clusterStateDir: cluster\nnodes: []\n";
    let config =
        ServerConfig::from_yaml(yaml, &dir.path().join("ca.yaml"), dir.path()).expect("config");
    let ca = CaServer::bind(config).await.expect("bind");
    let ca_admin = ca.admin_addr().expect("admin");
    let drain = Drain::new();
    let stop = drain.stop_token();
    drain.spawn("ca", async move {
        let _ = ca.run(stop).await;
    });

    // node-a's agent answers; node-b's port has nothing behind it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a_port = listener.local_addr().expect("addr").port();
    let state = AdminState {
        metrics: Arc::default(),
        gauges: Arc::new(Default::default),
        readiness: Arc::new(|| Ok(())),
        debug: Arc::new(Default::default),
        status: Arc::new(|| AgentStatus {
            node: "node-a".into(),
            version: "0.1.0".into(),
            ready: true,
            mtls_mode: "strict".into(),
            datapath: DatapathStatus {
                programs: vec!["signet_connect4".into()],
                maps: vec![MapFill {
                    name: "signet_policy".into(),
                    entries: 12,
                    capacity: 65536,
                }],
                ..Default::default()
            },
            ..Default::default()
        }),
    };
    drain.spawn(
        "admin",
        serve(listener, state, Duration::from_secs(5), drain.clone()),
    );
    let b_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };

    let api = FakeApi::from_yaml(&format!(
        "{}{}apiVersion: v1\nkind: Pod\nmetadata: {{name: signet-ca-0, namespace: signet-system, labels: {{app.kubernetes.io/name: signet-ca}}}}\n\
         spec: {{containers: [{{name: signet-ca, image: signet, ports: [{{name: admin, containerPort: {}}}]}}]}}\n\
         status: {{podIP: 127.0.0.1, conditions: [{{type: Ready, status: 'True'}}]}}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: signet-ca, namespace: signet-system}}\n\
         spec: {{replicas: 2, selector: {{matchLabels: {{app.kubernetes.io/name: signet-ca}}}}, template: {{metadata: {{labels: {{app.kubernetes.io/name: signet-ca}}}}, spec: {{containers: [{{name: c, image: c}}]}}}}}}\n\
         status: {{replicas: 2, readyReplicas: 1}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: unrelated, namespace: signet-system, labels: {{app: other}}}}\nspec: {{containers: [{{name: c, image: c}}]}}\n",
        agent_pod("node-b", b_port),
        agent_pod("node-a", a_port),
        ca_admin.port()
    ));
    let client = api.client();
    let topology = discover(&client, "signet-system").await.expect("found");

    let report = tokio::task::spawn_blocking(move || {
        wait_with(|| Ok(topology.clone()), Duration::ZERO, |_| {})
    })
    .await
    .expect("joined")
    .expect("a report");
    let screen = render(&report, std::time::SystemTime::now());
    let nodes: Vec<&str> = report.agents.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes, ["node-a", "node-b"], "{screen}");
    assert_eq!(report.agents[0].health.level, Level::Ok, "{screen}");
    assert_eq!(report.agents[1].health.level, Level::Error, "{screen}");
    assert!(
        report.agents[1].health.reasons[0].contains(&format!("127.0.0.1:{b_port}"))
            && report.agents[1].health.reasons[0].contains("running on node-b"),
        "{screen}"
    );
    let ca = report.ca.as_ref().expect("the CA was found");
    assert_eq!(ca.replicas, Some((1, 2)));
    assert_eq!(ca.health.level, Level::Degraded, "{screen}");
    assert_eq!(ca.health.reasons, ["1 of 2 CA replicas ready"], "{screen}");
    assert!(screen.contains("replicas       1/2 ready"), "{screen}");
    assert_eq!(report.level, Level::Error);

    // Without the right to list pods, the refusal is named.
    api.forbid("list", "pods");
    let err = discover(&client, "signet-system")
        .await
        .expect_err("forbidden");
    assert!(
        err.contains("listing the signet-agent pods in signet-system"),
        "{err}"
    );
    drain.shutdown(Duration::from_millis(100)).await;
}

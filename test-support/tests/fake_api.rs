//! The fake API server behaves as the real one where Signet's code depends on it, seen through
//! kube-rs's own typed client: optimistic concurrency, the status subresource, generation,
//! delete preconditions and finalizers, watches that resume from a resourceVersion, refusals.

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{
    Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions, WatchEvent, WatchParams,
};
use serde_json::json;
use signet_test_support::api::FakeApi;

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "ns"}, "data": {"k": value}}))
    .expect("configmap")
}

fn code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn writes_are_optimistic_and_deletes_honour_preconditions_and_finalizers() {
    let api = FakeApi::default();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "ns");
    let created = cms
        .create(&PostParams::default(), &config_map("a", "1"))
        .await
        .expect("create");
    let again = cms
        .create(&PostParams::default(), &config_map("a", "2"))
        .await;
    assert_eq!(code(again.expect_err("exists")), 409);
    // An update over the version read succeeds once; the second writer of that version loses.
    let mut first = created.clone();
    first.data = Some([("k".into(), "first".into())].into());
    cms.replace("a", &PostParams::default(), &first)
        .await
        .expect("first writer");
    let stale = cms.replace("a", &PostParams::default(), &created).await;
    assert_eq!(code(stale.expect_err("stale")), 409);
    let wrong_uid = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("someone-else".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    assert_eq!(
        code(cms.delete("a", &wrong_uid).await.expect_err("uid")),
        409
    );
    // With a finalizer the object stays, terminating, until the finalizer goes.
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["x"]}})),
    )
    .await
    .expect("finalizer");
    cms.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    let terminating = cms.get("a").await.expect("still there");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("finalizer removed");
    assert_eq!(code(cms.get("a").await.expect_err("gone")), 404);
}

#[tokio::test]
async fn status_is_written_only_through_its_subresource_and_spec_changes_bump_generation() {
    let api = FakeApi::default();
    let pods: Api<Pod> = Api::namespaced(api.client(), "ns");
    let pod: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]},
        "status": {"phase": "Running"}}))
    .expect("pod");
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create");
    assert!(created.status.is_none(), "a create sets no status");
    assert_eq!(created.metadata.generation, Some(1));
    let merge = |v| Patch::Merge(v);
    let p = pods
        .patch(
            "p",
            &PatchParams::default(),
            &merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .expect("patch");
    assert!(p.status.is_none(), "the object's patch leaves status alone");
    let p = pods
        .patch_status(
            "p",
            &PatchParams::default(),
            &merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .expect("status");
    assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Running"));
    assert_eq!(p.metadata.generation, Some(1), "status leaves generation");
    let p = pods
        .patch(
            "p",
            &PatchParams::default(),
            &merge(json!({"spec": {"hostname": "h"}})),
        )
        .await
        .expect("spec");
    assert_eq!(p.metadata.generation, Some(2));
}

#[tokio::test]
async fn a_watch_resumes_from_the_version_it_names() {
    let api = FakeApi::default();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "ns");
    let listed = cms.list(&Default::default()).await.expect("list");
    let from = listed.metadata.resource_version.expect("version");
    // Changes made between the list and the watch are not lost.
    api.put(serde_json::to_value(config_map("b", "1")).expect("json"));
    api.delete("v1", "ConfigMap", "ns", "b");
    let mut events = cms
        .watch(&WatchParams::default(), &from)
        .await
        .expect("watch")
        .boxed();
    let added = events.try_next().await.expect("event").expect("one");
    assert!(matches!(added, WatchEvent::Added(ref o) if o.metadata.name.as_deref() == Some("b")));
    let deleted = events.try_next().await.expect("event").expect("two");
    assert!(matches!(deleted, WatchEvent::Deleted(_)), "{deleted:?}");
    // And later ones arrive as they happen.
    api.put(serde_json::to_value(config_map("c", "1")).expect("json"));
    let later = events.next().await.expect("three").expect("event");
    assert!(matches!(later, WatchEvent::Added(ref o) if o.metadata.name.as_deref() == Some("c")));
}

#[tokio::test]
async fn refusals_are_shaped_as_rbac_sends_them() {
    let api = FakeApi::default();
    api.forbid("create", "configmaps");
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "ns");
    let refused = cms
        .create(&PostParams::default(), &config_map("a", "1"))
        .await
        .expect_err("forbidden");
    match refused {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
            assert!(
                s.message.contains("cannot create resource \"configmaps\""),
                "{}",
                s.message
            );
        }
        other => panic!("{other}"),
    }
    assert!(
        cms.list(&Default::default()).await.is_ok(),
        "list is allowed"
    );
    assert!(api.objects("ConfigMap").is_empty(), "nothing was written");
}

/// What the test plays of a kubelet here: port-forward to a local echo server, exec of a shell.
struct Local {
    echo: std::net::SocketAddr,
}

impl signet_test_support::streams::PodRuntime for Local {
    fn port_forward(
        &self,
        _: &serde_json::Value,
        port: u16,
    ) -> std::io::Result<std::net::TcpStream> {
        assert_eq!(port, 7000, "the port asked for");
        std::net::TcpStream::connect(self.echo)
    }
    fn exec(
        &self,
        _: &serde_json::Value,
        _: Option<&str>,
        command: &[String],
    ) -> std::io::Result<std::process::Child> {
        std::process::Command::new(&command[0])
            .args(&command[1..])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    }
}

/// Exec and port-forward as kube-rs speaks them (a WebSocket with the channel subprotocol):
/// bytes both ways, stdin closed, the exit code in the status; a pod that does not run, and a
/// missing RBAC right, refused as the API server refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_port_forward_reach_the_pod() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let echo = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in echo.incoming().flatten() {
            let mut buf = [0u8; 64];
            if let Ok(n) = std::io::Read::read(&mut s, &mut buf) {
                let _ = std::io::Write::write_all(&mut s, &buf[..n]);
            }
        }
    });
    let api = FakeApi::new(vec![
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"},
               "spec": {"containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Running"}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pending", "namespace": "ns"},
               "spec": {"containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Pending"}}),
    ]);
    api.pod_runtime(std::sync::Arc::new(Local { echo: echo_addr }));
    let url = api.serve_loopback();
    let client =
        kube::Client::try_from(kube::Config::new(url.parse().expect("url"))).expect("client");
    let pods: Api<Pod> = Api::namespaced(client, "ns");

    let mut forward = pods.portforward("p", &[7000]).await.expect("port-forward");
    let mut stream = forward.take_stream(7000).expect("the port's stream");
    stream.write_all(b"hello").await.expect("write");
    let mut back = [0u8; 5];
    stream.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"hello");
    drop(stream);

    let mut process = pods
        .exec(
            "p",
            ["sh", "-c", "read x; echo got:$x; exit 3"],
            &kube::api::AttachParams::default().stdin(true).stderr(false),
        )
        .await
        .expect("exec");
    let mut stdin = process.stdin().expect("stdin");
    stdin.write_all(b"hi\n").await.expect("stdin");
    drop(stdin);
    let mut out = String::new();
    process
        .stdout()
        .expect("stdout")
        .read_to_string(&mut out)
        .await
        .expect("stdout");
    let status = process
        .take_status()
        .expect("status")
        .await
        .expect("a status");
    assert_eq!(out, "got:hi\n");
    assert_eq!(status.reason.as_deref(), Some("NonZeroExitCode"));
    let cause = status.details.and_then(|d| d.causes).unwrap_or_default();
    assert_eq!(cause[0].message.as_deref(), Some("3"), "the exit code");

    let refused = |e: kube::Error| match e {
        kube::Error::UpgradeConnection(kube::client::UpgradeConnectionError::ProtocolSwitch(c)) => {
            c.as_u16()
        }
        other => panic!("not a refused upgrade: {other}"),
    };
    let pending = pods
        .exec("pending", ["true"], &kube::api::AttachParams::default())
        .await;
    assert_eq!(refused(pending.err().expect("not running")), 400);
    api.forbid("create", "pods/exec");
    let forbidden = pods
        .exec("p", ["true"], &kube::api::AttachParams::default())
        .await;
    assert_eq!(refused(forbidden.err().expect("forbidden")), 403);
    // Port-forward is a right of its own.
    assert!(pods.portforward("p", &[7000]).await.is_ok());
}

/// Deleting a Namespace takes what is in it; a Service gets a ClusterIP when asked for one.
#[tokio::test]
async fn namespaces_take_their_objects_along_and_services_get_addresses() {
    use k8s_openapi::api::core::v1::{Namespace, Service};
    let api = FakeApi::default();
    api.allocate_cluster_ips("10.96.7.");
    let client = api.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "ns"}})).expect("ns"),
        )
        .await
        .expect("namespace");
    let services: Api<Service> = Api::namespaced(client.clone(), "ns");
    let svc = services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "s"},
                "spec": {"ports": [{"port": 80}]}}))
            .expect("service"),
        )
        .await
        .expect("service");
    assert_eq!(
        svc.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("10.96.7.1")
    );
    let cms: Api<ConfigMap> = Api::namespaced(client, "ns");
    cms.create(&PostParams::default(), &config_map("a", "1"))
        .await
        .expect("configmap");
    namespaces
        .delete("ns", &DeleteParams::default())
        .await
        .expect("delete");
    assert_eq!(code(cms.get("a").await.expect_err("gone")), 404);
    assert_eq!(code(services.get("s").await.expect_err("gone")), 404);
}

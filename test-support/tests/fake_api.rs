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

//! Numeric identity allocation through the Kubernetes API, against kube-rs's test service
//! (tower-test) answered by a small in-memory API server that speaks the real request and
//! response types: `SignetIdentityList`, `SignetIdentity`, `Status` with 409 on a name conflict,
//! delete preconditions by uid. Agents race; every SPIFFE ID must end with exactly one number.

// Test servers and clients run as bare tasks; the agent's own tasks go through its drain.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use kube::client::Body;
use signet_agent::identity::kube::KubeIdentities;
use signet_ca::SpiffeId;
use signet_policy::SignetIdentity;

const PATH: &str = "/apis/signet.dev/v1alpha1/signetidentities";

/// Creates refused with 409 (the races the allocator had to resolve).
static CONFLICTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// name → (uid, object).
type Store = Arc<Mutex<BTreeMap<String, (String, SignetIdentity)>>>;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/signet-system/leases";

/// Leases by name: (resourceVersion, object as JSON).
static LEASE_STORE: Mutex<BTreeMap<String, (u64, serde_json::Value)>> = Mutex::new(BTreeMap::new());

/// Lease requests, with the API server's optimistic concurrency on resourceVersion.
fn answer_lease(method: &Method, path: &str, body: &[u8]) -> Response<Body> {
    let mut leases = LEASE_STORE.lock().expect("leases");
    let name = path
        .strip_prefix(LEASES)
        .unwrap_or("")
        .trim_start_matches('/')
        .to_owned();
    match *method {
        Method::GET => match leases.get(&name) {
            Some((_, v)) => json(StatusCode::OK, v),
            None => status(StatusCode::NOT_FOUND, "NotFound", format!("lease {name}")),
        },
        Method::POST => {
            let mut v: serde_json::Value = serde_json::from_slice(body).expect("lease");
            let name = v["metadata"]["name"].as_str().expect("named").to_owned();
            if leases.contains_key(&name) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("lease {name}"),
                );
            }
            v["metadata"]["resourceVersion"] = "1".into();
            leases.insert(name, (1, v.clone()));
            json(StatusCode::CREATED, &v)
        }
        Method::PUT => {
            let mut v: serde_json::Value = serde_json::from_slice(body).expect("lease");
            let sent: u64 = v["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            let Some((current, _)) = leases.get(&name) else {
                return status(StatusCode::NOT_FOUND, "NotFound", format!("lease {name}"));
            };
            if sent != *current {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified".into(),
                );
            }
            let next = current + 1;
            v["metadata"]["resourceVersion"] = next.to_string().into();
            leases.insert(name, (next, v.clone()));
            json(StatusCode::OK, &v)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            String::new(),
        ),
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).expect("json")))
        .expect("response")
}

fn json<T: serde::Serialize>(code: StatusCode, value: &T) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(value).expect("json")))
        .expect("response")
}

/// One request against the store, as the API server would answer it.
async fn answer(store: &Store, req: Request<Body>, next_uid: &mut u64) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let path = parts.uri.path().to_owned();
    if path.starts_with(LEASES) {
        return answer_lease(&parts.method, &path, &body);
    }
    match (parts.method.clone(), path.strip_prefix(PATH)) {
        (Method::GET, Some("")) => {
            let items: Vec<SignetIdentity> = store
                .lock()
                .expect("store")
                .values()
                .map(|(_, o)| o.clone())
                .collect();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "apiVersion": "signet.dev/v1alpha1", "kind": "SignetIdentityList",
                    "metadata": {"resourceVersion": "1"}, "items": items,
                }),
            )
        }
        (Method::POST, Some("")) => {
            let mut obj: SignetIdentity = serde_json::from_slice(&body).expect("a SignetIdentity");
            let name = obj.metadata.name.clone().expect("named");
            let mut store = store.lock().expect("store");
            if store.contains_key(&name) {
                CONFLICTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("signetidentities.signet.dev \"{name}\" already exists"),
                );
            }
            *next_uid += 1;
            let uid = format!("uid-{next_uid}");
            obj.metadata.uid = Some(uid.clone());
            store.insert(name, (uid, obj.clone()));
            json(StatusCode::CREATED, &obj)
        }
        (Method::DELETE, Some(rest)) => {
            let name = rest.trim_start_matches('/').to_owned();
            let options: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let want_uid = options["preconditions"]["uid"].as_str().map(str::to_owned);
            let mut store = store.lock().expect("store");
            match store.get(&name) {
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("\"{name}\" not found"),
                ),
                Some((uid, _)) if want_uid.as_ref().is_some_and(|w| w != uid) => status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "Precondition failed: UID in precondition does not match".into(),
                ),
                // As the API server does: with finalizers the object stays, terminating.
                Some((_, obj))
                    if obj
                        .metadata
                        .finalizers
                        .as_ref()
                        .is_some_and(|f| !f.is_empty()) =>
                {
                    let (uid, mut obj) = store.remove(&name).expect("present");
                    obj.metadata.deletion_timestamp.get_or_insert_with(|| {
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
                    });
                    store.insert(name, (uid, obj.clone()));
                    json(StatusCode::OK, &obj)
                }
                Some(_) => {
                    let (_, obj) = store.remove(&name).expect("present");
                    json(StatusCode::OK, &obj)
                }
            }
        }
        // A merge patch of the finalizers; a terminating object left without any is gone.
        (Method::PATCH, Some(rest)) => {
            let name = rest.trim_start_matches('/').to_owned();
            let patch: serde_json::Value = serde_json::from_slice(&body).expect("a patch");
            let mut store = store.lock().expect("store");
            let Some((uid, mut obj)) = store.remove(&name) else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("\"{name}\" not found"),
                );
            };
            if let Some(f) = patch["metadata"].get("finalizers") {
                obj.metadata.finalizers = serde_json::from_value(f.clone()).expect("finalizers");
            }
            let gone = obj.metadata.deletion_timestamp.is_some()
                && obj.metadata.finalizers.as_ref().is_none_or(Vec::is_empty);
            if !gone {
                store.insert(name, (uid, obj.clone()));
            }
            json(StatusCode::OK, &obj)
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} {path}", parts.method),
        ),
    }
}

/// A kube client whose every request the in-memory API server answers.
fn fake_api(store: Store) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        let mut uid = 0;
        while let Some((req, send)) = handle.next_request().await {
            send.send_response(answer(&store, req, &mut uid).await);
        }
    });
    kube::Client::new(service, "default")
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("id")
}

#[tokio::test]
async fn one_agent_gets_stable_numbers_from_256() {
    let store = Store::default();
    let ids = KubeIdentities::new(fake_api(store.clone()));
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let db = id("spiffe://cluster.local/ns/shop/sa/db");
    assert_eq!(ids.allocate(&web).await.expect("web"), 256);
    assert_eq!(ids.allocate(&db).await.expect("db"), 257);
    assert_eq!(ids.allocate(&web).await.expect("web again"), 256);
    let snapshot = ids.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.get(&web), Some(&256));
    assert_eq!(store.lock().expect("store").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_agents_end_with_one_number_per_identity() {
    let store = Store::default();
    let client = fake_api(store.clone());
    let names: Vec<SpiffeId> = (0..12)
        .map(|i| id(&format!("spiffe://cluster.local/ns/ns{}/sa/sa{i}", i % 3)))
        .collect();
    // Four agents, each allocating every identity, in different orders, at the same time.
    let mut agents = Vec::new();
    for a in 0..4usize {
        let ids = KubeIdentities::new(client.clone());
        let mut order = names.clone();
        order.rotate_left(a * 3);
        if a % 2 == 1 {
            order.reverse();
        }
        agents.push(tokio::spawn(async move {
            let mut got = BTreeMap::new();
            for n in order {
                let number = ids.allocate(&n).await.expect("allocate");
                got.insert(n, number);
            }
            got
        }));
    }
    let mut results = Vec::new();
    for a in agents {
        results.push(a.await.expect("agent"));
    }
    eprintln!(
        "creates refused with 409 during the race: {}",
        CONFLICTS.load(std::sync::atomic::Ordering::Relaxed)
    );
    // Every agent agrees on every identity's number...
    for r in &results[1..] {
        assert_eq!(r, &results[0], "agents disagree");
    }
    // ...the numbers are distinct and allocated ones...
    let mut numbers: Vec<u32> = results[0].values().copied().collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), names.len());
    assert!(numbers.iter().all(|n| *n >= 256));
    // ...and exactly one object per identity is left (duplicates from races deleted).
    let store = store.lock().expect("store");
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for (_, o) in store.values() {
        *per_id.entry(o.spec.spiffe_id.clone()).or_default() += 1;
    }
    assert_eq!(per_id.len(), names.len());
    assert!(per_id.values().all(|n| *n == 1), "{per_id:?}");
    for (name, (_, o)) in store.iter() {
        assert_eq!(
            results[0]
                .get(&id(&o.spec.spiffe_id))
                .map(ToString::to_string),
            Some(name.clone())
        );
    }
}

#[tokio::test]
async fn one_agent_holds_the_lease_until_it_stops_renewing() {
    use signet_ca::kubernetes::Elector;
    let client = fake_api(Store::default());
    let name = "gc-test-lease";
    // One clock for both candidates, moved by the test instead of slept through.
    let offset = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let clock: signet_ca::lease::Clock = {
        let offset = offset.clone();
        std::sync::Arc::new(move || {
            let secs = offset.load(std::sync::atomic::Ordering::SeqCst);
            jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs)
        })
    };
    let a =
        Elector::new(client.clone(), "signet-system", name, "node-a", 1).with_clock(clock.clone());
    let b = Elector::new(client.clone(), "signet-system", name, "node-b", 1).with_clock(clock);
    assert!(
        a.try_lead().await.expect("a"),
        "the first candidate takes it"
    );
    assert!(!b.try_lead().await.expect("b"), "held and fresh");
    assert!(a.try_lead().await.expect("a renews"));
    assert!(!b.try_lead().await.expect("b"));
    // node-a stops renewing; after the Lease's duration node-b takes over.
    offset.store(2, std::sync::atomic::Ordering::SeqCst);
    assert!(b.try_lead().await.expect("b takes over"));
    assert!(!a.try_lead().await.expect("a"), "node-a lost it");
}

#[tokio::test]
async fn unused_identities_are_deleted_after_the_grace_period_and_quarantined() {
    use signet_agent::identity::gc::{Collected, Collector};
    let store = Store::default();
    let client = fake_api(store.clone());
    let ids = KubeIdentities::new(client.clone());
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let gone = id("spiffe://cluster.local/ns/shop/sa/gone");
    assert_eq!(ids.allocate(&web).await.expect("web"), 256);
    assert_eq!(ids.allocate(&gone).await.expect("gone"), 257);
    let objects = |store: &Store| -> Vec<SignetIdentity> {
        store
            .lock()
            .expect("store")
            .values()
            .map(|(_, o)| o.clone())
            .collect()
    };
    assert!(
        objects(&store).iter().all(|o| o.metadata.finalizers
            == Some(vec![signet_agent::identity::kube::QUARANTINE.to_owned()])),
        "every number is created quarantinable"
    );
    let in_use: std::collections::BTreeSet<String> = [web.as_str().to_owned()].into();
    let quarantine = std::time::Duration::from_millis(1500);

    let mut patient = Collector::new(
        client.clone(),
        std::time::Duration::from_secs(3600),
        quarantine,
    );
    assert_eq!(
        patient.collect(&in_use).await.expect("collect"),
        Collected::default(),
        "still in its grace period"
    );

    // gone's number (the highest) is deleted: it stays, terminating, meaning nothing...
    let mut eager = Collector::new(client, std::time::Duration::ZERO, quarantine);
    let done = eager.collect(&in_use).await.expect("collect");
    assert_eq!(done.deleted, [257]);
    let now = objects(&store);
    assert_eq!(now.len(), 2, "quarantined, not gone");
    let meaning = signet_agent::identity::kube::numbers(&now);
    assert_eq!(
        meaning.get(&gone),
        None,
        "a number being deleted means nothing"
    );
    assert_eq!(meaning.get(&web), Some(&256));
    // ...and is not issued again: not to a new identity, not to its own old one.
    let new = id("spiffe://cluster.local/ns/shop/sa/new");
    assert_eq!(ids.allocate(&new).await.expect("new"), 258);
    assert_eq!(ids.allocate(&gone).await.expect("gone again"), 259);
    // Its quarantine over, the collector lifts it and it is gone.
    tokio::time::sleep(quarantine).await;
    let all_in_use: std::collections::BTreeSet<String> =
        [web.as_str(), new.as_str(), gone.as_str()]
            .map(str::to_owned)
            .into();
    let done = eager.collect(&all_in_use).await.expect("collect");
    assert_eq!(done.released, [257]);
    let names: Vec<String> = store.lock().expect("store").keys().cloned().collect();
    assert_eq!(names, ["256", "258", "259"]);
    // A number created without the finalizer (an older agent's) is kept while it is the
    // highest: deleting it would free it at once.
    let mut legacy = objects(&store)[0].clone();
    legacy.metadata.name = Some("300".into());
    legacy.metadata.finalizers = None;
    legacy.metadata.uid = Some("uid-legacy".into());
    legacy.spec.spiffe_id = "spiffe://cluster.local/ns/shop/sa/legacy".into();
    store
        .lock()
        .expect("store")
        .insert("300".into(), ("uid-legacy".into(), legacy));
    let done = eager.collect(&all_in_use).await.expect("collect");
    assert_eq!(done, Collected::default(), "the highest bare number stays");
    // A higher duplicate of a number in use (a forged 2^24-1 for web, say) is no one's number:
    // it goes, so it cannot hold the number space for ever.
    let mut forged = objects(&store)
        .into_iter()
        .find(|o| o.metadata.name.as_deref() == Some("256"))
        .expect("web");
    forged.metadata.name = Some("16777215".into());
    forged.metadata.uid = Some("uid-forged".into());
    store
        .lock()
        .expect("store")
        .insert("16777215".into(), ("uid-forged".into(), forged));
    let done = eager.collect(&all_in_use).await.expect("collect");
    assert_eq!(done.deleted, [16_777_215], "web keeps 256");
}

//! Numeric identity allocation through the Kubernetes API, against the shared fake API server,
//! which speaks the real request and response types: `SignetIdentityList`, `SignetIdentity`,
//! `Status` with 409 on a name conflict, delete preconditions by uid, finalizers. Agents race;
//! every SPIFFE ID must end with exactly one number. Leases and quarantines are timed on a
//! clock the tests move.

// Test servers and clients run as bare tasks; the agent's own tasks go through its drain.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::time::Duration;

use signet_agent::clock::Clock;
use signet_agent::state::identities::KubeIdentities;
use signet_ca::SpiffeId;
use signet_policy::SignetIdentity;
use signet_test_support::api::FakeApi;

/// The SignetIdentity objects the API server holds.
fn stored(api: &FakeApi) -> Vec<SignetIdentity> {
    api.objects("SignetIdentity")
        .into_iter()
        .map(|o| serde_json::from_value(o).expect("a SignetIdentity"))
        .collect()
}

fn put(api: &FakeApi, o: &SignetIdentity) {
    api.put(serde_json::to_value(o).expect("json"));
}

fn all_in_use_of(a: &SpiffeId, b: &SpiffeId, c: &SpiffeId) -> std::collections::BTreeSet<String> {
    [a.as_str(), b.as_str(), c.as_str()]
        .map(str::to_owned)
        .into()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("id")
}

#[tokio::test]
async fn one_agent_gets_stable_numbers_from_256() {
    let api = FakeApi::default();
    let ids = KubeIdentities::new(api.client());
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let db = id("spiffe://cluster.local/ns/shop/sa/db");
    assert_eq!(ids.allocate(&web).await.expect("web"), 256);
    assert_eq!(ids.allocate(&db).await.expect("db"), 257);
    assert_eq!(ids.allocate(&web).await.expect("web again"), 256);
    let snapshot = ids.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.get(&web), Some(&256));
    assert_eq!(stored(&api).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_agents_end_with_one_number_per_identity() {
    let api = FakeApi::default();
    let client = api.client();
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
        api.requests()
            .iter()
            .filter(|r| r.verb == "create" && r.code == 409)
            .count()
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
    let left = stored(&api);
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for o in &left {
        *per_id.entry(o.spec.spiffe_id.clone()).or_default() += 1;
    }
    assert_eq!(per_id.len(), names.len());
    assert!(per_id.values().all(|n| *n == 1), "{per_id:?}");
    for o in &left {
        assert_eq!(
            results[0]
                .get(&id(&o.spec.spiffe_id))
                .map(ToString::to_string),
            o.metadata.name
        );
    }
}

#[tokio::test]
async fn one_agent_holds_the_lease_until_it_stops_renewing() {
    use signet_ca::kubernetes::Elector;
    let client = FakeApi::default().client();
    let name = "gc-test-lease";
    // One clock for both candidates, moved by the test instead of slept through.
    let clock = Clock::system();
    let a = Elector::new(client.clone(), "signet-system", name, "node-a", 1)
        .with_clock(clock.for_lease());
    let b = Elector::new(client.clone(), "signet-system", name, "node-b", 1)
        .with_clock(clock.for_lease());
    assert!(
        a.try_lead().await.expect("a"),
        "the first candidate takes it"
    );
    assert!(!b.try_lead().await.expect("b"), "held and fresh");
    assert!(a.try_lead().await.expect("a renews"));
    assert!(!b.try_lead().await.expect("b"));
    // node-a stops renewing; after the Lease's duration node-b takes over.
    clock.advance(Duration::from_secs(2));
    assert!(b.try_lead().await.expect("b takes over"));
    assert!(!a.try_lead().await.expect("a"), "node-a lost it");
}

#[tokio::test]
async fn unused_identities_are_deleted_after_the_grace_period_and_quarantined() {
    use signet_agent::identity::gc::{Collected, Collector};
    let api = FakeApi::default();
    let client = api.client();
    let ids = KubeIdentities::new(client.clone());
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let gone = id("spiffe://cluster.local/ns/shop/sa/gone");
    assert_eq!(ids.allocate(&web).await.expect("web"), 256);
    assert_eq!(ids.allocate(&gone).await.expect("gone"), 257);
    assert!(
        stored(&api).iter().all(|o| o.metadata.finalizers
            == Some(vec![signet_agent::state::identities::QUARANTINE.to_owned()])),
        "every number is created quarantinable"
    );
    let in_use: std::collections::BTreeSet<String> = [web.as_str().to_owned()].into();
    let quarantine = std::time::Duration::from_secs(3600);
    let clock = Clock::system();

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
    let mut eager =
        Collector::new(client, std::time::Duration::ZERO, quarantine).with_clock(clock.clone());
    let done = eager.collect(&in_use).await.expect("collect");
    assert_eq!(done.deleted, [257]);
    let now = stored(&api);
    assert_eq!(now.len(), 2, "quarantined, not gone");
    let meaning = signet_agent::state::identities::numbers(&now);
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
    // Not a second early...
    clock.advance(Duration::from_secs(3599));
    assert_eq!(
        eager
            .collect(&all_in_use_of(&web, &new, &gone))
            .await
            .expect("collect"),
        Collected::default(),
        "still quarantined"
    );
    // ...but its quarantine over, the collector lifts it and it is gone.
    clock.advance(Duration::from_secs(2));
    let all_in_use = all_in_use_of(&web, &new, &gone);
    let done = eager.collect(&all_in_use).await.expect("collect");
    assert_eq!(done.released, [257]);
    let mut names: Vec<String> = stored(&api)
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    names.sort();
    assert_eq!(names, ["256", "258", "259"]);
    // A number created without the finalizer (an older agent's) is kept while it is the
    // highest: deleting it would free it at once.
    let mut legacy = stored(&api)[0].clone();
    legacy.metadata.name = Some("300".into());
    legacy.metadata.finalizers = None;
    legacy.metadata.uid = Some("uid-legacy".into());
    legacy.spec.spiffe_id = "spiffe://cluster.local/ns/shop/sa/legacy".into();
    put(&api, &legacy);
    let done = eager.collect(&all_in_use).await.expect("collect");
    assert_eq!(done, Collected::default(), "the highest bare number stays");
    // A higher duplicate of a number in use (a forged 2^24-1 for web, say) is no one's number:
    // it goes, so it cannot hold the number space for ever.
    let mut forged = stored(&api)
        .into_iter()
        .find(|o| o.metadata.name.as_deref() == Some("256"))
        .expect("web");
    forged.metadata.name = Some("16777215".into());
    forged.metadata.uid = Some("uid-forged".into());
    put(&api, &forged);
    let done = eager.collect(&all_in_use).await.expect("collect");
    assert_eq!(done.deleted, [16_777_215], "web keeps 256");
}

//! The CA's keys in a Kubernetes Secret, against the shared fake API server with its create and
//! update semantics (409 when the Secret exists, 409 when an update carries a stale
//! resourceVersion):
//! - replicas starting together end with one CA, which signs through an intermediate;
//! - the Lease holder's rotation reaches the other replicas through the Secret, step by step;
//! - a replica that loses a write race takes the winner's keys instead of keeping its own;
//! - a Secret that is not a Signet CA is refused by name and the keys in force stay in force.

use std::path::Path;
use std::time::Duration;

use signet_ca::server::ca_secret::{CaSecretError, KeySecret};
use signet_ca::verify::SvidRoots;
use signet_ca::{CaSettings, CaSource, CertificateAuthority, Csr, SpiffeId, TrustDomain};
use signet_test_support::api::FakeApi;
use time::OffsetDateTime;

const NS: &str = "signet-system";
const NAME: &str = "signet-ca-keys";
const DAY: u64 = 86_400;

fn td() -> TrustDomain {
    TrustDomain::parse("cluster.local").expect("td")
}

fn settings(dir: &Path) -> CaSettings {
    let mut s = CaSettings::new(td(), CaSource::SharedStateDir(dir.to_owned()));
    s.intermediate = true;
    s
}

/// One CA replica: its copy of the keys and the CA opened on it.
struct Replica {
    _tmp: tempfile::TempDir,
    keys: KeySecret,
    ca: CertificateAuthority,
    created: bool,
}

async fn start(client: &kube::Client) -> Replica {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("keys");
    let (keys, created) = KeySecret::ensure(client, NS, NAME, &settings(&dir), &dir)
        .await
        .expect("keys");
    let ca = CertificateAuthority::open(settings(&dir)).expect("the copy opens as a CA");
    Replica {
        _tmp: tmp,
        keys,
        ca,
        created,
    }
}

fn published(api: &FakeApi) -> String {
    let root = api
        .get("ConfigMap", NS, "signet-ca-root")
        .expect("published");
    root["data"]["root-cert.pem"]
        .as_str()
        .expect("root-cert.pem")
        .to_owned()
}

fn secret_keys(api: &FakeApi) -> Vec<String> {
    let secret = api.get("Secret", NS, NAME).expect("the keys' Secret");
    let data = secret["data"].as_object().expect("data");
    data.keys().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_to_create_the_ca_share_one_ca_with_an_intermediate() {
    let api = FakeApi::default();
    let client = api.client();
    let (a, b) = tokio::join!(start(&client), start(&client));
    assert_eq!(
        [a.created, b.created].iter().filter(|c| **c).count(),
        1,
        "one replica created it"
    );
    assert_eq!(a.ca.bundle().roots, b.ca.bundle().roots, "one root");
    assert_eq!(
        secret_keys(&api),
        [
            "ca-state.json",
            "roots.1.intermediate-cert.pem",
            "roots.1.intermediate-key.pem",
            "roots.1.root-cert.pem",
            "roots.1.root-key.pem",
        ]
    );
    a.keys
        .publish_bundle(&a.ca.bundle())
        .await
        .expect("publish");
    assert_eq!(published(&api), b.ca.bundle().to_pem());

    // Replica A's SVID, signed by the shared intermediate, verifies with B's bundle.
    let key = rcgen::KeyPair::generate().expect("key");
    let csr_pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .expect("csr");
    let csr = Csr::parse(csr_pem.as_bytes()).expect("csr");
    let id = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/api").expect("id");
    let svid =
        a.ca.issue(&id, &csr, Duration::from_secs(600))
            .expect("issue");
    assert_eq!(svid.chain.len(), 3, "leaf, intermediate, root");
    let roots = SvidRoots::new(td(), &b.ca.bundle().roots).expect("roots");
    let verified = roots
        .verify(
            &svid.chain[0],
            &svid.chain[1..2],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .expect("verifies at the other replica");
    assert_eq!(verified, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holders_rotation_reaches_the_other_replica() {
    let api = FakeApi::default();
    let client = api.client();
    let mut leader = start(&client).await;
    let mut follower = start(&client).await;
    let t0 = OffsetDateTime::now_utc();
    let old_root = leader.ca.bundle().roots[0].clone();

    // Nothing to do yet.
    assert!(!leader.keys.step(&leader.ca, true, t0).await.expect("step"));
    // The root is in its last quarter: the holder starts a rotation and stores it.
    let late = t0 + Duration::from_secs(300 * DAY);
    assert!(
        leader
            .keys
            .step(&leader.ca, true, late)
            .await
            .expect("step")
    );
    assert!(secret_keys(&api).contains(&"roots.2.intermediate-key.pem".to_owned()));
    assert_eq!(leader.ca.bundle().roots.len(), 2);
    assert_eq!(published(&api), leader.ca.bundle().to_pem());
    // The follower picks it up from the Secret, without rotating anything itself.
    assert!(
        follower
            .keys
            .step(&follower.ca, false, late)
            .await
            .expect("follow")
    );
    assert_eq!(follower.ca.bundle(), leader.ca.bundle());
    assert_eq!(
        follower.ca.signer().root(),
        &old_root,
        "the new root does not sign during the overlap"
    );

    // After the overlap both sign with the new root's intermediate. The follower switches on
    // its own clock even before the holder writes the promotion down.
    let switched = late + Duration::from_secs(7 * DAY + 1);
    follower
        .keys
        .step(&follower.ca, false, switched)
        .await
        .expect("follow");
    let new_root = follower.ca.bundle().roots[1].clone();
    assert_eq!(follower.ca.signer().root(), &new_root);
    leader
        .keys
        .step(&leader.ca, true, switched)
        .await
        .expect("promote");
    assert_eq!(leader.ca.signer().root(), &new_root);

    // Once every SVID of the old root has expired, it leaves the bundle everywhere.
    let retired = switched + Duration::from_secs(DAY + 1);
    leader
        .keys
        .step(&leader.ca, true, retired)
        .await
        .expect("retire");
    follower
        .keys
        .step(&follower.ca, false, retired)
        .await
        .expect("follow");
    assert_eq!(follower.ca.bundle().roots, vec![new_root.clone()]);
    assert_eq!(leader.ca.bundle(), follower.ca.bundle());
    assert!(!secret_keys(&api).iter().any(|k| k.starts_with("roots.1.")));
    assert_eq!(published(&api), follower.ca.bundle().to_pem());

    // A replica started now copies exactly the Secret: no retired root lingers.
    let late_joiner = start(&client).await;
    assert_eq!(late_joiner.ca.bundle().roots, vec![new_root]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_the_write_race_takes_the_winners_keys() {
    let client = FakeApi::default().client();
    let mut a = start(&client).await;
    let mut b = start(&client).await;
    let late = OffsetDateTime::now_utc() + Duration::from_secs(300 * DAY);
    // Both believe they hold the Lease (a stale holder): B advances rotation on its copy...
    b.keys.pull().await.expect("pull");
    b.ca.maintain(late).expect("b rotates locally");
    let b_local = b.ca.bundle().roots[1].clone();
    // ...but A stores its rotation first.
    a.keys.step(&a.ca, true, late).await.expect("a stores");
    assert!(
        !b.keys.push().await.expect("push"),
        "B's write over a stale resourceVersion is refused"
    );
    b.keys.step(&b.ca, true, late).await.expect("b follows");
    assert_eq!(b.ca.bundle(), a.ca.bundle(), "B now holds A's roots");
    assert!(
        !b.ca.bundle().roots.contains(&b_local),
        "B's own root is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_is_not_a_signet_ca_is_refused_and_the_keys_in_force_stay() {
    let api = FakeApi::default();
    let client = api.client();
    let mut replica = start(&client).await;
    let before = replica.ca.bundle();
    let now = OffsetDateTime::now_utc();
    // Someone else rewrites the Secret.
    let replace = |data: serde_json::Value| {
        let mut secret = api.get("Secret", NS, NAME).expect("secret");
        secret["data"] = data;
        api.put(secret);
    };
    replace(serde_json::json!({"tls.crt": "AAAA", "ca-state.json": "e30="}));
    let err = replica
        .keys
        .step(&replica.ca, false, now)
        .await
        .expect_err("refused");
    assert!(matches!(err, CaSecretError::UnexpectedKey { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("Secret signet-system/signet-ca-keys: unexpected key `tls.crt`"),
        "{err}"
    );
    replace(serde_json::json!({"roots.1.root-cert.pem": "AAAA"}));
    let err = replica
        .keys
        .step(&replica.ca, false, now)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("lacks `ca-state.json`"), "{err}");
    replace(serde_json::json!({"roots.1..-root-key.pem": "AAAA", "ca-state.json": "e30="}));
    assert!(matches!(
        replica.keys.step(&replica.ca, false, now).await,
        Err(CaSecretError::UnexpectedKey { .. })
    ));
    assert_eq!(
        replica.ca.bundle(),
        before,
        "the keys in force stay in force"
    );
    assert!(replica.ca.signer().not_after() > now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_holds_exactly_the_secrets_files_not_leftovers_of_its_own_attempt() {
    let client = FakeApi::default().client();
    // The stored CA signs with its roots directly (a Secret written without intermediates).
    let a_tmp = tempfile::tempdir().expect("tmp");
    let a_dir = a_tmp.path().join("keys");
    let mut direct = settings(&a_dir);
    direct.intermediate = false;
    KeySecret::ensure(&client, NS, NAME, &direct, &a_dir)
        .await
        .expect("stored");
    let stored_root = CertificateAuthority::open(direct)
        .expect("a")
        .bundle()
        .roots;
    // This replica's directory still holds its own generated root 1, with an intermediate.
    let b_tmp = tempfile::tempdir().expect("tmp");
    let b_dir = b_tmp.path().join("keys");
    signet_ca::store::RootStore::open_or_create(
        &b_dir,
        &td(),
        settings(&b_dir).root_policy(),
        OffsetDateTime::now_utc(),
    )
    .expect("own attempt");
    assert!(b_dir.join("roots/1/intermediate-key.pem").exists());
    KeySecret::ensure(&client, NS, NAME, &settings(&b_dir), &b_dir)
        .await
        .expect("copied");
    assert!(
        !b_dir.join("roots/1/intermediate-key.pem").exists(),
        "the leftover intermediate is gone"
    );
    let b = CertificateAuthority::open(settings(&b_dir)).expect("opens as the stored CA");
    assert_eq!(b.bundle().roots, stored_root);
}

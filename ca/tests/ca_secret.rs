//! The CA's keys in a Kubernetes Secret, against kube-rs's test service (tower-test) answered by
//! an in-memory Secret store with the API server's create semantics (409 when it exists): two
//! replicas starting together end with one root, and the material opens as a working CA.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use kube::client::Body;
use signet_ca::server::ca_secret::{FILES, ensure};
use signet_ca::{CaSettings, CaSource, CertificateAuthority, TrustDomain};

type Secrets = Arc<Mutex<BTreeMap<String, serde_json::Value>>>;

fn json(code: StatusCode, v: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string().into_bytes()))
        .expect("response")
}

fn status(code: StatusCode, reason: &str) -> Response<Body> {
    json(
        code,
        &serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "reason": reason, "code": code.as_u16(), "message": reason}),
    )
}

async fn answer(req: Request<Body>, secrets: &Secrets) -> Response<Body> {
    const PATH: &str = "/api/v1/namespaces/signet-system/secrets";
    let (parts, body) = req.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let path = parts.uri.path().to_owned();
    if path == "/api/v1/namespaces/signet-system/configmaps/signet-ca-root" {
        // Server-side apply of the published root: keep it to check.
        let cm: serde_json::Value = serde_json::from_slice(&body).expect("configmap");
        secrets
            .lock()
            .expect("store")
            .insert("configmap:signet-ca-root".into(), cm.clone());
        return json(StatusCode::OK, &cm);
    }
    let Some(rest) = path.strip_prefix(PATH) else {
        return status(StatusCode::NOT_FOUND, "NotFound");
    };
    let name = rest.trim_start_matches('/').to_owned();
    let mut store = secrets.lock().expect("store");
    match parts.method {
        Method::GET => match store.get(&name) {
            Some(s) => json(StatusCode::OK, s),
            None => status(StatusCode::NOT_FOUND, "NotFound"),
        },
        Method::POST => {
            let secret: serde_json::Value = serde_json::from_slice(&body).expect("secret");
            let name = secret["metadata"]["name"]
                .as_str()
                .expect("named")
                .to_owned();
            if store.contains_key(&name) {
                return status(StatusCode::CONFLICT, "AlreadyExists");
            }
            store.insert(name, secret.clone());
            json(StatusCode::CREATED, &secret)
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_to_create_the_ca_share_one_root() {
    let secrets = Secrets::default();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let store = secrets.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            send.send_response(answer(req, &store).await);
        }
    });
    let client = kube::Client::new(service, "default");
    let td = TrustDomain::parse("cluster.local").expect("td");
    let dirs = [
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    ];
    let ttl = std::time::Duration::from_secs(86400 * 365);
    let (key_a, key_b) = (dirs[0].path().join("keys"), dirs[1].path().join("keys"));
    let (a, b) = tokio::join!(
        ensure(&client, "signet-system", "signet-ca-keys", &td, ttl, &key_a,),
        ensure(&client, "signet-system", "signet-ca-keys", &td, ttl, &key_b,),
    );
    let created = [a.expect("replica a"), b.expect("replica b")];
    assert_eq!(
        created.iter().filter(|c| **c).count(),
        1,
        "one replica created it"
    );
    for file in FILES {
        let read =
            |d: &tempfile::TempDir| std::fs::read(d.path().join("keys").join(file)).expect("file");
        assert_eq!(
            read(&dirs[0]),
            read(&dirs[1]),
            "{file} differs between replicas"
        );
    }
    let store = secrets.lock().expect("store");
    assert_eq!(
        store
            .keys()
            .filter(|k| !k.starts_with("configmap:"))
            .count(),
        1
    );
    let published = store["configmap:signet-ca-root"]["data"]["root-cert.pem"]
        .as_str()
        .expect("root published")
        .to_owned();
    drop(store);
    assert_eq!(
        published.as_bytes(),
        std::fs::read(key_a.join("root-cert.pem")).expect("root"),
        "the agents' trust anchor is the root in use"
    );
    // The material is a working CA.
    let ca = CertificateAuthority::open(CaSettings::new(
        td,
        CaSource::Cacerts(dirs[0].path().join("keys")),
    ))
    .expect("opens as a cacerts directory");
    assert!(!ca.bundle().to_pem().is_empty());
}

//! The CA's Kubernetes authenticator against kube-rs's test service (tower-test), answered with
//! real `TokenReview` and `Pod` objects: the caller's node comes from the token's node-name extra
//! or its bound pod; anything else is refused with a reason, and an API failure is "unavailable".

use std::collections::BTreeMap;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::client::Body;
use signet_ca::server::auth::{AuthError, Authenticator, NodeName};
use signet_ca::server::tokenreview::{AUDIENCE, TokenReviewAuthenticator};

const AGENT: &str = "system:serviceaccount:signet-system:signet-agent";

fn user(name: &str, extra: &[(&str, &str)]) -> UserInfo {
    UserInfo {
        username: Some(name.into()),
        extra: Some(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                .collect(),
        ),
        ..UserInfo::default()
    }
}

/// What the API server says about each token.
fn status_for(token: &str) -> Option<TokenReviewStatus> {
    let ok = |u: UserInfo| TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(vec![AUDIENCE.into()]),
        user: Some(u),
        ..TokenReviewStatus::default()
    };
    let pod = [
        ("authentication.kubernetes.io/pod-name", "signet-agent-x1"),
        ("authentication.kubernetes.io/pod-uid", "uid-1"),
    ];
    Some(match token {
        "with-node" => ok(user(
            AGENT,
            &[
                pod[0],
                pod[1],
                ("authentication.kubernetes.io/node-name", "node-a"),
            ],
        )),
        "with-pod" => ok(user(AGENT, &pod)),
        "stale-pod" => ok(user(
            AGENT,
            &[pod[0], ("authentication.kubernetes.io/pod-uid", "uid-old")],
        )),
        "other-sa" => ok(user("system:serviceaccount:shop:web", &pod)),
        "unbound" => ok(user(AGENT, &[])),
        "wrong-audience" => TokenReviewStatus {
            audiences: Some(vec!["https://kubernetes.default.svc".into()]),
            ..ok(user(AGENT, &pod))
        },
        "expired" => TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has expired".into()),
            ..TokenReviewStatus::default()
        },
        _ => return None,
    })
}

fn json<T: serde::Serialize>(code: StatusCode, v: &T) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).expect("json")))
        .expect("response")
}

async fn answer(req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    match (parts.method, parts.uri.path()) {
        (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let mut review: TokenReview = serde_json::from_slice(&body).expect("a TokenReview");
            assert_eq!(
                review.spec.audiences.as_deref(),
                Some(&[AUDIENCE.to_owned()][..]),
                "the CA asks for its own audience"
            );
            let token = review.spec.token.clone().unwrap_or_default();
            if token == "api-down" {
                let status = serde_json::json!({"apiVersion": "v1", "kind": "Status",
                    "status": "Failure", "message": "etcdserver: request timed out", "code": 500});
                return json(StatusCode::INTERNAL_SERVER_ERROR, &status);
            }
            review.status = status_for(&token);
            json(StatusCode::CREATED, &review)
        }
        (Method::GET, "/api/v1/namespaces/signet-system/pods/signet-agent-x1") => json(
            StatusCode::OK,
            &Pod {
                metadata: ObjectMeta {
                    name: Some("signet-agent-x1".into()),
                    namespace: Some("signet-system".into()),
                    uid: Some("uid-1".into()),
                    ..ObjectMeta::default()
                },
                spec: Some(PodSpec {
                    node_name: Some("node-b".into()),
                    ..PodSpec::default()
                }),
                ..Pod::default()
            },
        ),
        (method, path) => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                "message": format!("{method} {path}"), "reason": "NotFound", "code": 404}),
        ),
    }
}

fn authenticator() -> TokenReviewAuthenticator {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            send.send_response(answer(req).await);
        }
    });
    TokenReviewAuthenticator::new(
        kube::Client::new(service, "default"),
        "signet-system",
        "signet-agent",
    )
}

#[tokio::test]
async fn the_caller_is_the_node_its_bound_token_names() {
    let a = authenticator();
    let mut results = BTreeMap::new();
    for token in [
        "with-node",
        "with-pod",
        "stale-pod",
        "other-sa",
        "unbound",
        "wrong-audience",
        "expired",
        "api-down",
    ] {
        results.insert(token, a.authenticate(token).await);
    }
    assert_eq!(results["with-node"], Ok(NodeName("node-a".into())));
    assert_eq!(
        results["with-pod"],
        Ok(NodeName("node-b".into())),
        "from the bound pod's nodeName"
    );
    let refused = |t: &str, needle: &str| match &results[t] {
        Err(AuthError::Rejected(why)) => assert!(why.contains(needle), "{t}: {why}"),
        other => panic!("{t}: {other:?}"),
    };
    refused("stale-pod", "replaced");
    refused("other-sa", "not the agent's service account");
    refused("unbound", "not bound to a pod");
    refused("wrong-audience", "audience signet-ca");
    refused("expired", "token has expired");
    assert!(
        matches!(&results["api-down"], Err(AuthError::Unavailable(why)) if why.contains("timed out")),
        "{:?}",
        results["api-down"]
    );
}

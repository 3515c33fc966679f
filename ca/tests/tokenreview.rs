//! The CA's Kubernetes authenticator against the shared fake API server, answered with
//! real `TokenReview` and `Pod` objects: the caller's node comes from the token's node-name extra
//! or its bound pod; anything else is refused with a reason, and an API failure is "unavailable".

use std::collections::BTreeMap;

use http::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
use serde_json::json;
use signet_ca::server::auth::{AuthError, Authenticator, NodeName};
use signet_ca::server::tokenreview::{AUDIENCE, TokenReviewAuthenticator};
use signet_test_support::api::{FakeApi, Refusal};

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

/// The API server, knowing the tokens of `status_for` and the agent pod they are bound to (on
/// node-b); a review of `api-down` fails as an overloaded API server does.
fn api() -> FakeApi {
    let api = FakeApi::new(vec![json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "signet-agent-x1", "namespace": "signet-system", "uid": "uid-1"},
        "spec": {"nodeName": "node-b", "containers": [{"name": "agent"}]},
    })]);
    for token in TOKENS {
        if let Some(status) = status_for(token) {
            api.token(token, serde_json::to_value(status).expect("status"));
        }
    }
    api.refuse_when(|seen| {
        (seen.path == "/apis/authentication.k8s.io/v1/tokenreviews"
            && seen.body["spec"]["token"] == "api-down")
            .then(|| Refusal {
                code: StatusCode::INTERNAL_SERVER_ERROR,
                reason: "InternalError".into(),
                message: "etcdserver: request timed out".into(),
            })
    });
    api
}

const TOKENS: [&str; 8] = [
    "with-node",
    "with-pod",
    "stale-pod",
    "other-sa",
    "unbound",
    "wrong-audience",
    "expired",
    "api-down",
];

#[tokio::test]
async fn the_caller_is_the_node_its_bound_token_names() {
    let api = api();
    let a = TokenReviewAuthenticator::new(api.client(), "signet-system", "signet-agent");
    let mut results = BTreeMap::new();
    for token in TOKENS {
        results.insert(token, a.authenticate(token).await);
    }
    for review in api
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/tokenreviews"))
    {
        assert_eq!(
            review.body["spec"]["audiences"],
            json!([AUDIENCE]),
            "the CA asks for its own audience"
        );
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

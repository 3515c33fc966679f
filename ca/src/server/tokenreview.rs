//! Agents in a cluster authenticate with a projected service-account token (audience
//! `signet-ca`), which the CA checks with a `TokenReview`. The token must belong to the agent's
//! service account and be bound to a pod; that pod's node is the caller's node, so authorisation
//! (`authz`) then allows only identities of pods on that node, as in standalone mode.
//!
//! The node comes from the token's `authentication.kubernetes.io/node-name` extra when the API
//! server sets it (Kubernetes 1.30+), else from the bound pod's `spec.nodeName`, with the pod's
//! uid checked against the token's so a token outliving its pod cannot name a new one.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

use crate::server::auth::{AuthError, AuthFuture, Authenticator, NodeName};

/// The audience agents' projected tokens are minted for.
pub const AUDIENCE: &str = "signet-ca";

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

pub struct TokenReviewAuthenticator {
    client: kube::Client,
    /// `system:serviceaccount:<namespace>:<name>` of the agent.
    agent: String,
    agent_namespace: String,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    pub fn new(client: kube::Client, agent_namespace: &str, agent_service_account: &str) -> Self {
        Self {
            client,
            agent: format!("system:serviceaccount:{agent_namespace}:{agent_service_account}"),
            agent_namespace: agent_namespace.to_owned(),
        }
    }

    async fn review(&self, token: &str) -> Result<NodeName, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        self.node_of(status).await
    }

    async fn node_of(&self, status: TokenReviewStatus) -> Result<NodeName, AuthError> {
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_owned()),
            ));
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
        {
            return Err(AuthError::Rejected(format!(
                "the token is not for audience {AUDIENCE}"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.agent {
            return Err(AuthError::Rejected(format!(
                "{username} is not the agent's service account ({})",
                self.agent
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(AuthError::Rejected(
                "the token is not bound to a pod (use a projected service-account token)".into(),
            ));
        };
        if let Some(node) = first(NODE_NAME) {
            return Ok(NodeName(node));
        }
        let found = Api::<Pod>::namespaced(self.client.clone(), &self.agent_namespace)
            .get_opt(&pod)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?
            .ok_or_else(|| AuthError::Rejected(format!("the token's pod {pod} is gone")))?;
        if found.metadata.uid.as_deref() != Some(uid.as_str()) {
            return Err(AuthError::Rejected(format!(
                "the token's pod {pod} was replaced (uid {uid} is gone)"
            )));
        }
        found
            .spec
            .and_then(|s| s.node_name)
            .map(NodeName)
            .ok_or_else(|| AuthError::Rejected(format!("the token's pod {pod} has no node")))
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(self.review(token))
    }
}

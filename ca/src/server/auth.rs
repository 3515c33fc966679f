//! Who is calling: a bearer token in the `authorization` metadata, mapped to a node name.
//!
//! Standalone mode lists per-node tokens in the CA's config, stored only as SHA-256 hashes and
//! compared in constant time. In a cluster, `tokenreview::TokenReviewAuthenticator` implements
//! the same trait with projected service-account tokens.

use std::future::Future;
use std::pin::Pin;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::server::config::NodeToken;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing `authorization: Bearer <token>` metadata")]
    Missing,
    #[error("`authorization` metadata is not `Bearer <token>`")]
    Malformed,
    #[error("the bearer token matches no node")]
    Unknown,
    #[error("the Kubernetes API refused the token: {0}")]
    Rejected(String),
    #[error("the Kubernetes API could not review the token: {0}")]
    Unavailable(String),
}

/// The node a caller proved to be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeName(pub String);

impl std::fmt::Display for NodeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<NodeName, AuthError>> + Send + 'a>>;

/// Turns a bearer token into the node it belongs to.
pub trait Authenticator: Send + Sync + std::fmt::Debug {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// Extracts the token from an `authorization` header value.
pub fn bearer_token(value: Option<&str>) -> Result<&str, AuthError> {
    let value = value.ok_or(AuthError::Missing)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token.trim())
}

pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

/// Per-node tokens from the CA's configuration.
#[derive(Debug)]
pub struct StaticTokens {
    nodes: Vec<(NodeName, [u8; 32])>,
}

impl StaticTokens {
    /// Nodes whose hash does not parse are left out; `ServerConfig` already refused them.
    pub fn new(nodes: &[NodeToken]) -> Self {
        Self {
            nodes: nodes
                .iter()
                .filter_map(|n| {
                    Some((NodeName(n.name.clone()), parse_sha256_hex(&n.token_sha256)?))
                })
                .collect(),
        }
    }

    fn find(&self, token: &str) -> Option<NodeName> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every entry, without stopping early, so timing reveals nothing.
        let mut found = None;
        for (name, hash) in &self.nodes {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(name.clone());
            }
        }
        found
    }
}

impl Authenticator for StaticTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move { self.find(token).ok_or(AuthError::Unknown) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer_token(None), Err(AuthError::Missing));
        assert_eq!(bearer_token(Some("Basic abc")), Err(AuthError::Malformed));
        assert_eq!(bearer_token(Some("Bearer ")), Err(AuthError::Malformed));
        assert_eq!(bearer_token(Some("abc")), Err(AuthError::Malformed));
    }

    #[tokio::test]
    async fn tokens_map_to_their_node_only() {
        let tokens = StaticTokens::new(&[
            NodeToken {
                name: "node-a".into(),
                token_sha256: sha256_hex("secret-a"),
            },
            NodeToken {
                name: "node-b".into(),
                token_sha256: sha256_hex("secret-b").to_uppercase(),
            },
        ]);
        assert_eq!(
            tokens.authenticate("secret-a").await,
            Ok(NodeName("node-a".into()))
        );
        assert_eq!(
            tokens.authenticate("secret-b").await,
            Ok(NodeName("node-b".into()))
        );
        assert_eq!(
            tokens.authenticate("secret-c").await,
            Err(AuthError::Unknown)
        );
        assert_eq!(tokens.authenticate("").await, Err(AuthError::Unknown));
    }
}

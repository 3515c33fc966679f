//! The gRPC services: Istio's `IstioCertificateService/CreateCertificate` and Signet's
//! `TrustBundleService/GetTrustBundle`.
//!
//! Status codes follow what Istio clients expect: a missing or wrong token is
//! `Unauthenticated`, an identity the node may not have is `PermissionDenied`, a bad CSR or TTL
//! is `InvalidArgument`, and a CA at its concurrency limit, or a peer past its authentication
//! budget (`gate`), is `ResourceExhausted`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::authority::IssueError;
use crate::csr::Csr;
use crate::issuer::CertificateAuthority;
use crate::proto::istio::istio_certificate_service_server::IstioCertificateService;
use crate::proto::istio::{IstioCertificateRequest, IstioCertificateResponse};
use crate::proto::signet::trust_bundle_service_server::TrustBundleService;
use crate::proto::signet::{TrustBundleRequest, TrustBundleResponse};
use crate::server::auth::{AuthError, NodeName, bearer_token};
use crate::server::authz::{AuthzError, NodeAuthorizer};
use crate::server::gate::{AuthGate, GateError};

pub use crate::proto::IMPERSONATED_IDENTITY;

/// Shared by both services.
#[derive(Debug, Clone)]
pub struct CaService {
    pub(crate) ca: Arc<CertificateAuthority>,
    pub(crate) gate: Arc<AuthGate>,
    pub(crate) authz: Arc<NodeAuthorizer>,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) queue_timeout: Duration,
}

impl CaService {
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<NodeName, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let token = match req.metadata().get("authorization").map(|v| v.to_str()) {
            None => Err(AuthError::Missing),
            Some(Err(_)) => Err(AuthError::Malformed),
            Some(Ok(v)) => bearer_token(Some(v)),
        };
        self.gate
            .authenticate(peer, token)
            .await
            .map_err(|e| match e {
                // The caller may well be legitimate: tell it to retry, not that it is unknown.
                GateError::Auth(AuthError::Unavailable(_)) => Status::unavailable(e.to_string()),
                GateError::Auth(_) => Status::unauthenticated(e.to_string()),
                GateError::TooManyFailures { .. } | GateError::TooManyChecks { .. } => {
                    Status::resource_exhausted(e.to_string())
                }
            })
    }
}

fn impersonated_identity(req: &IstioCertificateRequest) -> Result<Option<&str>, Status> {
    use prost_types::value::Kind;
    let Some(field) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &field.kind {
        Some(Kind::StringValue(s)) => Ok(Some(s.as_str())),
        _ => Err(Status::invalid_argument(format!(
            "metadata `{IMPERSONATED_IDENTITY}` must be a string SPIFFE ID"
        ))),
    }
}

fn authz_status(e: AuthzError) -> Status {
    match e {
        AuthzError::InvalidIdentity { .. } => Status::invalid_argument(e.to_string()),
        _ => Status::permission_denied(e.to_string()),
    }
}

fn issue_status(e: IssueError) -> Status {
    if e.is_invalid_request() {
        Status::invalid_argument(e.to_string())
    } else {
        tracing::error!(error = %e, "signing failed");
        Status::internal(e.to_string())
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        let node = match self.authenticate(&request).await {
            Ok(n) => n,
            Err(status) => {
                tracing::warn!(
                    ?peer,
                    reason = status.message(),
                    "CreateCertificate: unauthenticated"
                );
                return Err(status);
            }
        };
        let _slot = tokio::time::timeout(self.queue_timeout, self.slots.acquire())
            .await
            .map_err(|_| {
                Status::resource_exhausted("the CA is at its concurrency limit; retry with backoff")
            })?
            .map_err(|_| Status::unavailable("the CA is shutting down"))?;
        match self.sign(&node, request.get_ref()) {
            Ok(signed) => {
                tracing::info!(
                    target: "signet_ca::audit",
                    identity = %signed.id,
                    node = %node,
                    serial = %signed.serial,
                    not_after = %signed.not_after,
                    ?peer,
                    "issued SVID"
                );
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: signed.chain,
                }))
            }
            Err(status) => {
                tracing::warn!(
                    target: "signet_ca::audit",
                    node = %node,
                    code = ?status.code(),
                    reason = status.message(),
                    ?peer,
                    "refused SVID"
                );
                Err(status)
            }
        }
    }
}

/// What the audit trail records about one issuance, and the chain returned.
struct Signed {
    id: crate::spiffe::SpiffeId,
    serial: String,
    not_after: time::OffsetDateTime,
    chain: Vec<String>,
}

impl CaService {
    fn sign(&self, node: &NodeName, req: &IstioCertificateRequest) -> Result<Signed, Status> {
        let requested = impersonated_identity(req)?;
        let id = self
            .authz
            .authorize(node, requested)
            .map_err(authz_status)?;
        let csr = Csr::parse(req.csr.as_bytes())
            .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        let ttl = u64::try_from(req.validity_duration).map_err(|_| {
            Status::invalid_argument(format!(
                "validity_duration {} is negative",
                req.validity_duration
            ))
        })?;
        let svid = self
            .ca
            .issue(&id, &csr, Duration::from_secs(ttl))
            .map_err(issue_status)?;
        Ok(Signed {
            chain: svid.chain_pem(),
            id,
            serial: svid.serial,
            not_after: svid.not_after,
        })
    }
}

#[tonic::async_trait]
impl TrustBundleService for CaService {
    async fn get_trust_bundle(
        &self,
        request: Request<TrustBundleRequest>,
    ) -> Result<Response<TrustBundleResponse>, Status> {
        self.authenticate(&request).await?;
        let bundle = self.ca.bundle();
        let spiffe = bundle
            .to_spiffe_json()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(TrustBundleResponse {
            trust_domain: bundle.trust_domain.to_string(),
            roots_pem: bundle.roots_pem(),
            spiffe_bundle_json: spiffe,
            sequence: bundle.sequence,
        }))
    }
}

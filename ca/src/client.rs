//! A client for the CA's gRPC API, as node agents, the benchmark and the tests use it.
//!
//! It speaks exactly what ztunnel sends: `CreateCertificate` with a PEM CSR, a validity in
//! seconds, the bearer token in `authorization`, and `ImpersonatedIdentity` in the metadata
//! when asking on behalf of a workload.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::proto::IMPERSONATED_IDENTITY;
use crate::proto::istio::IstioCertificateRequest;
use crate::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::signet::trust_bundle_service_client::TrustBundleServiceClient;
use crate::proto::signet::{TrustBundleRequest, TrustBundleResponse};
use crate::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("CA address `{address}`: {source}")]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("cannot reach the CA at {address}: {source} (is signet-ca running there?)")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("token is not valid in an HTTP header")]
    BadToken,
}

/// A connection to the CA, reused for every request.
#[derive(Debug, Clone)]
pub struct CaClient {
    istio: IstioCertificateServiceClient<Channel>,
    bundle: TrustBundleServiceClient<Channel>,
    authorization: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    /// When set, the token is read from here for every request: a projected service-account
    /// token is rotated in place by the kubelet.
    token_file: Option<std::sync::Arc<std::path::PathBuf>>,
}

impl CaClient {
    /// Connects over TLS to `address` (`host:port`), trusting `root_pem` and checking that the
    /// server's certificate names `server_name`.
    pub async fn connect(
        address: &str,
        server_name: &str,
        root_pem: &str,
        token: &str,
    ) -> Result<Self, ClientError> {
        let url = format!("https://{address}");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root_pem))
            .domain_name(server_name);
        let endpoint = Endpoint::from_shared(url)
            .and_then(|e| e.tls_config(tls))
            .map_err(|source| ClientError::Address {
                address: address.to_owned(),
                source,
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                address: address.to_owned(),
                source,
            })?;
        let authorization = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::BadToken)?;
        Ok(Self {
            istio: IstioCertificateServiceClient::new(channel.clone()),
            bundle: TrustBundleServiceClient::new(channel),
            authorization,
            token_file: None,
        })
    }

    /// Re-reads the bearer token from `path` before every request (the token given to
    /// `connect` is the first one).
    pub fn with_token_file(mut self, path: std::path::PathBuf) -> Self {
        self.token_file = Some(std::sync::Arc::new(path));
        self
    }

    fn authorization(
        &self,
    ) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, tonic::Status> {
        let Some(path) = &self.token_file else {
            return Ok(self.authorization.clone());
        };
        let token = std::fs::read_to_string(path.as_path()).map_err(|e| {
            tonic::Status::unauthenticated(format!("token file {}: {e}", path.display()))
        })?;
        format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| tonic::Status::unauthenticated("token is not valid in an HTTP header"))
    }

    /// Asks for an SVID; `impersonate` names the workload when a node agent asks on its behalf.
    /// Returns the PEM chain, leaf first.
    pub async fn create_certificate(
        &mut self,
        csr_pem: &str,
        ttl: Duration,
        impersonate: Option<&SpiffeId>,
    ) -> Result<Vec<String>, tonic::Status> {
        let metadata = impersonate.map(|id| prost_types::Struct {
            fields: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            )]),
        });
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        req.metadata_mut()
            .insert("authorization", self.authorization()?);
        Ok(self
            .istio
            .create_certificate(req)
            .await?
            .into_inner()
            .cert_chain)
    }

    pub async fn trust_bundle(&mut self) -> Result<TrustBundleResponse, tonic::Status> {
        let mut req = tonic::Request::new(TrustBundleRequest {});
        req.metadata_mut()
            .insert("authorization", self.authorization()?);
        Ok(self.bundle.get_trust_bundle(req).await?.into_inner())
    }
}

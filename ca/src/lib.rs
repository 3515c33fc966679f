//! Signet's certificate authority: SPIFFE IDs, the X.509-SVID profile, CSR checks, CA keys and
//! their rotation, the trust bundle, and the gRPC server that issues SVIDs to node agents.
//!
//! Cargo features choose how much of it a crate takes. With none (the default) it is the pure
//! library of identities: `spiffe`, `workload`, `placement`, `files`, with no crypto, sockets or
//! async runtime, which is what `signet-policy` builds on. `authority` adds the X.509 side (keys,
//! CSRs, issuing, bundles, verification; still no sockets). `kube` adds the Kubernetes plumbing
//! the CA and the agents share (`kubernetes`, `lease`), `client` the gRPC client, and `server`
//! the CA itself, which speaks Istio's `IstioCertificateService` so Istio clients such as ztunnel
//! can use it.
#![forbid(unsafe_code)]

// The pure library: identities, which pods are workloads, placement, manifest files.
pub mod files;
pub mod placement;
pub mod spiffe;
pub mod workload;

// X.509-SVIDs and the authority: keys, CSRs, issuing, bundles, verification.
#[cfg(feature = "authority")]
pub mod authority;
#[cfg(feature = "authority")]
pub mod bundle;
#[cfg(feature = "authority")]
pub mod csr;
#[cfg(feature = "authority")]
pub mod issuer;
#[cfg(feature = "authority")]
pub mod peers;
#[cfg(feature = "authority")]
pub mod status;
#[cfg(feature = "authority")]
pub mod store;
#[cfg(feature = "authority")]
pub mod svid;
#[cfg(feature = "authority")]
pub mod verify;

// Kubernetes plumbing shared with the agents.
#[cfg(feature = "kube")]
pub mod kubernetes;
#[cfg(feature = "kube")]
pub mod lease;

// The gRPC client (node agents) and server (the CA).
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod server;

/// Generated from `proto/` by `build.rs` (tonic-prost-build).
#[cfg(feature = "client")]
pub mod proto {
    /// The metadata key ztunnel uses to ask for a workload's identity.
    pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

    pub mod istio {
        tonic::include_proto!("istio.v1.auth");
    }
    pub mod signet {
        tonic::include_proto!("signet.ca.v1");
    }
}

#[cfg(feature = "authority")]
pub use authority::{IssueError, IssuedSvid, Signer, TtlPolicy};
#[cfg(feature = "authority")]
pub use bundle::TrustBundle;
#[cfg(feature = "authority")]
pub use csr::{Csr, CsrError};
#[cfg(feature = "authority")]
pub use issuer::{CaSettings, CaSource, CertificateAuthority};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

//! Signet's certificate authority: SPIFFE IDs, the X.509-SVID profile, CSR checks, CA keys and
//! their rotation, the trust bundle, and the gRPC server that issues SVIDs to node agents.
//!
//! The modules below `server` are pure: no sockets, no kernel, no global state, so they test in
//! milliseconds. `server` is the only part that listens on a port; it speaks Istio's
//! `IstioCertificateService` so Istio clients such as ztunnel can use this CA.
#![forbid(unsafe_code)]

pub mod authority;
pub mod bundle;
pub mod csr;
pub mod issuer;
pub mod lease;
pub mod peers;
pub mod spiffe;
pub mod store;
pub mod svid;
pub mod verify;

pub mod client;
pub mod server;

/// Generated from `proto/` by `build.rs` (tonic-prost-build).
pub mod proto {
    pub mod istio {
        tonic::include_proto!("istio.v1.auth");
    }
    pub mod signet {
        tonic::include_proto!("signet.ca.v1");
    }
}

pub use authority::{IssueError, IssuedSvid, Signer, TtlPolicy};
pub use bundle::TrustBundle;
pub use csr::{Csr, CsrError};
pub use issuer::{CaSettings, CaSource, CertificateAuthority};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

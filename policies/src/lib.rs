//! Signet's identity policy language: the `IdentityPolicy` resource, parsing with precise errors,
//! numeric identities, compilation to datapath entries and the reference evaluator.
//!
//! Pure library: no sockets, no kernel. The agent feeds it cluster state and loads what it
//! compiles; the `signet policy` commands print what it decides.
#![forbid(unsafe_code)]

pub mod cidr;
pub mod cluster;
pub mod compile;
pub mod eval;
pub mod identity;
pub mod lbipam;
pub mod model;
pub mod parse;
pub mod path;
pub mod resource;
pub mod traffic;
pub mod yaml;

pub use identity::{SignetIdentity, SignetIdentitySpec};
pub use lbipam::{
    L2AnnouncementPolicy, L2AnnouncementPolicySpec, LoadBalancerIPPool, LoadBalancerIPPoolSpec,
};
pub use resource::{IdentityPolicy, IdentityPolicySpec};
pub use traffic::{TrafficPolicy, TrafficPolicySpec};

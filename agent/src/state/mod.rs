//! Cluster state as the agent uses it. Namespaces, Pods and IdentityPolicies come from
//! `signet_policy::cluster`; this module adds what only the proxy needs, starting with Services.

pub mod build;
pub mod identities;
pub mod kube;
pub mod lastgood;
pub mod lbipam;
pub mod services;
pub mod snapshot;

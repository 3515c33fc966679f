//! Policy as the agent applies it, above the read model (`state`) and below the proxy: `decide`
//! gives a connection its verdict and the rule behind it, `request` checks each request of an
//! inspected connection against its `http` rules, and `status` says in Kubernetes which
//! IdentityPolicies (and Gateway API resources) are valid and in force. The datapath enforces the
//! same compiled rules in the kernel (`datapath::sync`); the proxy asks here.

pub mod decide;
pub mod request;
pub mod status;

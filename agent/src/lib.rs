//! Signet's node agent and the `signet` CLI.
//!
//! `app.rs` wires the parts: configuration (`config`), cluster state (`state/`), the eBPF
//! datapath loader (`datapath/`), workload certificates (`certs/`), the proxy with its HBONE
//! transport and L7 inspection (`proxy/`), and the admin port with metrics and readiness
//! (`admin/`), the Gateway API model (`routing/`) and listeners (`gateway/`). `main.rs` is the `signet-agent` binary;
//! `cli/` is the `signet` command line.

pub mod admin;
pub mod app;
pub mod certs;
pub mod cli;
pub mod clock;
pub mod config;
pub mod datapath;
pub mod drain;
pub mod flow;
pub mod gateway;
pub mod health;
pub mod identity;
pub mod net;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod reconcile;
pub mod routing;
pub mod state;

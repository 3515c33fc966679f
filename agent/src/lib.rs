//! Signet's node agent and the `signet` CLI.
//!
//! `app.rs` wires the parts: configuration (`config`), cluster state (`state/`), the eBPF
//! datapath loader (`datapath/`), workload certificates (`certs/`), the proxy with its HBONE
//! transport and L7 inspection (`proxy/`), and the admin port with metrics and readiness
//! (`admin/`). `main.rs` is the `signet-agent` binary; `cli/` is the `signet` command line.
//! The Gateway comes with issue 6.

pub mod admin;
pub mod app;
pub mod certs;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod proxy;
pub mod state;

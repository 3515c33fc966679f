//! Signet's node agent and the `signet` CLI.
//!
//! What is here: the `signet` command line (`cli/`), the eBPF datapath loader (`datapath/`),
//! workload certificates (`certs/`), the HBONE transport (`proxy/hbone`), Service resolution
//! (`state/`) and the agent's configuration (`config`). What is not yet: the daemon that wires
//! them (`app.rs`, the `signet-agent` binary), the proxy's listeners, L7 inspection, metrics
//! and the Gateway (issues 5 and 6). Until then there is no `signet-agent` binary, so nothing
//! can start an agent that does not exist.

pub mod app;
pub mod certs;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod proxy;
pub mod state;

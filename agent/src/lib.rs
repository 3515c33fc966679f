//! Signet's node agent and the `signet` CLI.
//!
//! `app.rs` wires the parts: configuration (`config`), cluster state (`state/`), the eBPF
//! datapath loader (`datapath/`), workload certificates (`certs/`), the proxy with its HBONE
//! transport and L7 inspection (`proxy/`), and the admin port with metrics and readiness
//! (`admin/`), the Gateway API model (`routing/`) and listeners (`gateway/`). `main.rs` is the
//! `signet-agent` binary; `cli/` is the `signet` command line.
//!
//! The modules are layered; a module names only modules of lower layers (`tests/layers.rs`
//! fails on an upward or sideways import):
//!
//! | layer | modules | |
//! |---|---|---|
//! | 0 | `clock`, `config`, `drain`, `flow`, `net` | leaves |
//! | 1 | `routing`, `admin`, `certs` | the Gateway API model, metrics and the admin port, certificates |
//! | 2 | `state` | the read model |
//! | 3 | `policy`, `datapath`, `identity` | verdicts and status, the kernel's entries, identity collection |
//! | 4 | `proxy`, `observe` | the mesh proxy (its HBONE transport knows nothing of policy or metrics), kernel flow reports |
//! | 5 | `gateway` | the edge, over the proxy |
//! | 6–8 | `reconcile`, `health`, `app`, `cli` | the loops that keep the parts in step, readiness, the wiring |

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
pub mod vip;

//! Signet's node agent and the `signet` CLI.
//!
//! Today this crate holds the `signet` command line (`cli/`): `signet policy validate`,
//! `explain` and `compile`. The daemon (workload registry, certificate manager, datapath
//! loader, proxy, gateway, admin API) arrives with issues 4–6; until then there is no
//! `signet-agent` binary, so nothing can start an agent that does not exist.

pub mod certs;
pub mod cli;
pub mod datapath;
pub mod proxy;

//! Signet's node agent: workload registry, certificate manager, datapath loader, proxy, gateway
//! and admin API, and the `signet` CLI.
//!
//! Not built yet: issue 5 fills this crate (with the datapath from issue 4 and the gateway from
//! issue 6). Until then it has no binaries, so nothing can start an agent that does not exist.

//! The node proxy: outbound (captured connections into HBONE tunnels), inbound (HBONE streams
//! authorised by identity policy and connected to workloads) and, later, Gateway listeners.
//!
//! Today it holds the HBONE transport (`hbone`); the listeners arrive with issue 5.

pub mod hbone;

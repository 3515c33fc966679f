//! Signet's end-to-end suites (in `tests/tests/`) and their helper binaries.
//!
//! - `datapath.rs`: the eBPF programs loaded into this kernel and attached to a test cgroup,
//!   with `signet-test-client` (an unmodified client that joins the cgroup and connects).
//!
//! The CA's end-to-end test (real gRPC server on loopback, two nodes, an mTLS handshake between
//! the SVIDs it issued) lives with the CA in `ca/tests/`, since it needs no namespaces.

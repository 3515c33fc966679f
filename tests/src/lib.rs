//! Signet's end-to-end suites over network namespaces, the connectivity suite and the benchmark
//! drivers.
//!
//! The CA's end-to-end test (real gRPC server on loopback, two nodes, an mTLS handshake between
//! the SVIDs it issued) lives with the CA in `ca/tests/`, since it needs no namespaces. The
//! namespace-based suites arrive with the agent (issue 5).

//! Signet's eBPF programs (C under `bpf/`, built by `build.rs`) and the `#[repr(C)]` mirrors of
//! their map keys and values.
//!
//! Not built yet: issue 4 fills this crate.

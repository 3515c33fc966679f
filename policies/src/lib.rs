//! Signet's identity policy language: the `IdentityPolicy` resource, parsing with precise errors,
//! numeric identities, compilation to datapath entries and the reference evaluator.
//!
//! Not built yet: issue 3 fills this crate. It holds no code until then, so nothing can depend
//! on a policy engine that does not exist.
#![forbid(unsafe_code)]

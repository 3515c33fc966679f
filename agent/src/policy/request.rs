//! Request checks: what an inspected connection's `http` rules say of each request, as a
//! closure the L7 server calls, and the path opt-outs that hold for all of them. The L7 server
//! (`proxy::l7`) parses and forwards; this module only decides.

use std::sync::Arc;

use signet_policy::model::Request as PolicyRequest;
use signet_policy::path::PathNormalization;

use crate::state::snapshot::L7Rules;

/// Decides one request: `Ok(rule)` names the rule that allowed it, `Err` refuses it.
pub type RequestCheck = Arc<dyn Fn(&PolicyRequest) -> Result<String, Denial> + Send + Sync>;

/// A refused request: the rules whose `http` entries it matched none of (what the flow log
/// names as the rule), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub rules: String,
    pub reason: String,
}

/// The check for a connection admitted with these rules: the first rule with a matching
/// `http` entry allows the request.
pub fn check_for(rules: Arc<L7Rules>) -> RequestCheck {
    let names = rules
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    Arc::new(move |req| {
        rules
            .iter()
            .find(|(_, http)| http.iter().any(|h| h.matches(req)))
            .map(|(name, _)| name.clone())
            .ok_or_else(|| Denial {
                rules: names.clone(),
                reason: format!("no `http` rule of {names} matches"),
            })
    })
}

/// The path opt-outs that hold for a connection with these rules: only those all of them take.
pub fn normalization_for(rules: &L7Rules) -> PathNormalization {
    let mut all = rules.iter().flat_map(|(_, http)| http).peekable();
    if all.peek().is_none() {
        return PathNormalization::default();
    }
    all.fold(PathNormalization::KEEP_ALL, |acc, h| {
        acc.and(h.normalization)
    })
}

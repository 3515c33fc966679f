//! The CA's status as its admin port serves it (`server::admin`) and `signet status` reads it:
//! one type for both ends.

use serde::{Deserialize, Serialize};

use crate::issuer::RootsStatus;

/// The CA, as its admin port reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    pub trust_domain: String,
    pub version: String,
    /// The gRPC address it serves certificates on.
    pub serving: String,
    /// `standalone` (a state directory) or `kubernetes`.
    pub cluster_source: String,
    pub roots: RootsStatus,
}

impl CaStatus {
    /// What is wrong, for `signet status`: a root in the bundle past its notAfter, or a signing
    /// root with less than a tenth of its life left and no rotation under way or planned.
    pub fn problems(&self, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.roots.roots {
            if r.not_after <= now {
                out.push(format!(
                    "root {} in the bundle has expired",
                    r.id.map_or("?".into(), |i| i.to_string())
                ));
            }
        }
        let pending = self.roots.roots.iter().any(|r| r.state == "pending");
        if let Some(s) = self.roots.roots.iter().find(|r| r.state == "signing") {
            let life = (s.not_after - s.not_before).max(1);
            if !pending && self.roots.next_rotation.is_none() && (s.not_after - now) * 10 < life {
                out.push("the signing root is in its last tenth and no rotation is planned".into());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issuer::{RootState, RootsStatus};

    fn status(roots: Vec<RootState>, next: Option<i64>) -> CaStatus {
        CaStatus {
            trust_domain: "cluster.local".into(),
            version: "0".into(),
            serving: "127.0.0.1:15012".into(),
            cluster_source: "standalone".into(),
            roots: RootsStatus {
                sequence: 1,
                managed: "generated".into(),
                roots,
                next_rotation: next,
            },
        }
    }

    fn root(state: &str, not_before: i64, not_after: i64) -> RootState {
        RootState {
            id: Some(1),
            state: state.into(),
            not_before,
            not_after,
            signing_from: Some(not_before),
            retire_at: None,
        }
    }

    #[test]
    fn an_expired_root_or_an_unplanned_end_of_life_is_a_problem() {
        assert!(
            status(vec![root("signing", 0, 1000)], Some(750))
                .problems(100)
                .is_empty()
        );
        assert_eq!(
            status(vec![root("signing", 0, 1000)], None).problems(950),
            ["the signing root is in its last tenth and no rotation is planned"]
        );
        assert_eq!(
            status(
                vec![root("retiring", 0, 1000), root("signing", 900, 5000)],
                None
            )
            .problems(1001),
            ["root 1 in the bundle has expired"]
        );
    }
}

//! In front of the authenticator: what an unauthenticated caller may cost the CA. A token's
//! verdict is kept briefly (`tokenCacheSeconds` when accepted, a few seconds when refused), and
//! concurrent requests with one token share one check, so one token costs one TokenReview. A
//! peer address may run only a few checks at once and fail only so often in a window; past
//! that it gets `ResourceExhausted` before any check runs, while every other peer is served.
//! A token accepted in the last `KNOWN_GOOD` is exempt from both per-address budgets (it is
//! still checked again once its verdict expires): an address may be shared (a node's, with its
//! hostNetwork pods, or the CA node's proxy when the mesh captures the CA), and the agent
//! behind it, which asks at least every minute, must not be locked out by its neighbours.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::peers::{FailureBudget, PerSource};
use crate::server::auth::{AuthError, Authenticator, NodeName};

/// How long a refused token's verdict is kept.
const REFUSED_TTL: Duration = Duration::from_secs(5);
/// Verdicts kept at most; expired ones go first.
const CACHED: usize = 16_384;
/// How long an accepted token stays exempt from the per-address budgets.
const KNOWN_GOOD: Duration = Duration::from_secs(600);

/// One token's verdict, once known, and when.
type Verdict = (Instant, Result<NodeName, AuthError>);

/// Why the gate refused before the authenticator answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error(
        "{ip} failed to authenticate too often; retry in {}s",
        .retry_in.as_secs() + 1
    )]
    TooManyFailures { ip: IpAddr, retry_in: Duration },
    #[error("{ip} has {cap} token checks in flight already; retry with backoff")]
    TooManyChecks { ip: IpAddr, cap: usize },
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// Budgets for a gate.
#[derive(Debug, Clone, Copy)]
pub struct GateLimits {
    /// How long an accepted token's verdict is kept.
    pub cache: Duration,
    /// Token checks one peer address may run at once.
    pub checks_per_peer: usize,
    /// Failures one peer address may have per `window`.
    pub failures_per_peer: u32,
    pub window: Duration,
}

pub struct AuthGate {
    auth: Arc<dyn Authenticator>,
    limits: GateLimits,
    verdicts: Mutex<HashMap<[u8; 32], Arc<OnceCell<Verdict>>>>,
    checks: Arc<PerSource>,
    failures: FailureBudget,
    /// Tokens accepted recently (by hash), and when.
    known_good: Mutex<HashMap<[u8; 32], Instant>>,
}

impl std::fmt::Debug for AuthGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGate")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl AuthGate {
    pub fn new(auth: Arc<dyn Authenticator>, limits: GateLimits) -> Self {
        Self {
            auth,
            checks: PerSource::new(limits.checks_per_peer),
            failures: FailureBudget::new(limits.failures_per_peer, limits.window),
            verdicts: Mutex::new(HashMap::new()),
            known_good: Mutex::new(HashMap::new()),
            limits,
        }
    }

    fn fresh(&self, v: &Verdict) -> bool {
        let ttl = match &v.1 {
            Ok(_) => self.limits.cache,
            Err(_) => REFUSED_TTL,
        };
        v.0.elapsed() < ttl
    }

    /// The verdict cell for `key`: the cached one while fresh, else a new one.
    fn cell(&self, key: [u8; 32]) -> Arc<OnceCell<Verdict>> {
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cell) = verdicts.get(&key)
            && cell.get().is_none_or(|v| self.fresh(v))
        {
            return cell.clone();
        }
        if verdicts.len() >= CACHED {
            // Full: keep the fresh acceptances, which no one can make without a valid token;
            // refusals and checks in flight (whose waiters keep their cell) go first.
            verdicts.retain(|_, c| c.get().is_some_and(|v| v.1.is_ok() && self.fresh(v)));
            if verdicts.len() >= CACHED {
                verdicts.clear();
            }
        }
        let cell = Arc::new(OnceCell::new());
        verdicts.insert(key, cell.clone());
        cell
    }

    /// The node of `token` if it was accepted recently.
    fn accepted(&self, token: &str) -> Option<NodeName> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        let (_, verdict) = verdicts.get(&key)?.get().filter(|v| self.fresh(v))?;
        verdict.clone().ok()
    }

    fn known_good(&self, token: &str) -> bool {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let known = self.known_good.lock().unwrap_or_else(|p| p.into_inner());
        known.get(&key).is_some_and(|at| at.elapsed() < KNOWN_GOOD)
    }

    /// Who `token` (from `peer`, when known) belongs to. `header` errors (no or malformed
    /// token) count as failures of the peer too.
    pub async fn authenticate(
        &self,
        peer: Option<IpAddr>,
        token: Result<&str, AuthError>,
    ) -> Result<NodeName, GateError> {
        // A token already accepted is served even from an address past its failure budget:
        // the address may be shared (a node's, with its hostNetwork pods).
        if let Ok(token) = token
            && let Some(node) = self.accepted(token)
        {
            return Ok(node);
        }
        let known = token.as_ref().is_ok_and(|t| self.known_good(t));
        let budgeted = if known { None } else { peer };
        if let Some(ip) = budgeted
            && let Err(retry_in) = self.failures.check(ip)
        {
            return Err(GateError::TooManyFailures { ip, retry_in });
        }
        let result = match &token {
            Err(e) => Err(GateError::Auth(e.clone())),
            Ok(token) => self.verdict(budgeted, token).await,
        };
        if let (Ok(token), Ok(_)) = (token, &result) {
            let mut known = self.known_good.lock().unwrap_or_else(|p| p.into_inner());
            if known.len() >= CACHED {
                known.retain(|_, at| at.elapsed() < KNOWN_GOOD);
            }
            if known.len() < CACHED {
                known.insert(Sha256::digest(token.as_bytes()).into(), Instant::now());
            }
        }
        if let (Some(ip), Err(GateError::Auth(e))) = (budgeted, &result)
            && !matches!(e, AuthError::Unavailable(_))
        {
            self.failures.failed(ip);
        }
        result
    }

    async fn verdict(&self, peer: Option<IpAddr>, token: &str) -> Result<NodeName, GateError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cell = self.cell(key);
        let forget = || {
            let mut verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
            if verdicts.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                verdicts.remove(&key);
            }
        };
        let verdict = cell
            .get_or_try_init(|| async {
                // Only the request that runs the check needs a check slot; the others wait.
                let _slot = match peer {
                    Some(ip) => Some(self.checks.try_take(ip).ok_or(GateError::TooManyChecks {
                        ip,
                        cap: self.checks.cap(),
                    })?),
                    None => None,
                };
                Ok::<_, GateError>((Instant::now(), self.auth.authenticate(token).await))
            })
            .await;
        let verdict = match verdict {
            Ok(v) => v,
            Err(e) => {
                // No check ran: leave no empty cell behind for a flood to fill the map with.
                if cell.get().is_none() {
                    forget();
                }
                return Err(e);
            }
        };
        let result = verdict.1.clone();
        if matches!(result, Err(AuthError::Unavailable(_))) {
            // Not a verdict on the token: the next request asks again.
            forget();
        }
        result.map_err(GateError::Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::auth::AuthFuture;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Accepts `good` after `delay`, refuses everything else; counts the checks.
    #[derive(Debug)]
    struct Counting {
        checks: AtomicUsize,
        delay: Duration,
    }

    impl Authenticator for Counting {
        fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
            self.checks.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                if token == "good" {
                    Ok(NodeName("node-a".into()))
                } else {
                    Err(AuthError::Rejected("invalid bearer token".into()))
                }
            })
        }
    }

    fn gate(delay: Duration) -> (Arc<AuthGate>, Arc<Counting>) {
        gate_caching(delay, Duration::from_secs(30))
    }

    fn gate_caching(delay: Duration, cache: Duration) -> (Arc<AuthGate>, Arc<Counting>) {
        let auth = Arc::new(Counting {
            checks: AtomicUsize::new(0),
            delay,
        });
        let limits = GateLimits {
            cache,
            checks_per_peer: 2,
            failures_per_peer: 5,
            window: Duration::from_secs(60),
        };
        (Arc::new(AuthGate::new(auth.clone(), limits)), auth)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("ip"))
    }

    #[tokio::test]
    async fn one_token_costs_one_check_however_many_requests_carry_it() {
        let (gate, auth) = gate(Duration::from_millis(50));
        let mut all = Vec::new();
        for _ in 0..20 {
            let gate = gate.clone();
            all.push(tokio::spawn(async move {
                gate.authenticate(ip("10.0.0.1"), Ok("good")).await
            }));
        }
        for r in all {
            assert_eq!(r.await.expect("task"), Ok(NodeName("node-a".into())));
        }
        assert_eq!(
            auth.checks.load(Ordering::SeqCst),
            1,
            "concurrent requests share it"
        );
        gate.authenticate(ip("10.0.0.2"), Ok("good"))
            .await
            .expect("cached");
        assert_eq!(auth.checks.load(Ordering::SeqCst), 1, "and later ones too");
    }

    #[tokio::test]
    async fn a_peer_that_keeps_failing_is_refused_before_any_check_and_others_are_not() {
        let (gate, auth) = gate(Duration::ZERO);
        for i in 0..5 {
            let e = gate
                .authenticate(ip("10.0.0.9"), Ok(&format!("forged-{i}")))
                .await
                .expect_err("forged");
            assert!(matches!(e, GateError::Auth(AuthError::Rejected(_))), "{e}");
        }
        let e = gate
            .authenticate(ip("10.0.0.9"), Ok("forged-6"))
            .await
            .expect_err("budget used up");
        assert!(matches!(e, GateError::TooManyFailures { .. }), "{e}");
        let e = gate
            .authenticate(ip("10.0.0.9"), Err(AuthError::Missing))
            .await
            .expect_err("still");
        assert!(matches!(e, GateError::TooManyFailures { .. }), "{e}");
        assert_eq!(
            auth.checks.load(Ordering::SeqCst),
            5,
            "no check for refused peers"
        );
        // The agent beside it is served, also with a token never seen before.
        gate.authenticate(ip("10.0.0.1"), Ok("good"))
            .await
            .expect("another peer");
        // And a token accepted before is served from the refused address too (a node's
        // address is shared with its hostNetwork pods); an unknown one is not.
        gate.authenticate(ip("10.0.0.9"), Ok("good"))
            .await
            .expect("accepted before");
        assert!(matches!(
            gate.authenticate(ip("10.0.0.9"), Ok("never-seen")).await,
            Err(GateError::TooManyFailures { .. })
        ));
    }

    #[tokio::test]
    async fn neighbours_on_a_shared_address_cannot_lock_out_an_agent_that_has_been_accepted() {
        // Verdicts expire at once: every request of the agent is checked again.
        let (gate, auth) = gate_caching(Duration::from_millis(200), Duration::ZERO);
        let node = ip("10.0.0.5");
        gate.authenticate(node, Ok("good"))
            .await
            .expect("the agent");
        let checks = || auth.checks.load(Ordering::SeqCst);
        // Its neighbours on the address hold both check slots: the agent is checked anyway.
        let mut holding = Vec::new();
        for i in 0..2 {
            let gate = gate.clone();
            holding.push(tokio::spawn(async move {
                gate.authenticate(node, Ok(&format!("slow-{i}"))).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = checks();
        gate.authenticate(node, Ok("good"))
            .await
            .expect("beside the held slots");
        assert_eq!(checks(), before + 1, "checked again");
        for h in holding {
            assert!(h.await.expect("task").is_err());
        }
        // They use up the address's failures: the agent is still checked and served.
        for i in 0..3 {
            let _ = gate.authenticate(node, Ok(&format!("forged-{i}"))).await;
        }
        assert!(matches!(
            gate.authenticate(node, Ok("forged-6")).await,
            Err(GateError::TooManyFailures { .. })
        ));
        let before = checks();
        gate.authenticate(node, Ok("good"))
            .await
            .expect("past the failure budget");
        assert_eq!(checks(), before + 1, "checked again");
    }

    #[tokio::test]
    async fn a_peer_runs_only_so_many_checks_at_once() {
        let (gate, _) = gate(Duration::from_millis(300));
        let mut all = Vec::new();
        for i in 0..4 {
            let gate = gate.clone();
            all.push(tokio::spawn(async move {
                gate.authenticate(ip("10.0.0.9"), Ok(&format!("forged-{i}")))
                    .await
            }));
        }
        let mut busy = 0;
        for r in all {
            if matches!(r.await.expect("task"), Err(GateError::TooManyChecks { .. })) {
                busy += 1;
            }
        }
        assert_eq!(busy, 2, "two checks run, two are refused");
        assert_eq!(
            gate.verdicts.lock().expect("verdicts").len(),
            2,
            "the refused ones leave nothing behind"
        );
        gate.authenticate(ip("10.0.0.1"), Ok("good"))
            .await
            .expect("another peer is not affected");
    }
}

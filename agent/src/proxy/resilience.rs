//! What keeps retries and bursts from hurting a Service: a retry budget (retries may add at
//! most a share of the requests of the last ten seconds, plus a floor per second, Linkerd's
//! budget: 20 % and 10/s), and local rate limits (a token bucket, overall or per source
//! identity) whose refusals say when to come back. Time is passed in, so both are tested
//! without sleeping. Nothing here owns a socket.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window a retry budget looks back over, in one-second slots.
const WINDOW: usize = 10;

/// Retries allowed as a share of recent requests.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: u32,
    slots: Mutex<Slots>,
}

#[derive(Debug)]
struct Slots {
    start: Instant,
    /// (second since `start`, requests, retries) per slot.
    counts: [(u64, u32, u32); WINDOW],
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: u32, now: Instant) -> Self {
        Self {
            ratio,
            min_per_sec,
            slots: Mutex::new(Slots {
                start: now,
                counts: [(u64::MAX, 0, 0); WINDOW],
            }),
        }
    }

    fn with_slot<T>(&self, now: Instant, f: impl FnOnce(&mut Slots, usize, u64) -> T) -> T {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let second = now.saturating_duration_since(s.start).as_secs();
        let i = (second % WINDOW as u64) as usize;
        if s.counts[i].0 != second {
            s.counts[i] = (second, 0, 0);
        }
        f(&mut s, i, second)
    }

    /// Counts an original request (not a retry).
    pub fn deposit(&self, now: Instant) {
        self.with_slot(now, |s, i, _| s.counts[i].1 += 1);
    }

    /// Takes one retry from the budget if it has one.
    pub fn withdraw(&self, now: Instant) -> bool {
        self.with_slot(now, |s, i, second| {
            let recent = |c: &(u64, u32, u32)| second.saturating_sub(c.0) < WINDOW as u64;
            let (requests, retries) = s
                .counts
                .iter()
                .filter(|c| c.0 != u64::MAX && recent(c))
                .fold((0u64, 0u64), |(q, r), c| {
                    (q + u64::from(c.1), r + u64::from(c.2))
                });
            let allowed =
                f64::from(self.min_per_sec) * WINDOW as f64 + self.ratio * requests as f64;
            if (retries as f64) < allowed {
                s.counts[i].2 += 1;
                true
            } else {
                false
            }
        })
    }
}

/// A local rate limit: `per_second` requests on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets, one per key (a source identity, or one for everyone).
#[derive(Debug)]
pub struct RateLimiter {
    limit: Limit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Above this many keys, buckets that are full again are forgotten.
const MAX_KEYS: usize = 10_000;

impl RateLimiter {
    pub fn new(limit: Limit) -> Self {
        Self {
            limit,
            buckets: Mutex::default(),
        }
    }

    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// Takes a token for `key`, or says how long until one is there.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let Limit { per_second, burst } = self.limit;
        let full = f64::from(burst.max(1));
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() > MAX_KEYS {
            all.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second < full
            });
        }
        let b = all.entry(key.to_owned()).or_insert(Bucket {
            tokens: full,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_second).min(full);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else if per_second <= 0.0 {
            Err(Duration::from_secs(1))
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_by_a_share_of_recent_requests_over_a_floor() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(0.2, 1, t0);
        // The floor: one a second over the window, ten, with no requests at all.
        let granted = (0..20).filter(|_| budget.withdraw(t0)).count();
        assert_eq!(granted, 10);
        // 100 requests add 20 more.
        for _ in 0..100 {
            budget.deposit(t0);
        }
        let granted = (0..50).filter(|_| budget.withdraw(t0)).count();
        assert_eq!(granted, 20);
        // Ten seconds later the window has forgotten them all.
        let later = t0 + Duration::from_secs(10);
        let granted = (0..50).filter(|_| budget.withdraw(later)).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate_and_says_when_to_retry() {
        let t0 = Instant::now();
        let rl = RateLimiter::new(Limit {
            per_second: 10.0,
            burst: 5,
        });
        for _ in 0..5 {
            assert_eq!(rl.take("a", t0), Ok(()));
        }
        let wait = rl.take("a", t0).expect_err("past the burst");
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(rl.take("b", t0), Ok(()), "another key has its own bucket");
        assert_eq!(rl.take("a", t0 + Duration::from_millis(100)), Ok(()));
        assert!(rl.take("a", t0 + Duration::from_millis(150)).is_err());
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        let ok = (0..10).filter(|_| rl.take("a", later).is_ok()).count();
        assert_eq!(ok, 5);
    }
}

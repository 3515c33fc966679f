//! Which endpoint serves a routed (L7) request: power of two choices over a cost that grows with
//! the endpoint's requests in flight and its peak-EWMA latency (Linkerd's default), or round
//! robin; endpoints that keep failing are ejected for an exponentially growing, jittered time
//! (Linkerd's failure accrual: 7 consecutive failures, 1 s to 60 s), never more than a bounded
//! share of a Service's endpoints at once. A retried request goes to an endpoint it has not
//! tried when there is one.
//!
//! The state is node-wide and keyed by endpoint address, so it outlives snapshots: a new
//! EndpointSlice does not forget that an endpoint was failing. Time comes from a clock the
//! caller passes in, so the state machines are tested without sleeping. Nothing here owns a
//! socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a Service's endpoints are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Two endpoints drawn at random; the cheaper one (in flight × latency) serves.
    #[default]
    PeakEwma,
    RoundRobin,
}

/// When an endpoint is ejected, and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlier {
    /// Failures in a row (5xx answers, connect failures) that eject; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further one doubles it, up to `max_ejection`.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share of a Service's endpoints is ejected at once.
    pub max_ejected_share: f64,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 7,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
            max_ejected_share: 0.5,
        }
    }
}

/// What an attempt's outcome did to its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Ejected(Duration),
    /// Its first success after an ejection: back in full, backoff reset.
    Restored,
}

/// The failure-accrual state of one endpoint.
#[derive(Debug, Clone, Default)]
pub struct Ejection {
    consecutive: u32,
    until: Option<Instant>,
    /// Ejections since the last success after one: the next backoff's exponent.
    times: u32,
}

impl Ejection {
    pub fn ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Records an attempt's outcome. `may_eject` is false when ejecting would exceed the
    /// Service's share; `jitter` in [0, 1) lengthens the backoff by up to a tenth.
    pub fn record(
        &mut self,
        ok: bool,
        now: Instant,
        cfg: &Outlier,
        may_eject: bool,
        jitter: f64,
    ) -> Option<Change> {
        if ok {
            self.consecutive = 0;
            if self.times > 0 && !self.ejected(now) {
                self.times = 0;
                self.until = None;
                return Some(Change::Restored);
            }
            return None;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        if cfg.consecutive_failures == 0 || self.ejected(now) || !may_eject {
            return None;
        }
        // Back from an ejection, one failure is enough to go again (probation).
        let probation = self.times > 0;
        if !probation && self.consecutive < cfg.consecutive_failures {
            return None;
        }
        let doubled = cfg
            .base_ejection
            .saturating_mul(1u32.checked_shl(self.times.min(16)).unwrap_or(u32::MAX));
        let backoff = doubled
            .min(cfg.max_ejection)
            .mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 10.0)
            .min(cfg.max_ejection);
        self.until = Some(now + backoff);
        self.times = self.times.saturating_add(1);
        self.consecutive = 0;
        Some(Change::Ejected(backoff))
    }
}

/// One endpoint's load and health.
#[derive(Debug, Default)]
struct Endpoint {
    in_flight: AtomicUsize,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Health {
    ejection: Ejection,
    /// Peak-EWMA of response latency, microseconds (0: none measured yet).
    ewma_us: f64,
    last: Option<Instant>,
}

/// The time constant of the latency average: a slow answer counts at once (peak), a fast one
/// pulls the average down over about this long, and so does time without answers. Shorter
/// than Linkerd's 10 s: a node proxy sees every client of the node, so it measures often.
const DECAY: Duration = Duration::from_secs(1);

impl Health {
    /// The average as of `now`: decayed since it was last updated.
    fn decayed(&self, now: Instant) -> f64 {
        let Some(last) = self.last else {
            return self.ewma_us;
        };
        let elapsed = now.saturating_duration_since(last).as_secs_f64();
        self.ewma_us * (-elapsed / DECAY.as_secs_f64()).exp()
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_secs_f64() * 1e6;
        if rtt > self.ewma_us {
            self.ewma_us = rtt;
        } else {
            let elapsed = self
                .last
                .map_or(DECAY, |l| now.saturating_duration_since(l))
                .as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            self.ewma_us = self.ewma_us * w + rtt * (1.0 - w);
        }
        self.last = Some(now);
    }
}

/// A request counted in flight on its endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Node-wide endpoint state.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
    cursors: Mutex<HashMap<String, usize>>,
}

/// Above this many endpoints known, idle healthy ones are forgotten.
const PRUNE_ABOVE: usize = 4096;

impl Balancer {
    fn endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
        let mut all = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if all.len() > PRUNE_ABOVE {
            all.retain(|_, e| {
                Arc::strong_count(e) > 1
                    || e.in_flight.load(Ordering::Relaxed) > 0
                    || e.health
                        .lock()
                        .map(|h| h.ejection.times > 0)
                        .unwrap_or(true)
            });
        }
        all.entry(addr).or_default().clone()
    }

    pub fn ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        let e = self.endpoint(addr);
        let h = e.health.lock().unwrap_or_else(|p| p.into_inner());
        h.ejection.ejected(now)
    }

    /// The endpoint for the next attempt of a request to `service`: among `candidates` not
    /// ejected and not `tried`; failing that, not ejected; failing that (every one ejected,
    /// which the share bound keeps rare), any. `draw` gives numbers in [0, 1).
    pub fn pick(
        &self,
        service: &str,
        candidates: &[SocketAddr],
        tried: &[SocketAddr],
        algorithm: Algorithm,
        now: Instant,
        draw: &mut dyn FnMut() -> f64,
    ) -> Option<SocketAddr> {
        let live: Vec<SocketAddr> = candidates
            .iter()
            .copied()
            .filter(|a| !self.ejected(*a, now))
            .collect();
        let fresh: Vec<SocketAddr> = live
            .iter()
            .copied()
            .filter(|a| !tried.contains(a))
            .collect();
        let pool = if !fresh.is_empty() {
            fresh
        } else if !live.is_empty() {
            live
        } else {
            candidates.to_vec()
        };
        match pool.len() {
            0 => None,
            1 => Some(pool[0]),
            n => Some(match algorithm {
                Algorithm::RoundRobin => {
                    let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
                    let c = cursors.entry(service.to_owned()).or_default();
                    *c = c.wrapping_add(1);
                    pool[*c % n]
                }
                Algorithm::PeakEwma => {
                    let i = ((draw() * n as f64) as usize).min(n - 1);
                    let mut j = ((draw() * (n - 1) as f64) as usize).min(n - 2);
                    if j >= i {
                        j += 1;
                    }
                    let (a, b) = (pool[i], pool[j]);
                    if self.cost(b, now) < self.cost(a, now) {
                        b
                    } else {
                        a
                    }
                }
            }),
        }
    }

    /// In flight (plus this one) × latency. The latency decays while nothing is measured, so
    /// an endpoint that was slow once is tried again (Linkerd's peak EWMA); one with no
    /// latency measured yet counts as 1 µs, so new endpoints get tried.
    fn cost(&self, addr: SocketAddr, now: Instant) -> f64 {
        let e = self.endpoint(addr);
        let in_flight = e.in_flight.load(Ordering::Relaxed) as f64;
        let ewma = e
            .health
            .lock()
            .map(|h| h.decayed(now))
            .unwrap_or(0.0)
            .max(1.0);
        (in_flight + 1.0) * ewma
    }

    /// Counts a request in flight on `addr` until the guard drops.
    pub fn start(&self, addr: SocketAddr) -> InFlight {
        let e = self.endpoint(addr);
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(e)
    }

    /// Records an attempt's outcome on `addr`, one of `siblings` (the Service's endpoints, for
    /// the share bound). `latency` is how long the answer took, when one came.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        addr: SocketAddr,
        siblings: &[SocketAddr],
        ok: bool,
        latency: Option<Duration>,
        cfg: &Outlier,
        now: Instant,
        jitter: f64,
    ) -> Option<Change> {
        let ejected_now = siblings
            .iter()
            .filter(|s| **s != addr && self.ejected(**s, now))
            .count();
        let allowed = (siblings.len() as f64 * cfg.max_ejected_share).floor() as usize;
        let may_eject = ejected_now < allowed;
        let e = self.endpoint(addr);
        let mut h = e.health.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rtt) = latency {
            h.observe(rtt, now);
        }
        h.ejection.record(ok, now, cfg, may_eject, jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    #[test]
    fn seven_failures_eject_and_backoff_doubles_until_a_success_resets_it() {
        let cfg = Outlier::default();
        let t0 = Instant::now();
        let mut e = Ejection::default();
        for _ in 0..6 {
            assert_eq!(e.record(false, t0, &cfg, true, 0.0), None);
        }
        assert_eq!(
            e.record(false, t0, &cfg, true, 0.0),
            Some(Change::Ejected(Duration::from_secs(1)))
        );
        assert!(e.ejected(t0 + Duration::from_millis(999)));
        assert!(!e.ejected(t0 + Duration::from_secs(1)));
        // Back on probation: one failure ejects again, for twice as long (plus jitter).
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            e.record(false, t1, &cfg, true, 0.5),
            Some(Change::Ejected(Duration::from_millis(2100)))
        );
        let t2 = t1 + Duration::from_millis(2100);
        assert_eq!(e.record(true, t2, &cfg, true, 0.0), Some(Change::Restored));
        // Restored: it takes seven failures again, and the backoff starts over.
        for _ in 0..6 {
            assert_eq!(e.record(false, t2, &cfg, true, 0.0), None);
        }
        assert_eq!(
            e.record(false, t2, &cfg, true, 0.0),
            Some(Change::Ejected(Duration::from_secs(1)))
        );
    }

    #[test]
    fn backoff_is_capped_a_success_between_failures_resets_the_count_and_the_share_holds() {
        let cfg = Outlier {
            consecutive_failures: 2,
            ..Outlier::default()
        };
        let mut now = Instant::now();
        let mut e = Ejection::default();
        let mut last = Duration::ZERO;
        for _ in 0..12 {
            // On probation the first failure ejects; the first time it takes two.
            for _ in 0..2 {
                if let Some(Change::Ejected(d)) = e.record(false, now, &cfg, true, 0.99) {
                    last = d;
                }
            }
            now += Duration::from_secs(120);
        }
        assert_eq!(last, Duration::from_secs(60), "capped at the maximum");

        let mut e = Ejection::default();
        for _ in 0..10 {
            assert_eq!(e.record(false, now, &cfg, true, 0.0), None);
            assert_eq!(e.record(true, now, &cfg, true, 0.0), None);
        }
        // Not allowed by the share: counted, not ejected.
        assert_eq!(e.record(false, now, &cfg, false, 0.0), None);
        assert_eq!(e.record(false, now, &cfg, false, 0.0), None);
        assert!(!e.ejected(now));

        let b = Balancer::default();
        let all = [addr(1), addr(2), addr(3)];
        let fail = |a| b.record(a, &all, false, None, &cfg, now, 0.0);
        fail(addr(1));
        assert!(matches!(fail(addr(1)), Some(Change::Ejected(_))));
        fail(addr(2));
        assert_eq!(fail(addr(2)), None, "a second of three would exceed half");
        assert!(b.ejected(addr(1), now) && !b.ejected(addr(2), now));
    }

    #[test]
    fn picks_skip_ejected_and_tried_endpoints_and_prefer_the_cheaper_of_two() {
        let b = Balancer::default();
        let now = Instant::now();
        let all = [addr(1), addr(2), addr(3)];
        let cfg = Outlier {
            consecutive_failures: 1,
            ..Outlier::default()
        };
        b.record(addr(1), &all, false, None, &cfg, now, 0.0);
        let mut seq = [0.0, 0.0, 0.99, 0.5].into_iter().cycle();
        let mut draw = move || seq.next().unwrap_or(0.0);
        for _ in 0..20 {
            let p = b
                .pick("s", &all, &[addr(2)], Algorithm::PeakEwma, now, &mut draw)
                .expect("pick");
            assert_eq!(p, addr(3), "1 is ejected and 2 was tried");
        }
        // Everything tried or ejected: a tried one again, never the ejected one.
        let p = b.pick(
            "s",
            &all,
            &[addr(2), addr(3)],
            Algorithm::RoundRobin,
            now,
            &mut draw,
        );
        assert!(matches!(p, Some(a) if a != addr(1)));

        // Two healthy: the one with fewer requests in flight and lower latency wins.
        let b = Balancer::default();
        let two = [addr(1), addr(2)];
        b.record(
            addr(1),
            &two,
            true,
            Some(Duration::from_millis(50)),
            &cfg,
            now,
            0.0,
        );
        b.record(
            addr(2),
            &two,
            true,
            Some(Duration::from_millis(1)),
            &cfg,
            now,
            0.0,
        );
        let _busy = b.start(addr(2));
        for d in [0.0, 0.6] {
            let mut draw = move || d;
            assert_eq!(
                b.pick("s", &two, &[], Algorithm::PeakEwma, now, &mut draw),
                Some(addr(2)),
                "1 ms with one in flight is cheaper than 50 ms idle"
            );
        }
        let rr: Vec<_> = (0..4)
            .filter_map(|_| b.pick("t", &all, &[], Algorithm::RoundRobin, now, &mut || 0.0))
            .collect();
        assert_eq!(rr.len(), 4);
        assert_ne!(rr[0], rr[1]);
    }
}

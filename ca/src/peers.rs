//! Budgets per peer address, so one noisy or hostile client (a pod) cannot use up what every
//! other client shares: the CA's handshakes, connections and authentication attempts, and the
//! node proxy's outbound connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Open things (connections, handshakes) counted by peer address, each address capped.
#[derive(Debug)]
pub struct PerSource {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open thing counted against its address's cap until dropped.
#[derive(Debug)]
pub struct SourceSlot {
    share: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `ip`, unless it already holds its cap.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            share: self.clone(),
            ip,
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// How many `ip` holds now.
    pub fn held(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.share.open.lock().unwrap_or_else(|p| p.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut e) = open.entry(self.ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// Failures per address in a fixed window: once an address has failed `max` times in `window`,
/// it is refused until the window ends, before any costly work is done for it.
#[derive(Debug)]
pub struct FailureBudget {
    max: u32,
    window: Duration,
    /// Address → (window start, failures in it).
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Addresses remembered at most; past it, windows that have ended are forgotten first.
const REMEMBERED: usize = 65_536;

impl FailureBudget {
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` while `ip` has used up its failures: how long until it may try again.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get(&ip) {
            Some((start, n)) if *n >= self.max && start.elapsed() < self.window => {
                Err(self.window - start.elapsed())
            }
            _ => Ok(()),
        }
    }

    /// Counts one failure of `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= REMEMBERED {
            let window = self.window;
            seen.retain(|_, (start, _)| start.elapsed() < window);
            if seen.len() >= REMEMBERED {
                // Still full of live windows: forget the oldest half rather than grow.
                let mut starts: Vec<Instant> = seen.values().map(|(s, _)| *s).collect();
                starts.sort();
                let cut = starts[starts.len() / 2];
                seen.retain(|_, (start, _)| *start > cut);
            }
        }
        let entry = seen.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_cap_and_gets_slots_back() {
        let caps = PerSource::new(2);
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let first = caps.try_take(a).expect("1");
        let _second = caps.try_take(a).expect("2");
        assert!(caps.try_take(a).is_none(), "a holds its cap");
        assert!(caps.try_take(b).is_some(), "b is not affected");
        drop(first);
        assert_eq!(caps.held(a), 1);
        assert!(caps.try_take(a).is_some(), "a slot back");
    }

    #[test]
    fn an_address_that_keeps_failing_waits_for_its_window_to_end() {
        let budget = FailureBudget::new(3, Duration::from_millis(200));
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        for _ in 0..3 {
            assert!(budget.check(a).is_ok());
            budget.failed(a);
        }
        assert!(budget.check(a).is_err(), "used up");
        assert!(budget.check(b).is_ok(), "others are not");
        std::thread::sleep(Duration::from_millis(250));
        assert!(budget.check(a).is_ok(), "a new window");
    }
}

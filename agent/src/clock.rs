//! Wall-clock time for the agent's timers (certificate renewal, the identity collector's grace
//! and quarantine, Leases), which tests move forward instead of sleeping through. The system clock is the default; a moved clock is the system's plus the
//! moves, so real time still passes on it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A clock; clones share their moves.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    ahead: Mutex<Duration>,
    /// Told on every move, so sleepers recompute their deadline.
    moved: tokio::sync::watch::Sender<u64>,
}

impl Clock {
    /// The system clock (until someone calls [`Clock::advance`] on it or a clone).
    pub fn system() -> Self {
        Self::default()
    }

    /// What time it is on this clock.
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + *self.inner.ahead.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the clock forward by `by`; timers whose time has come fire.
    pub fn advance(&self, by: Duration) {
        *self.inner.ahead.lock().unwrap_or_else(|p| p.into_inner()) += by;
        self.inner.moved.send_modify(|n| *n += 1);
    }

    /// The same time as a Lease candidate reads it (`signet_ca::lease::Elector::with_clock`).
    pub fn for_lease(&self) -> signet_ca::lease::Clock {
        let clock = self.clone();
        Arc::new(move || clock.timestamp())
    }

    /// This clock's time as a Kubernetes timestamp.
    pub fn timestamp(&self) -> jiff::Timestamp {
        jiff::Timestamp::try_from(self.now()).unwrap_or_else(|_| jiff::Timestamp::now())
    }

    /// Waits until `d` has passed on this clock: in real time, or by moves, or both.
    pub async fn sleep(&self, d: Duration) {
        let deadline = self.now() + d;
        let mut moved = self.inner.moved.subscribe();
        loop {
            let left = deadline
                .duration_since(self.now())
                .unwrap_or(Duration::ZERO);
            if left.is_zero() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(left) => {}
                _ = moved.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sleep_ends_when_the_clock_is_moved_past_it() {
        let clock = Clock::system();
        let sleep = clock.sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        let short = Duration::from_millis(20);
        assert!(tokio::time::timeout(short, &mut sleep).await.is_err());
        clock.advance(Duration::from_secs(1800));
        assert!(
            tokio::time::timeout(short, &mut sleep).await.is_err(),
            "half way is not there"
        );
        clock.advance(Duration::from_secs(1801));
        tokio::time::timeout(Duration::from_secs(5), &mut sleep)
            .await
            .expect("woken by the move");
        assert!(clock.now() > SystemTime::now() + Duration::from_secs(3600));
    }
}

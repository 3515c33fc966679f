//! One drain for every task the agent starts: [`Drain::spawn`] is the only way to start one
//! (`clippy.toml` refuses a bare `tokio::spawn` in this crate), so shutdown reaches all of them.
//!
//! Shutdown has two steps. [`Drain::stopping`] fires first: listeners stop accepting, HBONE
//! connections send GOAWAY, loops return, and open connections may run to their end. When the
//! grace period is over, [`Drain::forced`] fires and every task still running is dropped where it
//! stands (its sockets close), so the process never outlives its grace period by more than the
//! time a task takes to notice.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

/// How long tasks get, once forced, to finish dropping before shutdown stops waiting for them.
const FORCE_WAIT: Duration = Duration::from_secs(1);

/// Tracks every task of one agent and stops them in two steps.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    stop: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `fut` as a task named `name`, inside the caller's span, counted by the drain and
    /// dropped when the drain is forced (then the handle yields `None`).
    pub fn spawn<F>(&self, name: &'static str, fut: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let force = self.force.clone();
        let span = tracing::debug_span!("task", task = name);
        #[allow(clippy::disallowed_methods)] // the one place a task starts
        self.tracker.spawn(
            async move {
                tokio::select! {
                    biased;
                    () = force.cancelled() => None,
                    out = fut => Some(out),
                }
            }
            // The task's own span is a debug one: when it is disabled, the caller's span must
            // still be the task's.
            .instrument(span)
            .in_current_span(),
        )
    }

    /// Fires when shutdown starts: stop accepting, finish what is open.
    pub fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// Whether shutdown has started.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// The stop signal as a token, for components that take one (the Kubernetes reflectors).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Fires when the grace period is over.
    pub fn forced(&self) -> WaitForCancellationFuture<'_> {
        self.force.cancelled()
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Starts shutdown without waiting (a start that fails half-way stops what it started).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Stops accepting, lets tasks finish within `grace`, then drops the rest. Returns how many
    /// tasks had to be dropped.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        tracing::warn!(
            tasks = left,
            grace_seconds = grace.as_secs_f64(),
            "grace period over; closing what is still open"
        );
        self.force.cancel();
        if tokio::time::timeout(FORCE_WAIT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tracker.len(),
                "tasks still running after the force deadline"
            );
        }
        left
    }
}

/// hyper's HTTP/2 streams start through the drain too.
impl<F> hyper::rt::Executor<F> for Drain
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.spawn("http stream", fut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_on_stop_ends_within_grace_and_one_that_does_not_is_dropped() {
        let drain = Drain::new();
        let polite = {
            let d = drain.clone();
            drain.spawn("polite", async move { d.stopping().await })
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stubborn = drain.spawn("stubborn", async move {
            // Holds the sender until dropped: the receiver sees the drop.
            let _tx = tx;
            std::future::pending::<()>().await
        });
        assert_eq!(drain.running(), 2);
        let dropped = drain.shutdown(Duration::from_secs(5)).await;
        assert_eq!(
            dropped, 1,
            "only the stubborn task outlived the grace period"
        );
        assert_eq!(polite.await.expect("joined"), Some(()));
        assert_eq!(
            stubborn.await.expect("joined"),
            None,
            "dropped, not finished"
        );
        assert!(rx.await.is_err(), "the stubborn task's state was dropped");
        assert_eq!(drain.running(), 0);
    }

    /// A writer that keeps what the fmt layer writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What a task spawned inside a `caller` span logs, with the subscriber at `level`.
    async fn logged_by_a_child(level: tracing::Level) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(level)
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let drain = Drain::new();
        let child = {
            let _caller = tracing::info_span!("caller", pod = "web-0").entered();
            drain.spawn("child", async {
                tracing::info!("from the child");
            })
        };
        child.await.expect("joined");
        assert_eq!(drain.shutdown(Duration::from_secs(1)).await, 0);
        String::from_utf8(out.0.lock().expect("not poisoned").clone()).expect("utf-8")
    }

    #[tokio::test]
    async fn spawned_tasks_log_inside_the_callers_span() {
        let info = logged_by_a_child(tracing::Level::INFO).await;
        assert!(
            info.contains("caller{pod=\"web-0\"}: ") && info.contains("from the child"),
            "{info}"
        );
        let debug = logged_by_a_child(tracing::Level::DEBUG).await;
        assert!(
            debug.contains("caller{pod=\"web-0\"}:task{task=\"child\"}: "),
            "{debug}"
        );
    }
}

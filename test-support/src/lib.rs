//! What Signet's tests share, in one place: the CA's, the agent's and the end-to-end suites'.
//!
//! - [`api::FakeApi`]: an in-memory Kubernetes API server (no real one runs on these machines)
//!   that speaks the real REST paths and JSON objects, in process as a `kube::Client` or over
//!   HTTP on an address of the test's choosing.
//! - [`wait_for`] / [`wait_until`]: a condition asked until it holds, instead of a fixed sleep.
//! - [`unique`]: names no other test or test run uses.
//! - [`privileged`]: the root check that fails clearly, or counts as skipped when asked to.
//! - [`netns::NetNs`], [`netns::in_netns`] and [`cgroup::Cgroup`]: kernel objects of the
//!   test's own, removed on drop, also when the test fails.
//! - [`promtool_accepts`] and [`Steps`].
//!
//! It depends on neither `signet-agent` nor `signet-ca`.

pub mod api;
pub mod cgroup;
pub mod netns;
pub mod streams;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long [`wait_for`] and [`wait_until`] wait before they fail.
pub const WAIT: Duration = Duration::from_secs(30);
/// How often [`wait_for`] asks: its conditions are often processes (curl, an admin request in a
/// namespace), which a 2-core machine should not spawn more often than this.
const POLL_BLOCKING: Duration = Duration::from_millis(200);
/// How often [`wait_until`] asks: its conditions are in-process reads.
const POLL: Duration = Duration::from_millis(50);

/// A name no other test of this process, nor another process, uses: `<pid>-<counter>`.
pub fn unique() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// `f`'s first `Some`, asked every 200 ms for up to [`WAIT`]; panics naming `what` after that.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(POLL_BLOCKING);
    }
}

/// [`wait_for`] inside a tokio runtime, asked every 50 ms: the runtime keeps running while it
/// waits.
pub async fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// `true` when the test may go on. Without root: `false` (skip) when `SIGNET_SKIP_PRIVILEGED=1`
/// asks for it, recording the test in `SIGNET_SKIP_LOG` so `tests/run.sh` counts it as skipped
/// rather than passed; a panic that says what is missing otherwise.
pub fn privileged() -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("SIGNET_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        let test = std::thread::current()
            .name()
            .unwrap_or("unnamed test")
            .to_owned();
        eprintln!("skipped: {test} needs root (SIGNET_SKIP_PRIVILEGED=1)");
        if let Some(log) = std::env::var_os("SIGNET_SKIP_LOG") {
            use std::io::Write as _;
            // One write per line: appends of a line are not interleaved.
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .and_then(|mut f| f.write_all(format!("{test}\n").as_bytes()));
        }
        return false;
    }
    panic!(
        "this test needs root (eBPF programs, network namespaces, cgroups); run as root or set SIGNET_SKIP_PRIVILEGED=1 to skip it"
    );
}

/// Fails unless `promtool check metrics` (Debian's `prometheus` package, which `tests/run.sh`
/// installs) accepts `text` as a Prometheus exposition.
pub fn promtool_accepts(text: &str) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e} (tests/run.sh installs the prometheus package)"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics refused the exposition: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The named steps of a long end-to-end test over one shared setup: a failure says which
/// behaviour broke and which passed before it (cargo shows a failed test's stderr).
#[derive(Debug, Default)]
pub struct Steps {
    current: Option<&'static str>,
    passed: Vec<&'static str>,
}

impl Steps {
    /// The previous step passed; `name` starts.
    pub fn to(&mut self, name: &'static str) {
        self.passed.extend(self.current.replace(name));
        eprintln!("step: {name}");
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "FAILED in step `{}` (passed before it: {})",
                self.current.unwrap_or("setup"),
                if self.passed.is_empty() {
                    "none".to_owned()
                } else {
                    self.passed.join("; ")
                }
            );
        }
    }
}

/// Runs `ip` with `args`; panics with its error output when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (apt-get install iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! `signet connectivity test`: a built-in suite that deploys its own workloads (pods running
//! `signet echo`) into its own namespaces, runs named scenarios against the mesh, reports each
//! with ✅/❌ and a reason, removes what it made, and exits non-zero on any failure.
//!
//! Scenarios come in phases (`scenarios.rs`). A phase puts its policies in force, waits until
//! every agent has applied them, and runs its scenarios concurrently (they only make
//! connections); a serial phase (one that stops an agent or holds a connection across a policy
//! change) runs its steps in order, and a `--test` filter that selects any of them runs them
//! all. The certificate-rotation scenario runs in the background, beside the phases, on pods of
//! its own that no phase's policy selects, and is joined before a phase that disturbs agents.
//!
//! The workloads live in `local.rs`: network namespaces wired to the topology's nodes as the demo
//! wires its pods, cgroups under each node's cgroup root, and manifests and policies in the
//! cluster state directory the agents read.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde::Serialize;

pub mod capture;
pub mod kube;
pub mod local;
pub mod scenarios;

pub use local::{AgentControl, ProcessAgents};
use local::{Capture, Names, Src};

/// A node as the scenarios see it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub address: std::net::Ipv4Addr,
}

/// Where the suite's workloads run: pods the suite wires itself on the local topology
/// (`local.rs`), or Deployments in a cluster (`kube.rs`). The scenarios see only this.
pub trait Workloads: Send + Sync + std::fmt::Debug {
    fn pod_ip(&self, pod: &str) -> std::net::Ipv4Addr;
    /// `namespace/name` of the pod as the cluster (and the flow log) names it.
    fn pod_ref(&self, pod: &str) -> String;
    /// The index of the node the pod runs on.
    fn pod_node(&self, pod: &str) -> usize;
    /// Puts `yaml` (the suite's policies; empty for none) in force and waits until every agent
    /// enforces exactly it; an agent's refusal is the error.
    fn apply_policies(&self, yaml: &str) -> Result<(), String>;
    /// The flows `node` recorded since `since_ms` (Unix milliseconds).
    fn flows(&self, node: usize, since_ms: u64) -> Result<Vec<crate::flow::FlowEntry>, String>;
    /// What `node`'s agent has in force (`/debug/state`).
    fn debug_state(&self, node: usize) -> Result<serde_json::Value, String>;
    /// One exchange of `signet echo client` with `args`, run at `from`.
    fn client(&self, from: Src<'_>, args: &[&str]) -> crate::cli::echo::Exchange;
    /// A client that goes on (`--hold`, `--repeat-ms`) until told to stop.
    fn spawn_client(&self, from: Src<'_>, args: &[&str]) -> Result<Running, String>;
    /// Frames on `node`'s underlay while `during` runs.
    fn capture_underlay(
        &self,
        node: usize,
        marker: &[u8],
        during: &mut dyn FnMut(),
    ) -> Result<Capture, String>;
    fn stop_agent(&self, node: usize) -> Result<(), String>;
    fn agent_down(&self, node: usize) -> bool;
    /// Starts a stopped agent again and waits until everything is OK.
    fn start_agent(&self, node: usize) -> Result<(), String>;
    /// Leaves everything in place (--keep).
    fn keep(&self);
    /// Removes everything the suite made.
    fn remove(&self) -> Result<(), String>;
}

/// A client that runs until told to stop: a process here, or an exec session in a pod.
pub trait Session: Send + std::fmt::Debug {
    /// The next line it printed, as JSON.
    fn next_line(&mut self) -> Result<serde_json::Value, String>;
    /// Whether it has ended on its own within `within`.
    fn ended_within(&mut self, within: Duration) -> bool;
    /// Closes its input and reads its last report.
    fn finish(self: Box<Self>) -> Result<crate::cli::echo::Exchange, String>;
}

/// A running client (see [`Session`]).
#[derive(Debug)]
pub struct Running(Box<dyn Session>);

impl Running {
    pub fn new(s: impl Session + 'static) -> Self {
        Self(Box::new(s))
    }
    pub fn next_line(&mut self) -> Result<serde_json::Value, String> {
        self.0.next_line()
    }
    pub fn ended_within(&mut self, within: Duration) -> bool {
        self.0.ended_within(within)
    }
    pub fn finish(self) -> Result<crate::cli::echo::Exchange, String> {
        self.0.finish()
    }
}

/// The deployed suite as the scenarios see it.
#[derive(Debug)]
pub struct Env<'a> {
    pub names: Names,
    pub nodes: Vec<NodeInfo>,
    /// The outside machine's two addresses (a CIDR rule can name one and not the other), when
    /// there is one.
    pub outside: Option<[std::net::Ipv4Addr; 2]>,
    pub service_ip: std::net::Ipv4Addr,
    pub gateway_port: u16,
    /// Per node: whether it runs strict mTLS.
    pub strict: Vec<bool>,
    /// Whether `Src::Uncaptured` runs in the pod's own network namespace (else on its node's
    /// host network).
    pub uncaptured_in_pod: bool,
    /// Whether a stopped agent stays down until started again (else something replaces it at
    /// once: a DaemonSet).
    pub agent_stays_down: bool,
    pub workloads: Box<dyn Workloads + 'a>,
}

impl Env<'_> {
    pub fn pod_ip(&self, pod: &str) -> std::net::Ipv4Addr {
        self.workloads.pod_ip(pod)
    }
    pub fn pod_node(&self, pod: &str) -> usize {
        self.workloads.pod_node(pod)
    }
    pub fn pod_ref(&self, pod: &str) -> String {
        self.workloads.pod_ref(pod)
    }
    pub fn apply_policies(&self, yaml: &str) -> Result<(), String> {
        self.workloads.apply_policies(yaml)
    }
    pub fn flows(&self, node: usize, since_ms: u64) -> Result<Vec<crate::flow::FlowEntry>, String> {
        self.workloads.flows(node, since_ms)
    }
    pub fn debug_state(&self, node: usize) -> Result<serde_json::Value, String> {
        self.workloads.debug_state(node)
    }
    pub fn client(&self, from: Src<'_>, args: &[&str]) -> crate::cli::echo::Exchange {
        self.workloads.client(from, args)
    }
    pub fn spawn_client(&self, from: Src<'_>, args: &[&str]) -> Result<Running, String> {
        self.workloads.spawn_client(from, args)
    }
    pub fn capture_underlay(
        &self,
        node: usize,
        marker: &[u8],
        mut during: impl FnMut(),
    ) -> Result<Capture, String> {
        self.workloads.capture_underlay(node, marker, &mut during)
    }
    pub fn stop_agent(&self, node: usize) -> Result<(), String> {
        self.workloads.stop_agent(node)
    }
    pub fn agent_down(&self, node: usize) -> bool {
        self.workloads.agent_down(node)
    }
    pub fn start_agent(&self, node: usize) -> Result<(), String> {
        self.workloads.start_agent(node)
    }
}

#[derive(Debug, Subcommand)]
pub enum ConnectivityCommand {
    /// Deploy test workloads, run the scenarios, report, clean up (exit 1 on any failure).
    Test(TestArgs),
    /// Remove what a run left behind (after --keep, or a run that was killed).
    Cleanup(CleanupArgs),
}

#[derive(Debug, Clone, Args)]
pub struct TestArgs {
    /// The topology file (default: $SIGNET_TOPOLOGY, else the demo's).
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// Run only scenarios whose name matches this regular expression.
    #[arg(long = "test")]
    pub test: Option<String>,
    /// Also write the results here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Leave the workloads and policies in place (remove them with `signet connectivity cleanup`).
    #[arg(long)]
    pub keep: bool,
    /// The suite's namespace (a second one, NAME-peer, holds the namespace-selector peer).
    #[arg(long, default_value = "signet-connectivity")]
    pub namespace: String,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Where the suite runs when not on the local topology.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Run in a cluster, through the Kubernetes API (in-cluster, $KUBECONFIG, or --kubeconfig):
    /// Deployments, a Service, a Gateway and IdentityPolicies; clients by exec.
    #[arg(long, conflicts_with = "topology")]
    pub kubernetes: bool,
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Where Signet runs (Kubernetes mode).
    #[arg(long, default_value = "signet-system", requires = "kubernetes")]
    pub signet_namespace: String,
    /// The image with `signet` in it (default: the agent DaemonSet's).
    #[arg(long, requires = "kubernetes")]
    pub image: Option<String>,
    /// Two addresses of this machine that the pods reach, `A,B`: it then plays the machine
    /// outside the cluster (clients from outside, the world server on the first).
    #[arg(long, requires = "kubernetes", value_parser = parse_outside)]
    pub outside: Option<OutsideAddrs>,
}

/// `--outside A,B`.
#[derive(Debug, Clone, Copy)]
pub struct OutsideAddrs(pub [std::net::Ipv4Addr; 2]);

fn parse_outside(s: &str) -> Result<OutsideAddrs, String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("`{s}`: expected two IPv4 addresses, `A,B`"))?;
    let parse = |x: &str| {
        x.trim()
            .parse()
            .map_err(|_| format!("`{x}`: not an IPv4 address"))
    };
    Ok(OutsideAddrs([parse(a)?, parse(b)?]))
}

impl ClusterArgs {
    fn options(&self) -> kube::KubeOptions {
        kube::KubeOptions {
            kubeconfig: self.kubeconfig.clone(),
            signet_namespace: self.signet_namespace.clone(),
            image: self.image.clone(),
            outside: self.outside.map(|o| o.0),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// The suite's namespace (Kubernetes mode).
    #[arg(long, default_value = "signet-connectivity")]
    pub namespace: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// How one scenario went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub name: String,
    pub verdict: Verdict,
    /// What was seen (and, failing, what was expected).
    pub detail: String,
    pub ms: u64,
}

impl Outcome {
    pub fn line(&self) -> String {
        let mark = match self.verdict {
            Verdict::Pass => "✅",
            Verdict::Fail => "❌",
            Verdict::Skip => "[=]",
        };
        format!("{mark} {}: {} ({} ms)", self.name, self.detail, self.ms)
    }
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SuiteReport {
    pub results: Vec<Outcome>,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub seconds: u64,
    /// What could not be removed afterwards (the run then fails too).
    pub cleanup_error: Option<String>,
}

impl SuiteReport {
    pub fn get(&self, name: &str) -> Option<&Outcome> {
        self.results.iter().find(|o| o.name == name)
    }

    /// The closing line, as `cilium connectivity test` ends its report.
    pub fn summary(&self) -> String {
        match &self.cleanup_error {
            Some(e) => format!("{}; ❌ not all removed: {e}", self.outcomes()),
            None => self.outcomes(),
        }
    }

    fn outcomes(&self) -> String {
        let run = self.passed + self.failed;
        if self.failed == 0 {
            format!(
                "✅ {}/{} tests successful ({} skipped) in {} s",
                self.passed, run, self.skipped, self.seconds
            )
        } else {
            let names: Vec<&str> = self
                .results
                .iter()
                .filter(|o| o.verdict == Verdict::Fail)
                .map(|o| o.name.as_str())
                .collect();
            format!(
                "❌ {}/{} tests failed ({} skipped) in {} s: {}",
                self.failed,
                run,
                self.skipped,
                self.seconds,
                names.join(", ")
            )
        }
    }
}

/// A scenario's check: what it saw when it passed, or why it failed.
pub type Check = Box<dyn Fn(&Env) -> Result<String, Failure> + Send + Sync>;

/// A phase's policies, written for the deployed suite (addresses are known only then).
pub type Policies = Box<dyn Fn(&Env) -> String + Send + Sync>;

/// Why a check did not pass.
#[derive(Debug)]
pub enum Failure {
    Failed(String),
    /// It could not run here (said why); counted apart from passes and failures.
    Skipped(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Failed(s)
    }
}

pub struct Scenario {
    pub name: String,
    pub check: Check,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Scenarios only make connections: all at once.
    Concurrent,
    /// Steps that build on each other, in order.
    Serial,
    /// Beside every other phase, until a disturbing one.
    Background,
    /// Serial, and it stops agents: the background is joined first.
    Disturbing,
}

pub struct Phase {
    pub name: &'static str,
    pub mode: Mode,
    /// The suite's policies while it runs (YAML documents; empty: none).
    pub policies: Policies,
    pub scenarios: Vec<Scenario>,
}

pub fn run(cmd: ConnectivityCommand) -> u8 {
    let removed = match cmd {
        ConnectivityCommand::Test(args) => return run_test(args),
        ConnectivityCommand::Cleanup(args) if args.cluster.kubernetes => {
            kube::cleanup(&args.cluster.options(), &args.namespace)
        }
        ConnectivityCommand::Cleanup(args) => {
            super::status::topology_path(args.topology.as_deref())
                .and_then(|p| local::cleanup_all(&p))
        }
    };
    match removed {
        Ok(removed) => {
            for r in &removed {
                println!("removed {r}");
            }
            println!("{} things removed", removed.len());
            0
        }
        Err(e) => {
            eprintln!("signet connectivity cleanup: {e}");
            1
        }
    }
}

fn run_test(args: TestArgs) -> u8 {
    let filter = match args.test.as_deref().map(regex::Regex::new).transpose() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("signet connectivity test: --test: {e}");
            return 1;
        }
    };
    if args.list {
        let names = local::Names::new(&args.namespace, "cluster.local");
        for phase in scenarios::phases(&names) {
            for s in &phase.scenarios {
                if filter.as_ref().is_none_or(|f| f.is_match(&s.name)) {
                    println!("{}", s.name);
                }
            }
        }
        return 0;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("signet connectivity test: where this binary is: {e}");
            return 1;
        }
    };
    let options = Options {
        exe,
        namespace: args.namespace.clone(),
        filter,
        keep: args.keep,
    };
    let mut say = |line: &str| {
        println!("{line}");
        let _ = std::io::stdout().flush();
    };
    let agents = ProcessAgents::default();
    let report = if args.cluster.kubernetes {
        let started = Instant::now();
        kube::deploy(
            &options.namespace,
            &options.exe,
            &args.cluster.options(),
            &mut say,
        )
        .map(|env| run_on(env, &options, started, &mut say))
    } else {
        super::status::topology_path(args.topology.as_deref())
            .and_then(|path| run_suite(&path, &options, &agents, &mut say))
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("signet connectivity test: {e}");
            return 1;
        }
    };
    if let Some(file) = &args.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(file, text) {
            eprintln!("signet connectivity test: --json {}: {e}", file.display());
            return 1;
        }
    }
    u8::from(report.failed > 0 || report.cleanup_error.is_some())
}

impl std::fmt::Debug for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl std::fmt::Debug for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Phase")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("scenarios", &self.scenarios)
            .finish()
    }
}

#[derive(Debug)]
pub struct Options {
    pub namespace: String,
    /// The binary that serves `echo` (this one, normally).
    pub exe: PathBuf,
    pub filter: Option<regex::Regex>,
    pub keep: bool,
}

/// Deploys, runs the selected scenarios, cleans up (unless `keep`), and returns the results;
/// `say` hears each line of the report as it happens. An error is a run that could not start
/// (the topology, the workloads, the agents never OK).
pub fn run_suite(
    topology: &std::path::Path,
    options: &Options,
    agents: &dyn AgentControl,
    say: &mut dyn FnMut(&str),
) -> Result<SuiteReport, String> {
    let started = Instant::now();
    let env = local::deploy(topology, &options.namespace, &options.exe, agents, say)?;
    Ok(run_on(env, options, started, say))
}

/// Runs the selected scenarios on the deployed suite, then removes it (unless `keep`).
pub fn run_on(
    env: Env<'_>,
    options: &Options,
    started: Instant,
    say: &mut dyn FnMut(&str),
) -> SuiteReport {
    let phases = scenarios::phases(&env.names);
    let selected = |s: &Scenario| options.filter.as_ref().is_none_or(|f| f.is_match(&s.name));
    let mut results = vec![];
    std::thread::scope(|scope| {
        let mut background = vec![];
        for phase in &phases {
            if phase.mode != Mode::Background || !phase.scenarios.iter().any(selected) {
                continue;
            }
            say(&format!(
                "[=] {} (in the background, {} scenarios)",
                phase.name,
                phase.scenarios.len()
            ));
            let env = &env;
            background.push(scope.spawn(move || {
                phase
                    .scenarios
                    .iter()
                    .filter(|s| selected(s))
                    .map(|s| run_one(env, s))
                    .collect::<Vec<_>>()
            }));
        }
        for phase in &phases {
            let chosen: Vec<&Scenario> = match phase.mode {
                Mode::Background => continue,
                Mode::Concurrent => phase.scenarios.iter().filter(|s| selected(s)).collect(),
                Mode::Serial | Mode::Disturbing if phase.scenarios.iter().any(selected) => {
                    phase.scenarios.iter().collect()
                }
                Mode::Serial | Mode::Disturbing => vec![],
            };
            if chosen.is_empty() {
                continue;
            }
            if phase.mode == Mode::Disturbing {
                for h in background.drain(..) {
                    for o in joined(h) {
                        say(&o.line());
                        results.push(o);
                    }
                }
            }
            say(&format!("[=] {} ({} scenarios)", phase.name, chosen.len()));
            let outcomes = match env.apply_policies(&(phase.policies)(&env)) {
                Err(e) => chosen
                    .iter()
                    .map(|s| Outcome {
                        name: s.name.clone(),
                        verdict: Verdict::Fail,
                        detail: format!("the phase's policies are not in force: {e}"),
                        ms: 0,
                    })
                    .collect(),
                Ok(()) if phase.mode == Mode::Concurrent => {
                    let env = &env;
                    let handles: Vec<_> = chosen
                        .iter()
                        .map(|&s| scope.spawn(move || run_one(env, s)))
                        .collect();
                    handles
                        .into_iter()
                        .zip(&chosen)
                        .map(|(h, s)| {
                            h.join().unwrap_or_else(|_| Outcome {
                                name: s.name.clone(),
                                verdict: Verdict::Fail,
                                detail: "the check panicked".into(),
                                ms: 0,
                            })
                        })
                        .collect()
                }
                Ok(()) => chosen.iter().map(|s| run_one(&env, s)).collect::<Vec<_>>(),
            };
            for o in outcomes {
                say(&o.line());
                results.push(o);
            }
        }
        for h in background {
            for o in joined(h) {
                say(&o.line());
                results.push(o);
            }
        }
    });
    let mut cleanup_error = None;
    if options.keep {
        say(&format!(
            "kept: namespaces {} and {}-peer, their pods and policies (signet connectivity cleanup removes them)",
            env.names.ns, env.names.ns
        ));
        env.workloads.keep();
    } else if let Err(e) = env.workloads.remove() {
        say(&format!(
            "!! cleaning up: {e} (signet connectivity cleanup removes what is left)"
        ));
        cleanup_error = Some(e);
    }
    let count = |v: Verdict| results.iter().filter(|o| o.verdict == v).count();
    let report = SuiteReport {
        passed: count(Verdict::Pass),
        failed: count(Verdict::Fail),
        skipped: count(Verdict::Skip),
        results,
        seconds: started.elapsed().as_secs(),
        cleanup_error,
    };
    say("");
    say(&report.summary());
    report
}

/// A background phase's outcomes; a thread that died is a failure, not an empty list.
fn joined(h: std::thread::ScopedJoinHandle<'_, Vec<Outcome>>) -> Vec<Outcome> {
    h.join().unwrap_or_else(|_| {
        vec![Outcome {
            name: "background".into(),
            verdict: Verdict::Fail,
            detail: "a background phase's thread panicked; its scenarios have no result".into(),
            ms: 0,
        }]
    })
}

fn run_one(env: &Env, s: &Scenario) -> Outcome {
    let start = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (s.check)(env)));
    let (verdict, detail) = match result {
        Ok(Ok(seen)) => (Verdict::Pass, seen),
        Ok(Err(Failure::Failed(why))) => (Verdict::Fail, why),
        Ok(Err(Failure::Skipped(why))) => (Verdict::Skip, why),
        Err(_) => (Verdict::Fail, "the check panicked".into()),
    };
    Outcome {
        name: s.name.clone(),
        verdict,
        detail,
        ms: start.elapsed().as_millis() as u64,
    }
}

/// `signet status --wait`'s last answer, as an error naming what is not OK unless all is.
pub(crate) fn all_ok(
    report: Result<crate::cli::status::Report, String>,
    within: Duration,
) -> Result<crate::cli::status::Report, String> {
    let report = report?;
    if !report.ok() {
        return Err(format!(
            "not OK after {} s: {}",
            within.as_secs(),
            report.waiting_for().join("; ")
        ));
    }
    Ok(report)
}

/// Polls `f` every 100 ms until it gives a value or `within` passes.
pub(crate) fn poll<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn there_are_at_least_forty_scenarios_with_unique_names_in_named_groups() {
        let names = local::Names::new("t", "cluster.local");
        let all: Vec<String> = scenarios::phases(&names)
            .iter()
            .flat_map(|p| p.scenarios.iter().map(|s| s.name.clone()))
            .collect();
        assert!(all.len() >= 40, "{} scenarios", all.len());
        let unique: std::collections::BTreeSet<&String> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "duplicate names in {all:?}");
        for phase in scenarios::phases(&names) {
            for s in &phase.scenarios {
                assert!(
                    s.name.starts_with(&format!("{}/", phase.name)),
                    "{} is not in {}",
                    s.name,
                    phase.name
                );
            }
        }
    }

    #[test]
    fn the_summary_names_every_failure() {
        let o = |name: &str, verdict| Outcome {
            name: name.into(),
            verdict,
            detail: String::new(),
            ms: 1,
        };
        let report = SuiteReport {
            results: vec![
                o("a/one", Verdict::Pass),
                o("a/two", Verdict::Fail),
                o("b/three", Verdict::Skip),
            ],
            passed: 1,
            failed: 1,
            skipped: 1,
            seconds: 3,
            cleanup_error: None,
        };
        assert_eq!(
            report.summary(),
            "❌ 1/2 tests failed (1 skipped) in 3 s: a/two"
        );
    }
}

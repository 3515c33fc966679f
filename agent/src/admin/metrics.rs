//! The agent's counters, encoded by the `prometheus-client` crate with typed label sets.
//!
//! Counters are labelled by reporting direction and by source and destination SPIFFE ID, so the
//! number of series grows with the pairs of identities that actually talk, not with connections.
//! A connection looks its [`FlowCounters`] up once and then only touches atomics. A pair that
//! has had no open connection and no event for `retain_idle` (`admin.metricsRetainIdleSeconds`,
//! 600 s unless set) is forgotten at the next scrape (linkerd's `metrics_retain_idle`): identity
//! churn does not grow memory for ever, and a pair that comes back starts from zero, which
//! Prometheus reads as a counter reset.
//!
//! Gauges that describe state owned elsewhere (certificate expiry, open connections, readiness)
//! are read at scrape time through [`Gauges`] rather than copied here.
//!
//! `/metrics` serves the Prometheus text format (0.0.4), which `promtool check metrics` accepts,
//! or OpenMetrics to a scraper that asks for it (`Accept: application/openmetrics-text`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::flow::Reporter;

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// A label value, escaped as the text formats want (`\\`, `\"`, `\n`); the encoder writes
/// values as they are.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Value(String);

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value(s.to_owned())
    }
}

impl EncodeLabelValue for Value {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Identity label used when one side is not known (a connection refused before it was
/// identified).
pub const UNKNOWN: &str = "unknown";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct FlowLabels {
    reporter: Reporter,
    source: Value,
    destination: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WithReason {
    reporter: Reporter,
    source: Value,
    destination: Value,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WithVerdict {
    reporter: Reporter,
    source: Value,
    destination: Value,
    verdict: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandshakeLabels {
    reporter: Reporter,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReporterLabel {
    reporter: Reporter,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabel {
    identity: Value,
}

/// `KernelLabels` as encoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KernelSeries {
    direction: &'static str,
    verdict: &'static str,
    reason: &'static str,
    source: Value,
    destination: Value,
}

/// Labels of a flow the datapath reported: the direction it was decided in, the verdict, the
/// reason, and both sides' identities (SPIFFE IDs, or reserved names such as `world`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelLabels {
    pub direction: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub source: String,
    pub destination: String,
}

/// One routed (L7) request, as `Metrics::l7_request` counts it.
#[derive(Debug, Clone)]
pub struct L7Request<'a> {
    pub source: &'a str,
    pub destination: &'a str,
    /// `namespace/name` of the Service asked for (empty when unknown).
    pub service: &'a str,
    /// `namespace/name` of the route that matched (empty when none did).
    pub route: &'a str,
    /// `namespace/name` of the backend Service the route drew (empty when none): retries,
    /// timeouts, ejections and rate limiting are counted for it.
    pub backend: &'a str,
    pub method: &'a str,
    pub status: u16,
    pub duration: Duration,
    pub retries: u32,
    pub timed_out: bool,
    pub ejections: u32,
    pub rate_limited: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct RequestLabels {
    source: Value,
    destination: Value,
    service: Value,
    route: Value,
    method: Value,
    code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct DurationLabels {
    source: Value,
    destination: Value,
    service: Value,
    route: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct ServiceLabel {
    service: Value,
}

/// Routed requests' counters, by their labels, with when each was last used.
#[derive(Debug, Default)]
struct L7 {
    requests: Series<RequestLabels, (u64, Instant)>,
    durations: Series<DurationLabels, (prometheus_client::metrics::histogram::Histogram, Instant)>,
    /// service → (retries, timeouts, ejections, rate limited, last used).
    per_service: Series<ServiceLabel, ([u64; 4], Instant)>,
}

/// Label sets and their values, found by the labels as a request holds them (borrowed): a
/// series is copied into owned labels once, when first seen, not on every request.
#[derive(Debug)]
struct Series<L, V> {
    /// Fingerprint of the labels → the series with it (several only when fingerprints collide).
    buckets: HashMap<u64, Vec<(L, V)>>,
}

impl<L, V> Default for Series<L, V> {
    fn default() -> Self {
        Self {
            buckets: HashMap::new(),
        }
    }
}

impl<L, V> Series<L, V> {
    /// The value of the series whose labels are `labels` (and `code`), made by `make` when new.
    fn get_or_insert(
        &mut self,
        labels: &[&str],
        code: u16,
        is: impl Fn(&L) -> bool,
        make: impl FnOnce() -> (L, V),
    ) -> &mut V {
        let bucket = self.buckets.entry(fingerprint(labels, code)).or_default();
        let i = match bucket.iter().position(|(l, _)| is(l)) {
            Some(i) => i,
            None => {
                bucket.push(make());
                bucket.len() - 1
            }
        };
        &mut bucket[i].1
    }

    fn iter(&self) -> impl Iterator<Item = (&L, &V)> {
        self.buckets.values().flatten().map(|(l, v)| (l, v))
    }

    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.buckets.retain(|_, b| {
            b.retain(|(_, v)| keep(v));
            !b.is_empty()
        });
    }
}

/// A fixed hash of label values: which bucket of a [`Series`] they belong in.
fn fingerprint(labels: &[&str], code: u16) -> u64 {
    use std::hash::Hasher as _;
    let mut h = std::hash::DefaultHasher::new();
    for l in labels {
        h.write(l.as_bytes());
        h.write_u8(0xff);
    }
    h.write_u16(code);
    h.finish()
}

/// The `method` label: a registered method as it is, any other `_OTHER` (as OpenTelemetry's
/// HTTP conventions say), so a client cannot make a series per method name it invents.
fn method_label(method: &str) -> &str {
    if crate::flow::HTTP_METHODS.contains(&method) {
        method
    } else {
        "_OTHER"
    }
}

/// Request duration buckets, seconds: 1 ms to 10 s.
const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The counters of one (reporter, source, destination).
#[derive(Debug, Default)]
pub struct FlowCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Bytes from the source towards the destination.
    pub sent_bytes: AtomicU64,
    /// Bytes from the destination back to the source.
    pub received_bytes: AtomicU64,
    /// Connections admitted by policy (verdict `allow`) and admitted in audit mode (`audit`):
    /// counted here, with the other counters of the flow, so opening a connection takes one
    /// lookup. Refusals are rarer and go to `Metrics::verdict`.
    pub allowed: AtomicU64,
    pub audited: AtomicU64,
}

/// State owned by other parts of the agent, read when Prometheus scrapes.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    /// (identity, notAfter as Unix seconds) for each certificate in force.
    pub certificate_expiry: Vec<(String, u64)>,
    /// Open connections by reporter.
    pub open_connections: Vec<(Reporter, usize)>,
    /// Open pooled HBONE connections to other nodes.
    pub hbone_pool_connections: usize,
    /// Addresses no pod owns because their claims conflict (`Snapshot::refused_ips`).
    pub refused_addresses: usize,
    pub ready: bool,
}

/// The series of one pair of identities, and when they were last used.
#[derive(Debug)]
struct Pair {
    counters: Arc<FlowCounters>,
    /// Whether a connection was ever counted here (only then do the connection and byte
    /// counters have a series).
    flows: bool,
    /// reason → connections refused or broken after accept.
    failed: HashMap<&'static str, u64>,
    /// verdict → policy decisions counted outside the flow's counters (`deny`, `l7_deny`, ...).
    verdicts: HashMap<&'static str, u64>,
    last_used: Instant,
}

impl Pair {
    fn new() -> Self {
        Self {
            counters: Arc::default(),
            flows: false,
            failed: HashMap::new(),
            verdicts: HashMap::new(),
            last_used: Instant::now(),
        }
    }

    /// Nothing open (no connection holds the counters) and nothing new for `retain`.
    fn idle(&self, retain: Duration) -> bool {
        Arc::strong_count(&self.counters) == 1 && self.last_used.elapsed() >= retain
    }
}

/// All counters of one agent.
#[derive(Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
    /// Holds one collector: `inner`, encoded at each scrape.
    registry: prometheus_client::registry::Registry,
}

#[derive(Debug)]
struct Inner {
    pairs: Mutex<HashMap<FlowLabels, Pair>>,
    /// (reporter, reason) → TLS handshakes that did not complete.
    handshake_failures: Mutex<HashMap<(Reporter, &'static str), u64>>,
    /// Connections closed because a policy change no longer allowed them.
    closed_by_policy: AtomicU64,
    /// reason → Gateway requests answered with an error instead of a backend's response.
    gateway_refusals: Mutex<HashMap<&'static str, u64>>,
    /// Flows the kernel reported, by what it did and why, and when each was last seen.
    kernel: Mutex<HashMap<KernelLabels, (u64, Instant)>>,
    /// Kernel flow events not logged because the log was over its rate (still counted).
    kernel_unlogged: AtomicU64,
    /// The node's recent flows (`/flows`), whose followers' losses are counted here.
    flows: Arc<crate::flow::FlowLog>,
    retain_idle: Duration,
    /// The gauges of the scrape being encoded.
    gauges: Mutex<Gauges>,
    l7: Mutex<L7>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::with_retention(Duration::from_secs(
            crate::config::DEFAULT_METRICS_RETAIN_IDLE_SECONDS,
        ))
    }
}

impl Metrics {
    /// Counters whose idle series are forgotten after `retain_idle`, and a flow log of the
    /// default size.
    pub fn with_retention(retain_idle: Duration) -> Self {
        Self::new(retain_idle, crate::config::DEFAULT_FLOW_LOG_CAPACITY)
    }

    /// Counters whose idle series are forgotten after `retain_idle`, and a flow log that keeps
    /// `flow_log_capacity` records.
    pub fn new(retain_idle: Duration, flow_log_capacity: usize) -> Self {
        let inner = Arc::new(Inner {
            pairs: Mutex::default(),
            handshake_failures: Mutex::default(),
            closed_by_policy: AtomicU64::new(0),
            gateway_refusals: Mutex::default(),
            kernel: Mutex::default(),
            kernel_unlogged: AtomicU64::new(0),
            flows: Arc::new(crate::flow::FlowLog::new(flow_log_capacity)),
            retain_idle,
            gauges: Mutex::default(),
            l7: Mutex::default(),
        });
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(inner.clone()));
        Self { inner, registry }
    }

    /// Runs `f` on the series of (reporter, source, destination), created on first use.
    fn pair<T>(
        &self,
        reporter: Reporter,
        source: &str,
        destination: &str,
        f: impl FnOnce(&mut Pair) -> T,
    ) -> T {
        let labels = FlowLabels {
            reporter,
            source: source.into(),
            destination: destination.into(),
        };
        let mut pairs = lock(&self.inner.pairs);
        let pair = pairs.entry(labels).or_insert_with(Pair::new);
        pair.last_used = Instant::now();
        f(pair)
    }

    /// The counters for this (reporter, source, destination); created on first use. Holding
    /// them keeps the series from being forgotten.
    pub fn flow(&self, reporter: Reporter, source: &str, destination: &str) -> Arc<FlowCounters> {
        self.pair(reporter, source, destination, |p| {
            p.flows = true;
            p.counters.clone()
        })
    }

    pub fn failed(
        &self,
        reporter: Reporter,
        source: &str,
        destination: &str,
        reason: &'static str,
    ) {
        self.pair(reporter, source, destination, |p| {
            *p.failed.entry(reason).or_default() += 1;
        });
    }

    /// One policy decision: `allow`, `deny`, `audit`, `l7_deny` for a refused request, or
    /// `l7_bad_path` for one whose path servers would read differently (400).
    pub fn verdict(
        &self,
        reporter: Reporter,
        source: &str,
        destination: &str,
        verdict: &'static str,
    ) {
        self.pair(reporter, source, destination, |p| {
            *p.verdicts.entry(verdict).or_default() += 1;
        });
    }

    pub fn handshake_failed(&self, reporter: Reporter, reason: &'static str) {
        *lock(&self.inner.handshake_failures)
            .entry((reporter, reason))
            .or_default() += 1;
    }

    /// One Gateway request answered by the Gateway itself (`gateway::refusal`).
    pub fn gateway_refused(&self, reason: &'static str) {
        *lock(&self.inner.gateway_refusals)
            .entry(reason)
            .or_default() += 1;
    }

    /// One routed request: counted by source, destination, Service, route, method and code,
    /// its duration observed, and its retries, timeout, ejections and rate limiting counted
    /// per Service.
    pub fn l7_request(&self, r: L7Request<'_>) {
        let now = Instant::now();
        let mut l7 = lock(&self.inner.l7);
        let method = method_label(r.method);
        let key = [r.source, r.destination, r.service, r.route, method];
        let same = |v: &Value, s: &str| v.0 == s;
        let e = l7.requests.get_or_insert(
            &key,
            r.status,
            |l| {
                l.code == r.status
                    && same(&l.source, r.source)
                    && same(&l.destination, r.destination)
                    && same(&l.service, r.service)
                    && same(&l.route, r.route)
                    && same(&l.method, method)
            },
            || {
                let labels = RequestLabels {
                    source: r.source.into(),
                    destination: r.destination.into(),
                    service: r.service.into(),
                    route: r.route.into(),
                    method: method.into(),
                    code: r.status,
                };
                (labels, (0, now))
            },
        );
        e.0 += 1;
        e.1 = now;
        let h = l7.durations.get_or_insert(
            &key[..4],
            0,
            |l| {
                same(&l.source, r.source)
                    && same(&l.destination, r.destination)
                    && same(&l.service, r.service)
                    && same(&l.route, r.route)
            },
            || {
                let labels = DurationLabels {
                    source: r.source.into(),
                    destination: r.destination.into(),
                    service: r.service.into(),
                    route: r.route.into(),
                };
                let h = prometheus_client::metrics::histogram::Histogram::new(DURATION_BUCKETS);
                (labels, (h, now))
            },
        );
        h.0.observe(r.duration.as_secs_f64());
        h.1 = now;
        let s = l7.per_service.get_or_insert(
            &[r.backend],
            0,
            |l| same(&l.service, r.backend),
            || {
                let labels = ServiceLabel {
                    service: r.backend.into(),
                };
                (labels, ([0; 4], now))
            },
        );
        s.0[0] += u64::from(r.retries);
        s.0[1] += u64::from(r.timed_out);
        s.0[2] += u64::from(r.ejections);
        s.0[3] += u64::from(r.rate_limited);
        s.1 = now;
    }

    pub fn closed_by_policy(&self, n: u64) {
        self.inner.closed_by_policy.fetch_add(n, Ordering::Relaxed);
    }

    /// One flow event from the kernel.
    pub fn kernel_flow(&self, labels: KernelLabels) {
        let mut kernel = lock(&self.inner.kernel);
        let entry = kernel.entry(labels).or_insert((0, Instant::now()));
        entry.0 += 1;
        entry.1 = Instant::now();
    }

    /// Kernel flow events that were counted but not logged.
    /// The node's log of recent flows.
    pub fn flows(&self) -> &Arc<crate::flow::FlowLog> {
        &self.inner.flows
    }

    pub fn kernel_unlogged(&self, n: u64) {
        self.inner.kernel_unlogged.fetch_add(n, Ordering::Relaxed);
    }

    /// Series held now (pairs of identities and kernel flow label sets).
    pub fn series(&self) -> usize {
        lock(&self.inner.pairs).len() + lock(&self.inner.kernel).len()
    }

    /// The Prometheus text format (0.0.4).
    pub fn render(&self, gauges: &Gauges) -> String {
        to_prometheus_text(&self.render_openmetrics(gauges))
    }

    /// The OpenMetrics text format. Idle series are forgotten first.
    pub fn render_openmetrics(&self, gauges: &Gauges) -> String {
        let inner = &self.inner;
        let retain = inner.retain_idle;
        lock(&inner.pairs).retain(|_, p| !p.idle(retain));
        lock(&inner.kernel).retain(|_, (_, seen)| seen.elapsed() < retain);
        {
            let mut l7 = lock(&inner.l7);
            l7.requests.retain(|(_, seen)| seen.elapsed() < retain);
            l7.durations.retain(|(_, seen)| seen.elapsed() < retain);
            l7.per_service.retain(|(_, seen)| seen.elapsed() < retain);
        }
        *lock(&inner.gauges) = gauges.clone();
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Writes one counter or gauge family.
fn family<'a, S, I>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: I,
) -> Result<(), std::fmt::Error>
where
    S: EncodeLabelSet + 'a,
    I: IntoIterator<Item = (S, u64)>,
{
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let sample = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(sample)?,
            _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(sample)?,
        }
    }
    Ok(())
}

/// Writes one metric without labels.
fn single(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(metric),
        _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric),
    }
}

impl prometheus_client::collector::Collector for Inner {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        type Row = (
            FlowLabels,
            Option<Arc<FlowCounters>>,
            Vec<(&'static str, u64)>,
            Vec<(&'static str, u64)>,
        );
        let mut pairs: Vec<Row> = lock(&self.pairs)
            .iter()
            .map(|(l, p)| {
                let mut failed: Vec<_> = p.failed.iter().map(|(k, v)| (*k, *v)).collect();
                failed.sort();
                let mut verdicts: Vec<_> = p.verdicts.iter().map(|(k, v)| (*k, *v)).collect();
                verdicts.sort();
                (
                    l.clone(),
                    p.flows.then(|| p.counters.clone()),
                    failed,
                    verdicts,
                )
            })
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let counters: [(&str, &str, CounterOf); 4] = [
            (
                "signet_connections_opened",
                "Connections the proxy opened (policy allowed, tunnel established).",
                |c| &c.opened,
            ),
            (
                "signet_connections_closed",
                "Connections that ended after being opened.",
                |c| &c.closed,
            ),
            (
                "signet_tcp_sent_bytes",
                "Bytes from source to destination.",
                |c| &c.sent_bytes,
            ),
            (
                "signet_tcp_received_bytes",
                "Bytes from destination back to source.",
                |c| &c.received_bytes,
            ),
        ];
        for (name, help, field) in counters {
            family(
                &mut e,
                name,
                help,
                Counter,
                pairs.iter().filter_map(|(l, c, _, _)| {
                    c.as_ref()
                        .map(|c| (l.clone(), field(c).load(Ordering::Relaxed)))
                }),
            )?;
        }
        family(
            &mut e,
            "signet_connections_failed",
            "Connections refused or broken after accept, by reason.",
            Counter,
            pairs.iter().flat_map(|(l, _, failed, _)| {
                failed.iter().map(move |(reason, n)| {
                    (
                        WithReason {
                            reporter: l.reporter,
                            source: l.source.clone(),
                            destination: l.destination.clone(),
                            reason,
                        },
                        *n,
                    )
                })
            }),
        )?;
        family(
            &mut e,
            "signet_policy_verdicts",
            "Identity policy decisions, by verdict.",
            Counter,
            pairs.iter().flat_map(|(l, c, _, verdicts)| {
                let load = |f: CounterOf| c.as_ref().map_or(0, |c| f(c).load(Ordering::Relaxed));
                let admitted = [
                    ("allow", load(|c| &c.allowed)),
                    ("audit", load(|c| &c.audited)),
                ];
                admitted
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .chain(verdicts.iter().copied())
                    .map(move |(verdict, n)| {
                        (
                            WithVerdict {
                                reporter: l.reporter,
                                source: l.source.clone(),
                                destination: l.destination.clone(),
                                verdict,
                            },
                            n,
                        )
                    })
            }),
        )?;
        let mut handshakes: Vec<_> = lock(&self.handshake_failures)
            .iter()
            .map(|((reporter, reason), n)| (*reporter, *reason, *n))
            .collect();
        handshakes.sort();
        family(
            &mut e,
            "signet_tls_handshake_failures",
            "mTLS handshakes that did not complete, by reason.",
            Counter,
            handshakes
                .into_iter()
                .map(|(reporter, reason, n)| (HandshakeLabels { reporter, reason }, n)),
        )?;
        let mut refused: Vec<(&'static str, u64)> = lock(&self.gateway_refusals)
            .iter()
            .map(|(reason, n)| (*reason, *n))
            .collect();
        refused.sort();
        family(
            &mut e,
            "signet_gateway_requests_refused",
            "Gateway requests the Gateway answered itself (no listener, no route, no endpoint, bad path, ...), by reason.",
            Counter,
            refused
                .into_iter()
                .map(|(reason, n)| (ReasonLabel { reason }, n)),
        )?;
        single(
            &mut e,
            "signet_connections_closed_by_policy",
            "Established connections closed because a policy change no longer allowed them.",
            Counter,
            self.closed_by_policy.load(Ordering::Relaxed),
        )?;
        let mut kernel: Vec<(KernelLabels, u64)> = lock(&self.kernel)
            .iter()
            .map(|(l, (n, _))| (l.clone(), *n))
            .collect();
        kernel.sort();
        let kernel = kernel.into_iter().map(|(l, n)| {
            (
                KernelSeries {
                    direction: l.direction,
                    verdict: l.verdict,
                    reason: l.reason,
                    source: l.source.as_str().into(),
                    destination: l.destination.as_str().into(),
                },
                n,
            )
        });
        family(
            &mut e,
            "signet_datapath_flows",
            "Flows the kernel datapath reported (every refusal; allowed ones when sampled), by direction, verdict and reason.",
            Counter,
            kernel,
        )?;
        single(
            &mut e,
            "signet_datapath_flow_log_suppressed",
            "Kernel flow events counted but not logged: the flow log was over its rate.",
            Counter,
            self.kernel_unlogged.load(Ordering::Relaxed),
        )?;
        single(
            &mut e,
            "signet_flow_records_lost",
            "Flow records a /flows follower (signet observe) lost: it read slower than they came.",
            Counter,
            self.flows.lost(),
        )?;
        self.encode_l7(&mut e)?;
        let gauges = lock(&self.gauges).clone();
        family(
            &mut e,
            "signet_connections_open",
            "Connections open now.",
            Gauge,
            gauges.open_connections.iter().map(|(reporter, n)| {
                (
                    ReporterLabel {
                        reporter: *reporter,
                    },
                    *n as u64,
                )
            }),
        )?;
        single(
            &mut e,
            "signet_hbone_pool_connections",
            "Pooled HTTP/2 connections to other nodes' proxies.",
            Gauge,
            gauges.hbone_pool_connections as u64,
        )?;
        single(
            &mut e,
            "signet_refused_addresses",
            "Pod addresses refused until their claims are resolved (two pods, a node's own, outside the node's podCIDRs).",
            Gauge,
            gauges.refused_addresses as u64,
        )?;
        family(
            &mut e,
            "signet_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate in force, per workload identity.",
            Gauge,
            gauges.certificate_expiry.iter().map(|(id, t)| {
                (
                    IdentityLabel {
                        identity: id.as_str().into(),
                    },
                    *t,
                )
            }),
        )?;
        single(
            &mut e,
            "signet_ready",
            "1 when every local workload has a certificate and the datapath is attached.",
            Gauge,
            u64::from(gauges.ready),
        )?;
        Ok(())
    }
}

impl Inner {
    fn encode_l7(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let l7 = lock(&self.l7);
        let mut requests: Vec<(RequestLabels, u64)> = l7
            .requests
            .iter()
            .map(|(l, (n, _))| (l.clone(), *n))
            .collect();
        requests.sort();
        family(
            e,
            "signet_http_requests",
            "Routed (L7) requests the source node's proxy answered, by source, destination, Service, route, method and response code.",
            MetricType::Counter,
            requests,
        )?;
        let mut durations: Vec<_> = l7.durations.iter().collect();
        durations.sort_by(|a, b| a.0.cmp(b.0));
        let mut metric = e.encode_descriptor(
            "signet_http_request_duration_seconds",
            "Routed requests' time from request to response headers, retries included.",
            None,
            MetricType::Histogram,
        )?;
        for (labels, (h, _)) in durations {
            h.encode(metric.encode_family(labels)?)?;
        }
        let mut per: Vec<_> = l7.per_service.iter().collect();
        per.sort_by(|a, b| a.0.cmp(b.0));
        for (i, (name, help)) in [
            (
                "signet_http_retries",
                "Retried attempts of routed requests, by backend Service.",
            ),
            (
                "signet_http_timeouts",
                "Routed requests answered 504 after a route timeout, by backend Service.",
            ),
            (
                "signet_http_endpoint_ejections",
                "Endpoints ejected after consecutive failures, by backend Service.",
            ),
            (
                "signet_http_rate_limited",
                "Routed requests answered 429 by a local rate limit, by backend Service.",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            family(
                e,
                name,
                help,
                MetricType::Counter,
                per.iter().map(|(l, (c, _))| ((*l).clone(), c[i])),
            )?;
        }
        Ok(())
    }
}

/// OpenMetrics text as the Prometheus text format (0.0.4): a counter family is named with its
/// `_total` suffix in `# HELP` and `# TYPE` (as its samples are), and `# UNIT` and `# EOF` go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Written once the TYPE line says whether the name gets `_total`.
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let full = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(h) = help.take() {
                let text = h
                    .strip_prefix("# HELP ")
                    .and_then(|r| r.strip_prefix(name))
                    .unwrap_or("");
                out.push_str(&format!("# HELP {full}{text}\n"));
            }
            out.push_str(&format!("# TYPE {full} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Picks one counter out of a flow's.
type CounterOf = fn(&FlowCounters) -> &AtomicU64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn populated(m: &Metrics) {
        let a = "spiffe://td/ns/shop/sa/web";
        let b = "spiffe://td/ns/pay/sa/api";
        let f = m.flow(Reporter::Outbound, a, b);
        f.opened.fetch_add(2, Ordering::Relaxed);
        f.sent_bytes.fetch_add(100, Ordering::Relaxed);
        // The same labels give the same counters.
        m.flow(Reporter::Outbound, a, b)
            .opened
            .fetch_add(1, Ordering::Relaxed);
        m.verdict(Reporter::Inbound, a, b, "deny");
        m.verdict(Reporter::Inbound, a, b, "deny");
        // Admissions are counted with the flow and render among the verdicts.
        m.flow(Reporter::Inbound, a, b)
            .allowed
            .fetch_add(4, Ordering::Relaxed);
        m.failed(Reporter::Outbound, a, UNKNOWN, "no_pod");
        m.handshake_failed(Reporter::Inbound, "no_client_certificate");
        m.gateway_refused("no_route");
        m.gateway_refused("no_route");
        m.kernel_flow(KernelLabels {
            direction: "ingress",
            verdict: "deny",
            reason: "strict-mtls-plaintext",
            source: "world".into(),
            destination: b.into(),
        });
    }

    fn gauges() -> Gauges {
        Gauges {
            certificate_expiry: vec![("we\"ird".into(), 1_800_000_000)],
            open_connections: vec![(Reporter::Outbound, 3)],
            hbone_pool_connections: 1,
            refused_addresses: 2,
            ready: true,
        }
    }

    #[test]
    fn counters_render_with_typed_labels_and_escaping() {
        let m = Metrics::default();
        populated(&m);
        let text = m.render(&gauges());
        let (a, b) = ("spiffe://td/ns/shop/sa/web", "spiffe://td/ns/pay/sa/api");
        let want = [
            format!(
                "signet_connections_opened_total{{reporter=\"outbound\",source=\"{a}\",destination=\"{b}\"}} 3"
            ),
            format!(
                "signet_tcp_sent_bytes_total{{reporter=\"outbound\",source=\"{a}\",destination=\"{b}\"}} 100"
            ),
            format!(
                "signet_policy_verdicts_total{{reporter=\"inbound\",source=\"{a}\",destination=\"{b}\",verdict=\"deny\"}} 2"
            ),
            format!(
                "signet_policy_verdicts_total{{reporter=\"inbound\",source=\"{a}\",destination=\"{b}\",verdict=\"allow\"}} 4"
            ),
            format!(
                "signet_connections_failed_total{{reporter=\"outbound\",source=\"{a}\",destination=\"unknown\",reason=\"no_pod\"}} 1"
            ),
            format!(
                "signet_datapath_flows_total{{direction=\"ingress\",verdict=\"deny\",reason=\"strict-mtls-plaintext\",source=\"world\",destination=\"{b}\"}} 1"
            ),
            "signet_tls_handshake_failures_total{reporter=\"inbound\",reason=\"no_client_certificate\"} 1".into(),
            "signet_gateway_requests_refused_total{reason=\"no_route\"} 2".into(),
            "signet_certificate_expiry_timestamp_seconds{identity=\"we\\\"ird\"} 1800000000".into(),
            "signet_connections_open{reporter=\"outbound\"} 3".into(),
            "signet_ready 1".into(),
            "# TYPE signet_connections_opened_total counter".into(),
            "# HELP signet_connections_opened_total Connections the proxy opened (policy allowed, tunnel established).".into(),
        ];
        for line in want {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        assert!(!text.contains("# EOF"), "{text}");
        // OpenMetrics keeps the family name without the suffix, and ends with # EOF.
        let om = m.render_openmetrics(&gauges());
        assert!(
            om.contains("# TYPE signet_connections_opened counter\n"),
            "{om}"
        );
        assert!(om.trim_end().ends_with("# EOF"), "{om}");
    }

    #[test]
    fn idle_pairs_are_forgotten_and_pairs_in_use_are_kept() {
        let m = Metrics::with_retention(Duration::ZERO);
        let held = m.flow(Reporter::Outbound, "spiffe://td/a", "spiffe://td/b");
        held.opened.fetch_add(1, Ordering::Relaxed);
        m.verdict(Reporter::Inbound, "spiffe://td/c", "spiffe://td/d", "deny");
        m.kernel_flow(KernelLabels {
            direction: "egress",
            verdict: "deny",
            reason: "policy",
            source: "spiffe://td/e".into(),
            destination: "world".into(),
        });
        assert_eq!(m.series(), 3);
        let text = m.render(&Gauges::default());
        assert!(text.contains("source=\"spiffe://td/a\""), "held: {text}");
        assert!(
            !text.contains("spiffe://td/c"),
            "idle pair forgotten: {text}"
        );
        assert!(
            !text.contains("spiffe://td/e"),
            "idle kernel series forgotten: {text}"
        );
        assert_eq!(m.series(), 1);
        drop(held);
        m.render(&Gauges::default());
        assert_eq!(m.series(), 0, "released, then forgotten");
        // With the default retention nothing recent goes.
        let kept = Metrics::default();
        kept.verdict(Reporter::Inbound, "spiffe://td/c", "spiffe://td/d", "deny");
        kept.render(&Gauges::default());
        assert_eq!(kept.series(), 1);
    }

    #[test]
    fn routed_requests_are_counted_per_label_set_and_invented_methods_share_one() {
        let m = Metrics::default();
        let req = |method, status, route| L7Request {
            source: "spiffe://td/ns/shop/sa/web",
            destination: "spiffe://td/ns/pay/sa/api",
            service: "pay/api",
            route,
            backend: "pay/api",
            method,
            status,
            duration: Duration::from_millis(3),
            retries: 1,
            timed_out: false,
            ejections: 0,
            rate_limited: false,
        };
        for _ in 0..3 {
            m.l7_request(req("GET", 200, "pay/r1"));
        }
        m.l7_request(req("GET", 503, "pay/r1"));
        m.l7_request(req("GET", 200, "pay/r2"));
        for invented in ["FOO", "BAR1", "get"] {
            m.l7_request(req(invented, 200, "pay/r1"));
        }
        let text = m.render(&Gauges::default());
        let line = |method: &str, code: u16, route: &str, n: u32| {
            format!(
                "signet_http_requests_total{{source=\"spiffe://td/ns/shop/sa/web\",destination=\"spiffe://td/ns/pay/sa/api\",service=\"pay/api\",route=\"{route}\",method=\"{method}\",code=\"{code}\"}} {n}"
            )
        };
        for want in [
            line("GET", 200, "pay/r1", 3),
            line("GET", 503, "pay/r1", 1),
            line("GET", 200, "pay/r2", 1),
            line("_OTHER", 200, "pay/r1", 3),
            "signet_http_retries_total{service=\"pay/api\"} 8".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing `{want}` in\n{text}"
            );
        }
        assert!(
            !text.contains("FOO") && !text.contains("method=\"get\""),
            "{text}"
        );
        let count = text
            .lines()
            .filter(|l| l.starts_with("signet_http_request_duration_seconds_count"))
            .count();
        assert_eq!(count, 2, "one duration series per route: {text}");
    }

    #[test]
    fn the_prometheus_text_names_counter_families_with_their_suffix() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\n# UNIT x_requests requests\nx_requests_total{a=\"1\"} 2\n# HELP y Y.\n# TYPE y gauge\ny 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{a=\"1\"} 2\n# HELP y Y.\n# TYPE y gauge\ny 1\n"
        );
    }

    /// `promtool check metrics` (the `prometheus` package, which tests/run.sh installs) on what
    /// `/metrics` serves.
    #[test]
    fn promtool_accepts_the_exposition() {
        let m = Metrics::default();
        populated(&m);
        signet_test_support::promtool_accepts(&m.render(&gauges()));
    }
}

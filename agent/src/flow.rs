//! What every layer says about a flow, so none of them borrows it from another: which side of
//! the mesh reports it (the proxy decides and counts with it, the admin port labels series with
//! it), and the node's log of recent flows ([`FlowLog`] of [`FlowEntry`]) that the proxy and the
//! kernel reports write and `/flows` (`signet observe`) reads.

/// Which side of the proxy reports: the source's node (`outbound`) or the destination's
/// (`inbound`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    Outbound,
    Inbound,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Outbound => "outbound",
            Reporter::Inbound => "inbound",
        }
    }
}

/// Text a flow record holds: a constant (`outbound`, `tcp`, `forwarded`) or a string shared with
/// the snapshot and other records (the node's name, an identity, a pod). Records are written per
/// connection and per routed request, so a clone is a reference count, never a copy. It reads,
/// prints and serialises as the string it holds.
#[derive(Clone)]
pub enum Text {
    Static(&'static str),
    Shared(std::sync::Arc<str>),
}

/// The registered HTTP methods (RFC 9110 and PATCH): a flow record holds them as constants,
/// and metrics label any other method `_OTHER`.
pub const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl Text {
    /// `method` as a record holds it: a constant when registered, else a copy.
    pub fn method(method: &str) -> Self {
        match HTTP_METHODS.iter().find(|m| **m == method) {
            Some(m) => Text::Static(m),
            None => Text::copy(method),
        }
    }

    /// A copy of `s` (for text that is neither constant nor shared already).
    pub fn copy(s: &str) -> Self {
        Text::Shared(s.into())
    }

    pub fn as_str(&self) -> &str {
        match self {
            Text::Static(s) => s,
            Text::Shared(s) => s,
        }
    }
}

impl Default for Text {
    fn default() -> Self {
        Text::Static("")
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Text::Static(s)
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text::Shared(s.into())
    }
}

impl From<std::sync::Arc<str>> for Text {
    fn from(s: std::sync::Arc<str>) -> Self {
        Text::Shared(s)
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, as `str` does: widths and alignment apply.
        f.pad(self.as_str())
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl serde::Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Text::from)
    }
}

/// One flow as `signet observe` shows it: a connection the proxy forwarded (when it ended) or
/// refused, a request the L7 check refused, or what the kernel reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowEntry {
    /// Its place in the node's log: increases by one per record.
    pub seq: u64,
    /// Unix milliseconds.
    pub time_ms: u64,
    pub node: Text,
    /// `outbound`, `inbound` or `kernel`.
    pub reporter: Text,
    pub source: Peer,
    pub destination: Peer,
    /// `tcp`, `udp`, `icmp`, or the IP protocol's number.
    pub protocol: Text,
    /// `ingress` or `egress`, as the kernel decided it.
    pub direction: Option<Text>,
    /// `forwarded`, `audit`, `dropped` or `l7-denied`.
    pub verdict: Text,
    pub reason: Option<String>,
    /// The policy rule that decided, when one did.
    pub rule: Option<String>,
    pub http: Option<HttpInfo>,
    pub sent: u64,
    pub received: u64,
    pub duration_ms: u64,
    /// How a connection ended (`closed`, `idle timeout`, `closed by a policy change`, ...).
    pub end: Option<Text>,
}

/// One side of a flow.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// SPIFFE ID, or a reserved name (`world`, `host`, ...).
    pub identity: Text,
    /// The numeric identity, when known.
    pub number: Option<u32>,
    /// `ip:port`, when known.
    pub address: Option<std::net::SocketAddr>,
    /// `namespace/name` of the pod at that address, when it is one.
    pub pod: Option<Text>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpInfo {
    pub method: Text,
    pub path: String,
    pub status: u16,
}

/// The node's recent flows: a bounded ring that readers follow by sequence number. A reader
/// that falls further behind than the ring holds is told how many records it lost; nothing is
/// dropped silently. Capacity 0 turns it off: nothing is recorded, and writers skip the work of
/// describing flows.
#[derive(Debug)]
pub struct FlowLog {
    node: std::sync::RwLock<Text>,
    capacity: usize,
    ring: std::sync::Mutex<std::collections::VecDeque<std::sync::Arc<FlowEntry>>>,
    next: std::sync::atomic::AtomicU64,
    /// Records followers lost (they read too slowly for the ring).
    lost: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl FlowLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            node: std::sync::RwLock::default(),
            capacity,
            ring: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(
                capacity.min(1 << 16),
            )),
            next: std::sync::atomic::AtomicU64::new(1),
            lost: std::sync::atomic::AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Names the node every record is from.
    pub fn set_node(&self, node: &str) {
        *self.node.write().unwrap_or_else(|p| p.into_inner()) = Text::copy(node);
    }

    /// Whether records are kept at all (a log of capacity 0 keeps none: observe is off).
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Adds `entry`, stamped with its sequence number, the time and the node.
    pub fn push(&self, mut entry: FlowEntry) {
        if !self.enabled() {
            return;
        }
        entry.time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        entry.node = self.node.read().unwrap_or_else(|p| p.into_inner()).clone();
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            entry.seq = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(std::sync::Arc::new(entry));
        }
        self.changed.notify_waiters();
    }

    /// The records after sequence number `after`, and how many between it and the oldest kept
    /// were overwritten before being read.
    pub fn after(&self, after: u64) -> (Vec<std::sync::Arc<FlowEntry>>, u64) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let lost = match ring.front() {
            Some(oldest) if after > 0 => oldest.seq.saturating_sub(after + 1),
            _ => 0,
        };
        // Sequence numbers rise along the ring: a follower's wake-up costs what is new to it,
        // not a walk over the whole ring under the lock every record's writer needs.
        let start = ring.partition_point(|e| e.seq <= after);
        let out = ring.range(start..).cloned().collect();
        (out, lost)
    }

    /// Counts records a follower lost.
    pub fn count_lost(&self, n: u64) {
        self.lost.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records followers lost so far.
    pub fn lost(&self) -> u64 {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns once a record after sequence number `seq` exists.
    pub async fn wait_beyond(&self, seq: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.next.load(std::sync::atomic::Ordering::Relaxed) > seq + 1 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_and_writes_the_json_it_always_did() {
        let id: std::sync::Arc<str> = "spiffe://td/ns/shop/sa/web".into();
        let e = FlowEntry {
            reporter: "outbound".into(),
            source: Peer {
                identity: id.clone().into(),
                number: Some(260),
                address: Some(([10, 99, 11, 2], 40000).into()),
                pod: Some(Text::copy("shop/web-0")),
            },
            destination: Peer {
                identity: "world".into(),
                address: Some("[fd00::1]:443".parse().expect("an address")),
                ..Default::default()
            },
            protocol: "tcp".into(),
            verdict: "forwarded".into(),
            http: Some(HttpInfo {
                method: "GET".into(),
                path: "/".into(),
                status: 200,
            }),
            ..Default::default()
        };
        let json = serde_json::to_value(&e).expect("serialises");
        assert_eq!(json["source"]["identity"], "spiffe://td/ns/shop/sa/web");
        assert_eq!(json["source"]["address"], "10.99.11.2:40000");
        assert_eq!(json["destination"]["address"], "[fd00::1]:443");
        assert_eq!(json["source"]["pod"], "shop/web-0");
        assert_eq!(json["reporter"], "outbound");
        assert_eq!(json["http"]["method"], "GET");
        let back: FlowEntry = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, e);
        assert_eq!(back.source.identity, "spiffe://td/ns/shop/sa/web");
        // Shared text is the snapshot's string, not a copy of it.
        match &e.source.identity {
            Text::Shared(s) => assert!(std::sync::Arc::ptr_eq(s, &id)),
            Text::Static(_) => panic!("an identity is shared"),
        }
    }

    #[test]
    fn a_reader_behind_the_ring_is_told_what_it_lost() {
        let log = FlowLog::new(3);
        log.set_node("node-a");
        for _ in 0..5 {
            log.push(FlowEntry::default());
        }
        // Seqs 1..=5 were written; 3, 4, 5 are kept.
        let (all, lost) = log.after(0);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(lost, 0, "a new reader asked for what is there");
        assert_eq!(all[0].node, "node-a");
        let (rest, lost) = log.after(1);
        assert_eq!(rest.len(), 3);
        assert_eq!(lost, 1, "seq 2 was overwritten before this reader saw it");
        let (tail, lost) = log.after(3);
        assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(lost, 0);
        let (none, lost) = log.after(5);
        assert!(none.is_empty());
        assert_eq!(lost, 0);
        let off = FlowLog::new(0);
        off.push(FlowEntry::default());
        assert!(!off.enabled());
        assert_eq!(off.after(0), (vec![], 0));
    }
}

//! Flow events from the datapath's ring buffer, decoded into typed flows.
//!
//! The programs submit with `BPF_RB_NO_WAKEUP` (a wake-up per connect costs ~10 µs), so nothing
//! signals the reader: it drains the ring on a timer, sleeping in between, never spinning.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use aya::maps::{Map, MapData, RingBuf};
use signet_bpf::maps::{self as m, FlowEvent, Reason, ip_from16};
use signet_policy::eval::Direction;

use super::DatapathError;

/// What the datapath did with a connection or packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    L7,
    Audit,
    Unknown(u8),
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::L7 => "l7",
            Verdict::Audit => "audit",
            Verdict::Unknown(_) => "unknown",
        }
    }
}

/// One decoded flow event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// `CLOCK_MONOTONIC` nanoseconds, as `bpf_ktime_get_ns` gives them.
    pub monotonic_ns: u64,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// IP protocol number.
    pub protocol: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub endpoint_id: u32,
    pub direction: Direction,
    pub verdict: Verdict,
    pub reason: Reason,
    /// The compiled rule (0: a default decided).
    pub rule_id: u32,
}

impl From<FlowEvent> for Flow {
    fn from(e: FlowEvent) -> Self {
        Self {
            monotonic_ns: e.timestamp_ns,
            src: ip_from16(e.src_addr),
            dst: ip_from16(e.dst_addr),
            src_port: e.src_port,
            dst_port: e.dst_port,
            protocol: e.protocol,
            src_identity: e.src_identity,
            dst_identity: e.dst_identity,
            endpoint_id: e.endpoint_id,
            direction: if e.direction == m::DIRECTION_EGRESS {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            verdict: match e.action {
                m::ACTION_ALLOW => Verdict::Allow,
                m::ACTION_DENY => Verdict::Deny,
                m::ACTION_L7 => Verdict::L7,
                m::ACTION_AUDIT => Verdict::Audit,
                other => Verdict::Unknown(other),
            },
            reason: Reason::from_code(e.reason),
            rule_id: e.rule_id,
        }
    }
}

/// Every record waiting in `ring`, decoded; short records are skipped.
pub fn drain_ring(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if let Some(e) = FlowEvent::from_bytes(&item) {
            out.push(e);
        }
    }
    out
}

/// Reads flow events from a node's pinned ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
    interval: Duration,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl EventReader {
    /// Opens the ring pinned under `pin_dir/maps`; `interval` is how long to sleep when it is
    /// empty.
    pub fn open(pin_dir: &Path, interval: Duration) -> Result<Self, DatapathError> {
        let path = pin_dir.join("maps").join(signet_bpf::map_names::EVENTS);
        let data = MapData::from_pin(&path).map_err(|e| DatapathError::Map {
            map: signet_bpf::map_names::EVENTS,
            reason: format!("opening {}: {e}", path.display()),
        })?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(|e| DatapathError::Map {
            map: signet_bpf::map_names::EVENTS,
            reason: e.to_string(),
        })?;
        Ok(Self { ring, interval })
    }

    /// Whatever is in the ring now.
    pub fn drain(&mut self) -> Vec<Flow> {
        drain_ring(&mut self.ring)
            .into_iter()
            .map(Flow::from)
            .collect()
    }

    /// The next non-empty batch, sleeping `interval` between looks.
    pub async fn next_batch(&mut self) -> Vec<Flow> {
        loop {
            let batch = self.drain();
            if !batch.is_empty() {
                return batch;
            }
            tokio::time::sleep(self.interval).await;
        }
    }
}

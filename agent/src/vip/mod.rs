//! Addresses of their own for Gateways (from `LoadBalancerIPPool`s), on this node: delivered
//! here on every node that serves the Gateway (`routes`), and announced on the L2 segment
//! (ARP) by the one node elected for each address (`lease`, `arp`) as `L2AnnouncementPolicy`
//! says. When the elected node's agent goes, another takes the lease and announces with a
//! gratuitous ARP, so clients move to it.

pub mod arp;
pub mod lease;
pub mod routes;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use crate::routing::addresses::Plan;

/// Keeps the kernel and the announcer in step with the plan: routes for every address served
/// here, leases for the announced ones, ARP from the holder.
#[derive(Debug)]
pub struct Vips {
    node: String,
    leases: Option<lease::LeaseTable>,
    routed: BTreeSet<IpAddr>,
    wanted: Arc<RwLock<BTreeMap<IpAddr, Vec<String>>>>,
    arp: Arc<arp::Announcer>,
    started: bool,
    /// Signet's routes left by an earlier run have been looked for.
    swept: bool,
}

impl Vips {
    /// `leases`: the standalone lease table (Kubernetes mode elects nothing yet: it routes and
    /// serves, and announces nothing).
    pub fn new(node: &str, leases: Option<lease::LeaseTable>) -> Self {
        Self {
            node: node.to_owned(),
            leases,
            routed: BTreeSet::new(),
            wanted: Arc::default(),
            arp: Arc::new(arp::Announcer::default()),
            started: false,
            swept: false,
        }
    }

    /// Routes what `plan` serves here (and removes Signet's routes for anything else, left by
    /// an earlier run too); the election loop takes the announced set from here.
    pub fn follow(&mut self, plan: &Plan, drain: &crate::drain::Drain) {
        for r in &plan.refused {
            tracing::warn!("{r}; it announces nothing");
        }
        let wanted: BTreeSet<IpAddr> = plan.routed.iter().copied().collect();
        if let Err(e) = self.route(&wanted) {
            tracing::error!(error = %e, "routing own addresses to this node failed; they are not served here");
        }
        *self.wanted.write().unwrap_or_else(|p| p.into_inner()) = plan.announce.clone();
        if !self.started && self.leases.is_some() {
            self.started = true;
            let (leases, node, wanted, arp) = (
                self.leases.clone().expect("checked"),
                self.node.clone(),
                self.wanted.clone(),
                self.arp.clone(),
            );
            let stop = drain.stop_token();
            drain.spawn("l2 announcements", async move {
                elect(leases, node, wanted, arp, stop).await;
            });
        }
    }

    fn route(&mut self, wanted: &BTreeSet<IpAddr>) -> std::io::Result<()> {
        if *wanted == self.routed && self.swept {
            return Ok(());
        }
        let mut rtnl = routes::Rtnl::open()?;
        let present: BTreeSet<IpAddr> = rtnl.locals()?.into_iter().collect();
        for v6 in [false, true] {
            if wanted.iter().any(|ip| ip.is_ipv6() == v6) {
                rtnl.ensure_rules(v6)?;
            }
        }
        for ip in wanted.difference(&present) {
            rtnl.add_local(*ip)?;
            tracing::info!(%ip, "own address routed to this node");
        }
        for ip in present.difference(wanted) {
            rtnl.remove_local(*ip)?;
            tracing::info!(%ip, "own address no longer routed to this node");
        }
        for v6 in [false, true] {
            if !wanted.iter().any(|ip| ip.is_ipv6() == v6) {
                rtnl.remove_rules(v6)?;
            }
        }
        self.routed = wanted.clone();
        self.swept = true;
        Ok(())
    }

    /// On shutdown: what this node routed and announced goes (a crash leaves the routes,
    /// which deliver without announcing; the next start removes what is not wanted).
    pub fn shutdown(&mut self) {
        self.arp.set(BTreeMap::new());
        if let Err(e) = self.route(&BTreeSet::new()) {
            tracing::warn!(error = %e, "removing own-address routes");
        }
    }
}

/// How often leases are renewed and looked at, and how long one lasts without renewal.
pub const RENEW: Duration = Duration::from_millis(500);
pub const LEASE: Duration = Duration::from_secs(2);

/// The election loop: every [`RENEW`], takes or renews the lease of each address this node may
/// announce, lets go of the others, and has the ARP announcer answer for what it holds.
async fn elect(
    leases: lease::LeaseTable,
    node: String,
    wanted: Arc<RwLock<BTreeMap<IpAddr, Vec<String>>>>,
    arp: Arc<arp::Announcer>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut held: BTreeSet<IpAddr> = BTreeSet::new();
    loop {
        let want = wanted.read().unwrap_or_else(|p| p.into_inner()).clone();
        let candidates: BTreeSet<IpAddr> = want.keys().copied().collect();
        match leases.round(&node, &candidates, LEASE) {
            Ok(now) => {
                for ip in now.difference(&held) {
                    tracing::info!(%ip, node, "took the L2 lease: announcing");
                }
                for ip in held.difference(&now) {
                    tracing::info!(%ip, node, "L2 lease lost or let go: silent");
                }
                held = now;
            }
            Err(e) => {
                // Unsure whether it still holds anything: silent, as a node that lost would be.
                tracing::warn!(error = %e, "L2 lease table; announcing nothing");
                held.clear();
            }
        }
        arp.set(
            want.into_iter()
                .filter(|(ip, _)| held.contains(ip))
                .collect(),
        );
        tokio::select! {
            () = stop.cancelled() => {
                arp.set(BTreeMap::new());
                if let Err(e) = leases.round(&node, &BTreeSet::new(), LEASE) {
                    tracing::warn!(error = %e, "releasing L2 leases");
                }
                return;
            }
            () = tokio::time::sleep(RENEW) => {}
        }
    }
}

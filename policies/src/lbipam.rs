//! Load-balancer IP address management: the `LoadBalancerIPPool` custom resource
//! (`signet.dev/v1alpha1`, cluster-scoped) and the pure allocator that gives every Signet Gateway
//! and every Service of type LoadBalancer an address from a pool that selects it.
//!
//! The allocator is a function of (pools, requesters, the record of what was allocated before):
//! whoever runs it with the same inputs gets the same answer, so the record is all that must be
//! kept (a file in standalone mode, the pools' status in Kubernetes mode, written with
//! optimistic concurrency). It never gives one address to two owners, keeps an owner's
//! addresses for as long as they still satisfy its request, and gives a requester all the
//! addresses it needs or none.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::model::{FieldError, Selector};
use crate::resource::Labels;

/// A set of addresses Signet may give to Gateways and LoadBalancer Services.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "signet.dev",
    version = "v1alpha1",
    kind = "LoadBalancerIPPool",
    plural = "loadbalancerippools",
    shortname = "lbpool",
    status = "PoolStatus",
    doc = "Addresses Signet assigns to Gateways and Services of type LoadBalancer.",
    printcolumn = r#"{"name":"Disabled","type":"boolean","jsonPath":".spec.disabled"}"#,
    printcolumn = r#"{"name":"Used","type":"string","jsonPath":".status.used"}"#,
    printcolumn = r#"{"name":"Free","type":"string","jsonPath":".status.free"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerIPPoolSpec {
    /// CIDRs or start/stop ranges, IPv4 and IPv6.
    pub blocks: Vec<Block>,
    /// Which Services and Gateways may take addresses from this pool, by their labels (plus
    /// `signet.dev/namespace`, `signet.dev/name` and `signet.dev/kind`); absent selects all.
    /// A requester takes from pools with a selector before pools without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
    /// Whether a CIDR's first and last addresses (network and broadcast) may be given out.
    /// Ranges always include both ends; /32, /31, /128 and /127 always use every address.
    #[serde(
        default,
        skip_serializing_if = "is_default",
        rename = "allowFirstLastIPs"
    )]
    pub allow_first_last_ips: FirstLast,
    /// A disabled pool gives out nothing new; what it gave stays.
    #[serde(default, skip_serializing_if = "is_default")]
    pub disabled: bool,
}

/// Which nodes answer ARP and neighbour solicitations for which addresses, on which
/// interfaces. For each address one node among those selected is elected (a Lease) and
/// announces it; the others stay silent until it goes.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "signet.dev",
    version = "v1alpha1",
    kind = "L2AnnouncementPolicy",
    plural = "l2announcementpolicies",
    shortname = "l2ap",
    doc = "Layer 2 announcement (ARP, NDP) of Gateway and LoadBalancer Service addresses."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L2AnnouncementPolicySpec {
    /// The nodes that may announce; absent: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// The Services and Gateways whose addresses are announced, by their labels (plus
    /// `signet.dev/namespace`, `signet.dev/name`, `signet.dev/kind`); absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
    /// Regular expressions (whole-name matches) of the interfaces announced on; absent or
    /// empty: every interface that has an address in the same subnet as the announced one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
    /// Announce addresses given from LoadBalancerIPPools (Gateways and LoadBalancer
    /// Services).
    #[serde(default, rename = "loadBalancerIPs")]
    pub load_balancer_ips: bool,
    /// Announce Services' `spec.externalIPs`.
    #[serde(default, rename = "externalIPs")]
    pub external_ips: bool,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum FirstLast {
    Yes,
    #[default]
    No,
}

/// One block: `cidr`, or `start` and `stop` (inclusive, same family).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Block {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
}

/// What a pool holds and what it gave out. `allocations` is the record the allocator keeps
/// (in Kubernetes mode; standalone mode keeps it in a file).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PoolCondition>,
    /// Counts as decimal strings (an IPv6 block can hold more than an int64).
    #[serde(default)]
    pub total: String,
    #[serde(default)]
    pub used: String,
    #[serde(default)]
    pub free: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocations: Vec<Allocation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One address given to one owner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub address: String,
    pub owner: Owner,
}

#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// `Gateway` or `Service`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// An address family a requester wants one address of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    V4,
    V6,
    /// Either (IPv4 first): a Gateway that names no address.
    Any,
}

impl Want {
    fn admits(self, ip: IpAddr) -> bool {
        matches!(
            (self, ip),
            (Want::Any, _) | (Want::V4, IpAddr::V4(_)) | (Want::V6, IpAddr::V6(_))
        )
    }
}

/// Something that needs addresses: a Signet Gateway or a Service of type LoadBalancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub owner: Owner,
    /// Its labels, with `signet.dev/namespace`, `signet.dev/name` and `signet.dev/kind` added.
    pub labels: Labels,
    /// Addresses it asks for by value: all of them or nothing.
    pub requested: Vec<IpAddr>,
    /// One address of each family listed (`required`: without it the requester gets nothing;
    /// a family listed twice still gets one address).
    pub wants: Vec<(Want, bool)>,
    /// `metadata.creationTimestamp`: older requesters are served first.
    pub created: String,
}

impl Requester {
    /// Its labels plus the names pools can select on.
    pub fn labels_with_names(owner: &Owner, labels: Option<&Labels>) -> Labels {
        let mut l = labels.cloned().unwrap_or_default();
        l.insert("signet.dev/kind".into(), owner.kind.clone());
        l.insert("signet.dev/namespace".into(), owner.namespace.clone());
        l.insert("signet.dev/name".into(), owner.name.clone());
        l
    }
}

/// Why a requester got no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `NoPool`, `Exhausted`, `RequestedUnavailable` or `RequestedNotInPool`.
    pub reason: &'static str,
    pub message: String,
}

/// What one run of the allocator decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Every requester's addresses (with the pool they came from), or why it has none.
    pub assigned: BTreeMap<Owner, Result<Vec<(IpAddr, String)>, Refusal>>,
    /// The record to keep: address → (pool, owner).
    pub record: BTreeMap<IpAddr, (String, Owner)>,
    /// Each pool's status, without `lastTransitionTime`s (the writer keeps them).
    pub pools: BTreeMap<String, PoolStatus>,
}

impl Outcome {
    /// The record's entries of one pool, as its status lists them.
    pub fn allocations_of(&self, pool: &str) -> Vec<Allocation> {
        self.record
            .iter()
            .filter(|(_, (p, _))| p == pool)
            .map(|(ip, (_, owner))| Allocation {
                address: ip.to_string(),
                owner: owner.clone(),
            })
            .collect()
    }
}

/// A pool as the allocator uses it.
#[derive(Debug, Clone)]
struct Checked {
    name: String,
    ranges: Vec<(u128, u128, bool)>,
    selector: Option<Selector>,
    disabled: bool,
    /// Why it gives out nothing new, when it cannot (invalid, or overlapping an older pool).
    unusable: Option<(&'static str, String)>,
}

fn to_u128(ip: IpAddr) -> (u128, bool) {
    match ip {
        IpAddr::V4(a) => (u32::from(a) as u128, true),
        IpAddr::V6(a) => (u128::from(a), false),
    }
}

fn from_u128(n: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(std::net::Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(std::net::Ipv6Addr::from(n))
    }
}

/// A pool's blocks as inclusive ranges (lo, hi, is IPv4), or what is wrong with them.
pub fn ranges_of(
    spec: &LoadBalancerIPPoolSpec,
) -> Result<Vec<(u128, u128, bool)>, Vec<FieldError>> {
    let mut out = Vec::new();
    let mut errs = Vec::new();
    let err = |i: usize, field: &str, message: String| FieldError {
        path: format!("spec.blocks[{i}]{field}"),
        message,
    };
    if spec.blocks.is_empty() {
        errs.push(FieldError {
            path: "spec.blocks".into(),
            message: "a pool needs at least one block".into(),
        });
    }
    for (i, b) in spec.blocks.iter().enumerate() {
        match (&b.cidr, &b.start, &b.stop) {
            (Some(c), None, None) => match Cidr::parse(c) {
                Ok(c) => {
                    let (base, v4) = to_u128(c.addr());
                    let bits = if v4 { 32 } else { 128 };
                    let host_bits = bits - u32::from(c.prefix());
                    let size_minus_one = if host_bits == 128 {
                        u128::MAX
                    } else {
                        (1u128 << host_bits) - 1
                    };
                    let (mut lo, mut hi) = (base, base + size_minus_one);
                    // Network and broadcast (and IPv6's subnet-router anycast and last address)
                    // are left out unless allowed, except where the block has no others.
                    if spec.allow_first_last_ips == FirstLast::No && host_bits > 1 {
                        lo += 1;
                        hi -= 1;
                    }
                    out.push((lo, hi, v4));
                }
                Err(e) => errs.push(err(i, ".cidr", format!("`{c}`: {e}"))),
            },
            (None, Some(start), Some(stop)) => {
                let parse = |s: &str, f: &str| {
                    s.parse::<IpAddr>()
                        .map_err(|e| err(i, f, format!("`{s}`: {e}")))
                };
                match (parse(start, ".start"), parse(stop, ".stop")) {
                    (Ok(a), Ok(b)) => {
                        let ((lo, v4a), (hi, v4b)) = (to_u128(a), to_u128(b));
                        if v4a != v4b {
                            errs.push(err(
                                i,
                                "",
                                format!("start {a} and stop {b} are of different families"),
                            ));
                        } else if lo > hi {
                            errs.push(err(i, "", format!("start {a} is after stop {b}")));
                        } else {
                            out.push((lo, hi, v4a));
                        }
                    }
                    (a, b) => errs.extend(a.err().into_iter().chain(b.err())),
                }
            }
            _ => errs.push(err(
                i,
                "",
                "a block is either `cidr`, or `start` and `stop`".into(),
            )),
        }
    }
    if errs.is_empty() { Ok(out) } else { Err(errs) }
}

fn overlaps(a: &(u128, u128, bool), b: &(u128, u128, bool)) -> bool {
    a.2 == b.2 && a.0 <= b.1 && b.0 <= a.1
}

/// The pools, checked and ordered: older first (creation time, then name); a pool whose blocks
/// overlap an older usable pool's is unusable (its `Conflict` condition names that pool).
fn check_pools(pools: &[LoadBalancerIPPool]) -> Vec<Checked> {
    let mut sorted: Vec<&LoadBalancerIPPool> = pools.iter().collect();
    sorted.sort_by_key(|p| {
        (
            p.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(i64::MAX),
            p.metadata.name.clone().unwrap_or_default(),
        )
    });
    let mut out: Vec<Checked> = Vec::new();
    for p in sorted {
        let name = p.metadata.name.clone().unwrap_or_default();
        let mut unusable = None;
        let ranges = match ranges_of(&p.spec) {
            Ok(r) => r,
            Err(errs) => {
                let m = errs
                    .iter()
                    .map(|e| format!("{}: {}", e.path, e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                unusable = Some(("InvalidBlocks", m));
                Vec::new()
            }
        };
        let mut sel_errs = Vec::new();
        let selector = p
            .spec
            .service_selector
            .as_ref()
            .map(|s| Selector::from_k8s(s, "spec.serviceSelector", &mut sel_errs));
        if unusable.is_none() && !sel_errs.is_empty() {
            let m = sel_errs
                .iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            unusable = Some(("InvalidSelector", m));
        }
        if unusable.is_none()
            && let Some(older) = out.iter().find(|o| {
                o.unusable.is_none()
                    && o.ranges
                        .iter()
                        .any(|a| ranges.iter().any(|b| overlaps(a, b)))
            })
        {
            unusable = Some((
                "Conflict",
                format!(
                    "its blocks overlap those of the older pool {}; it gives out no address",
                    older.name
                ),
            ));
        }
        out.push(Checked {
            name,
            ranges,
            selector,
            disabled: p.spec.disabled,
            unusable,
        });
    }
    out
}

impl Checked {
    fn selects(&self, r: &Requester) -> bool {
        self.selector.as_ref().is_none_or(|s| s.matches(&r.labels))
    }
    fn holds(&self, ip: IpAddr) -> bool {
        let (n, v4) = to_u128(ip);
        self.ranges
            .iter()
            .any(|&(lo, hi, f)| f == v4 && lo <= n && n <= hi)
    }
    fn gives(&self) -> bool {
        self.unusable.is_none() && !self.disabled
    }
    /// The lowest address of this pool that `want` admits and nobody uses.
    fn first_free(&self, want: Want, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        let mut ranges: Vec<_> = self.ranges.clone();
        // IPv4 first for `Any`.
        ranges.sort_by_key(|r| (!r.2, r.0));
        for (lo, hi, v4) in ranges {
            if !want.admits(from_u128(lo, v4)) {
                continue;
            }
            let mut candidate = lo;
            for u in used.range(from_u128(lo, v4)..=from_u128(hi, v4)) {
                let (n, _) = to_u128(*u);
                if n > candidate {
                    break;
                }
                candidate = n + 1;
                if candidate == 0 {
                    return None; // wrapped past the top of the IPv6 space
                }
            }
            if candidate <= hi {
                return Some(from_u128(candidate, v4));
            }
        }
        None
    }
    fn size(&self) -> u128 {
        self.ranges
            .iter()
            .map(|&(lo, hi, _)| (hi - lo).saturating_add(1))
            .fold(0u128, u128::saturating_add)
    }
}

/// Gives every requester its addresses, keeping what `previous` gave where it still fits.
pub fn allocate(
    pools: &[LoadBalancerIPPool],
    requesters: &[Requester],
    previous: &BTreeMap<IpAddr, (String, Owner)>,
) -> Outcome {
    let checked = check_pools(pools);
    let by_name: BTreeMap<&str, &Checked> = checked.iter().map(|c| (c.name.as_str(), c)).collect();
    let mut order: Vec<&Requester> = requesters.iter().collect();
    order.sort_by(|a, b| (&a.created, &a.owner).cmp(&(&b.created, &b.owner)));
    let wanted: BTreeMap<&Owner, &Requester> = order.iter().map(|r| (&r.owner, *r)).collect();

    // What stays from before: the owner still asks, its pool still exists, holds the address
    // and selects the owner. An invalid or conflicting pool keeps what it gave.
    let mut kept: BTreeMap<&Owner, Vec<(IpAddr, String)>> = BTreeMap::new();
    for (ip, (pool, owner)) in previous {
        let (Some(r), Some(p)) = (wanted.get(owner), by_name.get(pool.as_str())) else {
            continue;
        };
        let fits_pool = p.unusable.is_some() || (p.holds(*ip) && p.selects(r));
        let fits_request = if r.requested.is_empty() {
            r.wants.iter().any(|(w, _)| w.admits(*ip))
        } else {
            r.requested.contains(ip)
        };
        if fits_pool && fits_request {
            kept.entry(owner).or_default().push((*ip, pool.clone()));
        }
    }
    // One kept address per wanted family (a changed request may leave two of one family).
    for (owner, ips) in kept.iter_mut() {
        let r = wanted[owner];
        if r.requested.is_empty() {
            let mut chosen = Vec::new();
            for (w, _) in &r.wants {
                if chosen.iter().any(|(c, _): &(IpAddr, String)| w.admits(*c)) {
                    continue;
                }
                if let Some(found) = ips.iter().find(|(ip, _)| w.admits(*ip)) {
                    chosen.push(found.clone());
                }
            }
            *ips = chosen;
        }
    }
    let mut used: BTreeSet<IpAddr> = kept.values().flatten().map(|(ip, _)| *ip).collect();
    let mut outcome = Outcome::default();
    let mut waiting: BTreeMap<String, Vec<String>> = BTreeMap::new();

    for r in &order {
        let mut mine = kept.remove(&r.owner).unwrap_or_default();
        // Pools that select by labels come before catch-all pools, then older before newer.
        let mut selecting: Vec<&Checked> = checked.iter().filter(|p| p.selects(r)).collect();
        selecting.sort_by_key(|p| p.selector.is_none());
        let result = if selecting.is_empty() {
            Err(Refusal {
                reason: "NoPool",
                message: "no LoadBalancerIPPool selects it".into(),
            })
        } else if !r.requested.is_empty() {
            let mut refusal = None;
            for ip in &r.requested {
                if mine.iter().any(|(m, _)| m == ip) {
                    continue;
                }
                let Some(p) = selecting.iter().find(|p| p.gives() && p.holds(*ip)) else {
                    refusal = Some(Refusal {
                        reason: "RequestedNotInPool",
                        message: format!("{ip} is in no enabled pool that selects it"),
                    });
                    break;
                };
                if used.contains(ip) {
                    let holder = previous
                        .get(ip)
                        .map(|(_, o)| o.to_string())
                        .or_else(|| outcome.record.get(ip).map(|(_, o)| o.to_string()))
                        .unwrap_or_else(|| "another owner".into());
                    refusal = Some(Refusal {
                        reason: "RequestedUnavailable",
                        message: format!("{ip} is already assigned to {holder}"),
                    });
                    break;
                }
                mine.push((*ip, p.name.clone()));
                used.insert(*ip);
            }
            match refusal {
                None => Ok(mine),
                Some(why) => {
                    for (ip, _) in &mine {
                        used.remove(ip);
                    }
                    Err(why)
                }
            }
        } else {
            let mut missing = None;
            for (want, required) in &r.wants {
                if mine.iter().any(|(ip, _)| want.admits(*ip)) {
                    continue;
                }
                let found = selecting
                    .iter()
                    .filter(|p| p.gives())
                    .find_map(|p| p.first_free(*want, &used).map(|ip| (ip, p.name.clone())));
                match found {
                    Some((ip, pool)) => {
                        used.insert(ip);
                        mine.push((ip, pool));
                    }
                    None if *required => {
                        missing = Some(*want);
                        break;
                    }
                    None => {}
                }
            }
            match missing {
                None => Ok(mine),
                Some(want) => {
                    for (ip, _) in &mine {
                        used.remove(ip);
                    }
                    for p in selecting.iter().filter(|p| p.gives()) {
                        waiting
                            .entry(p.name.clone())
                            .or_default()
                            .push(r.owner.to_string());
                    }
                    let family = match want {
                        Want::V4 => "IPv4 ",
                        Want::V6 => "IPv6 ",
                        Want::Any => "",
                    };
                    let names: Vec<&str> = selecting.iter().map(|p| p.name.as_str()).collect();
                    Err(Refusal {
                        reason: "Exhausted",
                        message: format!(
                            "no free {family}address in the pools that select it ({})",
                            names.join(", ")
                        ),
                    })
                }
            }
        };
        if let Ok(ips) = &result {
            for (ip, pool) in ips {
                outcome.record.insert(*ip, (pool.clone(), r.owner.clone()));
            }
        }
        outcome.assigned.insert(r.owner.clone(), result);
    }

    for p in &checked {
        let used_here = outcome
            .record
            .values()
            .filter(|(n, _)| n == &p.name)
            .count() as u128;
        let total = p.size();
        let mut conditions = vec![match &p.unusable {
            None => cond(
                "Accepted",
                true,
                "Accepted",
                "the blocks are valid and overlap no older pool".into(),
            ),
            Some((reason, m)) => cond("Accepted", false, reason, m.clone()),
        }];
        if p.unusable.is_none() {
            let free = total.saturating_sub(used_here);
            let w = waiting.get(&p.name);
            conditions.push(match (free, w) {
                (_, Some(w)) => cond(
                    "Exhausted",
                    true,
                    "NoFreeAddresses",
                    format!("waiting for an address: {}", w.join(", ")),
                ),
                (0, None) => cond(
                    "Exhausted",
                    true,
                    "NoFreeAddresses",
                    format!("all {total} addresses are used"),
                ),
                _ => cond(
                    "Exhausted",
                    false,
                    "FreeAddresses",
                    format!("{free} of {total} addresses are free"),
                ),
            });
        }
        outcome.pools.insert(
            p.name.clone(),
            PoolStatus {
                conditions,
                total: total.to_string(),
                used: used_here.to_string(),
                free: total.saturating_sub(used_here).to_string(),
                allocations: outcome.allocations_of(&p.name),
            },
        );
    }
    outcome
}

fn cond(type_: &str, status: bool, reason: &str, message: String) -> PoolCondition {
    PoolCondition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: None,
        observed_generation: None,
    }
}

/// The record kept in pools' status (Kubernetes mode): every allocation of every pool.
pub fn record_of(pools: &[LoadBalancerIPPool]) -> BTreeMap<IpAddr, (String, Owner)> {
    let mut out = BTreeMap::new();
    for p in pools {
        let name = p.metadata.name.clone().unwrap_or_default();
        for a in p.status.iter().flat_map(|s| &s.allocations) {
            if let Ok(ip) = a.address.parse() {
                out.entry(ip)
                    .or_insert_with(|| (name.clone(), a.owner.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;

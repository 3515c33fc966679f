//! Compiles policies into the datapath's policy entries and the proxy's L7 tables, and diffs two
//! compilations so an update touches only what changed.
//!
//! Key `{endpoint, peer identity (0 = any), port (0 = any), protocol, direction}`. The datapath
//! looks up `(peer, port)`, then `(peer, 0)`, then `(0, port)`, then `(0, 0)`; no entry at all for
//! an endpoint and direction means no policy selects it (default allow). Every rule's peers are
//! resolved to the numeric identities they match, so a peer not named by any rule is exactly a
//! peer that only wildcard rules match: that is what the `0` rows hold. Each cell's verdict is
//! computed from the resolved rules, then rows equal to what the lookup would find without them
//! are dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use signet_ca::SpiffeId;

use crate::cidr::{CIDR_IDENTITY_BASE, Cidr};
use crate::cluster::{Cluster, Workload};
use crate::eval::{Direction, PeerInfo, RuleRef, peer_matches, selects};
use crate::identity::{ANY, HEALTH, HOST, INGRESS, REMOTE_NODE, UNMANAGED, WORLD};
use crate::model::{PeerMatch, Policy, Rule};
use crate::resource::{Mode, Protocol};

/// What the datapath does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Allowed to the proxy, which checks every request against the L7 table.
    L7,
    /// Allowed, and reported: an audit-mode policy would deny it.
    Audit,
}

impl Action {
    /// The value the eBPF program stores.
    pub fn code(self) -> u8 {
        match self {
            Action::Allow => 1,
            Action::Deny => 2,
            Action::L7 => 3,
            Action::Audit => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::L7 => "l7",
            Action::Audit => "audit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub endpoint: u32,
    pub direction: Direction,
    pub proto: Protocol,
    pub peer: u32,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    pub action: Action,
    /// Key of `Compiled::rules`; 0 means a default decided.
    pub rule: u32,
}

/// One compiled policy set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub entries: BTreeMap<Key, Entry>,
    /// For `L7` entries: the rules (ids) whose `http` lists requests must match.
    pub l7: BTreeMap<Key, Vec<u32>>,
    /// Rule id → rule. Ids are kept across compilations (see `Input::previous`), so editing one
    /// policy does not renumber, and so rewrite, the entries of every other.
    pub rules: BTreeMap<u32, RuleRef>,
    /// Endpoint id → `namespace/name`.
    pub endpoints: BTreeMap<u32, String>,
    /// Every prefix a `cidr:` peer names (with its `except`s) → its node-local identity, for
    /// the ipcache: an address takes the identity of the longest prefix containing it.
    pub cidrs: BTreeMap<Cidr, u32>,
}

impl Compiled {
    /// What the datapath finds for a connection, following its lookup order.
    pub fn lookup(
        &self,
        endpoint: u32,
        direction: Direction,
        peer: u32,
        port: u16,
        proto: Protocol,
    ) -> Option<(Key, Entry)> {
        for (p, q) in [(peer, port), (peer, 0), (ANY, port), (ANY, 0)] {
            let key = Key {
                endpoint,
                direction,
                proto,
                peer: p,
                port: q,
            };
            if let Some(e) = self.entries.get(&key) {
                return Some((key, *e));
            }
        }
        None
    }

    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        self.rules.get(&id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(
        "policy needs {needed} datapath entries but the map holds {capacity}; largest endpoints: {}. Nothing was applied.",
        .largest.iter().map(|(n, c)| format!("{n} ({c})")).collect::<Vec<_>>().join(", ")
    )]
    Capacity {
        needed: usize,
        capacity: usize,
        largest: Vec<(String, usize)>,
    },
}

/// Everything the compiler needs.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub cluster: &'a Cluster,
    /// Sorted by namespace and name (`sorted_policies`).
    pub policies: &'a [&'a Policy],
    /// Allocated identities (reserved ones are implied).
    pub identities: &'a BTreeMap<SpiffeId, u32>,
    /// The endpoints to compile for, with their datapath ids.
    pub endpoints: &'a [(u32, &'a Workload)],
    /// The policy map's size.
    pub capacity: usize,
    /// The compilation in force, whose rule ids are kept.
    pub previous: Option<&'a Compiled>,
}

/// Policies in rule-id order.
pub fn sorted_policies(policies: &[Policy]) -> Vec<&Policy> {
    let mut v: Vec<&Policy> = policies.iter().collect();
    v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    v
}

/// Numbers a rule's peers resolve to; `None` means every peer (a wildcard).
type PeerSet = Option<BTreeSet<u32>>;

struct Resolved<'a> {
    /// Position in policy order: when several rules match, the first in this order is named.
    order: usize,
    id: u32,
    audit: bool,
    peers: Arc<PeerSet>,
    rule: &'a Rule,
}

impl Resolved<'_> {
    /// Whether this rule applies to the cell `(peer, port)`, where 0 stands for "any peer / port
    /// no rule names".
    fn hits(&self, peer: u32, port: u16, proto: Protocol) -> bool {
        let peer_ok = match self.peers.as_ref() {
            None => true,
            Some(set) => peer != ANY && set.contains(&peer),
        };
        let port_ok = self.rule.ports.is_empty()
            || (port != 0
                && self
                    .rule
                    .ports
                    .iter()
                    .any(|p| p.port == port && p.protocol == proto));
        peer_ok && port_ok
    }
}

/// The identity universe: reserved numbers and every allocated SPIFFE ID, each with its
/// namespace's labels worked out once.
struct Universe {
    peers: Vec<(PeerInfo, Option<crate::resource::Labels>)>,
}

/// Numbers for every prefix the policies name, from `CIDR_IDENTITY_BASE`: `previous`'s number
/// where the prefix had one, new prefixes after the highest ever given, so an edit renumbers
/// nothing in force.
fn cidr_identities(policies: &[&Policy], previous: Option<&Compiled>) -> BTreeMap<Cidr, u32> {
    let named: BTreeSet<Cidr> = policies
        .iter()
        .flat_map(|p| {
            p.ingress
                .iter()
                .flatten()
                .chain(p.egress.iter().flatten())
                .chain(&p.ingress_deny)
                .chain(&p.egress_deny)
        })
        .flat_map(|r| r.peers.iter().flat_map(PeerMatch::prefixes))
        .copied()
        .collect();
    let known = previous.map(|c| &c.cidrs);
    let mut next = known
        .and_then(|k| k.values().max().copied())
        .map_or(CIDR_IDENTITY_BASE, |n| n + 1);
    named
        .into_iter()
        .map(|c| {
            let n = known.and_then(|k| k.get(&c).copied()).unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            (c, n)
        })
        .collect()
}

impl Universe {
    fn new(
        identities: &BTreeMap<SpiffeId, u32>,
        cidrs: &BTreeMap<Cidr, u32>,
        cluster: &Cluster,
    ) -> Self {
        let mut peers: Vec<(PeerInfo, Option<crate::resource::Labels>)> =
            [HOST, WORLD, UNMANAGED, HEALTH, REMOTE_NODE, INGRESS]
                .into_iter()
                .map(|number| {
                    (
                        PeerInfo {
                            number,
                            id: None,
                            cidr: None,
                        },
                        None,
                    )
                })
                .collect();
        peers.extend(identities.iter().map(|(id, n)| {
            let labels = cluster
                .namespace_of(id)
                .map(|ns| cluster.namespace_labels(ns));
            (
                PeerInfo {
                    number: *n,
                    id: Some(id.clone()),
                    cidr: None,
                },
                labels,
            )
        }));
        peers.extend(cidrs.iter().map(|(c, n)| {
            let peer = PeerInfo {
                number: *n,
                id: None,
                cidr: Some(*c),
            };
            (peer, None)
        }));
        Self { peers }
    }

    fn resolve(&self, rule: &Rule, cluster: &Cluster) -> PeerSet {
        let mut set = BTreeSet::new();
        for m in &rule.peers {
            match m {
                PeerMatch::Entity(crate::resource::Entity::Any) => return None,
                PeerMatch::Namespaces(sel) => set.extend(
                    self.peers
                        .iter()
                        .filter(|(_, labels)| labels.as_ref().is_some_and(|l| sel.matches(l)))
                        .map(|(p, _)| p.number),
                ),
                _ => set.extend(
                    self.peers
                        .iter()
                        .filter(|(p, _)| peer_matches(m, p, cluster))
                        .map(|(p, _)| p.number),
                ),
            }
        }
        Some(set)
    }
}

/// Rule ids and order for one policy's rules, by list.
#[derive(Default)]
struct PolicyRules {
    ingress: Vec<(usize, u32)>,
    ingress_deny: Vec<(usize, u32)>,
    egress: Vec<(usize, u32)>,
    egress_deny: Vec<(usize, u32)>,
}

impl PolicyRules {
    fn get(&self, dir: Direction, deny: bool) -> &[(usize, u32)] {
        match (dir, deny) {
            (Direction::Ingress, false) => &self.ingress,
            (Direction::Ingress, true) => &self.ingress_deny,
            (Direction::Egress, false) => &self.egress,
            (Direction::Egress, true) => &self.egress_deny,
        }
    }

    fn get_mut(&mut self, dir: Direction, deny: bool) -> &mut Vec<(usize, u32)> {
        match (dir, deny) {
            (Direction::Ingress, false) => &mut self.ingress,
            (Direction::Ingress, true) => &mut self.ingress_deny,
            (Direction::Egress, false) => &mut self.egress,
            (Direction::Egress, true) => &mut self.egress_deny,
        }
    }
}

/// Rule order: policies in order; per policy ingress, ingressDeny, egress, egressDeny, rules in
/// order. Ids come from `previous` where the rule existed; new rules get fresh ids.
struct RuleTable {
    /// Indexed like `Input::policies`.
    per_policy: Vec<PolicyRules>,
    ids: BTreeMap<u32, RuleRef>,
}

fn rule_table(policies: &[&Policy], previous: Option<&Compiled>) -> RuleTable {
    let known: HashMap<&RuleRef, u32> = previous
        .map(|c| c.rules.iter().map(|(id, r)| (r, *id)).collect())
        .unwrap_or_default();
    let mut next = previous
        .and_then(|c| c.rules.keys().next_back().copied())
        .unwrap_or(0)
        + 1;
    let mut table = RuleTable {
        per_policy: Vec::with_capacity(policies.len()),
        ids: BTreeMap::new(),
    };
    let mut order = 0;
    for p in policies {
        let mut rules = PolicyRules::default();
        let groups = [
            (
                Direction::Ingress,
                false,
                p.ingress.as_ref().map_or(0, Vec::len),
            ),
            (Direction::Ingress, true, p.ingress_deny.len()),
            (
                Direction::Egress,
                false,
                p.egress.as_ref().map_or(0, Vec::len),
            ),
            (Direction::Egress, true, p.egress_deny.len()),
        ];
        for (direction, deny, n) in groups {
            for index in 0..n {
                let r = RuleRef {
                    policy: p.id(),
                    direction,
                    deny,
                    index,
                };
                let id = match known.get(&r) {
                    Some(id) => *id,
                    None => {
                        next += 1;
                        next - 1
                    }
                };
                table.ids.insert(id, r);
                rules.get_mut(direction, deny).push((order, id));
                order += 1;
            }
        }
        table.per_policy.push(rules);
    }
    table
}

/// Shared state of one compilation.
struct Compiler<'a> {
    input: &'a Input<'a>,
    table: RuleTable,
    universe: Universe,
    /// Policy indexes by namespace.
    by_namespace: HashMap<&'a str, Vec<usize>>,
    /// Resolved peers by rule order.
    resolved: HashMap<usize, Arc<PeerSet>>,
    cidrs: BTreeMap<Cidr, u32>,
}

impl<'a> Compiler<'a> {
    fn new(input: &'a Input<'a>, previous: Option<&Compiled>) -> Self {
        let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, p) in input.policies.iter().enumerate() {
            by_namespace
                .entry(p.namespace.as_str())
                .or_default()
                .push(i);
        }
        let cidrs = cidr_identities(input.policies, previous);
        Self {
            input,
            table: rule_table(input.policies, previous),
            universe: Universe::new(input.identities, &cidrs, input.cluster),
            by_namespace,
            resolved: HashMap::new(),
            cidrs,
        }
    }

    fn peers(&mut self, order: usize, rule: &Rule) -> Arc<PeerSet> {
        if let Some(p) = self.resolved.get(&order) {
            return p.clone();
        }
        let p = Arc::new(self.universe.resolve(rule, self.input.cluster));
        self.resolved.insert(order, p.clone());
        p
    }

    fn endpoint(&mut self, endpoint: u32, w: &Workload, out: &mut Compiled) {
        out.endpoints.insert(endpoint, w.key());
        for dir in [Direction::Ingress, Direction::Egress] {
            self.direction(endpoint, w, dir, out);
        }
    }
}

/// Endpoints selected by any of `policies` (say the old and new version of an edited policy):
/// the only ones whose entries can change.
pub fn affected_endpoints(endpoints: &[(u32, &Workload)], policies: &[&Policy]) -> Vec<u32> {
    endpoints
        .iter()
        .filter(|(_, w)| policies.iter().any(|p| selects(p, w)))
        .map(|(id, _)| *id)
        .collect()
}

/// Compiles `input` into entries and L7 tables, or fails whole when they exceed the capacity.
pub fn compile(input: &Input<'_>) -> Result<Compiled, CompileError> {
    let mut c = Compiler::new(input, input.previous);
    let mut out = Compiled::default();
    for (endpoint, w) in input.endpoints {
        c.endpoint(*endpoint, w, &mut out);
    }
    out.rules = std::mem::take(&mut c.table.ids);
    out.cidrs = std::mem::take(&mut c.cidrs);
    check_capacity(&out, input.capacity)?;
    Ok(out)
}

/// A compilation and what it was made from, for [`next`].
#[derive(Debug, Clone, Copy)]
pub struct Made<'a> {
    pub compiled: &'a Compiled,
    pub input: Input<'a>,
}

/// The compilation of `input` that follows `previous`, as the agent makes each one. When only
/// policies changed (the same cluster, identities, endpoints and capacity), [`update`]
/// recompiles just the endpoints the changed policies select, in their old version or their new;
/// no change at all reuses the previous compilation; anything else compiles everything, keeping
/// the previous rule ids. The result is the same as a full [`compile`] would give (the property
/// test checks it), for a fraction of the work on large clusters.
pub fn next(previous: Option<Made<'_>>, input: &Input<'_>) -> Result<Compiled, CompileError> {
    let Some(prev) = previous else {
        return compile(input);
    };
    let same_world = prev.input.cluster == input.cluster
        && prev.input.identities == input.identities
        && prev.input.capacity == input.capacity
        && prev.input.endpoints.len() == input.endpoints.len()
        && prev
            .input
            .endpoints
            .iter()
            .zip(input.endpoints)
            .all(|(a, b)| a.0 == b.0 && a.1 == b.1);
    if !same_world {
        return compile(&Input {
            previous: Some(prev.compiled),
            ..*input
        });
    }
    let changed = changed_policies(prev.input.policies, input.policies);
    if changed.is_empty() {
        return Ok(prev.compiled.clone());
    }
    let affected = affected_endpoints(input.endpoints, &changed);
    let mut current = prev.compiled.clone();
    update(&mut current, input, &affected)?;
    Ok(current)
}

/// Every policy added, removed or edited between `old` and `new`, in each version it has.
fn changed_policies<'a>(old: &[&'a Policy], new: &[&'a Policy]) -> Vec<&'a Policy> {
    let key = |p: &&'a Policy| (p.namespace.clone(), p.name.clone());
    let old: BTreeMap<_, &Policy> = old.iter().map(|p| (key(p), *p)).collect();
    let new: BTreeMap<_, &Policy> = new.iter().map(|p| (key(p), *p)).collect();
    let mut changed = Vec::new();
    for (k, o) in &old {
        match new.get(k) {
            Some(n) if n == o => {}
            Some(n) => changed.extend([*o, *n]),
            None => changed.push(*o),
        }
    }
    changed.extend(
        new.iter()
            .filter(|(k, _)| !old.contains_key(*k))
            .map(|(_, n)| *n),
    );
    changed
}

/// Recompiles only `endpoints` (for instance `affected_endpoints` of an edited policy) into
/// `current`, keeping its rule ids, and returns what changed. On a capacity error `current` is
/// left as it was.
pub fn update(
    current: &mut Compiled,
    input: &Input<'_>,
    endpoints: &[u32],
) -> Result<Diff, CompileError> {
    let mut c = Compiler::new(input, Some(current));
    // A prefix named or dropped moves addresses between CIDR identities under every endpoint's
    // rules, not only under the edited policy's.
    let wanted: BTreeSet<u32> = if c.cidrs.keys().ne(current.cidrs.keys()) {
        input.endpoints.iter().map(|(e, _)| *e).collect()
    } else {
        endpoints.iter().copied().collect()
    };
    let mut fresh = Compiled::default();
    for (endpoint, w) in input.endpoints.iter().filter(|(e, _)| wanted.contains(e)) {
        c.endpoint(*endpoint, w, &mut fresh);
    }
    let mut old = Compiled::default();
    for &e in &wanted {
        let range = endpoint_range(e);
        old.entries
            .extend(current.entries.range(range.clone()).map(|(k, v)| (*k, *v)));
        old.l7
            .extend(current.l7.range(range).map(|(k, v)| (*k, v.clone())));
    }
    let d = diff(&old, &fresh);
    let new_len = current.entries.len() + d.added.len() - d.removed.len();
    if new_len > input.capacity {
        let mut probe = fresh.clone();
        probe.entries.extend(
            current
                .entries
                .iter()
                .filter(|(k, _)| !wanted.contains(&k.endpoint))
                .map(|(k, v)| (*k, *v)),
        );
        probe.endpoints = current.endpoints.clone();
        probe.endpoints.extend(fresh.endpoints.clone());
        check_capacity(&probe, input.capacity)?;
    }
    for k in &d.removed {
        current.entries.remove(k);
    }
    for (k, v) in d.added.iter().chain(&d.changed) {
        current.entries.insert(*k, *v);
    }
    // The L7 lists of the recompiled endpoints are replaced whole: an entry can keep its action
    // and deciding rule while the `http` rules behind it change (one added or dropped beside
    // it), and the map diff above does not see that.
    for &e in &wanted {
        let stale: Vec<Key> = current
            .l7
            .range(endpoint_range(e))
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            current.l7.remove(&k);
        }
    }
    current.l7.extend(fresh.l7);
    current.endpoints.extend(fresh.endpoints);
    current.rules = std::mem::take(&mut c.table.ids);
    current.cidrs = std::mem::take(&mut c.cidrs);
    Ok(d)
}

fn endpoint_range(e: u32) -> std::ops::RangeInclusive<Key> {
    let lo = Key {
        endpoint: e,
        direction: Direction::Ingress,
        proto: Protocol::Tcp,
        peer: 0,
        port: 0,
    };
    let hi = Key {
        endpoint: e,
        direction: Direction::Egress,
        proto: Protocol::Other,
        peer: u32::MAX,
        port: u16::MAX,
    };
    lo..=hi
}

fn check_capacity(out: &Compiled, capacity: usize) -> Result<(), CompileError> {
    if out.entries.len() <= capacity {
        return Ok(());
    }
    let mut per: BTreeMap<u32, usize> = BTreeMap::new();
    for k in out.entries.keys() {
        *per.entry(k.endpoint).or_default() += 1;
    }
    let mut largest: Vec<(String, usize)> = per
        .into_iter()
        .map(|(e, c)| (out.endpoints.get(&e).cloned().unwrap_or_default(), c))
        .collect();
    largest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    largest.truncate(5);
    Err(CompileError::Capacity {
        needed: out.entries.len(),
        capacity,
        largest,
    })
}

impl Compiler<'_> {
    fn direction(&mut self, endpoint: u32, w: &Workload, dir: Direction, out: &mut Compiled) {
        let input = self.input;
        let mut allows = Vec::new();
        let mut denies = Vec::new();
        let (mut enforced, mut enforced_with_audit) = (false, false);
        let candidates = self
            .by_namespace
            .get(w.namespace.as_str())
            .cloned()
            .unwrap_or_default();
        for pi in candidates {
            let p = input.policies[pi];
            if !p.selector.matches(&w.labels) {
                continue;
            }
            let audit = p.mode == Mode::Audit;
            let (allow_rules, deny_rules) = match dir {
                Direction::Ingress => (p.ingress.as_ref(), &p.ingress_deny),
                Direction::Egress => (p.egress.as_ref(), &p.egress_deny),
            };
            if let Some(list) = allow_rules {
                enforced_with_audit = true;
                enforced |= !audit;
                for (i, rule) in list.iter().enumerate() {
                    let (order, id) = self.table.per_policy[pi].get(dir, false)[i];
                    let peers = self.peers(order, rule);
                    allows.push(Resolved {
                        order,
                        id,
                        audit,
                        peers,
                        rule,
                    });
                }
            }
            for (i, rule) in deny_rules.iter().enumerate() {
                let (order, id) = self.table.per_policy[pi].get(dir, true)[i];
                let peers = self.peers(order, rule);
                denies.push(Resolved {
                    order,
                    id,
                    audit,
                    peers,
                    rule,
                });
            }
        }
        cells_into(
            endpoint,
            dir,
            &allows,
            &denies,
            enforced,
            enforced_with_audit,
            out,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn cells_into(
    endpoint: u32,
    dir: Direction,
    allows: &[Resolved<'_>],
    denies: &[Resolved<'_>],
    enforced: bool,
    enforced_with_audit: bool,
    out: &mut Compiled,
) {
    if !enforced_with_audit && denies.is_empty() {
        return;
    }
    let mut peers: BTreeSet<u32> = BTreeSet::from([ANY]);
    for r in allows.iter().chain(denies) {
        peers.extend(r.peers.as_ref().iter().flatten());
    }
    for proto in Protocol::ALL {
        let mut ports: BTreeSet<u16> = BTreeSet::from([0]);
        for r in allows.iter().chain(denies) {
            ports.extend(
                r.rule
                    .ports
                    .iter()
                    .filter(|p| p.protocol == proto)
                    .map(|p| p.port),
            );
        }
        let mut cells = BTreeMap::new();
        for &peer in &peers {
            for &port in &ports {
                let cell = Cell { peer, port, proto };
                let e = cell.decide(allows, denies, enforced, false);
                let a = cell.decide(allows, denies, enforced_with_audit, true);
                let entry = match (e, a) {
                    (Outcome::Deny(id), _) => Entry {
                        action: Action::Deny,
                        rule: id,
                    },
                    (Outcome::L7(ids), _) => Entry {
                        action: Action::L7,
                        rule: ids[0],
                    },
                    (Outcome::Allow(_), Outcome::Deny(aid)) => Entry {
                        action: Action::Audit,
                        rule: aid,
                    },
                    (Outcome::Allow(id), _) => Entry {
                        action: Action::Allow,
                        rule: id,
                    },
                };
                let l7 = match cell.decide(allows, denies, enforced, false) {
                    Outcome::L7(ids) => Some(ids),
                    _ => None,
                };
                cells.insert((peer, port), (entry, l7));
            }
        }
        prune_into(endpoint, dir, proto, cells, out);
    }
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    peer: u32,
    port: u16,
    proto: Protocol,
}

enum Outcome {
    Allow(u32),
    Deny(u32),
    L7(Vec<u32>),
}

impl Cell {
    fn decide(
        &self,
        allows: &[Resolved<'_>],
        denies: &[Resolved<'_>],
        enforced: bool,
        with_audit: bool,
    ) -> Outcome {
        let counted = |r: &&Resolved<'_>| {
            (with_audit || !r.audit) && r.hits(self.peer, self.port, self.proto)
        };
        if let Some(d) = denies.iter().filter(counted).min_by_key(|r| r.order) {
            return Outcome::Deny(d.id);
        }
        if !enforced {
            return Outcome::Allow(0);
        }
        let mut matching: Vec<&Resolved<'_>> = allows.iter().filter(counted).collect();
        matching.sort_by_key(|r| r.order);
        if let Some(r) = matching.iter().find(|r| r.rule.http.is_none()) {
            return Outcome::Allow(r.id);
        }
        let l7: Vec<u32> = matching.iter().map(|r| r.id).collect();
        if l7.is_empty() {
            Outcome::Deny(0)
        } else {
            Outcome::L7(l7)
        }
    }
}

type CellMap = BTreeMap<(u32, u16), (Entry, Option<Vec<u32>>)>;

/// Keeps `(0,0)` and every row that differs from what the lookup would find without it.
fn prune_into(
    endpoint: u32,
    direction: Direction,
    proto: Protocol,
    cells: CellMap,
    out: &mut Compiled,
) {
    let base = cells[&(ANY, 0)].clone();
    let mut kept = CellMap::new();
    kept.insert((ANY, 0), base.clone());
    // Rows with one wildcard fall back to (0, 0).
    for (&(peer, port), v) in &cells {
        if (peer == ANY) != (port == 0) && *v != base {
            kept.insert((peer, port), v.clone());
        }
    }
    for (&(peer, port), v) in &cells {
        if peer == ANY || port == 0 {
            continue;
        }
        let fallback = kept
            .get(&(peer, 0))
            .or_else(|| kept.get(&(ANY, port)))
            .unwrap_or(&base);
        if v != fallback {
            kept.insert((peer, port), v.clone());
        }
    }
    for ((peer, port), (entry, l7)) in kept {
        let key = Key {
            endpoint,
            direction,
            proto,
            peer,
            port,
        };
        out.entries.insert(key, entry);
        if let Some(ids) = l7 {
            out.l7.insert(key, ids);
        }
    }
}

/// What changed between two compilations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<(Key, Entry)>,
    pub changed: Vec<(Key, Entry)>,
    pub removed: Vec<Key>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    pub fn len(&self) -> usize {
        self.added.len() + self.changed.len() + self.removed.len()
    }

    /// Endpoints the diff touches.
    pub fn endpoints(&self) -> BTreeSet<u32> {
        self.added
            .iter()
            .chain(&self.changed)
            .map(|(k, _)| k.endpoint)
            .chain(self.removed.iter().map(|k| k.endpoint))
            .collect()
    }
}

/// Entries to add, change and remove to turn `old` into `new`.
pub fn diff(old: &Compiled, new: &Compiled) -> Diff {
    let mut d = Diff::default();
    for (k, v) in &new.entries {
        match old.entries.get(k) {
            None => d.added.push((*k, *v)),
            Some(o) if o != v => d.changed.push((*k, *v)),
            Some(_) => {}
        }
    }
    d.removed = old
        .entries
        .keys()
        .filter(|k| !new.entries.contains_key(k))
        .copied()
        .collect();
    d
}

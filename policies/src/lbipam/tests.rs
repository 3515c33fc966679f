use super::*;
use proptest::prelude::*;

fn pool(name: &str, yaml: &str) -> LoadBalancerIPPool {
    let spec: LoadBalancerIPPoolSpec = serde_yaml::from_str(yaml).expect("pool spec");
    let mut p = LoadBalancerIPPool::new(name, spec);
    p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        format!("2026-01-01T00:00:0{}Z", name.len() % 10)
            .parse()
            .expect("test value"),
    ));
    p
}

fn owner(kind: &str, ns: &str, name: &str) -> Owner {
    Owner {
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
    }
}

fn gateway(ns: &str, name: &str, created: &str) -> Requester {
    let o = owner("Gateway", ns, name);
    Requester {
        labels: Requester::labels_with_names(&o, None),
        owner: o,
        requested: vec![],
        wants: vec![(Want::Any, true)],
        created: created.into(),
    }
}

fn ips(out: &Outcome, o: &Owner) -> Vec<String> {
    match &out.assigned[o] {
        Ok(v) => v.iter().map(|(ip, _)| ip.to_string()).collect(),
        Err(r) => vec![format!("{}: {}", r.reason, r.message)],
    }
}

fn condition<'a>(out: &'a Outcome, pool: &str, t: &str) -> &'a PoolCondition {
    out.pools[pool]
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("{pool} has no {t} condition"))
}

#[test]
fn a_cidr_leaves_out_its_first_and_last_address_and_exhaustion_is_reported_with_nothing_half_given()
{
    let pools = [pool("edge", "blocks: [{cidr: 10.99.100.0/30}]")];
    let a = gateway("shop", "a", "1");
    let b = gateway("shop", "b", "2");
    let c = gateway("shop", "c", "3");
    let out = allocate(&pools, &[c.clone(), a.clone(), b.clone()], &BTreeMap::new());
    assert_eq!(ips(&out, &a.owner), ["10.99.100.1"]);
    assert_eq!(ips(&out, &b.owner), ["10.99.100.2"]);
    assert_eq!(
        ips(&out, &c.owner),
        ["Exhausted: no free address in the pools that select it (edge)"]
    );
    let s = &out.pools["edge"];
    assert_eq!(
        (s.total.as_str(), s.used.as_str(), s.free.as_str()),
        ("2", "2", "0")
    );
    let ex = condition(&out, "edge", "Exhausted");
    assert_eq!(ex.status, "True");
    assert!(ex.message.contains("Gateway shop/c"), "{ex:?}");

    // A dual-stack Service that needs both families gets neither when one is missing.
    let v4_only = [pool(
        "dual",
        "{blocks: [{cidr: 10.99.100.0/31}], allowFirstLastIPs: Yes}",
    )];
    let o = owner("Service", "shop", "api");
    let svc = Requester {
        labels: Requester::labels_with_names(&o, None),
        owner: o.clone(),
        requested: vec![],
        wants: vec![(Want::V4, true), (Want::V6, true)],
        created: "1".into(),
    };
    let out = allocate(&v4_only, std::slice::from_ref(&svc), &BTreeMap::new());
    assert_eq!(
        ips(&out, &o),
        ["Exhausted: no free IPv6 address in the pools that select it (dual)"]
    );
    assert!(out.record.is_empty(), "{:?}", out.record);
    // With an IPv6 block it gets one of each; a /31 and a /127 use both their addresses.
    let pools = [pool(
        "dual",
        "{blocks: [{cidr: 10.99.100.0/31}, {cidr: 'fd00:99::/127'}], allowFirstLastIPs: No}",
    )];
    let out = allocate(&pools, std::slice::from_ref(&svc), &BTreeMap::new());
    assert_eq!(ips(&out, &o), ["10.99.100.0", "fd00:99::"]);
    // PreferDualStack: IPv6 optional, so an IPv4-only pool still serves it.
    let mut prefer = svc.clone();
    prefer.wants[1].1 = false;
    let out = allocate(&v4_only, std::slice::from_ref(&prefer), &BTreeMap::new());
    assert_eq!(ips(&out, &o), ["10.99.100.0"]);
}

#[test]
fn what_was_given_stays_given_and_goes_when_its_owner_goes() {
    let pools = [pool(
        "edge",
        "blocks: [{start: 10.99.100.10, stop: 10.99.100.12}]",
    )];
    let old = gateway("shop", "old", "1");
    let new = gateway("shop", "new", "2");
    // `new` came first and got .10; `old` (older, but seen later) must not take it.
    let first = allocate(&pools, std::slice::from_ref(&new), &BTreeMap::new());
    assert_eq!(ips(&first, &new.owner), ["10.99.100.10"]);
    let second = allocate(&pools, &[old.clone(), new.clone()], &first.record);
    assert_eq!(ips(&second, &new.owner), ["10.99.100.10"]);
    assert_eq!(ips(&second, &old.owner), ["10.99.100.11"]);
    // Running again on its own record changes nothing.
    assert_eq!(
        allocate(&pools, &[old.clone(), new.clone()], &second.record),
        second
    );
    // `new` deleted: its address is free again, `old` keeps its own.
    let third = allocate(&pools, std::slice::from_ref(&old), &second.record);
    assert_eq!(ips(&third, &old.owner), ["10.99.100.11"]);
    assert_eq!(third.record.len(), 1);
    assert_eq!(third.pools["edge"].free, "2");
}

#[test]
fn requested_addresses_are_honoured_when_free_and_refused_with_the_holder_named() {
    let pools = [pool("edge", "blocks: [{cidr: 10.99.100.0/24}]")];
    let mut a = gateway("shop", "a", "1");
    a.requested = vec!["10.99.100.50".parse().expect("test value")];
    let mut b = gateway("shop", "b", "2");
    b.requested = vec![
        "10.99.100.51".parse().expect("test value"),
        "10.99.100.50".parse().expect("test value"),
    ];
    let mut c = gateway("shop", "c", "3");
    c.requested = vec!["192.0.2.1".parse().expect("test value")];
    let out = allocate(&pools, &[a.clone(), b.clone(), c.clone()], &BTreeMap::new());
    assert_eq!(ips(&out, &a.owner), ["10.99.100.50"]);
    assert_eq!(
        ips(&out, &b.owner),
        ["RequestedUnavailable: 10.99.100.50 is already assigned to Gateway shop/a"]
    );
    // b's free .51 was not kept for it: all or nothing.
    assert!(
        !out.record
            .contains_key(&"10.99.100.51".parse().expect("test value"))
    );
    assert_eq!(
        ips(&out, &c.owner),
        ["RequestedNotInPool: 192.0.2.1 is in no enabled pool that selects it"]
    );
    // a changes its request: the old address goes, the new one comes.
    a.requested = vec!["10.99.100.60".parse().expect("test value")];
    let out = allocate(&pools, std::slice::from_ref(&a), &out.record);
    assert_eq!(ips(&out, &a.owner), ["10.99.100.60"]);
    assert_eq!(out.record.len(), 1);
}

#[test]
fn an_overlapping_newer_pool_is_a_condition_and_gives_nothing() {
    let mut older = pool("a", "blocks: [{cidr: 10.99.100.0/30}]");
    let mut newer = pool("bb", "blocks: [{start: 10.99.100.2, stop: 10.99.100.9}]");
    older.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:00Z".parse().expect("test value"),
    ));
    newer.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-02T00:00:00Z".parse().expect("test value"),
    ));
    let broken = pool(
        "c",
        "blocks: [{cidr: 10.99.200.0/33}, {start: 10.0.0.9, stop: 10.0.0.1}]",
    );
    let gws: Vec<Requester> = (0..3)
        .map(|i| gateway("shop", &format!("g{i}"), &i.to_string()))
        .collect();
    let out = allocate(&[newer, older, broken], &gws, &BTreeMap::new());
    let c = condition(&out, "bb", "Accepted");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Conflict")
    );
    assert!(c.message.contains("older pool a"), "{c:?}");
    let c = condition(&out, "c", "Accepted");
    assert_eq!(c.reason, "InvalidBlocks");
    assert!(
        c.message.contains("spec.blocks[0].cidr")
            && c.message
                .contains("spec.blocks[1]: start 10.0.0.9 is after stop 10.0.0.1"),
        "{c:?}"
    );
    assert_eq!(ips(&out, &gws[0].owner), ["10.99.100.1"]);
    assert_eq!(ips(&out, &gws[1].owner), ["10.99.100.2"]);
    assert!(ips(&out, &gws[2].owner)[0].starts_with("Exhausted"));
    assert_eq!(condition(&out, "a", "Accepted").status, "True");
}

#[test]
fn selectors_disabled_pools_and_pool_removal() {
    let pools = [
        pool(
            "team",
            "{blocks: [{cidr: 10.99.101.0/24}], serviceSelector: {matchLabels: {signet.dev/namespace: payments}}}",
        ),
        pool("rest", "blocks: [{cidr: 10.99.102.0/24}]"),
    ];
    let pay = gateway("payments", "edge", "1");
    let shop = gateway("shop", "edge", "2");
    let out = allocate(&pools, &[pay.clone(), shop.clone()], &BTreeMap::new());
    assert_eq!(ips(&out, &pay.owner), ["10.99.101.1"]);
    assert_eq!(ips(&out, &shop.owner), ["10.99.102.1"]);

    // Disabled: what it gave stays, nothing new comes from it.
    let mut disabled = pools.clone();
    disabled[0].spec.disabled = true;
    let pay2 = gateway("payments", "second", "3");
    let again = allocate(
        &disabled,
        &[pay.clone(), shop.clone(), pay2.clone()],
        &out.record,
    );
    assert_eq!(ips(&again, &pay.owner), ["10.99.101.1"]);
    // `rest` selects everyone, so the second payments Gateway is served from it.
    assert_eq!(ips(&again, &pay2.owner), ["10.99.102.2"]);

    // The pool deleted: its addresses are released.
    let gone = allocate(&pools[1..], &[pay.clone(), shop.clone()], &out.record);
    assert_eq!(ips(&gone, &pay.owner), ["10.99.102.2"]);
    // No pool at all selects it.
    let none = allocate(&pools[..1], std::slice::from_ref(&shop), &BTreeMap::new());
    assert_eq!(
        ips(&none, &shop.owner),
        ["NoPool: no LoadBalancerIPPool selects it"]
    );
}

#[test]
fn the_record_in_pool_status_reads_back() {
    let pools = [pool("edge", "blocks: [{cidr: 10.99.100.0/29}]")];
    let gws: Vec<Requester> = (0..3)
        .map(|i| gateway("shop", &format!("g{i}"), &i.to_string()))
        .collect();
    let out = allocate(&pools, &gws, &BTreeMap::new());
    let mut with_status = pools.clone();
    with_status[0].status = Some(out.pools["edge"].clone());
    assert_eq!(record_of(&with_status), out.record);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Whatever the pools, requesters and previous record: no address has two owners, every
    /// address is inside a pool that selects its owner, every owner got what it needs or
    /// nothing, and running again on the result changes nothing.
    #[test]
    fn no_address_is_given_twice_and_the_result_is_a_fixed_point(
        sizes in proptest::collection::vec((0u8..4, 29u8..=32, any::<bool>(), any::<bool>()), 1..4),
        reqs in proptest::collection::vec((0u8..3, proptest::option::of(0u8..12), any::<bool>()), 0..12),
        drop_some in any::<u16>(),
    ) {
        let pools: Vec<LoadBalancerIPPool> = sizes.iter().enumerate().map(|(i, (base, prefix, first_last, select))| {
            let mut p = pool(&format!("p{i}"), &format!("blocks: [{{cidr: 10.99.{base}.0/{prefix}}}]"));
            if *first_last { p.spec.allow_first_last_ips = FirstLast::Yes; }
            if *select {
                p.spec.service_selector = Some(serde_yaml::from_str("matchLabels: {signet.dev/namespace: ns1}").expect("test value"));
            }
            p
        }).collect();
        let requesters: Vec<Requester> = reqs.iter().enumerate().map(|(i, (ns, want, dual))| {
            let mut r = gateway(&format!("ns{ns}"), &format!("r{i}"), &format!("{i:03}"));
            if let Some(w) = want { r.requested = vec![format!("10.99.{}.{}", w % 4, w).parse().expect("test value")]; }
            if *dual { r.wants = vec![(Want::V4, true), (Want::V4, false)]; }
            r
        }).collect();
        let first = allocate(&pools, &requesters, &BTreeMap::new());
        // Forget some requesters, then bring them all back on the reduced record.
        let kept: Vec<Requester> = requesters.iter().enumerate().filter(|(i, _)| drop_some & (1 << i) == 0).map(|(_, r)| r.clone()).collect();
        let middle = allocate(&pools, &kept, &first.record);
        for out in [&first, &middle, &allocate(&pools, &requesters, &middle.record)] {
            let mut seen = BTreeSet::new();
            for (o, res) in &out.assigned {
                let Ok(list) = res else { continue };
                let r = requesters.iter().find(|r| &r.owner == o).expect("test value");
                for (ip, pool_name) in list {
                    prop_assert!(seen.insert(*ip), "{ip} given twice");
                    let p = check_pools(&pools).into_iter().find(|p| &p.name == pool_name).expect("test value");
                    prop_assert!(p.holds(*ip) && p.selects(r), "{ip} from {pool_name} for {o}");
                    prop_assert_eq!(out.record.get(ip), Some(&(pool_name.clone(), o.clone())));
                }
                if r.requested.is_empty() {
                    prop_assert!(!list.is_empty());
                } else {
                    prop_assert_eq!(list.len(), r.requested.len());
                }
            }
            prop_assert_eq!(out.record.len(), seen.len());
            let again = allocate(&pools, &out.assigned.keys().filter_map(|o| requesters.iter().find(|r| &r.owner == o).cloned()).collect::<Vec<_>>(), &out.record);
            prop_assert_eq!(&again.record, &out.record);
        }
    }
}

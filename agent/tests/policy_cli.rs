//! `signet policy` as a security team uses it, on the example policies in `policies/examples/`:
//! every example is checked through `explain`, and bad input gets `file:line:col` and exit 1.

use std::process::{Command, Output};

/// The example policies, found where the crate is now (cargo sets the variable when running
/// tests), not where it was compiled.
fn examples() -> String {
    let dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    format!("{dir}/../policies/examples")
}

fn signet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_signet"))
        .args(args)
        .output()
        .expect("run signet")
}

/// Runs `explain` and checks the exit code and that stdout contains every `needle`.
fn explain(from: &str, to: &str, extra: &[&str], code: i32, needles: &[&str]) {
    let state = examples();
    let mut args = vec![
        "policy", "explain", "--state", &state, "--from", from, "--to", to,
    ];
    args.extend_from_slice(extra);
    let out = signet(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{from} -> {to} {extra:?}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in needles {
        assert!(
            stdout.contains(n),
            "{from} -> {to}: `{n}` missing from\n{stdout}"
        );
    }
}

#[test]
fn world_destinations_are_explained_by_address() {
    explain(
        "checkout/checkout-0",
        "world:203.0.113.10:443",
        &[],
        0,
        &[
            "ALLOW  checkout/checkout-0",
            "-> world:203.0.113.10:443/TCP",
            "allow: checkout/checkout-egress egress[2]",
            "ingress: not checked: the destination is outside the cluster",
        ],
    );
    for to in [
        "world:203.0.113.200:443",
        "world:198.51.100.1:443",
        "world:[2001:db8::1]:443",
    ] {
        explain(
            "checkout/checkout-0",
            to,
            &[],
            2,
            &["DENY", "default deny: selected by checkout/checkout-egress"],
        );
    }
    let out = signet(&[
        "policy",
        "explain",
        "--state",
        &examples(),
        "--from",
        "world",
        "--to",
        "world:203.0.113.10:443",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--from must be a pod"));
}

#[test]
fn the_examples_are_valid() {
    let out = signet(&["policy", "validate", &examples()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("7 IdentityPolicies valid"));
}

#[test]
fn default_deny_namespace() {
    explain(
        "storefront/web-0",
        "payments/payments-api-0:8443",
        &[],
        2,
        &[
            "DENY",
            "default deny: selected by payments/default-deny, payments/payments-api, no ingress rule allows",
        ],
    );
    explain(
        "checkout/checkout-0",
        "payments/ledger-0:8443",
        &[],
        2,
        &[
            "DENY",
            "default deny: selected by checkout/checkout-egress, no egress rule allows",
        ],
    );
}

#[test]
fn l7_method_and_path_limits() {
    explain(
        "checkout/checkout-0",
        "payments/payments-api-0:8443",
        &["--method", "POST", "--path", "/v1/charges/ch_123"],
        0,
        &["ALLOW", "allowed by payments/payments-api ingress[0]"],
    );
    explain(
        "checkout/checkout-0",
        "payments/payments-api-0:8443",
        &["--method", "DELETE", "--path", "/v1/charges/ch_123"],
        2,
        &["DENY", "denied with HTTP 403"],
    );
    explain(
        "ops/deployer-0",
        "payments/payments-api-0:8443",
        &["--method", "GET", "--path", "/v1/refunds/42"],
        0,
        &["ALLOW", "allowed by payments/payments-api ingress[1]"],
    );
    explain(
        "ops/deployer-0",
        "payments/payments-api-0:8443",
        &["--method", "GET", "--path", "/v1/refunds/42x"],
        2,
        &["HTTP 403"],
    );
    // Without a request, the connection is allowed to the proxy and requests are checked.
    explain(
        "checkout/checkout-0",
        "payments/payments-api-0:8443",
        &[],
        0,
        &["ALLOW", "requests must match"],
    );
}

#[test]
fn deny_world() {
    explain(
        "world",
        "payments/payments-api-0:8443",
        &[],
        2,
        &[
            "DENY",
            "payments/deny-world ingressDeny[0]",
            "not checked: the source is not a pod",
        ],
    );
    explain(
        "world",
        "payments/ledger-0:5432",
        &[],
        2,
        &["payments/deny-world ingressDeny[0]"],
    );
}

#[test]
fn cross_namespace_by_label() {
    explain(
        "fraud/fraud-0",
        "payments/ledger-0:5432",
        &[],
        0,
        &["ALLOW", "payments/ledger-from-payments-team ingress[0]"],
    );
    explain(
        "storefront/web-0",
        "payments/ledger-0:5432",
        &[],
        2,
        &["DENY"],
    );
}

#[test]
fn allow_only_from_the_gateway() {
    // The example names one Gateway (`gateway: {namespace: edge, name: public}`): that one is
    // admitted, another Gateway and "some Gateway" (`entity: gateway`'s group) are not.
    explain(
        "spiffe://cluster.local/ns/edge/gateway/public",
        "storefront/web-0:8080",
        &[],
        0,
        &["ALLOW", "storefront/web-from-gateway ingress[0]"],
    );
    explain(
        "spiffe://cluster.local/ns/edge/gateway/internal",
        "storefront/web-0:8080",
        &[],
        2,
        &["DENY"],
    );
    explain("gateway", "storefront/web-0:8080", &[], 2, &["DENY"]);
    explain(
        "checkout/checkout-0",
        "storefront/web-0:8080",
        &[],
        2,
        &["DENY"],
    );
    explain(
        "spiffe://cluster.local/ns/edge/gateway/public",
        "storefront/web-0:9090",
        &[],
        2,
        &["no ingress rule allows"],
    );
}

#[test]
fn audit_mode_reports_but_does_not_deny() {
    explain(
        "ops/deployer-0",
        "inventory/inventory-0:9000",
        &[],
        0,
        &[
            "AUDIT",
            "would be denied by default deny: selected by inventory/inventory-trial",
        ],
    );
    explain(
        "storefront/web-0",
        "inventory/inventory-0:9000",
        &[],
        0,
        &["ALLOW  "],
    );
}

#[test]
fn egress_lockdown() {
    explain(
        "checkout/checkout-0",
        "payments/payments-api-0:8443",
        &["--method", "GET", "--path", "/healthz"],
        0,
        &[
            "allow: checkout/checkout-egress egress[0]",
            "allowed by payments/payments-api ingress[0]",
        ],
    );
    explain(
        "checkout/checkout-0",
        "inventory/inventory-0:9000",
        &[],
        2,
        &["no egress rule allows"],
    );
}

#[test]
fn bad_input_exits_1_with_a_reason() {
    let out = signet(&[
        "policy",
        "explain",
        "--state",
        &examples(),
        "--from",
        "nope/pod",
        "--to",
        "payments/ledger-0:5432",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pod nope/pod"));
    let out = signet(&[
        "policy",
        "explain",
        "--state",
        &examples(),
        "--from",
        "world",
        "--to",
        "payments/ledger-0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let out = signet(&[
        "policy",
        "explain",
        "--state",
        &examples(),
        "--from",
        "any",
        "--to",
        "payments/ledger-0:1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a group"));
}

#[test]
fn validate_reports_every_error_with_its_position() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: bad}\nspec:\n  selector: {}\n  ingress:\n  - from: [{entity: nobody}]\n    ports: [{port: 0}]\n",
    )
    .expect("write");
    let out = signet(&["policy", "validate", bad.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:7:21: `spec.ingress[0].from[0].entity`: unknown value `nobody`"),
        "{stderr}"
    );
    assert!(
        stderr
            .contains("bad.yaml:8:20: `spec.ingress[0].ports[0].port`: 0 is out of range 1-65535"),
        "{stderr}"
    );
}

#[test]
fn compile_prints_the_entries() {
    let out = signet(&[
        "policy",
        "compile",
        "--state",
        &examples(),
        "--node",
        "node-a",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("payments/payments-api-0") && table.contains(" l7 "),
        "{table}"
    );
    assert!(
        !table.contains("payments/ledger-0"),
        "ledger runs on node-b:\n{table}"
    );
    let out = signet(&[
        "policy",
        "compile",
        "--state",
        &examples(),
        "--format",
        "json",
    ]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let entries = doc["entries"].as_array().expect("entries");
    assert!(entries.iter().any(|e| e["action"] == "deny" && e["ruleName"] == "payments/deny-world ingressDeny[0]"));
    let out = signet(&[
        "policy",
        "compile",
        "--state",
        &examples(),
        "--capacity",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Nothing was applied"));
}

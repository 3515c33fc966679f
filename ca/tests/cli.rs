//! The `signet-ca` binary as an operator uses it: `issue`, `bundle`, `hash-token`, and `serve`
//! answering real requests and draining on SIGTERM.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_signet-ca"))
}

fn csr_file(dir: &std::path::Path) -> std::path::PathBuf {
    let key = rcgen::KeyPair::generate().expect("key");
    let pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let path = dir.join("req.csr");
    std::fs::write(&path, pem).expect("write csr");
    path
}

#[test]
fn issue_prints_the_chain_and_bundle_prints_the_root() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let out = bin()
        .args(["issue", "--trust-domain", "cluster.local", "--spiffe-id"])
        .arg("spiffe://cluster.local/ns/shop/sa/web")
        .arg("--state-dir")
        .arg(&state)
        .arg("--csr")
        .arg(csr_file(dir.path()))
        .args(["--ttl", "600"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain = pem::parse_many(&out.stdout).expect("pem chain");
    assert_eq!(chain.len(), 2, "leaf then root");
    let leaf = CertificateDer::from(chain[0].contents().to_vec());
    assert_eq!(
        signet_ca::svid::spiffe_id_of(&leaf).expect("svid").as_str(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );

    let out = bin()
        .arg("bundle")
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let roots = pem::parse_many(&out.stdout).expect("pem bundle");
    assert_eq!(roots, chain[1..]);

    let out = bin()
        .arg("bundle")
        .arg("--state-dir")
        .arg(&state)
        .args(["--format", "spiffe"])
        .output()
        .expect("run");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["keys"][0]["use"], "x509-svid");
    assert_eq!(doc["spiffe_sequence"], 1);
}

#[test]
fn issue_errors_go_to_stderr_with_a_non_zero_exit() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.csr");
    std::fs::write(&bad, "not a csr").expect("write");
    let out = bin()
        .args([
            "issue",
            "--trust-domain",
            "cluster.local",
            "--spiffe-id",
            "spiffe://cluster.local/x",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--csr")
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.csr") && err.contains("DER"), "{err}");

    let out = bin()
        .args([
            "issue",
            "--trust-domain",
            "cluster.local",
            "--spiffe-id",
            "spiffe://cluster.local/x/",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--csr")
        .arg(csr_file(dir.path()))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--spiffe-id") && err.contains("must not end with `/`"),
        "{err}"
    );

    let out = bin()
        .args([
            "issue",
            "--trust-domain",
            "cluster.local",
            "--spiffe-id",
            "spiffe://cluster.local/x",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--csr")
        .arg(csr_file(dir.path()))
        .args(["--ttl", "999999"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exceeds the maximum"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Kills the server if the test fails before it stops it.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_answers_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(dir.path().join("cluster")).expect("mkdir");
    std::fs::write(
        dir.path().join("cluster/pods.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: w, namespace: shop}\nspec:\n  nodeName: node-a\n  serviceAccountName: web\n  containers: [{name: w, image: w}]\n",
    )
    .expect("pods");
    let mut hash = bin()
        .arg("hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("hash-token");
    hash.stdin
        .take()
        .expect("stdin")
        .write_all(b"node-a-secret\n")
        .expect("write");
    let out = hash.wait_with_output().expect("hash-token");
    let token_hash = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    assert_eq!(
        token_hash,
        signet_ca::server::auth::sha256_hex("node-a-secret")
    );

    let port = free_port();
    let config = dir.path().join("ca.yaml");
    std::fs::write(
        &config,
        format!(
            "trustDomain: cluster.local\nlisten: 127.0.0.1:{port}\nstateDir: state\nclusterStateDir: cluster\n\
             shutdownGraceSeconds: 5\nnodes: [{{name: node-a, tokenSha256: {token_hash}}}]\n"
        ),
    )
    .expect("config");
    let child = Child(
        bin()
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve"),
    );

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let addr = format!("127.0.0.1:{port}");
    let state = dir.path().join("state");
    runtime.block_on(async {
        // The server creates the CA first; wait for it to listen.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut client = loop {
            let root =
                std::fs::read_to_string(state.join("roots/1/root-cert.pem")).unwrap_or_default();
            if !root.is_empty()
                && let Ok(c) =
                    signet_ca::client::CaClient::connect(&addr, "127.0.0.1", &root, "node-a-secret")
                        .await
            {
                break c;
            }
            assert!(Instant::now() < deadline, "signet-ca serve did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let key = rcgen::KeyPair::generate().expect("key");
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let id = signet_ca::SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").expect("id");
        let chain = client
            .create_certificate(&csr, Duration::from_secs(300), Some(&id))
            .await
            .expect("issued by the running binary");
        assert_eq!(chain.len(), 2);
    });

    let mut child = child;
    let pid = child.0.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "did not exit within the grace period"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().expect("stderr"), &mut log)
        .expect("log");
    assert!(exit.success(), "exit {exit:?}\n{log}");
    assert!(
        log.contains("issued SVID") && log.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "audit line missing:\n{log}"
    );
    assert!(log.contains("draining"), "{log}");
}

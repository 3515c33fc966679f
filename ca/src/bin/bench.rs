//! `signet-ca-bench`: issuance throughput and latency, in process and over gRPC on loopback.
//!
//! Not a test: it prints figures and their ratio to a baseline measured in the same run (raw
//! ECDSA P-256 signing with ring), and never fails on an absolute time.
//!
//!     cargo run --release -p signet-ca --bin signet-ca-bench -- [--seconds 5] [--concurrency 64]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use rcgen::KeyPair;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use signet_ca::client::CaClient;
use signet_ca::server::CaServer;
use signet_ca::server::auth::sha256_hex;
use signet_ca::server::config::ServerConfig;
use signet_ca::{CaSettings, CaSource, CertificateAuthority, Csr, SpiffeId, TrustDomain};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent gRPC requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// gRPC connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

struct Figures {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }

    fn print(&mut self, what: &str, baseline: f64) {
        let (p50, p99) = (self.percentile(0.50), self.percentile(0.99));
        println!(
            "{what:<34} {:>9.0} /s   p50 {:>8.1} µs   p99 {:>8.1} µs   {:>5.2}x of raw signing",
            self.rate(),
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            self.rate() / baseline
        );
    }
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Runs `op` on every core for `secs`, timing each call.
fn on_all_cores<F>(secs: u64, op: F) -> Figures
where
    F: Fn() + Sync,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let per_thread: Vec<Vec<Duration>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads())
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        op();
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect()
    });
    let latencies: Vec<Duration> = per_thread.into_iter().flatten().collect();
    Figures {
        ops: latencies.len(),
        elapsed: start.elapsed(),
        latencies,
    }
}

fn csr_pem() -> anyhow::Result<String> {
    let key = KeyPair::generate()?;
    Ok(rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    println!(
        "signet-ca-bench: {} cores, {} s per figure",
        threads(),
        args.seconds
    );

    // Baseline: one ECDSA P-256 signature, the irreducible cost of an SVID.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("key generation"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow::anyhow!("key parse"))?;
    let mut raw = on_all_cores(args.seconds, || {
        key.sign(&rng, b"tbs certificate bytes")
            .expect("ring signing does not fail");
    });
    let baseline = raw.rate();
    raw.print("raw ECDSA P-256 sign (baseline)", baseline);

    // In process: CSR parse + self-signature check + SVID build + sign, as the server does.
    let td = TrustDomain::parse("cluster.local")?;
    let ca = CertificateAuthority::open(CaSettings::new(
        td.clone(),
        CaSource::StateDir(dir.path().join("inproc")),
    ))?;
    let csr = csr_pem()?;
    let id = SpiffeId::workload(&td, "bench", "client")?;
    let mut inproc = on_all_cores(args.seconds, || {
        let csr = Csr::parse(csr.as_bytes()).expect("valid CSR");
        ca.issue(&id, &csr, Duration::ZERO).expect("issue");
    });
    inproc.print("in-process issuance (CSR check+sign)", baseline);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut grpc = runtime.block_on(grpc_bench(&args, dir.path(), &csr))?;
    grpc.print(
        &format!("gRPC/TLS loopback, {} in flight", args.concurrency),
        baseline,
    );
    println!(
        "gRPC issuance runs at {:.2}x of in-process issuance",
        grpc.rate() / inproc.rate()
    );
    Ok(())
}

async fn grpc_bench(args: &Args, dir: &std::path::Path, csr: &str) -> anyhow::Result<Figures> {
    std::fs::create_dir_all(dir.join("cluster"))?;
    std::fs::write(
        dir.join("cluster/pods.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: bench}\nspec:\n  nodeName: node-a\n  serviceAccountName: client\n  containers: [{name: c, image: c}]\n",
    )?;
    let yaml = format!(
        "trustDomain: cluster.local\nlisten: 127.0.0.1:0\nstateDir: grpc\nclusterStateDir: cluster\n\
         limits: {{maxConcurrentRequests: 4096}}\nnodes: [{{name: node-a, tokenSha256: {}}}]\n",
        sha256_hex("bench-token")
    );
    let config = ServerConfig::from_yaml(&yaml, &dir.join("ca.yaml"), dir)?;
    let server = CaServer::bind(config).await?;
    let addr = server.local_addr()?.to_string();
    let root = server.authority().bundle().to_pem();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));

    let td = TrustDomain::parse("cluster.local")?;
    let id = Arc::new(SpiffeId::workload(&td, "bench", "client")?);
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(CaClient::connect(&addr, "localhost", &root, "bench-token").await?);
    }
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    let mut workers = Vec::new();
    for i in 0..args.concurrency.max(1) {
        let mut client = clients[i % clients.len()].clone();
        let (csr, id) = (csr.to_owned(), id.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                client
                    .create_certificate(&csr, Duration::ZERO, Some(&id))
                    .await
                    .context("CreateCertificate")?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await??);
    }
    let elapsed = start.elapsed();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    Ok(Figures {
        ops: latencies.len(),
        elapsed,
        latencies,
    })
}

//! `signet-ca`: run the CA server, or administer a CA state directory by hand.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use signet_ca::server::CaServer;
use signet_ca::server::config::{CaCluster, ServerConfig};
use signet_ca::{CaSettings, CaSource, CertificateAuthority, Csr, SpiffeId, TrustDomain};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "signet-ca",
    version,
    about = "Signet's SPIFFE certificate authority"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve Istio's CreateCertificate API (and the trust bundle) over gRPC/TLS.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Issue one SVID for a CSR and print the PEM chain (leaf first). Creates the CA in
    /// STATE_DIR if it is new. For operators: no node authorisation is applied.
    Issue {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        spiffe_id: String,
        /// PEM or DER PKCS#10 request; `-` reads standard input.
        #[arg(long)]
        csr: PathBuf,
        /// Requested lifetime in seconds (default 3600, at most 86400).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Print the trust bundle of the CA in STATE_DIR.
    Bundle {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// Needed only to create a CA that does not exist yet; read from the state otherwise.
        #[arg(long)]
        trust_domain: Option<String>,
    },
    /// Start a root rotation: the new root joins the bundle now and signs after the overlap.
    RotateRoot {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        trust_domain: String,
    },
    /// Print the SHA-256 of a node token (read from standard input) for the `nodes` config.
    HashToken,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BundleFormat {
    Pem,
    Spiffe,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("signet-ca: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SIGNET_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => serve(&config),
        Command::Issue {
            state_dir,
            trust_domain,
            spiffe_id,
            csr,
            ttl,
        } => issue(&state_dir, &trust_domain, &spiffe_id, &csr, ttl),
        Command::Bundle {
            state_dir,
            format,
            trust_domain,
        } => bundle(&state_dir, trust_domain.as_deref(), format),
        Command::RotateRoot {
            state_dir,
            trust_domain,
        } => {
            let ca = open(&state_dir, &trust_domain)?;
            let id = ca.rotate_root()?;
            println!("root {id} added to the bundle; it starts signing after the overlap window");
            Ok(())
        }
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin().read_to_string(&mut token)?;
            println!(
                "{}",
                signet_ca::server::auth::sha256_hex(token.trim_end_matches(['\r', '\n']))
            );
            Ok(())
        }
    }
}

fn open(state_dir: &Path, trust_domain: &str) -> anyhow::Result<CertificateAuthority> {
    let td = TrustDomain::parse(trust_domain)
        .with_context(|| format!("trust domain `{trust_domain}`"))?;
    let settings = CaSettings::new(td, CaSource::StateDir(state_dir.to_owned()));
    Ok(CertificateAuthority::open(settings)?)
}

fn issue(
    state_dir: &Path,
    trust_domain: &str,
    spiffe_id: &str,
    csr_path: &Path,
    ttl: Option<u64>,
) -> anyhow::Result<()> {
    let id = SpiffeId::parse(spiffe_id).with_context(|| format!("--spiffe-id `{spiffe_id}`"))?;
    let mut bytes = Vec::new();
    if csr_path == Path::new("-") {
        std::io::stdin().read_to_end(&mut bytes)?;
    } else {
        bytes = std::fs::read(csr_path).with_context(|| format!("{}", csr_path.display()))?;
    }
    let csr = Csr::parse(&bytes).with_context(|| format!("{}", csr_path.display()))?;
    let ca = open(state_dir, trust_domain)?;
    let svid = ca.issue(&id, &csr, Duration::from_secs(ttl.unwrap_or(0)))?;
    for pem in svid.chain_pem() {
        print!("{pem}");
    }
    eprintln!(
        "issued {} serial {} notAfter {}",
        svid.spiffe_id, svid.serial, svid.not_after
    );
    Ok(())
}

fn bundle(
    state_dir: &Path,
    trust_domain: Option<&str>,
    format: BundleFormat,
) -> anyhow::Result<()> {
    let td = match trust_domain {
        Some(td) => td.to_owned(),
        None => stored_trust_domain(state_dir)?,
    };
    let b = open(state_dir, &td)?.bundle();
    match format {
        BundleFormat::Pem => print!("{}", b.to_pem()),
        BundleFormat::Spiffe => println!("{}", b.to_spiffe_json()?),
    }
    Ok(())
}

fn stored_trust_domain(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join("ca-state.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: no CA here yet; pass --trust-domain to create one",
            path.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    match v.get("trustDomain").and_then(|t| t.as_str()) {
        Some(td) => Ok(td.to_owned()),
        None => bail!("{}: no trustDomain", path.display()),
    }
}

fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = ServerConfig::load(config_path)?;
    let grace = config.shutdown_grace;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let server = match config.cluster {
            CaCluster::Dir(_) => CaServer::bind(config).await?,
            CaCluster::Kubernetes => {
                let client = signet_ca::server::kube::client(None)
                    .await
                    .context("connecting to the Kubernetes API (in-cluster configuration)")?;
                // Pod names are unique among the replicas: the rotation Lease's holder identity.
                let holder = std::env::var("POD_NAME")
                    .or_else(|_| std::env::var("HOSTNAME"))
                    .unwrap_or_else(|_| format!("signet-ca-{}", std::process::id()));
                CaServer::start_in_cluster(config, client, &holder, shutdown.clone()).await?
            }
        };
        let addr = server.local_addr()?;
        tracing::info!(%addr, "signet-ca serving IstioCertificateService");
        let mut task = tokio::spawn(server.run(shutdown.clone()));
        tokio::select! {
            result = &mut task => return result.context("server task")?.map_err(Into::into),
            () = shutdown_signal() => {}
        }
        tracing::info!(grace_seconds = grace.as_secs(), "draining");
        shutdown.cancel();
        match tokio::time::timeout(grace, &mut task).await {
            Ok(result) => result.context("server task")?.map_err(anyhow::Error::from),
            Err(_) => {
                tracing::warn!("grace period over; closing remaining connections");
                task.abort();
                Ok(())
            }
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be killed; wait forever.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

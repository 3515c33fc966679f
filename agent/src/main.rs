//! `signet-agent`: the node agent. Thin: parse arguments, enter the node's network namespace
//! when told to (the local topology), start the agent, wait for SIGTERM/SIGINT, drain.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use signet_agent::app::Agent;
use signet_agent::config::AgentConfig;

/// The proxy allocates per request and per connection; glibc's malloc spent about a tenth of
/// the L7 path's time (perf on traffic-bench.sh), mimalloc much less.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "signet-agent", version, about = "Signet node agent")]
struct Args {
    #[arg(long)]
    config: PathBuf,
    /// Enter this network namespace (`/run/netns/NAME`) first: one agent per simulated node.
    #[arg(long)]
    netns: Option<String>,
    /// This node's name, overriding the configuration's `node` (a DaemonSet passes
    /// `$(NODE_NAME)` from the downward API).
    #[arg(long)]
    node: Option<String>,
    /// This node's address, replacing the IP of `listen.outbound`, `listen.inbound` and the
    /// gateway address (ports stay as configured); a DaemonSet passes `$(NODE_IP)`.
    #[arg(long)]
    node_ip: Option<std::net::IpAddr>,
    /// Remove everything this node's agent pinned and attached, then exit.
    #[arg(long)]
    cleanup: bool,
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIGNET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("signet-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = AgentConfig::load(&args.config)?.for_node(args.node.as_deref(), args.node_ip)?;
    if args.cleanup {
        signet_agent::datapath::loader::cleanup(&config.datapath.bpffs_dir)?;
        println!("removed {}", config.datapath.bpffs_dir.display());
        return Ok(());
    }
    if let Some(ns) = &args.netns {
        // Before any thread exists, so every runtime thread inherits the namespace.
        let path = format!("/run/netns/{ns}");
        let file = std::fs::File::open(&path).with_context(|| path.clone())?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {ns}"))?;
    }
    raise_fd_limit(config.proxy.max_connections + config.gateway.max_connections);
    let grace = config.shutdown_grace;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.proxy.worker_threads)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let agent = Agent::start(config).await?;
        tracing::info!("signet-agent started");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!(
            grace_seconds = grace.as_secs(),
            "draining; the datapath stays pinned and enforcing"
        );
        agent.shutdown(grace).await;
        Ok(())
    })
}

/// Each proxied connection holds two or three descriptors; the default soft limit (1,024) would
/// cap the proxy long before `proxy.maxConnections`. Raised as far as the hard limit allows.
fn raise_fd_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want = (max_connections as u64 * 3 + 1024).min(hard);
    if want > soft
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard)
    {
        tracing::warn!(error = %e, soft, "could not raise the open-file limit");
    }
}

//! The `signet` command line. Each subcommand returns its exit code; errors that are the user's
//! input go to stderr with a message that names the input.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin_http;
pub mod connectivity;
pub mod datapath;
pub mod echo;
pub mod gateway;
pub mod kube;
pub mod observe;
pub mod policy;
pub mod status;

#[derive(Debug, Parser)]
#[command(
    name = "signet",
    version,
    about = "Signet: identity, policy and mTLS for Kubernetes workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate, explain and compile identity policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Inspect or remove a node's pinned eBPF datapath.
    #[command(subcommand)]
    Datapath(datapath::DatapathCommand),
    /// Gateway API status (exit 1 when anything is not Accepted/Programmed/Resolved).
    #[command(subcommand)]
    Gateway(gateway::GatewayCommand),
    /// Every agent's health on one screen (exit 0 only when all are OK); --wait polls until
    /// they are.
    Status(status::StatusArgs),
    /// Flows of every node, merged: what the proxy forwarded and refused, L7 denials, kernel
    /// drops; -f follows.
    Observe(observe::ObserveArgs),
    /// A built-in suite of named scenarios against the mesh, with workloads of its own.
    #[command(subcommand)]
    Connectivity(connectivity::ConnectivityCommand),
    /// The suite's workload: an HTTP/TCP/UDP echo server and a client that reports as JSON.
    #[command(subcommand)]
    Echo(echo::EchoCommand),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(cmd) => ExitCode::from(policy::run(cmd)),
        Command::Datapath(cmd) => ExitCode::from(datapath::run(cmd)),
        Command::Gateway(cmd) => ExitCode::from(gateway::run(cmd)),
        Command::Status(args) => ExitCode::from(status::run(args)),
        Command::Observe(args) => ExitCode::from(observe::run(args)),
        Command::Connectivity(cmd) => ExitCode::from(connectivity::run(cmd)),
        Command::Echo(cmd) => ExitCode::from(echo::run(cmd)),
    }
}

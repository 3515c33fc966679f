//! `signet gateway status`: the Gateway API status Signet computes for a state directory —
//! GatewayClass, Gateway and listener conditions, attached routes, and each HTTPRoute's and
//! GRPCRoute's conditions per parent (Gateways, and Services for the mesh) — as YAML. In Kubernetes mode the same conditions go to the resources'
//! status subresources.

use std::path::PathBuf;

use clap::Subcommand;
use signet_ca::TrustDomain;

#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Print the status of every Gateway, listener, HTTPRoute and GRPCRoute.
    Status {
        /// The cluster-state directory (Kubernetes manifests).
        #[arg(long)]
        state: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// The agents' address table (default: `addresses.json` beside the state directory,
        /// where the demo keeps it next to the identity table).
        #[arg(long)]
        address_table: Option<PathBuf>,
    },
}

pub fn run(cmd: GatewayCommand) -> u8 {
    match cmd {
        GatewayCommand::Status {
            state,
            trust_domain,
            address_table,
        } => {
            let td = match TrustDomain::parse(&trust_domain) {
                Ok(td) => td,
                Err(e) => {
                    eprintln!("signet gateway: --trust-domain `{trust_domain}`: {e}");
                    return 2;
                }
            };
            let table = crate::state::lbipam::AddressTable::new(
                &address_table.unwrap_or_else(|| state.with_file_name("addresses.json")),
            );
            let record = match table.read() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("signet gateway: {e}");
                    return 2;
                }
            };
            match crate::state::snapshot::gateway_status(&state, &record, &td) {
                Ok(status) => {
                    print!(
                        "{}",
                        serde_yaml::to_string(&status).unwrap_or_else(|e| format!("# {e}\n"))
                    );
                    let degraded = status.gateways.iter().any(|g| {
                        g.conditions
                            .iter()
                            .chain(g.listeners.iter().flat_map(|l| &l.conditions))
                            .any(|c| c.status != "True")
                    }) || status
                        .http_routes
                        .iter()
                        .chain(&status.grpc_routes)
                        .chain(&status.tcp_routes)
                        .chain(&status.tls_routes)
                        .any(|r| {
                            r.parents
                                .iter()
                                .flat_map(|p| &p.conditions)
                                .any(|c| c.status != "True")
                        });
                    u8::from(degraded)
                }
                Err(e) => {
                    eprintln!("signet gateway: {}: {e}", state.display());
                    2
                }
            }
        }
    }
}

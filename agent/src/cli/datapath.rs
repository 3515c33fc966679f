//! `signet datapath cleanup | drops`: operator commands for a node's pinned datapath.

use std::path::PathBuf;

use clap::Subcommand;

use crate::datapath::loader;

#[derive(Debug, Subcommand)]
pub enum DatapathCommand {
    /// Remove everything the agent pinned and attached under PIN_DIR (e.g.
    /// /sys/fs/bpf/signet/node-a): programs are detached, maps freed. Enforcement stops.
    Cleanup {
        #[arg(long)]
        pin_dir: PathBuf,
    },
    /// Print drop counters per reason.
    Drops {
        #[arg(long)]
        pin_dir: PathBuf,
    },
}

pub fn run(cmd: DatapathCommand) -> u8 {
    let result = match cmd {
        DatapathCommand::Cleanup { pin_dir } => loader::cleanup(&pin_dir).map(|()| {
            println!("removed {}", pin_dir.display());
        }),
        DatapathCommand::Drops { pin_dir } => loader::read_drop_counts(&pin_dir).map(|counts| {
            for (reason, n) in counts {
                println!("{reason:<24} {n}");
            }
        }),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("signet datapath: {e}");
            1
        }
    }
}

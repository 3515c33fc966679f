//! The `signet` command line, built in this package so its tests can run it (as the workload
//! binary of `signet connectivity test`): the same code as `signet-agent`'s `signet` binary.

fn main() -> std::process::ExitCode {
    signet_agent::cli::main()
}

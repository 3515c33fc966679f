//! `signet`: the command line for security and platform teams.

fn main() -> std::process::ExitCode {
    signet_agent::cli::main()
}

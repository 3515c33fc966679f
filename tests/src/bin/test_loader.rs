//! `signet-test-loader`: loads the datapath the way an agent starting up does, at a given moment,
//! so a test can start several at once on a machine where bpffs is not mounted yet.
//!
//!     signet-test-loader --pin-dir DIR --cgroup DIR [--at-ms UNIX_MS]
//!
//! It waits until `--at-ms` (wall clock, milliseconds), mounts bpffs if it is missing, loads and
//! pins the maps and links, and prints `loaded` or the error. The pins stay when it exits.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use signet_agent::datapath::loader::{KernelDatapath, LoaderConfig, MapSizes};
use signet_tests::{Args, fail};

fn main() {
    let args = Args::from_env();
    let cfg = LoaderConfig {
        pin_dir: PathBuf::from(args.need("--pin-dir")),
        cgroup: PathBuf::from(args.need("--cgroup")),
        sizes: MapSizes {
            policy: 1024,
            ..MapSizes::default()
        },
    };
    let at = Duration::from_millis(args.number("--at-ms", 0));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    if let Some(wait) = at.checked_sub(now) {
        std::thread::sleep(wait);
    }
    match KernelDatapath::load(&cfg) {
        Ok(_) => println!("loaded"),
        Err(e) => fail(format!("loading into {}: {e}", cfg.pin_dir.display())),
    }
}

//! What a new machine looks like to the agent: bpffs not mounted, several agents starting at
//! the same moment (the local topology starts one per node). Each round runs in a private mount
//! namespace of its own, where `/sys/fs/bpf` is unmounted first, so the machine's own mounts are
//! never touched. Needs root; see `common`.

mod common;

use std::process::Command;

use common::Env;
use signet_test_support::privileged;

/// Two loaders start together in a fresh mount namespace; prints what they and the namespace
/// ended with. The namespace, its bpffs and every pin in it go away when the script exits.
const RACE: &str = r#"
set -u
while grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; do umount -l /sys/fs/bpf || exit 3; done
at=$(( $(date +%s%3N) + 300 ))
"$LOADER" --pin-dir "$PIN_A" --cgroup "$CG_A" --at-ms "$at" >"$OUT.a" 2>&1 & pa=$!
"$LOADER" --pin-dir "$PIN_B" --cgroup "$CG_B" --at-ms "$at" >"$OUT.b" 2>&1 & pb=$!
ra=0; rb=0; wait $pa || ra=$?; wait $pb || rb=$?
echo "exit a=$ra b=$rb"
echo "bpffs mounts: $(grep -c ' /sys/fs/bpf bpf ' /proc/self/mounts)"
for p in "$PIN_A" "$PIN_B"; do
    for f in maps/signet_policy links/signet_connect4; do
        if [ -e "$p/$f" ]; then echo "visible $p/$f"; else echo "missing $p/$f"; fi
    done
done
cat "$OUT.a" "$OUT.b"
rm -rf "$PIN_A" "$PIN_B" "$OUT.a" "$OUT.b"
"#;

#[test]
fn agents_starting_together_without_bpffs_mount_it_once_and_keep_their_pins() {
    if !privileged() {
        return;
    }
    for round in 0..6 {
        let (a, b) = (Env::new(), Env::new());
        let out =
            std::env::temp_dir().join(format!("signet-race-{}", signet_test_support::unique()));
        let run = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", RACE])
            .env("LOADER", env!("CARGO_BIN_EXE_signet-test-loader"))
            .env("PIN_A", &a.pin_dir)
            .env("PIN_B", &b.pin_dir)
            .env("CG_A", &a.cgroup)
            .env("CG_B", &b.cgroup)
            .env("OUT", &out)
            .output()
            .expect("unshare (util-linux)");
        let report = String::from_utf8_lossy(&run.stdout);
        let context = format!(
            "round {round}:\n{report}{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(run.status.success(), "{context}");
        assert!(
            report.contains("exit a=0 b=0"),
            "both loaders came up: {context}"
        );
        assert!(
            report.contains("bpffs mounts: 1\n"),
            "exactly one bpffs, none stacked: {context}"
        );
        assert!(
            !report.contains("missing"),
            "every pin is visible: {context}"
        );
        assert_eq!(report.matches("visible").count(), 4, "{context}");
    }
}

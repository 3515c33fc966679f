#!/usr/bin/env bash
# The mesh benchmark (not a test): brings the demo topology up, adds two namespaces outside the
# mesh for the direct baseline, runs signet-mesh-bench, and removes everything.
#
#   deploy/local/bench.sh [--seconds N]
#
# Needs root. Every figure is printed beside the direct path measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SIGNET_DEMO_NAME=${SIGNET_DEMO_NAME:-signet-bench}
NS=$SIGNET_DEMO_NAME
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/signet-target}"
[ "$(id -u)" -eq 0 ] || { echo "bench.sh: run as root" >&2; exit 1; }
# shellcheck source=deploy/local/lib.sh
. deploy/local/lib.sh

trap 'deploy/local/demo.sh down >/dev/null' EXIT
topology=$(deploy/local/demo.sh up | tee /dev/stderr | tail -n 1)
cargo build --release --locked -p signet-tests --bin signet-mesh-bench

# direct-a on node-a and direct-b on node-b: routed like pods, but not in the cluster state, so
# nothing captures them (demo.sh down removes them with the rest: same name prefix).
attach "$NS-direct-a" a sd-a-direct 10.99.31.2
attach "$NS-direct-b" b sd-b-direct 10.99.41.2

# The connection test opens thousands of connections a second to one pod, and node-b's proxy
# dials the pod from the node's own address and closes first, so each of its ports waits 60 s in
# TIME_WAIT. Without reuse the ~28,000 ephemeral ports fill within a few rounds and connect()
# spends its time looking for a free one: the rate fell from 2,079/s to 327/s over three 4 s
# rounds, with 15,800 sockets in TIME_WAIT in node-b and node-b's CPU per round doubling. With
# reuse it held at 1,762-2,828/s. Set only in the nodes of this benchmark's own topology.
for node in node-a node-b; do
    ip netns exec "$NS-$node" sysctl -qw net.ipv4.tcp_tw_reuse=1
done

"$CARGO_TARGET_DIR/release/signet-mesh-bench" run --topology "$topology" \
    --direct-client "$NS-direct-a" --direct-server "$NS-direct-b:10.99.41.2" \
    --signet "$CARGO_TARGET_DIR/release/signet" "$@"

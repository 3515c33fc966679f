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

trap 'deploy/local/demo.sh down >/dev/null' EXIT
topology=$(deploy/local/demo.sh up | tee /dev/stderr | tail -n 1)
cargo build --release --locked -p signet-tests --bin signet-mesh-bench

# direct-a on node-a and direct-b on node-b: routed like pods, but not in the cluster state, so
# nothing captures them (demo.sh down removes them with the rest: same name prefix).
attach() { # netns node ip
    ip netns add "$1"
    ip -n "$1" link set lo up
    ip -n "$NS-node-$2" link add "sd-$2-direct" type veth peer name eth0 netns "$1"
    ip -n "$NS-node-$2" addr add "${3%.*}.1/24" dev "sd-$2-direct"
    ip -n "$NS-node-$2" link set "sd-$2-direct" up
    ip -n "$1" addr add "$3/24" dev eth0
    ip -n "$1" link set eth0 up
    ip -n "$1" route add default via "${3%.*}.1"
}
attach "$NS-direct-a" a 10.99.31.2
attach "$NS-direct-b" b 10.99.41.2
ip -n "$NS-node-a" route add 10.99.41.0/24 via 10.99.0.2
ip -n "$NS-node-b" route add 10.99.31.0/24 via 10.99.0.1

"$CARGO_TARGET_DIR/release/signet-mesh-bench" run --topology "$topology" \
    --direct-client "$NS-direct-a" --direct-server "$NS-direct-b:10.99.41.2" "$@"

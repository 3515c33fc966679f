#!/usr/bin/env bash
# The L7 traffic-management benchmark (not a test): one HTTP backend in api-0 (node-b), reached
# from node-a four ways in the same run, each driven by wrk (HTTP/1.1) and h2load (HTTP/2, h2c):
#
#   direct        a client outside the mesh to the pod (the baseline)
#   Signet L4     the web-0 pod to a Service no route governs (byte stream over HBONE)
#   Signet L7     the web-0 pod to a Service an HTTPRoute governs (retries, timeouts), routed
#                 request by request by node-a's proxy
#   HAProxy       the client outside the mesh to HAProxy (Debian's package, one thread) on
#                 node-a, in front of the same pod
#
#   deploy/local/traffic-bench.sh [--seconds N] [--connections N]
#
# Needs root. The demo runs permissive so HAProxy and the direct client reach the pod in
# plaintext; Signet's paths are mTLS. Prints requests/s and latency beside direct, and how much
# latency L7 adds compared with what L4 adds. Signet's agents and HAProxy have one worker each.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SIGNET_DEMO_NAME=${SIGNET_DEMO_NAME:-signet-l7bench}
export SIGNET_DEMO_MTLS=permissive
NS=$SIGNET_DEMO_NAME
WORK=/tmp/$NS
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/signet-target}"
BIN="$CARGO_TARGET_DIR/release"
CG=/sys/fs/cgroup/unified/$NS
SECONDS_EACH=5
CONNECTIONS=16
while [ $# -gt 0 ]; do
    case $1 in
        --seconds) SECONDS_EACH=$2; shift 2 ;;
        --connections) CONNECTIONS=$2; shift 2 ;;
        *) echo "usage: traffic-bench.sh [--seconds N] [--connections N]" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "traffic-bench.sh: run as root" >&2; exit 1; }
# shellcheck source=deploy/local/lib.sh
. deploy/local/lib.sh

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v haproxy >/dev/null || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
    # Installed without starting Debian's default services: nothing may listen outside our netns.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    rm -f /usr/sbin/policy-rc.d
fi

cleanup() {
    [ -f "$WORK/haproxy.pid" ] && kill "$(cat "$WORK/haproxy.pid")" 2>/dev/null || true
    [ -f "$WORK/bench-backend.pid" ] && kill "$(cat "$WORK/bench-backend.pid")" 2>/dev/null || true
    deploy/local/demo.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT
deploy/local/demo.sh up >&2
cargo build --release --locked -p signet-tests --bin signet-test-http >&2

BACKEND=10.99.21.2:9300
L4_VIP=10.96.0.40
L7_VIP=10.96.0.41
cat > "$WORK/state/l7-bench.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: bench-l4, namespace: payments}
spec: {clusterIP: $L4_VIP, ports: [{name: http, port: 80, targetPort: 9300}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bench-l4-1, namespace: payments, labels: {kubernetes.io/service-name: bench-l4}}
addressType: IPv4
ports: [{name: http, port: 9300}]
endpoints: [{addresses: [10.99.21.2], conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {name: bench-l7, namespace: payments}
spec: {clusterIP: $L7_VIP, ports: [{name: http, port: 80, targetPort: 9300}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bench-l7-1, namespace: payments, labels: {kubernetes.io/service-name: bench-l7}}
addressType: IPv4
ports: [{name: http, port: 9300}]
endpoints: [{addresses: [10.99.21.2], conditions: {ready: true}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bench-l7, namespace: payments}
spec:
  parentRefs: [{group: '', kind: Service, name: bench-l7, port: 80}]
  rules:
  - backendRefs: [{name: bench-l7, port: 80}]
    timeouts: {request: 5s, backendRequest: 2s}
    retry: {attempts: 2, codes: [502, 503], backoff: 10ms}
YAML
"$BIN/signet-test-http" serve --netns "$NS-api-0" --name api-0 --listen "$BACKEND" >/dev/null &
echo $! > "$WORK/bench-backend.pid"

# A client outside the mesh on node-a: direct-a (demo.sh down removes it: same name prefix).
attach "$NS-direct-a" a sd-a-l7bench 10.99.31.2

# HAProxy: one thread, HTTP/1.1 and h2c frontends, kept-alive upstream connections.
mkdir -p "$WORK/haproxy"
cat > "$WORK/haproxy/haproxy.cfg" <<CONF
global
    nbthread 1
    pidfile $WORK/haproxy.pid
    daemon
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend h1
    bind 10.99.0.1:9480
    default_backend pod
frontend h2
    bind 10.99.0.1:9482 proto h2
    default_backend pod_h2
backend pod
    server api0 $BACKEND
backend pod_h2
    server api0 $BACKEND proto h2
CONF
ip netns exec "$NS-node-a" haproxy -f "$WORK/haproxy/haproxy.cfg"

in_web() { sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$CG/node-a/web-0" ip netns exec "$NS-web-0" "$@"; }
in_direct() { ip netns exec "$NS-direct-a" "$@"; }

# The agents pick up the route (they poll every 500 ms): wait for the L7 path to answer.
for _ in $(seq 40); do
    in_web curl -fsS -o /dev/null --max-time 2 "http://$L7_VIP/" 2>/dev/null && break
    sleep 0.25
done

WRK_OUT=$WORK/wrk
H2_OUT=$WORK/h2load
mkdir -p "$WRK_OUT" "$H2_OUT"
# CPU time (clock ticks, all threads) of node-a's agent, node-b's agent and HAProxy: what each
# proxy spends per request, whatever else shares the two cores.
cpu() {
    for f in "$WORK/agent-a.pid" "$WORK/agent-b.pid" "$WORK/haproxy.pid"; do
        awk '{print $14 + $15}' "/proc/$(cat "$f")/stat"
    done | paste -sd' '
}
h1() { # name, runner, url
    local before; before=$(cpu)
    $2 wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_EACH}s" --latency "$3" > "$WRK_OUT/$1.txt" 2>&1 || true
    echo "$before $(cpu)" > "$WRK_OUT/$1.cpu"
}
h2() { # name, runner, url
    local before; before=$(cpu)
    $2 h2load -c"$CONNECTIONS" -m4 -D"$SECONDS_EACH" "$3" > "$H2_OUT/$1.txt" 2>&1 || true
    echo "$before $(cpu)" > "$H2_OUT/$1.cpu"
}
for proto in h1 h2; do
    $proto direct in_direct "http://$BACKEND/"
    $proto l4 in_web "http://$L4_VIP/"
    $proto l7 in_web "http://$L7_VIP/"
done
h1 haproxy in_direct "http://10.99.0.1:9480/"
h2 haproxy in_direct "http://10.99.0.1:9482/"

python3 - "$WRK_OUT" "$H2_OUT" "$CONNECTIONS" "$SECONDS_EACH" "$(getconf CLK_TCK)" <<'PY'
import re, sys, pathlib
wrk_dir, h2_dir, conns, secs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
tck = int(sys.argv[5])

def cpu(d, name, rps):
    """µs of CPU per request spent by node-a's agent, node-b's agent and HAProxy in that run."""
    v = [int(x) for x in (d / f"{name}.cpu").read_text().split()]
    used = [(v[i + 3] - v[i]) / tck for i in range(3)]
    n = rps * float(secs)
    return [u * 1e6 / n if n else 0.0 for u in used]

def proxy_cpu(d, rows):
    print(f"  CPU per request (µs, all threads): {'':2}{'agent node-a':>13} {'agent node-b':>13} {'HAProxy':>9}")
    for n, label in names[1:]:
        a, b, h = cpu(d, n, rows[n]["rps"])
        print(f"  {label:12} {'':25}{a:13.1f} {b:13.1f} {h:9.1f}")
    l7, ha = cpu(d, "l7", rows["l7"]["rps"]), cpu(d, "haproxy", rows["haproxy"]["rps"])
    if l7[0] and ha[2]:
        print(f"  requests/s on one core: Signet L7's routing proxy (node-a) {1e6 / l7[0]:.0f}, "
              f"both Signet proxies {1e6 / (l7[0] + l7[1]):.0f}, HAProxy {1e6 / ha[2]:.0f}: "
              f"{ha[2] / l7[0]:.2f}x and {ha[2] / (l7[0] + l7[1]):.2f}x HAProxy")
names = [("direct", "direct"), ("l4", "Signet L4"), ("l7", "Signet L7"), ("haproxy", "HAProxy")]

def us(v, unit):
    return float(v) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]

def wrk(name):
    t = (wrk_dir / f"{name}.txt").read_text()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", t)
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+(?:us|ms|s))$", t, re.M))
    def p(k):
        m = re.match(r"([\d.]+)(us|ms|s)", lat.get(k, "0us"))
        return us(m.group(1), m.group(2))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    sock = re.search(r"Socket errors: (.*)", t)
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50": p("50"), "p99": p("99"),
            "errors": (errors.group(1) if errors else "0") + (f" ({sock.group(1)})" if sock else "")}

def h2load(name):
    t = (h2_dir / f"{name}.txt").read_text()
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", t)
    req = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", t)
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", t)
    return {"rps": float(rps.group(1)) if rps else 0.0,
            "mean": us(req.group(5), req.group(6)) if req else 0.0,
            "max": us(req.group(3), req.group(4)) if req else 0.0,
            "errors": f"{int(status.group(3)) + int(status.group(4))} 4xx/5xx" if status else "no output"}

print(f"\nL7 benchmark: GET over kept-alive connections, {conns} connections, {secs} s each, node-a -> api-0 on node-b")
print("Signet's agents and HAProxy have one worker thread each; ratios are to direct.\n")
h1 = {n: wrk(n) for n, _ in names}
print("HTTP/1.1 (wrk -t1)")
print(f"  {'':12} {'req/s':>10} {'x direct':>9} {'p50 µs':>9} {'p99 µs':>9}  errors")
for n, label in names:
    r = h1[n]
    ratio = r["rps"] / h1["direct"]["rps"] if h1["direct"]["rps"] else 0
    print(f"  {label:12} {r['rps']:10.0f} {ratio:8.2f}x {r['p50']:9.0f} {r['p99']:9.0f}  {r['errors']}")
d = h1["direct"]["p50"]
added_l4, added_l7 = h1["l4"]["p50"] - d, h1["l7"]["p50"] - d
if added_l4 > 0:
    print(f"  L7 adds {added_l7:.0f} µs at p50, L4 adds {added_l4:.0f} µs: {added_l7 / added_l4:.2f}x (aim: at most 2x)")
if h1["haproxy"]["rps"]:
    print(f"  Signet L7 / HAProxy requests/s: {h1['l7']['rps'] / h1['haproxy']['rps']:.2f}x (aim: at least 1x)")
proxy_cpu(wrk_dir, h1)
h2 = {n: h2load(n) for n, _ in names}
print("\nHTTP/2, h2c (h2load, 4 streams per connection)")
print(f"  {'':12} {'req/s':>10} {'x direct':>9} {'mean µs':>9} {'max µs':>9}  errors")
for n, label in names:
    r = h2[n]
    ratio = r["rps"] / h2["direct"]["rps"] if h2["direct"]["rps"] else 0
    print(f"  {label:12} {r['rps']:10.0f} {ratio:8.2f}x {r['mean']:9.0f} {r['max']:9.0f}  {r['errors']}")
if h2["haproxy"]["rps"]:
    print(f"  Signet L7 / HAProxy requests/s: {h2['l7']['rps'] / h2['haproxy']['rps']:.2f}x")
proxy_cpu(h2_dir, h2)
PY

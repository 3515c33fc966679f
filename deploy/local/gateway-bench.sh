#!/usr/bin/env bash
# The Gateway benchmark (not a test): Signet's Gateway and nginx (Debian's package), each a
# TLS-terminating reverse proxy with one worker on node-a, in front of the same backend on
# api-0 (node-b), driven from the `outside` namespace in the same run. Signet reaches the backend
# over HBONE/mTLS with the Gateway's identity; nginx in plaintext (the demo runs permissive).
#
#   deploy/local/gateway-bench.sh [--seconds N] [--connections N]
#
# Needs root. Prints requests/s and p50/p99 for kept-alive connections and for a new TLS
# connection per request, with Signet's ratio to nginx.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SIGNET_DEMO_NAME=${SIGNET_DEMO_NAME:-signet-gwbench}
export SIGNET_DEMO_MTLS=permissive
NS=$SIGNET_DEMO_NAME
WORK=/tmp/$NS
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/signet-target}"
BIN="$CARGO_TARGET_DIR/release"
SECONDS_EACH=5
CONNECTIONS=16
while [ $# -gt 0 ]; do
    case $1 in
        --seconds) SECONDS_EACH=$2; shift 2 ;;
        --connections) CONNECTIONS=$2; shift 2 ;;
        *) echo "usage: gateway-bench.sh [--seconds N] [--connections N]" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "gateway-bench.sh: run as root" >&2; exit 1; }
# shellcheck source=deploy/local/lib.sh
. deploy/local/lib.sh

if ! command -v nginx >/dev/null; then
    # Installed without starting Debian's default site: nothing may listen outside our netns.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light || \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx
    rm -f /usr/sbin/policy-rc.d
fi

cleanup() {
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    deploy/local/demo.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT
deploy/local/demo.sh up >&2
cargo build --release --locked -p signet-tests --bin signet-gateway-bench >&2

# The bench backend, its Service, a Gateway listener and route for bench.example.test.
make_ca "$WORK/bench-ca" "bench CA"
issue_cert "$WORK/bench-ca" "$WORK/bench" bench.example.test
cat > "$WORK/state/bench.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: payments}
spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 80, targetPort: 9200}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bench-1, namespace: payments, labels: {kubernetes.io/service-name: bench}}
addressType: IPv4
ports: [{name: http, port: 9200}]
endpoints: [{addresses: [10.99.21.2], conditions: {ready: true}}]
---
$(tls_secret_yaml edge bench-tls "$WORK/bench")
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bench, namespace: edge}
spec:
  gatewayClassName: signet
  listeners:
  - {name: https, port: 8443, protocol: HTTPS, hostname: bench.example.test, tls: {certificateRefs: [{name: bench-tls}]}, allowedRoutes: {namespaces: {from: All}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bench, namespace: payments}
spec:
  parentRefs: [{name: bench, namespace: edge}]
  rules: [{backendRefs: [{name: bench, port: 80}]}]
YAML
"$BIN/signet-gateway-bench" backend --netns "$NS-api-0" --addr 10.99.21.2:9200 2>/dev/null &
echo $! > "$WORK/bench-backend.pid"

# nginx: the same certificate, one worker, kept-alive upstream connections, no logging.
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    keepalive_requests 1000000;
    upstream backend { server 10.99.21.2:9200; keepalive 64; }
    server {
        listen 10.99.0.1:9443 ssl;
        server_name bench.example.test;
        ssl_certificate $WORK/bench.crt;
        ssl_certificate_key $WORK/bench.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$remote_addr;
        }
    }
}
CONF
ip netns exec "$NS-node-a" nginx -c "$WORK/nginx/nginx.conf"
sleep 3 # the agents pick up the bench Gateway (they poll every 500 ms) and get its certificate

run() { # port, extra args
    "$BIN/signet-gateway-bench" load --netns "$NS-outside" --target "10.99.0.1:$1" --host bench.example.test \
        --ca "$WORK/bench-ca.pem" --connections "$CONNECTIONS" --seconds "$SECONDS_EACH" "${@:2}"
}
for attempt in $(seq 20); do
    run 8443 --seconds 1 --connections 1 | grep -q '"requests":0,' || break
    sleep 0.5
done
signet_ka=$(run 8443); nginx_ka=$(run 9443)
signet_new=$(run 8443 --new-connections); nginx_new=$(run 9443 --new-connections)
python3 - "$signet_ka" "$nginx_ka" "$signet_new" "$nginx_new" "$CONNECTIONS" "$SECONDS_EACH" <<'PY'
import json, sys
sk, nk, sn, nn = (json.loads(a) for a in sys.argv[1:5])
conns, secs = sys.argv[5], sys.argv[6]
print(f"\nGateway benchmark: HTTPS GET, {conns} clients, {secs} s each, one proxy worker each, same backend")
print(f"{'':34} {'nginx':>12} {'Signet':>12} {'Signet/nginx':>13}")
for label, s, n in (("keep-alive", sk, nk), ("new TLS connection per request", sn, nn)):
    print(f"{label}")
    print(f"  {'requests/s':32} {n['requests_per_s']:12.0f} {s['requests_per_s']:12.0f} {s['requests_per_s']/n['requests_per_s']:12.2f}x")
    for p in ("p50_us", "p99_us"):
        print(f"  {p.replace('_us', ' latency (µs)'):32} {n[p]:12.0f} {s[p]:12.0f} {s[p]/n[p]:12.2f}x")
    if s["errors"] or n["errors"]:
        print(f"  errors: nginx {n['errors']}, Signet {s['errors']}")
PY

#!/usr/bin/env bash
# Signet's local demo: two simulated nodes (network namespaces), four pods in three namespaces,
# the CA and one agent per node, all on this machine; nothing leaves it.
#
#   deploy/local/demo.sh          # up, run the scenario, down
#   deploy/local/demo.sh up       # leave it running; prints the topology JSON path last
#   deploy/local/demo.sh down     # remove everything
#
# Needs root (network namespaces, cgroups, eBPF). Installs what is missing (Debian packages).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
# SIGNET_DEMO_MTLS=permissive lets plaintext reach pods (the gateway benchmark's nginx needs it).
# SIGNET_DEMO_FLOW_LOG=N sizes each agent's flow log (0: signet observe off).
# Every name the demo creates starts with this (tests/run.sh uses a unique one).
NAME=${SIGNET_DEMO_NAME:-signet-demo}
WORK=/tmp/$NAME
CG=/sys/fs/cgroup/unified/$NAME
NS=$NAME
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/signet-target}"
BIN="$CARGO_TARGET_DIR/release"

say() { if [ -t 1 ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi; }
die() { echo "demo.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (network namespaces, cgroups and eBPF need it)"

install_missing() {
    local missing=()
    command -v protoc >/dev/null || missing+=(protobuf-compiler)
    [ -f /usr/include/google/protobuf/struct.proto ] || missing+=(libprotobuf-dev)
    command -v clang >/dev/null || missing+=(clang)
    [ -f /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
    [ -f "/usr/include/$(uname -m)-linux-gnu/asm/types.h" ] || missing+=(linux-libc-dev)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v curl >/dev/null || missing+=(curl)
    command -v tcpdump >/dev/null || missing+=(tcpdump)
    command -v python3 >/dev/null || missing+=(python3)
    command -v openssl >/dev/null || missing+=(openssl)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

# node  ns        sa        pod           ip          port
PODS=(
  "a shop       web       web-0         10.99.11.2  8080"
  "a ops        deployer  deployer-0    10.99.12.2  8080"
  "b payments   api       api-0         10.99.21.2  8080"
  "b payments   ledger    ledger-0      10.99.22.2  5432"
)
# shellcheck source=deploy/local/lib.sh
. deploy/local/lib.sh
# The payments/api Service: ClusterIP port 80 -> api-0:8080.
API_VIP=10.96.0.20
# A client outside the mesh (no pod, no cgroup, not in the cluster state) routed via node-a.
OUTSIDE_IP=10.99.200.2
# The edge: a Gateway with two HTTPS hostnames, each with its own certificate from a demo CA.
GATEWAY_HOSTS=(shop.example.test pay.example.test)
GATEWAY_PORT=443
# The shared L2 segment, and the pool Gateways of their own address take from.
LAN_NET=10.99.250
LAN_POOL_FIRST=10.99.250.200
LAN_POOL_LAST=10.99.250.209

down() {
    for pidfile in "$WORK"/*.pid; do
        [ -f "$pidfile" ] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    # Agents drain for their grace period; wait for them (and everything else) to go.
    for _ in $(seq 50); do
        local alive=0
        for pidfile in "$WORK"/*.pid; do
            [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && alive=1
        done
        [ $alive = 0 ] && break
        sleep 0.2
    done
    for pidfile in "$WORK"/*.pid; do
        [ -f "$pidfile" ] || continue
        kill -9 "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
    for n in a b; do
        [ -f "$WORK/agent-$n.yaml" ] && "$BIN/signet-agent" --config "$WORK/agent-$n.yaml" --cleanup >/dev/null 2>&1 || true
        rm -rf "/sys/fs/bpf/signet/$NAME-node-$n"
    done
    rmdir /sys/fs/bpf/signet 2>/dev/null || true # only if nothing else lives there
    for ns in $(ip netns list | awk '{print $1}' | grep "^$NS-" || true); do ip netns del "$ns"; done
    if [ -d "$CG" ]; then
        find "$CG" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null || true
        rmdir "$CG" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}

up() {
    install_missing
    say "building (release)"
    cargo build --release --locked -p signet-ca -p signet-agent --bins --features signet-ca/server
    down
    mkdir -p "$WORK/state" "$CG"
    chmod 700 "$WORK"

    say "topology: node-a and node-b joined by an underlay veth"
    for n in a b; do ip netns add "$NS-node-$n"; ip -n "$NS-node-$n" link set lo up; mkdir -p "$CG/node-$n"; done
    ip -n "$NS-node-a" link add sd-underlay type veth peer name sd-underlay netns "$NS-node-b"
    for n in a b; do
        ip -n "$NS-node-$n" addr add "$(node_ip $n)/24" dev sd-underlay
        ip -n "$NS-node-$n" link set sd-underlay up
        ip netns exec "$NS-node-$n" sysctl -qw net.ipv4.ip_forward=1
    done

    local manifests="$WORK/state/cluster.yaml"
    : > "$manifests"
    for n in a b; do
        printf 'apiVersion: v1\nkind: Node\nmetadata: {name: node-%s}\nstatus: {addresses: [{type: InternalIP, address: %s}]}\n---\n' \
            "$n" "$(node_ip $n)" >> "$manifests"
    done
    printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: %s, labels: {team: %s}}\n---\n' \
        shop shop ops platform payments payments >> "$manifests"
    service_yaml payments api "$API_VIP" 10.99.21.2 node-b >> "$manifests"
    local i=0
    for p in "${PODS[@]}"; do
        read -r n kns sa pod ip port <<<"$p"
        i=$((i + 1))
        local pns="$NS-$pod" host="sd-pod$i"
        attach "$pns" "$n" "$host" "$ip"
        mkdir -p "$CG/node-$n/$pod"
        cat >> "$manifests" <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $pod
  namespace: $kns
  labels: {app: $sa}
  annotations: {signet.dev/cgroup: $pod, signet.dev/netns: $pns, signet.dev/host-interface: $host}
spec: {nodeName: node-$n, serviceAccountName: $sa, containers: [{name: app, image: app, ports: [{containerPort: $port}]}]}
status: {podIP: $ip}
---
YAML
        # The workload: an unmodified HTTP server.
        ip netns exec "$pns" python3 -m http.server "$port" --bind "$ip" >"$WORK/$pod.log" 2>&1 &
        echo $! > "$WORK/$pod.pid"
    done

    # outside: a machine that is not in the mesh, attached to node-a.
    attach "$NS-outside" a sd-outside "$OUTSIDE_IP"

    say "a shared L2 segment: a bridge joining node-a, node-b and outside ($LAN_NET.0/24)"
    ip netns add "$NS-lan"
    ip -n "$NS-lan" link set lo up
    ip -n "$NS-lan" link add br0 type bridge
    ip -n "$NS-lan" link set br0 up
    local who dev host lns
    for who in a b outside; do
        case $who in a) host=1 lns="$NS-node-a" dev=sd-lan ;; b) host=2 lns="$NS-node-b" dev=sd-lan ;; *) host=100 lns="$NS-outside" dev=lan0 ;; esac
        ip -n "$lns" link add "$dev" type veth peer name "port-$who" netns "$NS-lan"
        ip -n "$NS-lan" link set "port-$who" master br0 up
        ip -n "$lns" addr add "$LAN_NET.$host/24" dev "$dev"
        ip -n "$lns" link set "$dev" up
    done

    say "Gateway: HTTPS on :$GATEWAY_PORT for ${GATEWAY_HOSTS[*]}, certificates from a demo CA"
    gateway_manifests >> "$manifests"
    lan_routes shop web > "$WORK/state/lan-routes.yaml"

    say "CA in node-a, one agent per node"
    local token_a token_b
    token_a=$(head -c 24 /dev/urandom | base64 | tr -d '/+='); token_b=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
    (umask 077; echo "$token_a" > "$WORK/node-a.token"; echo "$token_b" > "$WORK/node-b.token")
    cat > "$WORK/ca.yaml" <<YAML
trustDomain: cluster.local
listen: 10.99.0.1:15012
admin: 127.0.0.1:15014
stateDir: ca
clusterStateDir: state
servingNames: [localhost, 10.99.0.1]
nodes:
- {name: node-a, tokenSha256: $(printf %s "$token_a" | "$BIN/signet-ca" hash-token)}
- {name: node-b, tokenSha256: $(printf %s "$token_b" | "$BIN/signet-ca" hash-token)}
YAML
    ip netns exec "$NS-node-a" "$BIN/signet-ca" serve --config "$WORK/ca.yaml" >"$WORK/ca.log" 2>&1 &
    echo $! > "$WORK/ca.pid"
    for _ in $(seq 100); do [ -f "$WORK/ca/roots/1/root-cert.pem" ] && break; sleep 0.1; done
    cp "$WORK/ca/roots/1/root-cert.pem" "$WORK/ca-root.pem"
    for n in a b; do
        cat > "$WORK/agent-$n.yaml" <<YAML
node: node-$n
clusterStateDir: state
identityTable: identities.json
ca: {address: '10.99.0.1:15012', serverName: localhost, rootCertFile: ca-root.pem, tokenFile: node-$n.token}
datapath: {cgroupRoot: $CG/node-$n, bpffsDir: /sys/fs/bpf/signet/$NAME-node-$n}
listen: {outbound: '$(node_ip $n):15001', inbound: '$(node_ip $n):15008', admin: '127.0.0.1:1502$([ $n = a ] && echo 0 || echo 1)'}
mtlsMode: ${SIGNET_DEMO_MTLS:-strict}
# Short-lived SVIDs (renewed at half-life): signet connectivity test sees them rotate under traffic.
svidTtlSeconds: 60
# Both simulated nodes share this machine's cores: one runtime thread each.
proxy: {workerThreads: 1}
# Recent flows kept for signet observe; SIGNET_DEMO_FLOW_LOG=0 turns it off (bench.sh compares).
admin: {flowLogCapacity: ${SIGNET_DEMO_FLOW_LOG:-4096}}
YAML
        "$BIN/signet-agent" --netns "$NS-node-$n" --config "$WORK/agent-$n.yaml" >"$WORK/agent-$n.log" 2>&1 &
        echo $! > "$WORK/agent-$n.pid"
    done
    python3 - "$WORK" "$CG" "$NS" "$API_VIP" "$OUTSIDE_IP" "$GATEWAY_PORT" "${GATEWAY_HOSTS[*]}" "${PODS[@]}" > "$WORK/topology.json" <<'PY'
import json, sys
work, cg, ns, vip, outside, gw_port, gw_hosts, pods = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), sys.argv[7].split(), sys.argv[8:]
ips = {"a": "10.99.0.1", "b": "10.99.0.2"}
out = {"nodes": [{"name": f"node-{n}", "netns": f"{ns}-node-{n}", "address": ips[n],
                  "agentAdmin": f"127.0.0.1:1502{0 if n == 'a' else 1}",
                  "agentPidFile": f"{work}/agent-{n}.pid", "cgroupRoot": f"{cg}/node-{n}",
                  "underlay": "sd-underlay"} for n in "ab"],
       "stateDir": f"{work}/state", "trustDomain": "cluster.local",
       # What `signet connectivity test` may take for its pods, Service and Gateway.
       "connectivity": {"subnets": "10.99.64.0/18", "serviceIP": "10.96.0.250", "gatewayPort": 18000},
       "pods": [], "caBundle": f"{work}/ca-root.pem",
       "ca": {"netns": f"{ns}-node-a", "address": "10.99.0.1:15012", "admin": "127.0.0.1:15014"},
       "services": [{"namespace": "payments", "name": "api", "clusterIP": vip,
                     "ports": [{"port": 80, "targetPort": 8080}]}],
       "outside": {"netns": f"{ns}-outside", "ip": outside, "inMesh": False},
       "gateway": {"namespace": "edge", "name": "public", "address": ips["a"], "addresses": list(ips.values()),
                   "port": gw_port, "hostnames": gw_hosts, "caFile": f"{work}/edge-ca.pem"}}
for p in pods:
    n, kns, sa, pod, ip, port = p.split()
    out["pods"].append({"namespace": kns, "name": pod, "netns": f"{ns}-{pod}", "cgroup": f"{cg}/node-{n}/{pod}",
                        "ip": ip, "node": f"node-{n}", "serviceAccount": sa, "ports": [int(port)]})
print(json.dumps(out, indent=2))
PY
    # Ready when `signet status` says every agent is OK (it asks each one's admin port).
    if ! "$BIN/signet" status --topology "$WORK/topology.json" --wait --wait-duration 60s >"$WORK/status.txt"; then
        cat "$WORK/status.txt" "$WORK/agent-a.log" "$WORK/agent-b.log" >&2
        die "the agents did not come up OK (signet status above)"
    fi
    cat "$WORK/status.txt"
    echo "$WORK/topology.json"
}

# service_yaml NAMESPACE APP CLUSTER_IP POD_IP NODE: Service APP (port 80 to the pods' 8080,
# selecting app=APP) and its EndpointSlice with the one pod, each followed by `---`.
service_yaml() {
    cat <<YAML
apiVersion: v1
kind: Service
metadata: {name: $2, namespace: $1}
spec: {clusterIP: $3, selector: {app: $2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: $2-1, namespace: $1, labels: {kubernetes.io/service-name: $2}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [$4], conditions: {ready: true}, nodeName: $5}]
---
YAML
}

# A demo CA, one certificate per Gateway hostname, their Secrets, the Gateway and its routes.
gateway_manifests() {
    local ca="$WORK/edge-ca"
    make_ca "$ca" "Signet demo edge CA"
    cat <<YAML
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
$(service_yaml shop web 10.96.0.10 10.99.11.2 node-a)
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: edge}
spec:
  gatewayClassName: signet
  listeners:
YAML
    local host name
    for host in "${GATEWAY_HOSTS[@]}"; do
        name=${host%%.*}
        printf '  - {name: %s, port: %s, protocol: HTTPS, hostname: %s, tls: {certificateRefs: [{name: %s-tls}]}, allowedRoutes: {namespaces: {from: All}}}\n' \
            "$name" "$GATEWAY_PORT" "$host" "$name"
    done
    echo "---"
    for host in "${GATEWAY_HOSTS[@]}"; do
        name=${host%%.*}
        issue_cert "$ca" "$WORK/$name" "$host"
        tls_secret_yaml edge "$name-tls" "$WORK/$name"
    done
    cat <<'YAML'
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: shop}
spec:
  parentRefs: [{name: public, namespace: edge}]
  hostnames: [shop.example.test]
  rules:
  - backendRefs: [{name: web, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payments, namespace: payments}
spec:
  parentRefs: [{name: public, namespace: edge}]
  hostnames: [pay.example.test]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: api, port: 80}]
---
YAML
    # Two Gateways on :80, each on an address of its own from the pool, announced on the
    # shared segment by one node (the pool selects only Gateways labelled edge: lan, so
    # edge/public stays on the nodes' addresses).
    cat <<YAML
apiVersion: signet.dev/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: lan}
spec:
  blocks: [{start: $LAN_POOL_FIRST, stop: $LAN_POOL_LAST}]
  serviceSelector: {matchLabels: {edge: lan}}
---
apiVersion: signet.dev/v1alpha1
kind: L2AnnouncementPolicy
metadata: {name: lan}
spec: {interfaces: [sd-lan], loadBalancerIPs: true}
---
YAML
    local g
    for g in blue green; do
        cat <<YAML
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: $g, namespace: edge, labels: {edge: lan}}
spec:
  gatewayClassName: signet
  listeners: [{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}]
---
YAML
    done
    # payments/ledger (ledger-0 on node-b): a backend for the failover, on the node that stays.
    cat <<'YAML'
apiVersion: v1
kind: Service
metadata: {name: ledger, namespace: payments}
spec: {clusterIP: 10.96.0.30, selector: {app: ledger}, ports: [{name: http, port: 80, targetPort: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
addressType: IPv4
metadata: {name: ledger-1, namespace: payments, labels: {kubernetes.io/service-name: ledger}}
ports: [{name: http, port: 5432}]
endpoints: [{addresses: [10.99.22.2], nodeName: node-b, conditions: {ready: true}}]
---
YAML
}

# lan_routes NAMESPACE SERVICE: the HTTPRoutes of Gateways edge/blue and edge/green, to SERVICE
# (in NAMESPACE) port 80, each adding x-gateway: <its name> to responses.
lan_routes() {
    local g
    for g in blue green; do
        cat <<YAML
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: $g, namespace: $1}
spec:
  parentRefs: [{name: $g, namespace: edge}]
  rules:
  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-gateway, value: $g}]}}]
    backendRefs: [{name: $2, port: 80}]
---
YAML
    done
}

# Runs a command inside a pod: its cgroup (so the datapath captures it) and its network namespace.
in_pod() {
    local pod=$1; shift
    local n="" p pn pp
    for p in "${PODS[@]}"; do
        read -r pn _ _ pp _ _ <<<"$p"
        if [ "$pp" = "$pod" ]; then n=$pn; fi
    done
    [ -n "$n" ] || die "no pod $pod"
    sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$CG/node-$n/$pod" ip netns exec "$NS-$pod" "$@"
}

# The HTTP status a pod's plain curl gets (curl arguments follow the pod); empty when refused.
pod_status() {
    local pod=$1; shift
    in_pod "$pod" curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "$@" 2>/dev/null || true
}

# The HTTP status curl from the outside namespace gets through the Gateway for https://HOST/PATH.
gateway_status() {
    ip netns exec "$NS-outside" curl -sS --max-time 5 -o /dev/null -w '%{http_code}' --cacert "$WORK/edge-ca.pem" \
        --resolve "$1:$GATEWAY_PORT:$(node_ip a)" "https://$1$2" 2>/dev/null || true
}

scenario() {
    say "1. web-0 (shop, node-a) -> api-0 (payments, node-b) with plain curl"
    ip netns exec "$NS-node-b" tcpdump -i sd-underlay -w "$WORK/underlay.pcap" -U port 15008 >/dev/null 2>&1 &
    local tcpdump=$!
    sleep 1
    local first
    first=$(in_pod web-0 curl -sS -o /dev/null -w 'HTTP %{http_code} from %{remote_ip}:%{remote_port}' http://10.99.21.2:8080/)
    echo "$first"; [[ "$first" == "HTTP 200"* ]] || die "web-0 could not reach api-0"
    sleep 1; kill $tcpdump 2>/dev/null || true; wait $tcpdump 2>/dev/null || true
    local packets; packets=$(tcpdump -r "$WORK/underlay.pcap" 2>/dev/null | wc -l)
    if tcpdump -A -r "$WORK/underlay.pcap" 2>/dev/null | grep -q "GET / HTTP"; then
        die "plaintext HTTP seen on the underlay"
    fi
    echo "underlay capture: $packets packets on port 15008 (HBONE), no plaintext HTTP in them"
    local svc
    svc=$(in_pod web-0 curl -sS -o /dev/null -w 'HTTP %{http_code} from %{remote_ip}:%{remote_port}' "http://$API_VIP/")
    echo "$svc (the payments/api Service)"; [[ "$svc" == "HTTP 200"* ]] || die "web-0 could not reach the api Service"
    sleep 0.5
    grep -h 'reporter="outbound"' "$WORK/agent-a.log" | grep ' flow ' | tail -n 1 | sed 's/^/agent node-a: /'
    echo "node-a metrics (127.0.0.1:15020/metrics):"
    ip netns exec "$NS-node-a" curl -sS http://127.0.0.1:15020/metrics | grep -E '^signet_(connections_opened_total|tcp_sent_bytes_total)' | sed 's/^/  /'
    local plain
    plain=$(ip netns exec "$NS-outside" curl -sS -o /dev/null -w '%{http_code}' --max-time 3 http://10.99.21.2:8080/ 2>/dev/null || true)
    echo "outside (not in the mesh) -> api-0 in plaintext: dropped (curl got ${plain:-nothing}; strict mTLS)"
    [ "$plain" != 200 ] || die "plaintext from outside the mesh must not reach api-0"

    say "2. identity policy: only shop/web may reach payments/api"
    cat > "$WORK/state/payments-api.yaml" <<'YAML'
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: payments-api, namespace: payments}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
  - from: [{identity: spiffe://cluster.local/ns/shop/sa/web}]
    ports: [{port: 8080}]
YAML
    sleep 2
    local code
    code=$(pod_status web-0 http://10.99.21.2:8080/)
    echo "web-0      -> api-0: HTTP $code"; [ "$code" = 200 ] || die "web-0 should reach api-0"
    code=$(pod_status deployer-0 http://10.99.21.2:8080/)
    echo "deployer-0 -> api-0: refused (curl got ${code:-nothing})"; [ "$code" != 200 ] || die "deployer-0 must be refused"
    grep -h 'verdict="deny"' "$WORK/agent-b.log" | tail -n 1 | sed 's/^/agent node-b: /' || true

    say "3. L7: shop/web may GET, not POST"
    cat > "$WORK/state/payments-api.yaml" <<'YAML'
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: payments-api, namespace: payments}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
  - from: [{identity: spiffe://cluster.local/ns/shop/sa/web}]
    ports: [{port: 8080}]
    http: [{methods: [GET]}]
YAML
    sleep 2
    code=$(pod_status web-0 http://10.99.21.2:8080/)
    echo "web-0 GET  /: HTTP $code"; [ "$code" = 200 ] || die "GET should pass"
    code=$(pod_status web-0 -X POST http://10.99.21.2:8080/)
    echo "web-0 POST /: HTTP $code"; [ "$code" = 403 ] || die "POST should get 403"
    code=$(pod_status deployer-0 http://10.99.21.2:8080/)
    echo "deployer-0 GET /: refused (curl got ${code:-nothing})"; [ "$code" != 200 ] || die "deployer-0 must be refused"

    say "4. the Gateway: from outside the mesh, HTTPS by hostname, into the mesh as the gateway"
    local gw host
    for gw in shop.example.test/ pay.example.test/api/; do
        host=${gw%%/*}
        echo "outside -> https://$gw (curl --cacert edge-ca.pem):"
        ip netns exec "$NS-outside" curl -sS -v --max-time 5 -o /dev/null --cacert "$WORK/edge-ca.pem" \
            --resolve "$host:$GATEWAY_PORT:$(node_ip a)" "https://$gw" 2>&1 | grep -E '^\* +subject:|^< HTTP' | sed 's/^/    /' || true
    done
    code=$(gateway_status shop.example.test /)
    [ "$code" = 200 ] || die "the Gateway should serve shop.example.test (got $code)"
    # payments/api admits only shop/web (GET): the gateway's identity is refused until named.
    code=$(gateway_status pay.example.test /api/)
    echo "pay.example.test while payments-api admits only shop/web: HTTP $code (api-0 refuses spiffe://cluster.local/ns/edge/gateway/public)"
    [ "$code" = 502 ] || die "api-0 should refuse the gateway (got $code)"
    cat > "$WORK/state/payments-api.yaml" <<'YAML'
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: payments-api, namespace: payments}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
  - from: [{identity: spiffe://cluster.local/ns/shop/sa/web}, {gateway: {namespace: edge, name: public}}]
    ports: [{port: 8080}]
    http: [{methods: [GET]}]
YAML
    sleep 2
    code=$(gateway_status pay.example.test /api/)
    echo "pay.example.test once the policy names the Gateway edge/public: HTTP $code"
    [ "$code" = 200 ] || die "the gateway should reach api-0 now (got $code)"
    echo "signet gateway status (Gateway API conditions):"
    "$BIN/signet" gateway status --state "$WORK/state" | grep -E "^  - namespace|^    name|reason" | head -n 14 | sed 's/^/  /'

    say "5. egress: ops/deployer may reach nothing (egress: [])"
    # A web server outside the mesh, for the egress checks.
    ip netns exec "$NS-outside" python3 -m http.server 8080 --bind "$OUTSIDE_IP" >"$WORK/outside-http.log" 2>&1 &
    echo $! > "$WORK/outside-http.pid"
    local i
    for i in $(seq 1 50); do
        [ "$(pod_status web-0 "http://$OUTSIDE_IP:8080/")" = 200 ] && break
        sleep 0.1
    done
    code=$(pod_status web-0 "http://$OUTSIDE_IP:8080/")
    echo "web-0      -> outside (no egress policy): HTTP $code"; [ "$code" = 200 ] || die "web-0 should reach outside"
    cat > "$WORK/state/deployer-egress.yaml" <<'YAML'
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: deployer-egress, namespace: ops}
spec:
  selector: {}
  egress: []
YAML
    sleep 2
    code=$(pod_status deployer-0 "http://$OUTSIDE_IP:8080/")
    echo "deployer-0 -> outside: refused at connect() (curl got ${code:-nothing})"; [ "$code" != 200 ] || die "deployer-0 must not reach outside"
    code=$(in_pod deployer-0 curl -sS -o /dev/null -w '%{http_code}' --max-time 5 --cacert "$WORK/edge-ca.pem" \
        --resolve "shop.example.test:$GATEWAY_PORT:$(node_ip a)" "https://shop.example.test:$GATEWAY_PORT/" 2>/dev/null || true)
    echo "deployer-0 -> the Gateway on node-a: refused (curl got ${code:-nothing}): the node is host to it"
    [ "$code" != 200 ] || die "deployer-0 must not get back into the mesh through the Gateway"
    in_pod deployer-0 python3 -c "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('10.99.21.2', 5353))" 2>/dev/null || true
    "$BIN/signet" datapath drops --pin-dir "/sys/fs/bpf/signet/$NAME-node-a" | sed 's/^/  node-a drops: /' || true

    say "6. signet policy explain"
    "$BIN/signet" policy explain --state "$WORK/state" --from ops/deployer-0 --to "world:$OUTSIDE_IP:8080" || true
    "$BIN/signet" policy explain --state "$WORK/state" --from ops/deployer-0 --to payments/api-0:8080 || true
    "$BIN/signet" policy explain --state "$WORK/state" --from shop/web-0 --to payments/api-0:8080 --method POST --path / || true
}

# The address the pool gave Gateway edge/NAME (from the agents' address table).
lan_address() {
    python3 - "$WORK/addresses.json" "$1" <<'PY' 2>/dev/null || true
import json, sys
for a in json.load(open(sys.argv[1]))["allocations"]:
    if a["owner"]["kind"] == "Gateway" and a["owner"]["name"] == sys.argv[2]:
        print(a["address"])
PY
}

# The node holding the L2 lease of ADDRESS.
lan_holder() {
    python3 - "$WORK/l2-leases.json" "$1" <<'PY' 2>/dev/null || true
import json, sys
print(json.load(open(sys.argv[1])).get(sys.argv[2], {}).get("holderIdentity", ""))
PY
}

# What outside's curl gets from http://ADDRESS/: "<status> <x-gateway>".
lan_get() {
    ip netns exec "$NS-outside" curl -sS --max-time 2 -D - -o /dev/null "http://$1/" 2>/dev/null \
        | tr -d '\r' | awk 'NR == 1 {s = $2} tolower($1) == "x-gateway:" {g = $2} END {print s, g}'
}

lan_mac() { ip -n "$NS-node-$1" -o link show sd-lan | sed 's/.*link\/ether \([^ ]*\).*/\1/'; }
outside_mac_for() { ip -n "$NS-outside" neigh show "$1" | awk '{for (i = 1; i < NF; i++) if ($i == "lladdr") print $(i + 1)}'; }

lan_scenario() {
    say "8. Gateways on their own addresses: LB IPAM, ARP from one node, failover"
    local blue green i
    for i in $(seq 50); do
        blue=$(lan_address blue); green=$(lan_address green)
        [ -n "$blue" ] && [ -n "$green" ] && break
        sleep 0.2
    done
    [ -n "$blue" ] && [ -n "$green" ] || die "the pool gave no addresses (see $WORK/addresses.json)"
    echo "LoadBalancerIPPool lan gave edge/blue $blue and edge/green $green (both listen on :80)"
    local got
    for g in "blue $blue" "green $green"; do
        set -- $g
        for i in $(seq 50); do got=$(lan_get "$2"); [ "${got%% *}" = 200 ] && break; sleep 0.1; done
        echo "outside -> http://$2/ : HTTP ${got%% *}, answered by Gateway ${got#* }"
        [ "$got" = "200 $1" ] || die "$2 should reach Gateway edge/$1 (got $got)"
    done
    local leader other mac
    leader=$(lan_holder "$blue"); leader=${leader#node-}
    [ "$leader" = a ] && other=b || other=a
    mac=$(outside_mac_for "$blue")
    echo "outside's ARP: $blue is at $mac = node-$leader's sd-lan ($(lan_mac "$leader")); node-$other stays silent"
    [ "$mac" = "$(lan_mac "$leader")" ] || die "the lease holder node-$leader should answer ARP for $blue"
    echo "signet gateway status, the Gateways' addresses:"
    "$BIN/signet" gateway status --state "$WORK/state" | awk '
        /^gateways:/ {g = 1; next}
        /^[a-zA-Z]/ {g = 0}
        g && /^- namespace:/ {ns = $3}
        g && /^  name:/ {n = $2}
        g && /^  addresses:/ {a = 1; next}
        g && a && /^  - / {print "  " ns "/" n ": " $2; next}
        {a = 0}' || true

    # The backend must outlive the leader: a pod on the other node (killing an agent cuts its
    # node's pods off the mesh: strict mTLS, nothing else delivers to them).
    if [ "$other" = b ]; then lan_routes payments ledger; else lan_routes shop web; fi > "$WORK/state/lan-routes.yaml"
    sleep 2 # the agents look at the state directory every 0.5 s
    for i in $(seq 50); do
        [ "$(lan_get "$blue")" = "200 blue" ] && [ "$(lan_get "$green")" = "200 green" ] && break
        sleep 0.1
    done
    echo "routes of edge/blue and edge/green now lead to $([ "$other" = b ] && echo payments/ledger on node-b || echo shop/web on node-a)"
    sleep 1.2 # past outside's neighbour-entry lock time, so a gratuitous ARP is taken
    echo "killing node-$leader's agent (kill -9: no cleanup, its lease left to expire)"
    local start now announced="" served=""
    start=$(date +%s%N)
    kill -9 "$(cat "$WORK/agent-$leader.pid")"
    while :; do
        now=$(( ($(date +%s%N) - start) / 1000000 ))
        [ -z "$announced" ] && [ "$(outside_mac_for "$blue")" = "$(lan_mac "$other")" ] && announced=$now
        [ -n "$announced" ] && [ -z "$served" ] && [ "$(lan_get "$blue")" = "200 blue" ] && served=$now
        [ -n "$served" ] && break
        if [ "$now" -gt 10000 ]; then
            echo "outside's neighbours:"; ip -n "$NS-outside" neigh | sed 's/^/  /'
            echo "leases:"; sed 's/^/  /' "$WORK/l2-leases.json"
            echo "node-$other's agent:"; grep -E "lease|announc|ARP" "$WORK/agent-$other.log" | tail -5 | sed 's/^/  /'
            die "no failover to node-$other within 10 s (announced: ${announced:-no}; served: ${served:-no})"
        fi
        sleep 0.05
    done
    echo "failover: node-$other announced $blue after $announced ms (gratuitous ARP); the first new request after it was answered at $served ms"
    [ "$announced" -le 3000 ] || die "failover took $announced ms (bound: 3000)"
    echo "connections open to node-$leader when its agent died ended with it (its proxy held them); new ones go to node-$other"
}

case "${1:-run}" in
    up) up ;;
    down) down; echo "signet demo removed" ;;
    run)
        trap down EXIT
        up
        scenario
        say "7. signet connectivity test: the built-in suite, with workloads of its own"
        "$BIN/signet" connectivity test --topology "$WORK/topology.json"
        lan_scenario
        say "tearing down"
        ;;
    *) die "usage: demo.sh [run|up|down]" ;;
esac

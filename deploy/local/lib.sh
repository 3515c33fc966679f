# Shared by demo.sh, bench.sh and gateway-bench.sh (sourced; needs $NS, the name prefix).

node_ip() { [ "$1" = a ] && echo 10.99.0.1 || echo 10.99.0.2; }

# attach NETNS NODE HOST_IF IP: a new network namespace wired to node NODE (a or b) by a veth
# (HOST_IF on the node's side, eth0 inside), addressed IP/24 with the node at .1 as its gateway,
# and routed from the other node through the underlay.
attach() {
    local netns=$1 node=$2 host_if=$3 ip=$4 net=${4%.*} other=b
    [ "$node" = b ] && other=a
    ip netns add "$netns"
    ip -n "$netns" link set lo up
    ip -n "$NS-node-$node" link add "$host_if" type veth peer name eth0 netns "$netns"
    ip -n "$NS-node-$node" addr add "$net.1/24" dev "$host_if"
    ip -n "$NS-node-$node" link set "$host_if" up
    ip -n "$netns" addr add "$ip/24" dev eth0
    ip -n "$netns" link set eth0 up
    ip -n "$netns" route add default via "$net.1"
    ip -n "$NS-node-$other" route add "$net.0/24" via "$(node_ip "$node")"
}

# make_ca PREFIX CN: a P-256 CA, PREFIX.pem and PREFIX.key. Its extensions are those strict
# validators require of a CA (RFC 5280 4.2.1.3, 4.2.1.9): basic constraints critical, key usage
# keyCertSign and cRLSign.
make_ca() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 -subj "/CN=$2" \
        -config <(printf '[req]\ndistinguished_name = dn\n[dn]\n[ca]\n%s\n%s\n%s\n' \
            'basicConstraints = critical, CA:TRUE' \
            'keyUsage = critical, keyCertSign, cRLSign' \
            'subjectKeyIdentifier = hash') \
        -extensions ca -keyout "$1.key" -out "$1.pem" 2>/dev/null
}

# tls_secret_yaml NAMESPACE NAME PREFIX: a kubernetes.io/tls Secret of PREFIX.crt and PREFIX.key,
# as a manifest followed by `---`.
tls_secret_yaml() {
    printf 'apiVersion: v1\nkind: Secret\nmetadata: {name: %s, namespace: %s}\ntype: kubernetes.io/tls\ndata: {tls.crt: %s, tls.key: %s}\n---\n' \
        "$2" "$1" "$(base64 -w0 < "$3.crt")" "$(base64 -w0 < "$3.key")"
}

# issue_cert CA_PREFIX OUT_PREFIX HOST: a TLS server certificate for HOST signed by the CA,
# OUT_PREFIX.crt and OUT_PREFIX.key: not a CA, digitalSignature, serverAuth.
issue_cert() {
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$3" \
        -keyout "$2.key" -out "$2.csr" 2>/dev/null
    openssl x509 -req -in "$2.csr" -CA "$1.pem" -CAkey "$1.key" -CAcreateserial -days 7 \
        -extfile <(printf '%s\n' "subjectAltName = DNS:$3" 'basicConstraints = critical, CA:FALSE' \
            'keyUsage = critical, digitalSignature' 'extendedKeyUsage = serverAuth' \
            'subjectKeyIdentifier = hash' 'authorityKeyIdentifier = keyid') \
        -out "$2.crt" 2>/dev/null
}

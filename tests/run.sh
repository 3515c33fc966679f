#!/usr/bin/env bash
# Signet's whole test suite: formatting, clippy with -D warnings, and every test in the workspace.
# Installs what is missing on a fresh Debian machine first. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/struct.proto ] || missing+=(libprotobuf-dev)
command -v clang >/dev/null 2>&1 || [ -n "${BPF_CLANG:-}" ] || missing+=(clang)
[ -f /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
[ -f "/usr/include/$(uname -m)-linux-gnu/asm/types.h" ] || missing+=(linux-libc-dev)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v bpftool >/dev/null 2>&1 || [ -x /usr/sbin/bpftool ] || missing+=(bpftool)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# promtool checks the agents' /metrics exposition.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# deploy/ is validated with kubernetes-validate (PyPI) in a virtual environment.
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# ... as the kustomization renders it, with a real kustomize (kubectl's, or Debian's kubectl).
command -v kubectl >/dev/null 2>&1 || command -v kustomize >/dev/null 2>&1 || missing+=(kubernetes-client)
if [ ${#missing[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]}" >&2
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        rustup component add "$component"
    fi
done

# Builds live outside the clone so repeated runs on one machine reuse them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/signet-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log="$(mktemp)"
# Privileged tests skipped under SIGNET_SKIP_PRIVILEGED=1 return early, which the harness counts
# as passed; each writes its name here, and the closing line counts it as skipped.
skips="$(mktemp)"
trap 'rm -f "$log" "$skips"' EXIT
SIGNET_SKIP_LOG="$skips" cargo test --workspace --locked 2>&1 | tee "$log"
# The rendered kustomization against the Kubernetes OpenAPI schemas, the agents' admission
# policy through a CEL interpreter, and custom resources against their CRDs.
venv="$CARGO_TARGET_DIR/manifest-venv"
if ! "$venv/bin/python3" -c 'import kubernetes_validate, celpy' >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q kubernetes-validate cel-python
fi
"$venv/bin/python3" tests/validate_manifests.py
# The README's demo, end to end, as a smoke test (root only: it builds network namespaces).
if [ "$(id -u)" -eq 0 ]; then
    SIGNET_DEMO_NAME="signet-ci-$$" deploy/local/demo.sh 2>&1 | tail -n 25
elif [ "${SIGNET_SKIP_PRIVILEGED:-}" != 1 ]; then
    echo "tests/run.sh: the demo smoke test needs root; set SIGNET_SKIP_PRIVILEGED=1 to skip it" >&2
    exit 1
fi
# One closing line for the whole run (cargo prints one per test binary, the last often empty).
skipped=$(wc -l < "$skips")
awk -v skipped="$skipped" '/^test result:/ { p += $4; f += $6; i += $8 } END { p -= skipped; i += skipped; printf "signet: %d passed, %d failed, %d skipped\n", p, f, i; if (p == 0) exit 1 }' "$log"

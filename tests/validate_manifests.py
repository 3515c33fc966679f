#!/usr/bin/env python3
"""Validates deploy/: every Kubernetes manifest against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), and custom resources against their own
CRD's openAPIV3Schema (the IdentityPolicy examples, a SignetIdentity). Exit 1 on any failure.

    python3 tests/validate_manifests.py [--kubernetes-version 1.34]
"""
import glob
import os
import subprocess
import sys

import jsonschema
import yaml

VERSION = "1.34"
if "--kubernetes-version" in sys.argv:
    VERSION = sys.argv[sys.argv.index("--kubernetes-version") + 1]

failures = []

manifests = sorted(glob.glob("deploy/kubernetes/*.yaml")) + sorted(glob.glob("deploy/crds/*.yaml"))
manifests = [m for m in manifests if not m.endswith("kustomization.yaml")]
result = subprocess.run(
    [os.path.join(os.path.dirname(sys.executable), "kubernetes-validate"), "--strict", "--quiet", "-k", VERSION, *manifests],
    capture_output=True, text=True)
print(result.stdout, end="")
print(result.stderr, end="", file=sys.stderr)
if result.returncode != 0:
    failures.append(f"kubernetes-validate failed on {' '.join(manifests)}")

# The kustomization lists every manifest (and nothing missing).
kustomization = yaml.safe_load(open("deploy/kubernetes/kustomization.yaml"))
listed = {r.split("/")[-1] for r in kustomization["resources"]}
for m in manifests + ["deploy/gateway/gatewayclass.yaml"]:
    if m.split("/")[-1] not in listed:
        failures.append(f"{m} is not in deploy/kubernetes/kustomization.yaml")


def crd_schema(path):
    crd = yaml.safe_load(open(path))
    version = crd["spec"]["versions"][0]
    return crd["spec"]["names"]["kind"], version["schema"]["openAPIV3Schema"]


def check(kind, schema, obj, where):
    # Kubernetes adds apiVersion, kind and metadata to every CRD schema.
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    try:
        jsonschema.validate(body, {k: v for k, v in schema.items()})
    except jsonschema.ValidationError as e:
        failures.append(f"{where}: {kind} does not match its CRD: {e.message} at {list(e.absolute_path)}")


schemas = dict(crd_schema(p) for p in glob.glob("deploy/crds/*.yaml"))
checked = 0
for path in sorted(glob.glob("policies/examples/*.yaml")):
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") in schemas:
            check(doc["kind"], schemas[doc["kind"]], doc, path)
            checked += 1
sample = {"apiVersion": "signet.dev/v1alpha1", "kind": "SignetIdentity", "metadata": {"name": "256"},
          "spec": {"spiffeId": "spiffe://cluster.local/ns/shop/sa/web"}}
check("SignetIdentity", schemas["SignetIdentity"], sample, "SignetIdentity sample")
broken = {"apiVersion": "signet.dev/v1alpha1", "kind": "SignetIdentity", "metadata": {"name": "257"}, "spec": {}}
before = len(failures)
check("SignetIdentity", schemas["SignetIdentity"], broken, "SignetIdentity without spiffeId")
if len(failures) == before:
    failures.append("the SignetIdentity schema accepted an object without spec.spiffeId")
else:
    failures.pop()  # refused, as it should be

print(f"validated {len(manifests)} manifest files against Kubernetes {VERSION} and {checked + 1} custom resources against their CRDs")
for f in failures:
    print(f"FAIL: {f}", file=sys.stderr)
sys.exit(1 if failures else 0)

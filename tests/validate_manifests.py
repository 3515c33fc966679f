#!/usr/bin/env python3
"""Validates deploy/ as it is installed: the kustomization rendered by a real kustomize
(`kubectl kustomize`, or `kustomize build`), every rendered Kubernetes object against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), the rendered set against the
files (nothing missing, nothing extra), the agents' ValidatingAdmissionPolicy evaluated with a CEL
interpreter on requests it must refuse and admit, and custom resources against their own CRD's
openAPIV3Schema (the IdentityPolicy examples, a SignetIdentity). Exit 1 on any failure.

    python3 tests/validate_manifests.py [--kubernetes-version 1.34]
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import celpy
import jsonschema
import yaml

VERSION = "1.34"
if "--kubernetes-version" in sys.argv:
    VERSION = sys.argv[sys.argv.index("--kubernetes-version") + 1]

failures = []


def render(root):
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", root]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", root]
    else:
        sys.exit("validate_manifests: no kustomize (kubectl kustomize or kustomize build) found")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"validate_manifests: `{' '.join(cmd)}` failed:\n{result.stderr}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def key(doc):
    m = doc.get("metadata", {})
    return (doc.get("kind"), m.get("namespace"), m.get("name"))


rendered = render("deploy/kubernetes")
files = [f for d in ("deploy/kubernetes", "deploy/crds", "deploy/gateway")
         for f in sorted(glob.glob(f"{d}/*.yaml")) if not f.endswith("kustomization.yaml")]
in_files = {key(d) for f in files for d in yaml.safe_load_all(open(f)) if d}
in_render = {key(d) for d in rendered}
for k in sorted(in_files - in_render, key=str):
    failures.append(f"{k} is in deploy/ but not in the rendered kustomization")
for k in sorted(in_render - in_files, key=str):
    failures.append(f"{k} is rendered by the kustomization but in no file of deploy/")

# Kubernetes' own kinds against its schemas; the GatewayClass is the Gateway API's.
core = [d for d in rendered if not d["apiVersion"].startswith("gateway.networking.k8s.io/")]
with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as out:
    yaml.safe_dump_all(core, out)
result = subprocess.run(
    [os.path.join(os.path.dirname(sys.executable), "kubernetes-validate"), "--strict", "--quiet", "-k", VERSION, out.name],
    capture_output=True, text=True)
os.unlink(out.name)
print(result.stdout, end="")
print(result.stderr, end="", file=sys.stderr)
if result.returncode != 0:
    failures.append("kubernetes-validate failed on the rendered kustomization")
for gc in (d for d in rendered if d["kind"] == "GatewayClass"):
    if not gc.get("spec", {}).get("controllerName", "").startswith("signet.dev/"):
        failures.append(f"GatewayClass {gc['metadata']['name']}: controllerName is not Signet's")


def admission(policy, operation, user, name, obj=None, old=None):
    """What `policy` (a ValidatingAdmissionPolicy) answers to `user` doing `operation` on a
    SignetIdentity named `name` (`obj` and `old` as the request carries them; by default a
    well-formed one with the quarantine finalizer): None when it does not apply, else the list
    of failed messages."""
    env = celpy.Environment()
    default = {"metadata": {"name": name, "finalizers": [QUARANTINE]},
               "spec": {"spiffeId": "spiffe://cluster.local/ns/a/sa/b"}}
    ctx = {
        "request": {"operation": operation, "userInfo": {"username": user}},
        "object": None if operation == "DELETE" else (obj or default),
        "oldObject": None if operation == "CREATE" else (old or default),
    }
    run = lambda expr, c: env.program(env.compile(expr)).evaluate(celpy.json_to_cel(c))
    spec = policy["spec"]
    if not all(run(m["expression"], ctx) for m in spec.get("matchConditions", [])):
        return None
    variables = {}
    for v in spec.get("variables", []):
        variables[v["name"]] = run(v["expression"], {**ctx, "variables": variables})
    scope = {**ctx, "variables": variables}
    return [v["message"] for v in spec["validations"] if not run(v["expression"], scope)]


QUARANTINE = "signet.dev/quarantine"
AGENT = "system:serviceaccount:signet-system:signet-agent"
vaps = [d for d in rendered if d["kind"] == "ValidatingAdmissionPolicy"]
bound = {d["spec"]["policyName"] for d in rendered if d["kind"] == "ValidatingAdmissionPolicyBinding"
         and "Deny" in d["spec"]["validationActions"]}
identity_vaps = [v for v in vaps if v["metadata"]["name"] in bound and any(
    "signetidentities" in r["resources"] for r in v["spec"]["matchConstraints"]["resourceRules"])]
if not identity_vaps:
    failures.append("no bound ValidatingAdmissionPolicy denies agents' writes of SignetIdentities")
for vap in identity_vaps:
    spiffe = {"spiffeId": "spiffe://cluster.local/ns/a/sa/b"}
    live = {"metadata": {"name": "300", "finalizers": [QUARANTINE]}, "spec": spiffe}
    dying = {"metadata": {"name": "300", "finalizers": [QUARANTINE],
                          "deletionTimestamp": "2026-12-01T10:00:00Z"}, "spec": spiffe}
    lifted = {"metadata": {"name": "300", "deletionTimestamp": "2026-12-01T10:00:00Z"},
              "spec": spiffe}
    rewritten = {"metadata": {"name": "300", "deletionTimestamp": "2026-12-01T10:00:00Z"},
                 "spec": {"spiffeId": "spiffe://cluster.local/ns/x/sa/y"}}
    bare = {"metadata": {"name": "300"}, "spec": spiffe}
    cases = [  # (operation, user, name, admitted, object, old object)
        ("CREATE", AGENT, "256", True, None, None), ("CREATE", AGENT, "70000", True, None, None),
        ("DELETE", AGENT, "300", True, None, None),
        ("CREATE", AGENT, "1", False, None, None), ("CREATE", AGENT, "8", False, None, None),
        ("DELETE", AGENT, "6", False, None, None),
        ("CREATE", AGENT, "255", False, None, None), ("CREATE", AGENT, "0256", False, None, None),
        ("CREATE", AGENT, "16777216", False, None, None),
        ("CREATE", AGENT, "-300", False, None, None),
        # Without the quarantine finalizer a deleted number would be free at once.
        ("CREATE", AGENT, "300", False, bare, None),
        # The one update: lifting the quarantine of a number being deleted.
        ("UPDATE", AGENT, "300", True, lifted, dying),
        ("UPDATE", AGENT, "300", False, live, live),
        ("UPDATE", AGENT, "300", False, rewritten, dying),
        # Not an agent: the policy does not apply (the cluster admin may fix things by hand).
        ("DELETE", "kubernetes-admin", "1", True, None, None),
    ]
    for op, user, name, admitted, obj, old in cases:
        refused = admission(vap, op, user, name, obj, old) or []
        if admitted == bool(refused):
            failures.append(f"{vap['metadata']['name']}: {op} of SignetIdentity {name} by {user}: "
                            f"{'refused ' + str(refused) if refused else 'admitted'}, expected "
                            f"{'admitted' if admitted else 'refused'}")


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


schemas = dict(crd_schema(p) for p in glob.glob("deploy/crds/*.yaml") if not p.endswith("kustomization.yaml"))
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

print(f"validated {len(rendered)} rendered objects against Kubernetes {VERSION}, {len(identity_vaps)} admission policy on 15 requests, and {checked + 1} custom resources against their CRDs")
for f in failures:
    print(f"FAIL: {f}", file=sys.stderr)
sys.exit(1 if failures else 0)

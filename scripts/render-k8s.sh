#!/usr/bin/env bash
# Render the kubenix modules in nix/k8s/ into the YAML under k8s/:
#
#   KUBENIX_SRC=<hall/kubenix tree> NIXPKGS_LIB_SRC=<nix-community/nixpkgs.lib tree> \
#     scripts/render-k8s.sh [OUT_DIR]
#   scripts/render-k8s.sh --from-json JSON_DIR [OUT_DIR]
#
# The first form evaluates each module offline, without flakes, through nix/render/eval.nix (kubenix
# and nixpkgs.lib source trees as inputs only: never commit them). The second form only converts modules evaluated elsewhere (a Nix flake check):
# JSON_DIR holds base-modules.json (the file names nix/k8s/default.nix imports, as a JSON list) and,
# for each of those modules and for default.nix, loadgen.nix, keda.nix and every example-*.nix,
# <module>.json: the module's config.kubernetes.generated.
#
# OUT_DIR (default k8s/) is replaced as a whole: everything in it is generated.
#   k8s/<module>.yaml           one multi-document file per module imported by nix/k8s/default.nix
#   k8s/kustomization.yaml      those files, plus `images:` entries for our two images
#   k8s/jobs/                   the loadgen Job (nix/k8s/loadgen.nix), applied on demand
#   k8s/components/keda/        the KEDA alternative (nix/k8s/keda.nix), a kustomize Component that
#                               adds the ScaledObject and removes the adapter and the HPA
#   k8s/examples/<name>/        each nix/k8s/example-<name>.nix (the base with other module options),
#                               a kustomize Component that turns the base into that render: new
#                               objects as resources, removed ones as delete patches, changed ones as
#                               JSON patches; its kustomization.yaml records the render's digest,
#                               which the kustomize build must match (scripts/k8s_policy.py)
# Output is deterministic: keys sorted, objects in a fixed kind order, so an unchanged module renders
# to identical bytes. Needs python3 with PyYAML, and for the first form nix-instantiate (Debian: nix-bin).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python3 -c 'import yaml' 2>/dev/null || { echo "render-k8s.sh: needs python3 with PyYAML (pip install pyyaml)" >&2; exit 2; }

if [ "${1:-}" = "--from-json" ]; then
  if [ ! -f "${2:-}/base-modules.json" ]; then
    echo "render-k8s.sh: --from-json needs a directory with base-modules.json" >&2
    exit 2
  fi
  json=$(cd "$2" && pwd)
  out=${3:-$repo/k8s}
else
  out=${1:-$repo/k8s}
  if [ -z "${KUBENIX_SRC:-}" ] || [ -z "${NIXPKGS_LIB_SRC:-}" ]; then
    cat >&2 <<'EOF'
render-k8s.sh: KUBENIX_SRC and NIXPKGS_LIB_SRC must name source trees of hall/kubenix and
nix-community/nixpkgs.lib, e.g. `git archive HEAD | tar -x -C <dir>` of each snapshot.
They are inputs only: never commit them.
EOF
    exit 2
  fi
  for dir in "$KUBENIX_SRC/modules" "$NIXPKGS_LIB_SRC/lib"; do
    [ -d "$dir" ] || { echo "render-k8s.sh: $dir not found: is that the right source tree?" >&2; exit 2; }
  done
  command -v nix-instantiate >/dev/null || { echo "render-k8s.sh: needs nix-instantiate (apt-get install nix-bin)" >&2; exit 2; }

  # The image references k8s/ is rendered with; kustomization.yaml's `images:` replaces them.
  images='{ images = { worker = "celery-autoscale-app:dev"; exporter = "celery-queue-exporter:dev"; }; }'
  json=$(mktemp -d)
  trap 'rm -rf "$json"' EXIT
  # The base modules, in the order nix/k8s/default.nix imports them (the one list of them).
  nix-instantiate --eval --strict --json --argstr file "$repo/nix/k8s/default.nix" \
    -E '{ file }: map (p: baseNameOf (toString p)) (import file).imports' >"$json/base-modules.json"
  for module in $(python3 -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))))' "$json/base-modules.json") \
    default.nix loadgen.nix keda.nix $(cd "$repo/nix/k8s" && echo example-*.nix); do
    nix-instantiate --eval --strict --json \
      --arg libSrc "$(realpath "$NIXPKGS_LIB_SRC")" --arg kubenixSrc "$(realpath "$KUBENIX_SRC")" \
      --arg module "$repo/nix/k8s/$module" --arg moduleArgs "$images" \
      "$repo/nix/render/eval.nix" >"$json/${module%.nix}.json"
  done
fi

python3 - "$json" "$out" <<'PY'
import glob
import hashlib
import json
import os
import shutil
import sys

import yaml

json_dir, out = sys.argv[1], sys.argv[2]

# Objects in each file follow this kind order (dependencies first), then namespace and name.
KIND_ORDER = [
    "Namespace", "NetworkPolicy", "ServiceAccount", "Secret", "ConfigMap", "PersistentVolumeClaim",
    "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service", "StatefulSet", "Deployment",
    "Job", "PodDisruptionBudget", "HorizontalPodAutoscaler", "APIService", "ScaledObject",
]
# The base modules the KEDA component removes: KEDA owns the external metrics API and makes the HPA.
REPLACED_BY_KEDA = ["adapter", "autoscaling"]
OUR_DEPLOYMENTS = ["worker", "exporter"]  # their images are the `images` module arguments


def items(module):
    with open(os.path.join(json_dir, module + ".json")) as f:
        return json.load(f)["items"]


def key(obj):
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace") or "", meta["name"])


def order(obj):
    kind = obj["kind"]
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER),) + key(obj)


class Dumper(yaml.SafeDumper):
    pass


def str_representer(dumper, value):
    # Multi-line strings (ConfigMap files) as literal blocks, readable and diffable.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


Dumper.add_representer(str, str_representer)


def dump(documents, sort_keys=True):
    return yaml.dump_all(documents, Dumper=Dumper, sort_keys=sort_keys, default_flow_style=False,
                         allow_unicode=True, width=4096, explicit_start=True)


def header(source):
    return f"# Generated by scripts/render-k8s.sh from {source} — do not edit by hand.\n"


def write(path, text):
    full = os.path.join(out, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w", encoding="utf-8") as f:
        f.write(text)


with open(os.path.join(json_dir, "base-modules.json")) as f:
    base = [name[: -len(".nix")] for name in json.load(f)]

# The per-module files must add up to exactly what default.nix (what a flake would deploy) renders.
seen = {}
for module in base:
    for obj in items(module):
        if key(obj) in seen:
            sys.exit(f"render-k8s.sh: {key(obj)} is declared by both {seen[key(obj)]}.nix and {module}.nix")
        seen[key(obj)] = module
canonical = lambda objs: sorted(json.dumps(o, sort_keys=True) for o in objs)
union = [obj for module in base for obj in items(module)]
if canonical(union) != canonical(items("default")):
    missing = {key(o) for o in items("default")} ^ {key(o) for o in union}
    sys.exit("render-k8s.sh: the modules rendered one by one differ from nix/k8s/default.nix rendered whole"
             f" (objects only on one side: {sorted(missing) or 'none, but contents differ'})")

deployments = {o["metadata"]["name"]: o for o in union if o["kind"] == "Deployment"}
images = []
for name in OUR_DEPLOYMENTS:
    for container in deployments[name]["spec"]["template"]["spec"]["containers"]:
        image_name, sep, tag = container["image"].rpartition(":")
        if not sep or "/" in tag:
            sys.exit(f"render-k8s.sh: image {container['image']!r} has no tag")
        entry = {"name": image_name, "newTag": tag}
        if entry not in images:
            images.append(entry)

if os.path.isdir(out):
    shutil.rmtree(out)

for module in base:
    write(f"{module}.yaml", header(f"nix/k8s/{module}.nix") + dump(sorted(items(module), key=order)))
write("kustomization.yaml", header("nix/k8s/default.nix (its module list) and the image arguments") + dump([{
    "apiVersion": "kustomize.config.k8s.io/v1beta1",
    "kind": "Kustomization",
    "resources": [f"{module}.yaml" for module in base],
    "images": images,
}], sort_keys=False))

write("jobs/loadgen-burst.yaml", header("nix/k8s/loadgen.nix") + dump(sorted(items("loadgen"), key=order)))
write("jobs/kustomization.yaml", header("nix/k8s/loadgen.nix and the image arguments") + dump([{
    "apiVersion": "kustomize.config.k8s.io/v1beta1",
    "kind": "Kustomization",
    "resources": ["loadgen-burst.yaml"],
    "images": images,
}], sort_keys=False))

removed = sorted((obj for module in REPLACED_BY_KEDA for obj in items(module)), key=order)
delete_patches = []
for obj in removed:
    metadata = {"name": obj["metadata"]["name"]}
    if obj["metadata"].get("namespace"):
        metadata["namespace"] = obj["metadata"]["namespace"]
    patch = {"$patch": "delete", "apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": metadata}
    delete_patches.append({"patch": yaml.dump(patch, Dumper=Dumper, sort_keys=True, default_flow_style=False)})
# A Component, not an overlay: an overlay cannot live below its base (kustomize refuses the cycle),
# and k8s/ itself must stay the base. Enable it in k8s/kustomization.yaml:
#   cd k8s && kustomize edit add component components/keda
write("components/keda/keda.yaml", header("nix/k8s/keda.nix") + dump(sorted(items("keda"), key=order)))
write("components/keda/kustomization.yaml", header(
    "nix/k8s/keda.nix; the patches delete every object of nix/k8s/"
    + ".nix and nix/k8s/".join(REPLACED_BY_KEDA) + ".nix") + dump([{
        "apiVersion": "kustomize.config.k8s.io/v1alpha1",
        "kind": "Component",
        "resources": ["keda.yaml"],
        "patches": delete_patches,
    }], sort_keys=False))



# --- examples: each a Component turning the base into the example module's render -------------------
def pointer(path):
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def json_patch(old, new, path=()):
    """RFC 6902 operations turning `old` into `new`: maps key by key, lists of maps of the same length
    item by item (containers, ports), anything else replaced whole (args, env: order matters)."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        ops = [{"op": "remove", "path": pointer(path + (k,))} for k in sorted(old) if k not in new]
        for k in sorted(new):
            ops += json_patch(old[k], new[k], path + (k,)) if k in old else \
                [{"op": "add", "path": pointer(path + (k,)), "value": new[k]}]
        return ops
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) \
            and all(isinstance(x, dict) for x in old + new):
        return [op for i, (a, b) in enumerate(zip(old, new)) for op in json_patch(a, b, path + (i,))]
    return [{"op": "replace", "path": pointer(path), "value": new}]


def digest(objects):
    """sha256 of the objects independent of order and formatting: scripts/k8s_policy.py compares the
    kustomize build of the base with a Component against the render it was made from."""
    return hashlib.sha256(json.dumps(sorted(json.dumps(o, sort_keys=True) for o in objects)).encode()).hexdigest()


def target(obj):
    group, _, version = obj["apiVersion"].rpartition("/")
    t = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    if obj["metadata"].get("namespace"):
        t["namespace"] = obj["metadata"]["namespace"]
    return {k: v for k, v in t.items() if v}


def ops_text(ops):
    """A JSON patch as the Component carries it: YAML, or JSON when a value holds a string that ends
    in a newline (kubectl's kustomize drops that newline from a YAML block scalar in a patch, and
    the build would then differ from the render)."""
    def trailing_newline(v):
        if isinstance(v, str):
            return v.endswith("\n")
        if isinstance(v, dict):
            return any(trailing_newline(x) for x in v.values())
        return isinstance(v, list) and any(trailing_newline(x) for x in v)
    if any(trailing_newline(op.get("value")) for op in ops):
        return json.dumps(ops, indent=2, sort_keys=True) + "\n"
    return yaml.dump(ops, Dumper=Dumper, sort_keys=True, default_flow_style=False)


def delete_patch(obj):
    metadata = {"name": obj["metadata"]["name"]}
    if obj["metadata"].get("namespace"):
        metadata["namespace"] = obj["metadata"]["namespace"]
    patch = {"$patch": "delete", "apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": metadata}
    return {"patch": yaml.dump(patch, Dumper=Dumper, sort_keys=True, default_flow_style=False)}


examples = sorted(os.path.basename(p)[len("example-"):-len(".json")] for p in glob.glob(os.path.join(json_dir, "example-*.json")))
base_by_key = {key(o): o for o in union}
for example in examples:
    module = f"example-{example}"
    wanted = {key(o): o for o in items(module)}
    added = sorted((o for k, o in wanted.items() if k not in base_by_key), key=order)
    removed = sorted((o for k, o in base_by_key.items() if k not in wanted), key=order)
    changed = sorted((o for k, o in wanted.items() if k in base_by_key and o != base_by_key[k]), key=order)
    patches = [delete_patch(o) for o in removed]
    for obj in changed:
        ops = json_patch(base_by_key[key(obj)], obj)
        patches.append({"target": target(obj), "patch": ops_text(ops)})
    component = {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component"}
    if added:
        write(f"examples/{example}/{example}.yaml", header(f"nix/k8s/{module}.nix") + dump(added))
        component["resources"] = [f"{example}.yaml"]
    component["patches"] = patches
    write(f"examples/{example}/kustomization.yaml", header(
        f"nix/k8s/{module}.nix: the base (nix/k8s/default.nix) turned into that module's render")
        + f"# render-sha256: {digest(items(module))}\n" + dump([component], sort_keys=False))

print(f"render-k8s.sh: wrote {len(base)} module files, kustomization.yaml, jobs/, components/keda/ and {len(examples)} examples/ to {out}")
PY

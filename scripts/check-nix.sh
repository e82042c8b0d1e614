#!/usr/bin/env bash
# Static checks of the Nix files, the flake lock, the GitHub workflows and the shell scripts; no build,
# no network but crates.io the first time (to install the two Nix linters). scripts/test.sh runs it.
#
#   scripts/check-nix.sh
#
# 1. every .nix file parses (nix-instantiate --parse: syntax and unbound variables)
# 2. nixpkgs-fmt --check and deadnix --fail on every .nix file. Both come from crates.io: when one is
#    missing it is built once with `cargo install --locked` into $TOOLS_DIR (default
#    ~/.cache/celery-autoscale/tools, about 90 s) and reused from there. The flake runs the same
#    two tools from nixpkgs (checks.nix-format, checks.deadnix).
# 3. flake.lock matches flake.nix's inputs: a root entry and a locked github node (rev, narHash) per
#    input, the `follows` and the URLs as declared, every referenced node present. Where Nix can
#    read flakes, also `nix flake metadata --no-update-lock-file` against a throwaway store (it
#    refuses a lock that would need changes) and the lock is in the form Nix itself writes. GitHub
#    proves the pins themselves: it fetches every input by rev and narHash (docs/CI.md).
# 4. check-jsonschema --builtin-schema vendor.github-workflows on .github/workflows/*.yml, and every
#    workflow job that runs Nix evaluates the flake (`nix flake check --no-build`) first
# 5. shellcheck on every script (scripts/*.sh, scripts/control-plane/*.sh, nix/deploy-minikube.sh), when shellcheck is installed
# 6. decisions the flake must keep (issue "cluster path pre-flight"): nix2container without a
#    `follows` on nixpkgs (its skopeo builds on the nixpkgs it is tested with), the Nix formatter
#    reached only through builtins.tryEval (an archived package may become a throwing alias), and
#    scripts/test-deploy-minikube.sh: one Minikube profile for every call, the cluster's size, `-p`
#    refused, the wait until the HPA reads its metric
#
# Needs nix-instantiate (Debian: nix-bin), python3 with PyYAML, cargo (for step 2 once), check-jsonschema
# (PyPI: check-jsonschema) on PATH or in .venv/bin. Exits non-zero on any failure.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
ok() { echo "ok: $*"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# check LABEL COMMAND...: run COMMAND quietly; on failure show its output and count the failure.
check() {
  local label=$1
  shift
  if "$@" >"$tmp/check.log" 2>&1; then ok "$label"; else cat "$tmp/check.log"; fail "$label"; fi
}

command -v nix-instantiate >/dev/null || { echo "check-nix.sh: needs nix-instantiate (apt-get install nix-bin)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "check-nix.sh: needs python3" >&2; exit 2; }
# Tracked and new (not ignored) files, so a file not yet added is checked too; outside a usable git
# checkout, every .nix file but those under target/ and hidden directories.
mapfile -t nix_files < <(git ls-files --cached --others --exclude-standard -- '*.nix' 2>/dev/null ||
  find . -name '*.nix' -not -path './target/*' -not -path './.*' | sed 's|^\./||')
mapfile -t nix_files < <(printf '%s\n' "${nix_files[@]}" | sort -u | grep .)
[ ${#nix_files[@]} -gt 0 ] || { echo "check-nix.sh: no .nix files found" >&2; exit 2; }

# Parsing and pure evaluation use the store dummy://: they need neither the Nix daemon (whose socket
# Debian opens to the nix-users group only) nor write access to /nix.
echo "== 1. nix-instantiate --parse (${#nix_files[@]} files)"
parsed=yes
for file in "${nix_files[@]}"; do
  nix-instantiate --store dummy:// --parse "$file" >/dev/null 2>"$tmp/parse.log" || { cat "$tmp/parse.log"; fail "$file does not parse"; parsed=no; }
done
[ $parsed = yes ] && ok "every .nix file parses"

echo "== 2. nixpkgs-fmt and deadnix"
tools_dir=${TOOLS_DIR:-$HOME/.cache/celery-autoscale/tools}
export PATH="$tools_dir/bin:$PATH"
if ! command -v nixpkgs-fmt >/dev/null || ! command -v deadnix >/dev/null; then
  echo "installing nixpkgs-fmt and deadnix from crates.io into $tools_dir (once, about 90 s)"
  cargo install --quiet --locked --root "$tools_dir" nixpkgs-fmt deadnix ||
    fail "cargo install --locked --root $tools_dir nixpkgs-fmt deadnix"
fi
if command -v nixpkgs-fmt >/dev/null && command -v deadnix >/dev/null; then
  check "nixpkgs-fmt --check" nixpkgs-fmt --check "${nix_files[@]}"
  check "deadnix --fail" deadnix --fail "${nix_files[@]}"
fi

echo "== 3. flake.lock against flake.nix's inputs"
if nix-instantiate --store dummy:// --eval --strict --json -E '(import ./flake.nix).inputs' >"$tmp/inputs.json" 2>"$tmp/check.log"; then
  check "flake.lock locks every input of flake.nix as declared" python3 - "$tmp/inputs.json" flake.lock <<'PY'
import json
import re
import sys

inputs = json.load(open(sys.argv[1]))
lock = json.load(open(sys.argv[2]))
errors = []
nodes = lock.get("nodes", {})
if lock.get("version") != 7 or lock.get("root") not in nodes:
    errors.append("not a version 7 lock with a root node")
root = nodes.get(lock.get("root"), {}).get("inputs", {})


def resolve(ref):
    """A lock input is a node name, or a follows path from the root."""
    if isinstance(ref, str):
        return ref
    node = lock.get("root")
    for name in ref:
        node = nodes.get(node, {}).get("inputs", {}).get(name)
        node = resolve(node) if isinstance(node, list) else node
    return node


if set(root) != set(inputs):
    errors.append(f"root inputs {sorted(root)} differ from flake.nix's {sorted(inputs)}")
for name, spec in inputs.items():
    node = nodes.get(root.get(name) if isinstance(root.get(name), str) else "")
    if node is None:
        errors.append(f"input {name}: no node")
        continue
    url = spec.get("url", "")
    m = re.fullmatch(r"github:([^/]+)/([^/?]+)(?:/([^?]+))?", url)
    original = node.get("original", {})
    if not m or original != {k: v for k, v in {"type": "github", "owner": m[1], "repo": m[2], "ref": m[3]}.items() if v}:
        errors.append(f"input {name}: url {url!r} is not the locked original {original}")
    declared = {follower: target["follows"].split("/") for follower, target in spec.get("inputs", {}).items()}
    locked_follows = {k: v for k, v in node.get("inputs", {}).items() if isinstance(v, list)}
    if declared != locked_follows:
        errors.append(f"input {name}: follows {declared} in flake.nix but {locked_follows} in the lock")
for name, node in nodes.items():
    if name == lock.get("root"):
        continue
    locked = node.get("locked", {})
    if locked.get("type") != "github" or not re.fullmatch(r"[0-9a-f]{40}", locked.get("rev", "")) \
            or not re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked.get("narHash", "")):
        errors.append(f"node {name}: not a github node with a locked rev and narHash")
    for follower, ref in node.get("inputs", {}).items():
        if resolve(ref) not in nodes:
            errors.append(f"node {name}: input {follower} points to a missing node")
print("\n".join(errors) or f"{len(inputs)} inputs, {len(nodes) - 1} locked nodes")
sys.exit(1 if errors else 0)
PY
else
  cat "$tmp/check.log"
  fail "cannot read the inputs of flake.nix"
fi
# The full resolution, with Nix's own lock reader, where it reads flakes (Debian's nix-bin does).
# Only flake.nix and flake.lock are needed; the store and the registry are empty, so nothing is
# fetched: Nix fails instead if the lock does not fit the inputs.
mkdir -p "$tmp/flake" "$tmp/store"
cp flake.nix flake.lock "$tmp/flake/"
echo '{"flakes":[],"version":2}' >"$tmp/registry.json"
if NIX_CONFIG=$'experimental-features = nix-command flakes\nflake-registry = '"$tmp/registry.json" \
  nix --store "$tmp/store" flake metadata --no-update-lock-file "path:$tmp/flake" >"$tmp/metadata.log" 2>&1; then
  ok "nix flake metadata --no-update-lock-file (the lock resolves offline, no change needed)"
elif grep -q "experimental\|unrecognised\|unknown" "$tmp/metadata.log"; then
  echo "SKIPPED: this nix cannot run flake commands: $(head -1 "$tmp/metadata.log")"
else
  cat "$tmp/metadata.log"
  fail "nix flake metadata --no-update-lock-file"
fi
chmod -R u+w "$tmp/store" 2>/dev/null
# `nix flake metadata --json` prints the lock as Nix serialises it: equal to flake.lock means a
# hand-edited lock is exactly what `nix flake lock` would have written (node names included).
if [ -s "$tmp/metadata.log" ] && NIX_CONFIG=$'experimental-features = nix-command flakes\nflake-registry = '"$tmp/registry.json" \
  nix --store "$tmp/store" flake metadata --json --no-update-lock-file "path:$tmp/flake" >"$tmp/metadata.json" 2>/dev/null; then
  check "flake.lock is in Nix's own serialisation" python3 -c '
import json, sys
assert json.load(open(sys.argv[1]))["locks"] == json.load(open(sys.argv[2])), "re-serialised lock differs"
' "$tmp/metadata.json" flake.lock
fi
chmod -R u+w "$tmp/store" 2>/dev/null

echo "== 4. GitHub workflows against their JSON schema"
cjs=$(command -v check-jsonschema || echo .venv/bin/check-jsonschema)
if [ -x "$cjs" ]; then
  check "check-jsonschema --builtin-schema vendor.github-workflows" \
    "$cjs" --builtin-schema vendor.github-workflows .github/workflows/*.yml
else
  fail "check-jsonschema not found on PATH or in .venv/bin: pip install check-jsonschema"
fi

# Every job that runs Nix starts with the evaluation of every output: an evaluation error then
# shows within a minute instead of after a long build.
check "every workflow job that runs Nix starts with nix flake check --no-build" python3 - .github/workflows/*.yml <<'PY'
import sys
import yaml

errors = []
for path in sys.argv[1:]:
    for name, job in (yaml.safe_load(open(path)).get("jobs") or {}).items():
        runs = [s.get("run", "") for s in job.get("steps", []) if "run" in s]
        if any("nix " in r for r in runs) and not runs[0].startswith("nix flake check --no-build"):
            errors.append(f"{path} job {name}: first run step is {runs[0]!r}")
print("\n".join(errors))
sys.exit(1 if errors else 0)
PY

echo "== 5. shellcheck"
if command -v shellcheck >/dev/null; then
  check "shellcheck scripts/*.sh scripts/control-plane/*.sh nix/deploy-minikube.sh" shellcheck scripts/*.sh scripts/control-plane/*.sh nix/deploy-minikube.sh
else
  echo "SKIPPED: shellcheck not installed (apt-get install shellcheck)"
fi

echo "== 6. decisions the flake keeps"
# Pure evaluation of flake.nix's `inputs` (no fetching): nix2container has no follows.
check "nix2container keeps its own nixpkgs (no inputs.nixpkgs.follows)" python3 -c '
import json, sys
inputs = json.load(open(sys.argv[1]))
assert "inputs" not in inputs["nix2container"], inputs["nix2container"]
' "$tmp/inputs.json"
check "the lock gives nix2container its own nixpkgs node, not ours" python3 -c '
import json
lock = json.load(open("flake.lock"))
nodes, root = lock["nodes"], lock["nodes"][lock["root"]]["inputs"]
theirs = nodes[root["nix2container"]]["inputs"]["nixpkgs"]
assert isinstance(theirs, str) and theirs != root["nixpkgs"], theirs
assert "ref" not in nodes[theirs]["original"], nodes[theirs]["original"]
'
# Whether pkgs.nixpkgs-fmt still exists at the pinned nixpkgs cannot be read here (no nixpkgs tree
# offline): the flake must reach it only through builtins.tryEval, so that evaluation survives
# either way and checks.nix-format says what to do (docs/CI.md: proven by GitHub's first step).
check "pkgs.nixpkgs-fmt is reached only through builtins.tryEval" python3 -c '
import re
text = open("flake.nix").read()
uses = [l for l in text.splitlines() if re.search(r"pkgs\.nixpkgs-fmt\b", l) and not l.strip().startswith(("echo", "#"))]
assert uses and all("tryEval" in u for u in uses), uses
'
check "scripts/test-deploy-minikube.sh" bash scripts/test-deploy-minikube.sh

if [ $failures -gt 0 ]; then
  echo "check-nix.sh: $failures check(s) failed"
  exit 1
fi
echo "check-nix.sh: all checks passed"

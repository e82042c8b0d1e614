#!/usr/bin/env bash
# Runs nix/deploy-minikube.sh against recording stand-ins for minikube, kubectl and the image copy
# programs (no cluster can run here; scripts/kind-e2e.sh exercises a real one on GitHub), and checks
# what the script asks of them:
#   1. every minikube call carries --profile P and every kubectl call --context P (MINIKUBE_PROFILE=P)
#   2. a new cluster is started with --cpus 4 --memory 6g unless MINIKUBE_CPUS/MINIKUBE_MEMORY say otherwise
#   3. `-p`/`--profile` among the start arguments is refused with a hint, before any call
#   4. it waits for the HPA's ScalingActive condition after the APIService, and when that wait times
#      out it exits non-zero saying what to look at
#
#   scripts/test-deploy-minikube.sh        (scripts/check-nix.sh and the flake's checks run it)
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
ok() { echo "ok: $*"; }

# The stand-ins append their arguments, one call per line, to $CALLS (openssl only hands out a fixed
# password, so the test needs no openssl binary). `minikube status` says "not
# running"; `kubectl wait hpa/...` fails when HPA_NEVER_ACTIVE is set; everything else succeeds.
mkdir -p "$tmp/bin" "$tmp/manifests"
# stub NAME < BODY: an executable run by this very bash (the Nix build sandbox has no /usr/bin/env).
stub() { { printf '#!%s\n' "$BASH"; cat; } >"$tmp/bin/$1"; }
stub minikube <<'EOF'
echo "minikube $*" >>"$CALLS"
case " $* " in *" status "*) exit 1 ;; esac
exit 0
EOF
stub kubectl <<'EOF'
echo "kubectl $*" >>"$CALLS"
case " $* " in
  *" get secret "*) exit 1 ;;
  *" wait hpa/"*) [ -n "${HPA_NEVER_ACTIVE:-}" ] && exit 1 ;;
esac
exit 0
EOF
stub copy-to <<'EOF'
echo "copy-to $*" >>"$CALLS"
EOF
stub openssl <<'EOF'
echo 00112233445566778899aabbccddeeff0011223344556677
EOF
chmod +x "$tmp/bin/"*

# run NAME [ENV=VALUE…] -- [ARGS…]: run the script as the Nix wrapper (writeShellApplication) does,
# with errexit, nounset and pipefail; output in $tmp/NAME.out
run() {
  local name=$1
  shift
  local env=()
  while [ "$1" != "--" ]; do env+=("$1"); shift; done
  shift
  : >"$tmp/$name.calls"
  env PATH="$tmp/bin:$PATH" CALLS="$tmp/$name.calls" MANIFESTS="$tmp/manifests" \
    APP_IMAGE=celery-autoscale-app:abc APP_COPY_TO="$tmp/bin/copy-to" \
    EXPORTER_IMAGE=celery-queue-exporter:abc EXPORTER_COPY_TO="$tmp/bin/copy-to" "${env[@]}" \
    bash -o errexit -o nounset -o pipefail "$repo/nix/deploy-minikube.sh" "$@" >"$tmp/$name.out" 2>&1
}

# 1, 2 and the order of 4
if run profile MINIKUBE_PROFILE=demo -- --driver=docker; then
  ok "deploy-minikube.sh runs to the end against the stand-ins"
else
  cat "$tmp/profile.out"
  fail "deploy-minikube.sh failed against the stand-ins"
fi
calls=$tmp/profile.calls
if ! grep -q '^minikube ' "$calls" || ! grep -q '^kubectl ' "$calls"; then
  fail "no minikube or kubectl call was recorded"
fi
if grep '^minikube ' "$calls" | grep -v '^minikube --profile demo ' | grep -q .; then
  grep '^minikube ' "$calls" | grep -v '^minikube --profile demo '
  fail "a minikube call without --profile demo"
else
  ok "every minikube call carries --profile demo ($(grep -c '^minikube ' "$calls") calls)"
fi
if grep '^kubectl ' "$calls" | grep -v '^kubectl --context demo ' | grep -q .; then
  grep '^kubectl ' "$calls" | grep -v '^kubectl --context demo '
  fail "a kubectl call without --context demo"
else
  ok "every kubectl call carries --context demo ($(grep -c '^kubectl ' "$calls") calls)"
fi
if grep -qx 'minikube --profile demo start --cpus 4 --memory 6g --cni=calico --addons=metrics-server --driver=docker' "$calls"; then
  ok "a new cluster starts with --cpus 4 --memory 6g and the given arguments"
else
  grep ' start ' "$calls"
  fail "minikube start is not sized --cpus 4 --memory 6g"
fi
apiservice=$(grep -n 'wait --for=condition=Available apiservice/' "$calls" | cut -d: -f1)
hpa=$(grep -n 'wait hpa/worker --for=condition=ScalingActive --timeout=300s' "$calls" | cut -d: -f1)
if [ -n "$apiservice" ] && [ -n "$hpa" ] && [ "$hpa" -gt "$apiservice" ]; then
  ok "it waits for the HPA's ScalingActive condition after the APIService"
else
  fail "no wait for hpa/worker ScalingActive after the APIService"
fi

run sized MINIKUBE_CPUS=6 MINIKUBE_MEMORY=8g -- || true
if grep -q '^minikube --profile minikube start --cpus 6 --memory 8g ' "$tmp/sized.calls"; then
  ok "MINIKUBE_CPUS / MINIKUBE_MEMORY override the size; the profile defaults to minikube"
else
  fail "MINIKUBE_CPUS=6 MINIKUBE_MEMORY=8g were not used"
fi

# 3
for arg in "-p" "-pother" "--profile" "--profile=other"; do
  if run refused -- "$arg" other; then
    fail "$arg was accepted"
  elif [ -s "$tmp/refused.calls" ]; then
    fail "$arg: calls were made before refusing"
  elif ! grep -q 'MINIKUBE_PROFILE=<name>' "$tmp/refused.out"; then
    cat "$tmp/refused.out"
    fail "$arg: the refusal does not name MINIKUBE_PROFILE"
  else
    ok "$arg is refused with the MINIKUBE_PROFILE hint, before any call"
  fi
done

# 4, the failure path
if run stuck HPA_NEVER_ACTIVE=1 HPA_WAIT=5s -- ; then
  fail "a HPA that never reads its metric was reported as ready"
elif grep -q 'describe hpa worker' "$tmp/stuck.out" && grep -q 'HPA_WAIT' "$tmp/stuck.out" &&
  grep -q -- '--timeout=5s' "$tmp/stuck.calls"; then
  ok "a HPA without its metric ends the script non-zero, saying what to look at"
else
  cat "$tmp/stuck.out"
  fail "the HPA wait's failure message or HPA_WAIT is missing"
fi

if [ $failures -gt 0 ]; then
  echo "test-deploy-minikube.sh: $failures check(s) failed"
  exit 1
fi
echo "test-deploy-minikube.sh: all checks passed"

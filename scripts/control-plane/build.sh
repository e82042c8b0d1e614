#!/usr/bin/env bash
# Builds the upstream control plane the local Kubernetes test runs, from the Go module proxy,
# pinned by the go.mod/go.sum files under tools/:
#   tools/k8s      kube-apiserver kube-controller-manager kube-scheduler kubectl (k8s.io/kubernetes)
#                  + pod-runner (ours: the node that turns pods into local processes, client-go)
#   tools/etcd     etcd (go.etcd.io/etcd/server/v3)
#   tools/adapter  adapter (sigs.k8s.io/prometheus-adapter)
# Output: $CACHE/bin, CACHE=${XDG_CACHE_HOME:-~/.cache}/celery-autoscale/control-plane/<hash of
# tools/>. A second run with the same tools/ finds the binaries there and returns at once.
# Prints the bin directory on stdout (last line); progress goes to stderr.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SELF=$ROOT/scripts/control-plane/build.sh
TOOLS=$ROOT/tools
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

command -v go >/dev/null || { echo "build.sh: go is not on PATH; install Go >= 1.26 (the tools modules need it)" >&2; exit 1; }

# Key: every file of the tools modules (go.mod, go.sum, our pod-runner source) and this script.
KEY=$( (cd "$TOOLS" && find . -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) | LC_ALL=C sort | xargs sha256sum; \
        sha256sum "$SELF" | cut -d' ' -f1; go env GOVERSION) | sha256sum | cut -c1-16)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/celery-autoscale/control-plane/$KEY
BIN=$CACHE/bin
WANT=(kube-apiserver kube-controller-manager kube-scheduler kubectl pod-runner etcd adapter)

have_all() { for b in "${WANT[@]}"; do [[ -x $BIN/$b ]] || return 1; done; }
if have_all; then
  echo "control plane: cached in $BIN" >&2
  echo "$BIN"; exit 0
fi

K8S_VERSION=$(sed -n 's/^\s*k8s.io\/kubernetes \(v[0-9.]*\).*/\1/p' "$TOOLS/k8s/go.mod" | head -1)
ETCD_VERSION=$(sed -n 's/^\s*go.etcd.io\/etcd\/server\/v3 \(v[0-9.]*\).*/\1/p' "$TOOLS/etcd/go.mod" | head -1)
ADAPTER_VERSION=$(sed -n 's/^\s*sigs.k8s.io\/prometheus-adapter \(v[0-9.]*\).*/\1/p' "$TOOLS/adapter/go.mod" | head -1)
echo "control plane: building kubernetes $K8S_VERSION, etcd $ETCD_VERSION, prometheus-adapter $ADAPTER_VERSION into $BIN (cold: about 18 min on 2 cores)" >&2
TMP=$CACHE/tmp.$$
mkdir -p "$TMP"
trap 'rm -rf "$TMP"' EXIT
start=$SECONDS

minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
V=k8s.io/component-base/version
CV=k8s.io/client-go/pkg/version
date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LDFLAGS="-s -w"
for p in $V $CV; do
  LDFLAGS+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=$date"
done
(cd "$TOOLS/k8s" && go build -trimpath -ldflags "$LDFLAGS" -o "$TMP/" \
   k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
   k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl ./pod-runner)
echo "control plane: kubernetes built at +$((SECONDS - start)) s" >&2
(cd "$TOOLS/etcd" && go build -trimpath -ldflags "-s -w" -o "$TMP/etcd" go.etcd.io/etcd/server/v3)
echo "control plane: etcd built at +$((SECONDS - start)) s" >&2
(cd "$TOOLS/adapter" && go build -trimpath -ldflags "-s -w" -o "$TMP/adapter" sigs.k8s.io/prometheus-adapter/cmd/adapter)
echo "control plane: prometheus-adapter built at +$((SECONDS - start)) s" >&2
rm -rf "$BIN"
mv "$TMP" "$BIN"
trap - EXIT
# Builds of other tools/ revisions are ~0.5 GB each: keep only this one.
find "$(dirname "$CACHE")" -mindepth 1 -maxdepth 1 -type d ! -name "$KEY" -exec rm -rf {} +
echo "control plane: built in $((SECONDS - start)) s" >&2
echo "$BIN"

#!/usr/bin/env bash
# The autoscaling loop end to end on a KinD cluster: build and load the two images, apply k8s/ with
# those images' tags, queue the loadgen burst (400 CPU-bound tasks) and assert that the HPA scales the
# workers up to ≥ 5 and back to 1, each within a bound derived from the policy (below), and that every
# task succeeded. .github/workflows/integration.yml runs it; locally:
#
#   nix shell --inputs-from . nixpkgs#kind nixpkgs#kubectl --command scripts/kind-e2e.sh
#
# Needs nix (flakes), docker, kind ≥ 0.24 (its kindnet enforces NetworkPolicies, so the policies in
# k8s/network-policy.yaml are exercised too) and kubectl. KIND_CLUSTER names the cluster (default
# celery-autoscale-e2e; an existing one is reused); KEEP_CLUSTER=1 keeps it afterwards. Nothing is
# pulled but the cluster's own images and the pinned third-party images in k8s/.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

cluster=${KIND_CLUSTER:-celery-autoscale-e2e}
ns=celery-autoscale
context=kind-$cluster
metric_path="/apis/external.metrics.k8s.io/v1beta1/namespaces/$ns/celery_queue_depth?labelSelector=queue%3Dcelery"

# ---- Bounds, from the policy (nix/k8s/scaling-policy.nix) and the metric pipeline ---------------------
# Pipeline, from the queue changing to an HPA sync acting on it:
#   exporter poll, --interval 5 (nix/k8s/exporter.nix)                          ≤  5 s
#   Prometheus scrape of the exporter, scrape_interval 5s (files/prometheus.yml)   ≤  5 s
#   prometheus-adapter: it queries Prometheus on each request, no cache           ~  0 s
#   the HPA's next sync (sync period 15 s)                                          ≤ 15 s
#                                                                                  = 25 s
# Scale-up. AverageValue 10: 400 tasks / 10 = 40 desired, capped at maxReplicas 20. scaleUp allows
# +200 % per 15 s: from 1, ceil(1·3) = 3, then ceil(3·3) = 9, then min(27, 20) = 20. So ≥ 5 at the
# 2nd sync that sees the queue. The policy period equals the sync period, so the 1st sync's scale
# event may still count at the 2nd and hold it at 3 (docs/hpa-algorithm.md §1.9): worst case the 3rd.
#   Job pod start and the enqueue (local image, one LPUSH per 500 tasks)   ≤ 30 s
#   + pipeline up to the 1st sync (1 → 3)                                  ≤ 25 s
#   + 2 more syncs (3 → 3 → 9)                                             = 30 s
#                                                                          = 85 s → bound 120 s
# Ready pods: + scheduling, container start and the readiness probe (5 s period): bound 180 s.
UP_BOUND=120
READY_BOUND=180
# The loadgen Job ends itself after activeDeadlineSeconds 600 (nix/k8s/loadgen.nix): + 60 s slack.
JOB_BOUND=660
# Scale-down, counted from the Job's completion (with --wait it completes when every task has
# finished, so the list is empty by then):
#   pipeline up to the 1st sync that sees 0 (call it T0)                       ≤ 25 s
#   scaleDown stabilizationWindowSeconds 60: the earlier, higher recommendations hold the count
#   until they are older than 60 s: T0 + 45 s, or T0 + 60 s when one exactly 60 s old still counts
#   scaleDown Percent 50 per 30 s, truncated: 20 → 10 → 5 → 2 → 1 (int(5 · 0.5) = 2); after the
#   first step, one step per 30 s, or 45 s when an event exactly 30 s old still counts
#   worst: 25 + 60 + 3 · 45 = 220 s (strict, exact ticks: 25 + 45 + 3 · 30 = 160 s) → bound 280 s
DOWN_BOUND=280

log() { printf '%s kind-e2e: %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { log "FAILED: $*" >&2; exit 1; }
k() { kubectl --context "$context" "$@"; }
# poll SECONDS WHAT COMMAND…: run COMMAND every 2 s until it succeeds; fail after SECONDS.
poll() {
  local timeout=$1 what=$2 deadline=$((SECONDS + $1))
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "no $what within ${timeout}s"
    sleep 2
  done
  log "$what"
}

for tool in nix docker kind kubectl openssl; do
  command -v "$tool" >/dev/null || fail "$tool is not on PATH (see the header of $0)"
done

work="" overlay=""
diagnostics() {
  log "diagnostics"
  k -n "$ns" describe hpa worker || true
  k -n "$ns" get deployments,statefulsets,jobs,pods -o wide || true
  k -n "$ns" get events --sort-by=.lastTimestamp || true
  k describe apiservice v1beta1.external.metrics.k8s.io || true
  echo "--- GET $metric_path"; k get --raw "$metric_path" || true; echo
  for app in prometheus-adapter exporter worker loadgen redis prometheus; do
    echo "--- logs of app.kubernetes.io/name=$app"
    k -n "$ns" logs -l "app.kubernetes.io/name=$app" --all-containers --prefix --tail=80 --max-log-requests=25 || true
  done
}
finish() {
  local rc=$?
  if ((rc != 0)) && kind get clusters 2>/dev/null | grep -qx "$cluster"; then diagnostics; fi
  rm -rf ${work:+"$work"} ${overlay:+"$overlay"}
  if [[ ${KEEP_CLUSTER:-} != 1 ]] && kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap finish EXIT

# ---- 1. The images, tagged with their Nix hashes ---------------------------------------------------
log "building the images"
nix build --no-link .#images
app_image="celery-autoscale-app:$(nix eval --raw .#image-app.imageTag)"
exporter_image="celery-queue-exporter:$(nix eval --raw .#image-exporter.imageTag)"

# ---- 2. The cluster --------------------------------------------------------------------------------
# One node, kind's defaults otherwise. In particular kube-controller-manager keeps the default
# --horizontal-pod-autoscaler-sync-period of 15 s: the policy's periods and window (15/30/60 s) and
# the replica's test vectors (docs/hpa-algorithm.md §2) assume 15 s ticks, and the bounds above
# count in them.
work=$(mktemp -d "${TMPDIR:-/tmp}/kind-e2e.XXXXXX")
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  log "reusing the kind cluster $cluster"
else
  cat >"$work/kind.yaml" <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
KIND
  kind create cluster --name "$cluster" --config "$work/kind.yaml" --wait 180s
fi

# skopeo writes a docker-archive (never over an existing file: $work is fresh), kind loads it.
load_image() { # load_image FLAKE_ATTR NAME:TAG
  nix run ".#$1.copyTo" -- "docker-archive:$work/$1.tar:$2"
  kind load image-archive "$work/$1.tar" --name "$cluster"
}
load_image image-app "$app_image"
load_image image-exporter "$exporter_image"

# ---- 3. k8s/, with the loaded tags: a kustomize overlay over k8s/ and k8s/jobs. It sits in the
#         repository's ignored .tmp/, because kustomize resolves a base by a relative path -----------
mkdir -p "$repo/.tmp"
overlay=$(mktemp -d "$repo/.tmp/kind-e2e.XXXXXX")
for part in base jobs; do
  mkdir -p "$overlay/$part"
  base=../../../k8s
  [[ $part == base ]] || base=../../../k8s/jobs
  cat >"$overlay/$part/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $base
images:
  - name: celery-autoscale-app
    newTag: "${app_image#*:}"
  - name: celery-queue-exporter
    newTag: "${exporter_image#*:}"
YAML
done
k -n "$ns" get job loadgen-burst >/dev/null 2>&1 && k -n "$ns" delete job loadgen-burst --wait=true
k kustomize "$overlay/jobs" | grep -q -- '- --wait' ||
  fail "the loadgen Job (nix/k8s/loadgen.nix) lacks --wait: it would complete before its tasks, and the scale-down bound counts from its completion"

k apply -f k8s/namespace.yaml
k -n "$ns" get secret redis-auth >/dev/null 2>&1 ||
  k -n "$ns" create secret generic redis-auth --from-literal=password="$(openssl rand -hex 24)"
k apply -k "$overlay/base"
for workload in $(k -n "$ns" get deployments,statefulsets -o name); do
  k -n "$ns" rollout status "$workload" --timeout=300s
done

# ---- 4. The metric path works before any load ------------------------------------------------------
metric_items() { k get --raw "$metric_path" | grep -o '"metricName"' | wc -l; }
one_item() { [[ $(metric_items) -eq 1 ]]; }
poll 180 "APIService v1beta1.external.metrics.k8s.io Available" \
  k wait --for=condition=Available apiservice/v1beta1.external.metrics.k8s.io --timeout=5s
# The adapter serves a series once it has seen it (--metrics-relist-interval=1m) after Prometheus
# has scraped the exporter: ≤ 60 s + 5 s, plus slack.
poll 180 "celery_queue_depth{queue=celery} served as exactly one External metric item" one_item
k -n "$ns" wait hpa/worker --for=condition=ScalingActive --timeout=120s
at_one_replica() { [[ $(k -n "$ns" get deployment worker -o jsonpath='{.spec.replicas}') == 1 ]]; }
poll 60 "worker Deployment at 1 replica before the load" at_one_replica

# ---- 5. The burst, and the HPA's answer ------------------------------------------------------------
k apply -k "$overlay/jobs"
start=$SECONDS
t_up="" t_ready="" t_done="" peak=0 last=""
while :; do
  now=$((SECONDS - start))
  read -r replicas ready <<<"$(k -n "$ns" get deployment worker -o jsonpath='{.spec.replicas} {.status.readyReplicas}' || true)"
  [[ -n $replicas ]] || { sleep 2; continue; } # a failed API call: ask again
  ready=${ready:-0}
  job=$(k -n "$ns" get job loadgen-burst -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{end}' || true)
  queue=$(k get --raw "$metric_path" 2>/dev/null | grep -o '"value":"[^"]*"' | cut -d'"' -f4 || true)
  state="replicas=$replicas ready=$ready queue=${queue:-?} job=${job:-running}"
  [[ $state == "$last" ]] || log "t+${now}s $state"
  last=$state
  ((replicas > peak)) && peak=$replicas

  if [[ -z $t_up ]]; then
    if ((replicas >= 5)); then t_up=$now; log "≥ 5 replicas after ${now}s (bound ${UP_BOUND}s)"; fi
    ((now <= UP_BOUND)) || [[ -n $t_up ]] || fail "the HPA did not reach 5 replicas within ${UP_BOUND}s"
  fi
  if [[ -z $t_ready ]]; then
    if ((ready >= 5)); then t_ready=$now; log "≥ 5 ready workers after ${now}s (bound ${READY_BOUND}s)"; fi
    ((now <= READY_BOUND)) || [[ -n $t_ready ]] || fail "fewer than 5 workers were ready within ${READY_BOUND}s"
  fi
  case $job in
    *Failed*) fail "the loadgen Job failed: not every task ended SUCCESS (see its log below)" ;;
    *Complete*)
      if [[ -z $t_done ]]; then
        # backoffLimit 2 would let a retry (which sends the burst again) hide a failed first run.
        [[ $(k -n "$ns" get job loadgen-burst -o jsonpath='{.status.failed}') =~ ^0?$ ]] ||
          fail "a loadgen pod failed (not every task ended SUCCESS) before a retry completed the Job"
        t_done=$now
        log "loadgen Job complete after ${now}s: every task SUCCESS"
      fi
      ;;
  esac
  [[ -n $t_done ]] || ((now <= JOB_BOUND)) || fail "the loadgen Job did not complete within ${JOB_BOUND}s"

  if [[ -n $t_done && -n $t_up && -n $t_ready ]]; then
    if ((replicas == 1)); then
      log "back to 1 replica $((now - t_done))s after the queue drained (bound ${DOWN_BOUND}s; peak $peak)"
      break
    fi
    ((now - t_done <= DOWN_BOUND)) || fail "not back to 1 replica within ${DOWN_BOUND}s of the Job's completion"
  fi
  sleep 2
done
k -n "$ns" logs job/loadgen-burst --tail=20
log "passed: up to ≥ 5 in ${t_up}s, ≥ 5 ready in ${t_ready}s, peak $peak, Job done at ${t_done}s, back to 1 at ${now}s"

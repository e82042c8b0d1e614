# shellcheck shell=bash
# `nix run .#deploy-minikube [-- MINIKUBE_START_ARGS…]`: the whole system on Minikube, with the
# images and the manifests of this checkout. Safe to run again: every step checks or converges.
# The Nix wrapper (nix/deploy-minikube.nix) sets MANIFESTS (the rendered k8s/ tree, image tags
# included), APP_IMAGE / EXPORTER_IMAGE (name:tag) and APP_COPY_TO / EXPORTER_COPY_TO (the images'
# nix2container copyTo programs).
#
# Settings (environment):
#   MINIKUBE_PROFILE  the Minikube profile, and so the kubectl context, of every call (minikube)
#   MINIKUBE_CPUS     CPUs of a new cluster (4)
#   MINIKUBE_MEMORY   memory of a new cluster (6g)
#   HPA_WAIT          how long to wait until the HPA reads its metric (300s)
# Why 4 CPUs: the HPA may run 20 workers at 100m requested each (2 CPUs), the rest of the stack
# requests about 0.3 CPU, and the control plane, Calico and metrics-server about 1.1. With
# Minikube's default 2 CPUs only 5 or 6 workers schedule during the burst and the rest stay
# Pending, which is not the story the demo is meant to show.
namespace=celery-autoscale
profile=${MINIKUBE_PROFILE:-minikube}
cpus=${MINIKUBE_CPUS:-4}
memory=${MINIKUBE_MEMORY:-6g}
hpa_wait=${HPA_WAIT:-300s}

# One profile for every call: a `-p` among the start arguments would start one cluster while the
# images and manifests went to another.
for arg in "$@"; do
  case $arg in
    -p | -p* | --profile | --profile=*)
      echo "deploy-minikube: set the profile with MINIKUBE_PROFILE=<name> instead of $arg" \
        "(every minikube and kubectl call here uses that one profile)" >&2
      exit 2
      ;;
  esac
done
minikube() { command minikube --profile "$profile" "$@"; }
kubectl() { command kubectl --context "$profile" "$@"; } # Minikube names the context after the profile

# 1. The cluster. Calico enforces the NetworkPolicies (nix/k8s/network-policy.nix); Minikube's
#    default CNI accepts them and ignores them. metrics-server as the seed had it (kubectl top).
if minikube status >/dev/null 2>&1; then
  echo "deploy-minikube: Minikube profile $profile is running; keeping it as it is"
  if ! kubectl -n kube-system get daemonset calico-node >/dev/null 2>&1; then
    echo "deploy-minikube: warning: no Calico here, so the NetworkPolicies are not enforced" \
      "(recreate with: minikube delete -p $profile && nix run .#deploy-minikube)" >&2
  fi
  allocatable=$(kubectl get nodes -o jsonpath='{.items[0].status.allocatable.cpu}' 2>/dev/null || true)
  if [[ $allocatable =~ ^[0-9]+$ ]] && ((allocatable < cpus)); then
    echo "deploy-minikube: warning: this cluster has $allocatable CPUs, fewer than $cpus: part of the" \
      "20 workers will stay Pending (recreate with: minikube delete -p $profile && nix run .#deploy-minikube)" >&2
  fi
else
  minikube start --cpus "$cpus" --memory "$memory" --cni=calico --addons=metrics-server "$@"
fi
minikube addons enable metrics-server >/dev/null

# 2. The namespace, then the Redis password: generated once and never overwritten, so Redis's
#    data and every client keep working across runs. Hex, because it is embedded in redis:// URLs.
kubectl apply -f "$MANIFESTS/namespace.yaml"
if kubectl -n "$namespace" get secret redis-auth >/dev/null 2>&1; then
  echo "deploy-minikube: Secret redis-auth exists; keeping it"
else
  kubectl -n "$namespace" create secret generic redis-auth --from-literal=password="$(openssl rand -hex 24)"
fi

# 3. The images, through a docker-archive (works with every Minikube driver and runtime). The tag
#    is the image's Nix hash, so a changed image changes the pod template and rolls the pods.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
load() { # load NAME:TAG COPY_TO_PROGRAM
  if minikube image ls | grep -qx "docker.io/library/$1"; then
    echo "deploy-minikube: $1 is already loaded"
  else
    "$2" "docker-archive:$tmp/${1%%:*}.tar:$1" # skopeo never overwrites: a fresh file each run
    minikube image load "$tmp/${1%%:*}.tar"
  fi
}
load "$APP_IMAGE" "$APP_COPY_TO"
load "$EXPORTER_IMAGE" "$EXPORTER_COPY_TO"

# 4. Everything else, then wait until it runs and the HPA's metric API answers.
kubectl apply -k "$MANIFESTS"
for workload in $(kubectl -n "$namespace" get deployments,statefulsets -o name); do
  kubectl -n "$namespace" rollout status "$workload" --timeout=300s
done
kubectl wait --for=condition=Available apiservice/v1beta1.external.metrics.k8s.io --timeout=180s

# 5. Wait until the HPA has read its metric: ScalingActive=True is set by the first sync that got a
#    value for celery_queue_depth (docs/hpa-algorithm.md §1.4). The APIService being Available is
#    not enough: the adapter lists its series once a minute, and until then the HPA shows
#    <unknown> and FailedGetExternalMetric, so a burst started right away would not scale yet.
echo "deploy-minikube: waiting up to $hpa_wait for the HPA to read celery_queue_depth"
if ! kubectl -n "$namespace" wait hpa/worker --for=condition=ScalingActive --timeout="$hpa_wait"; then
  cat >&2 <<STUCK
deploy-minikube: the HPA has not read its metric within $hpa_wait (HPA_WAIT). Look at, in order:
  kubectl -n $namespace describe hpa worker        # the events say which step fails
  kubectl get --raw "/apis/external.metrics.k8s.io/v1beta1/namespaces/$namespace/celery_queue_depth?labelSelector=queue%3Dcelery"
                                                   # one item expected; empty items = no series in Prometheus
  kubectl -n $namespace logs deploy/prometheus-adapter
  kubectl -n $namespace logs deploy/exporter       # is the exporter reaching Redis?
(all with --context $profile). README "Troubleshooting" explains each answer.
STUCK
  exit 1
fi

cat <<NEXT

celery-autoscale runs on Minikube ($APP_IMAGE, $EXPORTER_IMAGE).

Watch the autoscaler (kubectl's context: $profile):
  kubectl -n $namespace get hpa worker -w
The metric it reads (one item once Prometheus has scraped the exporter and the adapter relisted):
  kubectl get --raw "/apis/external.metrics.k8s.io/v1beta1/namespaces/$namespace/celery_queue_depth?labelSelector=queue%3Dcelery"
Queue a burst of 400 CPU-bound tasks with the loadgen Job (these manifests carry the loaded tags;
the committed k8s/jobs names the tag dev, which is not loaded here):
  kubectl -n $namespace delete job loadgen-burst --ignore-not-found && kubectl apply -k $MANIFESTS/jobs
or from this machine, through a port-forward:
  kubectl -n $namespace port-forward svc/redis 6379:6379 &
  export BROKER_URL="redis://:\$(kubectl -n $namespace get secret redis-auth -o jsonpath='{.data.password}' | base64 -d)@127.0.0.1:6379/0"
  nix run .#loadgen -- burst --n 400
NEXT

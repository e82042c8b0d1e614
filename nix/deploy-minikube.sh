# shellcheck shell=bash
# `nix run .#deploy-minikube [-- MINIKUBE_START_ARGS…]`: the whole system on Minikube, with the
# images and the manifests of this checkout. Safe to run again: every step checks or converges.
# The Nix wrapper (nix/deploy-minikube.nix) sets MANIFESTS (the rendered k8s/ tree, image tags
# included), APP_IMAGE / EXPORTER_IMAGE (name:tag) and APP_COPY_TO / EXPORTER_COPY_TO (the images'
# nix2container copyTo programs).
namespace=celery-autoscale
kubectl() { command kubectl --context minikube "$@"; }

# 1. The cluster. Calico enforces the NetworkPolicies (nix/k8s/network-policy.nix); Minikube's
#    default CNI accepts them and ignores them. metrics-server as the seed had it (kubectl top).
if minikube status >/dev/null 2>&1; then
  echo "deploy-minikube: Minikube is running; keeping it as it is"
  if ! kubectl -n kube-system get daemonset calico-node >/dev/null 2>&1; then
    echo "deploy-minikube: warning: no Calico here, so the NetworkPolicies are not enforced" \
      "(recreate with: minikube delete && nix run .#deploy-minikube)" >&2
  fi
else
  minikube start --cni=calico --addons=metrics-server "$@"
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

cat <<NEXT

celery-autoscale runs on Minikube ($APP_IMAGE, $EXPORTER_IMAGE).

Watch the autoscaler:
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

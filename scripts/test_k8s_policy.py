#!/usr/bin/env python3
"""Tests of scripts/k8s_policy.py: every check passes on the committed render (the good objects) and
reports a failure on a copy with one defect (a bad object). Run from scripts/check-k8s.sh:

    python3 -m unittest discover -s scripts -p 'test_k8s_policy.py'

The kustomize builds of check-k8s.sh step 4 are modelled from the manifests here (the real builds are
checked against the render by check_builds in check-k8s.sh itself), so these tests need only PyYAML.
A new check in k8s_policy.CHECKS needs a bad case in BAD_CASES: test_every_check_has_a_bad_case says so.
"""
import copy
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import k8s_policy as policy  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTER_ONLY = {("HorizontalPodAutoscaler", "worker"), ("APIService", "v1beta1.external.metrics.k8s.io"),
                ("Deployment", "prometheus-adapter")}


def with_component(repo, base, example):
    """A model of `kustomize build` of k8s/ with k8s/examples/<example>: its resources added, delete
    patches removing objects, JSON patches (add/remove/replace, the ops render-k8s.sh writes) applied."""
    component = policy.parse_yaml(repo.texts[f"k8s/examples/{example}/kustomization.yaml"])[0]
    objects = copy.deepcopy(base)
    for f in component.get("resources", []):
        objects += copy.deepcopy(repo.manifests[f"k8s/examples/{example}/{f}"])
    for entry in component["patches"]:
        patch = policy.parse_yaml(entry["patch"])[0]
        if isinstance(patch, dict):  # $patch: delete
            objects = [o for o in objects if (o["kind"], o["metadata"]["name"]) != (patch["kind"], patch["metadata"]["name"])]
            continue
        (target,) = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (entry["target"]["kind"], entry["target"]["name"])]
        for op in patch:
            keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
            parent = target
            for k in keys[:-1]:
                parent = parent[int(k)] if isinstance(parent, list) else parent[k]
            last = int(keys[-1]) if isinstance(parent, list) else keys[-1]
            if op["op"] == "remove":
                del parent[last]
            else:
                parent[last] = op["value"]
    return objects


def load_good():
    repo = policy.load_repo(REPO)
    base = copy.deepcopy(repo.base)
    repo.built = {
        "base.yaml": base,
        "jobs.yaml": copy.deepcopy(repo.job_objects),
        "keda.yaml": [o for o in base if (o["kind"], o["metadata"]["name"]) not in ADAPTER_ONLY]
        + copy.deepcopy(repo.keda_objects),
    }
    for example in repo.examples:
        repo.built[f"example-{example}.yaml"] = with_component(repo, base, example)
    return repo


GOOD = load_good()


def obj(repo, kind, name):
    (found,) = [o for o in repo.everything if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def first_container(repo, kind, name):
    return obj(repo, kind, name)["spec"]["template"]["spec"]["containers"][0]


# --- one defect per check: (check, what the defect is, how to make it, a word of the expected message) ---
def header_removed(r):
    r.texts["k8s/worker.yaml"] = r.texts["k8s/worker.yaml"].split("\n", 1)[1]


def secret_committed(r):
    r.manifests["k8s/redis.yaml"].append({"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "redis-auth", "namespace": policy.NAMESPACE, "annotations": {"kubenix/k8s-version": "1.34"}}})


def worker_runs_as_root(r):
    first_container(r, "Deployment", "worker").setdefault("securityContext", {})["runAsNonRoot"] = False


def third_party_image_unpinned(r):
    first_container(r, "StatefulSet", "redis")["image"] = "docker.io/library/redis:latest"


def redis_conf_drifted(r):
    r.files["redis.conf"] += "\n# edited after the render\n"


def worker_replicas_fixed(r):
    obj(r, "Deployment", "worker")["spec"]["replicas"] = 3


def exporter_scaled_out(r):
    obj(r, "Deployment", "exporter")["spec"]["replicas"] = 2


def loadgen_does_not_wait(r):
    c = first_container(r, "Job", "loadgen-burst")
    c["args"] = [a for a in c["args"] if a != "--wait"]


def hpa_max_changed(r):
    obj(r, "HorizontalPodAutoscaler", "worker")["spec"]["maxReplicas"] = 30


def apiservice_wrong_port(r):
    obj(r, "APIService", "v1beta1.external.metrics.k8s.io")["spec"]["service"]["port"] = 444


def auth_delegator_unbound(r):
    for o in r.everything:
        if o["kind"] == "ClusterRoleBinding" and o["roleRef"]["name"] == "system:auth-delegator":
            o["subjects"] = []


def keda_build_keeps_hpa(r):
    r.built["keda.yaml"].append(copy.deepcopy(obj(r, "HorizontalPodAutoscaler", "worker")))


def base_build_lost_object(r):
    r.built["base.yaml"].pop()


def worker_service_hides_unready(r):
    for o in r.base:
        if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None":
            o["spec"].pop("publishNotReadyAddresses", None)


def allow_all_policy(r):
    r.manifests["k8s/network-policy.yaml"].append({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-all", "namespace": policy.NAMESPACE, "annotations": {"kubenix/k8s-version": "1.34"}},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]}})


def dashboard_duplicate_panel_id(r):
    dashboard = json.loads(r.files["grafana-dashboard.json"])
    dashboard["panels"][1]["id"] = dashboard["panels"][0]["id"]
    r.files["grafana-dashboard.json"] = json.dumps(dashboard)


def built_object(r, build, kind, name):
    (found,) = [o for o in r.built[build] if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def per_queue_hpa_on_other_queue(r):
    metric = built_object(r, "example-per-queue.yaml", "HorizontalPodAutoscaler", "worker-io")["spec"]["metrics"][0]
    metric["external"]["metric"]["selector"]["matchLabels"]["queue"] = "cpu"


def python_worker_short_visibility(r):
    c = built_object(r, "example-python-worker.yaml", "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
    for e in c["env"]:
        if e["name"] == "VISIBILITY_TIMEOUT":
            e["value"] = "60"


def per_queue_selector_overlaps(r):
    d = built_object(r, "example-per-queue.yaml", "Deployment", "worker-cpu")
    d["spec"]["selector"]["matchLabels"].pop("celery-autoscale/pool")


def redis_tls_exporter_without_ca(r):
    d = built_object(r, "example-redis-tls.yaml", "Deployment", "exporter")
    c = d["spec"]["template"]["spec"]["containers"][0]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/etc/redis-ca"]


def pod_cost_policy_unbound(r):
    name = "celery-autoscale.worker-pod-deletion-cost"
    r.built["example-pod-deletion-cost.yaml"] = [o for o in r.built["example-pod-deletion-cost.yaml"]
                                                 if not (o["kind"] == "ValidatingAdmissionPolicyBinding" and o["metadata"]["name"] == name)]


def pod_cost_role_widened(r):
    built_object(r, "example-pod-deletion-cost.yaml", "Role", "worker-pod-deletion-cost")["rules"][0]["verbs"].append("delete")


def worker_events_on_in_base(r):
    first_container(r, "Deployment", "worker")["args"].append("--events")


def adapter_config(r):
    cm = next(o for o in r.base if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "adapter-config")
    return cm, policy.yaml.safe_load(cm["data"]["config.yaml"])


def adapter_rule_dropped(r):
    cm, config = adapter_config(r)
    config["externalRules"] = [x for x in config["externalRules"] if policy.served_name(x) != "celery_queue_depth_growth"]
    cm["data"]["config.yaml"] = policy.yaml.safe_dump(config)


def adapter_depth_rule_changed(r):
    cm, config = adapter_config(r)
    config["externalRules"][0]["metricsQuery"] += " + max by (queue) (celery_queue_reserved{<<.LabelMatchers>>})"
    cm["data"]["config.yaml"] = policy.yaml.safe_dump(config)


def adapter_config_changed_without_annotation(r):
    cm, _ = adapter_config(r)
    cm["data"]["config.yaml"] += "# edited\n"


def tuned_example_drifted(r):
    hpa = built_object(r, "example-tuned.yaml", "HorizontalPodAutoscaler", "worker")
    hpa["spec"]["metrics"][0]["external"]["target"]["averageValue"] = "3"


def fast_pipeline_exporter_at_default(r):
    args = built_object(r, "example-fast-pipeline.yaml", "Deployment", "exporter")["spec"]["template"]["spec"]["containers"][0]["args"]
    args[args.index("--interval") + 1] = "5"


def per_queue_build_drifted(r):
    built_object(r, "example-per-queue.yaml", "Deployment", "worker-io")["metadata"]["labels"]["extra"] = "x"


BAD_CASES = [
    (policy.check_generated_headers, header_removed, "missing the generated-file header"),
    (policy.check_namespaces, secret_committed, "Secrets are created by the deploy step"),
    (policy.check_pods, worker_runs_as_root, "runAsNonRoot"),
    (policy.check_pods, third_party_image_unpinned, "is not pinned by tag"),
    (policy.check_redis, redis_conf_drifted, "does not carry nix/k8s/files/redis.conf"),
    (policy.check_worker, worker_replicas_fixed, "spec.replicas is owned by the HPA"),
    (policy.check_exporter, exporter_scaled_out, "exactly one replica"),
    (policy.check_loadgen_job, loadgen_does_not_wait, "waits for results"),
    (policy.check_hpa, hpa_max_changed, "HPA min 1 max 20"),
    (policy.check_adapter, apiservice_wrong_port, "APIService does not point at the adapter Service"),
    (policy.check_adapter, adapter_rule_dropped, "one external rule per signal"),
    (policy.check_adapter, adapter_depth_rule_changed, "must serve celery_queue_depth as the raw depth"),
    (policy.check_adapter, adapter_config_changed_without_annotation, "config-sha256 annotation"),
    (policy.check_examples, tuned_example_drifted, "the HPA differs from examples/hpa-tuned.yaml"),
    (policy.check_rbac, auth_delegator_unbound, "system:auth-delegator"),
    (policy.check_keda, keda_build_keeps_hpa, "still has the adapter or the HPA"),
    (policy.check_builds, base_build_lost_object, "does not give the rendered objects"),
    (policy.check_prometheus, worker_service_hides_unready, "not-ready workers would not be scraped"),
    (policy.check_network_policies, allow_all_policy, "NetworkPolicy allows"),
    (policy.check_dashboard, dashboard_duplicate_panel_id, "panel ids are not unique"),
    (policy.check_examples, per_queue_build_drifted, "the kustomize build differs from the render"),
    (policy.check_examples, fast_pipeline_exporter_at_default, "not 2 s / 3s / 2s"),
    (policy.check_examples, per_queue_hpa_on_other_queue, "HPA worker-io scales on queues ['cpu']"),
    (policy.check_examples, python_worker_short_visibility, "must stay >= 3600 s"),
    (policy.check_examples, per_queue_selector_overlaps, "also selects the pods of pool worker-io"),
    (policy.check_examples, redis_tls_exporter_without_ca, "exporter BROKER_URL is not rediss:// with a CA"),
    (policy.check_examples, pod_cost_policy_unbound, "is not bound with Deny"),
    (policy.check_examples, pod_cost_role_widened, "must grant exactly patch on pods"),
    (policy.check_worker, worker_events_on_in_base, "events are off by default"),
]


class PolicyChecks(unittest.TestCase):
    def test_each_check_passes_on_the_render(self):
        for fn in policy.CHECKS:
            with self.subTest(check=fn.__name__):
                report = policy.run(copy.deepcopy(GOOD), [fn])
                self.assertGreater(report.count, 0, "a check that checks nothing")
                self.assertEqual(report.problems, [])

    def test_each_check_fails_on_a_defect(self):
        for fn, defect, expected in BAD_CASES:
            with self.subTest(check=fn.__name__, defect=defect.__name__):
                bad = copy.deepcopy(GOOD)
                defect(bad)
                problems = policy.run(bad, [fn]).problems
                self.assertTrue(any(expected in p for p in problems),
                                f"{defect.__name__}: expected a problem with {expected!r}, got {problems}")

    def test_every_check_has_a_bad_case(self):
        covered = {fn for fn, _, _ in BAD_CASES}
        missing = [fn.__name__ for fn in policy.CHECKS if fn not in covered]
        self.assertEqual(missing, [], "add a defect for each new check to BAD_CASES")

    def test_expressions_include_every_filled_adapter_query(self):
        exprs = policy.expressions(GOOD)
        self.assertEqual(exprs[-4:], [policy.filled_query(GOOD, m) for m in policy.SIGNAL_METRICS])
        self.assertEqual(len(set(exprs[-4:])), 4)
        for e in exprs[-4:]:
            self.assertIn('queue="celery"', e)
        self.assertFalse(any("$namespace" in e or "<<." in e for e in exprs))


class NetworkPolicySemantics(unittest.TestCase):
    def test_selector_match_expressions(self):
        sel = {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "In", "values": ["x"]}]}
        self.assertTrue(policy.selects(sel, {"a": "1", "b": "x"}))
        self.assertFalse(policy.selects(sel, {"a": "1", "b": "y"}))
        self.assertFalse(policy.selects(sel, {"b": "x"}))
        self.assertTrue(policy.selects({}, {}))

    def test_ip_block_except(self):
        peer = {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}
        self.assertTrue(policy.peer_matches(peer, {"ip": "10.2.3.4"}))
        self.assertFalse(policy.peer_matches(peer, {"ip": "10.1.3.4"}))
        self.assertFalse(policy.peer_matches(peer, {"namespace": policy.NAMESPACE, "labels": {}}))

    def test_default_deny_closes_and_a_rule_opens(self):
        labels = {"a": {"app": "a"}, "b": {"app": "b"}}
        deny = {"spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
        self.assertFalse(policy.path_open([deny], labels, "a", "b", 80))
        allow = {"spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                          "ingress": [{"ports": [{"port": 80}]}], "egress": [{"ports": [{"port": 80}]}]}}
        self.assertTrue(policy.path_open([deny, allow], labels, "a", "b", 80))
        self.assertFalse(policy.path_open([deny, allow], labels, "a", "b", 81))


if __name__ == "__main__":
    unittest.main()

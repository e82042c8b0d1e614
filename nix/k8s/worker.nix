# The worker pools (options.nix: celeryAutoscale.workers): per pool a Deployment scaled by its HPA
# (autoscaling.nix) and a PodDisruptionBudget; one headless Service through which Prometheus scrapes
# every worker pod.
{ lib, config, ... }:
let
  c = import ./constants.nix;
  w = import ./workload.nix;
  cfg = config.celeryAutoscale;

  # The probes of each kind. Ours: /readyz is 200 only while connected to Redis and not shutting
  # down. A Python Celery worker serves no HTTP: it must answer a remote-control ping within 10 s
  # (this starts a short Python process per probe, hence the long periods).
  probes = p:
    if p.kind == "python-celery" then
      let
        ping = {
          exec.command = [ "sh" "-c" "exec celery -A ${p.celeryApp} inspect ping --timeout 10 --destination celery@$HOSTNAME" ];
          timeoutSeconds = 20;
        };
      in
      {
        readinessProbe = ping // { initialDelaySeconds = 10; periodSeconds = 30; failureThreshold = 2; };
        livenessProbe = ping // { initialDelaySeconds = 30; periodSeconds = 60; failureThreshold = 3; };
      }
    else
      w.httpProbes "metrics" {
        ready = { path = "/readyz"; periodSeconds = 5; failureThreshold = 2; };
        live = { path = "/healthz"; initialDelaySeconds = 5; periodSeconds = 10; failureThreshold = 3; };
      };

  kindEnv = p:
    if p.kind == "python-celery" then [
      { name = "VISIBILITY_TIMEOUT"; value = toString p.visibilityTimeout; }
      # The root filesystem is read-only: no bytecode cache to write.
      { name = "PYTHONDONTWRITEBYTECODE"; value = "1"; }
    ] else [{ name = "WORKER_CONCURRENCY"; value = toString p.concurrency; }];

  # --pod-deletion-cost (options.nix podDeletionCost): the pod's own name and namespace, from the
  # downward API, for the worker to patch.
  costEnv = p: lib.optionals p.podDeletionCost [
    { name = "POD_NAME"; valueFrom.fieldRef.fieldPath = "metadata.name"; }
    { name = "POD_NAMESPACE"; valueFrom.fieldRef.fieldPath = "metadata.namespace"; }
  ];
  costPools = lib.filterAttrs (_: p: p.podDeletionCost) (lib.throwIf
    (lib.any (p: p.podDeletionCost && p.kind == "python-celery") (lib.attrValues cfg.workers))
    "celeryAutoscale.workers.<pool>.podDeletionCost: only our worker keeps the cost (--pod-deletion-cost); turn it off for python-celery pools"
    cfg.workers);
  costName = name: "${name}-pod-deletion-cost";
  clusterCostName = name: "${c.namespace}.${costName name}";
  annotation = "controller.kubernetes.io/pod-deletion-cost";
  # What the pool's service account may change, checked by the API server on every pod UPDATE
  # (a PATCH is one) it sends: only its own pod (the bound token names it in the user's extra
  # info), and of that pod only the deletion-cost annotation, as an integer.
  costPolicy = name: {
    failurePolicy = "Fail";
    matchConstraints.resourceRules = [{ apiGroups = [ "" ]; apiVersions = [ "v1" ]; operations = [ "UPDATE" ]; resources = [ "pods" ]; }];
    matchConditions = [{
      name = "from-the-pool-service-account";
      expression = "request.userInfo.username == 'system:serviceaccount:${c.namespace}:${name}'";
    }];
    variables = [
      { name = "new"; expression = "has(object.metadata.annotations) ? object.metadata.annotations : {}"; }
      { name = "old"; expression = "has(oldObject.metadata.annotations) ? oldObject.metadata.annotations : {}"; }
    ];
    validations = [
      {
        expression = "has(request.userInfo.extra) && 'authentication.kubernetes.io/pod-name' in request.userInfo.extra && request.userInfo.extra['authentication.kubernetes.io/pod-name'] == [object.metadata.name]";
        message = "a worker may change only its own pod";
      }
      {
        expression = "object.spec == oldObject.spec"
          + " && (has(object.metadata.labels) ? object.metadata.labels : {}) == (has(oldObject.metadata.labels) ? oldObject.metadata.labels : {})"
          + " && (has(object.metadata.ownerReferences) ? object.metadata.ownerReferences : []) == (has(oldObject.metadata.ownerReferences) ? oldObject.metadata.ownerReferences : [])"
          + " && (has(object.metadata.finalizers) ? object.metadata.finalizers : []) == (has(oldObject.metadata.finalizers) ? oldObject.metadata.finalizers : [])"
          + " && variables.new.all(k, k == '${annotation}' || (k in variables.old && variables.old[k] == variables.new[k]))"
          + " && variables.old.all(k, k == '${annotation}' || k in variables.new)";
        message = "a worker may change only the ${annotation} annotation of its pod";
      }
      {
        expression = "!('${annotation}' in variables.new) || variables.new['${annotation}'].matches('^-?[0-9]+$')";
        message = "${annotation} must be an integer";
      }
    ];
  };

  deployment = name: p: {
    # No `replicas`: the HPA owns spec.replicas, and a value here would reset it on every apply.
    selector.matchLabels = p.selectorLabels;
    template = {
      metadata.labels = c.podLabels c.apps.worker // p.selectorLabels;
      spec = w.pod { user = c.users.app; volumes = cfg.redis.volumes; token = p.podDeletionCost; } // {
        inherit (p) terminationGracePeriodSeconds;
        containers.worker = {
          inherit (p) image args;
          env = cfg.redis.env ++ kindEnv p ++ costEnv p ++ p.env;
        } // lib.optionalAttrs (p.command != null) { inherit (p) command; }
        // lib.optionalAttrs (p.kind == "celery-autoscale") { ports = [{ name = "metrics"; containerPort = c.ports.worker; }]; }
        // w.container { user = c.users.app; inherit (p) resources; probes = probes p; mounts = cfg.redis.mounts; };
      } // lib.optionalAttrs p.podDeletionCost { serviceAccountName = name; };
    };
  };
in
{
  imports = [ ./common.nix ./options.nix ];

  kubernetes.resources = {
    deployments = lib.throwIf (cfg.workers ? ${c.apps.worker} && lib.length (lib.attrNames cfg.workers) > 1)
      "celeryAutoscale.workers: the pool `worker` selects the pods of every pool; give each pool its own name (e.g. worker-cpu, worker-io)"
      (lib.mapAttrs (name: p: { spec = deployment name p; }) cfg.workers);

    # Headless, not-ready pods included: Prometheus resolves it to one A record per worker pod
    # (files/prometheus.yml, job celery-worker), so every worker is scraped, warm shutdown included.
    services.worker-metrics.spec = {
      clusterIP = "None";
      publishNotReadyAddresses = true;
      selector = c.selectorLabels c.apps.worker;
      ports = [{ name = "metrics"; port = c.ports.worker; targetPort = "metrics"; }];
    };

    # podDeletionCost: per such pool its ServiceAccount, the Role to patch pods (pods only, not
    # pods/status, and no other verb), and the admission policy that narrows it (costPolicy).
    serviceAccounts = lib.mapAttrs (_: _: { }) costPools;
    roles = lib.mapAttrs'
      (name: _: lib.nameValuePair (costName name) {
        rules = [{ apiGroups = [ "" ]; resources = [ "pods" ]; verbs = [ "patch" ]; }];
      })
      costPools;
    roleBindings = lib.mapAttrs'
      (name: _: lib.nameValuePair (costName name) {
        roleRef = { apiGroup = "rbac.authorization.k8s.io"; kind = "Role"; name = costName name; };
        subjects = [{ kind = "ServiceAccount"; inherit name; namespace = c.namespace; }];
      })
      costPools;
    # Cluster-scoped: named after the namespace too, and without the namespace kubenix sets.
    validatingAdmissionPolicies = lib.mapAttrs'
      (name: _: lib.nameValuePair (clusterCostName name) {
        metadata.namespace = lib.mkForce null;
        spec = costPolicy name;
      })
      costPools;
    validatingAdmissionPolicyBindings = lib.mapAttrs'
      (name: _: lib.nameValuePair (clusterCostName name) {
        metadata.namespace = lib.mkForce null;
        spec = {
          policyName = clusterCostName name;
          validationActions = [ "Deny" ];
          matchResources.namespaceSelector.matchLabels."kubernetes.io/metadata.name" = c.namespace;
        };
      })
      costPools;

    # Voluntary disruptions (node drains) take one worker at a time; with maxUnavailable rather than
    # minAvailable, a single replica can still be evicted and the drain never blocks.
    podDisruptionBudgets = lib.mapAttrs (_: p: { spec = { maxUnavailable = 1; selector.matchLabels = p.selectorLabels; }; }) cfg.workers;
  };
}

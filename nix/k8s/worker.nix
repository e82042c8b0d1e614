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

  deployment = p: {
    # No `replicas`: the HPA owns spec.replicas, and a value here would reset it on every apply.
    selector.matchLabels = p.selectorLabels;
    template = {
      metadata.labels = c.podLabels c.apps.worker // p.selectorLabels;
      spec = w.pod { user = c.users.app; volumes = cfg.redis.volumes; } // {
        inherit (p) terminationGracePeriodSeconds;
        containers.worker = {
          inherit (p) image args;
          env = cfg.redis.env ++ kindEnv p ++ p.env;
        } // lib.optionalAttrs (p.command != null) { inherit (p) command; }
        // lib.optionalAttrs (p.kind == "celery-autoscale") { ports = [{ name = "metrics"; containerPort = c.ports.worker; }]; }
        // w.container { user = c.users.app; inherit (p) resources; probes = probes p; mounts = cfg.redis.mounts; };
      };
    };
  };
in
{
  imports = [ ./common.nix ./options.nix ];

  kubernetes.resources = {
    deployments = lib.throwIf (cfg.workers ? ${c.apps.worker} && lib.length (lib.attrNames cfg.workers) > 1)
      "celeryAutoscale.workers: the pool `worker` selects the pods of every pool; give each pool its own name (e.g. worker-cpu, worker-io)"
      (lib.mapAttrs (_: p: { spec = deployment p; }) cfg.workers);

    # Headless, not-ready pods included: Prometheus resolves it to one A record per worker pod
    # (files/prometheus.yml, job celery-worker), so every worker is scraped, warm shutdown included.
    services.worker-metrics.spec = {
      clusterIP = "None";
      publishNotReadyAddresses = true;
      selector = c.selectorLabels c.apps.worker;
      ports = [{ name = "metrics"; port = c.ports.worker; targetPort = "metrics"; }];
    };

    # Voluntary disruptions (node drains) take one worker at a time; with maxUnavailable rather than
    # minAvailable, a single replica can still be evicted and the drain never blocks.
    podDisruptionBudgets = lib.mapAttrs (_: p: { spec = { maxUnavailable = 1; selector.matchLabels = p.selectorLabels; }; }) cfg.workers;
  };
}

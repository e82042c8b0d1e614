# Celery worker Deployment (scaled by the HPA in autoscaling.nix) and its PodDisruptionBudget.
{ images, lib, config, ... }:
let
  c = import ./constants.nix;
  app = c.apps.worker;
  cfg = config.celeryAutoscale.worker;
  # Warm shutdown on SIGTERM: stop fetching, finish or return held tasks, exit 0 within this time.
  shutdownTimeoutSeconds = 30;
in
{
  imports = [ ./common.nix ];

  # Task events for Flower and `celery events` (Celery's -E); off by default, as in Celery.
  # Worker heartbeats are sent either way. docs/Stretch.md shows how to run Flower beside it.
  options.celeryAutoscale.worker.events = lib.mkOption {
    type = lib.types.bool;
    default = false;
    description = "Send Celery task events (WORKER_SEND_EVENTS=true, the worker's --events).";
  };

  config.kubernetes.resources = {
    deployments.worker.spec = {
      # No `replicas`: the HPA owns spec.replicas, and a value here would reset it on every apply.
      selector.matchLabels = c.selectorLabels app;
      template = {
        metadata.labels = c.podLabels app;
        spec = {
          automountServiceAccountToken = false;
          securityContext = c.podSecurityContext c.users.app;
          # Longer than --shutdown-timeout, so the kubelet's SIGKILL never cuts a warm shutdown short.
          terminationGracePeriodSeconds = shutdownTimeoutSeconds + 15;
          containers = [{
            name = "worker";
            image = images.worker;
            imagePullPolicy = "IfNotPresent";
            args = [
              "worker"
              "--queues"
              c.queue
              "--metrics-addr"
              "0.0.0.0:${toString c.ports.worker}"
              "--shutdown-timeout"
              (toString shutdownTimeoutSeconds)
            ];
            env = c.appEnv ++ [{ name = "WORKER_CONCURRENCY"; value = "2"; }]
              ++ lib.optional cfg.events { name = "WORKER_SEND_EVENTS"; value = "true"; };
            ports = [{ name = "metrics"; containerPort = c.ports.worker; }];
            # 200 only while connected to Redis and not shutting down.
            readinessProbe = {
              httpGet = { path = "/readyz"; port = "metrics"; };
              periodSeconds = 5;
              failureThreshold = 2;
            };
            livenessProbe = {
              httpGet = { path = "/healthz"; port = "metrics"; };
              initialDelaySeconds = 5;
              periodSeconds = 10;
              failureThreshold = 3;
            };
            # Small requests so that maxReplicas (20) fits a default Minikube node.
            resources = {
              requests = { cpu = "100m"; memory = "64Mi"; };
              limits = { cpu = "1"; memory = "256Mi"; };
            };
            securityContext = c.containerSecurityContext c.users.app;
            volumeMounts = [ c.tmpMount ];
          }];
          volumes = [ c.tmpVolume ];
        };
      };
    };

    # Headless, not-ready pods included: Prometheus resolves it to one A record per worker pod
    # (files/prometheus.yml, job celery-worker), so every worker is scraped, warm shutdown included.
    services.worker-metrics.spec = {
      clusterIP = "None";
      publishNotReadyAddresses = true;
      selector = c.selectorLabels app;
      ports = [{ name = "metrics"; port = c.ports.worker; targetPort = "metrics"; }];
    };

    # Voluntary disruptions (node drains) take one worker at a time; with maxUnavailable rather than
    # minAvailable, a single replica can still be evicted and the drain never blocks.
    podDisruptionBudgets.worker.spec = {
      maxUnavailable = 1;
      selector.matchLabels = c.selectorLabels app;
    };
  };
}

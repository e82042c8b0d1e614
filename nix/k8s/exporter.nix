# Queue-depth exporter: polls Redis every celeryAutoscale.pipeline.exporterIntervalSeconds (5 s)
# and serves celery_queue_depth{queue} on :9808.
#
# Exactly one replica with the Recreate strategy, so that no two exporters report the same queue at
# once (not even during a rollout). Two would double a `sum`; the adapter query uses `max by (queue)`
# (nix/k8s/signals.nix), which would also tolerate an overlap.
# --queues follows the worker pools (options.nix: celeryAutoscale.queues).
{ lib, config, images, ... }:
let
  c = import ./constants.nix;
  w = import ./workload.nix;
  cfg = config.celeryAutoscale;
  app = c.apps.exporter;
in
{
  imports = [ ./common.nix ./options.nix ];

  kubernetes.resources = {
    deployments.exporter.spec = {
      replicas = 1;
      strategy.type = "Recreate";
      selector.matchLabels = c.selectorLabels app;
      template = {
        metadata.labels = c.podLabels app;
        spec = w.pod { user = c.users.app; volumes = cfg.redis.volumes; } // {
          containers.exporter = {
            image = images.exporter;
            args = [
              "exporter"
              "--queues"
              (lib.concatStringsSep "," cfg.queues)
              "--interval"
              (toString cfg.pipeline.exporterIntervalSeconds)
              "--listen"
              "0.0.0.0:${toString c.ports.exporter}"
            ];
            env = cfg.redis.env;
            ports = [{ name = "metrics"; containerPort = c.ports.exporter; }];
          } // w.container {
            user = c.users.app;
            mounts = cfg.redis.mounts;
            resources = w.resources { cpu = "20m"; memory = "32Mi"; maxCpu = "200m"; maxMemory = "128Mi"; };
            probes = w.httpProbes "metrics" {
              ready = { path = "/healthz"; periodSeconds = 5; };
              live = { path = "/healthz"; initialDelaySeconds = 5; periodSeconds = 10; failureThreshold = 3; };
            };
          };
        };
      };
    };

    # Prometheus scrapes the exporter through this Service (files/prometheus.yml).
    services.exporter.spec = {
      selector = c.selectorLabels app;
      ports = [{ name = "metrics"; port = c.ports.exporter; targetPort = "metrics"; }];
    };
  };
}

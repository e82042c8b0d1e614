# Queue-depth exporter: polls Redis every 5 s and serves celery_queue_depth{queue} on :9808.
#
# Exactly one replica with the Recreate strategy, so that no two exporters report the same queue at
# once (not even during a rollout). Two would double a `sum`; the adapter query uses `max by (queue)`
# (files/adapter-config.yaml), which would also tolerate an overlap.
{ images, ... }:
let
  c = import ./constants.nix;
  app = c.apps.exporter;
in
{
  imports = [ ./common.nix ];

  kubernetes.resources = {
    deployments.exporter.spec = {
      replicas = 1;
      strategy.type = "Recreate";
      selector.matchLabels = c.selectorLabels app;
      template = {
        metadata.labels = c.podLabels app;
        spec = {
          automountServiceAccountToken = false;
          securityContext = c.podSecurityContext c.users.app;
          containers = [{
            name = "exporter";
            image = images.exporter;
            imagePullPolicy = "IfNotPresent";
            args = [
              "exporter"
              "--queues"
              c.queue
              "--interval"
              "5"
              "--listen"
              "0.0.0.0:${toString c.ports.exporter}"
            ];
            env = c.appEnv;
            ports = [{ name = "metrics"; containerPort = c.ports.exporter; }];
            readinessProbe = {
              httpGet = { path = "/healthz"; port = "metrics"; };
              periodSeconds = 5;
            };
            livenessProbe = {
              httpGet = { path = "/healthz"; port = "metrics"; };
              initialDelaySeconds = 5;
              periodSeconds = 10;
              failureThreshold = 3;
            };
            resources = {
              requests = { cpu = "20m"; memory = "32Mi"; };
              limits = { cpu = "200m"; memory = "128Mi"; };
            };
            securityContext = c.containerSecurityContext c.users.app;
            volumeMounts = [ c.tmpMount ];
          }];
          volumes = [ c.tmpVolume ];
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

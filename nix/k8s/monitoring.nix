# Prometheus: scrapes the exporter, the workers and kube-state-metrics (files/prometheus.yml) and
# evaluates the alert rules (files/alerts.yml). prometheus-adapter queries it for the HPA.
# Targets are found through cluster DNS, so Prometheus needs no ServiceAccount token or RBAC.
# Its TSDB is an emptyDir: the HPA only needs recent samples; a restart starts an empty history.
{ lib, config, ... }:
let
  c = import ./constants.nix;
  w = import ./workload.nix;
  app = c.apps.prometheus;
  pipeline = config.celeryAutoscale.pipeline;
  # files/prometheus.yml with the exporter job's scrape interval of celeryAutoscale.pipeline (the
  # file holds the default, 5 s, so the default render ships it byte for byte); the timeout stays
  # below the interval, as Prometheus requires.
  exporterScrape = interval:
    "    scrape_interval: ${toString interval}s\n    scrape_timeout: ${toString (lib.max 1 (lib.min 4 (interval - 1)))}s\n";
  shipped = builtins.readFile ./files/prometheus.yml;
  prometheusConfig =
    if lib.hasInfix (exporterScrape 5) shipped
    then builtins.replaceStrings [ (exporterScrape 5) ] [ (exporterScrape pipeline.scrapeIntervalSeconds) ] shipped
    else throw "nix/k8s/monitoring.nix: files/prometheus.yml no longer holds the exporter job's `scrape_interval: 5s` / `scrape_timeout: 4s` lines this module replaces";
  alertRules = builtins.readFile ./files/alerts.yml;
  volumes = [
    { name = "config"; configMap.name = "prometheus-config"; }
    { name = "data"; emptyDir.sizeLimit = "2Gi"; }
  ];
in
{
  imports = [ ./common.nix ./options.nix ];

  kubernetes.resources = {
    # The files as they are in the repository (the scrape interval aside, above): promtool checks
    # them there and in the rendered ConfigMap (scripts/check-k8s.sh).
    configMaps.prometheus-config.data = {
      "prometheus.yml" = prometheusConfig;
      "alerts.yml" = alertRules;
    };

    deployments.prometheus.spec = {
      replicas = 1;
      # One TSDB writer at a time.
      strategy.type = "Recreate";
      selector.matchLabels = c.selectorLabels app;
      template = {
        metadata = {
          labels = c.podLabels app;
          # A changed configuration or rule file rolls the pod.
          annotations."celery-autoscale/config-sha256" = builtins.hashString "sha256" (prometheusConfig + alertRules);
        };
        spec = w.pod { user = c.users.nobody; tmp = false; inherit volumes; } // {
          containers.prometheus = {
            image = c.pinnedImages.prometheus;
            args = [
              "--config.file=/etc/prometheus/prometheus.yml"
              "--storage.tsdb.path=/prometheus"
              "--storage.tsdb.retention.time=2d"
              "--storage.tsdb.retention.size=1GB"
              "--web.listen-address=:${toString c.ports.prometheus}"
            ];
            ports = [{ name = "web"; containerPort = c.ports.prometheus; }];
          } // w.container {
            user = c.users.nobody;
            tmp = false;
            mounts = [
              { name = "config"; mountPath = "/etc/prometheus"; readOnly = true; }
              { name = "data"; mountPath = "/prometheus"; }
            ];
            resources = w.resources { cpu = "100m"; memory = "256Mi"; maxCpu = "1"; maxMemory = "1Gi"; };
            probes = w.httpProbes "web" {
              ready = { path = "/-/ready"; periodSeconds = 5; };
              live = { path = "/-/healthy"; initialDelaySeconds = 10; periodSeconds = 15; failureThreshold = 4; };
            };
          };
        };
      };
    };

    services.prometheus.spec = {
      selector = c.selectorLabels app;
      ports = [{ name = "web"; port = c.ports.prometheus; targetPort = "web"; }];
    };
  };
}

# The Grafana dashboard (files/grafana-dashboard.json) as a ConfigMap with the label the Grafana
# Helm chart's dashboard sidecar watches (grafana_dashboard: "1"); point the sidecar at this
# namespace, or import the JSON file by hand. Grafana itself is not deployed here; a Grafana in
# another namespace needs a NetworkPolicy admitting it to Prometheus (see network-policy.nix).
{
  imports = [ ./common.nix ];

  kubernetes.resources.configMaps.grafana-dashboard-celery-autoscale = {
    metadata.labels.grafana_dashboard = "1";
    data."celery-autoscale.json" = builtins.readFile ./files/grafana-dashboard.json;
  };
}

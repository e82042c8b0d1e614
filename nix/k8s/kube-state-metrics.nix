# kube-state-metrics, limited to this namespace's Deployments and HPAs: the dashboard's desired and
# current replica series (kube_horizontalpodautoscaler_status_*, kube_deployment_status_replicas*)
# and the backlog-at-max-replicas alert need them. With --namespaces it lists and watches only
# celery-autoscale, so a Role suffices (no cluster-wide read access).
let
  c = import ./constants.nix;
  w = import ./workload.nix;
  app = c.apps.kubeStateMetrics;
in
{
  imports = [ ./common.nix ];

  kubernetes.resources = {
    serviceAccounts.kube-state-metrics = { };

    roles.kube-state-metrics.rules = [
      { apiGroups = [ "apps" ]; resources = [ "deployments" ]; verbs = [ "list" "watch" ]; }
      { apiGroups = [ "autoscaling" ]; resources = [ "horizontalpodautoscalers" ]; verbs = [ "list" "watch" ]; }
    ];
    roleBindings.kube-state-metrics = {
      roleRef = { apiGroup = "rbac.authorization.k8s.io"; kind = "Role"; name = "kube-state-metrics"; };
      subjects = [{ kind = "ServiceAccount"; name = "kube-state-metrics"; namespace = c.namespace; }];
    };

    deployments.kube-state-metrics.spec = {
      replicas = 1;
      selector.matchLabels = c.selectorLabels app;
      template = {
        metadata.labels = c.podLabels app;
        spec = w.pod { user = c.users.nobody; token = true; tmp = false; } // {
          serviceAccountName = "kube-state-metrics"; # it reads the API
          containers.kube-state-metrics = {
            image = c.pinnedImages.kubeStateMetrics;
            args = [
              "--namespaces=${c.namespace}"
              "--resources=deployments,horizontalpodautoscalers"
              "--port=${toString c.ports.kubeStateMetrics}"
              "--telemetry-port=${toString c.ports.kubeStateMetricsTelemetry}"
            ];
            ports = [
              { name = "http-metrics"; containerPort = c.ports.kubeStateMetrics; }
              { name = "telemetry"; containerPort = c.ports.kubeStateMetricsTelemetry; }
            ];
            # Liveness on the metrics port, readiness on the telemetry port (kube-state-metrics' own layout).
            livenessProbe = { httpGet = { path = "/livez"; port = "http-metrics"; }; initialDelaySeconds = 5; periodSeconds = 10; };
            readinessProbe = { httpGet = { path = "/readyz"; port = "telemetry"; }; initialDelaySeconds = 5; periodSeconds = 10; };
          } // w.container {
            user = c.users.nobody;
            tmp = false;
            resources = w.resources { cpu = "10m"; memory = "32Mi"; maxCpu = "100m"; maxMemory = "128Mi"; };
          };
        };
      };
    };

    # Prometheus scrapes kube-state-metrics through this Service (files/prometheus.yml).
    services.kube-state-metrics.spec = {
      selector = c.selectorLabels app;
      ports = [{ name = "http-metrics"; port = c.ports.kubeStateMetrics; targetPort = "http-metrics"; }];
    };
  };
}

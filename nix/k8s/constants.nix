# Names, labels, ports and hardening shared by the kubenix modules: one home for each value.
# A plain attribute set (not a module), imported with `import ./constants.nix`.
let
  namespace = "celery-autoscale";
  ports = {
    redis = 6379;
    worker = 9191; # worker --metrics-addr: /metrics, /healthz, /readyz
    exporter = 9808; # exporter --listen: /metrics, /healthz
    prometheus = 9090;
    adapter = 6443; # prometheus-adapter --secure-port (aggregated API server)
    kubeStateMetrics = 8080;
    kubeStateMetricsTelemetry = 8081;
  };
  # Created by the deploy step, never committed (see redis.nix).
  redisSecret = { name = "redis-auth"; key = "password"; };
in
{
  inherit namespace ports redisSecret;
  queue = "celery";

  # app.kubernetes.io/name of each workload: the key of pod selectors, Service selectors (among them
  # the Services Prometheus scrapes, files/prometheus.yml) and NetworkPolicies.
  apps = {
    redis = "redis";
    worker = "worker";
    exporter = "exporter";
    loadgen = "loadgen";
    prometheus = "prometheus";
    adapter = "prometheus-adapter";
    kubeStateMetrics = "kube-state-metrics";
  };
  selectorLabels = app: { "app.kubernetes.io/name" = app; };
  podLabels = app: {
    "app.kubernetes.io/name" = app;
    "app.kubernetes.io/part-of" = namespace;
  };

  # Third-party images, pinned by tag. Our own images come only from the `images` module argument.
  pinnedImages = {
    redis = "docker.io/library/redis:7.4.11-alpine";
    # 2.53 LTS: the config format Debian's promtool 2.42 checks (scripts/check-k8s.sh); 3.x changed defaults.
    prometheus = "quay.io/prometheus/prometheus:v2.53.5";
    adapter = "registry.k8s.io/prometheus-adapter/prometheus-adapter:v0.12.0";
    kubeStateMetrics = "registry.k8s.io/kube-state-metrics/kube-state-metrics:v2.18.0";
  };

  # Numeric users, so that runAsNonRoot can be verified by the kubelet.
  users = {
    app = { uid = 65532; gid = 65532; }; # our nix2container images (config.User = "65532:65532")
    redis = { uid = 999; gid = 1000; }; # the official redis alpine image's redis user and group
    nobody = { uid = 65534; gid = 65534; }; # prometheus, prometheus-adapter, kube-state-metrics
  };
  containerSecurityContext = { uid, gid }: {
    runAsNonRoot = true;
    runAsUser = uid;
    runAsGroup = gid;
    readOnlyRootFilesystem = true;
    allowPrivilegeEscalation = false;
    capabilities.drop = [ "ALL" ];
    seccompProfile.type = "RuntimeDefault";
  };
  podSecurityContext = { gid, ... }: {
    runAsNonRoot = true;
    fsGroup = gid;
    seccompProfile.type = "RuntimeDefault";
  };

  # A small writable /tmp for containers with a read-only root filesystem.
  tmpVolume = { name = "tmp"; emptyDir.sizeLimit = "16Mi"; };
  tmpMount = { name = "tmp"; mountPath = "/tmp"; };
}

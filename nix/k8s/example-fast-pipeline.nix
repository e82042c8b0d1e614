# Example: a faster metric pipeline (celeryAutoscale.pipeline). The exporter reads the queues every
# 2 s and Prometheus scrapes it every 3 s, so the depth the HPA reads is at most 5 s old instead of
# the base's 10 s (`simulate --scrape-delay 5`; `simulate --tune` prints these options for the delay
# it chose). The cost is a few more LLENs a second on Redis and more samples in Prometheus.
# Rendered to k8s/examples/fast-pipeline/, a kustomize Component over k8s/ that patches the
# exporter's --interval and the Prometheus configuration (and so its pod's config checksum).
{
  imports = [ ./default.nix ];

  celeryAutoscale.pipeline = {
    exporterIntervalSeconds = 2;
    scrapeIntervalSeconds = 3;
  };
}

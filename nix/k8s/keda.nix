# The KEDA alternative to prometheus-adapter + HPA: a ScaledObject with a Prometheus trigger on the
# same query the adapter serves, for scale-to-zero. KEDA then owns the external metrics API
# (v1beta1.external.metrics.k8s.io) and creates the HPA itself, so the kustomize Component
# k8s/components/keda adds these objects and deletes every object of adapter.nix and our HPA
# (autoscaling.nix); scripts/render-k8s.sh generates both. Enable it with
#   cd k8s && kustomize edit add component components/keda
# Needs KEDA 2.x installed, in the namespace `keda`.
# Not part of the base (default.nix): rendered on its own to k8s/components/keda/keda.yaml.
# One ScaledObject per worker pool (options.nix: celeryAutoscale.workers), with the pool's hpa options.
{ lib, config, ... }:
let
  c = import ./constants.nix;
  policy = import ./scaling-policy.nix;

  # The adapter's metricsQuery of the pool's signal (options.nix: adapterRules, from signals.nix), filled
  # in the way the adapter fills it for the worker HPA: the series name, the HPA selector and the namespace.
  adapterQuery = signal: (lib.findFirst (r: r.signal == signal) null config.celeryAutoscale.adapterRules).metricsQuery;
  fill = signal: matcher: builtins.replaceStrings
    [ "<<.Series>>" "<<.LabelMatchers>>" ]
    [ policy.metricName ''${matcher},namespace="${c.namespace}"'' ]
    (adapterQuery signal);
  # One queue: the adapter's query as the adapter fills it for the HPA. Several: their sum, as the HPA
  # adds them up (KEDA's trigger needs a single value).
  query = signal: queues:
    if lib.length queues == 1 then fill signal ''queue="${lib.head queues}"''
    else "sum(${fill signal ''queue=~"${lib.concatStringsSep "|" queues}"''})";

  scaledObject = name: p: {
    spec = {
      scaleTargetRef.name = name;
      # Scale to zero when the queue is empty: the reason to choose KEDA. 0 -> 1 is KEDA's own
      # activation check every pollingInterval; 1 <-> N is the HPA KEDA creates, with our behavior.
      minReplicaCount = 0;
      maxReplicaCount = p.hpa.maxReplicas;
      pollingInterval = 15;
      cooldownPeriod = 300;
      advanced.horizontalPodAutoscalerConfig = {
        # The same name as the adapter path's HPA: dashboards and alerts keep working.
        inherit name;
        inherit (p.hpa) behavior;
      };
      triggers = [{
        type = "prometheus";
        metricType = "AverageValue";
        metadata = {
          serverAddress = "http://prometheus.${c.namespace}.svc:${toString c.ports.prometheus}";
          query = builtins.seq p.hpa.metricName (query p.hpa.signal p.queues);
          threshold = p.hpa.averageValue;
          activationThreshold = "0";
          # An empty result is an error (the HPA holds its count), as on the adapter path, not a 0.
          ignoreNullValues = "false";
        };
      }];
    };
  };
in
{
  imports = [ ./common.nix ./options.nix ];

  kubernetes.customTypes = [{
    group = "keda.sh";
    version = "v1alpha1";
    kind = "ScaledObject";
    attrName = "scaledObjects";
  }];

  kubernetes.resources = {
    scaledObjects = lib.mapAttrs scaledObject config.celeryAutoscale.workers;

    # KEDA's operator and metrics server query Prometheus from the keda namespace.
    networkPolicies.prometheus-from-keda.spec = {
      podSelector.matchLabels = c.selectorLabels c.apps.prometheus;
      policyTypes = [ "Ingress" ];
      ingress = [{
        from = [{ namespaceSelector.matchLabels."kubernetes.io/metadata.name" = "keda"; }];
        ports = [{ protocol = "TCP"; port = c.ports.prometheus; }];
      }];
    };
  };
}

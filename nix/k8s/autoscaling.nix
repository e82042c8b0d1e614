# The worker HPA (autoscaling/v2): an External metric, the queue depth that prometheus-adapter
# serves (adapter.nix), with the seed's policy from scaling-policy.nix (which also says why its
# 15/30/60 s periods are kept although 14/29/59 s would make the real controller deterministic).
# Rendered alone into k8s/autoscaling.yaml, which the simulator (`celery-autoscale simulate --hpa`)
# and the local supervisor read.
let
  policy = import ./scaling-policy.nix;
in
{
  imports = [ ./common.nix ];

  kubernetes.resources.horizontalPodAutoscalers.worker.spec = {
    scaleTargetRef = { apiVersion = "apps/v1"; kind = "Deployment"; name = "worker"; };
    inherit (policy) minReplicas maxReplicas behavior;
    metrics = [{
      type = "External";
      external = {
        metric = {
          name = policy.metricName;
          selector.matchLabels.queue = policy.queue;
        };
        target = { type = "AverageValue"; inherit (policy) averageValue; };
      };
    }];
  };
}

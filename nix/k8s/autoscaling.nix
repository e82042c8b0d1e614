# One HPA (autoscaling/v2) per worker pool (options.nix: celeryAutoscale.workers), named after it:
# an External metric of the pool's queues that prometheus-adapter serves (adapter.nix), named after
# the pool's hpa.signal (signals.nix: celery_queue_depth by default), with the pool's hpa options, by
# default the seed's policy from scaling-policy.nix (which also says why its 15/30/60 s periods are
# kept although 14/29/59 s would make the real controller deterministic; hpa.profile = "tuned"
# selects the tuned numbers there).
# Rendered alone into k8s/autoscaling.yaml, which the simulator (`celery-autoscale simulate --hpa`)
# and the local supervisor read.
{ lib, config, ... }:
let
  # One queue: that series. Several: each queue's series, which the HPA adds up for an External metric.
  selector = queues:
    if lib.length queues == 1 then { matchLabels.queue = lib.head queues; }
    else { matchExpressions = [{ key = "queue"; operator = "In"; values = queues; }]; };
in
{
  imports = [ ./common.nix ./options.nix ];

  kubernetes.resources.horizontalPodAutoscalers = lib.mapAttrs
    (name: p: {
      spec = {
        scaleTargetRef = { apiVersion = "apps/v1"; kind = "Deployment"; inherit name; };
        inherit (p.hpa) minReplicas maxReplicas behavior;
        metrics = [{
          type = "External";
          external = {
            metric = { name = p.hpa.metricName; selector = selector p.queues; };
            target = { type = "AverageValue"; inherit (p.hpa) averageValue; };
          };
        }];
      };
    })
    config.celeryAutoscale.workers;
}

# The worker autoscaling policy: the seed's numbers, shared by the HPA (autoscaling.nix) and the
# KEDA ScaledObject (keda.nix). A plain attribute set, imported with `import ./scaling-policy.nix`.
#
# Why not 14/29/59 s: the seed's periods (15 s up, 30 s down) and window (60 s) are exact multiples
# of the HPA controller's 15 s sync period, and the controller compares timestamps strictly
# ("newer than now - period"). Recommendations and scale events are stamped a few milliseconds apart
# from sync to sync, so an entry exactly one period or window old is sometimes still counted and
# sometimes not: the real controller lands nondeterministically between two outcomes
# (docs/hpa-algorithm.md §1.9, e.g. 98 to 200 of 200 jittered runs differ from the exact-tick result).
# With 14 s, 29 s and 59 s every such entry is unambiguously outside, and the real controller would
# match the simulator's canonical exact-tick vectors. We keep the seed's numbers: they are the
# behaviour this project reproduces, and the simulator and its test vectors are written for them.
{
  minReplicas = 1;
  maxReplicas = 20; # Minikube-sized
  metricName = "celery_queue_depth";
  inherit (import ./constants.nix) queue;
  # AverageValue: desired replicas = ceil(queue depth / 10), whatever the current count.
  averageValue = "10";
  behavior = {
    scaleUp = {
      stabilizationWindowSeconds = 0;
      policies = [{ type = "Percent"; value = 200; periodSeconds = 15; }];
    };
    scaleDown = {
      stabilizationWindowSeconds = 60;
      policies = [{ type = "Percent"; value = 50; periodSeconds = 30; }];
    };
  };
}

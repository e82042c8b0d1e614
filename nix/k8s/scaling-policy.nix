# The worker autoscaling policy: the seed's numbers (and the tuned profile's, below), shared by the HPA (autoscaling.nix) and the
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
rec {
  minReplicas = 1;
  maxReplicas = 20; # Minikube-sized
  # The series every signal is computed from (and the seed's External metric): nix/k8s/signals.nix.
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

  # The seed's signal: the metric is the depth alone (celery_queue_depth).
  signal = "depth";

  # The rate signals (signals.nix): seconds of arrivals they add, 15 s metric delay (exporter
  # --interval 5 s + scrape 5 s + adapter) + 15 s HPA sync + 10 s pod start, as `simulate` models
  # by default; and the window over which the rate is measured (`simulate --rate-window`).
  lookaheadSeconds = 40;
  rateWindowSeconds = 30;

  # Profiles, selected per pool with hpa.profile (options.nix); explicit hpa.signal, averageValue
  # and behavior override them.
  profiles = {
    seed = { inherit signal averageValue behavior; };
    # The policy `simulate --tune` chose (examples/hpa-tuned.yaml, docs/Autoscaling.md "Seed vs
    # tuned"): target = the concurrency on waiting + running, fast up and down, no windows.
    # Modelled with the metric 10 s late; the pipeline here delivers it within about 15 s.
    tuned = {
      signal = "depth+running";
      averageValue = "2";
      behavior = {
        scaleUp = {
          stabilizationWindowSeconds = 0;
          selectPolicy = "Max";
          policies = [{ type = "Pods"; value = 10; periodSeconds = 15; }];
        };
        scaleDown = {
          stabilizationWindowSeconds = 0;
          selectPolicy = "Max";
          policies = [{ type = "Percent"; value = 100; periodSeconds = 15; }];
        };
      };
    };
  };
}

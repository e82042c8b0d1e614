# An on-demand burst of 400 CPU-bound tasks (the seed's `generate_tasks.py burst --n 400`).
# Not part of the base (default.nix): a Job's pod template is immutable, so it is applied on demand.
# Rendered to k8s/jobs/loadgen-burst.yaml; run it again after the TTL below has removed it, or with
#   kubectl -n celery-autoscale delete job loadgen-burst --ignore-not-found && kubectl apply -k k8s/jobs
{ config, images, ... }:
let
  c = import ./constants.nix;
  w = import ./workload.nix;
  redis = config.celeryAutoscale.redis;
  app = c.apps.loadgen;
in
{
  imports = [ ./common.nix ./options.nix ];

  kubernetes.resources.jobs.loadgen-burst.spec = {
    backoffLimit = 2;
    activeDeadlineSeconds = 600;
    ttlSecondsAfterFinished = 600;
    template = {
      metadata.labels = c.podLabels app;
      spec = w.pod { user = c.users.app; volumes = redis.volumes; } // {
        restartPolicy = "Never";
        containers.loadgen = {
          image = images.worker; # the same image as the worker: one binary
          # --wait: the Job succeeds only if every task ended SUCCESS (the KinD test relies on it).
          args = [ "loadgen" "burst" "--n" "400" "--task" "cpu" "--wait" "--wait-timeout" "540" ];
          env = redis.env;
        } // w.container {
          user = c.users.app;
          mounts = redis.mounts;
          resources = w.resources { cpu = "50m"; memory = "32Mi"; maxCpu = "500m"; maxMemory = "128Mi"; };
        };
      };
    };
  };
}

# Example: one queue and one HPA per task type (docs/Stretch.md §3). Producers route by task name
#   app.conf.task_routes = {"tasks.cpu_bound": {"queue": "cpu"}, "tasks.io_bound": {"queue": "io"}}
# and each pool scales on its own queue's depth with its own maximum and resources. The exporter's
# --queues follows (cpu,io). Rendered to k8s/examples/per-queue/, a kustomize Component over k8s/
# that removes the pool `worker` (Deployment, HPA, PodDisruptionBudget) and adds these two.
# A Deployment's selector is immutable: on a running cluster delete the old pool first
# (kubectl -n celery-autoscale delete deployment/worker hpa/worker pdb/worker).
{
  imports = [ ./default.nix ];

  celeryAutoscale.workers = {
    worker-cpu = {
      queues = [ "cpu" ];
      hpa.maxReplicas = 20;
    };
    # io tasks wait rather than compute: many run per pod, on little CPU.
    worker-io = {
      queues = [ "io" ];
      concurrency = 50;
      resources = (import ./workload.nix).resources { cpu = "50m"; memory = "64Mi"; maxCpu = "200m"; maxMemory = "256Mi"; };
      hpa.maxReplicas = 10;
    };
  };
}

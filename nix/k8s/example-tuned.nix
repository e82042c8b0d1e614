# Example: the worker pool on the tuned profile (scaling-policy.nix, the policy `simulate --tune`
# chose, examples/hpa-tuned.yaml): the HPA reads celery_queue_depth_running (waiting + held by
# workers) with a target of 2 per pod, scales up by 10 pods and down by 100 % per 15 s, without
# stabilization windows. Everything else stays as in the base; the adapter serves that metric in
# every render. Rendered to k8s/examples/tuned/, a kustomize Component over k8s/ that patches the HPA.
# Any of hpa.signal, hpa.averageValue and hpa.behavior set beside the profile overrides it.
{
  imports = [ ./default.nix ];

  celeryAutoscale.workers.worker.hpa.profile = "tuned";
}

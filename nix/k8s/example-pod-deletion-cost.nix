# Example: scale-in removes idle workers first. Each worker pod keeps its
# controller.kubernetes.io/pod-deletion-cost annotation current (0 while idle), so when the HPA
# shrinks the Deployment the ReplicaSet controller deletes idle pods before busy ones. Adds the
# pool's ServiceAccount, a Role to patch pods, the ValidatingAdmissionPolicy that limits that to
# the pod's own cost annotation, and the worker's egress to the API server. Rendered to
# k8s/examples/pod-deletion-cost/, a kustomize Component over k8s/.
{
  imports = [ ./default.nix ];

  celeryAutoscale.workers.worker.podDeletionCost = true;
}

# The base deployment: what `kubectl apply -k k8s` applies, one module per concern.
# scripts/render-k8s.sh renders each module listed here into k8s/<module>.yaml and lists those files
# in k8s/kustomization.yaml. loadgen.nix (an on-demand Job) and keda.nix (the KEDA alternative
# to the adapter) are rendered on their own and are not part of the base.
#
# Module arguments: `images = { worker = "<ref>"; exporter = "<ref>"; }` (specialArgs or _module.args).
{
  imports = [
    ./namespace.nix
    ./redis.nix
    ./worker.nix
    ./exporter.nix
    ./monitoring.nix
    ./kube-state-metrics.nix
    ./adapter.nix
    ./autoscaling.nix
    ./network-policy.nix
    ./dashboard.nix
  ];
}

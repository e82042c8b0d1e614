# NetworkPolicies: deny everything in the namespace, then allow each workload exactly the paths it
# needs. Enforced only by a CNI that implements NetworkPolicy (e.g. `minikube start --cni=calico`);
# without one they are accepted and ignored.
#
# Paths: worker, exporter and loadgen -> redis:6379; prometheus -> worker:9191, exporter:9808,
# kube-state-metrics:8080; prometheus-adapter -> prometheus:9090; API server -> prometheus-adapter:6443;
# prometheus-adapter and kube-state-metrics -> API server; DNS for those that resolve Service names.
# Kubelet probes come from the node itself, which common CNIs (Calico, Cilium) always admit.
# `kubectl port-forward` enters the pod's own network namespace and is not filtered either.
{ lib, config, ... }:
let
  c = import ./constants.nix;
  a = c.apps;
  tcp = port: { protocol = "TCP"; inherit port; };
  pods = app: { podSelector.matchLabels = c.selectorLabels app; };
  podsOf = apps: {
    podSelector.matchExpressions = [{ key = "app.kubernetes.io/name"; operator = "In"; values = apps; }];
  };
  toPods = app: port: { to = [ (pods app) ]; ports = [ (tcp port) ]; };
  fromPods = app: port: { from = [ (pods app) ]; ports = [ (tcp port) ]; };
  dns = {
    to = [{ namespaceSelector.matchLabels."kubernetes.io/metadata.name" = "kube-system"; }];
    ports = [{ protocol = "UDP"; port = 53; } (tcp 53)];
  };
  # The API server is not a pod and its address differs per cluster; after the Service's DNAT the
  # policy sees the real endpoint, which listens on 443, 6443 (kubeadm, kind) or 8443 (Minikube).
  # Narrow this to an ipBlock of the API server's address where it is known.
  apiServer = { ports = map tcp [ 443 6443 8443 ]; };
  allow = app: { ingress ? [ ], egress ? [ ] }: {
    spec = {
      podSelector.matchLabels = c.selectorLabels app;
      policyTypes = [ "Ingress" "Egress" ];
      inherit ingress egress;
    };
  };
in
{
  imports = [ ./common.nix ./options.nix ];

  kubernetes.resources.networkPolicies = {
    default-deny.spec = {
      podSelector = { };
      policyTypes = [ "Ingress" "Egress" ];
    };

    redis = allow a.redis {
      ingress = [{ from = [ (podsOf [ a.worker a.exporter a.loadgen ]) ]; ports = [ (tcp c.ports.redis) ]; }];
    };
    worker = allow a.worker {
      ingress = [ (fromPods a.prometheus c.ports.worker) ];
      # The API server too when a pool keeps its pods' deletion cost (options.nix podDeletionCost).
      egress = [ (toPods a.redis c.ports.redis) dns ]
        ++ lib.optional (lib.any (p: p.podDeletionCost) (lib.attrValues config.celeryAutoscale.workers)) apiServer;
    };
    exporter = allow a.exporter {
      ingress = [ (fromPods a.prometheus c.ports.exporter) ];
      egress = [ (toPods a.redis c.ports.redis) dns ];
    };
    loadgen = allow a.loadgen {
      egress = [ (toPods a.redis c.ports.redis) dns ];
    };
    prometheus = allow a.prometheus {
      ingress = [ (fromPods a.adapter c.ports.prometheus) ];
      egress = [
        (toPods a.worker c.ports.worker)
        (toPods a.exporter c.ports.exporter)
        (toPods a.kubeStateMetrics c.ports.kubeStateMetrics)
        dns
      ];
    };
    prometheus-adapter = allow a.adapter {
      # From anywhere: the API server calls the adapter from a node or host address, not a pod IP,
      # and that address differs per cluster.
      ingress = [{ ports = [ (tcp c.ports.adapter) ]; }];
      egress = [ (toPods a.prometheus c.ports.prometheus) apiServer dns ];
    };
    kube-state-metrics = allow a.kubeStateMetrics {
      ingress = [ (fromPods a.prometheus c.ports.kubeStateMetrics) ];
      egress = [ apiServer ];
    };
  };
}

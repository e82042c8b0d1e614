# prometheus-adapter: serves celery_queue_depth from Prometheus as an External metric
# (v1beta1.external.metrics.k8s.io) for the worker HPA. Rules: files/adapter-config.yaml.
#
# Beyond the adapter's own manifests, this adds what the external metrics path needs: the
# external.metrics.k8s.io APIService and the binding that lets the HPA controller
# (kube-system:horizontal-pod-autoscaler) read external metrics.
# Only one APIService can own v1beta1.external.metrics.k8s.io per cluster: the KEDA variant
# (keda.nix, k8s/components/keda) removes everything in this module.
{ lib, ... }:
let
  c = import ./constants.nix;
  w = import ./workload.nix;
  app = c.apps.adapter;
  name = "prometheus-adapter";
  # Cluster-scoped RBAC objects carry the namespace in their names, so that they cannot clash with
  # another prometheus-adapter installation (e.g. kube-prometheus) in the same cluster.
  clusterName = suffix: "${c.namespace}:${name}:${suffix}";
  adapterConfig = builtins.readFile ./files/adapter-config.yaml;
  serviceAccount = [{ kind = "ServiceAccount"; inherit name; namespace = c.namespace; }];
  clusterScoped.namespace = lib.mkForce null;
in
{
  imports = [ ./common.nix ];

  kubernetes.resources = {
    serviceAccounts.${name} = { };

    # Read access the adapter needs to map metrics to Kubernetes objects (its cluster-role.yaml).
    clusterRoles.${clusterName "resource-reader"} = {
      metadata = clusterScoped;
      rules = [{
        apiGroups = [ "" ];
        resources = [ "nodes" "namespaces" "pods" "services" ];
        verbs = [ "get" "list" "watch" ];
      }];
    };
    clusterRoleBindings.${clusterName "resource-reader"} = {
      metadata = clusterScoped;
      roleRef = { apiGroup = "rbac.authorization.k8s.io"; kind = "ClusterRole"; name = clusterName "resource-reader"; };
      subjects = serviceAccount;
    };

    # Aggregated API server authentication: delegate token and access reviews to the API server...
    clusterRoleBindings.${clusterName "auth-delegator"} = {
      metadata = clusterScoped;
      roleRef = { apiGroup = "rbac.authorization.k8s.io"; kind = "ClusterRole"; name = "system:auth-delegator"; };
      subjects = serviceAccount;
    };
    # ...and read the front-proxy client CA from kube-system/extension-apiserver-authentication.
    roleBindings."${c.namespace}:${name}:auth-reader" = {
      metadata.namespace = "kube-system";
      roleRef = { apiGroup = "rbac.authorization.k8s.io"; kind = "Role"; name = "extension-apiserver-authentication-reader"; };
      subjects = serviceAccount;
    };

    # The HPA controller reads external metrics; without this it gets "forbidden".
    clusterRoles.${clusterName "external-metrics-reader"} = {
      metadata = clusterScoped;
      rules = [{
        apiGroups = [ "external.metrics.k8s.io" ];
        resources = [ "*" ];
        verbs = [ "get" "list" "watch" ];
      }];
    };
    clusterRoleBindings.${clusterName "hpa-external-metrics"} = {
      metadata = clusterScoped;
      roleRef = { apiGroup = "rbac.authorization.k8s.io"; kind = "ClusterRole"; name = clusterName "external-metrics-reader"; };
      subjects = [{ kind = "ServiceAccount"; name = "horizontal-pod-autoscaler"; namespace = "kube-system"; }];
    };

    configMaps.adapter-config.data."config.yaml" = adapterConfig;

    deployments.${name}.spec = {
      # One replica (Minikube): while it restarts the HPA cannot read the metric and holds its count.
      replicas = 1;
      selector.matchLabels = c.selectorLabels app;
      template = {
        metadata = {
          labels = c.podLabels app;
          # A changed rule file rolls the pod.
          annotations."celery-autoscale/config-sha256" = builtins.hashString "sha256" adapterConfig;
        };
        spec = w.pod { user = c.users.nobody; token = true; volumes = [{ name = "config"; configMap.name = "adapter-config"; }]; } // {
          serviceAccountName = name; # it is an API server and reads the API
          containers.prometheus-adapter = {
            image = c.pinnedImages.adapter;
            args = [
              # Self-signed serving certificate, written to the writable emptyDir (read-only root FS);
              # the APIService skips TLS verification accordingly.
              "--cert-dir=/tmp/cert"
              "--secure-port=${toString c.ports.adapter}"
              "--config=/etc/adapter/config.yaml"
              "--prometheus-url=http://prometheus.${c.namespace}.svc:${toString c.ports.prometheus}/"
              # A queue series must be seen within this interval to be served (404 before that).
              "--metrics-relist-interval=1m"
            ];
            ports = [{ name = "https"; containerPort = c.ports.adapter; }];
          } // w.container {
            user = c.users.nobody;
            mounts = [{ name = "config"; mountPath = "/etc/adapter"; readOnly = true; }];
            resources = w.resources { cpu = "50m"; memory = "64Mi"; maxCpu = "250m"; maxMemory = "256Mi"; };
            probes = w.httpProbes "https" {
              ready = { path = "/readyz"; scheme = "HTTPS"; initialDelaySeconds = 10; periodSeconds = 5; failureThreshold = 5; };
              live = { path = "/livez"; scheme = "HTTPS"; initialDelaySeconds = 30; periodSeconds = 10; failureThreshold = 5; };
            };
          };
        };
      };
    };

    services.${name}.spec = {
      selector = c.selectorLabels app;
      ports = [{ name = "https"; port = 443; targetPort = "https"; }];
    };

    APIServices."v1beta1.external.metrics.k8s.io" = {
      metadata = clusterScoped;
      spec = {
        group = "external.metrics.k8s.io";
        version = "v1beta1";
        service = { inherit name; namespace = c.namespace; port = 443; };
        # The adapter's certificate is self-signed (--cert-dir). With cert-manager, set caBundle instead.
        insecureSkipTLSVerify = true;
        groupPriorityMinimum = 100;
        versionPriority = 100;
      };
    };
  };
}

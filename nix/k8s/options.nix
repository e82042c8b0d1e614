# The options the worker pools, their HPAs, the exporter and the loadgen Job are rendered from.
# Imported by worker.nix, autoscaling.nix, exporter.nix and loadgen.nix (the module system imports
# it once however many modules name it). The defaults render the base deployment k8s/.
#
#   celeryAutoscale.redis    where the Redis is, whether the in-cluster one serves TLS, and how
#                            clients trust it (a CA from a Secret, rediss:// URLs)
#   celeryAutoscale.workers  one entry per worker pool: a Deployment, a PodDisruptionBudget and an
#                            HPA named after the entry, scaling on the depth of the pool's queues
#
# Example (nix/k8s/example-per-queue.nix): one pool per task type, each on its own queue:
#   celeryAutoscale.workers = {
#     worker-cpu = { queues = [ "cpu" ]; hpa.maxReplicas = 20; };
#     worker-io = { queues = [ "io" ]; concurrency = 50; hpa.maxReplicas = 10; };
#   };
{ lib, config, images, ... }:
let
  inherit (lib) mkOption types;
  c = import ./constants.nix;
  policy = import ./scaling-policy.nix;
  cfg = config.celeryAutoscale;
  caDir = "/etc/redis-ca";

  # The Redis URL every client gets; rediss:// with the mounted CA when redis.caSecret is set.
  # The query options are redis-py's and kombu's, so a Python Celery worker reads the same URL.
  redisUrl = db:
    let
      scheme = if cfg.redis.caSecret == null then "redis" else "rediss";
      tls = lib.optionalString (cfg.redis.caSecret != null) "?ssl_cert_reqs=required&ssl_ca_certs=${caDir}/ca.crt";
    in
    "${scheme}://:$(REDIS_PASSWORD)@${cfg.redis.host}:${toString cfg.redis.port}/${toString db}${tls}";

  pool = types.submodule ({ name, config, ... }:
    let python = config.kind == "python-celery";
    in {
      options = {
        kind = mkOption {
          type = types.enum [ "celery-autoscale" "python-celery" ];
          default = "celery-autoscale";
          description = ''
            What the pool runs. "celery-autoscale": our worker (image's entrypoint, `worker` args,
            /metrics, /healthz and /readyz on the metrics port). "python-celery": a Python Celery
            image running `celery -A <celeryApp> worker`, probed with `celery inspect ping`.
            Both take the same queues and scale on the same External metric.
          '';
        };
        image = mkOption {
          type = types.str;
          default = images.worker;
          defaultText = lib.literalExpression "images.worker";
          description = "The container image, pinned by tag.";
        };
        command = mkOption {
          type = types.nullOr (types.listOf types.str);
          default = if python then [ "celery" ] else null;
          description = "The container command; null keeps the image's entrypoint.";
        };
        args = mkOption {
          type = types.listOf types.str;
          description = "The container args. Default: built from kind and the options below, then extraArgs.";
        };
        extraArgs = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Appended to the default args, e.g. [ \"--time-limit\" \"300\" ].";
        };
        celeryApp = mkOption {
          type = types.str;
          default = "tasks";
          description = "python-celery only: the app module, as in `celery -A tasks worker`.";
        };
        env = mkOption {
          type = types.listOf (types.attrsOf types.anything);
          default = [ ];
          description = "Extra environment, after REDIS_PASSWORD, BROKER_URL, BACKEND_URL and LOG_FORMAT.";
        };
        concurrency = mkOption {
          type = types.ints.between 1 1024;
          default = 2;
          description = "Tasks run at a time per pod (WORKER_CONCURRENCY, or celery --concurrency).";
        };
        queues = mkOption {
          type = types.nonEmptyListOf types.str;
          default = [ c.queue ];
          description = "Queues the pool consumes; the exporter reports each and the HPA scales on their sum.";
        };
        resources = mkOption {
          type = types.attrsOf (types.attrsOf types.str);
          # Small requests so that maxReplicas (20) fits a Minikube node sized for the demo.
          default = (import ./workload.nix).resources { cpu = "100m"; memory = "64Mi"; maxCpu = "1"; maxMemory = "256Mi"; };
          description = "The container's requests and limits, in Kubernetes' shape.";
        };
        shutdownTimeout = mkOption {
          type = types.ints.unsigned;
          default = 30;
          description = ''
            Seconds a SIGTERMed worker lets running tasks finish (our --shutdown-timeout; a Python
            worker's warm shutdown waits for its tasks, bounded only by the grace period).
          '';
        };
        terminationGracePeriodSeconds = mkOption {
          type = types.ints.unsigned;
          default = config.shutdownTimeout + 15;
          defaultText = lib.literalExpression "shutdownTimeout + 15";
          description = "Longer than shutdownTimeout, so the kubelet's SIGKILL never cuts a warm shutdown short.";
        };
        visibilityTimeout = mkOption {
          type = types.ints.positive;
          default = if python then 3600 else 60;
          defaultText = lib.literalExpression ''if kind == "python-celery" then 3600 else 60'';
          description = ''
            Seconds after which a taken, unacknowledged message goes back to its queue. Our workers
            renew the lease of every message they hold, so 60 s is safe for any task length and a
            dead pod's tasks come back within about a minute. Python Celery workers do not renew:
            for them (and for every worker of a fleet that shares queues with them) it must exceed
            the longest task and ETA/countdown wait, as in Celery (default 3600). python-celery
            passes it as the env VISIBILITY_TIMEOUT, which the app must read into
            broker_transport_options (as the project's tests/python/tasks.py does).
          '';
        };
        podDeletionCost = mkOption {
          type = types.bool;
          default = false;
          description = ''
            Scale-in removes idle workers first: each worker keeps its pod's
            controller.kubernetes.io/pod-deletion-cost annotation at 0 while idle and higher while
            it runs tasks (--pod-deletion-cost), and the ReplicaSet controller deletes the lowest
            first. Renders a ServiceAccount, a Role that may patch pods in the namespace (RBAC
            cannot name the caller's own pod), and a ValidatingAdmissionPolicy that narrows the
            grant back to the caller's own pod and this one annotation (Kubernetes >= 1.30, with
            bound service-account tokens naming their pod, >= 1.32 by default). Off by default
            because it gives the worker an API credential; our worker only (not python-celery).
          '';
        };
        events = mkOption {
          type = types.bool;
          default = false;
          description = "Send task events (--events, Celery's -E), as Flower and `celery events` need. Off by default, as in Celery.";
        };
        hpa = {
          minReplicas = mkOption { type = types.ints.positive; default = policy.minReplicas; description = "The HPA's minReplicas."; };
          maxReplicas = mkOption { type = types.ints.positive; default = policy.maxReplicas; description = "The HPA's maxReplicas."; };
          averageValue = mkOption {
            type = types.str;
            default = policy.averageValue;
            description = "Target queue depth per pod: desired replicas = ceil(depth / averageValue).";
          };
          behavior = mkOption {
            type = types.attrsOf types.anything;
            default = policy.behavior;
            description = "The HPA's behavior (scaling policies and stabilization windows).";
          };
        };
        selectorLabels = mkOption {
          type = types.attrsOf types.str;
          internal = true;
          readOnly = true;
          # Pods of every pool keep app.kubernetes.io/name=worker (NetworkPolicies, the scrape
          # Service); a pool label keeps the selectors of several pools disjoint.
          default = c.selectorLabels c.apps.worker // lib.optionalAttrs (name != c.apps.worker) { "celery-autoscale/pool" = name; };
        };
      };
      config.args = lib.mkDefault ((if python then [
        "-A"
        config.celeryApp
        "worker"
        "--queues"
        (lib.concatStringsSep "," config.queues)
        "--concurrency"
        (toString config.concurrency)
        # One message per slot: the backlog stays in Redis, where the HPA sees it.
        "--prefetch-multiplier"
        "1"
        "--loglevel"
        "INFO"
      ] else [
        "worker"
        "--queues"
        (lib.concatStringsSep "," config.queues)
        "--metrics-addr"
        "0.0.0.0:${toString c.ports.worker}"
        "--shutdown-timeout"
        (toString config.shutdownTimeout)
        "--visibility-timeout"
        (toString config.visibilityTimeout)
      ]) ++ lib.optional config.events "--events"
      ++ lib.optional (config.podDeletionCost && !python) "--pod-deletion-cost"
      ++ config.extraArgs);
    });
in
{
  options.celeryAutoscale = {
    redis = {
      host = mkOption { type = types.str; default = "redis"; description = "Redis host (the in-cluster Service by default)."; };
      port = mkOption { type = types.port; default = c.ports.redis; description = "Redis port."; };
      caSecret = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "redis-ca";
        description = ''
          A Secret whose key ca.crt is the CA that signed the Redis server's certificate. When set,
          every client mounts it read-only at ${caDir} and connects with
          rediss://:$(REDIS_PASSWORD)@host:port/db?ssl_cert_reqs=required&ssl_ca_certs=${caDir}/ca.crt.
          The in-cluster Redis serves plain TCP: use this with a Redis that serves TLS.
        '';
      };
      serverTlsSecret = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "redis-tls";
        description = ''
          The in-cluster Redis serves TLS only (no plain port), with this Secret's tls.crt and tls.key
          (the shape cert-manager writes; the certificate must name the host `redis`). Clients need
          caSecret too (it may be the same Secret: cert-manager adds ca.crt).
        '';
      };
      env = mkOption {
        type = types.listOf (types.attrsOf types.anything);
        internal = true;
        readOnly = true;
        description = "The Redis client environment (a list: $(REDIS_PASSWORD) expands only earlier entries).";
        default = [
          { name = "REDIS_PASSWORD"; valueFrom.secretKeyRef = c.redisSecret; }
          { name = "BROKER_URL"; value = redisUrl 0; }
          { name = "BACKEND_URL"; value = redisUrl 1; }
          { name = "LOG_FORMAT"; value = "json"; }
        ];
      };
      volumes = mkOption {
        type = types.listOf (types.attrsOf types.anything);
        internal = true;
        readOnly = true;
        description = "The CA volume, when redis.caSecret is set.";
        default = lib.optional (cfg.redis.caSecret != null) {
          name = "redis-ca";
          secret = { secretName = cfg.redis.caSecret; items = [{ key = "ca.crt"; path = "ca.crt"; }]; };
        };
      };
      mounts = mkOption {
        type = types.listOf (types.attrsOf types.anything);
        internal = true;
        readOnly = true;
        description = "The CA mount, when redis.caSecret is set.";
        default = lib.optional (cfg.redis.caSecret != null) { name = "redis-ca"; mountPath = caDir; readOnly = true; };
      };
    };

    workers = mkOption {
      type = types.attrsOf pool;
      default.${c.apps.worker} = { };
      description = "Worker pools by name: each a Deployment, a PodDisruptionBudget and an HPA of that name.";
    };

    queues = mkOption {
      type = types.listOf types.str;
      internal = true;
      readOnly = true;
      description = "Every queue some pool consumes, in pool order: the exporter's --queues.";
      default = lib.unique (lib.concatMap (p: p.queues) (lib.attrValues cfg.workers));
    };
  };
}

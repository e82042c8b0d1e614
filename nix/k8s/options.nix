# The options the worker pools, their HPAs, the exporter and the loadgen Job are rendered from.
# Imported by worker.nix, autoscaling.nix, exporter.nix, monitoring.nix and loadgen.nix (the module system imports
# it once however many modules name it). The defaults render the base deployment k8s/.
#
#   celeryAutoscale.redis    where the Redis is, whether the in-cluster one serves TLS, and how
#                            clients trust it (a CA from a Secret, rediss:// URLs)
#   celeryAutoscale.workers  one entry per worker pool: a Deployment, a PodDisruptionBudget and an
#                            HPA named after the entry, scaling on the pool's queues by its
#                            hpa.signal (depth by default) with its hpa.profile's numbers
#   celeryAutoscale.pipeline how often the exporter polls Redis and Prometheus scrapes it
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
  signals = import ./signals.nix;
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
          profile = mkOption {
            type = types.enum (lib.attrNames policy.profiles);
            default = "seed";
            description = ''
              The numbers signal, averageValue and behavior default to (scaling-policy.nix):
              "seed" (depth, 10 per pod, up 200 %/15 s, down 50 %/30 s after 60 s) or "tuned" (what
              `simulate --tune` chose, examples/hpa-tuned.yaml: depth+running, 2 per pod, up 10 pods
              per 15 s, down 100 % per 15 s, no windows). Setting signal, averageValue or behavior
              overrides the profile's.
            '';
          };
          minReplicas = mkOption { type = types.ints.positive; default = policy.minReplicas; description = "The HPA's minReplicas."; };
          maxReplicas = mkOption { type = types.ints.positive; default = policy.maxReplicas; description = "The HPA's maxReplicas."; };
          signal = mkOption {
            type = types.enum signals.names;
            default = policy.profiles.${config.hpa.profile}.signal;
            defaultText = lib.literalExpression "the profile's (seed: \"depth\")";
            description = ''
              What the HPA's External metric carries (signals.nix; `simulate --signal`, `local --signal`):
              "depth" (celery_queue_depth: tasks waiting), "depth+running" (celery_queue_depth_running:
              + tasks held by workers), "depth+arrivals" (celery_queue_depth_arrivals: + lookaheadSeconds
              × the arrival rate; a single pool on a single queue only, as the workers' completions
              carry no queue) or "depth+growth" (celery_queue_depth_growth: + lookaheadSeconds × the
              queue's growth rate, when positive). The adapter serves all four.
            '';
          };
          lookaheadSeconds = mkOption {
            type = types.ints.unsigned;
            default = policy.lookaheadSeconds;
            description = ''
              depth+arrivals and depth+growth: seconds of arrivals the rate term adds, the metric delay
              + HPA sync period + pod start (15 + 15 + 10). The adapter serves one rule per signal:
              every pool on a rate signal must use the same value.
            '';
          };
          averageValue = mkOption {
            type = types.str;
            default = policy.profiles.${config.hpa.profile}.averageValue;
            defaultText = lib.literalExpression "the profile's (seed: \"10\")";
            description = "Target metric per pod: desired replicas = ceil(metric / averageValue).";
          };
          behavior = mkOption {
            type = types.attrsOf types.anything;
            default = policy.profiles.${config.hpa.profile}.behavior;
            defaultText = lib.literalExpression "the profile's";
            description = "The HPA's behavior (scaling policies and stabilization windows).";
          };
          metricName = mkOption {
            type = types.str;
            internal = true;
            readOnly = true;
            description = "The External metric the HPA reads: the signal's (signals.nix).";
            default =
              let pools = lib.attrNames cfg.workers;
              in
              if config.hpa.signal == "depth+arrivals" && (lib.length pools > 1 || lib.length config.queues > 1) then
                throw ''
                  celeryAutoscale.workers.${name}.hpa.signal = "depth+arrivals" needs a single pool on a single queue
                  (pools: ${lib.concatStringsSep ", " pools}; queues of ${name}: ${lib.concatStringsSep ", " config.queues}):
                  the workers' celery_task_success_total carries no queue, so the arrivals of one queue cannot be told
                  apart. Use signal = "depth+growth" (it needs no completions) or "depth+running".''
              else signals.metricName config.hpa.signal;
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

    # How late the HPA sees the depth: at worst the exporter's poll interval plus the exporter job's
    # scrape interval (the adapter queries Prometheus when the HPA asks). `simulate --scrape-delay`
    # models that sum, and `simulate --tune` prints these two options for the delay it chose.
    pipeline = {
      exporterIntervalSeconds = mkOption {
        type = types.ints.between 1 60;
        default = 5;
        description = "How often the exporter reads the queues from Redis (its --interval).";
      };
      scrapeIntervalSeconds = mkOption {
        type = types.ints.between 1 60;
        default = 5;
        description = "How often Prometheus scrapes the exporter (the celery-queue-exporter job's scrape_interval).";
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

    adapterRules = mkOption {
      type = types.listOf (types.attrsOf types.str);
      internal = true;
      readOnly = true;
      description = ''
        The adapter's External metrics, one per signal (signals.nix): { signal, metricName, metricsQuery },
        the rate signals with the lookaheadSeconds of the pools that use one (else the default).
      '';
      default =
        let
          ratePools = lib.filterAttrs (_: p: signals.usesRate p.hpa.signal) cfg.workers;
          lookaheads = lib.unique (lib.mapAttrsToList (_: p: p.hpa.lookaheadSeconds) ratePools);
          lookahead =
            if lookaheads == [ ] then policy.lookaheadSeconds
            else if lib.length lookaheads == 1 then lib.head lookaheads
            else
              throw ''
                celeryAutoscale.workers.<pool>.hpa.lookaheadSeconds differ between the pools on depth+arrivals or
                depth+growth (${lib.concatStringsSep ", " (lib.mapAttrsToList (n: p: "${n}: ${toString p.hpa.lookaheadSeconds}") ratePools)}):
                the adapter serves one rule per signal; give them the same lookaheadSeconds.'';
          query = signals.query { inherit lookahead; window = policy.rateWindowSeconds; };
        in
        map (signal: { inherit signal; metricName = signals.metricName signal; metricsQuery = query signal; }) signals.names;
    };
  };
}

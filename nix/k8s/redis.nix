# Redis: a single-replica StatefulSet with an append-only file on a PersistentVolume (files/redis.conf),
# a ClusterIP Service `redis` for clients and a headless Service governing the StatefulSet.
#
# The password lives in the Secret redis-auth (key `password`). It is created by the deploy step and
# never committed, so it is not part of these manifests:
#   kubectl -n celery-autoscale create secret generic redis-auth --from-literal=password=$(openssl rand -hex 24)
# Use a hex password: it is passed to redis-server and embedded in redis:// URLs unescaped.
#
# With celeryAutoscale.redis.serverTlsSecret (options.nix) it serves TLS only, on the same port.
{ lib, config, ... }:
let
  c = import ./constants.nix;
  w = import ./workload.nix;
  app = c.apps.redis;
  redisConf = builtins.readFile ./files/redis.conf;
  passwordFromSecret = name: { inherit name; valueFrom.secretKeyRef = c.redisSecret; };
  tlsSecret = config.celeryAutoscale.redis.serverTlsSecret;
  tlsDir = "/etc/redis-tls";
  tls = tlsSecret != null;
  # Clients are authenticated by the password, not by certificates.
  tlsArgs = [ "--port" "0" "--tls-port" (toString c.ports.redis) "--tls-cert-file" "${tlsDir}/tls.crt" "--tls-key-file" "${tlsDir}/tls.key" "--tls-auth-clients" "no" ];
in
{
  imports = [ ./common.nix ./options.nix ];

  kubernetes.resources = {
    configMaps.redis-config.data."redis.conf" = redisConf;

    services.redis.spec = {
      selector = c.selectorLabels app;
      ports = [{ name = "redis"; port = c.ports.redis; targetPort = "redis"; }];
    };
    services.redis-headless.spec = {
      clusterIP = "None";
      selector = c.selectorLabels app;
      ports = [{ name = "redis"; port = c.ports.redis; targetPort = "redis"; }];
    };

    statefulSets.redis.spec = {
      serviceName = "redis-headless";
      replicas = 1;
      selector.matchLabels = c.selectorLabels app;
      template = {
        metadata = {
          labels = c.podLabels app;
          # A changed redis.conf rolls the pod.
          annotations."celery-autoscale/config-sha256" = builtins.hashString "sha256" redisConf;
        };
        spec = w.pod { user = c.users.redis; tmp = false; volumes = [{ name = "config"; configMap.name = "redis-config"; }] ++ lib.optional tls { name = "tls"; secret.secretName = tlsSecret; }; } // {
          securityContext = c.podSecurityContext c.users.redis // { fsGroupChangePolicy = "OnRootMismatch"; };
          # Time to finish the shutdown fsync of the append-only file.
          terminationGracePeriodSeconds = 30;
          containers.redis = {
            image = c.pinnedImages.redis;
            # No shell: redis-server is PID 1 and gets SIGTERM itself. The kubelet expands $(REDIS_PASSWORD).
            command = [ "redis-server" ];
            args = [ "/etc/redis/redis.conf" "--requirepass" "$(REDIS_PASSWORD)" ] ++ lib.optionals tls tlsArgs;
            env = [
              (passwordFromSecret "REDIS_PASSWORD")
              (passwordFromSecret "REDISCLI_AUTH") # used by redis-cli in the readiness probe
            ];
            ports = [{ name = "redis"; containerPort = c.ports.redis; }];
            # Ready only once the append-only file is loaded (PING answers LOADING until then).
            readinessProbe = {
              exec.command = [ "sh" "-c" "redis-cli${lib.optionalString tls " --tls --cacert ${tlsDir}/ca.crt"} ping | grep -qx PONG" ];
              periodSeconds = 5;
              timeoutSeconds = 3;
            };
            # TCP only: loading a large append-only file must not get the pod killed.
            livenessProbe = { tcpSocket.port = "redis"; initialDelaySeconds = 10; periodSeconds = 10; failureThreshold = 6; };
          } // w.container {
            user = c.users.redis;
            tmp = false;
            mounts = [
              { name = "data"; mountPath = "/data"; }
              { name = "config"; mountPath = "/etc/redis"; readOnly = true; }
            ] ++ lib.optional tls { name = "tls"; mountPath = tlsDir; readOnly = true; };
            resources = w.resources { cpu = "50m"; memory = "64Mi"; maxCpu = "500m"; maxMemory = "256Mi"; };
          };
        };
      };
      volumeClaimTemplates = [{
        metadata.name = "data";
        spec = {
          accessModes = [ "ReadWriteOnce" ];
          resources.requests.storage = "1Gi";
        };
      }];
    };
  };
}

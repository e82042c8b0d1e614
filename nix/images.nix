# The OCI images (nix2container), one per role, both holding the one binary:
#   celery-autoscale-app   worker and loadgen: the manifests pass only `args`
#                          (`worker --queues celery …`, `loadgen burst --n 400 …`)
#   celery-queue-exporter  the queue-depth exporter (`exporter --queues celery …`)
# Each runs as a numeric user (nix/k8s/constants.nix: users.app), so that the kubelet can verify
# runAsNonRoot. No shell and no system CA certificates: a `rediss://` URL works with the CA it
# names (`?ssl_ca_certs=/path`, mounted from a Secret), not with public roots. To trust those,
# add cacert to copyToRoot and set SSL_CERT_FILE in config.Env.
{ lib, runCommand, nix2container, package }:
let
  c = import ./k8s/constants.nix;
  inherit (c.users.app) uid gid;

  # /etc/passwd and /etc/group name the user, and /tmp is there for `docker run`. In Kubernetes
  # the root filesystem is read-only and the pod mounts an emptyDir at /tmp instead.
  rootfs = runCommand "celery-autoscale-rootfs" { } ''
    mkdir -p $out/etc $out/tmp
    cat > $out/etc/passwd <<'PASSWD'
    root:x:0:0:root:/root:/sbin/nologin
    app:x:${toString uid}:${toString gid}:celery-autoscale:/tmp:/sbin/nologin
    PASSWD
    cat > $out/etc/group <<'GROUP'
    root:x:0:
    app:x:${toString gid}:
    GROUP
  '';

  # The binary's runtime closure (the binary, glibc, libgcc) as layers of its own, split by
  # popularity so the libraries sit apart from the binary. Both images share these layers, so a
  # registry stores them once.
  runtime = nix2container.buildLayer {
    deps = [ package ];
    maxLayers = 4;
  };

  image = { name, role, port }: nix2container.buildImage {
    inherit name;
    layers = [ runtime ];
    copyToRoot = [ rootfs ];
    perms = [{ path = rootfs; regex = "/tmp$"; mode = "1777"; }];
    config = {
      Entrypoint = [ (lib.getExe package) ];
      # The role when run without arguments; the Kubernetes `args` replace it.
      Cmd = [ role ];
      User = "${toString uid}:${toString gid}";
      ExposedPorts."${toString port}/tcp" = { };
    };
  };
in
{
  app = image { name = "celery-autoscale-app"; role = "worker"; port = c.ports.worker; };
  exporter = image { name = "celery-queue-exporter"; role = "exporter"; port = c.ports.exporter; };
}

# The pod and container blocks every workload here repeats: the restricted-profile security
# contexts, the pull policy, the writable /tmp for a read-only root filesystem, HTTP probes and
# resources. A plain attribute set of functions, imported with `import ./workload.nix`.
let
  c = import ./constants.nix;
  nonEmpty = name: list: if list == [ ] then { } else { ${name} = list; };
in
{
  # Pod-level fields. `token`: whether the pod needs its ServiceAccount token (only API readers do).
  pod = { user, token ? false, tmp ? true, volumes ? [ ] }: {
    automountServiceAccountToken = token;
    securityContext = c.podSecurityContext user;
  } // nonEmpty "volumes" ((if tmp then [ c.tmpVolume ] else [ ]) ++ volumes);

  # Container fields beyond name, image, args and env. `tmp` mounts the pod's /tmp volume first;
  # `resources` in Kubernetes' shape (see `resources` below); `probes`: readinessProbe and livenessProbe.
  container = { user, tmp ? true, mounts ? [ ], resources, probes ? { } }: {
    imagePullPolicy = "IfNotPresent";
    securityContext = c.containerSecurityContext user;
    inherit resources;
  } // probes // nonEmpty "volumeMounts" ((if tmp then [ c.tmpMount ] else [ ]) ++ mounts);

  # Requests and limits on one line: { cpu; memory; maxCpu; maxMemory; }.
  resources = { cpu, memory, maxCpu, maxMemory }: {
    requests = { inherit cpu memory; };
    limits = { cpu = maxCpu; memory = maxMemory; };
  };

  # Readiness and liveness probes on HTTP GETs of a named port. ready/live: the path, optionally
  # the scheme, and the probe's timing fields.
  httpProbes = port: { ready, live }:
    let
      get = field: p: if p ? ${field} then { ${field} = p.${field}; } else { };
      probe = p: { httpGet = { inherit (p) path; inherit port; } // get "scheme" p; } // removeAttrs p [ "path" "scheme" ];
    in
    { readinessProbe = probe ready; livenessProbe = probe live; };
}

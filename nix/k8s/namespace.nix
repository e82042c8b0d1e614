# The namespace. Pod Security Admission enforces the "restricted" profile: every pod here must run
# as non-root with no privilege escalation, all capabilities dropped and the RuntimeDefault seccomp profile.
{ lib, ... }:
let
  c = import ./constants.nix;
in
{
  imports = [ ./common.nix ];

  kubernetes.resources.namespaces.${c.namespace}.metadata = {
    namespace = lib.mkForce null; # cluster-scoped
    labels = {
      "pod-security.kubernetes.io/enforce" = "restricted";
      "pod-security.kubernetes.io/enforce-version" = "latest";
      "pod-security.kubernetes.io/warn" = "restricted";
      "pod-security.kubernetes.io/audit" = "restricted";
    };
  };
}

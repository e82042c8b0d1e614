# Settings every module shares. Each module imports this file, so a module evaluates on its own
# (scripts/render-k8s.sh renders one YAML file per module) and inside default.nix alike
# (the module system imports a file once, however many modules name it).
{ kubenix, ... }:
let
  c = import ./constants.nix;
in
{
  imports = [ kubenix.modules.k8s ];

  kubenix.project = c.namespace;
  kubernetes = {
    # The newest version the manifests are validated against (scripts/check-k8s.sh: 1.33 and 1.34).
    version = "1.34";
    namespace = c.namespace;
    # No kubenix/hash label: re-rendering an unchanged module gives identical bytes and clean diffs.
    addHashLabel = false;
    api.defaults = [{ default.metadata.labels."app.kubernetes.io/part-of" = c.namespace; }];
  };
}

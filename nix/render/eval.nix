# Offline evaluation of one kubenix module, for scripts/render-k8s.sh: no flakes, no full nixpkgs.
# kubenix's object modules only need `lib` and a system name from `pkgs`, so a stub stands in for
# nixpkgs; pure data (config.kubernetes.generated) evaluates, derivations (resultYAML) would not.
# The flake renders through kubenix's own evalModules instead (nix/manifests.nix); both must agree,
# which checks.manifests-fresh proves on every push.
#   libSrc:     a nix-community/nixpkgs.lib source tree (its lib/ directory is nixpkgs' lib)
#   kubenixSrc: a hall/kubenix source tree at the revision flake.lock pins
#   module:     the module file; moduleArgs: extra module arguments (the image references)
{ libSrc, kubenixSrc, module, moduleArgs ? { } }:
let
  baseLib = import (libSrc + "/lib");
  system = "x86_64-linux";
  pkgs = {
    lib = baseLib;
    inherit system;
    stdenv.hostPlatform.system = system;
  };
  # kubenix's flake adds its helpers (toYAML, importYAML, …) to lib the same way.
  lib = baseLib.extend (final: _: import (kubenixSrc + "/lib/upstreamables.nix") { lib = final; inherit pkgs; });
  kubenix = {
    lib = import (kubenixSrc + "/lib") { inherit pkgs lib; };
    modules = import (kubenixSrc + "/modules");
  };
in
(lib.evalModules {
  modules = [
    module
    { config._module.args = { inherit pkgs; name = "default"; } // moduleArgs; }
  ];
  specialArgs = { inherit pkgs kubenix; };
}).config.kubernetes.generated

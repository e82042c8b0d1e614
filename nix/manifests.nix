# The kubenix modules (nix/k8s) rendered to the YAML tree that k8s/ holds, with the images given.
# There is one renderer, scripts/render-k8s.sh: its --from-json form takes base-modules.json (the
# file names nix/k8s/default.nix imports) and, for each of those modules and for default.nix,
# loadgen.nix, keda.nix and every example-*.nix, <module>.json: that module's
# config.kubernetes.generated. Here kubenix's own evalModules (its flake output) produces those files.
# passthru.json is that directory of JSON, e.g. `nix build .#manifests.json`.
{ lib, runCommand, writeText, linkFarm, python3, evalModules, images }:
let
  baseModules = map (path: baseNameOf (toString path)) (import ./k8s/default.nix).imports;
  # The example modules (nix/k8s/example-*.nix), each rendered to a Component under k8s/examples/.
  exampleModules = lib.filter (name: lib.hasPrefix "example-" name && lib.hasSuffix ".nix" name)
    (lib.attrNames (builtins.readDir ./k8s));
  # default.nix is the base evaluated whole: the renderer checks that the parts add up to it.
  modules = baseModules ++ [ "default.nix" "loadgen.nix" "keda.nix" ] ++ exampleModules;

  generated = file: (evalModules {
    module = ./k8s + "/${file}";
    specialArgs = { inherit images; };
  }).config.kubernetes.generated;

  json = linkFarm "celery-autoscale-k8s-json" (
    [{ name = "base-modules.json"; path = writeText "base-modules.json" (builtins.toJSON baseModules); }]
    ++ map
      (file: rec {
        name = "${lib.removeSuffix ".nix" file}.json";
        path = writeText name (builtins.toJSON (generated file));
      })
      modules
  );
in
runCommand "celery-autoscale-manifests"
{
  nativeBuildInputs = [ (python3.withPackages (ps: [ ps.pyyaml ])) ];
  passthru = { inherit json; };
} ''
  bash ${../scripts/render-k8s.sh} --from-json ${json} "$out"
''

# `nix run .#deploy-minikube`: start Minikube if needed, load both images, apply the manifests
# rendered with those images' tags, and wait until the HPA can read its metric
# (the steps are in deploy-minikube.sh).
{ lib, writeShellApplication, minikube, kubectl, openssl, coreutils, gnugrep, images, manifests }:
writeShellApplication {
  name = "deploy-minikube";
  runtimeInputs = [ minikube kubectl openssl coreutils gnugrep ];
  runtimeEnv = {
    MANIFESTS = manifests;
    APP_IMAGE = "${images.app.imageName}:${images.app.imageTag}";
    APP_COPY_TO = lib.getExe images.app.copyTo;
    EXPORTER_IMAGE = "${images.exporter.imageName}:${images.exporter.imageTag}";
    EXPORTER_COPY_TO = lib.getExe images.exporter.copyTo;
  };
  text = builtins.readFile ./deploy-minikube.sh;
}

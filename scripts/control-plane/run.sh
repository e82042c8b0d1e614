#!/usr/bin/env bash
# The Kubernetes path on this machine, in one command: build the upstream control plane (cached,
# scripts/control-plane/build.sh) and our release binary, then scripts/control-plane/run.py starts
# it all on 127.0.0.1, applies k8s/, runs the burst and the ramp with the real HPA, compares
# `simulate --trace` with it sync by sync, runs the negative tests and stops every process.
#   scripts/control-plane/run.sh [--scenarios burst,ramp,burst-io,oscillate,scale-in,tuned] [--skip-negative] [--keep]
# Needs: Go >= 1.26 with the module proxy (first run only, ~20 min on 2 cores), redis-server,
# prometheus, openssl, and a Python with PyYAML and redis-py (scripts/test.sh's .venv).
# Root, or net.ipv4.ip_unprivileged_port_start <= 443: the adapter listens on the APIService's port.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(scripts/control-plane/build.sh)
cargo build --release --locked --quiet
py=${PYTHON:-.venv/bin/python}
[[ -x $py ]] || py=python3
exec "$py" scripts/control-plane/run.py --bin "$bin" --app target/release/celery-autoscale "$@"

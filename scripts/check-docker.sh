#!/usr/bin/env bash
# Checks the Dockerfile on a machine without Docker (CI has none): what can be checked here is
# checked, the image build itself is not.
#
#   scripts/check-docker.sh
#
# 1. It parses: only known instructions, each stage named, every COPY --from names an earlier
#    stage, the last stage is the app image, the runtime user is nix/k8s/constants.nix's app user,
#    the ENTRYPOINT is the file the binary is copied to, and the exposed ports are the manifests'.
# 2. Its build step works: the files its COPY lines name (and only those) are copied into a fresh
#    directory, and its RUN line runs there as written, with `--release` dropped (the debug build
#    reuses the test build's crates; a release build would take ~10 min of two cores) and
#    `--offline` added (the crates come from the local Cargo cache, as Docker's would from crates.io).
#    About 4 min on two cores the first time; seconds once tests/library_use.rs has built the tree.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

echo "== Dockerfile parses"
python3 - <<'PY'
import re, shlex, sys
known = {"FROM", "WORKDIR", "COPY", "RUN", "USER", "ENTRYPOINT", "CMD", "EXPOSE", "ENV", "ARG"}
stages, problems, copies, runs = [], [], [], []
user = entry = None
exposed = {}
for n, line in enumerate(open("Dockerfile"), 1):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    word, _, rest = line.partition(" ")
    if word not in known:
        problems.append(f"line {n}: unknown instruction {word}")
    if word == "FROM":
        m = re.fullmatch(r"(\S+)(?: AS (\S+))?", rest)
        if not m or not m.group(2):
            problems.append(f"line {n}: FROM without a stage name")
        stages.append(m.group(2) if m else None)
    elif word == "COPY":
        parts = shlex.split(rest)
        src = [p for p in parts if p.startswith("--from=")]
        if src and src[0][7:] not in stages[:-1]:
            problems.append(f"line {n}: COPY --from={src[0][7:]} names no earlier stage")
        if not src and stages[-1] == "build":
            copies.append(parts[:-1])
        if src:
            binary = parts[-1]
    elif word == "RUN" and stages[-1] == "build":
        runs.append(rest)
    elif word == "USER":
        user = rest
    elif word == "ENTRYPOINT":
        entry = rest
    elif word == "EXPOSE":
        exposed[stages[-1]] = rest
if stages[-1] != "app":
    problems.append("the last stage (what `docker build .` makes) is not app")
consts = open("nix/k8s/constants.nix").read()
uid = re.search(r"app = \{ uid = (\d+); gid = (\d+);", consts)
if not uid or user != f"{uid.group(1)}:{uid.group(2)}":
    problems.append(f"USER {user} is not nix/k8s/constants.nix's app user")
if entry != f'["{binary}"]':
    problems.append(f"ENTRYPOINT {entry} is not the copied binary {binary}")
for stage, port in [("app", "worker"), ("exporter", "exporter")]:
    want = re.search(rf"\b{port} = (\d+);", consts).group(1)
    if exposed.get(stage) != want:
        problems.append(f"stage {stage} exposes {exposed.get(stage)}, the manifests' {port} port is {want}")
if problems:
    print("\n".join(problems)); sys.exit(1)
open("/tmp/.check-docker-copies", "w").write("\n".join(" ".join(c) for c in copies) + "\n")
open("/tmp/.check-docker-run", "w").write("\n".join(runs) + "\n")
print(f"ok: stages {stages}, USER {user}, ENTRYPOINT {entry}")
PY

echo "== its build step, in a directory holding only what its COPY lines copy"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx" /tmp/.check-docker-copies /tmp/.check-docker-run' EXIT
while read -r -a files; do
  for f in "${files[@]}"; do
    mkdir -p "$ctx/$(dirname "$f")"
    cp -r "$f" "$ctx/$f"
  done
done </tmp/.check-docker-copies
run=$(cat /tmp/.check-docker-run)
[[ $run == "cargo build --release --locked --bin celery-autoscale" ]] || { echo "FAIL: unexpected RUN: $run"; exit 1; }
# The dependencies without the dev-dependencies' features: the same build tests/library_use.rs
# makes, so the two share one target directory (the first of them compiles the tree, the other
# reuses it).
(cd "$ctx" && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}/tmp/library-use" cargo build --quiet --locked --offline --bin celery-autoscale)
echo "ok: '$run' builds from the Dockerfile's context alone (debug, offline)"

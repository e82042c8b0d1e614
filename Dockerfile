# The images without Nix: the same binary as nix/images.nix, built by Cargo from Cargo.lock.
#
#   docker build -t celery-autoscale-app:dev .
#   docker build -t celery-queue-exporter:dev --target exporter .
#
# Both hold the one binary; the Kubernetes manifests pass only `args` (worker …, exporter …,
# loadgen …), so the CMD is only what `docker run` does without arguments. They run as
# 65532:65532 (nix/k8s/constants.nix: users.app), so the pods' runAsNonRoot holds.
# scripts/check-docker.sh checks this file on a machine without Docker.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY k8s/autoscaling.yaml ./k8s/autoscaling.yaml
RUN cargo build --release --locked --bin celery-autoscale

FROM debian:bookworm-slim AS runtime
COPY --from=build /src/target/release/celery-autoscale /usr/local/bin/celery-autoscale
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/celery-autoscale"]

FROM runtime AS exporter
EXPOSE 9808
CMD ["exporter"]

FROM runtime AS app
EXPOSE 9191
CMD ["worker"]

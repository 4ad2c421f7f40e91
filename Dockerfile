# Tally's container image: one static `tally` binary on an empty base, run as
# uid 65532 with a read-only root filesystem; only /data (the PersistentVolume)
# is written. No shell, no package manager: `nslookup` (a link to tally, which
# answers to that name), `tally peers` and `tally visits` are the debugging
# tools (`kubectl exec tally-0 -- nslookup tally-1.tally-headless`).
#
#   docker build -t ghcr.io/tally-dev/tally:0.1.0 .
#   podman build -t ghcr.io/tally-dev/tally:0.1.0 .
#
# scripts/build-image makes the same image without pulling anything: it builds
# the binary on the host and assembles the final stage below (the lines from
# `FROM scratch` on) with podman or docker. Keep that stage free of
# BuildKit-only syntax (no `# syntax=`, `RUN --mount`, `COPY --link`,
# heredocs): scripts/check-image rejects it.

# The version in the image's labels; the build fails if Cargo.toml disagrees.
ARG VERSION=0.1.0
# Same toolchain as the build machines; Cargo.toml's rust-version is the floor.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG VERSION
WORKDIR /src
COPY . .
# scripts/build-image --rootfs: a fully static binary (glibc, crt-static; DNS
# is done in Rust by hickory, so no NSS modules are needed), then the image's
# file tree in /out/rootfs (root-owned) and /out/rootfs-data (uid 65532).
RUN TALLY_EXPECT_VERSION="$VERSION" bash scripts/build-image --rootfs /out

# ---- final stage: scripts/build-image assembles these lines as its Containerfile ----
FROM scratch
ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tally" \
      org.opencontainers.image.description="A durable, cluster-wide visit counter for Kubernetes StatefulSets" \
      org.opencontainers.image.source="https://github.com/tally-dev/tally" \
      org.opencontainers.image.url="https://github.com/tally-dev/tally" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build --chown=0:0 /out/rootfs/ /
COPY --from=build --chown=65532:65532 /out/rootfs-data/ /
ENV PATH=/usr/local/bin \
    TALLY_DATA_DIR=/data \
    TALLY_LISTEN=0.0.0.0:8080
WORKDIR /data
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/tally"]
CMD ["serve"]

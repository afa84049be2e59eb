# syntax=docker/dockerfile:1.7
#
# Switchboard image: both binaries, a non-root user, nothing else.
#   docker build -t switchboard .
#   docker run -p 3002:3002 switchboard                          # embedded single-process mode
#   docker run switchboard switchboard-worker migrate              # with REDIS_URL and DATABASE_URL set
# Needs BuildKit (the default builder of current Docker) for the cache mounts.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
# target/ lives in a cache mount, so the binaries are copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p switchboard-gateway -p switchboard-worker \
 && mkdir -p /out \
 && cp target/release/switchboard-gateway target/release/switchboard-worker /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates is left unpinned on purpose: it must follow the distribution's updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 switchboard \
 && useradd --system --uid 10001 --gid switchboard --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin switchboard \
 && mkdir -p /data \
 && chown switchboard:switchboard /data
COPY --from=builder /out/switchboard-gateway /out/switchboard-worker /usr/local/bin/

# DATA_DIR only matters in embedded mode (no REDIS_URL, no DATABASE_URL): mount a volume on /data
# to keep its SQLite file (docker run -v switchboard-data:/data ...).
ENV PORT=3002 \
    HOST=0.0.0.0 \
    DATA_DIR=/data \
    LOG_FORMAT=json \
    RUST_LOG=info
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 3002
# SIGTERM (Docker's default stop signal) makes a gateway drain for up to DRAIN_TIMEOUT_MS (10 s):
# give containers a stop timeout of 15 s or more.
CMD ["switchboard-gateway"]

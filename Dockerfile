# The ambient-agent image: one image for every process of the product (`ambient-agent node`, `ca`,
# `cleanup`), selected by the first argument. Build: `make image` (here, with buildah against a
# debootstrapped base) or `docker build .` where Docker Hub is reachable.
#
# Privileges: the image's default user is the unprivileged uid 65532, which is what `ambient-agent ca`
# runs as. The node agent cannot: nftables, policy routing and IP_TRANSPARENT sockets need
# CAP_NET_ADMIN/CAP_NET_RAW in the node's network namespace, and Kubernetes gives added capabilities
# only to uid 0 (it has no ambient capabilities). The chart's DaemonSet therefore runs it as uid 0
# with every capability dropped except NET_ADMIN and NET_RAW, without privilege escalation, on a
# read-only root filesystem.
ARG BASE=debian:bookworm-slim

# -- builder: the project's wheel and the wheels of its dependencies ------------------------------
FROM ${BASE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
# `speed` adds uvloop, which the data plane uses when it is installed. The optional build secret
# `pip-ca` is a CA bundle for pip behind a TLS-intercepting proxy; it is mounted only for this step.
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --wheel-dir /wheels '.[speed]' \
 && cd /wheels && sha256sum -- *.whl >SHA256SUMS

# -- runtime ----------------------------------------------------------------------------------------
FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ambient-agent" \
      org.opencontainers.image.description="Sidecar-less mutual TLS for Kubernetes pods: a node agent speaking HBONE" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/ambient-agent/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# nftables (`nft`) programs the capture table; iproute2 (`ip`) is for looking at a node by hand.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv nftables iproute2 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
# The wheels are bind-mounted, not copied, so they never become a layer of this image. Their digests
# are copied: that records what is installed, and it makes the install step's build cache follow the
# wheels (buildah does not key a cached step on the content of a stage it bind-mounts).
COPY --from=builder /wheels/SHA256SUMS /usr/share/ambient-agent/wheels.sha256
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/ambient-agent \
 && /opt/ambient-agent/bin/pip install --no-index --find-links /wheels 'ambient-agent[speed]' \
 && ambient-agent --version
RUN useradd --uid 65532 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin ambient-agent
USER 65532:65532
ENTRYPOINT ["ambient-agent"]
CMD ["--help"]

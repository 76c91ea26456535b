# The one image of istio-pod-network-controller: the agent (`run`), the webhook (`webhook`) and the
# waiting init container (`init`) all run its CLI. The chart uses it for all three.
#
#   docker build -t REGISTRY/istio-pod-network-controller:TAG .      (or podman / buildah)
#
# The project's development and CI machines have no Docker and reach no image registry: there
# scripts/build-images builds this same file with Debian's buildah (`buildah bud --isolation chroot`)
# and passes PYTHON_IMAGE, a Debian bookworm + python3.11 base it builds with mmdebstrap, for the
# real-node tests. So the file stays plain: any PYTHON_IMAGE that is Debian bookworm with `python`
# (3.11, with venv) and apt will do. It runs as a non-root user by default (the webhook and the
# waiter need nothing more); the agent's pod runs it as root through its security context.

ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

# --- build: the package and its dependencies in a virtual environment -------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/ipnc \
 && /opt/ipnc/bin/pip install . \
 && /opt/ipnc/bin/istio-pod-network-controller --version

# --- runtime: the environment plus the node tools the agent runs ------------------------------
FROM ${PYTHON_IMAGE}
# iptables: iptables/ip6tables -save/-restore, both the nft and the legacy variants; nftables: nft;
# iproute2: ip; util-linux: nsenter and unshare (the agent enters pods' network namespaces and
# verifies rulesets in a scratch one).
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables iproute2 util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/ipnc /opt/ipnc
ENV PATH=/opt/ipnc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="istio-pod-network-controller" \
      org.opencontainers.image.description="Programs Istio's traffic redirection into pod network namespaces from a node agent, so meshed pods need no NET_ADMIN" \
      org.opencontainers.image.licenses="Apache-2.0"
# A numeric non-root user: Kubernetes can check runAsNonRoot against it, and OpenShift's
# restricted-v2 replaces it with a UID of the namespace's range.
USER 65532:65532
ENTRYPOINT ["istio-pod-network-controller"]
CMD ["--help"]

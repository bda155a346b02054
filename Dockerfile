# fhir-audit-proxy: one image for the proxy, the sidecar injector (`webhook`) and the
# injected init container's traffic redirect (`python -m proxy.k8s.redirect`). The Node
# test FHIR server is for tests and the demo and is not part of the image.
#
# The base is pinned by digest (python:3.11-slim-bookworm); to move it, resolve the tag
# again (`docker buildx imagetools inspect python:3.11-slim-bookworm`) and replace both.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS build
# gcc: the build compiles the hot-path modules with mypyc (setup.py); without a compiler it
# would install them as pure Python. The compiler stays in this stage: its version is the
# base image's Debian release's, unpinned, as it does not reach the image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md config.example.yaml ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install . \
    && python -m compileall -q /install

FROM ${PYTHON_IMAGE}
# iptables: the redirect init container; tini: PID 1 that forwards SIGTERM to the proxy
# (which drains in-flight requests and flushes the queue) and reaps exec-probe children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables=1.8.9-2 tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 audit \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent audit \
    && mkdir -p /var/lib/fhir-audit-proxy \
    && chown 10001:10001 /var/lib/fhir-audit-proxy
COPY --from=build /install /usr/local
# The root filesystem can be read-only: the store is a volume, /tmp a tmpfs or emptyDir
# (docker run --read-only --tmpfs /tmp -v audit:/var/lib/fhir-audit-proxy ...), and no
# bytecode is written at run time. The admin listener keeps its default, 127.0.0.1: it
# is reachable from outside only when configured with bearer tokens.
ENV FHIR_AUDIT_STORE__PATH=/var/lib/fhir-audit-proxy/audit.db \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
VOLUME ["/var/lib/fhir-audit-proxy"]
EXPOSE 8080
# The admin port of FHIR_AUDIT_ADMIN__PORT (an injected sidecar's is 15081), else 9000.
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-m", "proxy.k8s.probe", "healthz"]
ENTRYPOINT ["tini", "--", "fhir-audit-proxy"]
CMD ["run"]

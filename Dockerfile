# fhir-audit-proxy: the sidecar image. The proxy needs only Python; the Node test FHIR
# server is for tests and the demo and is not part of the image.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home audit \
    && mkdir -p /var/lib/fhir-audit-proxy \
    && chown audit /var/lib/fhir-audit-proxy
USER 10001
ENV FHIR_AUDIT_STORE__PATH=/var/lib/fhir-audit-proxy/audit.db \
    FHIR_AUDIT_ADMIN__HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/fhir-audit-proxy"]
EXPOSE 8080 9000
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["fhir-audit-proxy"]
CMD ["run"]

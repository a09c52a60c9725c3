# One image for both daemons: `edgeproxy run` (the default) and `gateway run`.
#   docker build -t xmpp-federation-edge .
#   podman build --format docker -t xmpp-federation-edge .    (docker format keeps HEALTHCHECK)
# Behind an HTTPS proxy that re-signs certificates, hand pip its CA bundle as a build secret
# (it is never stored in a layer):  --secret id=cabundle,src=/etc/ssl/certs/ca-certificates.crt
# README.md "Run with containers" shows the volumes and the compose file.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/xmpp-edge
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
# The dependencies first, from pyproject.toml alone: this layer survives edits to the source.
RUN --mount=type=secret,id=cabundle \
    if [ -s /run/secrets/cabundle ]; then export PIP_CERT=/run/secrets/cabundle; fi \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    | /opt/xmpp-edge/bin/pip install --no-cache-dir --disable-pip-version-check -r /dev/stdin
COPY edgeproxy ./edgeproxy
COPY gateway ./gateway
RUN --mount=type=secret,id=cabundle \
    if [ -s /run/secrets/cabundle ]; then export PIP_CERT=/run/secrets/cabundle; fi \
 && /opt/xmpp-edge/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps . \
 && /opt/xmpp-edge/bin/pip uninstall -y -q pip setuptools

FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 5269 xmpp-edge \
 && useradd --system --uid 5269 --gid 5269 --home-dir /var/lib/xmpp-edge \
        --shell /usr/sbin/nologin xmpp-edge \
 && install -d -o root -g xmpp-edge -m 0750 /etc/xmpp-edge \
 && install -d -o xmpp-edge -g xmpp-edge -m 0750 /var/lib/xmpp-edge
COPY --from=build /opt/xmpp-edge /opt/xmpp-edge
COPY LICENSE /usr/share/doc/xmpp-federation-edge/LICENSE
ENV PATH=/opt/xmpp-edge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
LABEL org.opencontainers.image.title="xmpp-federation-edge" \
      org.opencontainers.image.description="XMPP S2S edge proxy and gateway component" \
      org.opencontainers.image.licenses="MIT"
# Configuration and certificates (read-only is enough) / the gateway's SQLite database.
VOLUME ["/etc/xmpp-edge", "/var/lib/xmpp-edge"]
WORKDIR /var/lib/xmpp-edge
USER xmpp-edge
# S2S STARTTLS, S2S Direct TLS (XEP-0368), the gateway component link (XEP-0114), the
# gateway's REST + WebSocket API.
EXPOSE 5269 5270 5347 8080
# Exec form: the daemon is PID 1 and gets SIGTERM itself; it closes every stream with
# </stream:stream> and exits 0 (it starts no child processes, so no init is needed to reap).
STOPSIGNAL SIGTERM
# Asks the edge over XMPP (a stream header and features). A gateway container overrides it
# with `gateway healthcheck -c /etc/xmpp-edge/edge.toml` (compose.yaml does).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["edgeproxy", "healthcheck", "-c", "/etc/xmpp-edge/edge.toml"]
CMD ["edgeproxy", "run", "-c", "/etc/xmpp-edge/edge.toml"]

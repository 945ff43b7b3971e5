# toolio-sidecar container image.
#   docker build -t toolio-sidecar:0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
# VERSION must be the version in pyproject.toml (the build checks it); it becomes the
# org.opencontainers.image.version label.
#   docker run --read-only --tmpfs /tmp -v toolio-data:/data -p 8080:8080 toolio-sidecar
# Both stages use the same base so the virtualenv's interpreter path is valid at runtime.

FROM python:3.11-slim AS builder

ARG VERSION=0.1.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

WORKDIR /src
# Project metadata first, then the packages (see .dockerignore for the build context).
COPY pyproject.toml README.md LICENSE ./
COPY sidecar/ sidecar/
COPY admin/ admin/
COPY demo/ demo/
# A non-editable install of the project into the venv (with uvloop, the `fast` extra); pip
# byte-compiles it here, since the read-only runtime image cannot write .pyc files. The
# installers are not needed at run time, so they leave the venv; every module of sidecar and
# admin must import without the demo extra, and the console script must be there.
# DL3013 (pin versions) reads ".[fast]" as a package from an index; it is this project.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[fast]" \
    && pip uninstall --yes pip setuptools \
    && /opt/venv/bin/python -c "import importlib, pkgutil, sidecar, admin, uvloop; [importlib.import_module(m.name) for p in (sidecar, admin) for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]" \
    && test -x /opt/venv/bin/toolio-sidecar \
    && test "$(/opt/venv/bin/python -c 'import sidecar; print(sidecar.__version__)')" = "${VERSION}"


FROM python:3.11-slim AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown

LABEL org.opencontainers.image.title="toolio-sidecar" \
      org.opencontainers.image.description="API-key auth reverse proxy for Toolio's MCP server" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.vendor="Toolio" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary"

# Nothing is written at run time except under /data (the SQLite store) and /tmp.
# stdout is flushed by the sidecar itself every 0.5 s; no PYTHONUNBUFFERED (a syscall per line).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:$PATH" \
    TOOLIO_SIDECAR_CONFIG=/etc/toolio-sidecar/config.toml

# A fixed uid/gid so that volume ownership and runAsUser/fsGroup agree everywhere.
RUN groupadd --gid 10001 toolio \
    && useradd --no-log-init --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin toolio \
    && install -d -o 10001 -g 10001 -m 0750 /data

COPY --from=builder /opt/venv /opt/venv
COPY docker/config.toml /etc/toolio-sidecar/config.toml

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]

# 8080: public proxy listener; 9090: admin listener (admin API and page, /metrics, /readyz).
EXPOSE 8080 9090

# Python's standard library only: the slim image has no curl or wget.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["toolio-sidecar"]
CMD ["serve"]

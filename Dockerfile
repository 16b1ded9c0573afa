# syntax=docker/dockerfile:1
# cdcengine: PostgreSQL logical replication into Delta Lake, as a container.
#
#   docker build -t cdcengine:0.1.0 .
#   docker run --rm -v "$PWD/cdcengine.toml:/etc/cdcengine/cdcengine.toml:ro" \
#     -e CDCENGINE__SHOP__DSN=postgresql://… cdcengine:0.1.0
#
# Two stages: the builder makes a wheel of this project and installs it with its dependencies
# into a venv; the final stage is the same slim Python with only that venv (no compiler, no
# pip cache, no source tree). Every dependency ships manylinux wheels (psycopg[binary] carries
# libpq, pyarrow carries jemalloc, deltalake and duckdb are self-contained), so neither stage
# needs apt packages. The jemalloc the CLI selects for Arrow (`cdcengine.serve.cli`:
# ARROW_DEFAULT_MEMORY_POOL=jemalloc) is the one linked into pyarrow's wheel: no libjemalloc2.
# Both stages must use the same base image: the venv's python is a link to /usr/local/bin.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# pyproject.toml names README.md as the long description: the wheel build reads it
COPY pyproject.toml README.md ./
COPY src ./src
COPY adapters ./adapters
# The venv gets no pip of its own (the builder's pip installs into it through --python):
# the image carries the engine and its dependencies, nothing to install more with. Byte code
# is compiled here, hash-checked rather than by mtime, so that a read-only root file system
# never makes each start compile every module again in memory.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv --without-pip /opt/cdcengine \
    && pip --python /opt/cdcengine/bin/python install --no-cache-dir --no-compile /wheels/*.whl \
    && /opt/cdcengine/bin/python -m compileall -q --invalidation-mode unchecked-hash \
       /opt/cdcengine/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cdcengine" \
      org.opencontainers.image.description="PostgreSQL logical replication into Delta Lake, exactly once" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed, unprivileged UID/GID (10001): Kubernetes' runAsUser / runAsNonRoot and file
# permissions on mounted volumes can name it. -l: no lastlog entry for a high UID.
RUN groupadd --system --gid 10001 cdcengine \
    && useradd --system -l --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin cdcengine \
    && mkdir -p /etc/cdcengine
COPY --from=builder /opt/cdcengine /opt/cdcengine
# TMPDIR: spill files of transactions larger than max_batch_mb, snapshot chunks and verify's
# scratch database all go through tempfile (a read-only root file system mounts a volume
# here). HOME points there too: nothing should write to it, but a library that does must not
# fail on /nonexistent.
ENV PATH=/opt/cdcengine/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/tmp \
    HOME=/tmp
USER 10001:10001
# `docker exec … cdcengine status` finds the mounted config here without --config
WORKDIR /etc/cdcengine
# /health, /status and /metrics: [engine] http_port (default 9790). The config must set
# http_host = "0.0.0.0" (the default listens on loopback only) for anything outside the
# container to reach them; the health check below runs inside it and uses loopback.
EXPOSE 9790
# /health answers 200 while no source is broken, paused or stalled, else 503 (urlopen raises
# on both 503 and a refused connection: exit 1). No curl in the slim image: Python's urllib.
# The port follows CDCENGINE__ENGINE__HTTP_PORT when that override is set.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CDCENGINE__ENGINE__HTTP_PORT', '9790'), timeout=8)"]
ENTRYPOINT ["cdcengine"]
# The daemon: snapshot where needed, then stream every configured source. SIGTERM finishes
# the current Delta commit and exits. Other commands: `docker run … cdcengine:0.1.0 status`.
CMD ["--config", "/etc/cdcengine/cdcengine.toml", "run"]

# clearbudget daemon image: `clearbudget run`, configured by CLEAR_* environment variables.
# Build: docker build --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) -t clearbudget .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the locked dependencies, then the project, into a virtualenv ----------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all: \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/clearbudget
ENV PATH=/opt/clearbudget/bin:$PATH

# Every dependency, and setuptools/wheel to build the project, comes from requirements.lock:
# exact versions, each file checked against its sha256 (--require-hashes), as binary wheels only
# (PIP_ONLY_BINARY), so no compiler is needed. Regenerate the lock as deploy/k8s/README.md says.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

# The project itself, from source with the locked setuptools: --no-deps so nothing unlocked is
# resolved, --no-build-isolation so the build backend is not fetched unpinned either.
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY solver ./solver
COPY daemon ./daemon
RUN pip install --no-deps --no-build-isolation --no-binary=clearbudget . \
    && python -m compileall -q /opt/clearbudget

# --- runtime: the virtualenv on a clean slim base, run as an unprivileged user -------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="clearbudget" \
      org.opencontainers.image.description="Spends a reasoning-token budget across streaming LLM queries (CLEAR)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11-slim-bookworm"

RUN groupadd --system --gid 10001 clear \
    && useradd --system --uid 10001 --gid clear --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin clear

COPY --from=build /opt/clearbudget /opt/clearbudget

# The root filesystem is read-only in Kubernetes: nothing may write next to the code, and
# matplotlib (imported by the CLI's report commands) keeps its cache under /tmp.
ENV PATH=/opt/clearbudget/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /app
USER 10001:10001
EXPOSE 8080

# /healthz on the configured port (CLEAR_HTTP_PORT, default 8080); any error or non-2xx fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CLEAR_HTTP_PORT', '8080') + '/healthz', timeout=4)"]

ENTRYPOINT ["clearbudget"]
CMD ["run"]

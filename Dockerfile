# syntax=docker/dockerfile:1
# Two images from one file, both installing the project as a built wheel (no source tree in the images):
#   docker build --target api    -t divmerge-api .
#   docker build --target worker -t divmerge-worker .                       # CUDA (default base)
#   docker build --target worker --build-arg BASE_IMAGE=ubuntu:24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t divmerge-worker-cpu .
# The API image has no torch: the API never imports it (so it answers POST /v1/merges/validate with 503).
# Build arguments (the defaults are the production ones; scripts/compose-check.sh swaps in local images):
#   BASE_IMAGE        the worker's base (CUDA runtime; any Debian/Ubuntu image with python3 works for CPU)
#   PYTHON_IMAGE      the API's base and the image the wheel is built in (python:3.11-slim)
#   TORCH_INDEX_URL   where the worker's torch comes from (CUDA 12.6 build; .../whl/cpu for CPU)
#   TORCH_FIND_LINKS  an extra wheel location for torch (a local wheel directory served over HTTP)

ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- wheel
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY divmerge_core ./divmerge_core
COPY divmerge_service ./divmerge_service
COPY divmerge_client ./divmerge_client
COPY divmerge_api ./divmerge_api
COPY divmerge_worker ./divmerge_worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . && ls /wheels/divmerge-*.whl

# ---------------------------------------------------------------- api
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DIVMERGE_HOME=/data
WORKDIR /app
COPY pyproject.toml constraints.txt ./
# the service extra's requirements, read from pyproject.toml; the engine's heavy dependencies (torch,
# transformers) stay out of the API image (--no-deps below)
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['service']))" \
      > /tmp/service.txt && pip install --no-cache-dir -c constraints.txt -r /tmp/service.txt && rm /tmp/service.txt
# The migrate job runs `alembic upgrade head` in /app: alembic.ini points at the migrations inside the
# installed package (script_location = divmerge_service:migrations)
COPY alembic.ini ./
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/divmerge-*.whl && rm -rf /tmp/wheels \
    && useradd -r -u 1000 -d /data divmerge && mkdir -p /data/outputs && chown -R divmerge /data
USER divmerge
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["uvicorn", "--factory", "divmerge_api.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--no-server-header"]

# ---------------------------------------------------------------- worker
# (Ubuntu 24.04 bases, the CUDA one included, ship a user 'ubuntu' with uid 1000: it makes way for divmerge)
FROM ${BASE_IMAGE} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DIVMERGE_HOME=/data HF_HOME=/data/hf \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv git \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
WORKDIR /app
COPY constraints.txt ./
# torch first, at constraints.txt's version, from the index that matches the base image (CUDA build, or
# CPU with the cpu index)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_FIND_LINKS=
RUN pip install --no-cache-dir -c constraints.txt torch --index-url "${TORCH_INDEX_URL}" \
      ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"}
# then the engine's and the service's requirements, read from pyproject.toml (a layer that a code change
# does not rebuild), and last the wheel itself
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['service']))" \
      > /tmp/requirements.txt && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/divmerge-*.whl && rm -rf /tmp/wheels \
    && if id -nu 1000 >/dev/null 2>&1; then userdel "$(id -nu 1000)"; fi \
    && useradd -r -u 1000 -d /data divmerge && mkdir -p /data/outputs /data/hf && chown -R divmerge /data
USER divmerge
# liveness: the Celery node answers a ping through the broker (its name is celery@<container hostname>)
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
  CMD celery -A divmerge_worker.celery_app inspect ping --timeout 10 -d "celery@$(hostname)" >/dev/null || exit 1
# one job per GPU: concurrency 1; -Q gpu,cpu (a CPU-only worker uses -Q cpu)
CMD ["celery", "-A", "divmerge_worker.celery_app", "worker", "-Q", "gpu,cpu", "--concurrency", "1", "-P", "solo", \
     "--loglevel", "INFO", "--without-gossip", "--without-mingle"]

# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t divmerge-api .
#   docker build --target worker -t divmerge-worker .                       # CUDA (default base)
#   docker build --target worker --build-arg BASE_IMAGE=ubuntu:24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t divmerge-worker-cpu .
# The API image has no torch: the API never imports it.

ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- api
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DIVMERGE_HOME=/data
WORKDIR /app
COPY pyproject.toml constraints.txt README.md* alembic.ini ./
# the service extra's requirements, read from pyproject.toml; the engine's heavy dependencies (torch,
# transformers) stay out of the API image (--no-deps below)
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['service']))" \
      > /tmp/service.txt && pip install --no-cache-dir -c constraints.txt -r /tmp/service.txt
COPY divmerge_core ./divmerge_core
COPY service_core ./service_core
COPY divmerge_client ./divmerge_client
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir --no-deps . && useradd -r -u 1000 divmerge && mkdir -p /data && chown divmerge /data
USER divmerge
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["uvicorn", "--factory", "api.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--no-server-header"]

# ---------------------------------------------------------------- worker
FROM ${BASE_IMAGE} AS worker
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DIVMERGE_HOME=/data HF_HOME=/data/hf \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv git \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml constraints.txt README.md* alembic.ini ./
# torch first, at constraints.txt's version, from the index that matches the base image (CUDA build, or
# CPU with the cpu index)
RUN pip install --no-cache-dir -c constraints.txt torch --index-url "${TORCH_INDEX_URL}"
COPY divmerge_core ./divmerge_core
COPY service_core ./service_core
COPY divmerge_client ./divmerge_client
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir -c constraints.txt ".[service]" && useradd -r -u 1000 divmerge && mkdir -p /data \
    && chown divmerge /data
USER divmerge
# one job per GPU: concurrency 1; -Q gpu,cpu (a CPU-only worker uses -Q cpu)
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu,cpu", "--concurrency", "1", "-P", "solo", \
     "--loglevel", "INFO", "--without-gossip", "--without-mingle"]

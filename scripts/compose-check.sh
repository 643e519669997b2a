#!/usr/bin/env bash
# The deployment as a platform team starts it, built and run end to end on this machine:
#   1. installs what is missing (docker.io, docker-compose, debootstrap) and starts dockerd if it is down;
#   2. builds local base images (no registry pull): a Debian bookworm minbase (debootstrap) with Python 3.11,
#      and PostgreSQL and Redis from Debian's packages, each tagged by a hash of its recipe (a cache);
#   3. builds both targets of ./Dockerfile (the worker as its CPU variant, torch from the local wheel that
#      `pip config list` points at), through build arguments only;
#   4. brings up the real docker-compose.yml with scripts/compose-check/override.yml, which swaps the
#      images and the published port only;
#   5. from the host, through the client: one classic and one DivMerge job on tiny models, their results
#      checked and one output file downloaded (sha256 checked), through API, Redis, worker and PostgreSQL;
#   6. tears everything down: containers, volumes, the compose network, the temp folder, the wheel server,
#      and dockerd if this script started it. The base images and the built images stay, as the cache.
# Bounded: DIVMERGE_COMPOSE_CHECK_TIMEOUT_S (default 1800 s) for the whole run.
# Other knobs: DIVMERGE_COMPOSE_CHECK_KEEP=1 leaves the stack up for a look (tear down by hand: the
# command is printed); DIVMERGE_COMPOSE_CHECK_PRUNE=1 also removes every image this check made.
# The whole script is one brace group, read before it runs: editing the file meanwhile cannot derail it.
{
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
HERE=$ROOT/scripts/compose-check
T0=$(date +%s)
LIMIT=${DIVMERGE_COMPOSE_CHECK_TIMEOUT_S:-1800}
SUITE=bookworm
# the host side (tiny models, the client) runs in the project's venv: scripts/setup.sh makes it
PY=${PYTHON:-$ROOT/.venv/bin/python}
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0 # the classic builder: no frontend image to pull
PROJECT=dmcheck$$
WORK=$(mktemp -d /tmp/divmerge-compose-check.XXXXXX)
STARTED_DOCKERD=""
WHEEL_SERVER=""
WATCHDOG=""
COMPOSE_UP=""

log() { echo "compose-check [$(($(date +%s) - T0))s] $*"; }
die() {
  log "FAILED: $*" >&2
  exit 1
}
# Docker cannot run on this machine (no root, no package, dockerd will not start): exit 3, which
# scripts/test.sh reports as a loud skip rather than a failure.
unavailable() {
  log "SKIPPED: $*" >&2
  exit 3
}
left() { echo $((LIMIT - ($(date +%s) - T0))); }
# every long step runs under `timeout` with what is left of the budget
bounded() {
  local l
  l=$(left)
  [ "$l" -gt 0 ] || { log "time limit of $LIMIT s reached" >&2; exit 124; }
  timeout --kill-after=10 "$l" "$@"
}

compose() {
  docker-compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$HERE/override.yml" "$@"
}

cleanup() {
  rc=$?
  trap - EXIT INT TERM ERR
  set +e
  if [ -n "$COMPOSE_UP" ]; then
    if [ "$rc" -ne 0 ]; then
      log "logs of the failed run (last 40 lines per service):"
      compose logs --no-color --tail 40 2>&1 | sed 's/^/  | /' || true
    fi
    if [ "${DIVMERGE_COMPOSE_CHECK_KEEP:-0}" = 1 ]; then
      log "KEEP=1: the stack stays up; tear it down with:"
      echo "  MODELS_DIR=$WORK/models CHECK_API_IMAGE=$CHECK_API_IMAGE CHECK_WORKER_IMAGE=$CHECK_WORKER_IMAGE" \
        "CHECK_POSTGRES_IMAGE=$CHECK_POSTGRES_IMAGE CHECK_REDIS_IMAGE=$CHECK_REDIS_IMAGE" \
        "docker-compose -p $PROJECT -f docker-compose.yml -f scripts/compose-check/override.yml down -v --remove-orphans" \
        "&& rm -rf $WORK"
      [ -n "$STARTED_DOCKERD" ] && echo "  (dockerd, pid $STARTED_DOCKERD, was started by the check: stop it with kill $STARTED_DOCKERD)"
      STARTED_DOCKERD=""
    else
      log "tearing down: containers, volumes, networks of project $PROJECT"
      timeout 120 docker-compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$HERE/override.yml" \
        down -v --remove-orphans --timeout 10 >"$WORK/down.log" 2>&1 || cat "$WORK/down.log" >&2
      local leftover
      leftover=$(
        docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"
        docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT"
        docker network ls -q --filter "label=com.docker.compose.project=$PROJECT"
      )
      if [ -n "$leftover" ]; then
        log "left behind by project $PROJECT: $leftover" >&2
        rc=1
      fi
    fi
  fi
  [ -n "$WHEEL_SERVER" ] && kill "$WHEEL_SERVER" 2>/dev/null && wait "$WHEEL_SERVER" 2>/dev/null
  if [ "${DIVMERGE_COMPOSE_CHECK_PRUNE:-0}" = 1 ]; then
    log "PRUNE=1: removing the images this check made"
    docker images -q --filter "label=org.divmerge.compose-check" | sort -u | xargs -r docker rmi -f >/dev/null || true
    docker rmi -f divmerge-check/api divmerge-check/worker >/dev/null 2>&1 || true
  fi
  if [ -n "$STARTED_DOCKERD" ]; then
    log "stopping the dockerd this script started (pid $STARTED_DOCKERD)"
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
  fi
  [ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null
  if [ "${DIVMERGE_COMPOSE_CHECK_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
  if [ "$rc" -eq 0 ]; then log "OK (total $(($(date +%s) - T0)) s)"; else log "FAILED (exit $rc)" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT
trap 'log "time limit of $LIMIT s reached" >&2; exit 124' TERM
# the watchdog ends this script (its cleanup then runs) once the time budget is spent
(
  trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM # ended early: its sleep goes too
  sleep "$LIMIT" &
  sleeper=$!
  wait "$sleeper" && kill -TERM $$ 2>/dev/null
) &
WATCHDOG=$!

# ------------------------------------------------------------------ 1. tools and dockerd
[ "$(id -u)" -eq 0 ] || unavailable "needs root (apt-get, dockerd)"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (apt-get)"
  bounded apt-get update -qq
  DEBIAN_FRONTEND=noninteractive bounded apt-get install -y -qq "${missing[@]}" >"$WORK/apt.log" 2>&1 ||
    { cat "$WORK/apt.log" >&2; unavailable "apt-get install ${missing[*]} failed"; }
fi
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (log: $WORK/dockerd.log while the check runs)"
  setsid dockerd >"$WORK/dockerd.log" 2>&1 </dev/null &
  STARTED_DOCKERD=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$STARTED_DOCKERD" 2>/dev/null || { cat "$WORK/dockerd.log" >&2; unavailable "dockerd exited"; }
    sleep 1
  done
  docker info >/dev/null 2>&1 || unavailable "dockerd did not answer within 60 s"
fi
if [ ! -x "$PY" ]; then
  log "no $PY: DIVMERGE_SKIP_MERGEKIT=1 bash scripts/setup.sh"
  DIVMERGE_SKIP_MERGEKIT=1 bounded bash scripts/setup.sh
fi
log "docker $(docker version --format '{{.Server.Version}}'), $(docker-compose version --short 2>/dev/null)"

# ------------------------------------------------------------------ 2. local base images
# a new recipe's image replaces the older tags of its repository (they would only fill the disk)
drop_older() {
  docker images --format '{{.Repository}}:{{.Tag}}' "${1%:*}" | grep -vxF "$1" | xargs -r docker rmi >/dev/null 2>&1 || true
}
hash_of() { cat "$@" | sha256sum | cut -c1-12; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
mirror=${DIVMERGE_DEBIAN_MIRROR:-$(
  grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list |
    grep -oE 'https?://[^ ]*/debian/?( |$)' | head -1 | tr -d ' ' || true
)}
mirror=${mirror:-http://deb.debian.org/debian}
include=python3.11,python3.11-venv,python3-pip,ca-certificates # python3-pip: without it configuring python3.11-venv fails
printf '%s\n' "$SUITE" "$mirror" "$include" "$(debootstrap --version)" >"$WORK/bookworm.recipe"
BOOKWORM=divmerge-local/bookworm:$(hash_of "$WORK/bookworm.recipe")
if have_image "$BOOKWORM"; then
  log "cached: $BOOKWORM"
else
  log "debootstrap $SUITE minbase from $mirror -> $BOOKWORM"
  bounded debootstrap --variant=minbase --include="$include" "$SUITE" "$WORK/rootfs" "$mirror" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
  printf 'deb %s %s main\n' "$mirror" "$SUITE" >"$WORK/rootfs/etc/apt/sources.list"
  tar -C "$WORK/rootfs" -c . | docker import --change 'LABEL org.divmerge.compose-check=base' \
    --change 'CMD ["/bin/bash"]' - "$BOOKWORM" >/dev/null
  rm -rf "$WORK/rootfs"
  drop_older "$BOOKWORM"
fi

# each local image: a Dockerfile in scripts/compose-check with the files it copies, on $BOOKWORM
local_image() { # name, files the recipe reads...
  local name=$1
  shift
  local ctx=$WORK/ctx-$name tag
  mkdir -p "$ctx"
  cp "$@" "$ctx/"
  tag=divmerge-local/$name:$(echo "$BOOKWORM" | cat - "$@" | sha256sum | cut -c1-12)
  if have_image "$tag"; then
    log "cached: $tag" >&2
  else
    log "building $tag" >&2
    bounded docker build --network host -q --label org.divmerge.compose-check=base \
      --build-arg BASE="$BOOKWORM" -f "$ctx/$name.Dockerfile" -t "$tag" "$ctx" >"$WORK/build-$name.log" 2>&1 ||
      { tail -30 "$WORK/build-$name.log" >&2; die "building $tag"; }
    drop_older "$tag"
  fi
  echo "$tag"
}
cp /etc/ssl/certs/ca-certificates.crt "$WORK/host-ca.crt"
PYTHON_IMAGE=$(local_image python "$HERE/python.Dockerfile" "$WORK/host-ca.crt")
POSTGRES_IMAGE=$(local_image postgres "$HERE/postgres.Dockerfile" "$HERE/postgres-entrypoint.sh")
REDIS_IMAGE=$(local_image redis "$HERE/redis.Dockerfile" "$HERE/redis-entrypoint.sh")

# ------------------------------------------------------------------ 3. the project's two images
torch_version=$(sed -n 's/^torch==//p' constraints.txt)
wheel=""
for dir in ${PIP_FIND_LINKS:-} $("$PY" -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p"); do
  dir=${dir#file://}
  for f in "$dir"/torch-"$torch_version"+cpu-cp311-*.whl "$dir"/torch-"$torch_version"-cp311-*.whl; do
    [ -f "$f" ] && wheel=$f && break 2
  done
done
build_args=(--build-arg PYTHON_IMAGE="$PYTHON_IMAGE" --build-arg BASE_IMAGE="$PYTHON_IMAGE")
if [ -n "$wheel" ]; then
  # a wheel directory served on loopback for the build (which runs with host networking); torch's own
  # dependencies come from the package index as usual (the +cpu local version sorts above PyPI's build)
  mkdir -p "$WORK/wheels"
  ln -s "$wheel" "$WORK/wheels/"
  # a fixed port: the URL is a build argument, and a new one each run would miss the layer cache
  port=${DIVMERGE_COMPOSE_CHECK_WHEEL_PORT:-18765}
  if ! "$PY" -c "import socket; socket.socket().bind(('127.0.0.1', $port))" 2>/dev/null; then
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    log "port ${DIVMERGE_COMPOSE_CHECK_WHEEL_PORT:-18765} is taken: serving the wheel on $port (the worker's torch layer rebuilds)"
  fi
  "$PY" -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$port" >"$WORK/wheels.log" 2>&1 &
  WHEEL_SERVER=$!
  build_args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple
    --build-arg TORCH_FIND_LINKS="http://127.0.0.1:$port/")
  log "torch for the worker: $(basename "$wheel") (served on 127.0.0.1:$port)"
else
  build_args+=(--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)
  log "no local torch $torch_version wheel found: the worker takes torch from the PyTorch CPU index"
fi
for target in api worker; do
  t=$(date +%s)
  log "docker build --target $target"
  bounded docker build --network host --target "$target" "${build_args[@]}" -t "divmerge-check/$target" . \
    >"$WORK/build-$target.log" 2>&1 || { tail -40 "$WORK/build-$target.log" >&2; die "docker build --target $target"; }
  log "built divmerge-check/$target in $(($(date +%s) - t)) s," \
    "$(docker image inspect -f '{{.Size}}' "divmerge-check/$target" | awk '{printf "%.0f MB", $1/1e6}')"
done
if [ -n "$WHEEL_SERVER" ]; then
  kill "$WHEEL_SERVER" 2>/dev/null && wait "$WHEEL_SERVER" 2>/dev/null || true
  WHEEL_SERVER=""
fi
docker run --rm --entrypoint python divmerge-check/worker -c \
  'import torch, divmerge_core, sys; print("worker image: torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0])'

# ------------------------------------------------------------------ 4. the stack
# tiny models for the jobs, in the folder the compose file mounts at /models (read-only)
export MODELS_DIR=$WORK/models
log "making tiny models in $MODELS_DIR"
bounded "$PY" "$HERE/jobs.py" models "$MODELS_DIR"
chmod -R a+rX "$WORK"
# two free consecutive loopback ports: the compose file runs 2 API replicas (deploy.replicas, which
# docker-compose 1.29 honours), each publishing one port of the range
api_port=$("$PY" - <<'PYEOF'
import random, socket
for _ in range(200):
    p = random.randrange(20000, 60000)
    try:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", p)); b.bind(("127.0.0.1", p + 1))
        print(p); break
    except OSError:
        pass
PYEOF
)
export DIVMERGE_API_PORTS=127.0.0.1:$api_port-$((api_port + 1))
# no GPU here: the GPU worker (its nvidia device reservation cannot start) is scaled to 0 and the CPU
# worker also takes the gpu queue, where the API sends learned methods such as DivMerge
export CPU_WORKER_QUEUES=gpu,cpu
export CHECK_API_IMAGE=divmerge-check/api CHECK_WORKER_IMAGE=divmerge-check/worker
export CHECK_POSTGRES_IMAGE=$POSTGRES_IMAGE CHECK_REDIS_IMAGE=$REDIS_IMAGE
t=$(date +%s)
log "docker-compose up (project $PROJECT; API on $DIVMERGE_API_PORTS)"
COMPOSE_UP=1
bounded docker-compose -p "$PROJECT" -f docker-compose.yml -f "$HERE/override.yml" up -d --no-build --scale worker=0 \
  >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; die "docker-compose up"; }
grep -i warn "$WORK/up.log" | sed 's/^/  | /' || true
compose ps

# ------------------------------------------------------------------ 5. the jobs, from the host
token=$(bounded docker-compose -p "$PROJECT" -f docker-compose.yml -f "$HERE/override.yml" exec -T api \
  divmerge token create --team compose-check | tail -1)
[[ $token == dm_* ]] || die "no token from 'divmerge token create': $token"
DIVMERGE_URL=http://127.0.0.1:$api_port DIVMERGE_TOKEN=$token bounded "$PY" "$HERE/jobs.py" run \
  --first-job-since "$t" --download "$WORK/download"
for p in "$api_port" "$((api_port + 1))"; do
  "$PY" -c "import urllib.request, sys; print('replica on port $p: /healthz', urllib.request.urlopen('http://127.0.0.1:$p/healthz', timeout=10).read().decode())"
done
compose ps
log "all checks passed"
exit 0
}

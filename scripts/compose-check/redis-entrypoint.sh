#!/bin/sh
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  exec runuser -u redis -- redis-server --protected-mode no "$@"
fi
exec "$@"

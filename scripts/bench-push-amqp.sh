#!/usr/bin/env bash
# Measures confirmed pushes per second through logic's HTTP API on the
# local RabbitMQ: starts a logic-only process on its own queues, drives
# POST /im/push/room with wrk, and removes the queues afterwards.
# Usage: scripts/bench-push-amqp.sh [seconds] [connections]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-128}
command -v wrk >/dev/null || { echo "needs wrk (Debian: apt-get install wrk)" >&2; exit 1; }
scripts/services.sh rabbitmq
make -s build
q="imcloud.bench.$$"
port=13111
bin/imcloud run --set stages=logic --set logic.auth.jwt_secret=bench --set logic.api_keys=bench-key-0123456789 \
  --set logic.http_addr=127.0.0.1:$port --set logic.grpc_addr=127.0.0.1:0 --set log.level=warn \
  --set topics.push=$q.push --set topics.poison=$q.poison --set topics.upstream=$q.upstream &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for t in push poison upstream; do rabbitmqctl -q delete_queue "$q.$t" >/dev/null 2>&1 || true; done
  rm -f "$lua"
}
lua=$(mktemp --suffix=.lua)
trap cleanup EXIT
cat >"$lua" <<'LUA'
wrk.method = "POST"
wrk.body = "hello"
wrk.headers["Authorization"] = "Bearer bench-key-0123456789"
LUA
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
wrk -t2 -c"$conns" -d"${secs}s" --latency -s "$lua" "http://127.0.0.1:$port/im/push/room?operation=1000&type=live&room=1"

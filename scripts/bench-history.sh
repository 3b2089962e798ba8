#!/usr/bin/env bash
# History on vs off (issue 12): what giving every room and user push its
# stream position, keeping its history and ordering it at the cloud node
# costs. Each case runs against a fresh server with history.enabled true
# and false, alternating which goes first, RUNS times (default 2): the
# machine is shared, so compare ranges, not single runs.
#   push API, standalone (memory history): room pushes, 64 concurrent, 10s
#   push API, user pushes (push/mids), standalone, 64 concurrent, 10s
#   fan-out capacity, standalone: 10,000 WebSocket clients, one room,
#     80 pushes/s offered (800,000 deliveries/s), 8s
#   push API, registry.kind=redis (Redis history, one process on the
#     embedded broker): room pushes, 64 concurrent, 10s
# With PROFILE=1 the first history-on push runs also take the server's CPU
# profile (admin /debug/pprof/profile, 8 s) into the results directory.
# Results: a table per run, JSON in bench-results/history/; about 4 min
# with RUNS=2.
# ONLY=redis runs only the Redis case (ONLY=memory only the others).
# KEY names the boolean compared on and off (default history.enabled):
# KEY=admin.metrics ONLY=memory measures what recording metrics costs.
# Usage: [KEY=...] [ONLY=redis|memory] [PROFILE=1] scripts/bench-history.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
runs=${1:-2}
key_on_off=${KEY:-history.enabled}
make -s build
out=bench-results/history
mkdir -p "$out"
rm -f "$out"/*.json "$out"/*.pprof
secret=bench-secret-0123456789abcdef0123456789
key=bench-key-0123456789
prefix="imcloud:bench:$$:"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  if command -v redis-cli >/dev/null; then
    redis-cli --scan --pattern "${prefix}*" | xargs -r redis-cli del >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT


common=(--set log.level=warn --set logic.auth.jwt_secret=$secret --set logic.api_keys=$key
  --set cloud.max_handshakes_per_ip=100000
  --set logic.http_addr=127.0.0.1:24111 --set logic.grpc_addr=127.0.0.1:24119
  --set cloud.tcp_addr=127.0.0.1:24101 --set cloud.ws_addr=127.0.0.1:24102 --set cloud.grpc_addr=127.0.0.1:24109
  --set admin.addr=127.0.0.1:24190)

# up KIND HISTORY: a fresh server, standalone (memory) or every stage in
# one process on the embedded broker with the Redis registry.
up() {
  if [ "$1" = memory ]; then
    bin/imcloud standalone "${common[@]}" --set "$key_on_off=$2" >/dev/null &
  else
    bin/imcloud run "${common[@]}" --stages logic,job,cloud --set broker.kind=gochannel \
      --set registry.kind=redis --set registry.redis.prefix="$prefix" --set "$key_on_off=$2" >/dev/null &
  fi
  server=$!
  wait_port 24111
  wait_port 24102
}
down() { kill "$server"; wait "$server" 2>/dev/null || true; server=""; }

# b NAME MODE [FLAGS]: one bench run, saved as NAME.json.
b() {
  local name=$1
  shift
  bin/imcloud bench "$@" --api 127.0.0.1:24111 --api-key $key --secret $secret \
    --target ws://127.0.0.1:24102/sub --save "$out/$name.json" 2>/dev/null
}

# profile NAME DELAY: the server's CPU profile over 8 s from DELAY seconds
# on, in the background.
profile() {
  if [ "${PROFILE:-0}" = 1 ] && [ ! -e "$out/$1.pprof" ]; then
    (sleep "$2"; curl -s -o "$out/$1.pprof" "http://127.0.0.1:24190/debug/pprof/profile?seconds=8") &
  fi
}

# case NAME KIND HISTORY MODE [FLAGS]
case_() {
  local name=$1 kind=$2 h=$3
  shift 3
  up "$kind" "$h"
  echo "== $name, $key_on_off=$h"
  # fanout connects its 10,000 clients first (about 3 s).
  if [ "$h" = true ]; then
    if [ "$1" = fanout ]; then profile "$name-on" 4; else profile "$name-on" 1; fi
  fi
  # The server's CPU time per request (push) or per delivery (fanout):
  # less sensitive than throughput to the other load on a shared machine.
  local t0 t1
  t0=$(cpu_ms "$server")
  b "$name-$h-$run" "$@"
  t1=$(cpu_ms "$server")
  jq --argjson ms $((t1 - t0)) '. + {server_cpu_ms: $ms}' "$out/$name-$h-$run.json" >"$out/tmp.json"
  mv "$out/tmp.json" "$out/$name-$h-$run.json"
  jq -r '"server CPU                    \(.server_cpu_ms) ms, \(.server_cpu_ms * 1000 / (.requests // .deliveries) | floor) µs per \(if .requests then "request" else "delivery" end)"' "$out/$name-$h-$run.json"
  wait_jobs
  down
}
# cpu_ms PID: the process's user + system CPU time so far, in ms.
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000 / hz)}' "/proc/$1/stat"; }
# wait_jobs waits for a profile still being taken (never the server).
wait_jobs() { for j in $(jobs -p); do [ "$j" = "$server" ] || wait "$j" || true; done; }

for run in $(seq "$runs"); do
  # Odd runs measure history on first, even runs off first.
  order=(true false)
  [ $((run % 2)) = 0 ] && order=(false true)
  if [ "${ONLY:-}" != redis ]; then
    for h in "${order[@]}"; do
      case_ push-room memory "$h" push --duration 10s --concurrency 64
    done
    for h in "${order[@]}"; do
      case_ push-mids memory "$h" push --duration 10s --concurrency 64 --route '/im/push/mids?operation=1000&mids=1'
    done
    for h in "${order[@]}"; do
      case_ fanout-capacity memory "$h" fanout --clients 10000 --rooms 1 --rate 80 --duration 8s --drain 10s
    done
  fi
  if [ "${ONLY:-}" = memory ]; then
    :
  elif (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
    for h in "${order[@]}"; do
      case_ push-room-redis redis "$h" push --duration 10s --concurrency 64
    done
  else
    echo "== push API with Redis: skipped, nothing on 127.0.0.1:6379"
  fi
done

echo "== summary (min–max over $runs runs)"
for f in push-room push-mids push-room-redis; do
  for h in true false; do
    ls "$out/$f-$h"-*.json >/dev/null 2>&1 || continue
    jq -s --arg n "$f $key_on_off=$h" '"\($n): \([.[].requests_per_second]|min|floor)–\([.[].requests_per_second]|max|floor) req/s, server CPU \([.[] | .server_cpu_ms * 1000 / .requests]|min|floor)–\([.[] | .server_cpu_ms * 1000 / .requests]|max|floor) µs per request"' -r "$out/$f-$h"-*.json
  done
done
for h in true false; do
  ls "$out/fanout-capacity-$h"-*.json >/dev/null 2>&1 || continue
  jq -s --arg n "fanout-capacity $key_on_off=$h" '"\($n): \([.[].delivered_per_second]|min|floor)–\([.[].delivered_per_second]|max|floor) deliveries/s, lost \([.[].lost]|add), server CPU \([.[] | .server_cpu_ms * 1000 / .deliveries]|min*100|floor/100)–\([.[] | .server_cpu_ms * 1000 / .deliveries]|max*100|floor/100) µs per delivery"' -r "$out/fanout-capacity-$h"-*.json
done

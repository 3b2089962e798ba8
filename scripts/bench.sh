#!/usr/bin/env bash
# make bench: a short run of every imcloud bench mode against a standalone
# server on this machine (and the push mode through RabbitMQ), under two
# minutes. Results are printed and written to bench-results/*.json.
# Longer runs: see BENCHMARKS.md for the commands behind its numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s build
out=bench-results
mkdir -p "$out"
secret=bench-secret
key=bench-key
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: nothing listens on $1" >&2
  return 1
}

bin/imcloud standalone --set log.level=warn --set logic.auth.jwt_secret=$secret --set logic.api_keys=$key \
  --set logic.http_addr=127.0.0.1:23111 --set logic.grpc_addr=127.0.0.1:23119 \
  --set cloud.tcp_addr=127.0.0.1:23101 --set cloud.ws_addr=127.0.0.1:23102 --set cloud.grpc_addr=127.0.0.1:23109 \
  >/dev/null &
pids+=($!)
server=$!
wait_port 23111
b() { bin/imcloud bench "$@" --api 127.0.0.1:23111 --api-key $key --secret $secret --target ws://127.0.0.1:23102/sub; }

echo "== push, standalone (10s, 64 concurrent)"
b push --duration 10s --concurrency 64 --json >"$out/push-standalone.json"
cat "$out/push-standalone.json"
echo "== fanout, standalone: 2,000 WebSocket clients, one room, 50 pushes/s (10s)"
b fanout --clients 2000 --rooms 1 --rate 50 --duration 10s --drain 5s --json >"$out/fanout.json"
cat "$out/fanout.json"
echo "== fanout, light load: 1,000 clients, 10 pushes/s (10s)"
b fanout --clients 1000 --rooms 1 --rate 10 --duration 10s --drain 3s --json >"$out/fanout-light.json"
cat "$out/fanout-light.json"
echo "== connections: 5,000 idle"
b connections --clients 5000 --server-pid "$server" --hold 2s --json >"$out/connections.json"
cat "$out/connections.json"
kill "$server"

if (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  q="imcloud.bench.$$"
  bin/imcloud run --stages logic --set log.level=warn --set logic.auth.jwt_secret=$secret --set logic.api_keys=$key \
    --set logic.http_addr=127.0.0.1:23211 --set logic.grpc_addr=127.0.0.1:0 \
    --set topics.push=$q.push --set topics.poison=$q.poison --set topics.upstream=$q.upstream >/dev/null &
  pids+=($!)
  wait_port 23211
  echo "== push through RabbitMQ, confirmed (10s, 128 concurrent)"
  bin/imcloud bench push --api 127.0.0.1:23211 --api-key $key --duration 10s --concurrency 128 --json >"$out/push-amqp.json"
  cat "$out/push-amqp.json"
  for t in push poison upstream; do rabbitmqctl -q delete_queue "$q.$t" >/dev/null 2>&1 || true; done
else
  echo "== push through RabbitMQ: skipped, nothing on 127.0.0.1:5672 (scripts/services.sh rabbitmq)"
fi

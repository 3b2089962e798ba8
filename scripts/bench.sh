#!/usr/bin/env bash
# make bench: a short run of every imcloud bench mode on this machine, about
# two minutes, against the issue's targets, after what the machine allows:
#   ceilings: single pushes and one gRPC stream against a push API that
#   does no work (imcloud bench ceiling);
#   standalone: push API (single pushes, batches of 100, one gRPC stream),
#   fan-out to 10,000 WebSocket clients, light-load latency, idle
#   connections and the server CPU per connect;
#   through RabbitMQ (when it runs on 127.0.0.1:5672): confirmed pushes,
#   single and in batches, and light-load latency with every stage on the
#   AMQP broker.
# 100,000 clients over six cloud processes: make bench-cluster.
# Each result is printed as a table and saved as JSON in bench-results/.
# Longer runs: see BENCHMARKS.md for the commands behind its numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
make -s build
out=bench-results
mkdir -p "$out"
rm -f "$out"/*.json
secret=bench-secret
key=bench-key-0123456789
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# Idle connections: as many as the descriptor limit leaves room for, in
# both the server and the load generator.
idle=$(( $(ulimit -n) - 1000 ))
idle=$(( idle > 19000 ? 19000 : idle ))

pids=()
queues=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for q in "${queues[@]}"; do
    for t in push poison upstream; do rabbitmqctl -q delete_queue "$q.$t" >/dev/null 2>&1 || true; done
  done
}
trap cleanup EXIT


# stop PID: ends a server started here and waits for it.
stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

# The load generator is every client at once, from a few loopback
# addresses: the per-address handshake cap would refuse it as it would a
# flood, and the idle-connection run holds the node at its descriptor
# limit on purpose (the derived cloud.max_conns keeps a reserve of 2,000).
common=(--set log.level=warn --set logic.auth.jwt_secret=$secret --set logic.api_keys=$key
  --set cloud.max_handshakes_per_ip=100000 --set cloud.max_conns=$((idle + 200)))
# b NAME PORT-PREFIX MODE [FLAGS]: one bench run against the server on
# 127.0.0.1:PREFIX11 (API) and PREFIX02 (WebSocket), saved as NAME.json.
b() {
  local name=$1 p=$2
  shift 2
  bin/imcloud bench "$@" --api 127.0.0.1:${p}11 --api-key $key --secret $secret \
    --target ws://127.0.0.1:${p}02/sub --save "$out/$name.json" 2>/dev/null
}

# standalone starts a standalone server and sets $server to its pid.
standalone() {
  bin/imcloud standalone "${common[@]}" \
    --set logic.http_addr=127.0.0.1:23111 --set logic.grpc_addr=127.0.0.1:23119 \
    --set cloud.tcp_addr=127.0.0.1:23101 --set cloud.ws_addr=127.0.0.1:23102 --set cloud.grpc_addr=127.0.0.1:23109 \
    --set logic.api_grpc_addr=127.0.0.1:23113 >/dev/null &
  server=$!
  pids+=($server)
  wait_port 23111
  wait_port 23102
}

# What this machine allows any server: a push API that does no work,
# loaded exactly as imcloud is below (BENCHMARKS.md, "The machine's
# ceilings"). Read the push rows against these.
bin/imcloud bench ceiling --api 127.0.0.1:23411 --grpc 127.0.0.1:23413 >/dev/null 2>&1 &
ceil=$!
pids+=($ceil)
wait_port 23411
wait_port 23413
echo "== ceiling: a push API doing no work, single pushes, 64 concurrent, 10s"
b ceiling-push 234 push --duration 10s --concurrency 64
echo "== ceiling: a PushService doing no work, one PushStream, 10s"
b ceiling-grpc 234 push --duration 10s --concurrency 1 --grpc 127.0.0.1:23413
stop "$ceil"

standalone
echo "== push API, standalone: 64 concurrent, 10s (target >= 80,000/s, p99 <= 10 ms)"
b push-standalone 231 push --duration 10s --concurrency 64
echo "== batch push API, standalone: batches of 100, 8 concurrent, 10s (target >= 500,000 pushes/s)"
b push-batch-standalone 231 push --duration 10s --concurrency 8 --batch 100
echo "== gRPC push API, standalone: one PushStream, 10s (target >= 150,000 confirmed pushes/s)"
b push-grpc-standalone 231 push --duration 10s --concurrency 1 --grpc 127.0.0.1:23113
echo "== fan-out, standalone: 10,000 WebSocket clients, one room, 50 pushes/s, 10s (target >= 500,000/s, 0 lost)"
b fanout 231 fanout --clients 10000 --rooms 1 --rate 50 --duration 10s --drain 10s
echo "== fan-out capacity, standalone: the same at 80 pushes/s, 800,000 deliveries/s offered, 8s"
b fanout-capacity 231 fanout --clients 10000 --rooms 1 --rate 80 --duration 8s --drain 10s
echo "== light load, standalone: 1,000 clients, 10 pushes/s, 10s (target p99 <= 5 ms)"
b fanout-light 231 fanout --clients 1000 --rooms 1 --rate 10 --duration 10s --drain 3s
stop "$server"

# A fresh server, so that the memory the runs above left behind does not
# count against the idle connections.
standalone
echo "== idle connections: $idle WebSocket clients (target <= 8 KB each; server CPU per connect <= 300 µs)"
b connections 231 connections --clients "$idle" --server-pid "$server" --hold 2s
stop "$server"

if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "== through RabbitMQ: skipped, nothing on 127.0.0.1:5672 (scripts/services.sh rabbitmq)"
  exit 0
fi
# Each RabbitMQ phase has its own queues, removed on exit.
amqp() {
  local q="imcloud.bench.$$.$1"
  queues+=("$q")
  shift
  bin/imcloud run "${common[@]}" --set broker.kind=amqp \
    --set topics.push=$q.push --set topics.poison=$q.poison --set topics.upstream=$q.upstream "$@" >/dev/null &
}

amqp push --stages logic --set logic.http_addr=127.0.0.1:23211 --set logic.grpc_addr=127.0.0.1:0
logic=$!
pids+=($logic)
wait_port 23211
echo "== push API through RabbitMQ, confirmed: 128 concurrent, 10s (target >= 40,000/s)"
b push-amqp 232 push --duration 10s --concurrency 128
echo "== batch push API through RabbitMQ, confirmed: batches of 100, 8 concurrent, 10s (target >= 150,000 pushes/s)"
b push-batch-amqp 232 push --duration 10s --concurrency 8 --batch 100
stop "$logic"

amqp light --stages logic,job,cloud \
  --set logic.http_addr=127.0.0.1:23311 --set logic.grpc_addr=127.0.0.1:23319 \
  --set cloud.tcp_addr=127.0.0.1:23301 --set cloud.ws_addr=127.0.0.1:23302 --set cloud.grpc_addr=127.0.0.1:23309
node=$!
pids+=($node)
wait_port 23311
wait_port 23302
echo "== light load through RabbitMQ: 1,000 clients, 10 pushes/s, 10s (target p99 <= 15 ms)"
b fanout-light-amqp 233 fanout --clients 1000 --rooms 1 --rate 10 --duration 10s --drain 3s
stop "$node"
echo "results: $out/*.json"

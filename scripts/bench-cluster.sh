#!/usr/bin/env bash
# make bench-cluster: 100,000 WebSocket clients on this machine, as a
# cluster. One process runs logic and job on RabbitMQ and Redis (registry,
# dedupe); NODES cloud processes each hold CLIENTS/NODES clients, under the
# 20,000-descriptor limit of a process; one load-generator process per node
# (imcloud bench swarm) holds its clients; imcloud bench cluster then
# measures the time to connect them all, RSS per connection on each node, a
# room push to every client, a paced push/all, and push/mids to USERS
# distinct users at RATE pushes/s — delivered, lost, latency. Loopback
# only; every process is stopped, and the queues and keys removed, on exit.
#
# Usage: [CLIENTS=100000] [NODES=6] [USERS=10000] [RATE=1000] [SPEED=5000] scripts/bench-cluster.sh
# Needs RabbitMQ and Redis on 127.0.0.1 (scripts/services.sh). About 3 min.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
make -s build
clients=${CLIENTS:-100000}
nodes=${NODES:-6}
users=${USERS:-10000}
rate=${RATE:-1000}
speed=${SPEED:-5000}
out=bench-results/cluster
mkdir -p "$out"
rm -f "$out"/*
secret=bench-cluster-secret-0123456789abcdef
key=bench-key-0123456789
cluster_secret=bench-cluster-internal-0123456789
q="imcloud.bench.cluster.$$"
prefix="imcloud:bench:cluster:$$:"
per=$(( (clients + nodes - 1) / nodes ))
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# A cloud node takes connections up to its descriptor limit less a reserve
# (a tenth, at least 256; README "Connections per node").
limit=$(ulimit -n)
reserve=$(( limit / 10 > 256 ? limit / 10 : 256 ))
if [ $((limit - reserve)) -lt $((per + 100)) ]; then
  echo "bench-cluster: $per clients per node need more than the $(ulimit -n) descriptors a process may hold: raise NODES" >&2
  exit 1
fi
for port in 5672 6379; do
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "bench-cluster: nothing on 127.0.0.1:$port (scripts/services.sh starts RabbitMQ and Redis)" >&2
    exit 1
  fi
done

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for t in push poison upstream; do rabbitmqctl -q delete_queue "$q.$t" >/dev/null 2>&1 || true; done
  redis-cli --scan --pattern "${prefix}*" 2>/dev/null | xargs -r -n 500 redis-cli del >/dev/null 2>&1 || true
}
trap cleanup EXIT

wait_tries=300
rss_of() { awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$1/status"; }

common=(--set log.level=warn --set logic.auth.jwt_secret=$secret --set logic.api_keys=$key
  --set cluster.secret=$cluster_secret
  --set broker.kind=amqp --set topics.push=$q.push --set topics.poison=$q.poison --set topics.upstream=$q.upstream
  --set registry.kind=redis --set registry.redis.prefix=$prefix --set job.dedupe.store=redis
  --set logic.connect_rate=0)

bin/imcloud run "${common[@]}" --stages logic,job \
  --set logic.http_addr=127.0.0.1:26111 --set logic.grpc_addr=127.0.0.1:26119 --set admin.addr= \
  >"$out/logic-job.log" 2>&1 &
pids+=($!)
wait_port 26111
wait_port 26119

node_args=()
for i in $(seq 0 $((nodes - 1))); do
  bin/imcloud run "${common[@]}" --stages cloud --set node_id=bench-c$i \
    --set cloud.logic_addr=127.0.0.1:26119 \
    --set cloud.tcp_addr=127.0.0.1:$((26200 + i)) --set cloud.ws_addr=127.0.0.1:$((26210 + i)) \
    --set cloud.grpc_addr=127.0.0.1:$((26220 + i)) --set cloud.advertise_addr=127.0.0.1:$((26220 + i)) \
    --set admin.addr= --set cloud.max_handshakes_per_ip=1000000 \
    >"$out/cloud-$i.log" 2>&1 &
  pid=$!
  pids+=($pid)
  wait_port $((26210 + i))
  node_args+=("$pid:$(rss_of $pid):$per")
done

swarms=()
for i in $(seq 0 $((nodes - 1))); do
  n=$(( i == nodes - 1 ? clients - per * (nodes - 1) : per ))
  bin/imcloud-bench swarm --target ws://127.0.0.1:$((26210 + i))/sub --secret $secret \
    --clients $n --mid-base $((1 + i * per)) --control 127.0.0.1:$((26300 + i)) --hold 10m \
    >"$out/swarm-$i.log" 2>&1 &
  pids+=($!)
  swarms+=("127.0.0.1:$((26300 + i))")
done
for i in $(seq 0 $((nodes - 1))); do wait_port $((26300 + i)); done

echo "== $clients WebSocket clients over $nodes cloud nodes (RabbitMQ + Redis): connect, room push to all," \
  "push/all at $speed/s per node, push/mids to $users users at $rate/s"
bin/imcloud-bench cluster --api 127.0.0.1:26111 --api-key $key --clients "$clients" \
  --swarms "$(IFS=,; echo "${swarms[*]}")" --nodes "$(IFS=,; echo "${node_args[*]}")" \
  --mid-base 1 --users "$users" --rate "$rate" --speed "$speed" --wait 3m --save "$out/cluster.json"

#!/usr/bin/env bash
# Runs a local cluster on RabbitMQ and Redis: 1 logic, 2 job and 2 cloud
# processes of bin/imcloud, each its own process with its own ports.
#   scripts/cluster.sh start   start them (make run-cluster)
#   scripts/cluster.sh stop    stop exactly those processes (make stop-cluster)
# State (pids, logs) lives in .cluster/. Secrets reach the processes in
# their environment, never on the command line (ps and /proc/<pid>/cmdline
# show that to every user); the cluster secret that authenticates logic,
# job and cloud to one another, the JWT secret and the API key are random
# for each start unless CLUSTER_JWT_SECRET / CLUSTER_API_KEY give them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
dir=.cluster
# The JWT secret and the API key are random for each start unless given
# (CLUSTER_JWT_SECRET, CLUSTER_API_KEY): a well-known default would let
# anyone who read this script mint tokens and push.
rand_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
secret=${CLUSTER_JWT_SECRET:-}
apikey=${CLUSTER_API_KEY:-}

common=(--set broker.kind=amqp --set registry.kind=redis --set job.dedupe.store=redis
  --set log.format=json)

start_one() { # name args...
  local name=$1
  shift
  IMCLOUD_CLUSTER__SECRET="$cluster_secret" IMCLOUD_LOGIC__AUTH__JWT_SECRET="$secret" IMCLOUD_LOGIC__API_KEYS="$apikey" \
    bin/imcloud run "${common[@]}" "$@" >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

wait_hint="see $dir/*.log"

start() {
  if ls "$dir"/*.pid >/dev/null 2>&1; then
    echo "cluster: already running (scripts/cluster.sh stop first)" >&2
    exit 1
  fi
  mkdir -p "$dir"
  cluster_secret=$(rand_hex 32)
  secret=${secret:-$(rand_hex 32)}
  apikey=${apikey:-$(rand_hex 16)}
  scripts/services.sh rabbitmq redis
  make -s build
  start_one logic --stages logic --set logic.http_addr=127.0.0.1:3111 --set logic.grpc_addr=127.0.0.1:3119
  wait_port 3119
  for i in 1 2; do
    start_one "cloud$i" --stages cloud --set node_id="cloud$i" --set cloud.logic_addr=127.0.0.1:3119 \
      --set cloud.tcp_addr=127.0.0.1:${i}3101 --set cloud.ws_addr=127.0.0.1:${i}3102 \
      --set cloud.grpc_addr=127.0.0.1:${i}3109 --set cloud.advertise_addr=127.0.0.1:${i}3109
    wait_port "${i}3102"
  done
  for i in 1 2; do
    start_one "job$i" --stages job
  done
  wait_port 3111
  cat <<MSG
imcloud cluster is running (logs and pids in $dir/):
  logic   http 127.0.0.1:3111, grpc 127.0.0.1:3119
  cloud1  ws ws://127.0.0.1:13102/sub, tcp 127.0.0.1:13101, grpc 127.0.0.1:13109
  cloud2  ws ws://127.0.0.1:23102/sub, tcp 127.0.0.1:23101, grpc 127.0.0.1:23109
  job1, job2 consume the push queue on RabbitMQ; the registry is in Redis
  internal gRPC is authenticated with a random cluster secret (IMCLOUD_CLUSTER__SECRET)
API key: $apikey
Token:   IMCLOUD_LOGIC__AUTH__JWT_SECRET=$secret bin/imcloud token --mid 1 --rooms live://1000
Push:    curl -X POST -H 'Authorization: Bearer $apikey' 'http://127.0.0.1:3111/im/push/room?operation=1000&type=live&room=1000' -d hi
Stop:    make stop-cluster
MSG
}

stop() {
  shopt -s nullglob
  local pids=("$dir"/*.pid)
  if [ ${#pids[@]} -eq 0 ]; then
    echo "cluster: not running"
    return 0
  fi
  for f in "${pids[@]}"; do
    pid=$(cat "$f")
    # Only our own process: the pid must still be an imcloud run.
    if grep -q "imcloud" "/proc/$pid/cmdline" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for f in "${pids[@]}"; do
    pid=$(cat "$f")
    for _ in $(seq 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$f"
  done
  echo "cluster: stopped"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
  echo "usage: scripts/cluster.sh start|stop" >&2
  exit 2
  ;;
esac

#!/usr/bin/env bash
# Makes sure the services the integration tests and cluster mode use are
# running on their standard local ports, installing them from Debian's
# packages and starting them when they are not. Safe to run repeatedly.
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local name=$1 port=$2 secs=${3:-60}
  for ((i = 0; i < secs * 2; i++)); do
    port_open "$port" && return 0
    sleep 0.5
  done
  log "$name did not open port $port within ${secs}s"
  return 1
}

install_pkg() {
  command -v "$2" >/dev/null 2>&1 && return 0
  log "installing $1"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "$1" >/dev/null ||
    { $SUDO apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "$1" >/dev/null; }
}

ensure_rabbitmq() {
  port_open 5672 && return 0
  install_pkg rabbitmq-server rabbitmq-server
  if rabbitmqctl -q ping >/dev/null 2>&1; then
    # The Erlang node runs but the broker application was stopped.
    log "starting the rabbitmq application"
    rabbitmqctl start_app >/dev/null
  else
    log "starting rabbitmq"
    rabbitmq-server -detached
  fi
  wait_port rabbitmq 5672 120
}

ensure_redis() {
  port_open 6379 && return 0
  install_pkg redis-server redis-server
  log "starting redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port redis 6379 30
}

ensure_nats() {
  port_open 4222 && return 0
  install_pkg nats-server nats-server
  log "starting nats"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port nats 4222 30
}

# The Redis Cluster and Sentinel setups the HA integration tests use run
# as this script's own processes under SERVICES_DIR, one directory each
# (config, data, log, pid file), on ports clear of 6379: stop removes
# them, so the next start is a fresh cluster, not one that remembers
# nodes.conf from the last.
SERVICES_DIR=${IMCLOUD_SERVICES_DIR:-${TMPDIR:-/tmp}/imcloud-services}
CLUSTER_PORTS=(7000 7001 7002)
SENTINEL_MASTER=imcloud
SENTINEL_DATA_PORTS=(6380 6381) # the first starts as master, the second its replica
SENTINEL_PORTS=(26380 26381 26382)

# wait_for runs a command until it succeeds, for up to secs seconds.
wait_for() {
  local what=$1 secs=$2
  shift 2
  for ((i = 0; i < secs * 2; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  log "$what: not ready within ${secs}s"
  return 1
}

# redis_node starts one redis-server daemon in dir on port with the
# extra arguments given, unless something already listens there.
redis_node() {
  local dir=$1 port=$2
  shift 2
  port_open "$port" && return 0
  mkdir -p "$dir"
  # shutdown-on-sigterm "nosave now": stop does not wait the 10 s a
  # master gives its replicas to catch up; these hold test data only.
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --shutdown-on-sigterm "nosave now" \
    --dir "$dir" --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" "$@"
  wait_port "redis on $port" "$port" 30
}

cluster_ok() { redis-cli -p "${CLUSTER_PORTS[0]}" cluster info | grep -q '^cluster_state:ok'; }

ensure_redis_cluster() {
  install_pkg redis-server redis-server
  install_pkg redis-tools redis-cli
  local all_open=1 p
  for p in "${CLUSTER_PORTS[@]}"; do port_open "$p" || all_open=0; done
  if ((all_open)) && cluster_ok; then return 0; fi
  log "starting a redis cluster on ports ${CLUSTER_PORTS[*]}"
  for p in "${CLUSTER_PORTS[@]}"; do
    redis_node "$SERVICES_DIR/redis-cluster/$p" "$p" --cluster-enabled yes \
      --cluster-config-file nodes.conf --cluster-node-timeout 5000
  done
  # Nodes that already know each other are joining (a second run while
  # the first waits): only a node alone is joined.
  if [ "$(redis-cli -p "${CLUSTER_PORTS[0]}" cluster info | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')" = 1 ]; then
    local addrs=()
    for p in "${CLUSTER_PORTS[@]}"; do addrs+=("127.0.0.1:$p"); done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
  fi
  for p in "${CLUSTER_PORTS[@]}"; do
    wait_for "redis cluster node $p" 60 sh -c "redis-cli -p $p cluster info | grep -q '^cluster_state:ok'"
  done
}

# sentinels_ready: every sentinel names a master and knows the two others,
# and the master has its replica.
sentinels_ready() {
  local p master
  for p in "${SENTINEL_PORTS[@]}"; do
    master=$(redis-cli -p "$p" sentinel get-master-addr-by-name "$SENTINEL_MASTER" | tail -n 1 | tr -d '\r')
    [ -n "$master" ] || return 1
    redis-cli -p "$p" sentinel master "$SENTINEL_MASTER" | tr -d '\r' | grep -A1 -x num-other-sentinels | tail -n 1 | grep -qx 2 || return 1
  done
  redis-cli -p "$master" info replication | tr -d '\r' | grep -Eq '^connected_slaves:[1-9]'
}

ensure_redis_sentinel() {
  install_pkg redis-server redis-server
  install_pkg redis-tools redis-cli
  local all_open=1 p
  for p in "${SENTINEL_DATA_PORTS[@]}" "${SENTINEL_PORTS[@]}"; do port_open "$p" || all_open=0; done
  if ((all_open)) && sentinels_ready; then return 0; fi
  log "starting a redis master (${SENTINEL_DATA_PORTS[0]}), its replica (${SENTINEL_DATA_PORTS[1]}) and sentinels on ${SENTINEL_PORTS[*]}"
  local base=$SERVICES_DIR/redis-sentinel
  redis_node "$base/${SENTINEL_DATA_PORTS[0]}" "${SENTINEL_DATA_PORTS[0]}"
  redis_node "$base/${SENTINEL_DATA_PORTS[1]}" "${SENTINEL_DATA_PORTS[1]}" \
    --replicaof 127.0.0.1 "${SENTINEL_DATA_PORTS[0]}"
  for p in "${SENTINEL_PORTS[@]}"; do
    port_open "$p" && continue
    local dir=$base/sentinel-$p
    mkdir -p "$dir"
    # A sentinel rewrites its file with what it learns: one each, writable.
    cat >"$dir/sentinel.conf" <<CONF
port $p
bind 127.0.0.1
daemonize yes
dir $dir
logfile $dir/sentinel.log
pidfile $dir/sentinel.pid
sentinel monitor $SENTINEL_MASTER 127.0.0.1 ${SENTINEL_DATA_PORTS[0]} 2
sentinel down-after-milliseconds $SENTINEL_MASTER 3000
sentinel failover-timeout $SENTINEL_MASTER 10000
sentinel parallel-syncs $SENTINEL_MASTER 1
CONF
    # redis-server --sentinel is what Debian's redis-sentinel runs (the
    # same binary); installing that package would also start its own
    # sentinel on 26379 watching the shared Redis on 6379.
    redis-server "$dir/sentinel.conf" --sentinel
    wait_port "sentinel on $p" "$p" 30
  done
  wait_for "redis sentinel" 60 sentinels_ready
}

# stop_redis_dirs stops the redis processes whose pid files are under dir
# (started by this script) and removes dir.
stop_redis_dirs() {
  local dir=$1 f pid pids=()
  [ -d "$dir" ] || return 0
  # All at once, then wait: a sentinel left running alone would start a
  # failover while the others stop.
  for f in "$dir"/*/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    wait_for "redis process $pid to exit" 30 sh -c "! kill -0 $pid"
  done
  rm -rf "$dir"
}

stop_redis_cluster() { log "stopping the redis cluster"; stop_redis_dirs "$SERVICES_DIR/redis-cluster"; }
stop_redis_sentinel() { log "stopping the redis sentinel setup"; stop_redis_dirs "$SERVICES_DIR/redis-sentinel"; }

# services.sh [name...] starts services (default rabbitmq redis nats);
# services.sh stop name... stops redis-cluster and redis-sentinel.
action=ensure
if [ "${1:-}" = stop ]; then
  action=stop
  shift
  [ $# -gt 0 ] || { log "stop what? redis-cluster, redis-sentinel"; exit 2; }
fi
for s in "${@:-rabbitmq redis nats}"; do
  for one in $s; do
    fn="${action}_${one//-/_}"
    declare -F "$fn" >/dev/null || { log "cannot $action $one"; exit 2; }
    "$fn"
  done
done
[ "$action" = stop ] || log "ready: ${*:-rabbitmq redis nats}"

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

for s in "${@:-rabbitmq redis nats}"; do
  for one in $s; do "ensure_$one"; done
done
log "ready: ${*:-rabbitmq redis nats}"

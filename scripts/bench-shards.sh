#!/usr/bin/env bash
# make bench-shards: confirmed pushes per second through RabbitMQ with
# N = 1, 2, 4 push shards (topics.push_shards) and J = 1, 2, 4 job
# processes, each combination its own cluster on this machine: one logic
# (Redis registry, history on), one cloud node, J jobs (Redis dedupe), on
# queues of their own. The load is `imcloud bench push --batch 100
# --concurrency 8` (room pushes over 16 rooms, so over every shard) for
# SECONDS; then the run waits until the jobs have consumed every shard.
# For each run it prints pushes accepted a second, pushes consumed a
# second (accepted ÷ time until the shard queues were empty), and the CPU
# seconds each process, RabbitMQ and Redis spent — what bounds the figure.
# Usage: scripts/bench-shards.sh [seconds] ["N..."] ["J..."]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
secs=${1:-10}
shard_counts=${2:-"1 2 4"}
job_counts=${3:-"1 2 4"}
scripts/services.sh rabbitmq redis
make -s build
out=bench-results
mkdir -p "$out"
secret=bench-secret-0123456789abcdef0123456789
key=bench-key-0123456789
csecret=bench-cluster-secret-0123456789abcdef
pids=()
queues=()
cleanup() {
  # Jobs and cloud before logic, which they talk to.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  for q in "${queues[@]}"; do rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true; done
  pids=() queues=()
}
trap cleanup EXIT


# cpu PID: user + system CPU seconds of a process so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# cpus PID...: their CPU seconds, summed.
cpus() { for p in "$@"; do cpu "$p"; done | awk '{s += $1} END {print s + 0}'; }
beam() { pgrep -f beam.smp | head -1; }
redis() { pgrep -f 'redis-server .*:6379' | head -1; }

# queued PREFIX: messages (ready + unacked) in the push shard queues.
queued() {
  rabbitmqctl -q list_queues name messages | awk -v p="$1.push" '$1 == p || index($1, p ".") == 1 {n += $2} END {print n + 0}'
}

printf '%-7s %-5s %12s %12s %8s %8s %8s %8s %8s %8s\n' shards jobs accepted/s consumed/s drain_s logic_s jobs_s cloud_s rabbit_s redis_s
for n in $shard_counts; do
  for j in $job_counts; do
    q="imcloud.benchshards.$$.$n.$j"
    queues=("$q.push" "$q.poison" "$q.upstream")
    for i in $(seq 0 $((n - 1))); do queues+=("$q.push.$i"); done
    common=(--set log.level=warn --set broker.kind=amqp --set registry.kind=redis --set "registry.redis.prefix=$q:"
      --set job.dedupe.store=redis --set "topics.push=$q.push" --set "topics.poison=$q.poison" --set "topics.upstream=$q.upstream"
      --set "topics.push_shards=$n" --set logic.grpc_addr=127.0.0.1:24119 --set cloud.logic_addr=127.0.0.1:24119
      --set job.canary_interval=0 --set cloud.canary_timeout=0)
    IMCLOUD_CLUSTER__SECRET=$csecret bin/imcloud run "${common[@]}" --set stages=logic \
      --set "logic.auth.jwt_secret=$secret" --set "logic.api_keys=$key" --set logic.http_addr=127.0.0.1:24111 >/dev/null &
    logic=$!
    pids+=("$logic")
    wait_port 24111
    IMCLOUD_CLUSTER__SECRET=$csecret bin/imcloud run "${common[@]}" --set stages=cloud --set node_id=bench-cloud \
      --set cloud.tcp_addr= --set cloud.ws_addr=127.0.0.1:24102 --set cloud.grpc_addr=127.0.0.1:24109 >/dev/null &
    cloud=$!
    pids+=("$cloud")
    wait_port 24109
    jobs=()
    for _ in $(seq "$j"); do
      IMCLOUD_CLUSTER__SECRET=$csecret bin/imcloud run "${common[@]}" --set stages=job >/dev/null &
      jobs+=($!)
      pids+=($!)
    done
    # The jobs are up when every shard queue has their consumers.
    for _ in $(seq 100); do
      c=$(rabbitmqctl -q list_queues name consumers | awk -v p="$q.push" '$1 == p || index($1, p ".") == 1 {if ($2 > 0) n++} END {print n + 0}')
      [ "$c" -ge "$n" ] && break
      sleep 0.2
    done
    d0=$(cpu "$(redis)") r0=$(cpu "$(beam)") l0=$(cpu "$logic") c0=$(cpu "$cloud") j0=$(cpus "${jobs[@]}")
    start=$(date +%s.%N)
    bin/imcloud bench push --api 127.0.0.1:24111 --api-key $key --batch 100 --concurrency 8 --duration "${secs}s" \
      --save "$out/shards-$n-jobs-$j.json" >/dev/null 2>&1
    pushed=$(date +%s.%N)
    for _ in $(seq 600); do
      [ "$(queued "$q")" -eq 0 ] && break
      sleep 0.1
    done
    drained=$(date +%s.%N)
    d1=$(cpu "$(redis)") r1=$(cpu "$(beam)") l1=$(cpu "$logic") c1=$(cpu "$cloud") j1=$(cpus "${jobs[@]}")
    python3 - "$out/shards-$n-jobs-$j.json" "$n" "$j" "$start" "$pushed" "$drained" \
      "$l0" "$l1" "$j0" "$j1" "$c0" "$c1" "$r0" "$r1" "$d0" "$d1" <<'PY'
import json, sys
path, n, j = sys.argv[1], sys.argv[2], sys.argv[3]
start, pushed, drained = map(float, sys.argv[4:7])
c = list(map(float, sys.argv[7:17]))
logic, jobs, cloud, rabbit, redis = (c[i + 1] - c[i] for i in range(0, 10, 2))
r = json.load(open(path))
accepted = (r["requests"] - r["failed"]) * r["batch"]
r.update(shards=int(n), jobs=int(j), drain_seconds=drained - pushed, consumed_per_second=accepted / (drained - start),
         cpu_seconds={"logic": logic, "jobs": jobs, "cloud": cloud, "rabbitmq": rabbit, "redis": redis})
json.dump(r, open(path, "w"), indent=2)
print(f"{n:<7} {j:<5} {r['pushes_per_second']:12,.0f} {r['consumed_per_second']:12,.0f} {drained - pushed:8.1f} {logic:8.1f} {jobs:8.1f} {cloud:8.1f} {rabbit:8.1f} {redis:8.1f}")
PY
    cleanup
  done
done

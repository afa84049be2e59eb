#!/usr/bin/env bash
# One Redis against a Redis Cluster, side by side (BENCHMARKS.md, "Redis Cluster", issue 15): the
# same Switchboard deployment (2 gateways + 2 workers, release build, scripts/dev-cluster) and the
# same open-loop load of switchboard-loadtest, once on a private redis-server (port 6391) and once
# on a private Redis Cluster of 3 masters + 3 replicas (scripts/redis-cluster, ports 7300-7305).
# Reports per run: throughput, latency, lost/duplicated (the generator), CPU seconds by tier read
# from /proc (gateways, workers, every redis-server, the run's PostgreSQL backends), and Redis
# commands per persisted message (INFO commandstats summed over the masters; replicas excluded).
#
#   loadtest/redis-cluster-side-by-side.sh [all|single|cluster]     RATE=4000 DUR=20 by default
#
# Needs: target/release binaries (cargo build --release), local PostgreSQL (postgres, trust).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/switchboard-redis-cluster-bench}
out=$work/out
mkdir -p "$out"
RATE=${RATE:-4000}
DUR=${DUR:-20}
SINGLE_PORT=6391
CLUSTER_BASE=7300
LOAD=(chat --targets http://127.0.0.1:3002,http://127.0.0.1:3003 --secret benchsecret
  --connections 1000 --channels 100 --rate "$RATE" --duration "$DUR" --warmup 2 --drain 3)

# shellcheck source=lib.sh
. "$root/loadtest/lib.sh"
master_ports() { # ports... -> those that are masters
  for p in "$@"; do [ "$(redis-cli -p "$p" role 2>/dev/null | head -1)" = master ] && echo "$p"; done
}
redis_pid() { redis-cli -p "$1" info server | awk -F: '/^process_id/ {print $2}' | tr -d '\r'; }
calls() { # ports... -> total calls and the per-command breakdown, summed
  for p in "$@"; do redis-cli -p "$p" info commandstats; done | tr -d '\r' |
    awk -F'[:=,]' '/^cmdstat_/ { c[$1] += $3; t += $3 } END { printf "%d", t; for (k in c) printf " %s=%d", substr(k, 9), c[k]; print "" }'
}

run() { # name redis-url ports...
  local name=$1 url=$2
  shift 2
  local ports=("$@") db=sbrc_$name
  psql -qAt postgres://postgres@127.0.0.1:5432/postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
  (cd "$root" && DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db REDIS_URL=$url REDIS_PREFIX=sbrc \
    AUTH_DEV_SECRET=benchsecret NO_BUILD=1 RUST_LOG=warn scripts/dev-cluster >"$out/$name-start.txt" 2>&1) ||
    { cat "$out/$name-start.txt"; exit 1; }
  mapfile -t spids <"$root/run/pids"
  local gws=("${spids[@]:0:2}") wks=("${spids[@]:2}") rpids=()
  for p in "${ports[@]}"; do rpids+=("$(redis_pid "$p")"); done
  local masters
  mapfile -t masters < <(master_ports "${ports[@]}")
  for p in "${ports[@]}"; do redis-cli -p "$p" config resetstat >/dev/null; done
  ticks "${gws[@]}" >"$out/$name.g0"; ticks "${wks[@]}" >"$out/$name.w0"
  ticks "${rpids[@]}" >"$out/$name.r0"; ticks $(pg_pids "$db") >"$out/$name.p0"
  "$root/target/release/switchboard-loadtest" "${LOAD[@]}" >"$out/$name.txt" 2>"$out/$name.err"
  ticks "${gws[@]}" >"$out/$name.g1"; ticks "${wks[@]}" >"$out/$name.w1"
  ticks "${rpids[@]}" >"$out/$name.r1"; ticks $(pg_pids "$db") >"$out/$name.p1"
  local persisted total
  persisted=$(awk '/DELIVERED/ { for (i = 1; i < NF; i++) if ($i == "DELIVERED") print $(i+1) }' "$out/$name.txt")
  read -r total breakdown < <(calls "${masters[@]}")
  echo "== $name ($url): CPU s: gateways $(cpu_diff "$out/$name.g0" "$out/$name.g1")," \
    "workers $(cpu_diff "$out/$name.w0" "$out/$name.w1"), redis $(cpu_diff "$out/$name.r0" "$out/$name.r1")," \
    "postgres $(cpu_diff "$out/$name.p0" "$out/$name.p1")"
  echo "   redis commands on the masters: $total = $(awk -v t="$total" -v m="$persisted" 'BEGIN { printf "%.1f", t / (m ? m : 1) }') per persisted message"
  echo "   by command: $breakdown"
  for p in "${masters[@]}"; do
    echo "   master $p: $(calls "$p" | cut -d' ' -f1) commands"
  done
  cat "$out/$name.txt"
  (cd "$root" && scripts/dev-cluster stop >/dev/null 2>&1)
}

case "${1:-all}" in
single | all)
  if ! redis-cli -p "$SINGLE_PORT" ping >/dev/null 2>&1; then
    mkdir -p "$work/redis"
    redis-server --port "$SINGLE_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/redis" --daemonize yes >/dev/null
    sleep 0.5
  fi
  redis-cli -p "$SINGLE_PORT" flushall >/dev/null
  run single "redis://127.0.0.1:$SINGLE_PORT" "$SINGLE_PORT"
  ;;&
cluster | all)
  url=$("$root/scripts/redis-cluster" start --base-port "$CLUSTER_BASE" --dir "$work/cluster") || exit 1
  run cluster "$url" $(seq "$CLUSTER_BASE" $((CLUSTER_BASE + 5)))
  "$root/scripts/redis-cluster" stop --base-port "$CLUSTER_BASE" --dir "$work/cluster" >/dev/null 2>&1
  ;;
esac

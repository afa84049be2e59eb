#!/usr/bin/env bash
# The gateway's limits (BENCHMARKS.md, issue 9 targets 2, 3 and 5), each driven the way a user would
# see it, one run each:
#
#   loadtest/limits.sh storm    10,000 sockets of the independent generator connecting at once
#                               (2 processes x 500 handshakes in flight), RS256, 2 gw + 2 wk;
#                               CPU by process over the connect phase only (the generator's included)
#   loadtest/limits.sh fanout   one channel of 5,000 members, 20 senders, 10 msg/s (50,000
#                               deliveries/s), independent generator, 2 gw + 2 wk
#   loadtest/limits.sh memory   RSS per idle connection: 8,000 HS256 connections of switchboard-loadtest
#                               on one gateway (BROWSER=1: with a browser's headers and cookies)
#   loadtest/limits.sh idle     CPU of one gateway and of Redis over 30 s with 8,000 idle HS256
#                               connections (the presence heartbeat, Engine.IO pings, sweeps)
#   loadtest/limits.sh footprint  RSS of each process of 2 gw + 2 wk, idle and after the closed loop
#                               of `max` (REDIS_CLUSTER=1: on a local Redis Cluster)
#   loadtest/limits.sh max      target 4: the largest persisted rate of 2 gw + 2 wk, closed loop (200
#                               senders of 1,000 sockets in 100 channels, 8 messages outstanding
#                               each), independent generator; with RATE=<msg/s>, the same sockets
#                               open loop at that rate (the p99 half of the target: RATE=10000)
#
# Env: N (sockets: storm 10000, memory 8000), RATE (fanout msg/s, 10; max: open loop), DUR (fanout
# seconds, 20; max 10),
# REDIS_PORT (private redis-server, 6390), WORK (/tmp/switchboard-side-by-side, shared with
# side-by-side.sh), and any gateway setting (passed through to scripts/dev-cluster).
# Needs: target/release binaries, node/npm, local PostgreSQL (postgres, trust).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/switchboard-side-by-side}
R=${REDIS_PORT:-6390}; RURL=redis://127.0.0.1:$R
PG=postgres://postgres@127.0.0.1:5432
# shellcheck source=lib.sh
. "$root/loadtest/lib.sh"
anchors "$root" "$work"
rpid=$(private_redis "$R" "$work")
ulimit -n "$(ulimit -Hn)"

fresh_db() { psql -qAt "$PG/postgres" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null 2>&1; }
cluster() { # db: 2 gateways + 2 workers on 3002/3003, the generator's PEM, set-up rate limits off
  fresh_db "$1"
  (cd "$root" && DATABASE_URL=$PG/$1 REDIS_URL=$RURL REDIS_PREFIX=$1$RANDOM RATE_REST_PER_S=0 RATE_CHANNELS_PER_S=0 \
    AUTH_PUBLIC_KEY_FILE=$keys/public.pem NO_BUILD=1 RUST_LOG=warn scripts/dev-cluster >"$work/$1-start.txt" 2>&1) \
    || { cat "$work/$1-start.txt"; exit 1; }
}
stop_cluster() { (cd "$root" && scripts/dev-cluster stop >/dev/null 2>&1); }
chat_load() { # the generator's chat load on the cluster's 1,000 sockets in 100 channels; args: its mode
  (cd "$LOAD" && node src/cli.js --keys "$keys" --targets http://127.0.0.1:3002,http://127.0.0.1:3003 \
    --connections 1000 --channels 100 "$@" --duration "${DUR:-10}" \
    --server-pids "$(paste -sd, "$root/run/pids")" 2>&1) | grep -v '^{'
}
closed_loop=(--senders 200 --closed --window 8)   # target 4: 200 senders, 8 messages in flight each
one_gateway() { # db: one HS256 gateway on 3012 (its workers are not needed: nothing is sent); sets $gw
  fresh_db "$1"; psql -qAt "$PG/postgres" -c "CREATE DATABASE $1" >/dev/null
  (cd "$root" && DATABASE_URL=$PG/$1 REDIS_URL=$RURL target/release/switchboard-worker migrate >/dev/null 2>&1)
  (cd "$root" && DATABASE_URL=$PG/$1 REDIS_URL=$RURL REDIS_PREFIX=$1$RANDOM AUTH_DEV_SECRET=benchsecret PORT=3012 \
    RUST_LOG=warn nohup target/release/switchboard-gateway >"$work/$1-gw.log" 2>&1 &)
  for _ in $(seq 100); do curl -sf http://127.0.0.1:3012/readyz >/dev/null && break; sleep 0.1; done
  gw=$(ss -ltnpH 'sport = :3012' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
}

case "${1:-}" in
storm)
  cluster sbstorm
  out=$work/storm.txt; rm -f "$out"
  (cd "$LOAD" && node src/cli.js --keys "$keys" --targets http://127.0.0.1:3002,http://127.0.0.1:3003 \
    --connections "${N:-10000}" --channels $(( ${N:-10000} / 10 )) --rate 10 --duration 3 \
    --connect-concurrency 500 --server-pids "$(paste -sd, "$root/run/pids")" >"$out" 2>&1) &
  gen=$!
  # The connect phase: from the end of the REST set-up to the last connection.
  until grep -q "setup (REST)" "$out" 2>/dev/null; do kill -0 $gen 2>/dev/null || break; sleep 0.1; done
  gpids=$(pgrep -f "$LOAD/src|src/cli.js|src/worker.js" | tr '\n' ' ')
  snap() { ticks $gpids >"$work/g.$1"; ticks $(cat "$root/run/pids") >"$work/s.$1"; ticks "$rpid" >"$work/r.$1"; ticks $(pg_pids sbstorm) >"$work/p.$1"; }
  snap 0
  until grep -q "^connected" "$out" 2>/dev/null; do kill -0 $gen 2>/dev/null || break; sleep 0.1; done
  snap 1
  wait $gen
  grep -E "^setup|^connected|connect -> success" "$out"
  echo "connect phase CPU: generator $(cpu_diff "$work/g.0" "$work/g.1") s, gateways+workers $(cpu_diff "$work/s.0" "$work/s.1") s," \
    "redis $(cpu_diff "$work/r.0" "$work/r.1") s, postgres $(cpu_diff "$work/p.0" "$work/p.1") s"
  stop_cluster
  ;;
fanout)
  cluster sbfan
  (cd "$LOAD" && node src/cli.js --keys "$keys" --targets http://127.0.0.1:3002,http://127.0.0.1:3003 \
    --connections 5000 --channels 1 --members 5000 --senders 20 --rate "${RATE:-10}" --duration "${DUR:-20}" \
    --connect-concurrency 100 --server-pids "$(paste -sd, "$root/run/pids")" 2>&1) | grep -v '^{'
  stop_cluster
  ;;
max)
  # Per-user message limits off: 200 senders each keep 8 messages in flight.
  RATE_MESSAGES_PER_S=0 cluster sbmax
  if [ -n "${RATE:-}" ]; then chat_load --rate "$RATE"; else chat_load "${closed_loop[@]}"; fi
  stop_cluster
  ;;
memory)
  one_gateway sbmem
  "$root/target/release/switchboard-loadtest" connect --targets http://127.0.0.1:3012 --secret benchsecret \
    --connections "${N:-8000}" --rate 2000 --hold 3 --source-ips 8 --gateway-pid "$gw" ${BROWSER:+--browser-headers} 2>&1 \
    | grep -E "^connect:|connect\+auth|RSS"
  kill -TERM "$gw"
  ;;
idle)
  one_gateway sbidle
  n=${N:-8000}
  "$root/target/release/switchboard-loadtest" connect --targets http://127.0.0.1:3012 --secret benchsecret \
    --connections "$n" --rate 2000 --hold $(( n / 2000 + 45 )) --source-ips 8 >"$work/idle-load.txt" 2>&1 &
  load=$!
  sleep $(( n / 2000 + 8 ))   # the ramp and a settle
  ticks "$gw" >"$work/idle.g0"; ticks "$rpid" >"$work/idle.r0"; redis-cli -p "$R" CONFIG RESETSTAT >/dev/null
  sleep 30
  ticks "$gw" >"$work/idle.g1"; ticks "$rpid" >"$work/idle.r1"
  echo "$n idle connections, 30 s: gateway $(cpu_diff "$work/idle.g0" "$work/idle.g1") s, redis $(cpu_diff "$work/idle.r0" "$work/idle.r1") s of CPU"
  redis-cli -p "$R" INFO commandstats | tr -d '\r' | grep -E "^cmdstat_evalsha:" | cut -d, -f1
  kill "$load" 2>/dev/null; kill -TERM "$gw"
  ;;
footprint)
  # What each process of 2 gw + 2 wk holds: idle 5 s after the start, then after the closed loop of
  # `max` (REDIS_CLUSTER=1: on a local Redis Cluster of scripts/redis-cluster).
  [ -n "${REDIS_CLUSTER:-}" ] && RURL=$("$root/scripts/redis-cluster" start)
  RATE_MESSAGES_PER_S=0 cluster sbfoot
  rss_of() {
    for p in $(cat "$root/run/pids"); do
      awk -v name="$(basename "$(readlink "/proc/$p/exe")" | cut -d' ' -f1)" '
        { kb[$1] = $2 }
        END { printf "  %s: RSS %s KB, anonymous %s KB (huge pages %s KB)\n", name, kb["Rss:"], kb["Anonymous:"], kb["AnonHugePages:"] }
      ' "/proc/$p/smaps_rollup"
    done
  }
  sleep 5
  echo "idle:"; rss_of
  chat_load "${closed_loop[@]}" | grep -E "^messages"
  echo "after the closed loop:"; rss_of
  stop_cluster
  ;;
*) echo "usage: loadtest/limits.sh storm|fanout|memory|idle|max|footprint" >&2; exit 2 ;;
esac

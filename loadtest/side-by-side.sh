#!/usr/bin/env bash
# Everyday load side by side (BENCHMARKS.md, issue 9 target 1): Switchboard (2 gateways + 2 workers,
# release build) and the Node reference (2 nodes), then the embedded mode, each driven by the
# independent generator of ../shared/anchors/load with the same command, on a private redis-server
# (REDIS_PORT, default 6390). CPU is read from /proc by PID: the servers, that Redis, and the
# PostgreSQL backends of the run's database, so other work on the machine does not count; the
# generator's own CPU is excluded. Each side's line ends with its CPU per 1,000 persisted messages; with
# `all` the last lines give target 1's ratios (the reference's CPU per message over ours), from this one run.
#
#   loadtest/side-by-side.sh [all|sb|ref|embedded]      (DUR=30 by default)
#
# Needs: target/release binaries (cargo build --release), node/npm, local PostgreSQL (postgres, trust).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/switchboard-side-by-side}
out=$work/out; mkdir -p "$out"
DUR=${DUR:-30}
CMD="--connections 1000 --channels 100 --rate 400 --duration $DUR"
R=${REDIS_PORT:-6390}; RURL=redis://127.0.0.1:$R

# shellcheck source=lib.sh
. "$root/loadtest/lib.sh"
anchors "$root" "$work"
export AUTH_PUBLIC_KEY_FILE=$keys/public.pem
rpid=$(private_redis "$R" "$work")

run_load() { # name targets server-pids(comma) db
  local name=$1 targets=$2 spids=$3 db=$4
  redis-cli -p "$R" CONFIG RESETSTAT >/dev/null
  ticks ${spids//,/ } >"$out/$name.s0"; ticks "$rpid" >"$out/$name.r0"; ticks $(pg_pids "$db") >"$out/$name.p0"
  (cd "$LOAD" && node src/cli.js --keys "$keys" --targets "$targets" $CMD --server-pids "$spids" >"$out/$name.txt" 2>&1)
  ticks ${spids//,/ } >"$out/$name.s1"; ticks "$rpid" >"$out/$name.r1"; ticks $(pg_pids "$db") >"$out/$name.p1"
  redis-cli -p "$R" INFO commandstats >"$out/$name-redis.txt"
  local s r p d
  s=$(cpu_diff "$out/$name.s0" "$out/$name.s1"); r=$(cpu_diff "$out/$name.r0" "$out/$name.r1")
  p=$(cpu_diff "$out/$name.p0" "$out/$name.p1")
  # Persisted = answered DELIVERED (both implementations answer it after the insert).
  d=$(awk '/^messages/ { for (i = 1; i < NF; i++) if ($i == "DELIVERED") print $(i + 1) }' "$out/$name.txt")
  awk -v s="$s" -v r="$r" -v p="$p" -v d="${d:-0}" 'BEGIN { if (d > 0) printf "%.3f\n", (s + r + p) * 1000 / d }' >"$out/$name.per1k"
  echo "== $name: servers $s s, redis $r s, postgres $p s: $(cat "$out/$name.per1k") s of CPU per 1,000 persisted messages"
  grep -E "latency|connect ->|send ->|messages|deliveries|generator|server " "$out/$name.txt"
}

case "${1:-all}" in
sb | all)
  psql -qAt postgres://postgres@127.0.0.1:5432/postgres -c "DROP DATABASE IF EXISTS sbbench WITH (FORCE)" >/dev/null
  (cd "$root" && DATABASE_URL=postgres://postgres@127.0.0.1:5432/sbbench REDIS_URL=$RURL REDIS_PREFIX=sbbench \
    NO_BUILD=1 RUST_LOG=warn scripts/dev-cluster >"$out/sb-start.txt" 2>&1) || { cat "$out/sb-start.txt"; exit 1; }
  run_load sb http://127.0.0.1:3002,http://127.0.0.1:3003 "$(paste -sd, "$root/run/pids")" sbbench
  (cd "$root" && scripts/dev-cluster stop >/dev/null 2>&1)
  ;;&
ref | all)
  (cd "$REF" && RESET_DB=1 REDIS_URL=$RURL ./start.sh 4002 4003 >"$out/ref-start.txt" 2>&1) || { cat "$out/ref-start.txt"; exit 1; }
  run_load ref http://127.0.0.1:4002,http://127.0.0.1:4003 "$(paste -sd, "$REF/run/pids")" noderef
  (cd "$REF" && ./stop.sh >/dev/null 2>&1)
  ;;&
embedded | all)
  rm -rf "$work/embedded-data"
  (cd "$root" && env -u REDIS_URL -u DATABASE_URL PORT=3004 DATA_DIR="$work/embedded-data" RUST_LOG=warn \
    nohup target/release/switchboard-gateway >"$out/embedded.log" 2>&1 &)
  for _ in $(seq 100); do curl -sf http://127.0.0.1:3004/readyz >/dev/null && break; sleep 0.1; done
  epid=$(ss -ltnpH 'sport = :3004' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
  run_load embedded http://127.0.0.1:3004 "$epid" none
  kill -TERM "$epid"
  ;;
esac

# Target 1's figure, from this one run: the reference's CPU per message over ours.
if [ "${1:-all}" = all ] && [ -s "$out/ref.per1k" ]; then
  for name in sb embedded; do
    [ -s "$out/$name.per1k" ] && awk -v n="$name" -v a="$(cat "$out/ref.per1k")" -v b="$(cat "$out/$name.per1k")" \
      'BEGIN { printf "== %s: %.2fx less CPU per persisted message than node-ref (%.3f against %.3f s per 1,000)\n", n, a / b, b, a }'
  done
fi

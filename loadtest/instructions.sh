#!/usr/bin/env bash
# Instructions per message of one gateway, or with WHICH=worker of the worker (BENCHMARKS.md,
# "Issue 9, fifth pass"): a repeatable figure for the per-message cost, where CPU seconds on this
# shared 2-core box move by ±10 % between identical runs. The measured process runs under
# `valgrind --tool=callgrind` (user-space instructions of the process: its code, the libraries and
# the allocator; the kernel's side of its system calls is not counted), the other as usual (one
# gateway, one worker), on a private redis-server and a fresh PostgreSQL database.
# `switchboard-loadtest chat` connects N sockets in N/10 channels and sends RATE msg/s for DUR s;
# after the first second of sending the counters are zeroed (one-time work left out), and at the
# end the instructions are divided by the messages the gateway accepted since (each also fans out
# to its channel's members on this gateway, with SENT and DELIVERED to its sender).
#
#   loadtest/instructions.sh            (N=200 sockets, RATE=40 msg/s, DUR=15 s)
#   COUNT=syscalls loadtest/instructions.sh
#
# COUNT=syscalls counts the measured process' system calls instead (`strace -c -f` attached over
# the same window, the process running natively): the kernel's side of the cost (frames written,
# Redis and database round trips, wake-ups), which instructions do not show and which is a third
# to a half of a gateway's CPU at everyday load. Counts per message, by call.
#
# Env: COUNT (instructions), N, RATE, DUR, REDIS_PORT (6390), WORK (/tmp/switchboard-side-by-side), BIN (target/release),
# and any gateway setting. Needs valgrind, target/release binaries, local PostgreSQL (postgres, trust).
# Takes about a minute; the same binaries give the same figure within ~2 % run to run.
# Compare builds with it, not its split against perf's: callgrind counts each byte a large
# `memcpy` moves (`rep movsb`) as an instruction, so copies weigh several times their cycles
# (BENCHMARKS.md, "Issue 9, seventh pass").
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/switchboard-side-by-side}
bin=${BIN:-$root/target/release}
N=${N:-200}; RATE=${RATE:-40}; DUR=${DUR:-15}; WHICH=${WHICH:-gateway}
R=${REDIS_PORT:-6390}; RURL=redis://127.0.0.1:$R
PG=postgres://postgres@127.0.0.1:5432; DB=sbinstr
PORT=3022
# shellcheck source=lib.sh
. "$root/loadtest/lib.sh"
COUNT=${COUNT:-instructions}
case "$COUNT" in
instructions) command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is missing (apt-get install valgrind)" >&2; exit 1; } ;;
syscalls) command -v strace >/dev/null || { echo "instructions.sh: strace is missing (apt-get install strace)" >&2; exit 1; } ;;
*) echo "instructions.sh: COUNT is instructions or syscalls" >&2; exit 2 ;;
esac
mkdir -p "$work"
private_redis "$R" "$work" >/dev/null
psql -qAt "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
psql -qAt "$PG/postgres" -c "CREATE DATABASE $DB" >/dev/null
export DATABASE_URL=$PG/$DB REDIS_URL=$RURL REDIS_PREFIX=$DB$RANDOM AUTH_DEV_SECRET=benchsecret RUST_LOG=warn
"$bin/switchboard-worker" migrate >/dev/null 2>&1 || { echo "instructions.sh: migration failed" >&2; exit 1; }
out=$work/instr.callgrind
rm -f "$out" "$out".*
grind() { exec nohup valgrind --tool=callgrind --callgrind-out-file="$out" "$@"; }
plain() { exec nohup "$@"; }
gw_run=grind; wk_run=plain
[ "$WHICH" = worker ] && { gw_run=plain; wk_run=grind; }
[ "$COUNT" = syscalls ] && { gw_run=plain; wk_run=plain; }
METRICS_PORT=9322 NODE_ID=worker-instr $wk_run "$bin/switchboard-worker" >"$work/instr-worker.log" 2>&1 &
wpid=$!
PORT=$PORT NODE_ID=gateway-instr $gw_run "$bin/switchboard-gateway" >"$work/instr-gw.log" 2>&1 &
gpid=$!
measured=$gpid; [ "$WHICH" = worker ] && measured=$wpid
trace=$work/instr.strace; tpid=
cleanup() { [ -n "$tpid" ] && kill -INT "$tpid" 2>/dev/null; kill -TERM "$gpid" "$wpid" 2>/dev/null; wait "$gpid" "$wpid" 2>/dev/null; }
trap cleanup EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null || { echo "instructions.sh: gateway not ready; see $work/instr-gw.log" >&2; exit 1; }
metric() { curl -sf "http://127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

"$bin/switchboard-loadtest" chat --targets "http://127.0.0.1:$PORT" --secret benchsecret \
  --connections "$N" --channels $((N / 10)) --rate "$RATE" --duration "$DUR" --warmup 0 --drain 3 \
  --connect-concurrency 20 >"$work/instr-load.txt" 2>&1 &
load=$!
until [ "$(metric gateway_sockets_connected)" = "$N" ]; do
  kill -0 "$load" 2>/dev/null || { echo "instructions.sh: the generator ended before $N sockets connected" >&2; cat "$work/instr-load.txt" >&2; exit 1; }
  sleep 0.2
done
# One second of sending first: one-time work (the metrics clock's calibration, prepared
# statements, first script loads) is not a per-message cost.
until [ "${w:=$(metric gateway_messages_accepted_total)}" -ge "$RATE" ] 2>/dev/null; do
  unset w; kill -0 "$load" 2>/dev/null || break; sleep 0.2
done
if [ "$COUNT" = syscalls ]; then
  rm -f "$trace"; strace -c -f -p "$measured" -o "$trace" 2>/dev/null & tpid=$!
  sleep 0.5   # attached
else
  callgrind_control -z "$measured" >/dev/null
fi
a0=$(metric gateway_messages_accepted_total); a0=${a0:-0}
wait "$load"
a1=$(metric gateway_messages_accepted_total)
grep -E "^  sent|^  lost|send → message:created" "$work/instr-load.txt"
if [ "$COUNT" = syscalls ]; then
  kill -INT "$tpid"; wait "$tpid" 2>/dev/null; tpid=
  [ -s "$trace" ] || { echo "instructions.sh: strace wrote nothing ($trace)" >&2; exit 1; }
  # strace -c: % time, seconds, usecs/call, calls, [errors,] syscall; the busiest calls first
  # (those under 0.05 per message left out of the list, not of the total).
  awk '$1 ~ /^[0-9.]+$/ { print $4, $NF }' "$trace" | sort -rn | awk -v w="$WHICH" -v a="$((a1 - a0))" '
    $2 == "total" { total = $1; next }
    $1 / a >= 0.05 { line = line sprintf("%s%s %.1f", (line == "" ? "" : ", "), $2, $1 / a) }
    END { printf "%s system calls: %d for %d accepted messages: %.1f per message (%s)\n", w, total, a, total / a, line }'
  exit 0
fi
callgrind_control -d "$measured" >/dev/null
ir=$(callgrind_annotate "$out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
[ -n "$ir" ] || { echo "instructions.sh: no callgrind dump ($out.1); see $work/instr-*.log" >&2; exit 1; }
awk -v w="$WHICH" -v ir="$ir" -v a="$((a1 - a0))" 'BEGIN {
  printf "%s instructions: %.0f M for %d accepted messages: %.0f k per message\n", w, ir / 1e6, a, ir / a / 1e3 }'

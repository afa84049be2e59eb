#!/usr/bin/env bash
# Presence in a reconnect storm (BENCHMARKS.md, issue 13): the `recover` storm — 10,000 sockets
# connecting at once (1,000 in flight) with `since`, 100 channels of 101 members — run twice on the
# same 2 gateways + 2 workers (release) and a private Redis:
#   1. PRESENCE_MAX_MEMBERS=1000 (the default): every channel is small enough, so each of the 10,000
#      users coming online is announced to its channel (the worst case: all come online at once);
#   2. PRESENCE_MAX_MEMBERS=50: the channels are above the cut, no presence event at all.
# Reports per connect: gateway CPU, Redis commands (INFO commandstats), presence events published,
# and the reconnect → recovered percentiles.
#
#   loadtest/presence-storm.sh            (needs target/release binaries, local PostgreSQL, openssl)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/switchboard-presence-storm}
mkdir -p "$work"
R=${REDIS_PORT:-6391}
PORTS_=(3012 3013)
STORM=${STORM:-10000}

# RS256, as Clerk: the handshake cost includes a real signature check.
[ -f "$work/private.pem" ] || {
  openssl genrsa -out "$work/private.pem" 2048 2>/dev/null
  openssl rsa -in "$work/private.pem" -pubout -out "$work/public.pem" 2>/dev/null
}
redis-cli -p "$R" ping >/dev/null 2>&1 || {
  mkdir -p "$work/redis"
  redis-server --port "$R" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/redis" --daemonize yes >/dev/null
  sleep 0.5
}

commands() { # total calls in INFO commandstats
  redis-cli -p "$R" info commandstats | awk -F'[=,:]' '/^cmdstat_/ {s += $3} END {print s + 0}'
}
metric() { # port name -> summed value of a counter over its label sets
  curl -fsS "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 ~ "^"n"({|$)" {s += $2} END {print s + 0}'
}

for cut in 1000 50; do
  db=sb_presence_storm_$cut
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
  redis-cli -p "$R" flushall >/dev/null
  export PORTS="${PORTS_[*]}" REDIS_URL=redis://127.0.0.1:$R REDIS_PREFIX=storm DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db
  export AUTH_PUBLIC_KEY_FILE=$work/public.pem PRESENCE_MAX_MEMBERS=$cut RATE_MESSAGES_PER_S=0 RATE_REST_PER_S=0
  export METRICS_PORT_BASE=9112 NO_BUILD=1 RUST_LOG=warn
  "$root/scripts/dev-cluster" >/dev/null
  gw=$(head -2 "$root/run/pids" | paste -sd,)
  c0=$(commands)
  "$root/target/release/switchboard-loadtest" recover --targets "http://127.0.0.1:${PORTS_[0]},http://127.0.0.1:${PORTS_[1]}" \
    --key "$work/private.pem" --missed 10 --storm "$STORM" --storm-channels 100 --storm-missed 5 \
    --source-ips 8 --connect-concurrency 1000 --gateway-pids "$gw" > "$work/storm-$cut.txt" 2>"$work/storm-$cut.err" || true
  c1=$(commands)
  sleep 2 # let the announcements of the last connects out
  online=0 events=0
  for p in "${PORTS_[@]}"; do
    online=$((online + $(metric "$p" gateway_presence_changes_total)))
    events=$((events + $(metric "$p" gateway_channel_events_total)))
  done
  "$root/scripts/dev-cluster" stop >/dev/null
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
  echo "== PRESENCE_MAX_MEMBERS=$cut"
  grep -E "^storm|reconnect→recovered" "$work/storm-$cut.txt" || tail -5 "$work/storm-$cut.err"
  echo "redis commands during the storm: $((c1 - c0)) = $(( (c1 - c0) / STORM )) per connect"
  echo "presence transitions announced: $online; channel events emitted into rooms (both gateways): $events"
done
redis-cli -p "$R" shutdown nosave >/dev/null 2>&1 || true

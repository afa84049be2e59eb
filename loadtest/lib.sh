# Helpers the loadtest/*.sh scripts share (sourced): CPU from /proc by PID.

# ticks PID... -> "pid ticks" lines (user + system time, in 1/100 s)
ticks() {
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] && awk -v p="$p" '{ sub(/.*\) /, ""); split($0, f, " "); print p, f[12] + f[13] }' "/proc/$p/stat"
  done
}
# cpu_diff BEFORE AFTER -> seconds between two `ticks` files (a pid born during the run counts from 0)
cpu_diff() {
  awk 'NR == FNR { a[$1] = $2; next } { s += $2 - ($1 in a ? a[$1] : 0) } END { printf "%.2f", s / 100 }' "$1" "$2"
}
# pg_pids DB -> the PostgreSQL backends serving database DB
pg_pids() { psql -qAt postgres://postgres@127.0.0.1:5432/postgres -c "select pid from pg_stat_activity where datname='$1'"; }

# anchors ROOT WORK -> writable copies of ../shared/anchors under WORK (npm ci writes node_modules),
# and the generator's signing keys in WORK/keys; sets LOAD, REF and keys
anchors() {
  local root=$1 work=$2
  if [ ! -d "$work/anchors/load/node_modules" ] || [ ! -d "$work/anchors/node-ref/node_modules" ]; then
    rm -rf "$work/anchors"; mkdir -p "$work"; cp -r "$root/../shared/anchors" "$work/anchors"; chmod -R u+w "$work/anchors"
    (cd "$work/anchors/load" && npm ci --no-audit --no-fund --loglevel=error)
    (cd "$work/anchors/node-ref" && npm ci --no-audit --no-fund --loglevel=error)
  fi
  LOAD=$work/anchors/load; REF=$work/anchors/node-ref; keys=$work/keys
  # The generator creates its keys on first use; a 1-second dry run against nothing is enough.
  [ -f "$keys/public.pem" ] || (cd "$LOAD" && timeout 5 node src/cli.js --keys "$keys" --targets http://127.0.0.1:9 --connections 1 --duration 1 >/dev/null 2>&1; true)
}
# private_redis PORT WORK -> a redis-server without persistence on PORT (started unless running); prints its pid
private_redis() {
  redis-cli -p "$1" ping >/dev/null 2>&1 || {
    mkdir -p "$2/redis"
    redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no --dir "$2/redis" --daemonize yes >/dev/null
    sleep 0.5
  }
  redis-cli -p "$1" info server | awk -F: '/^process_id/ {print $2}' | tr -d '\r'
}

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

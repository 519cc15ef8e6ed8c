#!/bin/bash
# compare.sh - PostgreSQL peer vs citycard, side by side, on this machine, in one go.
#
# PostgreSQL: ../shared/peers (pg_setup.sh, pg_run.sh, pg_stop.sh) with pg_debit_cte.sql
# (one-statement conditional debit + journal insert) and synchronous_commit=on, pgbench -M
# prepared over TCP 127.0.0.1. citycard: citycard-loadtest --spawn (fresh server, fresh keys,
# temporary data directory, 127.0.0.1), closed loop, pipeline 1, purchase-only mix by default
# (each transaction a durable debit, like the SQL script). Both at 1, 8 and 64 concurrent
# terminals/clients, the same number of seconds each. PostgreSQL is stopped before citycard runs,
# so the two never share the cores, and is stopped on exit even when something fails.
#
# Usage: loadtest/compare.sh [seconds=10]
# Env:   PEERS     peers directory (default: <repo>/../shared/peers)
#        CLIENTS   client counts (default "1 8 64")
#        MIX       citycard operation mix (default purchase=100)
#        LOADTEST  citycard-loadtest binary (default <repo>/target/release/citycard-loadtest;
#                  the citycard binary must sit next to it)
#        OUT       results directory (default /tmp/citycard-compare)
#        ANCHOR_TMP, PGPORT  PostgreSQL scratch dir and port (default $OUT/anchors, 54339: not
#                  the peers' own defaults, so a concurrent anchors session is not disturbed)
# Needs: PostgreSQL 15 with pgbench (apt-get install postgresql-contrib if pgbench is missing),
#        python3, and `cargo build --release -p citycard -p citycard-loadtest` done.
set -euo pipefail
SECS=${1:-10}
case $SECS in '' | *[!0-9]*) echo "seconds must be a whole number, got '$SECS'" >&2; exit 2 ;; esac
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PEERS=${PEERS:-$(dirname "$0")/../../shared/peers}
PEERS=$(cd "$PEERS" && pwd)
CLIENTS=${CLIENTS:-"1 8 64"}
MIX=${MIX:-purchase=100}
LOADTEST=${LOADTEST:-$REPO/target/release/citycard-loadtest}
OUT=${OUT:-/tmp/citycard-compare}
export ANCHOR_TMP=${ANCHOR_TMP:-$OUT/anchors}
export PGPORT=${PGPORT:-54339}
mkdir -p "$OUT"

for f in pg_setup.sh pg_run.sh pg_stop.sh pg_debit_cte.sql; do
  [ -e "$PEERS/$f" ] || { echo "missing $PEERS/$f" >&2; exit 2; }
done
command -v pgbench >/dev/null || { echo "pgbench not found: apt-get install postgresql-contrib" >&2; exit 2; }
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 2; }
[ -x "$LOADTEST" ] || { echo "no $LOADTEST: cargo build --release -p citycard -p citycard-loadtest" >&2; exit 2; }
[ -x "$(dirname "$LOADTEST")/citycard" ] || { echo "no citycard binary next to $LOADTEST" >&2; exit 2; }

pg_stopped=0
stop_pg() {
  if [ "$pg_stopped" = 0 ]; then
    timeout 90 bash "$PEERS/pg_stop.sh" || echo "warning: pg_stop.sh failed" >&2
    pg_stopped=1
  fi
}
trap stop_pg EXIT
trap 'exit 130' INT TERM

n=$(wc -w <<<"$CLIENTS")
echo "# compare.sh $(date -Is): ${SECS}s per run, clients: $CLIENTS, $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg)"

# --- PostgreSQL --------------------------------------------------------------------------
echo "# PostgreSQL: setup (1M cards) in $ANCHOR_TMP, port $PGPORT"
timeout 900 bash "$PEERS/pg_setup.sh" | sed 's/^/  /'
echo "# PostgreSQL: pg_debit_cte.sql, synchronous_commit=on"
timeout $(( (SECS + 90) * n + 30 )) bash "$PEERS/pg_run.sh" pg_debit_cte.sql on "$SECS" 1 "$CLIENTS" \
  | tee "$OUT/pg.txt" | sed 's/^/  /'
stop_pg

# --- citycard ----------------------------------------------------------------------------
for c in $CLIENTS; do
  echo "# citycard: --connections $c --mix $MIX"
  rc=0
  timeout $(( SECS + 120 )) "$LOADTEST" --spawn --connections "$c" --duration "${SECS}s" --warmup 1s \
    --mix "$MIX" --verify --no-progress --json "$OUT/citycard_c$c.json" --hgrm "$OUT/citycard_c$c.hgrm" \
    > "$OUT/citycard_c$c.txt" 2>&1 || rc=$?
  grep -E '^(throughput|latency|errors|cpu|verify)' "$OUT/citycard_c$c.txt" | sed 's/^/  /' || true
  [ "$rc" = 0 ] || { echo "  citycard-loadtest exited $rc (see $OUT/citycard_c$c.txt)"; tail -5 "$OUT/citycard_c$c.txt" | sed 's/^/  /'; }
done

# --- table -------------------------------------------------------------------------------
echo
echo "# ${SECS}s per run; latency in ms; citycard mix $MIX; PostgreSQL pg_debit_cte.sql synchronous_commit=on"
python3 - "$OUT" "$CLIENTS" <<'PY'
import json, os, re, sys
out, clients = sys.argv[1], sys.argv[2].split()
pg = {}
try:
    for line in open(os.path.join(out, "pg.txt")):
        m = re.search(r"c=(\d+)\s+tps=(\S+).*p50=(\S+)\s+p99=(\S+)", line)
        if m:
            pg[m.group(1)] = (m.group(2), m.group(3), m.group(4))
except OSError:
    pass
def cc(c):
    try:
        d = json.load(open(os.path.join(out, f"citycard_c{c}.json")))
    except (OSError, ValueError):
        return ("-", "-", "-", "-", "-")
    ok = "ok" if d["errors"] == 0 and d["timeouts"] == 0 and d["verify_mismatches"] == 0 else "ERRORS"
    cpu = d.get("server_cpu_us_per_tx")
    return (f"{d['throughput_tps']:.0f}", f"{d['p50_us']/1000:.2f}", f"{d['p99_us']/1000:.2f}",
            "-" if cpu is None else f"{cpu:.0f}", ok)
print(f"{'clients':>7} | {'pg tps':>8} {'p50':>7} {'p99':>7} | {'citycard tps':>12} {'p50':>7} {'p99':>7} {'srv us/tx':>9} {'check':>6}")
print("-" * 7 + "-+-" + "-" * 24 + "-+-" + "-" * 46)
for c in clients:
    p = pg.get(c, ("-", "-", "-"))
    t = cc(c)
    print(f"{c:>7} | {p[0]:>8} {p[1]:>7} {p[2]:>7} | {t[0]:>12} {t[1]:>7} {t[2]:>7} {t[3]:>9} {t[4]:>6}")
PY
echo "# raw output in $OUT"

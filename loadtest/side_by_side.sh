#!/usr/bin/env bash
# side_by_side.sh - citycard, its floor and its peers on this machine, in one run, each alone on
# the cores in turn (back to back, never two at once), closed loop, pipeline 1, the same seconds
# each, at 1, 8 and 64 terminals. Prints one table: throughput, p50/p99/p99.9 and server CPU per
# transaction of each, and citycard's ratio to each.
#
#   floor     citycard-loadtest --floor: an in-process echo server with the same TLS 1.3 (mutual,
#             same certificates), framing and frame sizes, which decides nothing and writes
#             nothing. What TLS, the sockets and the load tester alone cost here.
#   citycard  citycard-loadtest --spawn --verify: a fresh durable server (journal fdatasync before
#             every answer), MIX below (purchase-only by default: a durable debit each).
#   redis     ../shared/peers (when present): Redis 7 with a Lua debit script and AOF
#             appendfsync always; PING on the same server as the no-work ceiling.
#   pg        ../shared/peers (when present): PostgreSQL 15, pgbench -M prepared, one-statement
#             conditional debit + journal insert (pg_debit_cte.sql), synchronous_commit=on.
#
# Server CPU per transaction is utime+stime from /proc over the run: of the spawned citycard
# process (measured window only), of the floor's threads, of redis-server (its calibration run
# included, and counted), of the PostgreSQL postmaster and its backends (reaped backends
# counted through cutime/cstime; pg_run.sh's CHECKPOINT before each run included). The peers'
# scripts report no p99.9 ("-"). On a shared machine every wall-clock figure is noise: rerun on
# a quiet one before quoting it, and read CPU us/tx (which moves much less) for decisions.
#
# Usage: loadtest/side_by_side.sh [BIN_DIR=<repo>/target/release] [seconds=10]
#        (BIN_DIR holds citycard + citycard-loadtest: cargo build --release -p citycard -p citycard-loadtest)
# Env:   CLIENTS  terminal counts (default "1 8 64");  MIX  citycard operation mix (default
#        purchase=100);  PEERS  peers directory (default <repo>/../shared/peers; PEERS=none skips
#        them);  OUT  keep the raw outputs there (default: a temporary directory, removed)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(cd "${1:-$HERE/../target/release}" && pwd) || exit 2
SECS=${2:-10}
case $SECS in '' | *[!0-9]*) echo "seconds must be a whole number, got '$SECS'" >&2; exit 2 ;; esac
CLIENTS=${CLIENTS:-"1 8 64"}
MIX=${MIX:-purchase=100}
PEERS=${PEERS:-$HERE/../../shared/peers}
for b in citycard citycard-loadtest; do
  [ -x "$BIN/$b" ] || { echo "no $BIN/$b: cargo build --release -p citycard -p citycard-loadtest" >&2; exit 2; }
done
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 2; }
T=$(mktemp -d); chmod 755 "$T"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; else OUT=$T/out; mkdir -p "$OUT"; fi
# The peers' own scratch dir and ports, apart from their defaults so that a concurrent peers
# session is not disturbed.
export ANCHOR_TMP=$T/anchors PGPORT=54392 REDIS_PORT=63792
have_peers=0
if [ "$PEERS" != none ] && [ -x "$PEERS/redis_run.sh" ] && [ -x "$PEERS/pg_run.sh" ]; then
  PEERS=$(cd "$PEERS" && pwd); have_peers=1
fi
cleanup() {
  if [ "$have_peers" = 1 ]; then
    timeout 90 "$PEERS/pg_stop.sh" >/dev/null 2>&1
    timeout 90 "$PEERS/redis_stop.sh" >/dev/null 2>&1
  fi
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
echo "# loadtest/side_by_side $(date -Is) ${SECS}s per run, terminals: $CLIENTS, citycard mix $MIX, $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg)"

# utime+stime (+ reaped children with "children") of a pid, in clock ticks.
ticks() { # pid [children]
  local f mode=${2:-self}
  f=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  # shellcheck disable=SC2086
  set -- "$mode" $f
  if [ "$1" = children ]; then echo $(( ${13} + ${14} + ${15} + ${16} )); else echo $(( ${13} + ${14} )); fi
}
# The PostgreSQL cluster: postmaster with reaped children, plus its live children.
pg_ticks() {
  local pm total c
  pm=$(head -1 "$ANCHOR_TMP/pg/data/postmaster.pid" 2>/dev/null) || { echo 0; return; }
  total=$(ticks "$pm" children)
  for c in $(pgrep -P "$pm" 2>/dev/null); do total=$(( total + $(ticks "$c") )); done
  echo "$total"
}

run_tester() { # tag mode-flag connections [extra...]
  local tag=$1 mode=$2 c=$3; shift 3
  (cd "$T" && timeout $((SECS + 180)) "$BIN/citycard-loadtest" "$mode" --cards 10000 --connections "$c" \
     --pipeline 1 --duration "${SECS}s" --warmup 1s --mix "$MIX" --no-progress "$@" \
     --json "$OUT/$tag.json" >"$OUT/$tag.txt" 2>&1) || echo "run $tag failed: $(tail -2 "$OUT/$tag.txt")"
}
for c in $CLIENTS; do
  run_tester "floor_c$c" --floor "$c"
  run_tester "cc_c$c" --spawn "$c" --verify
done

if [ "$have_peers" = 1 ]; then
  echo "# peers from $PEERS"
  if timeout 900 "$PEERS/redis_setup.sh" >"$OUT/redis_setup.log" 2>&1; then
    rpid=$(cat "$ANCHOR_TMP/redis/redis.pid")
    for test in debit ping; do
      for c in $CLIENTS; do
        t0=$(ticks "$rpid")
        timeout $((SECS * 6 + 120)) "$PEERS/redis_run.sh" always "$SECS" 1 "$c" "$test" >"$OUT/redis_${test}_c$c.txt" 2>&1
        echo "cpu_ticks=$(( $(ticks "$rpid") - t0 )) calibration=$(( c * 100 > 3000 ? c * 100 : 3000 ))" >>"$OUT/redis_${test}_c$c.txt"
      done
    done
  else
    echo "redis setup failed: $(tail -2 "$OUT/redis_setup.log")"
  fi
  timeout 90 "$PEERS/redis_stop.sh" >/dev/null 2>&1
  if timeout 900 "$PEERS/pg_setup.sh" >"$OUT/pg_setup.log" 2>&1; then
    for c in $CLIENTS; do
      t0=$(pg_ticks)
      timeout $((SECS + 120)) "$PEERS/pg_run.sh" pg_debit_cte.sql on "$SECS" 1 "$c" >"$OUT/pg_c$c.txt" 2>&1
      echo "cpu_ticks=$(( $(pg_ticks) - t0 ))" >>"$OUT/pg_c$c.txt"
    done
  else
    echo "pg setup failed: $(tail -2 "$OUT/pg_setup.log")"
  fi
  timeout 90 "$PEERS/pg_stop.sh" >/dev/null 2>&1
fi

python3 - "$OUT" "$CLIENTS" "$TCK" "$SECS" <<'PY'
import json, os, re, sys
out, clients, tck, secs = sys.argv[1], sys.argv[2].split(), int(sys.argv[3]), int(sys.argv[4])
def text(tag):
    try: return open(os.path.join(out, tag + ".txt")).read()
    except OSError: return ""
def tester(tag):
    try: d = json.load(open(os.path.join(out, tag + ".json")))
    except (OSError, ValueError): return None
    ok = d["errors"] == 0 and d["timeouts"] == 0 and d["verify_mismatches"] == 0
    return {"tps": d["throughput_tps"], "p50": d["p50_us"] / 1000, "p99": d["p99_us"] / 1000,
            "p999": d["p999_us"] / 1000, "cpu": d.get("server_cpu_us_per_tx"), "ok": ok}
def redis(test, c):
    t = text(f"redis_{test}_c{c}")
    m = re.search(r"c=\d+\s+n=(\d+).*ops/s=(\S+)\s+lat_ms avg=\S+\s+p50=(\S+)\s+p99=(\S+)", t)
    if not m: return None
    k = re.search(r"cpu_ticks=(\d+) calibration=(\d+)", t)
    n = int(m.group(1)) + (int(k.group(2)) if k else 0)
    cpu = int(k.group(1)) * 1e6 / tck / n if k and n else None
    return {"tps": float(m.group(2)), "p50": float(m.group(3)), "p99": float(m.group(4)),
            "p999": None, "cpu": cpu, "ok": True}
def pg(c):
    t = text(f"pg_c{c}")
    m = re.search(r"c=\d+\s+tps=(\S+).*p50=(\S+)\s+p99=(\S+)", t)
    if not m: return None
    k = re.search(r"cpu_ticks=(\d+)", t)
    tps = float(m.group(1))
    cpu = int(k.group(1)) * 1e6 / tck / (tps * secs) if k and tps else None
    return {"tps": tps, "p50": float(m.group(2)), "p99": float(m.group(3)), "p999": None,
            "cpu": cpu, "ok": True}
def f(v, fmt):
    return "-" if v is None else fmt.format(v)
systems = [("citycard", lambda c: tester(f"cc_c{c}")), ("floor", lambda c: tester(f"floor_c{c}")),
           ("redis-always", lambda c: redis("debit", c)), ("redis-PING", lambda c: redis("ping", c)),
           ("postgresql", pg)]
print(f"{'terminals':>9} {'system':<13} {'tps':>8} {'p50':>6} {'p99':>6} {'p99.9':>6} {'us/tx':>6} | "
      f"{'cc/x tps':>8} {'cc/x p99':>8} {'cc/x cpu':>8} {'check':>6}")
for c in clients:
    cc = tester(f"cc_c{c}")
    for name, get in systems:
        d = get(c)
        if d is None:
            print(f"{c:>9} {name:<13} {'(not run)':>8}")
            continue
        ratio = lambda k: (cc[k] / d[k]) if cc and d.get(k) and cc.get(k) else None
        rel = "" if name == "citycard" else (
            f"{f(ratio('tps'), '{:.2f}'):>8} {f(ratio('p99'), '{:.2f}'):>8} {f(ratio('cpu'), '{:.2f}'):>8}")
        print(f"{c:>9} {name:<13} {d['tps']:>8.0f} {d['p50']:>6.2f} {d['p99']:>6.2f} {f(d['p999'], '{:.2f}'):>6} "
              f"{f(d['cpu'], '{:.1f}'):>6} | {rel:<26} {'ok' if d['ok'] else 'ERRORS':>6}")
print("# latency in ms; us/tx = server CPU microseconds per transaction; cc/x = citycard divided by that"
      " system (tps > 1: citycard faster; p99 and cpu < 1: citycard lower)")
PY

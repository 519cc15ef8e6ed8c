#!/usr/bin/env bash
# side_by_side.sh - citycard against its floor, on this machine, in one go: the floor is
# citycard-loadtest --floor (an in-process echo server with the same TLS, certificates and frame
# sizes, which decides nothing and writes nothing), citycard is citycard-loadtest --spawn (a
# fresh durable server). Closed loop, pipeline 1, the same mix and seconds each, at 1, 8 and 64
# terminals, back to back, so the two never share the cores. Prints one table: throughput and
# server CPU per transaction of each, and citycard as a fraction of the floor.
# Sits beside ../shared/peers/side_by_side.sh (PostgreSQL, Redis) and takes the same arguments.
# Usage: loadtest/side_by_side.sh [BIN_DIR=<repo>/target/release] [seconds=10]
#        (BIN_DIR holds citycard + citycard-loadtest: cargo build --release -p citycard -p citycard-loadtest)
# Env:   CLIENTS  terminal counts (default "1 8 64");  MIX  operation mix (default purchase=100)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(cd "${1:-$HERE/../target/release}" && pwd) || exit 2
SECS=${2:-10}
case $SECS in '' | *[!0-9]*) echo "seconds must be a whole number, got '$SECS'" >&2; exit 2 ;; esac
CLIENTS=${CLIENTS:-"1 8 64"}
MIX=${MIX:-purchase=100}
for b in citycard citycard-loadtest; do
  [ -x "$BIN/$b" ] || { echo "no $BIN/$b: cargo build --release -p citycard -p citycard-loadtest" >&2; exit 2; }
done
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 2; }
T=$(mktemp -d); OUT=$T/out; mkdir -p "$OUT"
trap 'rm -rf "$T"' EXIT
echo "# loadtest/side_by_side $(date -Is) ${SECS}s per run, mix $MIX, $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg)"
run() { # tag mode-flag connections [extra...]
  local tag=$1 mode=$2 c=$3; shift 3
  (cd "$T" && timeout $((SECS + 120)) "$BIN/citycard-loadtest" "$mode" --cards 10000 --connections "$c" \
     --pipeline 1 --duration "${SECS}s" --warmup 1s --mix "$MIX" --no-progress "$@" \
     --json "$OUT/$tag.json" >"$OUT/$tag.txt" 2>&1) || echo "run $tag failed: $(tail -2 "$OUT/$tag.txt")"
}
for c in $CLIENTS; do
  run "floor_c$c" --floor "$c"
  run "cc_c$c" --spawn "$c" --verify
done
python3 - "$OUT" "$CLIENTS" <<'PY'
import json, os, sys
out, clients = sys.argv[1], sys.argv[2].split()
def load(tag):
    try: return json.load(open(os.path.join(out, tag + ".json")))
    except (OSError, ValueError): return None
def ok(d):
    return d is not None and d["errors"] == 0 and d["timeouts"] == 0 and d["verify_mismatches"] == 0
def ms(d, k): return f"{d[k]/1000:.2f}" if d else "-"
def num(d, k, f="{:.0f}"):
    v = d.get(k) if d else None
    return "-" if v is None else f.format(v)
print(f"{'terminals':>9} | {'floor tps':>9} {'p50':>6} {'p99':>6} {'p99.9':>6} {'us/tx':>6} | {'citycard':>8} {'p50':>6} {'p99':>6} {'p99.9':>6} {'us/tx':>6} | {'tps cc/floor':>12} {'cpu cc/floor':>12} {'check':>6}")
for c in clients:
    f, d = load(f"floor_c{c}"), load(f"cc_c{c}")
    tps = (d["throughput_tps"] / f["throughput_tps"]) if f and d and f["throughput_tps"] else None
    fc, dc = (f or {}).get("server_cpu_us_per_tx"), (d or {}).get("server_cpu_us_per_tx")
    cpu = dc / fc if fc and dc else None
    check = "ok" if ok(f) and ok(d) else "ERRORS"
    print(f"{c:>9} | {num(f,'throughput_tps'):>9} {ms(f,'p50_us'):>6} {ms(f,'p99_us'):>6} {ms(f,'p999_us'):>6} {num(f,'server_cpu_us_per_tx'):>6} | "
          f"{num(d,'throughput_tps'):>8} {ms(d,'p50_us'):>6} {ms(d,'p99_us'):>6} {ms(d,'p999_us'):>6} {num(d,'server_cpu_us_per_tx'):>6} | "
          f"{'-' if tps is None else f'{tps:.2f}':>12} {'-' if cpu is None else f'{cpu:.1f}x':>12} {check:>6}")
print("# latency in ms; us/tx = server CPU microseconds per answered transaction (the floor's: its threads in the tester's process)")
PY

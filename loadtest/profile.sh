#!/usr/bin/env bash
# profile.sh - what one transaction costs the server, counted rather than timed: a fresh durable
# server (citycard-loadtest --spawn) under a closed-loop load, measured over the load tester's
# measured window only (not key making, card issuing, warm-up or drain), divided by the
# transactions answered in that window. On a shared machine wall-clock throughput is noise;
# these counts move little with the neighbours' load (batch sizes still do, a little).
#
#   perf       perf stat on the server pid: task-clock (CPU us/tx), context switches and
#              syscalls per tx, by kind (reads, writes, fdatasync, futex, epoll). Software
#              events and tracepoints only: a VM guest without hardware counters can run it.
#   record     perf record -g (cpu-clock samples, user and kernel) of the same window; prints
#              the top of `perf report --no-children` (where the CPU goes, syscalls included).
#   callgrind  the server under valgrind --tool=callgrind with collection switched on for the
#              window only (callgrind_control -i on, -d at its end); prints instructions/tx and the top
#              of callgrind_annotate (user-space instructions, inclusive and self). The server
#              runs ~50x slower under valgrind, so its batches are larger than in production:
#              compare callgrind figures with callgrind figures of the same settings only.
#
# Usage: loadtest/profile.sh perf|record|callgrind [BIN_DIR=<repo>/target/release] [seconds=10]
# Env:   CONNECTIONS (default 64), MIX (default purchase=100), CARDS (default 10000; 2000 under
#        callgrind), OUT (default: a temporary directory, removed at the end unless given),
#        TOP (lines of profile printed, default 40)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODE=${1:-}
case $MODE in perf | record | callgrind) ;; *) echo "usage: $0 perf|record|callgrind [BIN_DIR] [seconds]" >&2; exit 2 ;; esac
BIN=$(cd "${2:-$HERE/../target/release}" && pwd) || exit 2
SECS=${3:-10}
case $SECS in '' | *[!0-9]*) echo "seconds must be a whole number, got '$SECS'" >&2; exit 2 ;; esac
CONNECTIONS=${CONNECTIONS:-64}
MIX=${MIX:-purchase=100}
TOP=${TOP:-40}
WARMUP=2
if [ "$MODE" = callgrind ]; then CARDS=${CARDS:-2000}; WARMUP=5; else CARDS=${CARDS:-10000}; fi
for b in citycard citycard-loadtest; do
  [ -x "$BIN/$b" ] || { echo "no $BIN/$b: cargo build --release -p citycard -p citycard-loadtest" >&2; exit 2; }
done
command -v perf >/dev/null || { echo "perf not found" >&2; exit 2; }
if [ "$MODE" = callgrind ]; then
  command -v valgrind >/dev/null || { echo "valgrind not found" >&2; exit 2; }
fi
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 2; }
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; else OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT; fi
# A reused OUT must not hand an earlier run's profile to this run's report (the callgrind file is
# found by name, and an older pid may sort first).
rm -f "$OUT"/callgrind.out.* "$OUT"/perf.data "$OUT"/stat.csv

SERVER_BIN=$BIN/citycard
if [ "$MODE" = callgrind ]; then
  # The load tester runs --server-bin for `keys ...` too: only `serve` goes under valgrind.
  SERVER_BIN=$OUT/citycard-under-callgrind
  cat >"$SERVER_BIN" <<EOF
#!/usr/bin/env bash
[ "\${1:-}" = serve ] || exec "$BIN/citycard" "\$@"
exec valgrind --tool=callgrind --instr-atstart=no --dump-instr=no \\
  --callgrind-out-file="$OUT/callgrind.out.%p" "$BIN/citycard" "\$@"
EOF
  chmod +x "$SERVER_BIN"
fi

TIMEOUT=5s
[ "$MODE" = callgrind ] && TIMEOUT=30s
"$BIN/citycard-loadtest" --spawn --server-bin "$SERVER_BIN" --cards "$CARDS" \
  --connections "$CONNECTIONS" --pipeline 1 --duration "${SECS}s" --warmup "${WARMUP}s" \
  --timeout "$TIMEOUT" --mix "$MIX" --no-progress --json "$OUT/run.json" >"$OUT/run.txt" 2>&1 &
TESTER=$!
# Bounded waits: the server pid, then the start of the load.
pid=""
for _ in $(seq 1 1200); do
  pid=$(sed -n 's/^server pid \([0-9]*\) .*/\1/p' "$OUT/run.txt" | head -1)
  [ -n "$pid" ] && grep -q '^closed loop:' "$OUT/run.txt" && break
  kill -0 "$TESTER" 2>/dev/null || break
  sleep 0.25
done
if [ -z "$pid" ] || ! grep -q '^closed loop:' "$OUT/run.txt"; then
  echo "the load did not start:" >&2; tail -5 "$OUT/run.txt" >&2; kill "$TESTER" 2>/dev/null; exit 1
fi
sleep "$WARMUP"
EVENTS=task-clock,context-switches,cpu-migrations,page-faults,raw_syscalls:sys_enter
for s in read recvfrom write writev sendto sendmsg pwrite64 pwritev fdatasync fsync futex epoll_wait epoll_pwait sched_yield clock_nanosleep; do
  EVENTS=$EVENTS,syscalls:sys_enter_$s
done
case $MODE in
  perf) perf stat -x, -o "$OUT/stat.csv" -e "$EVENTS" -p "$pid" -- sleep "$SECS" 2>/dev/null ;;
  record) perf record -q -g -e cpu-clock -F 999 -o "$OUT/perf.data" -p "$pid" -- sleep "$SECS" >/dev/null 2>&1 ;;
  callgrind)
    # Instrumentation on for the window only; the dump at its end is the window's cost.
    callgrind_control -i on "$pid" >/dev/null
    sleep "$SECS"
    callgrind_control -d "$pid" >/dev/null
    callgrind_control -i off "$pid" >/dev/null ;;
esac
wait "$TESTER"; rc=$?
[ "$rc" = 0 ] || { echo "citycard-loadtest exited $rc:" >&2; tail -8 "$OUT/run.txt" >&2; }
grep -E '^(throughput|latency|errors|cpu)' "$OUT/run.txt"
# The window the counters cover is the load tester's measured window (started after the same
# warm-up, same length), so its answered count is the divisor.
tx=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["answered_in_window"])' "$OUT/run.json" 2>/dev/null || echo 0)
echo "# $MODE, $CONNECTIONS terminals, mix $MIX, ${SECS}s window, $tx transactions answered in it, load $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$tx" -gt 0 ] 2>/dev/null || { echo "no transactions in the window" >&2; exit 1; }
case $MODE in
  perf)
    python3 - "$OUT/stat.csv" "$tx" <<'PY'
import sys
path, tx = sys.argv[1], int(sys.argv[2])
for line in open(path):
    parts = line.strip().split(",")
    if len(parts) < 3 or line.startswith("#") or not parts[0].replace(".", "").isdigit():
        continue
    value, unit, event = float(parts[0]), parts[1], parts[2]
    if event == "task-clock":
        print(f"{'cpu us/tx':>28} {value * 1000 / tx:10.2f}   (task-clock {value:.0f} ms)")
    else:
        name = event.replace("syscalls:sys_enter_", "syscall ").replace("raw_syscalls:sys_enter", "syscalls (all)")
        print(f"{name + ' /tx':>28} {value / tx:10.3f}")
PY
    ;;
  record)
    perf report -i "$OUT/perf.data" --no-children --sort dso,symbol --stdio -g none --percent-limit 0.4 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | head -n "$TOP" ;;
  callgrind)
    f=$(ls "$OUT"/callgrind.out.*.1 2>/dev/null | head -1)
    [ -n "$f" ] || { echo "no callgrind output" >&2; exit 1; }
    total=$(callgrind_annotate "$f" 2>/dev/null | sed -n 's/^\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
    echo "instructions/tx $(python3 -c "print(round(${total:-0} / $tx))")  (total ${total:-?})"
    echo "## inclusive"
    callgrind_annotate --inclusive=yes "$f" 2>/dev/null | sed -n '/^Ir/,$p' | sed 1,2d | head -n "$TOP" | cut -c1-180
    echo "## self"
    callgrind_annotate "$f" 2>/dev/null | sed -n '/^Ir/,$p' | sed 1,2d | head -n "$TOP" | cut -c1-180 ;;
esac

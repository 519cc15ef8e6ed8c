#!/usr/bin/env bash
# Storage figures for the issue "Storage for years": restart time, resident memory per card,
# rebuild from the journal, disk footprint. Release build, real `citycard serve`, data made by
# `examples/bulk_fill.rs` (the engine's decisions, Entry and Journal, then the derived state and
# a checkpoint as a clean stop leaves them; about 35-75k records/s here) and the SIGKILL tails
# by `examples/fill.rs` (through `Shard::execute`). Not run in CI.
#
# Usage: scripts/storage_figures.sh [--sizes 1M,10M] [--with-30m] [--disk-size 5M]
#                                   [--cards-rss 1M,10M] [--work DIR] [--no-build] [--keep]
#
#   --sizes       journal sizes to measure restart and rebuild at (records in all shards: a
#                 tenth are card issues, the rest purchases and top-ups over those cards);
#                 "none" for only the --cards-rss sets (with --disk-size none)
#   --with-30m    add 30M to --sizes
#   --disk-size   the size whose du is reported (added to the sizes if missing)
#   --cards-rss   extra data sets of this many cards and no transactions, for RSS per card,
#                 comma-separated (0 or "none" to skip); their RSS is also read once the
#                 background card check has read every card ("RSS verified")
#   --work        scratch directory on the disk to measure (default /var/tmp/citycard-figures);
#                 every data set is deleted after its row unless --keep
#
# What "restart" measures: from the moment the script launches `citycard serve` to the moment
# `hello_probe` has a Hello answered over a fresh mutual-TLS connection (the probe retries a
# refused connect every millisecond). "warm": page cache hot; "cold": after
# `sync; echo 3 > /proc/sys/vm/drop_caches` (root only, else n/a). "kill": the data set first
# gets a journal tail of just under one checkpoint interval per shard (`fill --append
# --wait-for-kill`, SIGKILLed after its last commit: no checkpoint, sled not flushed), the
# worst case the default `checkpoint_records` allows. "rebuild": `state/` of every shard
# deleted, so the start replays the whole journal, archive included.
#
# Each kill, cold and rebuild timing is taken twice (rebuild only up to REBUILD_TWICE_MAX
# records, it takes minutes beyond) and both are printed ("a / b"); warm is the median of three
# with the range beside it: on a shared machine the spread says how far to trust a figure.
#
# Bounded: every step has a timeout; sizes whose estimated disk or memory would not fit are
# refused before anything is written.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES="1M,10M"
DISK_SIZE="5M"
CARDS_RSS="1M,10M"
WORK=/var/tmp/citycard-figures
BUILD=1
KEEP=0
SHARDS=2
LISTEN=${FIGURES_LISTEN:-127.0.0.1:17790}
ADMIN=${FIGURES_ADMIN:-127.0.0.1:17791}
# Records per shard in the SIGKILL tail: just under the default checkpoint_records (200,000).
KILL_TAIL_PER_SHARD=190000
# Estimates used to refuse what would not fit (measured on the first runs, with margin):
# journal bytes per record, state bytes per card, the larger of server and fill memory per card
# (the server about 220 bytes per card once every card was read; bulk_fill about 330, mostly
# sled's while it writes; fill --append keeps ~24 bytes per card).
EST_JOURNAL_B_PER_RECORD=260
EST_STATE_B_PER_CARD=400
EST_MEM_B_PER_CARD=400
# Every step's time limit in seconds (a start that takes longer is a failure in itself).
START_TIMEOUT_S=900
# How long a start may wait for every shard's background card check to finish (one step of
# 512 cards per 50 ms idle poll: about 10 minutes for 5M cards per shard, with margin).
VERIFY_WAIT_S=1800
# The rebuild is timed a second time only up to this many records, and not at all above
# REBUILD_MAX (environment; default: every size), for a run that must end in bounded time.
REBUILD_TWICE_MAX=10000000
REBUILD_MAX=${REBUILD_MAX:-0}

while [ $# -gt 0 ]; do
    case "$1" in
        --sizes) SIZES="$2"; shift 2 ;;
        --with-30m) SIZES="$SIZES,30M"; shift ;;
        --disk-size) DISK_SIZE="$2"; shift 2 ;;
        --cards-rss) CARDS_RSS="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n 2,25p "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

number() { # 1M -> 1000000, 500k -> 500000
    local v="${1,,}"
    case "$v" in
        *m) echo $(( ${v%m} * 1000000 )) ;;
        *k) echo $(( ${v%k} * 1000 )) ;;
        ''|*[!0-9]*) echo "bad size: $1" >&2; exit 2 ;;
        *) echo "$v" ;;
    esac
}

BIN=target/release
if [ "$BUILD" = 1 ]; then
    cargo build --release --bin citycard --example fill --example bulk_fill --example hello_probe
fi
CITYCARD="$BIN/citycard"
FILL="$BIN/examples/fill"
BULK_FILL="$BIN/examples/bulk_fill"
PROBE="$BIN/examples/hello_probe"
for b in "$CITYCARD" "$FILL" "$BULK_FILL" "$PROBE"; do
    [ -x "$b" ] || { echo "missing $b (run without --no-build)" >&2; exit 1; }
done

mkdir -p "$WORK"
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
LOG="$WORK/log"
: > "$LOG"
KEYS="$WORK/keys"
[ -f "$KEYS/ca.pem" ] || "$CITYCARD" keys init --dir "$KEYS" >> "$LOG" 2>&1

avail_disk_b() { df -B1 --output=avail "$WORK" | tail -1 | tr -d ' '; }
avail_mem_b() { awk '/^MemAvailable:/ {printf "%.0f\n", $2 * 1024}' /proc/meminfo; } # %d stops at 2^31 in mawk

# Refuses a data set of CARDS cards and RECORDS journal records that would not fit.
check_fits() {
    local cards=$1 records=$2
    local disk=$(( records * EST_JOURNAL_B_PER_RECORD + cards * EST_STATE_B_PER_CARD \
        + 2 * SHARDS * 64 * 1024 * 1024 + 1024 * 1024 * 1024 ))
    local mem=$(( cards * EST_MEM_B_PER_CARD + 512 * 1024 * 1024 ))
    if [ "$disk" -gt "$(avail_disk_b)" ]; then
        echo "refused: $records records would need about $((disk >> 20)) MiB on $WORK, $(( $(avail_disk_b) >> 20 )) MiB free" >&2
        return 1
    fi
    if [ "$mem" -gt "$(avail_mem_b)" ]; then
        echo "refused: $cards cards would need about $((mem >> 20)) MiB of memory, $(( $(avail_mem_b) >> 20 )) MiB available" >&2
        return 1
    fi
}

record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RESULTS"; echo "  $1 $2 = $3"; }
loadavg() { cut -d' ' -f1 /proc/loadavg; }

drop_caches() {
    sync
    if [ "$(id -u)" = 0 ] && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
        return 0
    fi
    return 1
}

SERVER_PID=""
stop_server() { # clean stop: SIGTERM and wait (bounded)
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 600); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "server $pid did not stop within 60 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then stop_server "$SERVER_PID"; fi
}
trap cleanup EXIT

# Starts the server on DATA, times it to the first Hello answered and leaves
# STARTED_MS, RSS_KB, HWM_KB and REPLAYED set; then stops it cleanly. With "timev" the server
# runs under /usr/bin/time -v and PEAK_KB is its maximum resident set size. With "verified" it
# also waits (at most VERIFY_WAIT_S) until every shard logged that its card records match
# their digest, and leaves VERIFIED_S and RSS_KB as they are then.
timed_start() {
    local data=$1 mode=${2:-plain} errlog="$WORK/serve.err" timelog="$WORK/time.err"
    local t0 t1 launcher
    : > "$errlog"
    t0=$(date +%s%N)
    if [ "$mode" = timev ]; then
        /usr/bin/time -v -o "$timelog" "$CITYCARD" serve --data "$data" --keys "$KEYS" \
            --listen "$LISTEN" --admin "$ADMIN" 2> "$errlog" > /dev/null &
        launcher=$!
    else
        "$CITYCARD" serve --data "$data" --keys "$KEYS" --listen "$LISTEN" --admin "$ADMIN" \
            2> "$errlog" > /dev/null &
        launcher=$!
    fi
    SERVER_PID=$launcher
    if ! t1=$(timeout "$START_TIMEOUT_S" "$PROBE" --server "$LISTEN" --keys "$KEYS" \
            --timeout-s "$START_TIMEOUT_S" 2>> "$LOG" | cut -d' ' -f1); then
        echo "no Hello within $START_TIMEOUT_S s; server log:" >&2; tail -20 "$errlog" >&2
        return 1
    fi
    local pid=$launcher
    if [ "$mode" = timev ]; then pid=$(pgrep -P "$launcher" -x citycard | head -1); fi
    STARTED_MS=$(( (t1 - t0) / 1000000 ))
    sleep 1 # let the start's own checkpoint and sled flush settle before reading memory
    if [ "$mode" = verified ]; then
        local waited=0
        while [ "$(grep -c 'card records match their digest' "$errlog")" -lt "$SHARDS" ]; do
            if [ "$waited" -ge "$VERIFY_WAIT_S" ] || ! kill -0 "$pid" 2>/dev/null; then
                echo "the card check did not finish within $VERIFY_WAIT_S s" >&2
                VERIFIED_S=n/a
                break
            fi
            sleep 1; waited=$(( waited + 1 ))
        done
        [ "${VERIFIED_S:-}" = n/a ] || VERIFIED_S=$(( ($(date +%s%N) - t0) / 1000000000 ))
    fi
    RSS_KB=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
    HWM_KB=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
    REPLAYED=$(grep -o 'replayed=[0-9]*' "$errlog" | cut -d= -f2 | paste -sd+ | bc)
    cat "$errlog" >> "$LOG"
    stop_server "$pid"
    if [ "$mode" = timev ]; then
        wait "$launcher" 2>/dev/null || true
        PEAK_KB=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$timelog")
        # CPU seconds (user + system): on a shared machine the wall time says more about the
        # neighbours than about the rebuild.
        CPU_S=$(awk -F': ' '/User time|System time/ {s += $2} END {printf "%.1f", s}' "$timelog")
    fi
    SERVER_PID=""
}

fill() { # DATA CARDS RECORDS: the bulk fill (at least 5,000 records/s even on a loaded machine)
    local data=$1 cards=$2 records=$3
    local limit=$(( 600 + (cards + records) / 5000 ))
    timeout "$limit" "$BULK_FILL" --data "$data" --keys "$KEYS" --shards "$SHARDS" \
        --cards "$cards" --records "$records" | tee -a "$LOG"
}

# A SIGKILLed generator: adds KILL_TAIL_PER_SHARD records per shard past the last checkpoint.
crash_tail() {
    local data=$1 out="$WORK/fill-kill.out"
    : > "$out"
    "$FILL" --data "$data" --keys "$KEYS" --cards 0 --records $(( KILL_TAIL_PER_SHARD * SHARDS )) \
        --append --wait-for-kill --seed "$RANDOM" > "$out" 2>> "$LOG" &
    local pid=$!
    for _ in $(seq 1 6000); do
        grep -q 'waiting to be killed' "$out" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    grep -q 'waiting to be killed' "$out" || { echo "crash_tail: generator failed" >&2; cat "$out" >&2; return 1; }
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    cat "$out" >> "$LOG"
}

du_kib() { if [ -e "$1" ]; then du -sk "$1" | cut -f1; else echo 0; fi; }

# Per data set: the restart variants, memory, optionally rebuild and disk.
measure() {
    local label=$1 cards=$2 records=$3 disk=$4
    local data="$WORK/data-$label"
    rm -rf "$data"
    echo "== $label: $cards cards, $records records ($(date -u +%H:%M:%S), load $(loadavg))"
    local f0 f1; f0=$(date +%s%N)
    fill "$data" "$cards" "$(( records - cards ))"
    f1=$(date +%s%N)
    record "$label" fill_s "$(( (f1 - f0) / 1000000000 ))"

    local v0 v1; v0=$(date +%s%N)
    if timeout 1800 "$CITYCARD" verify --data "$data" >> "$LOG" 2>&1; then
        v1=$(date +%s%N); record "$label" verify "ok in $(( (v1 - v0) / 1000000000 )) s"
    else
        record "$label" verify FAILED; return 1
    fi

    # Warm, clean stop: three starts, the median and the range.
    local warm=()
    for _ in 1 2 3; do timed_start "$data"; warm+=("$STARTED_MS"); done
    record "$label" rss_kb "$RSS_KB"
    record "$label" hwm_kb "$HWM_KB"
    record "$label" cards "$cards"
    local sorted; sorted=$(printf '%s\n' "${warm[@]}" | sort -n)
    record "$label" warm_clean_ms "$(sed -n 2p <<< "$sorted") ($(head -1 <<< "$sorted")-$(tail -1 <<< "$sorted"))"
    record "$label" load "$(loadavg)"
    if [ "$records" = "$cards" ] && [ "$cards" -gt 0 ]; then
        VERIFIED_S=""
        timed_start "$data" verified
        record "$label" rss_verified_kb "$RSS_KB"
        record "$label" verified_s "$VERIFIED_S"
    fi

    if [ "$disk" = 1 ]; then
        local j=0 a=0 s=0 i
        for i in $(seq 0 $(( SHARDS - 1 ))); do
            local sd="$data/shard-$i"
            record "$label" "du_shard${i}_kib" "journal $(du_kib "$sd/journal") archive $(du_kib "$sd/archive") state $(du_kib "$sd/state")"
            j=$(( j + $(du_kib "$sd/journal") )); a=$(( a + $(du_kib "$sd/archive") )); s=$(( s + $(du_kib "$sd/state") ))
        done
        record "$label" du_journal_kib "$j"
        record "$label" du_archive_kib "$a"
        record "$label" du_state_kib "$s"
        record "$label" journal_apparent_kib "$(du -sk --apparent-size "$data"/shard-*/journal "$data"/shard-*/archive | awk '{s+=$1} END {print s}')"
    fi

    local cold=() wkill=() ckill=() replayed=()
    for _ in 1 2; do
        if drop_caches; then timed_start "$data"; cold+=("$STARTED_MS"); else cold+=(n/a); fi
    done
    record "$label" cold_clean_ms "${cold[0]} / ${cold[1]}"

    for _ in 1 2; do
        crash_tail "$data"
        timed_start "$data"
        wkill+=("$STARTED_MS"); replayed+=("$REPLAYED")
    done
    record "$label" warm_kill_ms "${wkill[0]} / ${wkill[1]}"
    record "$label" kill_replayed "${replayed[0]} / ${replayed[1]}"
    for _ in 1 2; do
        crash_tail "$data"
        if drop_caches; then timed_start "$data"; ckill+=("$STARTED_MS"); else ckill+=(n/a); fi
    done
    record "$label" cold_kill_ms "${ckill[0]} / ${ckill[1]}"

    # Rebuild: no state at all, the whole journal replayed (archive first).
    local rounds=1 rms=() rpeak=() rcpu=()
    [ "$records" -le "$REBUILD_TWICE_MAX" ] && rounds=2
    if [ "$REBUILD_MAX" -gt 0 ] && [ "$records" -gt "$REBUILD_MAX" ]; then
        record "$label" rebuild_ms "skipped (REBUILD_MAX=$REBUILD_MAX)"
        [ "$KEEP" = 1 ] || rm -rf "$data"
        return 0
    fi
    for _ in $(seq 1 "$rounds"); do
        rm -rf "$data"/shard-*/state
        if [ -x /usr/bin/time ]; then
            timed_start "$data" timev
        else
            timed_start "$data"; PEAK_KB=$HWM_KB; CPU_S=n/a
        fi
        rms+=("$STARTED_MS"); rpeak+=("$(( PEAK_KB / 1024 ))"); rcpu+=("$CPU_S")
    done
    record "$label" rebuild_peak_mib "$(IFS=/; echo "${rpeak[*]}" | sed 's|/| / |g')"
    record "$label" rebuild_cpu_s "$(IFS=/; echo "${rcpu[*]}" | sed 's|/| / |g')"
    record "$label" rebuild_ms "$(IFS=/; echo "${rms[*]}" | sed 's|/| / |g')"
    record "$label" rebuild_replayed "$REPLAYED"
    if ! timeout 1800 "$CITYCARD" verify --data "$data" >> "$LOG" 2>&1; then
        record "$label" verify_after_rebuild FAILED
    fi
    [ "$KEEP" = 1 ] || rm -rf "$data"
}

LOAD_START=$(loadavg)
echo "storage figures: $(date -u +%FT%TZ), $(nproc) vCPU, $(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) >> 20 )) GiB, load $LOAD_START, work $WORK"

# Baseline: a server with no card.
rm -rf "$WORK/data-empty"
fill "$WORK/data-empty" 0 0 > /dev/null
timed_start "$WORK/data-empty"
record empty rss_kb "$RSS_KB"
record empty hwm_kb "$HWM_KB"
record empty warm_clean_ms "$STARTED_MS"
rm -rf "$WORK/data-empty"

ALL=$(printf '%s\n' ${SIZES//,/ } "$DISK_SIZE" | { grep -vx none || true; } | while read -r s; do number "$s"; done | sort -n | uniq)
DISK_N=none
[ "$DISK_SIZE" = none ] || DISK_N=$(number "$DISK_SIZE")
LABELS=()
for n in $ALL; do
    cards=$(( n / 10 ))
    check_fits "$cards" "$n" || continue
    label="r$n"
    measure "$label" "$cards" "$n" "$([ "$n" = "$DISK_N" ] && echo 1 || echo 0)" || echo "($label failed; see $LOG)"
    LABELS+=("$label")
done
if [ "$CARDS_RSS" != 0 ] && [ "$CARDS_RSS" != none ]; then
    for size in ${CARDS_RSS//,/ }; do
        c=$(number "$size")
        sleep 10 # the last rebuild's memory is still being returned to the system
        if check_fits "$c" "$c"; then
            measure "c$c" "$c" "$c" 0 || echo "(c$c failed; see $LOG)"
            LABELS+=("c$c")
        fi
    done
fi
LOAD_END=$(loadavg)

get() { awk -F'\t' -v l="$1" -v k="$2" '$1 == l && $2 == k {v = $3} END {print v}' "$RESULTS"; }
base_rss=$(get empty rss_kb)
echo
echo "Storage figures $(date -u +%F), $(nproc) vCPU, load average $LOAD_START at start, $LOAD_END at end; $SHARDS shards"
echo "(restart = launch to first Hello answered, ms; warm = median of 3 (range); cold, kill and rebuild: two runs;"
echo " kill = after a SIGKILL with ~$KILL_TAIL_PER_SHARD records/shard past the checkpoint; RSS after start, idle;"
echo " B/card = (RSS - empty RSS) / cards; verified = RSS once the background card check read every card)"
printf '| data set | records | cards | fill s | warm clean | cold clean | warm kill | cold kill | RSS MiB | HWM MiB | B/card | RSS verified MiB | B/card verified | rebuild ms | rebuild CPU s | rebuild peak MiB | verify |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n'
printf '| empty | 0 | 0 | | %s | | | | %s | %s | | | | | | | |\n' "$(get empty warm_clean_ms)" \
    "$(( base_rss / 1024 ))" "$(( $(get empty hwm_kb) / 1024 ))"
for l in "${LABELS[@]}"; do
    cards=$(get "$l" cards)
    [ -n "$cards" ] || continue
    rss=$(get "$l" rss_kb); hwm=$(get "$l" hwm_kb); rv=$(get "$l" rss_verified_kb)
    n=${l#?}
    rv_mib=""; rv_card=""
    if [ -n "$rv" ]; then
        rv_mib=$(( rv / 1024 )); rv_card=$(( (rv - base_rss) * 1024 / cards ))
        [ "$(get "$l" verified_s)" = n/a ] && rv_card="$rv_card (check unfinished)"
    fi
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$l" "$n" "$cards" \
        "$(get "$l" fill_s)" "$(get "$l" warm_clean_ms)" "$(get "$l" cold_clean_ms)" \
        "$(get "$l" warm_kill_ms)" "$(get "$l" cold_kill_ms)" "$(( rss / 1024 ))" "$(( hwm / 1024 ))" \
        "$(( (rss - base_rss) * 1024 / (cards > 0 ? cards : 1) ))" "$rv_mib" "$rv_card" \
        "$(get "$l" rebuild_ms)" "$(get "$l" rebuild_cpu_s)" \
        "$(get "$l" rebuild_peak_mib)" "$(get "$l" verify)"
done
d="r$DISK_N"
if [ -n "$(get "$d" du_state_kib)" ]; then
    j=$(get "$d" du_journal_kib); a=$(get "$d" du_archive_kib); s=$(get "$d" du_state_kib)
    echo
    echo "Disk at $DISK_N records ($(get "$d" cards) cards, du -sk, all shards): journal/ $j KiB, archive/ $a KiB, state/ $s KiB;" \
        "state / live journal = $(echo "scale=2; $s / $(( j > 0 ? j : 1 ))" | bc), state / (journal+archive) = $(echo "scale=2; $s / $(( j + a > 0 ? j + a : 1 ))" | bc);" \
        "journal+archive apparent size $(get "$d" journal_apparent_kib) KiB"
    for i in $(seq 0 $(( SHARDS - 1 ))); do echo "  shard $i: $(get "$d" "du_shard${i}_kib")"; done
fi
echo "raw results: $RESULTS; logs: $LOG"

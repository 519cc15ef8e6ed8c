#!/usr/bin/env bash
# replication_cost.sh - what synchronous replication to PostgreSQL costs, measured in one go on
# this machine: a PostgreSQL pair on loopback (primary with synchronous_standby_names = 'dr', a
# streaming standby made with pg_basebackup), then citycard-loadtest --spawn at 64 terminals,
# alternately without [replicate] and with it (a fresh database per run), ROUNDS times each.
# Prints throughput and latency of every run, and the median ratio.
# Usage: scripts/replication_cost.sh [BIN_DIR=<repo>/target/release] [seconds=10] [rounds=2]
#        (BIN_DIR holds citycard + citycard-loadtest: cargo build --release -p citycard -p citycard-loadtest)
# Env:   CLIENTS (default 64)  MIX (default purchase=100)  PGBIN (default newest /usr/lib/postgresql/*/bin)
#        SHARDS=N: --shards N for every server (both modes; default: the server's own choice)
#        PROFILE=1: one more replicated run against a server started here, then where a batch
#        waits from its /metrics: mean local fdatasync, mean PostgreSQL statement (sent to
#        committed with the standby), records per statement, jobs per group commit, request time.
# Needs root or the postgres tools on PATH for the current user; installs postgresql with apt as root.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(cd "${1:-$HERE/../target/release}" && pwd) || exit 2
SECS=${2:-10}
ROUNDS=${3:-2}
CLIENTS=${CLIENTS:-64}
MIX=${MIX:-purchase=100}
SHARD_ARGS=()
[ -n "${SHARDS:-}" ] && SHARD_ARGS=("--server-arg=--shards=$SHARDS")
for b in citycard citycard-loadtest; do
  [ -x "$BIN/$b" ] || { echo "no $BIN/$b: cargo build --release -p citycard -p citycard-loadtest" >&2; exit 2; }
done
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "PostgreSQL missing: apt-get install postgresql (as root)" >&2; exit 2; }
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q postgresql
fi
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
T=$(mktemp -d /tmp/citycard-repcost.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P=$(free_port); S=$(free_port)
cleanup() {
  as_pg "$PGBIN/pg_ctl" -D "$T/standby" -m immediate stop >/dev/null 2>&1 || true
  as_pg "$PGBIN/pg_ctl" -D "$T/primary" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$T"
}
trap cleanup EXIT
mkdir -p "$T/sock" "$T/out"
[ "$(id -u)" = 0 ] && chown -R postgres "$T"
psql_p() { as_pg "$PGBIN/psql" -X -q -t -A -h 127.0.0.1 -p "$P" -U postgres -d postgres -c "$1"; }
as_pg "$PGBIN/initdb" -D "$T/primary" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
cat >>"$T/primary/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $P
unix_socket_directories = '$T/sock'
wal_level = replica
max_wal_senders = 4
hot_standby = on
synchronous_commit = on
fsync = on
max_connections = 60
CONF
as_pg "$PGBIN/pg_ctl" -D "$T/primary" -l "$T/primary.log" -w -t 60 start >/dev/null
as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$P" -U postgres -D "$T/standby" -R -X stream
echo "port = $S" >>"$T/standby/postgresql.conf"
echo "primary_conninfo = 'host=127.0.0.1 port=$P user=postgres application_name=dr'" >>"$T/standby/postgresql.auto.conf"
as_pg "$PGBIN/pg_ctl" -D "$T/standby" -l "$T/standby.log" -w -t 60 start >/dev/null
psql_p "ALTER SYSTEM SET synchronous_standby_names = 'dr'" >/dev/null
psql_p "SELECT pg_reload_conf()" >/dev/null
for _ in $(seq 100); do
  [ "$(psql_p "SELECT sync_state FROM pg_stat_replication WHERE application_name='dr'")" = sync ] && break
  sleep 0.2
done
[ "$(psql_p "SELECT sync_state FROM pg_stat_replication WHERE application_name='dr'")" = sync ] || { echo "standby never synchronous" >&2; exit 1; }
echo "# scripts/replication_cost $(date -Is) ${SECS}s per run, $CLIENTS terminals, mix $MIX, shards ${SHARDS:-default}, $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg), PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') sync standby"
run() { # tag [server args...]
  local tag=$1; shift
  (cd "$T" && timeout $((SECS + 180)) "$BIN/citycard-loadtest" --spawn --cards 10000 --connections "$CLIENTS" \
     --pipeline 1 --duration "${SECS}s" --warmup 1s --mix "$MIX" --no-progress --verify "${SHARD_ARGS[@]}" "$@" \
     --json "$T/out/$tag.json" >"$T/out/$tag.txt" 2>&1) || echo "run $tag failed: $(tail -3 "$T/out/$tag.txt")"
}
for r in $(seq "$ROUNDS"); do
  run "local_$r"
  db="run$r"
  psql_p "CREATE DATABASE $db" >/dev/null
  printf '[replicate]\nconninfo = "host=127.0.0.1 port=%s user=postgres dbname=%s"\n' "$P" "$db" >"$T/rep$r.toml"
  run "replicated_$r" "--server-arg=--config=$T/rep$r.toml"
done
if [ "${PROFILE:-0}" = 1 ]; then
  psql_p "CREATE DATABASE profile" >/dev/null
  printf '[replicate]\nconninfo = "host=127.0.0.1 port=%s user=postgres dbname=profile"\n' "$P" >"$T/profile.toml"
  "$BIN/citycard" keys init --dir "$T/pkeys" >/dev/null 2>&1
  for i in $(seq 2 "$CLIENTS"); do "$BIN/citycard" keys terminal --dir "$T/pkeys" --id "reader-$i" --role reader >/dev/null 2>&1; done
  L=$(free_port); A=$(free_port)
  "$BIN/citycard" serve --keys "$T/pkeys" --data "$T/pdata" --listen "127.0.0.1:$L" --admin "127.0.0.1:$A" --config "$T/profile.toml" ${SHARDS:+--shards "$SHARDS"} >"$T/profile.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$A/readyz" >/dev/null && break; sleep 0.2; done
  (cd "$T" && timeout $((SECS + 120)) "$BIN/citycard-loadtest" --server "127.0.0.1:$L" --keys "$T/pkeys" --cards 10000 \
     --connections "$CLIENTS" --pipeline 1 --duration "${SECS}s" --warmup 1s --mix "$MIX" --no-progress >"$T/out/profile.txt" 2>&1) || echo "profile run failed: $(tail -3 "$T/out/profile.txt")"
  curl -sf "http://127.0.0.1:$A/metrics" >"$T/out/profile.metrics" || true
  kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true
  python3 - "$T/out/profile.metrics" <<'PY'
import re, sys
sums = {}
for line in open(sys.argv[1]):
    m = re.match(r'^(citycard_[a-z_]+)_(sum|count)(\{[^}]*\})? ([0-9.e+-]+)$', line)
    if m: sums.setdefault(m.group(1), [0.0, 0.0])[0 if m.group(2) == "sum" else 1] += float(m.group(4))
def mean(name, scale=1.0):
    s, c = sums.get(name, (0.0, 0.0))
    return f"{s / c * scale:.2f}" if c else "-"
print("# profile (replicated, where a batch waits; means over the run):")
print(f"#   request {mean('citycard_request_seconds', 1000)} ms, local fdatasync {mean('citycard_journal_sync_seconds', 1000)} ms, "
      f"postgresql statement {mean('citycard_replication_commit_seconds', 1000)} ms, "
      f"{mean('citycard_replication_statement_records')} records/statement, {mean('citycard_batch_jobs')} jobs/group commit")
PY
fi
python3 - "$T/out" "$ROUNDS" <<'PY'
import json, os, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(tag):
    try: return json.load(open(os.path.join(out, tag + ".json")))
    except (OSError, ValueError): return None
def ok(d): return d is not None and d["errors"] == 0 and d["timeouts"] == 0 and d["verify_mismatches"] == 0
print(f"{'run':>14} | {'tps':>7} {'p50':>6} {'p99':>6} {'p99.9':>6} {'us/tx':>6} {'check':>6}")
ratios, p99s = [], []
for r in range(1, rounds + 1):
    a, b = load(f"local_{r}"), load(f"replicated_{r}")
    for tag, d in ((f"local_{r}", a), (f"replicated_{r}", b)):
        if d is None: print(f"{tag:>14} | failed"); continue
        cpu = d.get("server_cpu_us_per_tx")
        print(f"{tag:>14} | {d['throughput_tps']:7.0f} {d['p50_us']/1000:6.2f} {d['p99_us']/1000:6.2f} {d['p999_us']/1000:6.2f} {'-' if cpu is None else f'{cpu:.0f}':>6} {'ok' if ok(d) else 'ERRORS':>6}")
    if a and b and a["throughput_tps"]:
        ratios.append(b["throughput_tps"] / a["throughput_tps"]); p99s.append(b["p99_us"] / 1000)
if ratios:
    print(f"# replicated / local throughput: median {statistics.median(ratios):.2f} (runs {', '.join(f'{x:.2f}' for x in ratios)}); replicated p99 median {statistics.median(p99s):.2f} ms")
PY

#!/usr/bin/env bash
# Soak the SIGKILL crash test: 1,000 kills of the real binary under load (release build).
# Not run in CI. Usage: scripts/crash_soak.sh [KILLS] [SEED]
# CRASH_BUDGET_S=SECONDS stops killing after that long (the run then drains, audits and reports
# the kills it made), for a bounded soak on a busy machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CRASH_KILLS="${1:-${CRASH_KILLS:-1000}}"
export CRASH_SEED="${2:-${CRASH_SEED:-$(date +%s)}}"
echo "crash soak: CRASH_KILLS=$CRASH_KILLS CRASH_SEED=$CRASH_SEED CRASH_BUDGET_S=${CRASH_BUDGET_S:-none} (release)"
start=$(date +%s)
set +e
cargo test --release -p citycard --test crash_under_load -- --nocapture 2>&1 \
    | tee /tmp/crash_soak.log \
    | grep -E '^crash test:|^test |panicked|test result'
status=${PIPESTATUS[0]}
set -e
echo "elapsed $(( $(date +%s) - start )) s; full output in /tmp/crash_soak.log"
exit "$status"

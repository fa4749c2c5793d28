#!/usr/bin/env bash
# The long fault-injection run (issue 18): both scenarios of tests/faults.rs
# (one gateway on SQLite; two replicas on PostgreSQL behind the suite's TCP
# proxy), release build, long enough for at least 1,000 injected faults in
# all, their one-line summaries printed at the end. See docs/RELIABILITY.md.
#
#   benches/faults.sh                      # long run, about 57 minutes after the build
#   FAULT_SECONDS=120 benches/faults.sh    # a trial
#
# Knobs (environment):
#   FAULT_SECONDS=3300   seconds of faults per scenario (the two run at once;
#                        about one fault every 6 s, so ~550 each)
#   FAULT_SEED=n         one seed for both scenarios (each draws its own
#                        schedule from it); default: random, printed
#   FAULT_PROFILE=release  cargo profile of the gateway and the suite (dev: no
#                        release build, for a trial of the script)
#   FAULT_OUT=dir        where the output goes (default: a fresh temp dir, kept);
#                        each scenario's whole history and gateway logs are in
#                        target/tmp/faults/<scenario>-<seed>/ (the "history" lines)
#
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user root) like the tests,
# node with tests/peer installed, and Debian's faketime (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

SECONDS_EACH=${FAULT_SECONDS:-3300}
PROFILE=${FAULT_PROFILE:-release}
CARGO_PROFILE=(--profile "$PROFILE")
[[ $PROFILE == dev ]] && CARGO_PROFILE=()
OUT=${FAULT_OUT:-$(mktemp -d /tmp/countersign-faults.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/countersign-faults-work.XXXXXX)
LOG_TAG=faults
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
need faketime faketime
need psql postgresql-client
[[ -d tests/peer/node_modules/oidc-provider ]] || npm ci --prefix tests/peer >/dev/null

export FAULT_SECONDS=$SECONDS_EACH
if [[ -z ${FAULT_SEED:-} ]]; then
  FAULT_SEED=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
fi
export FAULT_SEED
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "output in $OUT; seed $FAULT_SEED, $FAULT_SECONDS s per scenario; load before: $LOAD_START"

log "building ($PROFILE)"
cargo test "${CARGO_PROFILE[@]}" --locked --test faults --no-run 2>&1 | tail -1

log "running both scenarios at once (about $((FAULT_SECONDS / 60 + 3)) min)"
STARTED=$(date +%s)
status=0
# Bounded: a hang fails the run instead of running forever.
timeout --kill-after=30s $((FAULT_SECONDS * 2 + 900)) \
  cargo test "${CARGO_PROFILE[@]}" --locked --test faults -- --nocapture --test-threads 2 \
  single_sqlite replicas_postgres >"$OUT/run.log" 2>&1 || status=$?
ELAPSED=$(( $(date +%s) - STARTED ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

summaries=$(grep -E '^faults (single_sqlite|replicas_postgres) seed=' "$OUT/run.log" | sort -u || true)
total=$(grep -oE ' faults=[0-9]+' <<<"$summaries" | awk -F= '{ s += $2 } END { print s + 0 }')
{
  echo "Countersign fault-injection run, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
  echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r), PostgreSQL $(psql -h 127.0.0.1 -U root -d test -Atc 'show server_version' 2>/dev/null || echo '?')"
  echo "FAULT_SEED=$FAULT_SEED FAULT_SECONDS=$FAULT_SECONDS, $PROFILE build; wall time ${ELAPSED} s; load average: start $LOAD_START, end $LOAD_END"
  echo
  echo "$summaries"
  echo
  echo "faults injected in all: $total$( ((total >= 1000)) || echo ' (FEWER THAN 1,000: raise FAULT_SECONDS)')"
  if ((status != 0)); then
    echo "FAILED (exit $status): violations, seed and schedule in $OUT/run.log"
    grep -E -A12 '^(unfinished|double_forward|unapproved_forward|second_push|limit_breach|answer_mismatch|ops_unanswered): ' "$OUT/run.log" | head -60 || true
  fi
  grep -E '^faults [a-z_]+: history: ' "$OUT/run.log" || true
} | tee "$OUT/summary.txt"
exit "$status"

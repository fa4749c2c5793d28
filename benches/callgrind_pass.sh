#!/usr/bin/env bash
# Instructions per pass-through request, for bare pingora and Countersign, under
# callgrind (issue 11). Instruction counts repeat on a loaded machine where wrk
# timings do not; see docs/BENCHMARKS.md, "Pass path and held-call memory".
#
#   benches/callgrind_pass.sh                      # both proxies, 20,000 requests each
#   CG_TARGETS=countersign CG_N=5000 benches/callgrind_pass.sh
#
# Each proxy runs under `valgrind --tool=callgrind` (1 worker thread, upstream
# nginx `return 200 'ok'`). benches/pass_client.py warms it up (CG_WARMUP
# requests over CG_CONNS keep-alive connections, which fills the upstream pool),
# then callgrind's counters are zeroed and dumped around an idle interval (0
# requests, CG_IDLE s) and around exactly CG_N requests on CG_CONNS new
# connections:
#
#   instructions/request = (Ir(N requests) - Ir(0 requests) * t_busy / t_idle) / N
#
# where both Ir leave out the policy-file watcher (reload.rs hashes the policy
# files every 0.5 s: clock-driven, and under valgrind the N requests take
# minutes), and the idle Ir is scaled by the intervals' lengths.
#
# Countersign loads policies/ plus 1,000 generated policies (gen_policies.sh)
# with default_action: pass; GET / matches none of them.
#
# Knobs: CG_N (20000), CG_CONNS (10), CG_WARMUP (500), CG_TARGETS ("bare
# countersign"), CG_PRELOAD (a malloc to LD_PRELOAD into the proxy, such as
# /usr/lib/x86_64-linux-gnu/libmimalloc.so.2), CG_BUILD (1: cargo build --release first), CG_BIN (the release
# directory holding the binaries, to compare builds), CG_PORT (first port
# tried, 18280), CG_OUT (callgrind
# files and logs; default a fresh temp dir, kept). Prints one RESULT line per
# proxy; `callgrind_annotate $CG_OUT/cg-countersign.2` shows where it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
N=${CG_N:-20000}
CONNS=${CG_CONNS:-10}
WARMUP=${CG_WARMUP:-500}
TARGETS=${CG_TARGETS:-bare countersign}
OUT=${CG_OUT:-$(mktemp -d /tmp/countersign-callgrind.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/countersign-callgrind-work.XXXXXX)
BIN=${CG_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release}
CLIENT=$REPO/benches/pass_client.py

LOG_TAG=callgrind
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
need valgrind valgrind
need nginx nginx-light

if [[ ${CG_BUILD:-1} == 1 ]]; then
  log "building (release)"
  cargo build --release --quiet --bin countersign --example bare_pingora
fi

UP_PORT=$(pick_port "${CG_PORT:-18280}")
upstream_nginx "$WORK/upstream" "$UP_PORT"
wait_port "$UP_PORT"

"$REPO/benches/gen_policies.sh" 1000 >"$WORK/generated.yaml"
PROXY_PORT=$(pick_port $((UP_PORT + 1)))
pass_route_conf "$WORK/countersign.yaml" "$PROXY_PORT" 1 "$UP_PORT" "$REPO/policies, $WORK/generated.yaml"

total_ir() { # total_ir <callgrind file>: the Ir of that dump
  awk '/^(summary|totals):/ { print $2; exit }' "$1"
}

watcher_ir() { # watcher_ir <callgrind file>: inclusive Ir of the policy-file watcher
  callgrind_annotate --inclusive=yes "$1" 2>/dev/null |
    awk '!found && /countersign::reload::Reloader::fingerprint/ { gsub(",", "", $1); ir = $1; found = 1 }
         END { print found ? ir : 0 }' # reads to the end: an early exit fails the pipe
}

measure() { # measure <name> <command...>
  local name=$1; shift
  local file="$OUT/cg-$name"
  rm -f "$file" "$file".*
  LD_PRELOAD=${CG_PRELOAD:-} valgrind --tool=callgrind --callgrind-out-file="$file" "$@" \
    >"$OUT/$name.out" 2>"$OUT/$name.err" &
  local pid=$!
  PIDS+=("$pid")
  wait_port "$PROXY_PORT" 180 # valgrind starts slowly on a loaded machine
  python3 "$CLIENT" "$PROXY_PORT" "$WARMUP" "$CONNS" # warm-up, fills the pool
  callgrind_control -z "$pid" >/dev/null
  local t0 t1 t2
  t0=$(date +%s.%N)
  sleep "${CG_IDLE:-5}"
  callgrind_control -d "$pid" >/dev/null # dump 1: 0 requests
  t1=$(date +%s.%N)
  python3 "$CLIENT" "$PROXY_PORT" "$N" "$CONNS" # same connection count, new sockets
  callgrind_control -d "$pid" >/dev/null # dump 2: N requests
  t2=$(date +%s.%N)
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # Work that runs by the clock is not per request: Countersign's policy-file
  # watcher (reads and hashes the policy files every 0.5 s) is taken off by
  # its inclusive cost; the rest of the idle Ir is scaled by time.
  local idle busy
  idle=$(($(total_ir "$file.1") - $(watcher_ir "$file.1")))
  busy=$(($(total_ir "$file.2") - $(watcher_ir "$file.2")))
  awk -v name="$name" -v n="$N" -v idle="$idle" -v busy="$busy" \
    -v ti="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
    -v tb="$(awk -v a="$t1" -v b="$t2" 'BEGIN { print b - a }')" 'BEGIN {
      printf "RESULT %s requests=%d idle_ir=%d idle_s=%.1f busy_ir=%d busy_s=%.1f ir_per_request=%d\n",
        name, n, idle, ti, busy, tb, (busy - idle * tb / ti) / n }'
}

for t in $TARGETS; do
  log "$t under callgrind: warm-up $WARMUP, then $N requests over $CONNS connections"
  case $t in
    bare) measure bare "$BIN/examples/bare_pingora" "127.0.0.1:$PROXY_PORT" "127.0.0.1:$UP_PORT" 1 ;;
    countersign) measure countersign "$BIN/countersign" run --config "$WORK/countersign.yaml" ;;
    *) log "unknown target $t"; exit 1 ;;
  esac
done
log "callgrind files in $OUT"

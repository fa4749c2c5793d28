#!/usr/bin/env bash
# pingora's settings, one at a time, on bare pingora (benches/bare_pingora.rs)
# and on Countersign's pass route: which of them move req/s and p99 under wrk
# (issue 11; docs/BENCHMARKS.md, "pingora settings").
#
#   benches/pingora_settings.sh
#   SET_DURATION=5 SET_ROUNDS=3 SET_CONNECTIONS=50 benches/pingora_settings.sh
#   SET_ONLY="bare-defaults countersign-1-thread" SET_ROUNDS=10 benches/pingora_settings.sh
#
# Every variant runs at once against one upstream (nginx `return 200 'ok'`,
# one worker); rounds interleave the variants and the median round by req/s
# is printed. wrk timings need a quiet machine: run nothing else meanwhile.
# pingora already sets TCP_NODELAY on both sides (pingora-core
# listeners/l4.rs and connectors/l4.rs), so that one is not a variant.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DURATION=${SET_DURATION:-5}
ROUNDS=${SET_ROUNDS:-3}
CONNS=${SET_CONNECTIONS:-50}
OUT=${SET_OUT:-$(mktemp -d /tmp/countersign-settings.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/countersign-settings-work.XXXXXX)
LOG_TAG=settings
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
need wrk wrk
need nginx nginx-light
need "$MIMALLOC_SO" libmimalloc2.0

if [[ ${SET_BUILD:-1} == 1 ]]; then
  log "building (release)"
  cargo build --release --quiet --bin countersign --example bare_pingora
fi
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release
UP_PORT=$(pick_port 18380)
upstream_nginx "$WORK/upstream" "$UP_PORT"

# name | environment | bare_pingora arguments after <listen> <upstream>
# (threads work_stealing keepalive_pool l4_read_buf l4_write_buf), or
# "countersign <threads>".
VARIANTS=(
  "bare-defaults||1"
  "bare-no-modules|BARE_NO_MODULES=1|1"
  "bare-mimalloc|LD_PRELOAD=$MIMALLOC_SO|1"
  "bare-mimalloc-no-modules|LD_PRELOAD=$MIMALLOC_SO BARE_NO_MODULES=1|1"
  "bare-l4-read-0||1 1 128 0 1460"
  "bare-l4-read-4k||1 1 128 4096 1460"
  "bare-keepalive-16||1 1 16"
  "bare-keepalive-1024||1 1 1024"
  "bare-2-threads-stealing||2 1"
  "bare-2-threads-no-stealing||2 0"
  "countersign-1-thread||countersign 1"
  "countersign-2-threads||countersign 2"
)

# SET_ONLY="bare-defaults countersign-1-thread": just these variants (more
# rounds of fewer variants narrow a ratio).
if [[ -n ${SET_ONLY:-} ]]; then
  kept=()
  for v in "${VARIANTS[@]}"; do [[ " $SET_ONLY " == *" ${v%%|*} "* ]] && kept+=("$v"); done
  VARIANTS=("${kept[@]}")
fi

"$REPO/benches/gen_policies.sh" 1000 >"$WORK/generated.yaml"

declare -A PORT
next=$((UP_PORT + 1))
for v in "${VARIANTS[@]}"; do
  IFS='|' read -r name envs args <<<"$v"
  port=$(pick_port "$next")
  next=$((port + 1))
  PORT[$name]=$port
  read -ra argv <<<"$args"
  if [[ ${argv[0]} == countersign ]]; then
    pass_route_conf "$WORK/$name.yaml" "$port" "${argv[1]}" "$UP_PORT" "$REPO/policies, $WORK/generated.yaml"
    RUST_LOG=warn "$BIN/countersign" run --config "$WORK/$name.yaml" 2>"$OUT/$name.err" &
  else
    # shellcheck disable=SC2086 # envs is a list of NAME=value words
    env $envs "$BIN/examples/bare_pingora" "127.0.0.1:$port" "127.0.0.1:$UP_PORT" "${argv[@]}" \
      >/dev/null 2>"$OUT/$name.err" &
  fi
  PIDS+=($!)
done
wait_port "$UP_PORT"
for v in "${VARIANTS[@]}"; do
  name=${v%%|*}
  wait_port "${PORT[$name]}"
  [[ $(curl -s "http://127.0.0.1:${PORT[$name]}/") == ok ]] || { log "$name does not answer ok"; exit 1; }
  wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:${PORT[$name]}/" >/dev/null # warm-up
done

log "wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS round(s), load $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A RESULTS
for r in $(seq "$ROUNDS"); do
  for v in "${VARIANTS[@]}"; do
    name=${v%%|*}
    file="$OUT/wrk-$name-$r.txt"
    wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:${PORT[$name]}/" >"$file"
    RESULTS[$name.$r]=$(wrk_summary "$file")
    log "  round $r $name: ${RESULTS[$name.$r]}"
  done
done

echo "pingora settings, $(date -u '+%Y-%m-%d %H:%M') UTC, commit $(git rev-parse --short HEAD)"
echo "wrk -t1 -c$CONNS -d${DURATION}s GET /, median of $ROUNDS round(s); load at end $(cut -d' ' -f1-3 /proc/loadavg)"
printf '| %-28s | %9s | %8s | %8s | %-9s |\n' variant "req/s" "p50 ms" "p99 ms" "vs first"
printf '| %-28s | %9s | %8s | %8s | %-9s |\n' "---" "---" "---" "---" "---"
base=
for v in "${VARIANTS[@]}"; do
  name=${v%%|*}
  line=$(for r in $(seq "$ROUNDS"); do echo "${RESULTS[$name.$r]}"; done | sort -n -k1,1 | sed -n "$(((ROUNDS + 1) / 2))p")
  read -r rps p50 p99 errors <<<"$line"
  base=${base:-$rps}
  printf '| %-28s | %9.0f | %8.2f | %8.2f | %-9s |\n' "$name" "$rps" "$p50" "$p99" \
    "$(awk -v a="$rps" -v b="$base" 'BEGIN { printf "%.2fx", a / b }')"
  [[ $errors == 0 ]] || echo "  wrk errors for $name: $errors"
done

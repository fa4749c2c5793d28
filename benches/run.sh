#!/usr/bin/env bash
# The whole benchmark suite (issue 4) on this machine, in one run, printed as
# one table with ratios taken from the same run. See docs/BENCHMARKS.md.
#
#   benches/run.sh                 # full run, about 15 minutes after the build
#   BENCH_QUICK=1 benches/run.sh   # quick run, about 2 minutes
#   BENCH_ONLY=tls benches/run.sh  # the TLS and HTTP/2 rows only, about 5 minutes
#
# Knobs (environment):
#   BENCH_QUICK=1          shorter wrk runs, 1 round, quick criterion, 1,000 held calls only
#   BENCH_DURATION=8       seconds per wrk run
#   BENCH_ROUNDS=3         wrk rounds (targets interleaved; the median round is reported)
#   BENCH_CONNECTIONS=50   wrk connections (wrk always uses 1 thread)
#   BENCH_THREADS=1        worker threads/processes of every proxy (nginx, bare pingora, Countersign)
#                          (bare pingora runs twice: as built, and with mimalloc LD_PRELOADed,
#                          the allocator Countersign is built with)
#   BENCH_HELD="1000 10000" held-call counts
#   BENCH_INTERVAL=5       CIBA polling interval the fake server asks for, in seconds
#   BENCH_ASYNC=10000      pending approvals in the async (durable) runs, one per store
#   BENCH_POSTGRES=url     PostgreSQL server for the async run's store (default: the
#                          machine's, postgres://root@127.0.0.1:5432/; a fresh database)
#   BENCH_PROFILE=1        also perf-record bare pingora, nginx and Countersign under load
#                          (reports written to $BENCH_OUT/profile-*.txt)
#   BENCH_OUT=dir          where raw outputs go (default: a fresh temp dir, kept)
#   BENCH_ONLY=parts       run only these parts, comma-separated: pass (plain pass-through),
#                          tls (TLS handshakes, HTTP/1.1 and HTTP/2 over TLS), criterion,
#                          held (held calls and ping mode), async (default: all of them)
#   BENCH_TLS_DURATION=5   seconds per TLS run (BENCH_ROUNDS rounds, targets interleaved)
#   BENCH_H2_STREAMS=5     HTTP/2 streams per connection (h2load -m; BENCH_H2_CONNECTIONS=10
#                          connections, so 50 requests in flight like wrk's 50 connections)
#
# Traffic goes to 127.0.0.1 only. Every load loop is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
  DURATION=${BENCH_DURATION:-3}
  ROUNDS=${BENCH_ROUNDS:-1}
  HELD=${BENCH_HELD:-1000}
  CRITERION_ARGS=(--warm-up-time 0.3 --measurement-time 0.7)
else
  DURATION=${BENCH_DURATION:-8}
  ROUNDS=${BENCH_ROUNDS:-3}
  HELD=${BENCH_HELD:-1000 10000}
  CRITERION_ARGS=(--warm-up-time 1 --measurement-time 3)
fi
CONNS=${BENCH_CONNECTIONS:-50}
THREADS=${BENCH_THREADS:-1}
INTERVAL=${BENCH_INTERVAL:-5}
PROFILE=${BENCH_PROFILE:-0}
ONLY=${BENCH_ONLY:-pass,tls,criterion,held,async}
part() { [[ ",$ONLY," == *",$1,"* ]]; } # part <name>: is this part of the run on?
TLS_DURATION=${BENCH_TLS_DURATION:-$([[ $QUICK == 1 ]] && echo 2 || echo 5)}
H2_STREAMS=${BENCH_H2_STREAMS:-5}
H2_CONNS=${BENCH_H2_CONNECTIONS:-10}
OUT=${BENCH_OUT:-$(mktemp -d /tmp/countersign-bench.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/countersign-bench-work.XXXXXX)

LOG_TAG=bench
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
need wrk wrk
need nginx nginx-light
need jq jq
need "$MIMALLOC_SO" libmimalloc2.0
if [[ $PROFILE == 1 ]]; then need perf linux-perf; fi
if part tls; then need h2load nghttp2-client; need openssl openssl; fi

# Raising the open-file limit: each held call is one socket in the gateway and
# one in the load generator. The hard limit on this machine may be lower.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)

log "output in $OUT; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# --- build ----------------------------------------------------------------
log "building (release)"
EXAMPLES=(--example bare_pingora)
part held && EXAMPLES+=(--example held_calls)
part async && EXAMPLES+=(--example async_approvals)
cargo build --release --quiet --bin countersign "${EXAMPLES[@]}"
BIN=$REPO/target/release
BARE=$BIN/examples/bare_pingora
HELDBIN=$BIN/examples/held_calls
ASYNCBIN=$BIN/examples/async_approvals

CLK_TCK=$(getconf CLK_TCK)
# Stop the processes of a part before the next one.
cleanup_pass() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
LOAD_PASS=""
ERRORS=""
declare -A RPS P50 P99 CPU

# --- pass-through ---------------------------------------------------------
if part pass; then
UP_PORT=$(pick_port 18180)
# Reserve ports one after another so two picks never collide.
NGINX_PORT=$(pick_port $((UP_PORT + 1)))
BARE_PORT=$(pick_port $((NGINX_PORT + 1)))
CS_PORT=$(pick_port $((BARE_PORT + 1)))
CSLOG_PORT=$(pick_port $((CS_PORT + 1)))
BAREMI_PORT=$(pick_port $((CSLOG_PORT + 1)))

# (a) the upstream: nginx answering 200 "ok" itself, one worker.
upstream_nginx "$WORK/upstream" "$UP_PORT"
# (b) nginx as a reverse proxy with upstream keepalive.
nginx_conf "$WORK/proxy" "$THREADS" "upstream up { server 127.0.0.1:$UP_PORT; keepalive 128; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NGINX_PORT; location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
start_nginx "$WORK/proxy"
# (c) bare pingora: no logic, same thread count.
"$BARE" "127.0.0.1:$BARE_PORT" "127.0.0.1:$UP_PORT" "$THREADS" >/dev/null 2>"$OUT/bare_pingora.err" &
PIDS+=($!)
BARE_PID=$!
# (c') bare pingora on Countersign's allocator (mimalloc), LD_PRELOADed:
# what Countersign's own per-call work costs, without the allocator's gain.
LD_PRELOAD=$MIMALLOC_SO "$BARE" "127.0.0.1:$BAREMI_PORT" "127.0.0.1:$UP_PORT" "$THREADS" >/dev/null 2>"$OUT/bare_pingora_mimalloc.err" &
PIDS+=($!)
BAREMI_PID=$!

# (d) Countersign on a pass route: the example shop policies and 1,000
# generated ones are loaded, the benchmark's GET / matches none of them and
# default_action is pass.
# Plus 1,000 generated policies (benches/gen_policies.sh), so matching costs
# what it costs with a real table (issue 11).
"$REPO/benches/gen_policies.sh" 1000 >"$WORK/generated-policies.yaml"
pass_route_conf "$WORK/countersign.yaml" "$CS_PORT" "$THREADS" "$UP_PORT" "$REPO/policies, $WORK/generated-policies.yaml"
pass_route_conf "$WORK/countersign-log.yaml" "$CSLOG_PORT" "$THREADS" "$UP_PORT" "$REPO/policies, $WORK/generated-policies.yaml"
# Like the other proxies, no per-request log line ...
RUST_LOG=warn "$BIN/countersign" run --config "$WORK/countersign.yaml" 2>"$OUT/countersign.err" &
PIDS+=($!)
CS_PID=$!
# ... and as shipped: RUST_LOG unset means info, one line per call (to a file here).
"$BIN/countersign" run --config "$WORK/countersign-log.yaml" 2>"$WORK/countersign-info.log" &
PIDS+=($!)
CSLOG_PID=$!

for p in "$UP_PORT" "$NGINX_PORT" "$BARE_PORT" "$BAREMI_PORT" "$CS_PORT" "$CSLOG_PORT"; do wait_port "$p"; done
NGINX_PID=$(pgrep -P "$(cat "$WORK/proxy/nginx.pid")" | head -1) # the worker
for p in "$UP_PORT" "$NGINX_PORT" "$BARE_PORT" "$BAREMI_PORT" "$CS_PORT" "$CSLOG_PORT"; do
  [[ $(curl -s "http://127.0.0.1:$p/") == ok ]] || { log "port $p does not answer ok"; exit 1; }
done

TARGETS=(direct nginx bare bare_mimalloc countersign countersign_info)
declare -A PORT=([direct]=$UP_PORT [nginx]=$NGINX_PORT [bare]=$BARE_PORT [bare_mimalloc]=$BAREMI_PORT [countersign]=$CS_PORT [countersign_info]=$CSLOG_PORT)
# The process whose CPU a target's calls cost (direct: the upstream's worker).
UP_WORKER_PID=$(pgrep -P "$(cat "$WORK/upstream/nginx.pid")" | head -1)
declare -A PROC=([direct]=$UP_WORKER_PID [nginx]=$NGINX_PID [bare]=$BARE_PID [bare_mimalloc]=$BAREMI_PID [countersign]=$CS_PID [countersign_info]=$CSLOG_PID)

# The proxy's CPU time per call (user + system, all threads), from the same
# wrk run: on this shared 2-core machine req/s swings +-10-25% between rounds
# with what else gets scheduled, while the CPU a call costs the proxy holds
# within a few per cent. On dedicated cores, req/s follows it.
declare -A CPU_US
run_wrk() { # run_wrk <target> <round>: prints "rps p50_ms p99_ms errors"; sets CPU_US[target.round]
  local file="$OUT/wrk-$1-$2.txt" before after
  before=$(cpu_ticks "${PROC[$1]}")
  wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:${PORT[$1]}/" >"$file"
  after=$(cpu_ticks "${PROC[$1]}")
  CPU_US[$1.$2]=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$(wrk_requests "$file")" \
    'BEGIN { printf "%.2f", (n > 0 ? t / hz * 1e6 / n : 0) }')
}

log "pass-through: wrk -t1 -c$CONNS -d${DURATION}s, proxies with $THREADS thread(s), $ROUNDS round(s)"
for t in "${TARGETS[@]}"; do wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:${PORT[$t]}/" >/dev/null; done # warm-up
declare -A RESULTS
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    run_wrk "$t" "$r"
    RESULTS[$t.$r]=$(wrk_summary "$OUT/wrk-$t-$r.txt")
    log "  round $r $t: ${RESULTS[$t.$r]}; ${CPU_US[$t.$r]} us CPU per call"
  done
done
# The median round by req/s, per target.
for t in "${TARGETS[@]}"; do
  line=$(for r in $(seq "$ROUNDS"); do echo "${RESULTS[$t.$r]}"; done | sort -n -k1,1 | sed -n "$(((ROUNDS + 1) / 2))p")
  read -r RPS[$t] P50[$t] P99[$t] _ <<<"$line"
  # The median round by CPU per call, on its own.
  CPU[$t]=$(for r in $(seq "$ROUNDS"); do echo "${CPU_US[$t.$r]}"; done | sort -n | sed -n "$(((ROUNDS + 1) / 2))p")
done
ERRORS=$(grep -l 'Non-2xx\|Socket errors' "$OUT"/wrk-*.txt 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ' || true)
LOAD_PASS=$(cut -d' ' -f1-3 /proc/loadavg)

if [[ $PROFILE == 1 ]]; then
  profile() { # profile <name> <pid> <target>
    log "perf: $1 under wrk"
    perf record -e cpu-clock -F 999 -g -p "$2" -o "$OUT/perf-$1.data" -- sleep 4 2>/dev/null &
    local perf_pid=$!
    wrk -t1 -c"$CONNS" -d5s "http://127.0.0.1:${PORT[$3]}/" >"$OUT/wrk-profile-$1.txt"
    wait "$perf_pid" || true
    perf report -i "$OUT/perf-$1.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
      | grep -v '^$' | grep -E '^ +[0-9]' | head -40 >"$OUT/profile-$1.txt" || true
    perf report -i "$OUT/perf-$1.data" --no-children --sort dso --stdio 2>/dev/null \
      | grep -E '^ +[0-9]' | head -15 >"$OUT/profile-$1-dso.txt" || true
  }
  profile bare_pingora "$BARE_PID" bare
  profile nginx "$NGINX_PID" nginx
  profile countersign "$CS_PID" countersign
fi

cleanup_pass
fi # part pass

# --- TLS and HTTP/2 (issue 19) -----------------------------------------------
# nginx, bare pingora (as built, and on mimalloc) and Countersign each
# terminate TLS with the same certificate (ECDSA P-256, self-signed, made for
# this run) and forward plain HTTP/1.1 to the same upstream nginx. Four loads,
# targets interleaved, BENCH_ROUNDS rounds of BENCH_TLS_DURATION seconds:
#   hs: full handshakes, no request: BENCH_TLS_CLIENTS `openssl s_time -new`
#       in parallel, each connecting, handshaking and closing in a loop (the
#       client offers no session, so nothing is resumed);
#   hr: a new connection per request, as HTTP clients that keep no
#       connections open make them: wrk over https with `Connection: close`.
#       wrk (OpenSSL) resumes its previous session on every reconnect, and
#       every server here accepts (TLS 1.3 tickets: nginx's default, rustls'
#       stateful ones), so these are resumed handshakes (psk_dhe_ke: still an
#       X25519 exchange, no signature);
#   h1: wrk over https, keep-alive (HTTP/1.1: wrk offers no ALPN);
#   h2: h2load, H2_CONNS connections of H2_STREAMS streams each (ALPN h2).
# CPU per call as in the pass-through part: the proxy's utime + stime over the
# requests (hs: handshakes) completed.
TLS_TARGETS=(nginx bare bare_mimalloc countersign)
TLS_KINDS=(hs hr h1 h2)
TLS_CLIENTS=${BENCH_TLS_CLIENTS:-4}
TLS_NOTE=""
declare -A TRPS TLAT TCPU
if part tls; then
  TLSDIR=$WORK/tls
  mkdir -p "$TLSDIR"
  self_signed "$TLSDIR"
  CERT=$TLSDIR/cert.pem
  KEY=$TLSDIR/key.pem
  TUP_PORT=$(pick_port 18280)
  TNGINX_PORT=$(pick_port $((TUP_PORT + 1)))
  TBARE_PORT=$(pick_port $((TNGINX_PORT + 1)))
  TBAREMI_PORT=$(pick_port $((TBARE_PORT + 1)))
  TCS_PORT=$(pick_port $((TBAREMI_PORT + 1)))
  upstream_nginx "$WORK/tls-upstream" "$TUP_PORT"
  nginx_conf "$WORK/tls-proxy" "$THREADS" "upstream up { server 127.0.0.1:$TUP_PORT; keepalive 128; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$TNGINX_PORT ssl http2; ssl_certificate $CERT; ssl_certificate_key $KEY;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
  start_nginx "$WORK/tls-proxy"
  BARE_TLS_CERT=$CERT BARE_TLS_KEY=$KEY "$BARE" "127.0.0.1:$TBARE_PORT" "127.0.0.1:$TUP_PORT" "$THREADS" \
    >/dev/null 2>"$OUT/bare_pingora_tls.err" &
  PIDS+=($!)
  TBARE_PID=$!
  BARE_TLS_CERT=$CERT BARE_TLS_KEY=$KEY LD_PRELOAD=$MIMALLOC_SO "$BARE" "127.0.0.1:$TBAREMI_PORT" "127.0.0.1:$TUP_PORT" "$THREADS" \
    >/dev/null 2>"$OUT/bare_pingora_mimalloc_tls.err" &
  PIDS+=($!)
  TBAREMI_PID=$!
  [[ -e $WORK/generated-policies.yaml ]] || "$REPO/benches/gen_policies.sh" 1000 >"$WORK/generated-policies.yaml"
  pass_route_conf "$WORK/countersign-tls.yaml" "$TCS_PORT" "$THREADS" "$TUP_PORT" \
    "$REPO/policies, $WORK/generated-policies.yaml" "$CERT" "$KEY"
  RUST_LOG=warn "$BIN/countersign" run --config "$WORK/countersign-tls.yaml" 2>"$OUT/countersign_tls.err" &
  PIDS+=($!)
  TCS_PID=$!
  for p in "$TUP_PORT" "$TNGINX_PORT" "$TBARE_PORT" "$TBAREMI_PORT" "$TCS_PORT"; do wait_port "$p"; done
  TNGINX_PID=$(pgrep -P "$(cat "$WORK/tls-proxy/nginx.pid")" | head -1) # the worker
  declare -A TPORT=([nginx]=$TNGINX_PORT [bare]=$TBARE_PORT [bare_mimalloc]=$TBAREMI_PORT [countersign]=$TCS_PORT)
  declare -A TPROC=([nginx]=$TNGINX_PID [bare]=$TBARE_PID [bare_mimalloc]=$TBAREMI_PID [countersign]=$TCS_PID)
  for t in "${TLS_TARGETS[@]}"; do
    url="https://127.0.0.1:${TPORT[$t]}/"
    for v in 1.1 2; do
      [[ $(curl -s --cacert "$CERT" "--http$v" "$url") == ok ]] || { log "$t does not answer ok over TLS, HTTP/$v"; exit 1; }
    done
    # What each handshake negotiates (recorded with the raw outputs).
    openssl s_client -connect "127.0.0.1:${TPORT[$t]}" -servername localhost </dev/null 2>/dev/null \
      | grep -E '^(New|Server Temp Key|Peer signature type)' >"$OUT/tls-params-$t.txt" || true
  done
  TLS_NOTE="$(grep '^New' "$OUT/tls-params-countersign.txt" | sed 's/^New, //'), $(grep 'Server Temp Key' "$OUT/tls-params-countersign.txt" | cut -d: -f2 | sed 's/^ *//'), ECDSA P-256 certificate; hs: $TLS_CLIENTS x openssl s_time -new; hr: wrk -t1 -c$CONNS Connection: close; h1: wrk -t1 -c$CONNS; h2: h2load -t1 -c$H2_CONNS -m$H2_STREAMS; ${TLS_DURATION}s, median of $ROUNDS round(s)"

  run_tls() { # run_tls <kind> <target> <round>: sets TRES[kind.target.round], TCPU_US[kind.target.round]
    local file="$OUT/tls-$1-$2-$3.txt" url="https://127.0.0.1:${TPORT[$2]}/" before after n
    before=$(cpu_ticks "${TPROC[$2]}")
    case $1 in
      hs)
        local start i clients=()
        start=$(date +%s.%N)
        for i in $(seq "$TLS_CLIENTS"); do
          openssl s_time -connect "127.0.0.1:${TPORT[$2]}" -new -time "$TLS_DURATION" >"$file.$i" 2>&1 &
          clients+=($!)
        done
        for i in "${clients[@]}"; do wait "$i" || true; done
        awk -v t="$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { print e - s }')" \
          '/connections in .* real seconds/ { n += $1 } END { printf "%d handshakes in %.2f s\n", n, t }' "$file".* >"$file"
        ;;
      hr) wrk -t1 -c"$CONNS" -d"${TLS_DURATION}s" --latency -H 'Connection: close' "$url" >"$file" ;;
      h1) wrk -t1 -c"$CONNS" -d"${TLS_DURATION}s" --latency "$url" >"$file" ;;
      h2) h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "$TLS_DURATION" "$url" >"$file" ;;
    esac
    after=$(cpu_ticks "${TPROC[$2]}")
    if [[ $1 == hs ]]; then
      n=$(awk '{ print $1 }' "$file")
      TRES[$1.$2.$3]="$(awk '{ printf "%.1f", $1 / $4 }' "$file") 0 0"
    elif [[ $1 == h2 ]]; then
      n=$(h2load_requests "$file")
      TRES[$1.$2.$3]=$(h2load_summary "$file")
    else
      n=$(wrk_requests "$file")
      # rps p99 errors (p50 dropped)
      TRES[$1.$2.$3]=$(wrk_summary "$file" | awk '{ $2 = ""; print }')
    fi
    TCPU_US[$1.$2.$3]=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="${n:-0}" \
      'BEGIN { printf "%.2f", (n > 0 ? t / hz * 1e6 / n : 0) }')
  }
  declare -A TRES TCPU_US
  log "TLS: ${TLS_KINDS[*]}, ${TLS_DURATION}s each, $ROUNDS round(s)"
  for t in "${TLS_TARGETS[@]}"; do wrk -t1 -c"$CONNS" -d1s "https://127.0.0.1:${TPORT[$t]}/" >/dev/null; done # warm-up
  for r in $(seq "$ROUNDS"); do
    for k in "${TLS_KINDS[@]}"; do
      for t in "${TLS_TARGETS[@]}"; do
        run_tls "$k" "$t" "$r"
        log "  round $r $k $t: ${TRES[$k.$t.$r]}; ${TCPU_US[$k.$t.$r]} us CPU per call"
      done
    done
  done
  for k in "${TLS_KINDS[@]}"; do
    for t in "${TLS_TARGETS[@]}"; do
      line=$(for r in $(seq "$ROUNDS"); do echo "${TRES[$k.$t.$r]}"; done | sort -n -k1,1 | sed -n "$(((ROUNDS + 1) / 2))p")
      read -r TRPS[$k.$t] TLAT[$k.$t] _ <<<"$line"
      TCPU[$k.$t]=$(for r in $(seq "$ROUNDS"); do echo "${TCPU_US[$k.$t.$r]}"; done | sort -n | sed -n "$(((ROUNDS + 1) / 2))p")
    done
  done
  TLS_ERRORS=$(grep -l 'Non-2xx\|Socket errors' "$OUT"/tls-h[1r]-*.txt 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ' || true)
  TLS_ERRORS+=$(grep -L ' 0 failed, 0 errored' "$OUT"/tls-h2-*.txt 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ' || true)
  LOAD_TLS=$(cut -d' ' -f1-3 /proc/loadavg)
  cleanup_pass
fi

tls_rows() { # the TLS part of the table
  local k t what lat
  for k in "${TLS_KINDS[@]}"; do
    case $k in
      hs) what="full TLS handshakes/s, no request" lat="" ;;
      hr) what="new connection per request (resumed)" lat=p99 ;;
      h1) what="HTTP/1.1 over TLS, keep-alive" lat=p99 ;;
      h2) what="HTTP/2 over TLS ($H2_CONNS conns x $H2_STREAMS streams)" lat=mean ;;
    esac
    for t in "${TLS_TARGETS[@]}"; do
      if [[ $k == hs ]]; then
        row "$k $t: $what" "$(printf '%8.0f handshakes/s' "${TRPS[$k.$t]}")" "" ""
      else
        row "$k $t: $what" "$(printf '%8.0f req/s %s %.2f ms' "${TRPS[$k.$t]}" "$lat" "${TLAT[$k.$t]}")" "" ""
      fi
    done
    for t in "${TLS_TARGETS[@]}"; do
      row "$k $t: CPU per $([[ $k == hs ]] && echo handshake || echo call)" "$(printf '%s us (user + system)' "${TCPU[$k.$t]}")" "" ""
    done
    row "$k: Countersign / bare pingora, CPU$([[ $k == hs ]] && echo ' per handshake' || echo ' per call')" "$(calc "${TCPU[$k.countersign]} / ${TCPU[$k.bare]}")" "<= 1.00 (beat bare)" "$(verdict "${TCPU[$k.countersign]} <= ${TCPU[$k.bare]}")"
    row "$k: Countersign / bare on mimalloc, CPU per call" "$(calc "${TCPU[$k.countersign]} / ${TCPU[$k.bare_mimalloc]}")" "" ""
    row "$k: Countersign / nginx, CPU per call" "$(calc "${TCPU[$k.countersign]} / ${TCPU[$k.nginx]}")" "" ""
    row "$k: Countersign / bare pingora, req/s" "$(calc "${TRPS[$k.countersign]} / ${TRPS[$k.bare]}")" "" ""
    row "$k: Countersign / nginx, req/s" "$(calc "${TRPS[$k.countersign]} / ${TRPS[$k.nginx]}")" "" ""
  done
  [[ -z ${TLS_ERRORS:-} ]] || echo "TLS runs with errors: $TLS_ERRORS"
}

# --- policy evaluation (criterion) ------------------------------------------
if part criterion; then
  log "policy evaluation (criterion)"
  cargo bench --quiet --bench policy -- --output-format bencher "${CRITERION_ARGS[@]}" 2>/dev/null \
    | tee "$OUT/criterion.txt" | grep '^test' >&2 || true
fi
ns() { # ns <benchmark id>: ns/iter from the bencher output
  awk -v id="$1" '$1 == "test" && $2 == id { gsub(",", "", $5); print $5 }' "$OUT/criterion.txt"
}

# --- held calls -------------------------------------------------------------
declare -A HELDR
part held || HELD=""
for n in $HELD; do
  log "held calls: $n (interval ${INTERVAL}s, open-file limit $NOFILE)"
  line=$("$HELDBIN" --gateway "$BIN/countersign" --calls "$n" --interval "$INTERVAL" \
    --window "$([[ $QUICK == 1 ]] && echo 1 || echo 2)" 2>>"$OUT/held.err" | grep '^RESULT' || true)
  echo "$line" >"$OUT/held-$n.txt"
  HELDR[$n]=$line
  [[ -n $line ]] || log "held calls $n failed: see $OUT/held.err"
done

# --- CIBA ping mode: notification -> upstream --------------------------------
PING_N=$([[ $QUICK == 1 ]] && echo 200 || echo 1000)
PINGR=""
if part held; then
  log "held calls in ping mode: $PING_N"
  PINGR=$("$HELDBIN" --gateway "$BIN/countersign" --calls "$PING_N" --interval "$INTERVAL" \
    --window 1 --delivery ping 2>>"$OUT/held.err" | grep '^RESULT' || true)
  echo "$PINGR" >"$OUT/ping-$PING_N.txt"
  [[ -n $PINGR ]] || log "held calls in ping mode failed: see $OUT/held.err"
fi

# --- durable approvals (wait: async), per store ----------------------------
ASYNC_N=${BENCH_ASYNC:-$([[ $QUICK == 1 ]] && echo 2000 || echo 10000)}
PG_SERVER=${BENCH_POSTGRES:-postgres://root@127.0.0.1:5432}
PG_DB=countersign_bench_$$
declare -A ASYNCR
STORES=$(part async && echo memory sqlite postgres || true)
for store in $STORES; do
  arg=$store
  if [[ $store == postgres ]]; then
    psql "$PG_SERVER/postgres" -qc "CREATE DATABASE $PG_DB" >/dev/null || { log "no PostgreSQL at $PG_SERVER"; continue; }
    arg="postgres=$PG_SERVER/$PG_DB"
  fi
  log "async approvals: $ASYNC_N pending, store $store"
  line=$("$ASYNCBIN" --gateway "$BIN/countersign" --calls "$ASYNC_N" --interval "$INTERVAL" \
    --store "$arg" 2>>"$OUT/async.err" | grep '^RESULT' || true)
  [[ $store == postgres ]] && psql "$PG_SERVER/postgres" -qc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null
  echo "$line" >"$OUT/async-$store.txt"
  ASYNCR[$store]=$line
  [[ -n $line ]] || log "async approvals ($store) failed: see $OUT/async.err"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- the table --------------------------------------------------------------
field() { # field <result line> <key>
  tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'
}
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
verdict() { awk "BEGIN { print (($1) ? \"met\" : \"MISSED\") }"; }
row() { printf '| %-44s | %-30s | %-22s | %-6s |\n' "$@"; }

{
  echo
  echo "Countersign benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
  echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
  echo "load average: start $LOAD_START, after pass-through ${LOAD_PASS:--}, after TLS ${LOAD_TLS:--}, end $LOAD_END; open-file limit $NOFILE"
  echo "parts: $ONLY"
  part pass && echo "pass-through: wrk -t1 -c$CONNS -d${DURATION}s GET /, median of $ROUNDS round(s); every proxy $THREADS worker thread(s)/process(es); upstream nginx return 200 (1 worker)"
  part tls && echo "TLS: $TLS_NOTE"
  echo
  row "measurement" "value" "target" "result"
  row "--------------------------------------------" "------------------------------" "----------------------" "------"
  if part pass; then
  for t in "${TARGETS[@]}"; do
    case $t in
      direct) name="(a) upstream directly" ;;
      nginx) name="(b) nginx reverse proxy (keepalive)" ;;
      bare) name="(c) bare pingora proxy" ;;
      bare_mimalloc) name="(c') bare pingora, mimalloc preloaded" ;;
      countersign) name="(d) Countersign pass route" ;;
      countersign_info) name="(d') Countersign, RUST_LOG=info (default)" ;;
    esac
    row "$name" "$(printf '%8.0f req/s p50 %.2f p99 %.2f ms' "${RPS[$t]}" "${P50[$t]}" "${P99[$t]}")" "" ""
  done
  for t in "${TARGETS[@]}"; do
    [[ $t == direct ]] && who="upstream nginx worker" || who="proxy"
    row "$t: $who CPU per call" "$(printf '%s us (user + system)' "${CPU[$t]}")" "" ""
  done
  row "Countersign / bare pingora, CPU per call" "$(calc "${CPU[countersign]} / ${CPU[bare]}")" "<= 0.90 (issue 19)" "$(verdict "${CPU[countersign]} <= 0.9 * ${CPU[bare]}")"
  row "Countersign / bare on mimalloc, CPU per call" "$(calc "${CPU[countersign]} / ${CPU[bare_mimalloc]}")" "" ""
  row "Countersign / nginx, CPU per call" "$(calc "${CPU[countersign]} / ${CPU[nginx]}")" "" ""
  row "Countersign / nginx, req/s" "$(calc "${RPS[countersign]} / ${RPS[nginx]}")" ">= 1.00" "$(verdict "${RPS[countersign]} >= ${RPS[nginx]}")"
  row "Countersign / nginx, p99 (lower is better)" "$(calc "${P99[countersign]} / ${P99[nginx]}")" "<= 1.00" "$(verdict "${P99[countersign]} <= ${P99[nginx]}")"
  row "Countersign / bare pingora, req/s" "$(calc "${RPS[countersign]} / ${RPS[bare]}")" ">= 0.97" "$(verdict "${RPS[countersign]} >= 0.97 * ${RPS[bare]}")"
  row "Countersign / bare pingora, p99" "$(calc "${P99[countersign]} / ${P99[bare]}")" "<= 1.03" "$(verdict "${P99[countersign]} <= 1.03 * ${P99[bare]}")"
  row "Countersign / bare on mimalloc, req/s" "$(calc "${RPS[countersign]} / ${RPS[bare_mimalloc]}")" "" ""
  row "Countersign / bare on mimalloc, p99" "$(calc "${P99[countersign]} / ${P99[bare_mimalloc]}")" "" ""
  row "Countersign / direct, req/s" "$(calc "${RPS[countersign]} / ${RPS[direct]}")" "" ""
  row "bare pingora / nginx, req/s" "$(calc "${RPS[bare]} / ${RPS[nginx]}")" "" ""
  row "Countersign info logs / warn, req/s" "$(calc "${RPS[countersign_info]} / ${RPS[countersign]}")" "" ""
  fi # part pass
  if part tls; then tls_rows; fi
  if part criterion; then
  for n in 10 1000 10000; do
    v=$(ns "match/find/$n"); row "policy match, $n policies" "$(printf '%s ns' "$v")" "< 1000 ns" "$(verdict "${v:-1e9} < 1000")"
  done
  for n in 10 1000 10000; do
    v=$(ns "match/normalize_find/$n"); row "normalize path + match, $n policies" "$(printf '%s ns' "$v")" "" ""
  done
  v=$(ns "match/miss/10000"); row "no match (pass-through), 10000 policies" "$(printf '%s ns' "$v")" "" ""
  f10=$(ns match/find/10); f10k=$(ns match/find/10000)
  row "match 10000 / match 10 (flat in count)" "$(calc "${f10k:-0} / ${f10:-1}")" "flat (< 2x)" "$(verdict "${f10k:-1e9} < 2 * ${f10:-1}")"
  v=$(ns render/call); row "strict body parse + render message + details" "$(printf '%s ns' "$v")" "< 5000 ns" "$(verdict "${v:-1e9} < 5000")"
  v=$(ns problem/to_json); row "problem+json answer" "$(printf '%s ns' "$v")" "" ""
  fi # part criterion
  for n in $HELD; do
    l=${HELDR[$n]}
    if [[ -z $l ]]; then row "held $n" "failed (see held.err)" "" "MISSED"; continue; fi
    pc=$(field "$l" per_call_kib); row "held $n: RSS per held call" "$(printf '%s KiB (%s -> %s KiB)' "$pc" "$(field "$l" rss_before_kib)" "$(field "$l" rss_held_kib)")" "<= 16 KiB + body" "$(verdict "$pc <= 16 + $(field "$l" body_kib)")"
    row "held $n: gateway CPU while holding" "$(printf '%s%% of a core, %s us/poll' "$(field "$l" cpu_pct)" "$(field "$l" cpu_us_per_poll)")" "" ""
    pp=$(field "$l" polls_per_call_interval); row "held $n: polls per call per interval" "$pp" "1 (0.95-1.00)" "$(verdict "$pp >= 0.95 && $pp <= 1.0")"
    te=$(field "$l" too_early); row "held $n: too-early (slow_down) polls" "$(printf '%s (min gap %s s)' "$te" "$(field "$l" min_gap_s)")" "0" "$(verdict "$te == 0")"
    mx=$(field "$l" approve_max_ms); p99=$(field "$l" approve_p99_ms)
    row "held $n: approval -> upstream p50/p99/max" "$(printf '%s / %s / %s ms' "$(field "$l" approve_p50_ms)" "$p99" "$mx")" "<= $((INTERVAL * 1000)) ms" "$(verdict "$mx <= $INTERVAL * 1000")"
    ok=$(field "$l" ok); row "held $n: calls answered 200 after approval" "$ok of $n" "all" "$(verdict "$ok == $n")"
  done
  if [[ -n $PINGR ]]; then
    p99=$(field "$PINGR" ping_resume_p99_ms)
    row "ping $PING_N: notification -> upstream p50/p99/max" "$(printf '%s / %s / %s ms' "$(field "$PINGR" ping_resume_p50_ms)" "$p99" "$(field "$PINGR" ping_resume_max_ms)")" "p99 <= 50 ms" "$(verdict "$p99 <= 50")"
    ok=$(field "$PINGR" ok); row "ping $PING_N: calls answered 200 after approval" "$ok of $PING_N ($(field "$PINGR" pings) pings)" "all" "$(verdict "$ok == $PING_N")"
  elif part held; then
    row "ping $PING_N" "failed (see held.err)" "" "MISSED"
  fi
  for store in $STORES; do
    l=${ASYNCR[$store]:-}
    if [[ -z $l ]]; then row "async $store" "failed (see async.err)" "" "MISSED"; continue; fi
    n=$(field "$l" calls)
    pk=$(field "$l" per_pending_kib); row "async $n, $store: RSS per pending approval" "$(printf '%s KiB (%s -> %s KiB)' "$pk" "$(field "$l" rss_before_kib)" "$(field "$l" rss_pending_kib)")" "<= 4 KiB" "$(verdict "$pk <= 4")"
    row "async $n, $store: calls accepted (202) per s" "$(printf '%s/s, p50 %s p99 %s ms' "$(field "$l" accept_per_s)" "$(field "$l" accept_p50_ms)" "$(field "$l" accept_p99_ms)")" "" ""
    row "async $n, $store: approved calls forwarded per s" "$(printf '%s/s (%s of %s)' "$(field "$l" forward_per_s)" "$(field "$l" forwarded)" "$n")" "all" "$(verdict "$(field "$l" forwarded) == $n")"
    row "async $n, $store: retry gets the recorded answer" "$(printf 'p50 %s p99 %s ms (%s of %s ok)' "$(field "$l" retry_p50_ms)" "$(field "$l" retry_p99_ms)" "$(field "$l" retries_ok)" "$(field "$l" retries)")" "all 200" "$(verdict "$(field "$l" retries_ok) == $(field "$l" retries)")"
  done
  [[ -z $ERRORS ]] || echo "wrk reported errors in: $ERRORS"
  echo "raw outputs: $OUT"
} | tee "$OUT/table.txt"

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
# requests) and around exactly CG_N requests on the same connections:
#
#   instructions/request = (Ir(N requests) - Ir(0 requests)) / N
#
# Countersign loads policies/ plus 1,000 generated policies (gen_policies.sh)
# with default_action: pass; GET / matches none of them.
#
# Knobs: CG_N (20000), CG_CONNS (10), CG_WARMUP (500), CG_TARGETS ("bare
# countersign"), CG_BUILD (1: cargo build --release first), CG_OUT (callgrind
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
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release
CLIENT=$REPO/benches/pass_client.py

log() { printf '[callgrind %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
command -v valgrind >/dev/null || { log "valgrind is needed (apt-get install valgrind)"; exit 1; }
command -v nginx >/dev/null || { log "nginx is needed (apt-get install nginx-light)"; exit 1; }

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() { local p=$1; while ! port_free "$p"; do p=$((p + 1)); done; echo "$p"; }
wait_port() { # up to 180 s: valgrind starts slowly on a loaded machine
  for _ in $(seq 1800); do port_free "$1" || return 0; sleep 0.1; done
  log "nothing listens on :$1"; return 1
}

if [[ ${CG_BUILD:-1} == 1 ]]; then
  log "building (release)"
  cargo build --release --quiet --bin countersign --example bare_pingora
fi

UP_PORT=$(pick_port 18280)
mkdir -p "$WORK/upstream/logs"
cat >"$WORK/upstream/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/upstream/nginx.pid;
error_log $WORK/upstream/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/upstream/body;
  proxy_temp_path $WORK/upstream/proxy;
  fastcgi_temp_path $WORK/upstream/fastcgi;
  uwsgi_temp_path $WORK/upstream/uwsgi;
  scgi_temp_path $WORK/upstream/scgi;
  server { listen 127.0.0.1:$UP_PORT; location / { default_type text/plain; return 200 'ok'; } }
}
EOF
nginx -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf" -g 'daemon off;' 2>>"$OUT/nginx.err" &
PIDS+=($!)
wait_port "$UP_PORT"

"$REPO/benches/gen_policies.sh" 1000 >"$WORK/generated.yaml"
PROXY_PORT=$(pick_port $((UP_PORT + 1)))
cat >"$WORK/countersign.yaml" <<EOF
listen:
  proxy: 127.0.0.1:$PROXY_PORT
  threads: 1
upstreams:
  api:
    url: http://127.0.0.1:$UP_PORT
authorization_server:
  issuer: http://127.0.0.1:9/
  endpoints:   # never contacted: nothing is held
    backchannel_authentication: http://127.0.0.1:9/bc-authorize
    token: http://127.0.0.1:9/token
  client_id: bench
  client_auth: { method: client_secret_post, client_secret: bench }
identity:
  header: { name: x-countersign-user }
policies: [$REPO/policies, $WORK/generated.yaml]
default_action: pass
store: memory
EOF

total_ir() { # total_ir <callgrind file>: the Ir of that dump
  awk '/^(summary|totals):/ { print $2; exit }' "$1"
}

measure() { # measure <name> <command...>
  local name=$1; shift
  local file="$OUT/cg-$name"
  rm -f "$file" "$file".*
  valgrind --tool=callgrind --callgrind-out-file="$file" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err" &
  local pid=$!
  PIDS+=("$pid")
  wait_port "$PROXY_PORT"
  python3 "$CLIENT" "$PROXY_PORT" "$WARMUP" "$CONNS" # warm-up, fills the pool
  callgrind_control -z "$pid" >/dev/null
  sleep 1
  callgrind_control -d "$pid" >/dev/null # dump 1: 0 requests
  python3 "$CLIENT" "$PROXY_PORT" "$N" "$CONNS" # same connection count, new sockets
  callgrind_control -d "$pid" >/dev/null # dump 2: N requests
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local idle busy
  idle=$(total_ir "$file.1")
  busy=$(total_ir "$file.2")
  echo "RESULT $name requests=$N idle_ir=$idle busy_ir=$busy ir_per_request=$(((busy - idle) / N))"
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

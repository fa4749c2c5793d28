# Shared by the benchmark scripts (run.sh, callgrind_pass.sh,
# pingora_settings.sh); sourced, never run. Each script sets LOG_TAG, OUT and
# WORK before sourcing it.

log() { printf '[%s %(%H:%M:%S)T] %s\n' "${LOG_TAG:-bench}" -1 "$*" >&2; }

# --- tools (Debian packages, installed when missing) ---------------------
apt_updated=0
need() { # need <command or file> <debian package>
  command -v "$1" >/dev/null || [[ -e $1 ]] && return
  log "installing $2"
  if [[ $apt_updated == 0 ]]; then apt-get update -qq >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

# --- processes we start, stopped on exit --------------------------------
PIDS=()
cleanup() {
  # TERM, not KILL: nginx's master then stops its worker (which would keep
  # our stdout open).
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- ports -----------------------------------------------------------------
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() { # a free port at or above $1
  local p=$1
  while ! port_free "$p"; do p=$((p + 1)); done
  echo "$p"
}
wait_port() { # wait_port <port> [seconds, 15]
  for _ in $(seq $((${2:-15} * 10))); do port_free "$1" || return 0; sleep 0.1; done
  log "nothing listens on :$1"; return 1
}

# --- nginx (the upstream, and the reference proxy) --------------------------
nginx_conf() { # nginx_conf <dir> <workers> <server block>
  mkdir -p "$1/logs"
  cat >"$1/nginx.conf" <<EOF
worker_processes $2;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $1/body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
  $3
}
EOF
}
start_nginx() { # start_nginx <dir>
  nginx -p "$1" -c "$1/nginx.conf" -g 'daemon off;' 2>>"$OUT/nginx.err" &
  PIDS+=($!)
}
upstream_nginx() { # upstream_nginx <dir> <port>: answers 200 "ok" itself, one worker
  nginx_conf "$1" 1 "server { listen 127.0.0.1:$2; location / { default_type text/plain; return 200 'ok'; } }"
  start_nginx "$1"
}

# --- wrk --------------------------------------------------------------------
to_ms() { # wrk latency ("812.00us", "1.23ms", "1.02s") -> ms
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}
wrk_summary() { # wrk_summary <wrk --latency output>: "rps p50_ms p99_ms errors"
  local rps p50 p99 errors
  rps=$(awk '/^Requests\/sec/ { print $2 }' "$1")
  p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$1")")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$1")")
  errors=$(awk '/Non-2xx|Socket errors/ { s = s $0 "; " } END { print (s == "" ? "0" : s) }' "$1")
  echo "$rps $p50 $p99 $errors"
}

# cpu_ticks <pid>: user + system CPU of a whole process (all its threads), in
# clock ticks (getconf CLK_TCK, 100 on Linux).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# wrk_requests <wrk output>: how many requests completed.
wrk_requests() { awk '/ requests in / { print $1 }' "$1"; }

# --- h2load (nghttp2-client), for HTTP/2 --------------------------------------
h2load_requests() { # h2load_requests <h2load output>: requests that succeeded (2xx)
  awk '/^requests:/ { print $8 }' "$1"
}
h2load_summary() { # h2load_summary <h2load output>: "rps mean_ms errors"
  local rps mean errors
  rps=$(awk '/^finished in/ { print $4 }' "$1")
  mean=$(to_ms "$(awk '/^time for request:/ { print $6 }' "$1")")
  errors=$(awk '/^requests:/ { e = $10 + $12; print (e == 0 ? "0" : e " failed/errored") }' "$1")
  echo "$rps $mean $errors"
}

# self_signed <dir>: an ECDSA P-256 certificate for localhost and 127.0.0.1,
# made once per run: <dir>/cert.pem, <dir>/key.pem.
self_signed() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
    -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
}

# The mimalloc shared library (Debian libmimalloc2.0), LD_PRELOADed into bare
# pingora to compare it with Countersign on the same allocator.
MIMALLOC_SO=/usr/lib/x86_64-linux-gnu/libmimalloc.so.2

# --- Countersign on a pass route ---------------------------------------------
# pass_route_conf <file> <proxy port> <threads> <upstream port> <policies yaml list> [<cert> <key>]:
# a gateway whose calls match no policy and pass (default_action: pass), with
# an authorization server that is never contacted and the memory store. With a
# certificate and key, the listener is TLS (`listen.tls`, HTTP/2 by ALPN).
pass_route_conf() {
  local tls=""
  [[ -z ${6:-} ]] || tls="  tls: { certificates: [{ cert: $6, key: $7 }], http2: true }"
  cat >"$1" <<EOF2
listen:
  proxy: 127.0.0.1:$2
  threads: $3
$tls
upstreams:
  api:
    url: http://127.0.0.1:$4
authorization_server:
  issuer: http://127.0.0.1:9/
  endpoints:   # never contacted: nothing is held
    backchannel_authentication: http://127.0.0.1:9/bc-authorize
    token: http://127.0.0.1:9/token
  client_id: bench
  client_auth: { method: client_secret_post, client_secret: bench }
identity:
  header: { name: x-countersign-user }
policies: [$5]
default_action: pass
store: memory
EOF2
}

#!/usr/bin/env bash
# Try Countersign on your machine against the OpenID Certified oidc-provider
# (docs/try-oidc-provider.md). Starts, in order and each only
# once the previous one answers, the CIBA authorization server (:4000), the
# example shop API (:3000) and the gateway (:8080, admin :9090); their logs go
# to target/try/*.log, not to your terminal.
#
#   examples/try-oidc-provider.sh start     build, start the three, wait until ready
#   examples/try-oidc-provider.sh pending   what the person is being asked
#   examples/try-oidc-provider.sh approve   be alice's phone: approve the newest request
#   examples/try-oidc-provider.sh deny      ... or deny it
#   examples/try-oidc-provider.sh stop      stop all three
set -euo pipefail
cd "$(dirname "$0")/.."

AS=http://127.0.0.1:4000
DIR=target/try
mkdir -p "$DIR"

# Waits until `url` answers 2xx, or fails naming the log to read.
wait_for() {
  local what=$1 url=$2 log=$3
  for _ in $(seq 1 240); do
    if curl -fsS -o /dev/null "$url" 2>/dev/null; then
      echo "  $what is up ($url)"
      return 0
    fi
    sleep 0.25
  done
  echo "$what did not come up; see $log" >&2
  tail -n 20 "$log" >&2 || true
  exit 1
}

start() {
  if [ -s "$DIR/pids" ]; then
    echo "already started (pids in $DIR/pids); run '$0 stop' first" >&2
    exit 1
  fi
  [ -d tests/peer/node_modules ] || npm ci --prefix tests/peer --silent
  if [ -z "${TRY_NO_BUILD:-}" ]; then # tests/walkthrough.rs runs what cargo test built
    echo "building (the first time takes a few minutes)..."
    cargo build --quiet --bin countersign --example shop_api
  fi

  # A fresh demo: approvals of an earlier run (kept beside examples/shop.yaml)
  # would answer the same calls again from the store.
  rm -f examples/countersign.db examples/countersign.db-wal examples/countersign.db-shm

  PEER_PORT=4000 PEER_IGNORE_STDIN=1 node tests/peer/server.mjs >"$DIR/peer.log" 2>&1 &
  echo $! >>"$DIR/pids"
  wait_for "authorization server" "$AS/.well-known/openid-configuration" "$DIR/peer.log"

  target/debug/examples/shop_api --issuer "$AS" --port 3000 >"$DIR/shop.log" 2>&1 &
  echo $! >>"$DIR/pids"
  wait_for "shop API" "http://127.0.0.1:3000/products" "$DIR/shop.log"

  CIBA_ISSUER=$AS CIBA_CLIENT_ID=countersign-post CIBA_CLIENT_SECRET=countersign-secret \
    target/debug/countersign run --config examples/shop.yaml >"$DIR/gateway.log" 2>&1 &
  echo $! >>"$DIR/pids"
  wait_for "gateway" "http://127.0.0.1:9090/readyz" "$DIR/gateway.log"
  echo "ready: agents call http://127.0.0.1:8080, metrics at http://127.0.0.1:9090/metrics"
  echo "logs: $DIR/peer.log $DIR/shop.log $DIR/gateway.log; stop with: $0 stop"
}

stop() {
  if [ -s "$DIR/pids" ]; then
    # Newest first: the gateway, the shop, then the authorization server.
    tac "$DIR/pids" | while read -r pid; do kill "$pid" 2>/dev/null || true; done
    rm -f "$DIR/pids"
    echo "stopped"
  else
    echo "nothing started from here"
  fi
}

# The pending CIBA requests, newest last, as `auth_req_id  user  "message"`.
pending() {
  curl -fsS "$AS/control/requests?status=pending" | node -e '
    let text = "";
    process.stdin.on("data", (d) => (text += d)).on("end", () => {
      for (const r of JSON.parse(text)) console.log(`${r.auth_req_id}  ${r.sub}  "${r.binding_message}"`);
    });'
}

# approve|deny the request `id`, or the newest pending one.
decide() {
  local action=$1 id=${2:-}
  if [ -z "$id" ]; then
    id=$(pending | tail -n 1 | cut -d' ' -f1)
  fi
  if [ -z "$id" ]; then
    echo "no pending request: make the agent's call first" >&2
    exit 1
  fi
  curl -fsS -X POST -H 'content-type: application/json' -d '{}' \
    "$AS/control/requests/$id/$action" >/dev/null
  case $action in approve) echo "approved $id" ;; deny) echo "denied $id" ;; esac
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  pending) pending ;;
  approve | deny) decide "$1" "${2:-}" ;;
  *)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

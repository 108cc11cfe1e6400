#!/usr/bin/env bash
# `make demo`: start `meshward up` on a fresh data dir, register a workload, mint its
# X509-SVID and a JWT-SVID, show them and the CA, then stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
meshward=.venv/bin/meshward
data_dir=$(mktemp -d "${TMPDIR:-/tmp}/meshward-demo.XXXXXX")
export MESHWARD_DATA_DIR=$data_dir
# The health port is picked free at run time so the demo never collides with a running server.
MESHWARD_SERVER__HEALTH_LISTEN=127.0.0.1:$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export MESHWARD_SERVER__HEALTH_LISTEN

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "meshward up --data-dir $data_dir   (trust domain example.org, SQLite)"
$meshward up --log-level warning &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  $meshward ca show >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "meshward up exited; see the error above" >&2; exit 1; }
  sleep 0.1
done
$meshward ca show

step "meshward entry create --spiffe-id spiffe://example.org/ns/demo/sa/web --selector unix:uid:$(id -u)"
$meshward entry create --spiffe-id spiffe://example.org/ns/demo/sa/web \
  --selector "unix:uid:$(id -u)" --dns web.demo.svc --x509-svid-ttl 30m

step "meshward svid mint --spiffe-id spiffe://example.org/ns/demo/sa/web --out $data_dir/web"
$meshward svid mint --spiffe-id spiffe://example.org/ns/demo/sa/web --dns web.demo.svc \
  --ttl 30m --out "$data_dir/web"

if command -v openssl >/dev/null; then
  step "openssl verify -CAfile bundle.pem svid.pem"
  openssl verify -CAfile "$data_dir/web/bundle.pem" -untrusted "$data_dir/web/svid.pem" \
    "$data_dir/web/svid.pem"
fi

step "meshward jwt mint --spiffe-id spiffe://example.org/ns/demo/sa/web --audience reviews"
token=$($meshward jwt mint --spiffe-id spiffe://example.org/ns/demo/sa/web --audience reviews)
# Show the header and claims, not the token itself: a token is a credential.
.venv/bin/python - "$token" <<'PY'
import json, sys
import jwt
token = sys.argv[1]
print("header:", json.dumps(jwt.get_unverified_header(token)))
print("claims:", json.dumps(jwt.decode(token, options={"verify_signature": False})))
PY

step "meshward bundle show --format jwks"
$meshward bundle show --format jwks

step "done: stopping the server (data kept in $data_dir)"

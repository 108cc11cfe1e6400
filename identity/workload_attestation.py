"""Turning a gRPC caller on the agent socket into selectors.

Servicers depend only on :class:`CallerAttestor`; this module is the adapter that knows
about the peer front (who connected) and the attestor plugins (what that process is).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from identity.errors import AttestationError
from identity.peers import Peer
from identity.selectors import Selector

__all__ = ["CallerAttestor", "PeerLookup", "ProcessAttestor", "WorkloadAttestor"]


class CallerAttestor(Protocol):
    async def attest(self, grpc_peer: str) -> frozenset[Selector]:
        """Selectors of the caller; AttestationError when it cannot be identified."""
        ...


class PeerLookup(Protocol):
    def lookup(self, grpc_peer: str) -> Peer | None: ...


class ProcessAttestor(Protocol):
    def attest(self, peer: Peer) -> tuple[Selector, ...]: ...


class WorkloadAttestor:
    def __init__(self, front: PeerLookup, attestors: Sequence[ProcessAttestor]) -> None:
        self._front = front
        self._attestors = tuple(attestors)

    async def attest(self, grpc_peer: str) -> frozenset[Selector]:
        peer = self._front.lookup(grpc_peer)
        if peer is None:
            raise AttestationError("the call did not come through the agent socket")
        # /proc reads and kubelet queries block: keep them off the event loop.
        return await asyncio.to_thread(self._attest, peer)

    def _attest(self, peer: Peer) -> frozenset[Selector]:
        selectors: set[Selector] = set()
        for attestor in self._attestors:
            selectors.update(attestor.attest(peer))
        if not peer.is_alive():
            raise AttestationError(f"process {peer.pid} exited or its pid was reused")
        return frozenset(selectors)

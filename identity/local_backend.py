"""The agent's backend when agent and server share a process (``meshward up``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from cryptography import x509

from identity.admin import IdentityAdmin
from identity.agent import SigningRequest
from identity.bundle import TrustBundle
from identity.entries import Entry
from identity.errors import NotFoundError
from identity.spiffeid import parse_spiffe_id
from identity.store.entries import current_revision

__all__ = ["LocalBackend"]


class LocalBackend:
    def __init__(
        self, *, admin: IdentityAdmin, agent_id: str, clock: Callable[[], datetime]
    ) -> None:
        self.agent_id = agent_id
        self._admin = admin
        self._clock = clock

    async def revision(self) -> object:
        return await asyncio.to_thread(self._revision)

    def _revision(self) -> tuple[int, int]:
        with self._admin.db.transaction() as session:
            return current_revision(session), self._admin.ca.bundle.sequence

    async def entries(self) -> Sequence[Entry]:
        return await asyncio.to_thread(self._admin.list_entries, parent_id=self.agent_id)

    async def bundle(self) -> TrustBundle:
        return self._admin.ca.bundle

    async def sign_x509_svids(
        self, requests: Sequence[SigningRequest]
    ) -> Sequence[tuple[x509.Certificate, ...]]:
        return await asyncio.to_thread(self._sign_all, requests)

    def _sign_all(self, requests: Sequence[SigningRequest]) -> list[tuple[x509.Certificate, ...]]:
        chains = []
        for request in requests:
            entry = request.entry
            issued = self._admin.ca.sign_x509_svid(
                public_key=request.key.public_key(),
                spiffe_id=parse_spiffe_id(entry.spiffe_id),
                dns_names=entry.dns_names,
                ttl=timedelta(seconds=entry.x509_svid_ttl) if entry.x509_svid_ttl else None,
                issued_to=self.agent_id,
                now=self._clock(),
            )
            chains.append(issued.chain)
        return chains

    async def sign_jwt_svid(self, *, spiffe_id: str, audience: tuple[str, ...]) -> str:
        entries = await self.entries()
        entry = next((e for e in entries if e.spiffe_id == spiffe_id), None)
        if entry is None:
            raise NotFoundError(f"no entry of agent {self.agent_id} gives {spiffe_id}")
        issued = await asyncio.to_thread(
            self._admin.ca.sign_jwt_svid,
            spiffe_id=parse_spiffe_id(spiffe_id),
            audience=audience,
            ttl=timedelta(seconds=entry.jwt_svid_ttl) if entry.jwt_svid_ttl else None,
            now=self._clock(),
        )
        return issued.token

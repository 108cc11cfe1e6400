"""The node agent's core loop: keep an X509-SVID for every entry it serves, fresh.

The agent makes each workload key itself and only sends the public half (as a CSR to a
remote server, or a public key to the in-process CA): workload private keys never reach
the server. Each SVID is re-signed at half its lifetime, ±10 % jitter so that a fleet
does not renew in lock-step. The trust bundle is refreshed on every tick, so a CA that
the server *prepares* reaches workloads before any SVID chains to it. When the server
cannot be reached the agent keeps serving what it has and retries with backoff; an SVID
that expires in the meantime is dropped rather than handed out.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509

from identity.bundle import TrustBundle
from identity.entries import Entry
from identity.keys import KeyType, PrivateKey, generate_key
from identity.workload_cache import WorkloadCache, WorkloadSvid

__all__ = ["Agent", "AgentBackend", "SigningRequest"]

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class SigningRequest:
    entry: Entry
    key: PrivateKey


class AgentBackend(Protocol):
    """What the agent needs from the server, in-process or over the node API."""

    async def revision(self) -> object:
        """A value that changes whenever this agent's entries or the bundle change."""
        ...

    async def entries(self) -> Sequence[Entry]: ...

    async def bundle(self) -> TrustBundle: ...

    async def sign_x509_svids(
        self, requests: Sequence[SigningRequest]
    ) -> Sequence[tuple[x509.Certificate, ...]]:
        """One chain (leaf first, no root) per request, in order."""
        ...

    async def sign_jwt_svid(self, *, spiffe_id: str, audience: tuple[str, ...]) -> str: ...


class Agent:
    def __init__(
        self,
        *,
        backend: AgentBackend,
        cache: WorkloadCache,
        clock: Callable[[], datetime],
        key_type: KeyType = KeyType.EC_P256,
        interval: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        self.cache = cache
        self._backend = backend
        self._clock = clock
        self._key_type = key_type
        self._interval = interval
        self._backoff = interval
        self._rng = rng or random.SystemRandom()
        self._svids: dict[str, WorkloadSvid] = {}
        self._renew_at: dict[str, datetime] = {}
        self._signed_for: dict[str, tuple[object, ...]] = {}
        self._revision: object = None
        self._entries: tuple[Entry, ...] = ()
        self._bundle: TrustBundle | None = None
        self._live: set[str] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(await self.tick())

    async def tick(self) -> float:
        """Sync once; return how long to wait before the next try (backing off on failure)."""
        try:
            await self.sync()
        except Exception as exc:
            # Keep serving the cache; never hand out what has expired meanwhile.
            self._backoff = min(self._backoff * 2, 30.0)
            log.warning(
                "agent: sync with the server failed (%s); retrying in %.1fs", exc, self._backoff
            )
            if self._drop_expired():
                self.cache.update(svids=self._svids)
        else:
            self._backoff = self._interval
        return self._backoff

    async def sync(self) -> None:
        """One pass: entries and bundle if they changed, then every SVID that is due.

        The cache (and through it every open stream) is only touched when something
        changed: with many streams open, an idle tick must cost next to nothing.
        """
        revision = await self._backend.revision()
        changed = revision != self._revision
        if changed:
            self._entries = tuple(await self._backend.entries())
            bundle = await self._backend.bundle()
            if self._bundle is None or bundle.sequence != self._bundle.sequence:
                self._bundle = bundle
            self._revision = revision
        now = self._clock()
        live = {e.id: e for e in self._entries if e.expires_at is None or e.expires_at > now}
        due = [e for e in live.values() if self._due(e, now)]
        if due:
            requests = [SigningRequest(entry=e, key=generate_key(self._key_type)) for e in due]
            chains = await self._backend.sign_x509_svids(requests)
            signed_at = self._clock()
            for request, chain in zip(requests, chains, strict=True):
                self._store(request, chain, signed_at)
        for gone in set(self._svids) - set(live):
            self._forget(gone)
        dropped = self._drop_expired()
        if changed or due or dropped or set(live) != self._live:
            self._live = set(live)
            self.cache.update(entries=live.values(), svids=self._svids, bundle=self._bundle)

    async def sign_jwt_svid(self, *, spiffe_id: str, audience: tuple[str, ...]) -> str:
        return await self._backend.sign_jwt_svid(spiffe_id=spiffe_id, audience=audience)

    def _due(self, entry: Entry, now: datetime) -> bool:
        if entry.id not in self._svids:
            return True
        # An entry whose SPIFFE ID, DNS names or TTL changed needs a new certificate now.
        return (
            self._signed_for.get(entry.id) != _signing_inputs(entry)
            or now >= self._renew_at[entry.id]
        )

    def _store(
        self, request: SigningRequest, chain: tuple[x509.Certificate, ...], signed_at: datetime
    ) -> None:
        entry = request.entry
        leaf = chain[0]
        # From the signing time, not NotBefore: NotBefore is backdated for clock skew, and
        # counting from it would renew a short-lived SVID again at once.
        lifetime = leaf.not_valid_after_utc - signed_at
        half = lifetime / 2 * (1 + self._rng.uniform(-0.1, 0.1))
        self._svids[entry.id] = WorkloadSvid(
            entry_id=entry.id,
            spiffe_id=entry.spiffe_id,
            chain=chain,
            key=request.key,
            hint=entry.hint,
        )
        self._renew_at[entry.id] = signed_at + max(half, timedelta(seconds=1))
        self._signed_for[entry.id] = _signing_inputs(entry)

    def _forget(self, entry_id: str) -> None:
        self._svids.pop(entry_id, None)
        self._renew_at.pop(entry_id, None)
        self._signed_for.pop(entry_id, None)

    def _drop_expired(self) -> bool:
        """Forget SVIDs past their NotAfter; True if there were any."""
        now = self._clock()
        expired = [k for k, svid in self._svids.items() if svid.leaf.not_valid_after_utc <= now]
        for entry_id in expired:
            log.warning(
                "agent: SVID for %s expired before it could be renewed",
                self._svids[entry_id].spiffe_id,
            )
            self._forget(entry_id)
        return bool(expired)


def _signing_inputs(entry: Entry) -> tuple[object, ...]:
    return (entry.spiffe_id, entry.dns_names, entry.x509_svid_ttl)

"""What the agent can hand to workloads, and subscriptions that wake on every change.

The agent keeps one :class:`WorkloadCache`: the registration entries it may serve, the
X509-SVID (chain and key) it holds for each, and the trust bundles. The Workload API and
SDS servicers never see the cache itself, only the small :class:`WorkloadSource`
protocol: "subscribe with these selectors" gives a :class:`Subscription` whose
``latest`` is what those selectors entitle the caller to, and whose ``changed`` returns
as soon as that changes (rotation, entry change, bundle change). Everything runs on the
agent's asyncio loop.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from identity.bundle import TrustBundle
from identity.entries import Entry
from identity.keys import PrivateKey
from identity.selectors import Selector

__all__ = [
    "Subscription",
    "WorkloadCache",
    "WorkloadSource",
    "WorkloadSvid",
    "WorkloadUpdate",
]


@dataclass(slots=True, frozen=True)
class WorkloadSvid:
    entry_id: str
    spiffe_id: str
    chain: tuple[x509.Certificate, ...]  # leaf first, then intermediates (no root)
    key: PrivateKey
    hint: str

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


@dataclass(slots=True, frozen=True)
class WorkloadUpdate:
    """One consistent view for one caller. ``svids`` are in entry order: the first is the default."""

    version: int
    svids: tuple[WorkloadSvid, ...]
    bundle: TrustBundle
    federated: Mapping[str, TrustBundle]  # trust domain name -> bundle


class Subscription(Protocol):
    @property
    def latest(self) -> WorkloadUpdate: ...

    async def changed(self, since: int) -> WorkloadUpdate:
        """Wait until there is an update with a version greater than ``since``."""
        ...

    def close(self) -> None: ...


class WorkloadSource(Protocol):
    def subscribe(self, selectors: frozenset[Selector]) -> Subscription: ...


class WorkloadCache:
    """The agent's state; ``update`` replaces it and wakes the subscribers it concerns."""

    def __init__(self, bundle: TrustBundle) -> None:
        self._versions = itertools.count(1)
        self._entries: tuple[Entry, ...] = ()
        self._svids: dict[str, WorkloadSvid] = {}
        self._bundle = bundle
        self._federated: Mapping[str, TrustBundle] = {}
        self._subscriptions: set[_Subscription] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self._entries

    def update(
        self,
        *,
        entries: Iterable[Entry] | None = None,
        svids: Mapping[str, WorkloadSvid] | None = None,
        bundle: TrustBundle | None = None,
        federated: Mapping[str, TrustBundle] | None = None,
    ) -> None:
        if entries is not None:
            self._entries = tuple(sorted(entries, key=lambda e: (e.created_at, e.id)))
        if svids is not None:
            self._svids = dict(svids)
        if bundle is not None:
            self._bundle = bundle
        if federated is not None:
            self._federated = dict(federated)
        for subscription in list(self._subscriptions):
            subscription.refresh()

    def subscribe(self, selectors: frozenset[Selector]) -> Subscription:
        subscription = _Subscription(self, selectors)
        self._subscriptions.add(subscription)
        return subscription

    def view(self, selectors: frozenset[Selector], version: int | None = None) -> WorkloadUpdate:
        svids = tuple(
            self._svids[e.id]
            for e in self._entries
            if e.id in self._svids and set(e.selectors) <= selectors
        )
        return WorkloadUpdate(
            version=next(self._versions) if version is None else version,
            svids=svids,
            bundle=self._bundle,
            federated=self._federated,
        )

    def _forget(self, subscription: _Subscription) -> None:
        self._subscriptions.discard(subscription)


class _Subscription:
    def __init__(self, cache: WorkloadCache, selectors: frozenset[Selector]) -> None:
        self._cache = cache
        self._selectors = selectors
        self._latest = cache.view(selectors)
        self._event = asyncio.Event()

    @property
    def latest(self) -> WorkloadUpdate:
        return self._latest

    def refresh(self) -> None:
        fresh = self._cache.view(self._selectors, version=self._latest.version)
        if _same(fresh, self._latest):
            return  # nothing this caller can see has changed: no push
        self._latest = self._cache.view(self._selectors)
        self._event.set()

    async def changed(self, since: int) -> WorkloadUpdate:
        while self._latest.version <= since:
            self._event.clear()
            await self._event.wait()
        return self._latest

    def close(self) -> None:
        self._cache._forget(self)


def _same(a: WorkloadUpdate, b: WorkloadUpdate) -> bool:
    return (
        [(s.entry_id, s.leaf.serial_number, s.hint) for s in a.svids]
        == [(s.entry_id, s.leaf.serial_number, s.hint) for s in b.svids]
        and a.bundle.sequence == b.bundle.sequence
        and a.bundle.x509_authorities == b.bundle.x509_authorities
        and a.bundle.jwt_authorities == b.bundle.jwt_authorities
        and dict(a.federated) == dict(b.federated)
    )

"""The agent's sync loop on a fake clock: renewal timing, entry changes, server outages."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import timedelta

import pytest
from cryptography import x509

from identity.admin import IdentityAdmin
from identity.agent import Agent, SigningRequest
from identity.authority import CertificateAuthority
from identity.bundle import TrustBundle
from identity.entries import Entry, EntrySpec
from identity.local_backend import LocalBackend
from identity.selectors import Selector
from identity.workload_cache import WorkloadCache
from tests.conftest import FakeClock

AGENT_ID = "spiffe://example.org/meshward/agent/local"
ME = frozenset({Selector("unix", "uid", "1000")})


class FlakyBackend:
    """The in-process backend, with a switch that makes the server unreachable."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.down = False
        self.signed = 0

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("server unreachable")

    async def revision(self) -> object:
        self._check()
        return await self.inner.revision()

    async def entries(self) -> Sequence[Entry]:
        self._check()
        return await self.inner.entries()

    async def bundle(self) -> TrustBundle:
        self._check()
        return await self.inner.bundle()

    async def sign_x509_svids(
        self, requests: Sequence[SigningRequest]
    ) -> Sequence[tuple[x509.Certificate, ...]]:
        self._check()
        self.signed += len(requests)
        return await self.inner.sign_x509_svids(requests)

    async def sign_jwt_svid(self, *, spiffe_id: str, audience: tuple[str, ...]) -> str:
        self._check()
        return await self.inner.sign_jwt_svid(spiffe_id=spiffe_id, audience=audience)


class Setup:
    def __init__(self, ca: CertificateAuthority, db, clock: FakeClock, seed: int = 1) -> None:  # type: ignore[no-untyped-def]
        self.clock = clock
        self.ca = ca
        self.admin = IdentityAdmin(db=db, ca=ca, default_parent_id=AGENT_ID, clock=clock)
        self.backend = FlakyBackend(LocalBackend(admin=self.admin, agent_id=AGENT_ID, clock=clock))
        self.cache = WorkloadCache(ca.bundle)
        self.agent = Agent(
            backend=self.backend, cache=self.cache, clock=clock, rng=random.Random(seed)
        )

    def register(self, spiffe_id: str, **fields) -> Entry:  # type: ignore[no-untyped-def]
        return self.admin.create_entry(
            EntrySpec(spiffe_id=spiffe_id, parent_id="", selectors=("unix:uid:1000",), **fields)
        )

    def serials(self) -> list[int]:
        return [s.leaf.serial_number for s in self.cache.view(ME).svids]

    def sync(self) -> None:
        asyncio.run(self.agent.sync())


@pytest.fixture
def setup(make_ca, clock, db) -> Setup:  # type: ignore[no-untyped-def]
    return Setup(make_ca(clock), db, clock)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ttl", [10, 100, 3600])
def test_svid_is_renewed_at_half_its_lifetime_with_jitter(
    make_ca, clock, db, seed: int, ttl: int
) -> None:  # type: ignore[no-untyped-def]
    s = Setup(make_ca(clock), db, clock, seed=seed)
    s.register("spiffe://example.org/web", x509_svid_ttl=ttl)
    s.sync()
    first = s.serials()
    assert len(first) == 1
    clock.advance(timedelta(seconds=ttl * 0.44))  # before half - 10 %
    s.sync()
    assert s.serials() == first
    assert s.backend.signed == 1
    clock.advance(timedelta(seconds=ttl * 0.12))  # past half + 10 %
    s.sync()
    assert s.serials() != first
    assert s.backend.signed == 2


def test_changed_entry_is_signed_again_at_once_and_deleted_entry_dropped(setup: Setup) -> None:
    entry = setup.register("spiffe://example.org/web")
    setup.sync()
    first = setup.serials()
    setup.admin.update_entry(entry.id, {"dns_names": ("web.local",)})
    setup.sync()
    assert setup.serials() != first
    svid = setup.cache.view(ME).svids[0]
    assert svid.leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == ["web.local"]
    setup.admin.delete_entry(entry.id)
    setup.sync()
    assert setup.serials() == []


def test_server_outage_keeps_serving_until_expiry_then_drops(setup: Setup) -> None:
    setup.register("spiffe://example.org/web", x509_svid_ttl=60)
    setup.sync()
    first = setup.serials()
    setup.backend.down = True
    setup.clock.advance(timedelta(seconds=40))  # renewal due, server down
    delays = [asyncio.run(setup.agent.tick()) for _ in range(3)]
    assert delays == sorted(delays)
    assert delays[-1] > delays[0]  # backs off
    assert setup.serials() == first  # still served: not expired yet
    setup.clock.advance(timedelta(seconds=25))  # now past NotAfter
    asyncio.run(setup.agent.tick())
    assert setup.serials() == []  # never hand out an expired SVID
    setup.backend.down = False
    asyncio.run(setup.agent.tick())
    assert len(setup.serials()) == 1


def test_prepared_ca_reaches_the_cache_before_any_svid_chains_to_it(setup: Setup) -> None:
    setup.register("spiffe://example.org/web")
    setup.sync()
    active = setup.ca.active
    assert active is not None
    setup.clock.now = active.prepare_at
    setup.ca.rotate(setup.clock())
    setup.sync()
    view = setup.cache.view(ME)
    prepared = [s for s in setup.ca.slots if s.state.value == "prepared"]
    assert len(prepared) == 1
    assert prepared[0].certificate in view.bundle.x509_authorities
    # The workload's SVID still chains to the active CA, which is in the bundle too.
    assert view.svids[0].chain[1] == active.certificate
    assert active.certificate in view.bundle.x509_authorities

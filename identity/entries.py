"""Registration entries: which SPIFFE ID a workload with given selectors receives."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from spiffe import SpiffeId, TrustDomain

from identity.errors import InvalidInputError, InvalidTTLError
from identity.selectors import Selector
from identity.spiffeid import parse_spiffe_id, require_member

__all__ = [
    "JWT_TTL_RANGE",
    "RESERVED_DNS_NAME",
    "X509_TTL_RANGE",
    "Entry",
    "EntrySpec",
    "ValidEntry",
    "check_ttl",
]

X509_TTL_RANGE = (timedelta(seconds=1), timedelta(days=30))
JWT_TTL_RANGE = (timedelta(seconds=1), timedelta(days=1))

_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_MAX_HINT = 256


@dataclass(slots=True, frozen=True)
class EntrySpec:
    """What a caller asks for; validated against the trust domain by :meth:`validate`."""

    spiffe_id: str
    parent_id: str
    selectors: tuple[str, ...]
    x509_svid_ttl: int | None = None
    jwt_svid_ttl: int | None = None
    dns_names: tuple[str, ...] = ()
    hint: str = ""
    admin: bool = False
    expires_at: datetime | None = None

    def validate(self, trust_domain: TrustDomain, *, now: datetime) -> ValidEntry:
        spiffe_id = parse_spiffe_id(self.spiffe_id, field="spiffe_id")
        require_member(spiffe_id, trust_domain, field="spiffe_id")
        parent_id = parse_spiffe_id(self.parent_id, field="parent_id")
        if parent_id.trust_domain != trust_domain:
            raise InvalidInputError(
                f"{parent_id} is not in trust domain {trust_domain.name}", field="parent_id"
            )
        if not self.selectors:
            raise InvalidInputError(
                "at least one selector is required, e.g. unix:uid:1000", field="selectors"
            )
        selectors = tuple(
            sorted(
                {Selector.parse(s, field=f"selectors[{i}]") for i, s in enumerate(self.selectors)}
            )
        )
        for name, ttl, bounds in (
            ("x509_svid_ttl", self.x509_svid_ttl, X509_TTL_RANGE),
            ("jwt_svid_ttl", self.jwt_svid_ttl, JWT_TTL_RANGE),
        ):
            if ttl is not None:
                check_ttl(ttl, bounds, field=name)
        dns = tuple(
            check_dns_name(n, field=f"dns_names[{i}]") for i, n in enumerate(self.dns_names)
        )
        if len(self.hint) > _MAX_HINT or any(ord(c) < 32 for c in self.hint):
            raise InvalidInputError(
                f"hint must be at most {_MAX_HINT} printable characters", field="hint"
            )
        if self.expires_at is not None:
            if self.expires_at.tzinfo is None:
                raise InvalidInputError(
                    "expires_at needs a timezone, e.g. 2027-01-01T00:00:00Z", field="expires_at"
                )
            if self.expires_at <= now:
                raise InvalidInputError("expires_at is in the past", field="expires_at")
        return ValidEntry(
            spiffe_id=spiffe_id,
            parent_id=parent_id,
            selectors=selectors,
            x509_svid_ttl=self.x509_svid_ttl,
            jwt_svid_ttl=self.jwt_svid_ttl,
            dns_names=dns,
            hint=self.hint,
            admin=self.admin,
            expires_at=self.expires_at,
        )


@dataclass(slots=True, frozen=True)
class ValidEntry:
    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]
    x509_svid_ttl: int | None
    jwt_svid_ttl: int | None
    dns_names: tuple[str, ...]
    hint: str
    admin: bool
    expires_at: datetime | None


@dataclass(slots=True, frozen=True)
class Entry:
    """A stored registration entry."""

    id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[Selector, ...]
    x509_svid_ttl: int | None
    jwt_svid_ttl: int | None
    dns_names: tuple[str, ...]
    hint: str
    admin: bool
    expires_at: datetime | None
    revision: int
    created_at: datetime
    updated_at: datetime

    def matches(self, present: Iterable[Selector]) -> bool:
        return set(self.selectors) <= set(present)


def check_ttl(seconds: float, bounds: tuple[timedelta, timedelta], *, field: str) -> timedelta:
    """Range-check a TTL given in seconds before it becomes a timedelta (which could overflow)."""
    low, high = bounds
    if not low.total_seconds() <= seconds <= high.total_seconds():
        raise InvalidTTLError(
            f"{seconds:g}s is out of range; use between "
            f"{int(low.total_seconds())}s and {int(high.total_seconds())}s",
            field=field,
        )
    return timedelta(seconds=seconds)


# The DNS SAN agents pin on the server's own certificate (identity.server_tls): no
# workload may be given it.
RESERVED_DNS_NAME = "meshward-server"


def check_dns_name(name: str, *, field: str) -> str:
    lowered = name.lower().rstrip(".")
    if lowered == RESERVED_DNS_NAME:
        raise InvalidInputError(
            f"{name!r} is reserved for the meshward server's own certificate", field=field
        )
    labels = lowered.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if not labels or len(lowered) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise InvalidInputError(f"{name!r} is not a valid DNS name", field=field)
    return lowered

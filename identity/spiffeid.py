"""SPIFFE ID and trust domain parsing, delegated to py-spiffe so we follow the spec exactly."""

from __future__ import annotations

from spiffe import SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

from identity.errors import InvalidSpiffeIdError

__all__ = ["parse_spiffe_id", "parse_trust_domain", "require_member"]


def parse_spiffe_id(value: str, *, field: str = "spiffe_id") -> SpiffeId:
    """Parse ``value`` per the SPIFFE ID spec; the error names ``field``."""
    try:
        parsed = SpiffeId(value)
    except PySpiffeError as exc:
        raise InvalidSpiffeIdError(
            f"{value!r} is not a valid SPIFFE ID ({_detail(exc)}); "
            "expected spiffe://<trust-domain>/<path>",
            field=field,
        ) from exc
    if str(parsed) != value:
        # py-spiffe lowercases the scheme and trust domain; the spec forbids uppercase there.
        raise InvalidSpiffeIdError(
            f"{value!r} is not a valid SPIFFE ID (the scheme and trust domain must be "
            f"lowercase); did you mean {parsed}?",
            field=field,
        )
    return parsed


def parse_trust_domain(value: str, *, field: str = "trust_domain") -> TrustDomain:
    hint = "use lowercase letters, digits, '.', '-' and '_', e.g. example.org"
    try:
        td = TrustDomain(value)
    except PySpiffeError as exc:
        raise InvalidSpiffeIdError(
            f"{value!r} is not a valid trust domain ({_detail(exc)}); {hint}", field=field
        ) from exc
    if td.name != value.removeprefix("spiffe://"):
        raise InvalidSpiffeIdError(f"{value!r} is not a valid trust domain; {hint}", field=field)
    return td


def require_member(spiffe_id: SpiffeId, trust_domain: TrustDomain, *, field: str) -> None:
    """Workload SVIDs are only issued inside our trust domain and never for the bare domain."""
    if spiffe_id.trust_domain != trust_domain:
        raise InvalidSpiffeIdError(
            f"{spiffe_id} is not in trust domain {trust_domain.name}", field=field
        )
    if not spiffe_id.path:
        raise InvalidSpiffeIdError(
            f"{spiffe_id} has no path; workload SPIFFE IDs need one, "
            f"e.g. {trust_domain.as_spiffe_id()}/ns/default/sa/web",
            field=field,
        )


def _detail(exc: PySpiffeError) -> str:
    # py-spiffe prefixes the reason with the input, which the caller already quotes.
    return str(exc).rsplit(": ", 1)[-1].rstrip(".")

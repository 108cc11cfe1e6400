"""Administrative operations of the identity server: entries, join tokens, minting, CA control.

Each operation validates fully before it writes, so bad input never changes what is stored.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from spiffe import SpiffeId

from identity.authority import CertificateAuthority, JwtSvidIssue, X509SvidIssue
from identity.entries import (
    JWT_TTL_RANGE,
    X509_TTL_RANGE,
    Entry,
    EntrySpec,
    check_dns_name,
    check_ttl,
)
from identity.errors import InvalidInputError
from identity.selectors import Selector
from identity.spiffeid import parse_spiffe_id, require_member
from identity.store import entries as entry_rows
from identity.store.database import Database
from identity.store.tokens import JoinToken, create_token
from identity.x509certs import public_key_from_csr

__all__ = ["TOKEN_TTL_RANGE", "IdentityAdmin", "IssuedToken"]

TOKEN_TTL_RANGE = (timedelta(seconds=1), timedelta(days=7))
_UPDATABLE = frozenset(EntrySpec.__dataclass_fields__)


@dataclass(slots=True, frozen=True)
class IssuedToken:
    token: str  # the secret; shown once, only its digest is stored
    id: str
    expires_at: datetime


class IdentityAdmin:
    def __init__(
        self,
        *,
        db: Database,
        ca: CertificateAuthority,
        default_parent_id: str,
        clock: Callable[[], datetime],
    ) -> None:
        self.db = db
        self.ca = ca
        self.default_parent_id = default_parent_id
        self.clock = clock

    # -- entries ---------------------------------------------------------------------

    def create_entry(self, spec: EntrySpec) -> Entry:
        if not spec.parent_id:
            spec = replace(spec, parent_id=self.default_parent_id)
        now = self.clock()
        valid = spec.validate(self.ca.trust_domain, now=now)
        with self.db.transaction() as session:
            return entry_rows.create_entry(session, entry=valid, now=now)

    def update_entry(self, entry_id: str, changes: dict[str, Any]) -> Entry:
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise InvalidInputError(f"cannot update {', '.join(sorted(unknown))}", field="changes")
        now = self.clock()
        with self.db.transaction() as session:
            current = entry_rows.get_entry(session, entry_id=entry_id)
            spec = EntrySpec(
                spiffe_id=current.spiffe_id,
                parent_id=current.parent_id,
                selectors=tuple(str(s) for s in current.selectors),
                x509_svid_ttl=current.x509_svid_ttl,
                jwt_svid_ttl=current.jwt_svid_ttl,
                dns_names=current.dns_names,
                hint=current.hint,
                admin=current.admin,
                expires_at=current.expires_at,
            )
            valid = replace(spec, **changes).validate(self.ca.trust_domain, now=now)
            return entry_rows.update_entry(session, entry_id=entry_id, entry=valid, now=now)

    def delete_entry(self, entry_id: str) -> Entry:
        with self.db.transaction() as session:
            return entry_rows.delete_entry(session, entry_id=entry_id)

    def get_entry(self, entry_id: str) -> Entry:
        with self.db.transaction() as session:
            return entry_rows.get_entry(session, entry_id=entry_id)

    def list_entries(
        self,
        *,
        spiffe_id: str | None = None,
        parent_id: str | None = None,
        selector: str | None = None,
    ) -> list[Entry]:
        parsed = Selector.parse(selector, field="selector") if selector else None
        with self.db.transaction() as session:
            return entry_rows.list_entries(
                session, spiffe_id=spiffe_id, parent_id=parent_id, selector=parsed
            )

    def count_entries(self) -> int:
        with self.db.transaction() as session:
            return entry_rows.count_entries(session)

    # -- join tokens -----------------------------------------------------------------

    def generate_token(self, ttl_seconds: int) -> IssuedToken:
        ttl = check_ttl(ttl_seconds, TOKEN_TTL_RANGE, field="ttl")
        now = self.clock()
        secret = secrets.token_urlsafe(32)
        with self.db.transaction() as session:
            stored: JoinToken = create_token(
                session, token_id=str(uuid.uuid4()), token=secret, expires_at=now + ttl, now=now
            )
        return IssuedToken(token=secret, id=stored.id, expires_at=stored.expires_at)

    # -- minting ---------------------------------------------------------------------

    def mint_x509_svid(
        self,
        *,
        csr: bytes,
        spiffe_id: str,
        ttl_seconds: int | None,
        dns_names: tuple[str, ...],
        issued_to: str,
    ) -> X509SvidIssue:
        parsed = self._member(spiffe_id)
        ttl = None if ttl_seconds is None else check_ttl(ttl_seconds, X509_TTL_RANGE, field="ttl")
        dns = tuple(check_dns_name(n, field=f"dns_names[{i}]") for i, n in enumerate(dns_names))
        public_key = public_key_from_csr(csr)
        return self.ca.sign_x509_svid(
            public_key=public_key,
            spiffe_id=parsed,
            dns_names=dns,
            ttl=ttl,
            issued_to=issued_to,
            now=self.clock(),
        )

    def mint_jwt_svid(
        self, *, spiffe_id: str, audience: tuple[str, ...], ttl_seconds: int | None
    ) -> JwtSvidIssue:
        parsed = self._member(spiffe_id)
        ttl = None if ttl_seconds is None else check_ttl(ttl_seconds, JWT_TTL_RANGE, field="ttl")
        return self.ca.sign_jwt_svid(spiffe_id=parsed, audience=audience, ttl=ttl, now=self.clock())

    def rotate_ca(self) -> list[str]:
        return self.ca.rotate(self.clock(), force=True)

    def _member(self, spiffe_id: str) -> SpiffeId:
        parsed = parse_spiffe_id(spiffe_id, field="spiffe_id")
        require_member(parsed, self.ca.trust_domain, field="spiffe_id")
        return parsed

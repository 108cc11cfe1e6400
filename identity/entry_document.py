"""A registration entry as a JSON document: the admin API's read model and the node API's."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from identity.entries import Entry
from identity.selectors import Selector

__all__ = ["EntryDocument"]


class EntryDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    spiffe_id: str
    parent_id: str
    selectors: list[str]
    x509_svid_ttl: int | None
    jwt_svid_ttl: int | None
    dns_names: list[str]
    hint: str
    admin: bool
    expires_at: datetime | None
    revision: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, entry: Entry) -> EntryDocument:
        return cls(
            id=entry.id,
            spiffe_id=entry.spiffe_id,
            parent_id=entry.parent_id,
            selectors=[str(s) for s in entry.selectors],
            x509_svid_ttl=entry.x509_svid_ttl,
            jwt_svid_ttl=entry.jwt_svid_ttl,
            dns_names=list(entry.dns_names),
            hint=entry.hint,
            admin=entry.admin,
            expires_at=entry.expires_at,
            revision=entry.revision,
            created_at=entry.created_at,
            updated_at=entry.updated_at,
        )

    def to_entry(self) -> Entry:
        return Entry(
            id=self.id,
            spiffe_id=self.spiffe_id,
            parent_id=self.parent_id,
            selectors=tuple(Selector.parse(s) for s in self.selectors),
            x509_svid_ttl=self.x509_svid_ttl,
            jwt_svid_ttl=self.jwt_svid_ttl,
            dns_names=tuple(self.dns_names),
            hint=self.hint,
            admin=self.admin,
            expires_at=self.expires_at,
            revision=self.revision,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )

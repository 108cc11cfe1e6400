"""The admin REST API (FastAPI), served on a private Unix socket.

Read models here are separate from rows and domain values; errors are JSON
``{"error": {"code", "message", "field"}}`` with a 4xx status for bad input.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from identity.admin import IdentityAdmin
from identity.authority import Slot
from identity.entries import EntrySpec
from identity.entry_document import EntryDocument
from identity.errors import (
    CAUnavailableError,
    ConflictError,
    IdentityError,
    InvalidInputError,
    NotFoundError,
    StoreError,
)
from identity.health_api import ReadyCheck, health_router

__all__ = ["create_admin_app", "error_body"]

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EntryIn(_Strict):
    spiffe_id: str
    parent_id: str | None = None
    selectors: list[str]
    x509_svid_ttl: StrictInt | None = Field(default=None, description="seconds")
    jwt_svid_ttl: StrictInt | None = Field(default=None, description="seconds")
    dns_names: list[str] = []
    hint: str = ""
    admin: StrictBool = False
    expires_at: datetime | None = None


class EntryPatch(_Strict):
    """Fields to change; only the TTLs (back to the default) and the expiry can be null."""

    spiffe_id: str | None = None
    parent_id: str | None = None
    selectors: list[str] | None = None
    x509_svid_ttl: StrictInt | None = None
    jwt_svid_ttl: StrictInt | None = None
    dns_names: list[str] | None = None
    hint: str | None = None
    admin: StrictBool | None = None
    expires_at: datetime | None = None


class TokenIn(_Strict):
    ttl: StrictInt = Field(default=600, description="seconds")


class TokenOut(BaseModel):
    token: str
    id: str
    expires_at: datetime


class X509MintIn(_Strict):
    spiffe_id: str
    csr: str = Field(description="PEM PKCS#10 request signed by the workload's own key")
    ttl: StrictInt | None = Field(default=None, description="seconds")
    dns_names: list[str] = []


class X509MintOut(BaseModel):
    spiffe_id: str
    serial: str
    expires_at: datetime
    capped: bool
    svid_pem: str  # leaf first, then intermediates
    bundle_pem: str


class JwtMintIn(_Strict):
    spiffe_id: str
    audience: list[str]
    ttl: StrictInt | None = Field(default=None, description="seconds")


class JwtMintOut(BaseModel):
    token: str
    spiffe_id: str
    audience: list[str]
    expires_at: datetime
    key_id: str
    capped: bool


class SlotOut(BaseModel):
    id: str
    state: str
    key_type: str
    subject: str
    serial: str
    not_before: datetime
    not_after: datetime
    prepare_at: datetime
    activate_at: datetime
    jwt_key_id: str
    can_sign: bool

    @classmethod
    def of(cls, slot: Slot) -> SlotOut:
        return cls(
            id=slot.id,
            state=slot.state.value,
            key_type=slot.key_type.value,
            subject=slot.certificate.subject.rfc4514_string(),
            serial=f"{slot.certificate.serial_number:x}",
            not_before=slot.not_before,
            not_after=slot.not_after,
            prepare_at=slot.prepare_at,
            activate_at=slot.activate_at,
            jwt_key_id=slot.jwt.key_id,
            can_sign=slot.issuer is not None,
        )


class CAOut(BaseModel):
    trust_domain: str
    upstream: bool
    bundle_sequence: int
    slots: list[SlotOut]


class RotateOut(BaseModel):
    events: list[str]
    ca: CAOut


_NULLABLE = frozenset({"x509_svid_ttl", "jwt_svid_ttl", "expires_at"})

_STATUS: tuple[tuple[type[IdentityError], int], ...] = (
    (InvalidInputError, 400),
    (NotFoundError, 404),
    (ConflictError, 409),
    (CAUnavailableError, 503),
    (StoreError, 503),
)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def create_admin_app(admin: IdentityAdmin, *, registry: Any, ready: ReadyCheck) -> FastAPI:
    app = FastAPI(title="meshward admin API", version="1")
    app.include_router(health_router(registry, ready))

    @app.exception_handler(IdentityError)
    def identity_error(_request: Request, exc: IdentityError) -> JSONResponse:
        status = next((s for t, s in _STATUS if isinstance(exc, t)), 500)
        if status >= 500:
            log.error("admin: %s", exc)
        return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=status)

    @app.exception_handler(RequestValidationError)
    def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or None
        return JSONResponse(
            error_body("invalid_argument", str(first.get("msg", "invalid request")), field),
            status_code=400,
        )

    def ca_out() -> CAOut:
        ca = admin.ca
        return CAOut(
            trust_domain=ca.trust_domain.name,
            upstream=ca.upstream is not None,
            bundle_sequence=ca.bundle.sequence,
            slots=[SlotOut.of(s) for s in ca.slots],
        )

    @app.post("/v1/entries", status_code=201)
    def create_entry(body: EntryIn) -> EntryDocument:
        spec = EntrySpec(
            spiffe_id=body.spiffe_id,
            parent_id=body.parent_id or "",
            selectors=tuple(body.selectors),
            x509_svid_ttl=body.x509_svid_ttl,
            jwt_svid_ttl=body.jwt_svid_ttl,
            dns_names=tuple(body.dns_names),
            hint=body.hint,
            admin=body.admin,
            expires_at=body.expires_at,
        )
        return EntryDocument.of(admin.create_entry(spec))

    @app.get("/v1/entries")
    def list_entries(
        spiffe_id: str | None = None,
        parent_id: str | None = None,
        selector: str | None = None,
    ) -> list[EntryDocument]:
        entries = admin.list_entries(spiffe_id=spiffe_id, parent_id=parent_id, selector=selector)
        return [EntryDocument.of(e) for e in entries]

    @app.get("/v1/entries/{entry_id}")
    def show_entry(entry_id: str) -> EntryDocument:
        return EntryDocument.of(admin.get_entry(entry_id))

    @app.patch("/v1/entries/{entry_id}")
    def update_entry(entry_id: str, body: EntryPatch) -> EntryDocument:
        changes: dict[str, Any] = {}
        for name in body.model_fields_set:
            value = getattr(body, name)
            if value is None and name not in _NULLABLE:
                raise InvalidInputError("may not be null; leave it out to keep it", field=name)
            changes[name] = tuple(value) if isinstance(value, list) else value
        if not changes:
            raise InvalidInputError("nothing to update; give at least one field", field="body")
        return EntryDocument.of(admin.update_entry(entry_id, changes))

    @app.delete("/v1/entries/{entry_id}")
    def delete_entry(entry_id: str) -> EntryDocument:
        return EntryDocument.of(admin.delete_entry(entry_id))

    @app.post("/v1/join-tokens", status_code=201)
    def generate_token(body: TokenIn) -> TokenOut:
        issued = admin.generate_token(body.ttl)
        return TokenOut(token=issued.token, id=issued.id, expires_at=issued.expires_at)

    @app.post("/v1/svids/x509", status_code=201)
    def mint_x509(body: X509MintIn) -> X509MintOut:
        issued = admin.mint_x509_svid(
            csr=body.csr.encode(),
            spiffe_id=body.spiffe_id,
            ttl_seconds=body.ttl,
            dns_names=tuple(body.dns_names),
            issued_to="admin-api",
        )
        pem = serialization.Encoding.PEM
        return X509MintOut(
            spiffe_id=str(issued.spiffe_id),
            serial=f"{issued.certificate.serial_number:x}",
            expires_at=issued.certificate.not_valid_after_utc,
            capped=issued.capped,
            svid_pem="".join(c.public_bytes(pem).decode() for c in issued.chain),
            bundle_pem=admin.ca.bundle.pem().decode(),
        )

    @app.post("/v1/svids/jwt", status_code=201)
    def mint_jwt(body: JwtMintIn) -> JwtMintOut:
        issued = admin.mint_jwt_svid(
            spiffe_id=body.spiffe_id,
            audience=tuple(body.audience),
            ttl_seconds=body.ttl,
        )
        return JwtMintOut(
            token=issued.token,
            spiffe_id=str(issued.spiffe_id),
            audience=list(issued.audience),
            expires_at=issued.expires_at,
            key_id=issued.key_id,
            capped=issued.capped,
        )

    @app.get(
        "/v1/bundle",
        response_model=None,
        responses={
            200: {
                "description": "The trust bundle: a JWKS (format=jwks) or PEM (format=pem)",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "application/x-pem-file": {"schema": {"type": "string"}},
                },
            }
        },
    )
    def bundle(
        format: Annotated[Literal["pem", "jwks"], Query()] = "jwks",
    ) -> PlainTextResponse | dict[str, Any]:
        current = admin.ca.bundle
        if format == "pem":
            return PlainTextResponse(current.pem().decode(), media_type="application/x-pem-file")
        return current.jwks()

    @app.get("/v1/ca")
    def show_ca() -> CAOut:
        return ca_out()

    @app.post("/v1/ca/rotate")
    def rotate_ca() -> RotateOut:
        return RotateOut(events=admin.rotate_ca(), ca=ca_out())

    return app

"""Messages of the node API (agent ↔ server), carried as JSON over gRPC.

The node API is private to meshward (SPIRE's is too); JSON keeps it readable in a
capture and free of a protoc step, while gRPC still gives HTTP/2 streams, deadlines and
mTLS. Each message is a pydantic model; unknown fields are refused so a version skew
is an error, not a silent misread.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from identity.entry_document import EntryDocument

__all__ = [
    "SERVICE",
    "AttestJoinTokenRequest",
    "AttestResponse",
    "JwtSvidRequest",
    "JwtSvidResponse",
    "RenewRequest",
    "SignRequest",
    "SignResponse",
    "SyncRequest",
    "SyncUpdate",
    "X509PopChallenge",
    "X509PopRequest",
    "decoder",
    "encode",
]

SERVICE = "meshward.node.v1.Node"
M = TypeVar("M", bound=BaseModel)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttestJoinTokenRequest(_Message):
    token: str
    csr_pem: str


class X509PopRequest(_Message):
    """First the chain (leaf first); after the challenge, the signature and the CSR."""

    certificate_chain_pem: str | None = None
    signature_b64: str | None = None
    csr_pem: str | None = None


class X509PopChallenge(_Message):
    nonce_b64: str


class AttestResponse(_Message):
    agent_id: str
    svid_pem: str  # leaf first, then intermediates
    bundle_pem: str


class RenewRequest(_Message):
    csr_pem: str


class SyncRequest(_Message):
    pass


class SyncUpdate(_Message):
    """What changed since the previous update on this stream (the first one has everything)."""

    revision: int
    upserted: list[EntryDocument]
    deleted: list[str]
    bundle_sequence: int
    bundle_pem: str | None  # only when the bundle changed
    jwt_keys: list[dict[str, Any]] | None  # JWKS keys, only when the bundle changed


class SignRequest(_Message):
    entry_ids: list[str]
    csrs_pem: list[str]


class SignResponse(_Message):
    svids_pem: list[str]


class JwtSvidRequest(_Message):
    spiffe_id: str
    audience: list[str]


class JwtSvidResponse(_Message):
    token: str


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def decoder(model: type[M]) -> Any:
    """A gRPC deserializer; a malformed message raises ValueError naming the problem."""

    def decode(data: bytes) -> M:
        try:
            return model.model_validate_json(data)
        except ValidationError as exc:
            raise ValueError(f"malformed {model.__name__}: {exc.errors()[0]['msg']}") from exc

    return decode

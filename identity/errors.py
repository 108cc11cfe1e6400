"""Errors raised by the identity package.

Every error carries a message that names what the caller must fix, and, where it
applies, the ``field`` it is about, so the admin API and the CLI can show it as is::

    IdentityError
    ├── InvalidInputError          bad value supplied by a caller (4xx)
    │   ├── InvalidSpiffeIdError
    │   ├── InvalidSelectorError
    │   ├── InvalidTTLError
    │   └── InvalidCSRError
    ├── NotFoundError              no such entry / token
    ├── ConflictError              the change would duplicate something stored
    ├── AttestationError           the caller's process could not be identified
    ├── UpstreamAuthorityError     upstream CA files unusable
    ├── CAUnavailableError         no usable signing authority
    └── StoreError                 database unreachable or failing
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "CAUnavailableError",
    "ConflictError",
    "IdentityError",
    "InvalidCSRError",
    "InvalidInputError",
    "InvalidSelectorError",
    "InvalidSpiffeIdError",
    "InvalidTTLError",
    "NotFoundError",
    "StoreError",
    "UpstreamAuthorityError",
]


class IdentityError(Exception):
    """Root of every error the identity package raises on purpose."""

    code = "identity_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field


class InvalidInputError(IdentityError):
    code = "invalid_argument"


class InvalidSpiffeIdError(InvalidInputError):
    code = "invalid_spiffe_id"


class InvalidSelectorError(InvalidInputError):
    code = "invalid_selector"


class InvalidTTLError(InvalidInputError):
    code = "invalid_ttl"


class InvalidCSRError(InvalidInputError):
    code = "invalid_csr"


class NotFoundError(IdentityError):
    code = "not_found"


class ConflictError(IdentityError):
    code = "conflict"


class AttestationError(IdentityError):
    code = "attestation_failed"


class UpstreamAuthorityError(IdentityError):
    code = "upstream_authority"


class CAUnavailableError(IdentityError):
    code = "ca_unavailable"


class StoreError(IdentityError):
    code = "store_error"

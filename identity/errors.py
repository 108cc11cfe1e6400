"""Errors raised by the identity package.

Every error carries a message that names what the caller must fix, and, where it
applies, the ``field`` it is about, so the admin API and the CLI can show it as is::

    IdentityError
    ├── InvalidInputError          bad value supplied by a caller (4xx)
    │   ├── InvalidSpiffeIdError
    │   ├── InvalidSelectorError
    │   ├── InvalidTTLError
    │   ├── InvalidCSRError
    │   └── WrongTypeError         an xDS request for a type this service does not serve
    ├── NotFoundError              no such entry / token
    ├── ConflictError              the change would duplicate something stored
    ├── AttestationError           the caller's process could not be identified
    ├── NotEntitledError           SDS resources the caller's attestation does not cover
    ├── ValidatorUnavailableError  a validation context the caller's Envoy cannot take
    ├── ExtensionConfigError       ECDS configs the agent cannot build for an Envoy's workload
    ├── UpstreamAuthorityError     upstream CA files unusable
    ├── CAUnavailableError         no usable signing authority
    └── StoreError                 database unreachable or failing
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AttestationError",
    "CAUnavailableError",
    "ConflictError",
    "ExtensionConfigError",
    "IdentityError",
    "InvalidCSRError",
    "InvalidInputError",
    "InvalidSelectorError",
    "InvalidSpiffeIdError",
    "InvalidTTLError",
    "NotEntitledError",
    "NotFoundError",
    "StoreError",
    "UpstreamAuthorityError",
    "ValidatorUnavailableError",
    "WrongTypeError",
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


class NotEntitledError(IdentityError):
    """The caller asked for SDS resources its attestation does not entitle it to."""

    code = "sds_not_entitled"

    def __init__(self, names: Sequence[str], *, allowed: str) -> None:
        self.names = tuple(sorted(names))
        super().__init__(
            "the caller is not entitled to the SDS resource(s) "
            + ", ".join(repr(n) for n in self.names)
            + f"; it may ask for {allowed}"
        )


class ValidatorUnavailableError(IdentityError):
    code = "sds_validator_unavailable"


class ExtensionConfigError(IdentityError):
    """The extension configs an Envoy asks for cannot be built now (no policy directory,
    no policy set loaded, a policy its workload's filters cannot express); the message
    says what to fix. The Envoy keeps what it has."""

    code = "ecds_unavailable"


class WrongTypeError(InvalidInputError):
    """The request is for another resource type than this service serves."""

    code = "wrong_type_url"


class UpstreamAuthorityError(IdentityError):
    code = "upstream_authority"


class CAUnavailableError(IdentityError):
    code = "ca_unavailable"


class StoreError(IdentityError):
    code = "store_error"

"""What of a request the audit trail must never keep, and the keyed hash kept instead.

Header values of ``authorization``, ``cookie``, ``set-cookie`` and
``proxy-authorization`` are never stored, nor those of configured headers, nor any
header or query value that looks like a JWT (``eyJ…``\\ ``.``\\ ``…``\\ ``.``), nor
the values of configured query parameters. In their place the record keeps
``redacted:<hash>``: a BLAKE2b MAC under a key of this data dir, so that equal values
can be grouped ("the same token made these 40 requests") without the value being
recoverable. Bodies are left out unless ``audit.store_body`` is set, and then cut to
``audit.max_body_bytes``.

The key is 32 random bytes in ``<data-dir>/audit/redaction.key`` (0600), made on first
use; it never leaves the process that redacts.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote_plus

from audit.errors import AuditError

__all__ = [
    "ALWAYS_REDACTED_HEADERS",
    "DEFAULT_REDACTED_QUERY_PARAMETERS",
    "REDACTED_PREFIX",
    "Redaction",
    "load_key",
]

ALWAYS_REDACTED_HEADERS = frozenset(
    {"authorization", "cookie", "set-cookie", "proxy-authorization"}
)
DEFAULT_REDACTED_QUERY_PARAMETERS = (
    "access_token",
    "id_token",
    "refresh_token",
    "token",
    "api_key",
    "apikey",
    "code",
    "client_secret",
    "password",
)
REDACTED_PREFIX = "redacted:"
# Three base64url segments, the first two JSON objects: a JWS compact JWT (the third,
# the signature, may be empty for alg none).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_KEY_BYTES = 32


@dataclass(slots=True, frozen=True)
class Redaction:
    """The redaction rules of one process; ``mark`` hashes a value under ``key``."""

    key: bytes
    headers: frozenset[str] = ALWAYS_REDACTED_HEADERS
    query_parameters: frozenset[str] = frozenset(DEFAULT_REDACTED_QUERY_PARAMETERS)
    store_body: bool = False
    max_body_bytes: int = 1024
    # Whether a (lowercased) query may hold something to redact: one regex search says
    # no for most queries before any parsing. An encoded name (with %) is always parsed.
    _suspect: re.Pattern[str] = field(init=False, repr=False, compare=False)
    # The MAC set up with the key once; ``mark`` hashes into a copy of it: the same hash
    # as blake2b(value, key=key, digest_size=12) (marks of earlier records still match)
    # for two thirds of its cost, most of which was the constructor's parameter parsing.
    _keyed: hashlib.blake2b = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        words = sorted(self.query_parameters, key=len, reverse=True)
        pattern = "|".join(["%", "eyj", *(re.escape(w) for w in words)])
        object.__setattr__(self, "_suspect", re.compile(pattern))
        object.__setattr__(self, "_keyed", hashlib.blake2b(key=self.key, digest_size=12))

    @classmethod
    def build(
        cls,
        key: bytes,
        *,
        headers: Iterable[str] = (),
        query_parameters: Iterable[str] = DEFAULT_REDACTED_QUERY_PARAMETERS,
        store_body: bool = False,
        max_body_bytes: int = 1024,
    ) -> Redaction:
        return cls(
            key=key,
            headers=ALWAYS_REDACTED_HEADERS | {h.lower() for h in headers},
            query_parameters=frozenset(q.lower() for q in query_parameters),
            store_body=store_body,
            max_body_bytes=max_body_bytes,
        )

    def mark(self, value: str | bytes) -> str:
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        mac = self._keyed.copy()
        mac.update(raw)
        return REDACTED_PREFIX + mac.hexdigest()

    def header_is_secret(self, name: str, value: str) -> bool:
        """True when the value of header ``name`` (lowercase) must not be stored."""
        return name in self.headers or _looks_like_jwt(value)

    def named_secret_headers(self, headers: Mapping[str, str]) -> set[str]:
        """The names (lowercase) among ``headers`` that are secret by name; a value that
        looks like a JWT is secret under any name (:meth:`secret_headers`)."""
        return headers.keys() & self.headers

    def secret_headers(self, headers: Mapping[str, str]) -> set[str]:
        """The names (lowercase) among ``headers`` whose values must not be stored."""
        secret = headers.keys() & self.headers
        for name, value in headers.items():
            # Inlined header_is_secret: this runs for every header of every request.
            if "eyJ" in value and name not in secret and _JWT.search(value) is not None:
                secret.add(name)
        return secret

    def path(self, path: str) -> tuple[str, tuple[str, ...]]:
        """``path`` with secret query values replaced, and ``query:NAME`` for each one."""
        base, sep, query = path.partition("?")
        if not sep:
            return path, ()
        if self._suspect.search(query.lower()) is None:
            return path, ()
        query, hash_sep, fragment = query.partition("#")
        parts = []
        redacted: list[str] = []
        for part in query.split("&"):
            name, eq, value = part.partition("=")
            plain_name, plain_value = unquote_plus(name).lower(), unquote_plus(value)
            if value and (plain_name in self.query_parameters or _looks_like_jwt(plain_value)):
                part = f"{name}={quote(self.mark(plain_value))}"
                redacted.append(f"query:{plain_name}")
            elif not eq and _looks_like_jwt(unquote_plus(name)):
                part = quote(self.mark(unquote_plus(name)))  # a bare ?<token>
                redacted.append("query:")
            parts.append(part)
        if not redacted:
            return path, ()
        return base + "?" + "&".join(parts) + hash_sep + fragment, tuple(dict.fromkeys(redacted))

    def body(self, body: bytes) -> bytes | None:
        """What is kept of a request body: None (the default), or its first bytes."""
        if not self.store_body:
            return None
        return body[: self.max_body_bytes]


def _looks_like_jwt(value: str) -> bool:
    # The substring test first: it is most of the cost for the headers that are not.
    return "eyJ" in value and _JWT.search(value) is not None


def load_key(path: Path) -> bytes:
    """The redaction key at ``path``, made (0600, in a 0700 directory) if missing."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        raw = secrets.token_bytes(_KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_key(path)  # another process made it first
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        return raw
    except OSError as exc:
        raise AuditError(f"cannot read the redaction key {path}: {exc.strerror or exc}") from exc
    if len(raw) != _KEY_BYTES:
        raise AuditError(
            f"{path} is not a redaction key ({len(raw)} bytes, expected {_KEY_BYTES}); "
            "remove it and a new one is made (hashes of earlier records stop matching new ones)"
        )
    return raw

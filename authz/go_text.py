"""Bytes and URL escapes read the way Go reads them.

OPA-Envoy is written in Go, where a string may hold any bytes; ours hold text. Bytes
that are not UTF-8 become U+FFFD, one per byte, which is what OPA-Envoy's JSON output
(decision logs, the REST API) shows for them. ``%`` escapes follow ``net/url``.
"""

from __future__ import annotations

import codecs
import re
from urllib.parse import unquote_to_bytes

__all__ = ["decode_utf8", "url_unescape"]


def _go_replace(exc: UnicodeError) -> tuple[str, int]:
    # Go replaces every byte of an invalid sequence with its own U+FFFD (utf8.DecodeRune
    # returns width 1), where Python's "replace" writes one per maximal subpart.
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "\ufffd" * (exc.end - exc.start), exc.end


_GO_REPLACE = "meshward-go-replace"
codecs.register_error(_GO_REPLACE, _go_replace)


def decode_utf8(data: bytes) -> str:
    """``data`` as text, each byte of an invalid UTF-8 sequence replaced by U+FFFD."""
    return data.decode("utf-8", _GO_REPLACE)


_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def url_unescape(data: bytes, *, plus: bool) -> bytes:
    """Go's url.PathUnescape (``plus=False``) / QueryUnescape (``plus=True``).

    Raises ``ValueError`` on a ``%`` not followed by two hex digits, as Go does.
    """
    if plus and b"+" in data:
        # Before the % escapes are decoded, so "%2B" still gives a literal "+".
        data = data.replace(b"+", b" ")
    if b"%" not in data:
        return data
    bad = _BAD_ESCAPE.search(data)
    if bad is not None:
        escape = decode_utf8(data[bad.start() : bad.start() + 3])
        raise ValueError(f"invalid URL escape {escape!r}")
    return unquote_to_bytes(data)

"""Media types and ``multipart/form-data`` bodies read the way Go reads them.

OPA-Envoy parses a multipart body with Go's ``mime.ParseMediaType`` and
``mime/multipart`` (headers through ``net/textproto``), so a policy sees what those
accept: this is a port of them for bodies held in memory, with their quirks (a
backslash before a non-special character is literal, bare-LF bodies are accepted,
RFC 2231 parameters are decoded, the first value of a repeated part header wins).
It follows Go for the shapes clients send and the failures tested; Go's 4 KiB limit
on a preamble line is not reproduced.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Mapping
from typing import Any

from authz.go_text import decode_utf8, url_unescape
from authz.opa_json import parse_json

__all__ = ["parse_media_type", "read_form"]

_TSPECIALS = '()<>@,;:\\"/[]?='
_TOKEN_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in _TSPECIALS)
_TOKEN = re.compile(f"[{re.escape(_TOKEN_CHARS)}]*")
# unicode.IsSpace; Python's own notion of space also takes \x1c-\x1f.
_GO_SPACE = " \t\n\v\f\r\x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
_GO_SPACE += "\u2028\u2029\u202f\u205f\u3000"


def _consume_token(text: str) -> tuple[str, str]:
    match = _TOKEN.match(text)
    end = match.end() if match else 0
    return text[:end], text[end:]


def _consume_value(text: str) -> tuple[str, str]:
    if not text.startswith('"'):
        return _consume_token(text)
    out: list[str] = []
    i = 1
    while i < len(text):
        char = text[i]
        if char == '"':
            return "".join(out), text[i + 1 :]
        # A backslash escapes only tspecials; before anything else it is literal
        # (MSIE's unescaped "C:\dir\file"), as Go reads it.
        if char == "\\" and i + 1 < len(text) and text[i + 1] in _TSPECIALS:
            out.append(text[i + 1])
            i += 2
            continue
        if char in "\r\n":
            return "", text
        out.append(char)
        i += 1
    return "", text


def _consume_param(text: str) -> tuple[str, str, str]:
    rest = text.lstrip(_GO_SPACE)
    if not rest.startswith(";"):
        return "", "", text
    key, rest = _consume_token(rest[1:].lstrip(_GO_SPACE))
    if not key:
        return "", "", text
    rest = rest.lstrip(_GO_SPACE)
    if not rest.startswith("="):
        return "", "", text
    rest = rest[1:].lstrip(_GO_SPACE)
    value, after = _consume_value(rest)
    if not value and after == rest:
        return "", "", text
    return key.lower(), value, after


def parse_media_type(text: str) -> tuple[str, dict[str, str]]:
    """Go's mime.ParseMediaType: the lowercased type and its parameters (keys lowercased).

    Raises ``ValueError`` with Go's message (``mime: no media type``, …).
    """
    base = text.split(";", 1)[0]
    media_type = base.lower().strip(_GO_SPACE)
    kind, rest = _consume_token(media_type)
    if not kind:
        raise ValueError("mime: no media type")
    if rest:
        if not rest.startswith("/"):
            raise ValueError("mime: expected slash after first token")
        subtype, rest = _consume_token(rest[1:])
        if not subtype:
            raise ValueError("mime: expected token after slash")
        if rest:
            raise ValueError("mime: unexpected content after media subtype")
    params: dict[str, str] = {}
    starred: dict[str, dict[str, str]] = {}
    text = text[len(base) :]
    while True:
        text = text.lstrip(_GO_SPACE)
        if not text:
            break
        key, value, rest = _consume_param(text)
        if not key:
            if rest.strip(_GO_SPACE) == ";":
                break  # a trailing semicolon is allowed
            raise ValueError("mime: invalid media parameter")
        target = params
        if "*" in key:
            target = starred.setdefault(key.split("*", 1)[0], {})
        if key in target and target[key] != value:
            raise ValueError("mime: duplicate parameter name")
        target[key] = value
        text = rest
    for name, pieces in starred.items():
        _join_rfc2231(name, pieces, params)
    return media_type, params


def _join_rfc2231(name: str, pieces: Mapping[str, str], params: dict[str, str]) -> None:
    # RFC 2231: name*=utf-8''%C3%A9, or continuations name*0=…, name*1*=%…
    if f"{name}*" in pieces:
        decoded = _decode_rfc2231(pieces[f"{name}*"])
        if decoded is not None:
            params[name] = decoded
        return
    out: list[str] = []
    valid = False
    index = 0
    while True:
        simple = f"{name}*{index}"
        if simple in pieces:
            valid = True
            out.append(pieces[simple])
        elif f"{simple}*" in pieces:
            valid = True
            encoded = pieces[f"{simple}*"]
            if index == 0:
                out.append(_decode_rfc2231(encoded) or "")
            else:
                try:
                    out.append(decode_utf8(_strict_percent(encoded)))
                except ValueError:
                    out.append("")
        else:
            break
        index += 1
    if valid:
        params[name] = "".join(out)


def _decode_rfc2231(value: str) -> str | None:
    parts = value.split("'", 2)
    if len(parts) != 3 or parts[0].lower() not in ("us-ascii", "utf-8"):
        return None
    try:
        return decode_utf8(_strict_percent(parts[2]))
    except ValueError:
        return None


def _strict_percent(text: str) -> bytes:
    return url_unescape(text.encode(), plus=False)


_HEADER_KEY = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z ]+")
_BAD_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _canonical_key(key: bytes) -> str:
    text = key.decode("ascii")
    if " " in text:
        return text  # Go accepts a space before the colon but then leaves the key as is
    return "-".join(word[:1].upper() + word[1:].lower() for word in text.split("-"))


def read_form(data: bytes, boundary: str) -> dict[str, list[Any]]:
    """The form-data parts of ``data``: ``{name: [values…]}`` in order.

    A part whose own content type contains ``application/json`` gives its JSON value,
    any other its text; parts without a form-data name are skipped. Raises
    ``ValueError`` (``RecursionError`` for JSON nested too deep) where Go fails.
    """
    return _Multipart(data, boundary).form()


class _Multipart:
    """Go's multipart.Reader over a body held in memory, read part by part."""

    def __init__(self, data: bytes, boundary: str) -> None:
        if not boundary:
            raise ValueError("multipart: boundary is empty")
        self.data = data
        self.pos = 0
        self.dash = b"--" + boundary.encode()
        self.dash_dash = self.dash + b"--"
        self.nl = b"\r\n"
        self.parts_read = 0

    def form(self) -> dict[str, list[Any]]:
        values: dict[str, list[Any]] = {}
        while (headers := self._next_part()) is not None:
            body = self._part_body()
            name = self._form_name(headers)
            if not name:
                continue
            encoding = headers.get("Content-Transfer-Encoding", "")
            if encoding.lower() == "quoted-printable":
                body = binascii.a2b_qp(body)
            if "application/json" in headers.get("Content-Type", ""):
                values.setdefault(name, []).append(parse_json(decode_utf8(body)))
            else:
                values.setdefault(name, []).append(decode_utf8(body))
        return values

    def _line(self) -> tuple[bytes, bool]:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            line, self.pos = self.data[self.pos :], len(self.data)
            return line, True
        line, self.pos = self.data[self.pos : end + 1], end + 1
        return line, False

    def _is_final(self, line: bytes) -> bool:
        if not line.startswith(self.dash_dash):
            return False
        rest = line[len(self.dash_dash) :].lstrip(b" \t")
        return not rest or rest == self.nl

    def _is_delimiter(self, line: bytes) -> bool:
        if not line.startswith(self.dash):
            return False
        rest = line[len(self.dash) :].lstrip(b" \t")
        if self.parts_read == 0 and rest == b"\n":
            # Bare-LF bodies: not what RFC 2046 says, but what Go (and clients) accept.
            self.nl = b"\n"
        return rest == self.nl

    def _next_part(self) -> dict[str, str] | None:
        expect_new_part = False
        while True:
            line, at_end = self._line()
            if at_end:
                if self._is_final(line):
                    return None
                raise ValueError("multipart: NextPart: EOF")
            if self._is_delimiter(line):
                self.parts_read += 1
                return self._headers()
            if self._is_final(line):
                return None
            if expect_new_part:
                raise ValueError(f"multipart: expecting a new Part; got line {line!r}")
            if self.parts_read == 0:
                continue  # preamble
            if line == self.nl:
                expect_new_part = True
                continue
            raise ValueError(f"multipart: unexpected line in Next(): {line!r}")

    def _headers(self) -> dict[str, str]:
        # textproto.Reader.ReadMIMEHeader: "Key: value" lines up to a blank line,
        # continuation lines folded in, the first value of each key kept for Get().
        headers: dict[str, str] = {}
        if self.data[self.pos : self.pos + 1] in (b" ", b"\t"):
            raise ValueError("malformed MIME header initial line")
        while True:
            line, at_end = self._line()
            if at_end and not line:
                raise ValueError("multipart: unexpected EOF in part headers")
            line = line.strip(b" \t\r\n")
            if not line:
                return headers
            if b":" not in line:
                raise ValueError(f"malformed MIME header: missing colon: {line!r}")
            while self.data[self.pos : self.pos + 1] in (b" ", b"\t"):
                more, _ = self._line()
                line += b" " + more.strip(b" \t\r\n")
            key, _, value = line.partition(b":")
            if not _HEADER_KEY.fullmatch(key) or _BAD_HEADER_VALUE.search(value):
                raise ValueError(f"malformed MIME header line: {line!r}")
            headers.setdefault(_canonical_key(key), decode_utf8(value.lstrip(b" \t")))

    def _part_body(self) -> bytes:
        start = self.pos
        search = start
        if self.data.startswith(self.dash, start):
            if self._boundary_ends(start + len(self.dash)):
                return b""  # an empty part right after its headers
            search = start + len(self.dash)
        nl_dash = self.nl + self.dash
        while True:
            found = self.data.find(nl_dash, search)
            if found < 0:
                raise ValueError("multipart: unexpected EOF in part")
            if self._boundary_ends(found + len(nl_dash)):
                self.pos = found
                return self.data[start:found]
            search = found + len(nl_dash)

    def _boundary_ends(self, at: int) -> bool:
        # "--foo" is the boundary only if followed by the end, space, tab, CR, LF or
        # "--": "--foobar" is body text.
        if at >= len(self.data):
            return True
        char = self.data[at : at + 1]
        if char in (b" ", b"\t", b"\r", b"\n"):
            return True
        return self.data[at : at + 2] == b"--"

    @staticmethod
    def _form_name(headers: Mapping[str, str]) -> str:
        try:
            disposition, params = parse_media_type(headers.get("Content-Disposition", ""))
        except ValueError:
            return ""
        if disposition != "form-data":
            return ""
        return params.get("name", "")

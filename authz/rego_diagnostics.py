"""rego-cpp's error listings turned into ``PolicyIssue``s with file and line."""

from __future__ import annotations

import re
from collections.abc import Mapping

from authz.errors import PolicyIssue

__all__ = ["error_issues"]

_ERROR_AT = re.compile(rb"\(error(?=[\s)])\s*(?:(\d+):)?")
_ERROR_LOCATION = re.compile(rb"\|(\d+)\|(\d+)")
_ERROR_MESSAGE = re.compile(rb"\(errormsg (\d+):")


def _parse_errors(text: str) -> list[tuple[str | None, int | None, str]]:
    """(file, byte offset, message) of each error in rego-cpp's error listing.

    The listing is an S-expression whose strings are length-prefixed
    (``(error 10:dir/x.rego|28|2 (errormsg 24:Invalid boolean operator) …)``).
    """
    raw = text.encode()
    out: list[tuple[str | None, int | None, str]] = []
    pos = 0
    while (found := _ERROR_AT.search(raw, pos)) is not None:
        pos = found.end()
        file: str | None = None
        offset: int | None = None
        if found.group(1) is not None:
            end = pos + int(found.group(1))
            file = raw[pos:end].decode("utf-8", "replace")
            pos = end
            location = _ERROR_LOCATION.match(raw, pos)
            if location is not None:
                offset = int(location.group(1))
                pos = location.end()
        message = "error"
        found_message = _ERROR_MESSAGE.search(raw, pos)
        if found_message is not None:
            start = found_message.end()
            end = start + int(found_message.group(1))
            message = raw[start:end].decode("utf-8", "replace")
            pos = end
        out.append((file, offset, message))
    if not out:
        out.append((None, None, text.strip() or "rego-cpp reported an error"))
    return out


def error_issues(text: str, sources: Mapping[str, str], origin: str) -> list[PolicyIssue]:
    """One issue per error in ``text``, with its line in ``sources`` (file → text).

    An error naming no known file is put on ``origin``.
    """
    errors = _parse_errors(text)
    # rego-cpp also reports the whole file as "unclosed" (at offset 0) beside the bracket
    # that is; that second report only points at `package`.
    unclosed = {
        file for file, offset, message in errors if message == "this is unclosed" and offset
    }
    issues: list[PolicyIssue] = []
    for file, offset, message in errors:
        name = file if file is not None and file in sources else origin
        if message == "this is unclosed" and offset == 0 and name in unclosed:
            continue
        line = None
        if offset is not None and name in sources:
            line = sources[name].encode()[:offset].count(b"\n") + 1
        issues.append(PolicyIssue(name, 0, "", f"does not parse: {message}", line))
    return issues

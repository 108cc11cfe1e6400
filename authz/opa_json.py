"""JSON read the way OPA reads it (``util.UnmarshalJSON``, Go's ``encoding/json``).

Python's ``json.loads`` accepts ``NaN`` and ``Infinity`` and keeps an unpaired
``\\ud800`` escape as a lone surrogate (which cannot be written as UTF-8 later); Go
refuses the first and turns the second into U+FFFD, and so does ``parse_json``. Where
we cannot follow Go: a number too large for a float (``1e400``) or an integer over
Python's 4300 digits is a parse error here.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["parse_json"]

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON value {name}")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number {text} is out of range")
    return number


def parse_json(text: str) -> Any:
    """Any JSON value in ``text``; ``ValueError`` (or ``RecursionError``) if Go would fail."""
    value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    if _SURROGATE_ESCAPE.search(text):
        # Python keeps an unpaired "\ud800" as a lone surrogate, which cannot be
        # written as UTF-8 later; Go's decoder turns it into U+FFFD.
        value = _fix_surrogates(value)
    return value


def _fix_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_fix_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_fix_surrogates(key): _fix_surrogates(item) for key, item in value.items()}
    return value

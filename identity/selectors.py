"""Workload selectors: ``type:key:value``; an entry matches when all of its selectors are present."""

from __future__ import annotations

import re
from dataclasses import dataclass

from identity.errors import InvalidSelectorError

__all__ = ["Selector"]

_TYPE = re.compile(r"^[a-z][a-z0-9_-]*$")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(slots=True, frozen=True, order=True)
class Selector:
    type: str
    key: str
    value: str

    def __post_init__(self) -> None:
        if not _TYPE.match(self.type):
            raise InvalidSelectorError(
                f"selector type {self.type!r} must be lowercase letters, digits, '_' or '-' "
                "(e.g. unix, k8s)"
            )
        if not _KEY.match(self.key):
            raise InvalidSelectorError(f"selector key {self.key!r} must be a name like uid or sa")
        if not self.value or self.value != self.value.strip():
            raise InvalidSelectorError("selector value must be non-empty without surrounding space")

    @classmethod
    def parse(cls, text: str, *, field: str = "selectors") -> Selector:
        """Parse ``unix:uid:1000``; the value may itself contain ':' (``k8s:pod-label:app:web``)."""
        parts = text.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise InvalidSelectorError(
                f"{text!r} is not a selector; expected type:key:value, e.g. unix:uid:1000 "
                "or k8s:sa:web",
                field=field,
            )
        try:
            return cls(*parts)
        except InvalidSelectorError as exc:
            raise InvalidSelectorError(f"{text!r}: {exc.message}", field=field) from exc

    def __str__(self) -> str:
        return f"{self.type}:{self.key}:{self.value}"

"""Names of Rego documents in configuration: the decision path and package names.

Kept apart from the engine so configuration can be validated without loading
regorus.
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_DECISION_PATH", "parse_decision_path", "parse_package_name"]

DEFAULT_DECISION_PATH = "envoy/authz/allow"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _segments(path: str) -> list[str]:
    parts = [p for p in re.split(r"[./]", path.strip()) if p]
    return parts[1:] if parts[:1] == ["data"] else parts


def parse_decision_path(path: str) -> tuple[str, ...]:
    """``envoy/authz/allow``, ``envoy.authz.allow`` or ``data.envoy.authz.allow`` → segments.

    Raises ValueError naming what is wrong: a decision needs a package and a rule.
    """
    parts = _segments(path)
    if len(parts) < 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise ValueError(
            f"decision path {path!r} must name a package and a rule, e.g. {DEFAULT_DECISION_PATH}"
        )
    return tuple(parts)


def parse_package_name(name: str) -> str:
    """``envoy.canary``, ``envoy/canary`` or ``data.envoy.canary`` → ``envoy.canary``.

    Raises ValueError when ``name`` is not a package name.
    """
    parts = _segments(name)
    if not parts or not all(_IDENT.fullmatch(p) for p in parts):
        raise ValueError(f"{name!r} is not a Rego package name, e.g. envoy.canary")
    return ".".join(parts)

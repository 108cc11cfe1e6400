"""Errors raised by the authz package.

Every error names what the user must fix; policy load errors carry the file and the
YAML document index and field path (AuthorizationPolicy) or the line (Rego) so
``meshward policy lint`` can print them as they are::

    AuthzError
    ├── PolicyLoadError     the policy directory cannot be served: AuthorizationPolicy
    │                       documents or Rego modules/data are invalid (``issues``
    │                       lists every problem found, not just the first)
    ├── BadRequestError     a CheckRequest cannot be turned into a request view;
    │                       ``reason`` names why (``too_many_headers`` …), and the
    │                       server denies with it (fail closed)
    ├── EntryError          an Envoy access-log entry (or its node) is not what a
    │                       sidecar configured by meshward sends; counted, not recorded
    └── ResponseBuildError  a decision cannot be turned into a CheckResponse
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AuthzError",
    "BadRequestError",
    "EntryError",
    "PolicyIssue",
    "PolicyLoadError",
    "ResponseBuildError",
]


class AuthzError(Exception):
    """Root of every error the authz package raises on purpose."""

    code = "authz_error"


@dataclass(slots=True, frozen=True)
class PolicyIssue:
    """One problem in one policy document.

    ``document`` is the 0-based index of the YAML document within ``file``;
    ``field`` is a path such as ``spec.rules[0].to[0].operation.paths[1]`` (empty
    when the problem is with the document as a whole, e.g. a YAML syntax error).
    ``line`` (1-based) is set for files that are not YAML document streams, such as
    Rego modules; those print as ``file:line`` and keep ``document`` 0.
    """

    file: str
    document: int
    field: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}[{self.document}]" if self.line is None else f"{self.file}:{self.line}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class PolicyLoadError(AuthzError):
    """The policy directory could not be loaded; nothing from it may be served."""

    code = "policy_load_error"

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        self.issues = list(issues)
        lines = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(f"{len(self.issues)} problem(s) in the policy directory:\n{lines}")


class BadRequestError(AuthzError):
    """The CheckRequest is malformed or over a limit; the request must be denied.

    ``reason`` is a stable snake_case string (``too_many_headers``,
    ``no_workload_namespace`` …) used as-is in logs, metric labels and audit rows;
    ``detail`` says what exactly was wrong, for a human.
    """

    code = "request_parse_error"

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class EntryError(AuthzError):
    """An access-log entry that cannot be recorded; ``reason`` as in BadRequestError."""

    code = "access_log_entry_error"

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class ResponseBuildError(AuthzError):
    """A CheckResponse could not be built (e.g. a decision id unfit for a header)."""

    code = "response_build_error"

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")

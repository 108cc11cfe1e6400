"""Rego that makes rego-cpp 1.5 kill the process while compiling, found before it is compiled.

rego-cpp reports these as a C++ exception nobody catches (``std::terminate``, SIGABRT)
or a SIGSEGV inside ``regoBuild``: the Python process dies with no chance to say which
file was at fault. Each check below names the construct and a rewrite that compiles.

- ``with input as …`` (the whole input replaced) aborts ("shape `rego-localref` has no
  field `rego-refhead`") whenever the rule it applies to uses another rule, which real
  policies always do. ``with input.attributes as …`` and ``with data.x as …`` work.
  Policies rarely write it; unit tests do all the time.
- Two packages defining a function of the same name with different numbers of
  arguments (``a.f(x, y)`` and ``b.f(x)``) abort ("basic_string_view::substr") when the
  one-argument package's module is added first, even if neither function is called.
  Which module comes first depends on file names, so a rename can break a set that
  compiled yesterday; both orders are refused.

The checks read tokens (strings and comments blanked), so they run on modules that do
not parse too; a module that does not parse is reported by the loader anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from authz.errors import PolicyIssue
from authz.policy_files import list_files
from authz.rego_scan import RegoModule, scan

__all__ = ["WHOLE_INPUT_MESSAGE", "crash_hazards", "directory_crash_hazards"]

WHOLE_INPUT_MESSAGE = (
    "`with input as …` replaces the whole input, which makes rego-cpp 1.5 (meshward's Rego "
    "engine) abort the process when the rule it applies to uses other rules; replace the "
    "parts the policy reads instead, e.g. `with input.attributes as …`"
)

# Strings and comments, blanked (newlines kept, so offsets still give lines).
_LITERAL = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`]*`|#[^\n]*')
_WITH_WHOLE_INPUT = re.compile(r"\bwith\s+input\s+as\b")


@dataclass(slots=True, frozen=True)
class _Function:
    package: str
    name: str
    arity: int
    file: str
    line: int


def crash_hazards(modules: Sequence[RegoModule]) -> list[PolicyIssue]:
    """A problem for each construct of ``modules`` known to crash rego-cpp's compiler."""
    issues: list[PolicyIssue] = []
    functions: list[_Function] = []
    for module in modules:
        code = _LITERAL.sub(_blank, module.text)
        issues.extend(
            PolicyIssue(module.file, 0, "", WHOLE_INPUT_MESSAGE, _line(code, m.start()))
            for m in _WITH_WHOLE_INPUT.finditer(code)
        )
        functions.extend(_functions(module, code))
    issues.extend(_arity_clashes(functions))
    return issues


def directory_crash_hazards(directory: Path) -> list[PolicyIssue]:
    """``crash_hazards`` of every module under ``directory``, test modules included.

    Hidden entries are skipped as the loader skips them; a file that cannot be read is
    left to the loader to report.
    """
    modules: list[RegoModule] = []
    for path in list_files(directory, lambda p: p.suffix == ".rego"):
        try:
            modules.append(RegoModule(str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return crash_hazards(modules)


def _blank(match: re.Match[str]) -> str:
    return re.sub(r"[^\n]", " ", match.group())


def _line(code: str, offset: int) -> int:
    return code.count("\n", 0, offset) + 1


def _functions(module: RegoModule, code: str) -> Iterator[_Function]:
    found = scan(module.text)
    package = ".".join(found.package)
    lines = code.split("\n")
    for rule in found.rules:
        if not rule.function:
            continue
        name = ".".join(rule.path)
        start = sum(len(line) + 1 for line in lines[: rule.line - 1])
        arity = _arity(code, start, rule.path[-1])
        if arity is not None:
            yield _Function(package, name, arity, module.file, rule.line)


def _arity(code: str, start: int, last: str) -> int | None:
    """Arguments of the function head starting at ``start`` (None if it cannot be read)."""
    head = re.compile(rf"\b{re.escape(last)}\s*\(").search(code, start)
    if head is None:
        return None
    depth, commas, empty = 0, 0, True
    for char in code[head.end() :]:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                return 0 if empty else commas + 1
            depth -= 1
        elif char == "," and depth == 0:
            commas += 1
        if not char.isspace():
            empty = False
    return None


def _arity_clashes(functions: Sequence[_Function]) -> Iterator[PolicyIssue]:
    first: dict[tuple[str, int], _Function] = {}  # (name, arity) → where it is first defined
    for function in functions:
        first.setdefault((function.name, function.arity), function)
    reported: set[tuple[str, str]] = set()
    for function in functions:
        for (name, arity), other in first.items():
            if name != function.name or arity == function.arity:
                continue
            if other.package == function.package or (function.file, name) in reported:
                continue
            reported.add((function.file, name))
            yield PolicyIssue(
                function.file,
                0,
                "",
                f"function {function.package}.{name} takes {function.arity} argument(s) and "
                f"{other.package}.{name} ({other.file}:{other.line}) takes {arity}: rego-cpp "
                "1.5 (meshward's Rego engine) aborts the process compiling two functions of one "
                "name with different arities in different packages; rename one of them",
                function.line,
            )

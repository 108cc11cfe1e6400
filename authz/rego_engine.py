"""Rego policies (OPA-Envoy style) compiled once into a rego-cpp bundle and evaluated in process.

The directory is read as an OPA bundle: every ``*.rego`` (recursively; hidden entries
and ``*_test.rego`` skipped) is a module, every ``data.json`` / ``data.yaml`` /
``data.yml`` a data document mounted at its directory (``roles/data.json`` →
``data.roles``; the root one must be an object). Loading is all or nothing: every
problem in every file is collected and ``PolicyLoadError`` lists them as
``file:line: message``; no engine is returned.

Compilation stages, in order, each collecting issues:

1. parse each module with rego-cpp (syntax errors, with their line);
2. scan each module's tokens: Rego v0 forms, calls, rule heads, METADATA blocks;
3. check every call against rego-cpp's built-ins (asked once per name per process);
4. read and merge the data documents (a path defined twice names both files);
5. cross-checks: rules against data paths, the decision rule exists, dry-run flags;
6. build one bundle whose entrypoint is the decision (``envoy/authz/allow``).

Stages 2, 3 and 5 exist because rego-cpp 1.5 is lenient where OPA 1.x is strict, and
that leniency fails open or crashes at request time:

- it parses Rego v0 and v1 alike (``if`` optional, ``p[x] { }`` accepted);
- OPA built-ins it lacks (``http.send``, ``net.*``, ``graphql.*``…) are placeholders
  that evaluate to undefined, and unknown functions only fail when evaluated;
- a built-in called with no arguments when it takes some (``count()``) compiles and
  then crashes the process (SIGSEGV) when evaluated;
- base data at a rule's path silently replaces the rule.

Evaluation facts:

- rego-cpp keeps strings JSON-escaped internally and its JSON output does not escape
  strings that came in raw, so input strings are handed over escaped and results are
  read node by node, never by parsing its JSON text (a quote in a header could
  otherwise rewrite the decision). Built-ins that look at characters (``count``,
  ``substring``, ``base64.encode``…) see the escaped form of strings holding ``"``,
  ``\\`` or control characters; plain and non-ASCII strings are unaffected.
- An interpreter serves one thread at a time; the compiled bundle is shared read-only,
  so each thread evaluates with its own interpreter against the one bundle.
- Evaluation is one blocking C call (through ctypes, which releases the GIL, so other
  threads run meanwhile) and rego-cpp has no way to interrupt it. A timeout therefore
  discards a late result (the request is denied with ``timeout``) but cannot free the
  thread before rego-cpp returns: about 3 µs per element a policy iterates, so 3 s for
  a comprehension over a million numbers.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import math
import re
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import yaml

from authz.errors import PolicyIssue, PolicyLoadError

__all__ = [
    "DATA_FILE_NAMES",
    "DEFAULT_DECISION_PATH",
    "V0_MESSAGE",
    "RegoDataDocument",
    "RegoEngine",
    "RegoModule",
    "RegoResult",
    "compile_rego",
    "load_rego_policies",
    "parse_decision_path",
]

DEFAULT_DECISION_PATH = "envoy/authz/allow"
DATA_FILE_NAMES = frozenset({"data.json", "data.yaml", "data.yml"})

V0_MESSAGE = "Rego v0 syntax is not supported; use Rego v1 (`if`, `contains`) — see opa fmt --v0-v1"

# OPA 1.0 dropped these v0 built-ins; rego-cpp lacks them too, but the reason to give
# is the v1 one, with the replacement.
_REMOVED_IN_V1: Final[Mapping[str, str]] = {
    "any": "`some x in xs` with a test on x",
    "all": "`every x in xs { … }`",
    "re_match": "regex.match",
    "set_diff": "`a - b`",
    "net.cidr_overlap": "net.cidr_contains (not available in rego-cpp either)",
    "cast_array": "an array comprehension",
    "cast_set": "a set comprehension",
    "cast_string": "the value itself, checked with is_string",
    "cast_boolean": "the value itself, checked with is_boolean",
    "cast_null": "the value itself, checked with is_null",
    "cast_object": "the value itself, checked with is_object",
}
_PRINT_MESSAGE = (
    "`print` is not allowed: rego-cpp writes its output to meshward's stdout on every "
    "decision; remove it (debug with opa eval or opa test)"
)


# -- public values --------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RegoModule:
    """One Rego source file; ``file`` names it in issues."""

    file: str
    text: str


@dataclass(slots=True, frozen=True)
class RegoDataDocument:
    """One data document (already parsed) mounted at ``path`` under ``data``."""

    file: str
    path: tuple[str, ...]
    value: Any


@dataclass(slots=True, frozen=True)
class RegoResult:
    """The decision of one evaluation, or why there is none.

    ``error`` is None when the decision is defined; ``value`` is then the decision as
    JSON-like Python (objects → dict, arrays and sets → list, ``null`` → None).
    Otherwise ``error`` is ``undefined``, ``eval_error`` or ``timeout`` and ``detail``
    says what happened. rego-cpp gives no provenance, so ``decision`` (the decision
    path, ``data.envoy.authz.allow``) is what decided; ``dry_run`` is whether its
    package is marked ``custom: {dry_run: true}``.
    """

    decision: str
    value: Any = None
    error: str | None = None
    detail: str = ""
    dry_run: bool = False

    @property
    def defined(self) -> bool:
        return self.error is None


def parse_decision_path(path: str) -> tuple[str, ...]:
    """``envoy/authz/allow``, ``envoy.authz.allow`` or ``data.envoy.authz.allow`` → segments.

    Raises ValueError naming what is wrong: a decision needs a package and a rule.
    """
    parts = [p for p in re.split(r"[./]", path.strip()) if p]
    if parts[:1] == ["data"]:
        parts = parts[1:]
    if len(parts) < 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise ValueError(
            f"decision path {path!r} must name a package and a rule, e.g. {DEFAULT_DECISION_PATH}"
        )
    return tuple(parts)


# -- loading --------------------------------------------------------------------------


def load_rego_policies(
    directory: Path,
    *,
    decision_path: str = DEFAULT_DECISION_PATH,
    clock: Callable[[], float] = time.monotonic,
) -> RegoEngine:
    """Read every module and data document under ``directory`` and compile them.

    Raises PolicyLoadError listing every problem, ValueError for a bad decision path.
    """
    decision = parse_decision_path(decision_path)
    if not directory.is_dir():
        raise PolicyLoadError(
            [PolicyIssue(str(directory), 0, "", "is not a directory of Rego modules and data")]
        )
    issues: list[PolicyIssue] = []
    modules: list[RegoModule] = []
    documents: list[RegoDataDocument] = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        is_module = path.suffix == ".rego" and not path.name.endswith("_test.rego")
        if not is_module and path.name not in DATA_FILE_NAMES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(PolicyIssue(str(path), 0, "", f"cannot be read: {exc}"))
            continue
        if is_module:
            modules.append(RegoModule(str(path), text))
        else:
            value = _read_data(str(path), text, issues)
            if value is not _UNREADABLE:
                documents.append(RegoDataDocument(str(path), relative.parent.parts, value))
    return _compile(modules, documents, decision, issues, str(directory), clock)


def compile_rego(
    modules: Sequence[RegoModule],
    data: Sequence[RegoDataDocument] = (),
    *,
    decision_path: str = DEFAULT_DECISION_PATH,
    clock: Callable[[], float] = time.monotonic,
) -> RegoEngine:
    """Like ``load_rego_policies`` for sources already in memory."""
    decision = parse_decision_path(decision_path)
    return _compile(list(modules), list(data), decision, [], "<rego>", clock)


_UNREADABLE: Final = object()


def _read_data(file: str, text: str, issues: list[PolicyIssue]) -> Any:
    value: Any
    if file.endswith(".json"):
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            issues.append(PolicyIssue(file, 0, "", f"is not valid JSON: {exc.msg}", exc.lineno))
            return _UNREADABLE
        except ValueError as exc:
            issues.append(PolicyIssue(file, 0, "", f"is not valid JSON: {exc}"))
            return _UNREADABLE
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            message = str(exc).replace("\n", " ")
            issues.append(PolicyIssue(file, 0, "", f"is not valid YAML: {message}", line))
            return _UNREADABLE
    problem = _not_json(value, "")
    if problem is not None:
        where, what = problem
        issues.append(PolicyIssue(file, 0, where, f"is not JSON data: {what}"))
        return _UNREADABLE
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _not_json(value: Any, where: str) -> tuple[str, str] | None:
    """(path, why) of the first value that has no JSON form (YAML dates, binary, NaN…)."""
    if value is None or isinstance(value, bool | int | str):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, f"{value} is not a JSON number")
    if isinstance(value, list):
        for i, item in enumerate(value):
            problem = _not_json(item, f"{where}[{i}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (where, f"key {key!r} is not a string; quote it")
            problem = _not_json(item, f"{where}.{key}" if where else key)
            if problem is not None:
                return problem
        return None
    return (where, f"a {type(value).__name__} (quote it to make it a string)")


# -- compilation ----------------------------------------------------------------------


def _compile(
    modules: list[RegoModule],
    documents: list[RegoDataDocument],
    decision: tuple[str, ...],
    issues: list[PolicyIssue],
    origin: str,
    clock: Callable[[], float],
) -> RegoEngine:
    if not modules:
        issues.append(PolicyIssue(origin, 0, "", "holds no Rego modules (*.rego)"))
    scans: dict[str, _ModuleScan] = {}
    for module in modules:
        if module.file in scans:
            issues.append(PolicyIssue(module.file, 0, "", "is given twice"))
            continue
        problems = _parse_problems(module)
        if problems:
            issues.extend(problems)
            continue
        scans[module.file] = _scan(module.text)

    functions: dict[tuple[str, ...], set[str]] = {}
    for scan in scans.values():
        functions.setdefault(scan.package, set()).update(
            ".".join(rule.path) for rule in scan.rules if rule.function
        )
    for file, scan in scans.items():
        issues.extend(
            PolicyIssue(file, 0, "", f"{V0_MESSAGE} ({what})", line) for line, what in scan.v0
        )
    issues.extend(_call_problems(scans, functions))
    dry_run = _dry_run_packages(scans, issues)
    data, sources = _merge_data(documents, issues)
    issues.extend(_rule_data_conflicts(scans, data, sources))
    package = _decision_package(scans, decision, origin, issues)
    if issues:
        raise PolicyLoadError(sorted(issues, key=lambda i: (i.file, i.line or 0)))

    entrypoint = "/".join(decision)
    bundle = _build(modules, data, entrypoint)
    digest = hashlib.sha256(entrypoint.encode())
    for module in modules:
        digest.update(b"\0" + module.file.encode() + b"\0" + module.text.encode())
    digest.update(b"\0" + json.dumps(data, sort_keys=True).encode())
    return RegoEngine(
        bundle,
        decision=decision,
        package=package,
        dry_run_packages=dry_run,
        files=tuple(m.file for m in modules) + tuple(d.file for d in documents),
        version=digest.hexdigest()[:16],
        clock=clock,
    )


def _parse_problems(module: RegoModule) -> list[PolicyIssue]:
    # A fresh interpreter per module: after a failed add the interpreter's state is not
    # documented, and each file's errors should be reported on their own.
    interpreter = _Interpreter()
    if _lib.regoAddModule(interpreter.handle, module.file.encode(), module.text.encode()) == 0:
        return []
    return _error_issues(_last_error(interpreter.handle), {module.file: module.text}, module.file)


def _build(modules: Sequence[RegoModule], data: Mapping[str, Any], entrypoint: str) -> _Bundle:
    interpreter = _Interpreter()
    sources = {m.file: m.text for m in modules}
    origin = modules[0].file
    for module in modules:
        if _lib.regoAddModule(interpreter.handle, module.file.encode(), module.text.encode()):
            raise PolicyLoadError(_error_issues(_last_error(interpreter.handle), sources, origin))
    # ensure_ascii=False: rego-cpp counts \u escapes as characters; raw UTF-8 it reads right.
    if data and _lib.regoAddDataJSON(
        interpreter.handle, json.dumps(data, ensure_ascii=False).encode()
    ):
        raise PolicyLoadError(_error_issues(_last_error(interpreter.handle), sources, origin))
    if _lib.regoAddEntrypoint(interpreter.handle, entrypoint.encode()):
        raise PolicyLoadError(_error_issues(_last_error(interpreter.handle), sources, origin))
    handle = _lib.regoBuild(interpreter.handle)
    if not handle:
        raise PolicyLoadError(_error_issues(_last_error(interpreter.handle), sources, origin))
    bundle = _Bundle(handle)
    if not _lib.regoBundleOk(handle):
        raise PolicyLoadError(_error_issues(_last_error(interpreter.handle), sources, origin))
    return bundle


def _call_problems(
    scans: Mapping[str, _ModuleScan], functions: Mapping[tuple[str, ...], set[str]]
) -> list[PolicyIssue]:
    problems: list[PolicyIssue] = []
    pending: list[tuple[str, _Call]] = []
    for file, scan in scans.items():
        local = functions.get(scan.package, set())
        for call in scan.calls:
            root = call.name.split(".", 1)[0]
            if root in ("data", "input") or root in scan.aliases or call.name in local:
                continue  # a function some module defines (or a mistake OPA itself reports)
            if call.name == "print":
                problems.append(PolicyIssue(file, 0, "", _PRINT_MESSAGE, call.line))
            elif call.name in _REMOVED_IN_V1:
                message = (
                    f"`{call.name}` is a Rego v0 built-in, removed in Rego v1; "
                    f"use {_REMOVED_IN_V1[call.name]}"
                )
                problems.append(PolicyIssue(file, 0, "", message, call.line))
            else:
                pending.append((file, call))
    known = _builtins(call.name for _, call in pending)
    for file, call in pending:
        builtin = known[call.name]
        if builtin is None:
            message = (
                f"unknown function `{call.name}`: no module defines it and it is not a "
                "built-in of rego-cpp, meshward's Rego engine"
            )
        elif not builtin.available:
            message = (
                f"built-in `{call.name}` is not supported by rego-cpp, meshward's Rego engine: "
                "OPA would run it, here it would be undefined on every request"
            )
        elif call.argc not in builtin.accepted:
            message = (
                f"`{call.name}` takes {_plural(builtin.arity, 'argument')}"
                + (" (one more to bind its result)" if builtin.returns else "")
                + f", not {call.argc}"
            )
        else:
            continue
        problems.append(PolicyIssue(file, 0, "", message, call.line))
    return problems


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _dry_run_packages(
    scans: Mapping[str, _ModuleScan], issues: list[PolicyIssue]
) -> frozenset[str]:
    """Packages whose package annotation says ``custom: {dry_run: true}``.

    ``scope: subpackages`` extends the flag to packages below, unless they set their own.
    """
    own: dict[tuple[str, ...], tuple[bool, str, int]] = {}
    inherited: dict[tuple[str, ...], bool] = {}
    for file, scan in scans.items():
        for note in scan.annotations:
            found = _dry_run_flag(file, note, issues)
            if found is None:
                continue
            flag, subpackages = found
            earlier = own.get(scan.package)
            if earlier is not None and earlier[0] != flag:
                issues.append(
                    PolicyIssue(
                        file,
                        0,
                        "custom.dry_run",
                        f"package {'.'.join(scan.package)} is dry_run: {_yaml_bool(earlier[0])} "
                        f"in {earlier[1]}:{earlier[2]}; set it the same way in every file",
                        note.line,
                    )
                )
                continue
            own[scan.package] = (flag, file, note.line)
            if subpackages:
                inherited[scan.package] = flag
    out: set[str] = set()
    for package in {scan.package for scan in scans.values()}:
        if package in own:
            flag = own[package][0]
        else:
            ancestors = [p for p in inherited if package[: len(p)] == p]
            flag = inherited[max(ancestors, key=len)] if ancestors else False
        if flag:
            out.add(".".join(package))
    return frozenset(out)


def _dry_run_flag(
    file: str, note: _Annotation, issues: list[PolicyIssue]
) -> tuple[bool, bool] | None:
    """(dry_run, applies to subpackages) from one METADATA block, if it sets dry_run."""
    try:
        doc = yaml.safe_load(note.text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = note.line + 1 + mark.line if mark is not None else note.line
        message = str(exc).replace("\n", " ")
        issues.append(PolicyIssue(file, 0, "", f"METADATA is not valid YAML: {message}", line))
        return None
    if doc is None:
        return None
    if not isinstance(doc, dict):
        issues.append(PolicyIssue(file, 0, "", "METADATA must be a YAML mapping", note.line))
        return None
    custom = doc.get("custom")
    if custom is None or (isinstance(custom, dict) and "dry_run" not in custom):
        return None
    if not isinstance(custom, dict):
        issues.append(PolicyIssue(file, 0, "custom", "must be a mapping", note.line))
        return None
    flag = custom["dry_run"]
    if not isinstance(flag, bool):
        issues.append(
            PolicyIssue(
                file, 0, "custom.dry_run", f"must be true or false, not {flag!r}", note.line
            )
        )
        return None
    if not note.on_package:
        issues.append(
            PolicyIssue(
                file,
                0,
                "custom.dry_run",
                "is read only from the METADATA block right above `package`",
                note.line,
            )
        )
        return None
    scope = doc.get("scope", "package")
    if scope not in ("package", "subpackages"):
        issues.append(
            PolicyIssue(
                file,
                0,
                "scope",
                f"{scope!r} cannot annotate a package; use package or subpackages",
                note.line,
            )
        )
        return None
    return flag, scope == "subpackages"


def _yaml_bool(flag: bool) -> str:
    return "true" if flag else "false"


def _decision_package(
    scans: Mapping[str, _ModuleScan],
    decision: tuple[str, ...],
    origin: str,
    issues: list[PolicyIssue],
) -> tuple[str, ...]:
    """The package that defines the decision rule; an issue when no rule does."""
    for scan in scans.values():
        for rule in scan.rules:
            full = scan.package + rule.path
            if full[: len(decision)] == decision or decision[: len(full)] == full:
                return scan.package
    if scans:  # with no module parsed, the parse errors already say what is wrong
        package, name = ".".join(decision[:-1]), decision[-1]
        issues.append(
            PolicyIssue(
                origin,
                0,
                "",
                f"no rule defines the decision data.{'.'.join(decision)}: add a module with "
                f"`package {package}` and a rule `{name}` (or change the decision path)",
            )
        )
    return decision[:-1]


# -- data documents -------------------------------------------------------------------


def _merge_data(
    documents: Sequence[RegoDataDocument], issues: list[PolicyIssue]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """OPA's bundle merge: objects merge key by key, any other value has one owner.

    Returns the merged data and, for each path a document created, that document's file.
    """
    data: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}

    def conflict(doc: RegoDataDocument, path: tuple[str, ...]) -> None:
        other = _source_of(sources, path)
        dotted = ".".join(("data", *path))
        issues.append(
            PolicyIssue(
                doc.file,
                0,
                dotted,
                f"is also defined by {other}; data files may only add keys to objects, "
                "not define the same path twice",
            )
        )

    for doc in documents:
        if not doc.path and not isinstance(doc.value, dict):
            issues.append(
                PolicyIssue(
                    doc.file,
                    0,
                    "",
                    "must be an object: a data document at the top of the Rego directory "
                    "holds data.<key> for each of its keys",
                )
            )
            continue
        mount = doc.path if isinstance(doc.value, dict) else doc.path[:-1]
        node: Any = data
        for depth in range(len(mount)):
            here = mount[: depth + 1]
            if mount[depth] not in node:
                node[mount[depth]] = {}
                sources[here] = doc.file
            node = node[mount[depth]]
            if not isinstance(node, dict):
                conflict(doc, here)
                break
        else:
            if isinstance(doc.value, dict):
                for path in _merge_into(node, doc.value, mount, doc.file, sources):
                    conflict(doc, path)
            elif doc.path[-1] in node:
                conflict(doc, doc.path)
            else:
                node[doc.path[-1]] = copy.deepcopy(doc.value)
                sources[doc.path] = doc.file
    return data, sources


def _merge_into(
    node: dict[str, Any],
    value: Mapping[str, Any],
    path: tuple[str, ...],
    file: str,
    sources: dict[tuple[str, ...], str],
) -> list[tuple[str, ...]]:
    conflicts: list[tuple[str, ...]] = []
    for key, item in value.items():
        here = (*path, key)
        if key not in node:
            node[key] = copy.deepcopy(item)
            sources[here] = file
        elif isinstance(node[key], dict) and isinstance(item, dict):
            conflicts.extend(_merge_into(node[key], item, here, file, sources))
        else:
            conflicts.append(here)
    return conflicts


def _source_of(sources: Mapping[tuple[str, ...], str], path: tuple[str, ...]) -> str:
    for end in range(len(path), 0, -1):
        if path[:end] in sources:
            return sources[path[:end]]
    return "another data file"


def _rule_data_conflicts(
    scans: Mapping[str, _ModuleScan],
    data: Mapping[str, Any],
    sources: Mapping[tuple[str, ...], str],
) -> list[PolicyIssue]:
    # OPA refuses a rule whose path holds base data ("conflicting rule for data path");
    # rego-cpp would let the data win silently.
    problems: list[PolicyIssue] = []
    for file, scan in scans.items():
        for rule in scan.rules:
            path = scan.package + rule.path
            node: Any = data
            clash: tuple[str, ...] | None = None
            for depth, segment in enumerate(path):
                if not isinstance(node, dict):
                    clash = path[:depth]
                    break
                if segment not in node:
                    break
                node = node[segment]
            else:
                clash = path
            if clash is None:
                continue
            problems.append(
                PolicyIssue(
                    file,
                    0,
                    "",
                    f"rule data.{'.'.join(path)} conflicts with data.{'.'.join(clash)} from "
                    f"{_source_of(sources, clash)}: a path is either a rule or data, not both",
                    rule.line,
                )
            )
    return problems


# -- rego-cpp errors ------------------------------------------------------------------

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


def _error_issues(text: str, sources: Mapping[str, str], origin: str) -> list[PolicyIssue]:
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


# -- the module scanner ---------------------------------------------------------------
#
# rego-cpp exposes neither the parsed module nor its annotations, so the facts checked
# above come from the module's tokens. Only modules rego-cpp parsed get here.

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(
    r"""
    (?P<nl>\n)
  | (?P<ws>[ \t\r\f\v]+)
  | (?P<comment>\#[^\n]*)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<num>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>:=|==|!=|<=|>=|.)
    """,
    re.VERBOSE | re.DOTALL,
)
_OPENERS = frozenset("([{")
_CLOSERS = frozenset(")]}")
_KEYWORDS = frozenset(
    {
        "as",
        "contains",
        "default",
        "else",
        "every",
        "false",
        "if",
        "import",
        "in",
        "not",
        "null",
        "package",
        "some",
        "true",
        "with",
    }
)
# A line ending in one of these continues on the next one.
_CONTINUES = frozenset(
    {":=", "=", "==", "!=", "<", ">", "<=", ">=", "+", "-", "*", "/", "%", "|", "&", ",", ".", ":"}
    | {"if", "else", "contains", "in", "not", "with", "as", "some", "every", "default"}
)
# Tokens that can end a rule head; a `{` right after one opens a body without `if`.
_HEAD_END_KINDS = frozenset({"ident", "num", "str", "raw"})


class _Token(NamedTuple):
    kind: str
    text: str
    line: int
    depth: int  # bracket depth outside the token


@dataclass(slots=True, frozen=True)
class _Rule:
    path: tuple[str, ...]  # the head's static ref, after the package
    line: int
    function: bool


@dataclass(slots=True, frozen=True)
class _Call:
    name: str
    argc: int
    line: int


@dataclass(slots=True, frozen=True)
class _Annotation:
    line: int
    on_package: bool
    text: str  # the YAML inside the block


@dataclass(slots=True)
class _ModuleScan:
    package: tuple[str, ...] = ()
    aliases: set[str] = field(default_factory=set)
    rules: list[_Rule] = field(default_factory=list)
    calls: list[_Call] = field(default_factory=list)
    v0: list[tuple[int, str]] = field(default_factory=list)
    annotations: list[_Annotation] = field(default_factory=list)


def _tokenize(text: str) -> tuple[list[_Token], list[tuple[int, str, bool]]]:
    """Code tokens (newlines included) and comments as (line, text, alone on its line)."""
    tokens: list[_Token] = []
    comments: list[tuple[int, str, bool]] = []
    line, depth, code_on_line = 1, 0, False
    for match in _TOKEN.finditer(text):
        kind, value = match.lastgroup or "op", match.group()
        if kind == "nl":
            tokens.append(_Token(kind, value, line, depth))
            line, code_on_line = line + 1, False
        elif kind == "comment":
            comments.append((line, value, not code_on_line))
        elif kind != "ws":
            if kind == "op" and value in _CLOSERS:
                depth = max(depth - 1, 0)
            tokens.append(_Token(kind, value, line, depth))
            if kind == "op" and value in _OPENERS:
                depth += 1
            line += value.count("\n")  # raw strings may span lines
            code_on_line = True
    return tokens, comments


def _scan(text: str) -> _ModuleScan:
    tokens, comments = _tokenize(text)
    scan = _ModuleScan()
    heads: set[int] = set()
    for start in _statement_starts(tokens):
        keyword = tokens[start].text
        if keyword == "package":
            scan.package = tuple(_static_ref(tokens, start + 1)[0])
        elif keyword == "import":
            path, end = _static_ref(tokens, start + 1)
            alias = path[-1] if path else None
            if end + 1 < len(tokens) and tokens[end].text == "as":
                alias = tokens[end + 1].text
            if path[:1] in (["data"], ["input"]) and alias is not None:
                scan.aliases.add(alias)
        else:
            first = start + 1 if keyword == "default" else start
            path, end = _static_ref(tokens, first)
            if path:
                function = end < len(tokens) and tokens[end].text == "("
                scan.rules.append(_Rule(tuple(path), tokens[first].line, function))
                if function:
                    heads.add(first)
    scan.calls = list(_calls(tokens, heads))
    scan.v0 = list(_v0_sites(tokens))
    scan.annotations = list(_annotations(comments, tokens))
    return scan


def _statement_starts(tokens: Sequence[_Token]) -> Iterator[int]:
    fresh, last, before = True, None, None
    for i, token in enumerate(tokens):
        if token.kind == "nl":
            # `in` ending `import future.keywords.in` is a name, not the operator.
            continues = (
                last is not None
                and last.text in _CONTINUES
                and not (last.kind == "ident" and before is not None and before.text == ".")
            )
            if token.depth == 0 and not continues:
                fresh = True
            continue
        if fresh and token.depth == 0 and token.kind == "ident" and token.text != "else":
            yield i
        fresh, last, before = False, token, last


def _static_ref(tokens: Sequence[_Token], i: int) -> tuple[list[str], int]:
    """The leading static part of the ref at ``i`` (``a.b["c"]``) and where it ends."""
    if i >= len(tokens) or tokens[i].kind != "ident":
        return [], i
    path = [tokens[i].text]
    i += 1
    while i + 1 < len(tokens):
        if tokens[i].text == "." and tokens[i + 1].kind == "ident":
            path.append(tokens[i + 1].text)
            i += 2
        elif (
            tokens[i].text == "["
            and tokens[i + 1].kind == "str"
            and i + 2 < len(tokens)
            and tokens[i + 2].text == "]"
        ):
            try:
                path.append(json.loads(tokens[i + 1].text))
            except ValueError:
                break
            i += 3
        else:
            break
    return path, i


def _calls(tokens: Sequence[_Token], heads: set[int]) -> Iterator[_Call]:
    for i, token in enumerate(tokens):
        if token.kind != "ident" or token.text in _KEYWORDS or i in heads:
            continue
        if i > 0 and tokens[i - 1].text == ".":
            continue  # inside a longer ref, read from its first name
        name, j = [token.text], i + 1
        while j + 1 < len(tokens) and tokens[j].text == "." and tokens[j + 1].kind == "ident":
            name.append(tokens[j + 1].text)
            j += 2
        if j < len(tokens) and tokens[j].text == "(":
            yield _Call(".".join(name), _argument_count(tokens, j), token.line)


def _argument_count(tokens: Sequence[_Token], opening: int) -> int:
    depth = tokens[opening].depth
    commas, empty = 0, True
    for k in range(opening + 1, len(tokens)):
        token = tokens[k]
        if token.kind == "nl":
            continue
        if token.depth == depth and token.text == ")":
            break
        empty = False
        if token.depth == depth + 1 and token.text == ",":
            commas += 1
    return 0 if empty else commas + 1


def _v0_sites(tokens: Sequence[_Token]) -> Iterator[tuple[int, str]]:
    previous: _Token | None = None
    for token in tokens:
        if token.kind == "nl":
            continue
        if token.text == "{" and token.depth == 0 and previous is not None:
            if previous.text == "else":
                yield token.line, "`else` body without `if`"
            elif previous.text in _CLOSERS or (
                previous.kind in _HEAD_END_KINDS
                and (previous.text not in _KEYWORDS or previous.text in ("true", "false", "null"))
            ):
                yield token.line, "rule body without `if`"
        previous = token


def _annotations(
    comments: Sequence[tuple[int, str, bool]], tokens: Sequence[_Token]
) -> Iterator[_Annotation]:
    """``# METADATA`` blocks: the comment lines that follow, up to the first other line."""
    i = 0
    while i < len(comments):
        line, text, alone = comments[i]
        i += 1
        if not alone or text[1:].strip() != "METADATA":
            continue
        body: list[str] = []
        end = line
        while i < len(comments) and comments[i][0] == end + 1 and comments[i][2]:
            body.append(comments[i][1][1:])
            end += 1
            i += 1
        target = next((t for t in tokens if t.kind != "nl" and t.line > end), None)
        on_package = target is not None and target.text == "package"
        yield _Annotation(line, on_package, textwrap.dedent("\n".join(body)))


# -- rego-cpp, through its C API ------------------------------------------------------
#
# regopy's Python layer converts input without escaping strings, parses results from
# rego-cpp's unescaped JSON and omits some entry points, so the C functions are called
# directly, with their signatures declared on a handle of our own.


def _open_library() -> Any:
    from regopy import rego_shared  # finds the shared library the way regopy does per platform

    lib = ctypes.CDLL(rego_shared.path)
    handle, text, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32
    buffer = ctypes.c_char_p
    signatures: dict[str, tuple[list[Any], Any]] = {
        "regoNew": ([], handle),
        "regoFree": ([handle], None),
        "regoSetLogLevel": ([handle, u32], u32),
        "regoAddModule": ([handle, text, text], u32),
        "regoAddDataJSON": ([handle, text], u32),
        "regoAddEntrypoint": ([handle, text], u32),
        "regoBuild": ([handle], handle),
        "regoBundleOk": ([handle], ctypes.c_bool),
        "regoBundleNode": ([handle], handle),
        "regoFreeBundle": ([handle], None),
        "regoBundleQueryEntrypoint": ([handle, handle, text], handle),
        "regoIsAvailableBuiltIn": ([handle, text], ctypes.c_bool),
        "regoErrorSize": ([handle], u32),
        "regoError": ([handle, buffer, u32], u32),
        "regoSetInput": ([handle, handle], u32),
        "regoNewInput": ([], handle),
        "regoFreeInput": ([handle], None),
        "regoInputInt": ([handle, ctypes.c_int64], u32),
        "regoInputFloat": ([handle, ctypes.c_double], u32),
        "regoInputString": ([handle, text], u32),
        "regoInputBoolean": ([handle, ctypes.c_bool], u32),
        "regoInputNull": ([handle], u32),
        "regoInputObjectItem": ([handle], u32),
        "regoInputObject": ([handle, u32], u32),
        "regoInputArray": ([handle, u32], u32),
        "regoInputSet": ([handle, u32], u32),
        "regoOutputNode": ([handle], handle),
        "regoFreeOutput": ([handle], None),
        "regoNodeType": ([handle], u32),
        "regoNodeTypeName": ([handle, buffer, u32], u32),
        "regoNodeSize": ([handle], u32),
        "regoNodeGet": ([handle, u32], handle),
        "regoNodeValueSize": ([handle], u32),
        "regoNodeValue": ([handle, buffer, u32], u32),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    return lib


_lib: Any = _open_library()

# rego-cpp node kinds (rego.h); TRUE/FALSE are the raw kinds, before regopy merges them.
_TERM, _SCALAR, _ARRAY, _SET, _OBJECT = 1002, 1003, 1004, 1005, 1006
_INT, _FLOAT, _STRING, _TRUE, _FALSE, _NULL, _UNDEFINED = 1008, 1009, 1010, 1011, 1012, 1013, 1014
_TERMS, _RESULTS = 1015, 1017
_ERROR, _ERROR_MSG, _ERROR_CODE, _ERROR_SEQ = 1800, 1801, 1803, 1804
_LOG_NONE = 0
_INT64 = range(-(2**63), 2**63)


def _last_error(interpreter: int) -> str:
    size = int(_lib.regoErrorSize(interpreter)) + 1
    buf = ctypes.create_string_buffer(size)
    _lib.regoError(interpreter, buf, size)
    return buf.value.decode("utf-8", "replace")


def _node_text(node: int) -> str:
    size = int(_lib.regoNodeValueSize(node)) + 1
    buf = ctypes.create_string_buffer(size)
    if _lib.regoNodeValue(node, buf, size):
        raise _OutputError("rego-cpp could not give a value")
    return buf.value.decode("utf-8")


def _type_name(node: int) -> str:
    # regoNodeTypeNameSize counts one byte short, so a fixed buffer is used.
    buf = ctypes.create_string_buffer(128)
    _lib.regoNodeTypeName(node, buf, 128)
    return buf.value.decode()


def _children(node: int) -> list[int]:
    return [int(_lib.regoNodeGet(node, i)) for i in range(int(_lib.regoNodeSize(node)))]


class _Interpreter:
    """One rego-cpp interpreter, with the input it was last given."""

    __slots__ = ("_input", "handle")

    def __init__(self) -> None:
        self.handle: int = int(_lib.regoNew() or 0)
        self._input = 0
        if not self.handle:
            raise MemoryError("rego-cpp could not create an interpreter")
        # Its default log level prints every compile error to stdout.
        _lib.regoSetLogLevel(self.handle, _LOG_NONE)

    def set_input(self, handle: int) -> bool:
        ok: bool = _lib.regoSetInput(self.handle, handle) == 0
        # rego-cpp keeps reading the input it was given (freeing it early crashes the
        # next query), so the previous one is freed only once it is replaced.
        previous, self._input = self._input, handle
        if previous:
            _lib.regoFreeInput(previous)
        return ok

    def __del__(self) -> None:
        if self.handle:
            _lib.regoFree(self.handle)
        if self._input:
            _lib.regoFreeInput(self._input)


class _Bundle:
    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __del__(self) -> None:
        _lib.regoFreeBundle(self.handle)


class _OutputError(Exception):
    """A rego-cpp result that cannot be read as JSON-like data."""


# -- built-ins ------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class _Builtin:
    arity: int
    returns: bool  # a call may then pass one more argument, bound to the result
    available: bool  # False for OPA built-ins rego-cpp only declares (http.send, net.*)

    @property
    def accepted(self) -> tuple[int, ...]:
        return (self.arity, self.arity + 1) if self.returns else (self.arity,)


_BUILTINS: dict[str, _Builtin | None] = {}
_BUILTINS_LOCK = threading.Lock()


def _builtins(names: Iterable[str]) -> dict[str, _Builtin | None]:
    """What rego-cpp knows of each name (None: not a built-in), cached for the process."""
    wanted = set(names)
    with _BUILTINS_LOCK:
        missing = sorted(wanted - _BUILTINS.keys())
        if missing:
            found = _probe(missing)
            if found is None:  # one odd name spoils the batch: ask one by one
                found = {}
                for name in missing:
                    found.update(_probe([name]) or {name: None})
            _BUILTINS.update(found)
        return {name: _BUILTINS[name] for name in wanted}


def _probe(names: Sequence[str]) -> dict[str, _Builtin | None] | None:
    # rego-cpp has no call for a built-in's arity, but a compiled bundle carries the
    # declaration of every built-in its plans call: compile (never run) one calling each.
    interpreter = _Interpreter()
    body = "\n".join(f"\t{name}(1)" for name in names)
    source = f"package meshward_builtin_probe\n\nprobe if {{\n{body}\n}}\n"
    if _lib.regoAddModule(interpreter.handle, b"probe.rego", source.encode()):
        return None
    if _lib.regoAddEntrypoint(interpreter.handle, b"meshward_builtin_probe/probe"):
        return None
    handle = _lib.regoBuild(interpreter.handle)
    if not handle:
        return None
    bundle = _Bundle(handle)
    found: dict[str, _Builtin | None] = dict.fromkeys(names)
    for node in _find(int(_lib.regoBundleNode(bundle.handle)), "rego-builtinfunction"):
        parts = _children(node)
        if len(parts) < 2:
            continue
        name = _node_text(parts[0])
        declaration = _children(parts[1])
        if name not in found or not declaration:
            continue
        found[name] = _Builtin(
            arity=int(_lib.regoNodeSize(declaration[0])),
            returns=len(declaration) > 1 and _type_name(declaration[1]) == "rego-builtin-result",
            available=bool(_lib.regoIsAvailableBuiltIn(interpreter.handle, name.encode())),
        )
    return found


def _find(node: int, type_name: str) -> Iterator[int]:
    if _type_name(node) == type_name:
        yield node
        return
    for child in _children(node):
        yield from _find(child, type_name)


# -- evaluation -----------------------------------------------------------------------


class RegoEngine:
    """A compiled policy set: one bundle, evaluated by any number of threads.

    Built by ``load_rego_policies`` / ``compile_rego``; immutable. ``decision`` is the
    decision's data path (``data.envoy.authz.allow``), ``package`` the package defining
    it, ``dry_run_packages`` the packages annotated ``custom: {dry_run: true}``,
    ``version`` a digest of the sources and decision path.
    """

    def __init__(
        self,
        bundle: _Bundle,
        *,
        decision: tuple[str, ...],
        package: tuple[str, ...],
        dry_run_packages: frozenset[str],
        files: tuple[str, ...],
        version: str,
        clock: Callable[[], float],
    ) -> None:
        self._bundle = bundle
        self._entrypoint = "/".join(decision).encode()
        self._clock = clock
        self._local = threading.local()
        self.decision = "data." + ".".join(decision)
        self.package = ".".join(package)
        self.dry_run_packages = dry_run_packages
        self.dry_run = self.package in dry_run_packages
        self.files = files
        self.version = version

    def evaluate(
        self, input_document: Mapping[str, Any], *, timeout: float | None = None
    ) -> RegoResult:
        """Evaluate the decision for one input; never raises for what the policy does.

        ``timeout`` (seconds): a result that arrives later is discarded and the error
        is ``timeout``; rego-cpp cannot be interrupted, so this bounds what is
        enforced, not how long the call takes (see the module docstring).
        """
        started = self._clock()
        interpreter: _Interpreter | None = getattr(self._local, "interpreter", None)
        if interpreter is None:
            interpreter = self._local.interpreter = _Interpreter()
        try:
            handle = _input_handle(input_document)
        except (TypeError, ValueError, RecursionError) as exc:
            return self._failed("eval_error", f"the input cannot be given to Rego: {exc}")
        if not interpreter.set_input(handle):
            return self._failed("eval_error", _last_error(interpreter.handle))
        output = _lib.regoBundleQueryEntrypoint(
            interpreter.handle, self._bundle.handle, self._entrypoint
        )
        if not output:
            return self._failed("eval_error", _last_error(interpreter.handle))
        try:
            result = self._read(output)
        finally:
            _lib.regoFreeOutput(output)
        if timeout is not None and self._clock() - started > timeout:
            return self._failed(
                "timeout", f"the decision took longer than {timeout:g} s and was discarded"
            )
        return result

    def _failed(self, error: str, detail: str) -> RegoResult:
        return RegoResult(self.decision, error=error, detail=detail, dry_run=self.dry_run)

    def _read(self, output: int) -> RegoResult:
        root = int(_lib.regoOutputNode(output))
        kind = _lib.regoNodeType(root)
        if kind in (_ERROR, _ERROR_SEQ):
            return self._failed("eval_error", _error_detail(root, kind))
        if kind == _RESULTS:
            results = _children(root)
            terms = (
                [c for c in _children(results[0]) if _lib.regoNodeType(c) == _TERMS]
                if results
                else []
            )
            values = _children(terms[0]) if terms else []
            if values:
                try:
                    value = _value(values[0])
                except (_OutputError, ValueError, RecursionError) as exc:
                    return self._failed("eval_error", f"unreadable rego-cpp result: {exc}")
                return RegoResult(self.decision, value=value, dry_run=self.dry_run)
        return self._failed("undefined", f"{self.decision} is undefined for this input")


def _error_detail(root: int, kind: int) -> str:
    parts: list[str] = []
    for error in [root] if kind == _ERROR else _children(root):
        message = code = ""
        for part in _children(error):
            part_kind = _lib.regoNodeType(part)
            if part_kind == _ERROR_MSG:
                message = _node_text(part)
            elif part_kind == _ERROR_CODE:
                code = _node_text(part)
        parts.append(f"{code}: {message}" if code and message else message or code)
    return "; ".join(p for p in parts if p) or "rego-cpp reported an error"


def _value(node: int) -> Any:
    kind = _lib.regoNodeType(node)
    if kind == _TRUE:
        return True
    if kind == _FALSE:
        return False
    if kind == _NULL:
        return None
    if kind == _STRING:
        return _string(_node_text(node))
    if kind == _INT:
        return int(_node_text(node))
    if kind == _FLOAT:
        number = float(_node_text(node))
        if not math.isfinite(number):
            raise _OutputError(f"{number} has no JSON form")
        return number
    if kind in (_ARRAY, _SET):
        return [_value(child) for child in _children(node)]
    if kind == _OBJECT:
        out: dict[str, Any] = {}
        for item in _children(node):
            key_node, value_node = _children(item)
            key = _value(key_node)
            out[key if isinstance(key, str) else json.dumps(key)] = _value(value_node)
        return out
    if kind in (_TERM, _SCALAR):
        return _value(int(_lib.regoNodeGet(node, 0)))
    raise _OutputError(f"unexpected node {_type_name(node)}")


def _string(text: str) -> str:
    # rego-cpp stores a string either as a quoted JSON literal or as the escaped text
    # between the quotes; both are JSON once quoted.
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        decoded = json.loads(text)
    elif "\\" not in text:
        return text
    else:
        decoded = json.loads(f'"{text}"')
    if not isinstance(decoded, str):
        raise _OutputError("a string that is not one")
    return decoded


_needs_escape = re.compile(r'["\\\x00-\x1f]').search


def _escaped(text: str) -> bytes:
    if _needs_escape(text) is None:
        return text.encode()
    return json.dumps(text, ensure_ascii=False)[1:-1].encode()


def _input_handle(document: Mapping[str, Any]) -> int:
    handle = int(_lib.regoNewInput() or 0)
    if not handle:
        raise ValueError("rego-cpp could not allocate an input")
    try:
        _push(handle, document)
    except BaseException:
        _lib.regoFreeInput(handle)
        raise
    return handle


# Bound once: the input is built with one C call per value, the bulk of a decision's
# cost, so the lookups are kept out of the loop.
_in_string = _lib.regoInputString
_in_item = _lib.regoInputObjectItem
_in_object = _lib.regoInputObject


def _push(handle: int, value: Any) -> None:
    """Append ``value`` to the input under construction (rego-cpp builds it as a stack)."""
    kind = type(value)
    if kind is str:
        status = _in_string(handle, _escaped(value))
    elif kind is dict or isinstance(value, Mapping):
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"object key {key!r} is not a string")
            if _in_string(handle, _escaped(key)):
                raise ValueError("rego-cpp refused an object key")
            _push(handle, item)
            if _in_item(handle):
                raise ValueError("rego-cpp refused an object item")
        status = _in_object(handle, len(value))
    elif kind is bool:
        status = _lib.regoInputBoolean(handle, value)
    elif value is None:
        status = _lib.regoInputNull(handle)
    elif isinstance(value, int):
        # An int beyond 64 bits would wrap around silently.
        if value in _INT64:
            status = _lib.regoInputInt(handle, value)
        else:
            status = _lib.regoInputFloat(handle, float(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no JSON form")
        status = _lib.regoInputFloat(handle, value)
    elif isinstance(value, list | tuple):
        for item in value:
            _push(handle, item)
        status = _lib.regoInputArray(handle, len(value))
    elif isinstance(value, set | frozenset):
        for item in value:
            _push(handle, item)
        status = _lib.regoInputSet(handle, len(value))
    else:
        raise TypeError(f"a {type(value).__name__} has no JSON form")
    if status:
        raise ValueError(f"rego-cpp refused a {type(value).__name__}")

"""Rego policies (OPA-Envoy style) compiled once and evaluated in process by regorus.

The directory is read as an OPA bundle: every ``*.rego`` (recursively; hidden entries
and ``*_test.rego`` skipped) is a module, every ``data.json`` / ``data.yaml`` /
``data.yml`` a data document mounted at its directory (``roles/data.json`` →
``data.roles``; the root one must be an object). Loading is all or nothing: every
problem in every file is collected and ``PolicyLoadError`` lists them as
``file:line: message``; no engine is returned.

Compilation stages, in order, each collecting issues:

1. parse each module with regorus (syntax errors with their line; Rego v1 only);
2. scan each module's tokens: calls, rule heads, METADATA blocks (``authz.rego_scan``);
3. check every call against the supported built-ins (``authz.rego_builtins``), since
   regorus reports an unknown function or a wrong argument count only when the call
   is evaluated;
4. read and merge the data documents (``authz.rego_data``);
5. cross-checks: rules against data paths, the decision rule exists, dry-run flags
   (``authz.rego_annotations``), no enforced module calls a dry-run package's function;
6. build the programs whose decision is ``data.envoy.authz.allow``.

Dry-run packages (annotated ``custom: {dry_run: true}``, or listed by the caller) are
staged, not enforced. When there are any, two programs are built: the full one, and the
*enforced* one without the dry-run packages' modules. ``evaluate_enforced`` answers
from the enforced program and also evaluates the full one as the shadow, so a team can
see what its staged package would change while the rest of the set enforces. A rule
of an enforced package that reads a dry-run package's rule sees it undefined in the
enforced program; calling a dry-run package's *function* is refused at load, since it
would fail every enforced evaluation. When the decision's own package is dry-run there
is nothing to enforce: the full program answers and the result says ``dry_run``.

Evaluation facts (see ``authz.regorus_binding``):

- Each thread evaluates with its own regorus engine, built from the program's sources
  on its first evaluation.
- A built-in that fails (``to_number("x")``) fails the evaluation (``eval_error``), as
  ``opa eval --strict-builtin-errors`` does; OPA's default leaves the call undefined.
  The built-ins meshward adds (``io.jwt.*``, ``crypto.*``) follow OPA's default.
- Evaluation holds the GIL and regorus's Python binding exposes no execution limit. A
  timeout therefore discards a late result (the request is denied with ``timeout``)
  but cannot stop the evaluation before it ends; ``watch_evaluations`` lets the server
  hand each evaluation's start and end to a watchdog that bounds the stall
  (``meshward.rego_watchdog``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from authz.errors import PolicyIssue, PolicyLoadError
from authz.policy_files import list_files, read_files
from authz.rego_annotations import annotated_dry_run_packages
from authz.rego_builtins import (
    ADDED_CALL_RENAMES,
    BUILTINS_FILE,
    BUILTINS_MODULE,
    EXTENSIONS,
    call_problems,
)
from authz.rego_data import (
    DATA_FILE_NAMES,
    UNREADABLE,
    RegoDataDocument,
    merge_data,
    read_data,
    rule_data_conflicts,
)
from authz.rego_paths import DEFAULT_DECISION_PATH, parse_decision_path, parse_package_name
from authz.rego_scan import V0_MESSAGE, ModuleScan, RegoModule, rewrite_refs, scan
from authz.regorus_binding import EngineError, Program, QueryResult, query

__all__ = [
    "DATA_FILE_NAMES",
    "DEFAULT_DECISION_PATH",
    "TEST_MODULE_SUFFIX",
    "V0_MESSAGE",
    "RegoDataDocument",
    "RegoEngine",
    "RegoEvaluation",
    "RegoModule",
    "RegoResult",
    "compile_rego",
    "is_rego_source",
    "load_rego_policies",
    "load_rego_sources",
    "parse_decision_path",
    "watch_evaluations",
]


# -- public values --------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RegoResult:
    """The decision of one evaluation, or why there is none.

    ``error`` is None when the decision is defined; ``value`` is then the decision as
    JSON-like Python (objects → dict, arrays and sets → list, ``null`` → None).
    Otherwise ``error`` is ``undefined``, ``eval_error`` or ``timeout`` and ``detail``
    says what happened. The engine gives no provenance, so ``decision`` (the decision
    path, ``data.envoy.authz.allow``) is what decided; ``dry_run`` is whether its
    package is a dry-run package.
    """

    decision: str
    value: Any = None
    error: str | None = None
    detail: str = ""
    dry_run: bool = False

    @property
    def defined(self) -> bool:
        return self.error is None


@dataclass(slots=True, frozen=True)
class RegoEvaluation:
    """The enforced result of one request and, with dry-run packages, the shadow one.

    ``shadow`` is the full bundle's result (dry-run packages included); None when the
    set has no dry-run package, or when ``result`` already comes from the full bundle
    because the decision's own package is dry-run.
    """

    result: RegoResult
    shadow: RegoResult | None = None


# -- loading --------------------------------------------------------------------------


def load_rego_policies(
    directory: Path,
    *,
    decision_path: str = DEFAULT_DECISION_PATH,
    dry_run_packages: Iterable[str] = (),
    clock: Callable[[], float] = time.monotonic,
) -> RegoEngine:
    """Read every module and data document under ``directory`` and compile them.

    ``dry_run_packages`` are staged in addition to the annotated ones (a name no module
    defines is kept in ``RegoEngine.unknown_dry_run_packages``, not refused).
    Raises PolicyLoadError listing every problem, ValueError for a bad decision path or
    package name.
    """
    if not directory.is_dir():
        raise PolicyLoadError(
            [PolicyIssue(str(directory), 0, "", "is not a directory of Rego modules and data")]
        )
    issues: list[PolicyIssue] = []
    sources = read_files(list_files(directory, is_rego_source), issues)
    return load_rego_sources(
        directory,
        sources,
        decision_path=decision_path,
        dry_run_packages=dry_run_packages,
        clock=clock,
        issues=issues,
    )


TEST_MODULE_SUFFIX = "_test.rego"  # `opa test`'s convention: never served


def is_rego_source(path: Path) -> bool:
    """A module the server serves (tests excluded) or a data document."""
    is_module = path.suffix == ".rego" and not path.name.endswith(TEST_MODULE_SUFFIX)
    return is_module or path.name in DATA_FILE_NAMES


def load_rego_sources(
    directory: Path,
    sources: Sequence[tuple[Path, bytes]],
    *,
    decision_path: str = DEFAULT_DECISION_PATH,
    dry_run_packages: Iterable[str] = (),
    clock: Callable[[], float] = time.monotonic,
    issues: list[PolicyIssue] | None = None,
) -> RegoEngine:
    """Like ``load_rego_policies`` for files under ``directory`` already read.

    The policy store reads each file once and hands the same bytes here and to its
    version digest, so a file rewritten mid-reload cannot be served under another
    version's name.
    """
    decision = parse_decision_path(decision_path)
    configured = frozenset(parse_package_name(p) for p in dry_run_packages)
    issues = issues if issues is not None else []
    modules: list[RegoModule] = []
    documents: list[RegoDataDocument] = []
    for path, raw in sources:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            issues.append(PolicyIssue(str(path), 0, "", f"cannot be read: {exc}"))
            continue
        if path.suffix == ".rego":
            modules.append(RegoModule(str(path), text))
        else:
            value = read_data(str(path), text, issues)
            if value is not UNREADABLE:
                parts = path.relative_to(directory).parent.parts
                documents.append(RegoDataDocument(str(path), parts, value))
    return _compile(modules, documents, decision, configured, issues, str(directory), clock)


def compile_rego(
    modules: Sequence[RegoModule],
    data: Sequence[RegoDataDocument] = (),
    *,
    decision_path: str = DEFAULT_DECISION_PATH,
    dry_run_packages: Iterable[str] = (),
    clock: Callable[[], float] = time.monotonic,
) -> RegoEngine:
    """Like ``load_rego_policies`` for sources already in memory."""
    decision = parse_decision_path(decision_path)
    configured = frozenset(parse_package_name(p) for p in dry_run_packages)
    return _compile(list(modules), list(data), decision, configured, [], "<rego>", clock)


# -- compilation ----------------------------------------------------------------------


def _compile(
    modules: list[RegoModule],
    documents: list[RegoDataDocument],
    decision: tuple[str, ...],
    configured_dry_run: frozenset[str],
    issues: list[PolicyIssue],
    origin: str,
    clock: Callable[[], float],
) -> RegoEngine:
    if not modules:
        issues.append(PolicyIssue(origin, 0, "", "holds no Rego modules (*.rego)"))
    scans: dict[str, ModuleScan] = {}
    for module in modules:
        if module.file in scans:
            issues.append(PolicyIssue(module.file, 0, "", "is given twice"))
            continue
        problems = _parse_problems(module)
        if problems:
            issues.extend(problems)
            continue
        scans[module.file] = scan(module.text)

    functions: dict[tuple[str, ...], set[str]] = {}
    for found in scans.values():
        functions.setdefault(found.package, set()).update(
            ".".join(rule.path) for rule in found.rules if rule.function
        )
    issues.extend(call_problems(scans, functions))
    packages = frozenset(".".join(found.package) for found in scans.values())
    dry_run = annotated_dry_run_packages(scans, issues) | (configured_dry_run & packages)
    issues.extend(_dry_run_function_calls(scans, functions, dry_run))
    data, sources = merge_data(documents, issues)
    issues.extend(rule_data_conflicts(scans, data, sources))
    package = _decision_package(scans, decision, origin, issues)
    if issues:
        raise PolicyLoadError(sorted(issues, key=lambda i: (i.file, i.line or 0)))

    entrypoint = "/".join(decision)
    data_json = json.dumps(data)
    # What the engine is given: each module rewritten once, for both programs.
    given = [
        RegoModule(
            m.file,
            rewrite_refs(m.text, aliases=scans[m.file].data_imports, renames=ADDED_CALL_RENAMES),
        )
        for m in modules
    ]
    program = _build(given, data_json)
    enforced: Program | None = None
    if dry_run and ".".join(package) not in dry_run:
        staged = {file for file, found in scans.items() if ".".join(found.package) in dry_run}
        enforced = _build([m for m in given if m.file not in staged], data_json)
    digest = hashlib.sha256(entrypoint.encode())
    for module in modules:
        digest.update(b"\0" + module.file.encode() + b"\0" + module.text.encode())
    digest.update(b"\0" + json.dumps(data, sort_keys=True).encode())
    digest.update(b"\0" + json.dumps(sorted(configured_dry_run)).encode())
    return RegoEngine(
        program,
        enforced=enforced,
        decision=decision,
        package=package,
        packages=packages,
        dry_run_packages=dry_run,
        unknown_dry_run_packages=configured_dry_run - packages,
        files=tuple(m.file for m in modules) + tuple(d.file for d in documents),
        version=digest.hexdigest()[:16],
        clock=clock,
    )


def _parse_problems(module: RegoModule) -> list[PolicyIssue]:
    # Each module on its own, so that every file's errors are reported.
    try:
        Program([(module.file, module.text)]).check()
    except EngineError as exc:
        return [_issue(exc, module.file)]
    return []


_V0_HINTS = ("`if` keyword is required", "`contains` keyword is required")


def _issue(error: EngineError, origin: str) -> PolicyIssue:
    file, line, what = error.file or origin, error.line, error.detail
    if any(hint in what for hint in _V0_HINTS):
        return PolicyIssue(file, 0, "", f"{V0_MESSAGE} ({what})", line)
    return PolicyIssue(file, 0, "", f"does not parse: {what}", line)


def _build(modules: Sequence[RegoModule], data_json: str) -> Program:
    """``modules`` as rewritten for the engine, with the added built-ins' wrappers."""
    program = Program(
        [(m.file, m.text) for m in modules] + [(BUILTINS_FILE, BUILTINS_MODULE)],
        data_json,
        EXTENSIONS,
    )
    try:
        program.check()
    except EngineError as exc:
        raise PolicyLoadError([_issue(exc, modules[0].file)]) from None
    return program


def _decision_package(
    scans: Mapping[str, ModuleScan],
    decision: tuple[str, ...],
    origin: str,
    issues: list[PolicyIssue],
) -> tuple[str, ...]:
    """The package that defines the decision rule; an issue when no rule does."""
    for found in scans.values():
        for rule in found.rules:
            full = found.package + rule.path
            if full[: len(decision)] == decision or decision[: len(full)] == full:
                return found.package
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


def _dry_run_function_calls(
    scans: Mapping[str, ModuleScan],
    functions: Mapping[tuple[str, ...], set[str]],
    dry_run: frozenset[str],
) -> list[PolicyIssue]:
    # The engine fails a call of a function no module defines when it is evaluated: in
    # the enforced program that would deny every request, so it is refused while the
    # author is still looking.
    if not dry_run:
        return []
    staged = [tuple(p.split(".")) for p in dry_run]
    problems: list[PolicyIssue] = []
    for file, found in scans.items():
        if ".".join(found.package) in dry_run:
            continue
        for call in found.calls:
            root, _, rest = call.name.partition(".")
            if root == "data":
                path = tuple(rest.split("."))
            elif root in found.data_imports and rest:
                path = (*found.data_imports[root], *rest.split("."))
            else:
                continue
            for package in staged:
                name = ".".join(path[len(package) :])
                if path[: len(package)] == package and name in functions.get(package, ()):
                    problems.append(
                        PolicyIssue(
                            file,
                            0,
                            "",
                            f"calls `{call.name}`, a function of dry-run package "
                            f"{'.'.join(package)}: the enforced policy set leaves that "
                            "package out, so the call would fail on every request; move the "
                            "function to a package that is enforced",
                            call.line,
                        )
                    )
    return problems


# -- evaluation -----------------------------------------------------------------------


class EvaluationWatch(Protocol):
    """Told when an evaluation starts and ends (``meshward.rego_watchdog``)."""

    def started(self) -> None: ...

    def finished(self) -> None: ...


_watch: EvaluationWatch | None = None


def watch_evaluations(watch: EvaluationWatch | None) -> None:
    """Report every evaluation of this process to ``watch`` (None: to nobody)."""
    global _watch
    _watch = watch


class RegoEngine:
    """A compiled policy set: its programs, evaluated by any number of threads.

    Built by ``load_rego_policies`` / ``compile_rego``; immutable. ``decision`` is the
    decision's data path (``data.envoy.authz.allow``), ``package`` the package defining
    it, ``packages`` every package the modules define, ``dry_run_packages`` those staged
    (annotated ``custom: {dry_run: true}`` or configured), ``dry_run`` whether the
    decision's own package is one of them, ``unknown_dry_run_packages`` configured
    names no module defines, ``version`` a digest of the sources, decision path and
    configured dry-run packages.
    """

    def __init__(
        self,
        program: Program,
        *,
        enforced: Program | None = None,
        decision: tuple[str, ...],
        package: tuple[str, ...],
        packages: frozenset[str],
        dry_run_packages: frozenset[str],
        unknown_dry_run_packages: frozenset[str] = frozenset(),
        files: tuple[str, ...],
        version: str,
        clock: Callable[[], float],
    ) -> None:
        self._program = program
        self._enforced = enforced
        self._clock = clock
        self.decision = "data." + ".".join(decision)
        self.package = ".".join(package)
        self.packages = packages
        self.dry_run_packages = dry_run_packages
        self.unknown_dry_run_packages = unknown_dry_run_packages
        self.dry_run = self.package in dry_run_packages
        self.files = files
        self.modules = sum(1 for f in files if f.endswith(".rego"))
        self.version = version

    def evaluate(
        self, input_document: Mapping[str, Any], *, timeout: float | None = None
    ) -> RegoResult:
        """Evaluate the decision over every module, dry-run packages included.

        Never raises for what the policy does. ``timeout`` (seconds): a result that
        arrives later is discarded and the error is ``timeout``; the evaluation itself
        cannot be interrupted (see the module docstring).
        """
        return self._query(self._program, input_document, timeout)

    def evaluate_enforced(
        self, input_document: Mapping[str, Any], *, timeout: float | None = None
    ) -> RegoEvaluation:
        """The decision the server enforces, and the shadow one with dry-run packages.

        ``timeout`` applies to each of the two results on its own.
        """
        if self._enforced is None:
            return RegoEvaluation(self._query(self._program, input_document, timeout))
        result = self._query(self._enforced, input_document, timeout)
        shadow = self._query(self._program, input_document, timeout)
        return RegoEvaluation(result, shadow)

    def _query(
        self, program: Program, input_document: Mapping[str, Any], timeout: float | None
    ) -> RegoResult:
        # This thread's engine, parsed on its first use of the program: not part of the
        # evaluation that the timeout and the watchdog bound (a large data set takes tens
        # of milliseconds to load, and the first request after a reload would pay it).
        engine = program.engine()
        started = self._clock()
        watch = _watch
        if watch is None:
            answer: QueryResult = query(engine, self.decision, input_document)
        else:
            watch.started()
            try:
                answer = query(engine, self.decision, input_document)
            finally:
                watch.finished()
        if timeout is not None and self._clock() - started > timeout:
            return self._failed(
                "timeout", f"the decision took longer than {timeout:g} s and was discarded"
            )
        if answer.outcome == "value":
            return RegoResult(self.decision, value=answer.value, dry_run=self.dry_run)
        if answer.outcome == "undefined":
            return self._failed("undefined", f"{self.decision} is undefined for this input")
        return self._failed("eval_error", answer.detail)

    def _failed(self, error: str, detail: str) -> RegoResult:
        return RegoResult(self.decision, error=error, detail=detail, dry_run=self.dry_run)

"""regorus, Microsoft's Rego engine in Rust, the only module that imports it.

The engine comes from the PyPI package ``gordon-to-regorus`` (an unmodified,
automatically republished build of microsoft/regorus); an official package would
replace it by changing the import below.

Facts of that binding this module is built around:

- An ``Engine`` is *unsendable*: only the thread that made it may use it or drop it
  (another thread panics, or leaks it with a warning). A ``Program`` therefore keeps
  the sources, and each thread evaluates with its own engine, built from them on first
  use and kept in a per-thread cache that drops old programs' engines in that thread.
- Evaluation holds the GIL and cannot be interrupted from Python; the binding exposes
  none of regorus's execution limits.
- Undefined and ``null`` both come back as None from ``eval_rule``; the JSON form tells
  them apart (``"<undefined>"``), and sets keep Rego's order there.
- Unknown functions and wrong argument counts are reported when a rule calling them is
  evaluated, not when the module is added; ``authz.rego_builtins`` checks calls at load.
- Errors carry a Rust backtrace unless ``RUST_LIB_BACKTRACE=0``: capturing one costs
  about 18 µs per failed evaluation, so it is turned off before the import.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any, NamedTuple

os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

import regorus  # after the backtrace setting, which anyhow reads once

__all__ = [
    "EngineError",
    "Extension",
    "Program",
    "QueryResult",
    "builtin_arity",
    "builtin_names",
    "describe",
    "message",
    "query",
]

_UNDEFINED_JSON = '"<undefined>"'
_ENGINES_PER_THREAD = 4  # a version's enforced and full programs, and the previous ones


class EngineError(Exception):
    """regorus refused a module or data document: ``file`` and ``line`` when it says."""

    def __init__(self, text: str) -> None:
        self.file, self.line, self.detail = describe(text)
        super().__init__(_located(self.file, self.line, self.detail))


@dataclass(slots=True, frozen=True)
class Extension:
    """A function implemented in Python that policies call: ``name`` takes ``nargs``."""

    name: str
    nargs: int
    function: Callable[..., Any]


class QueryResult(NamedTuple):
    """One query's answer: ``value`` when ``outcome`` is ``value``, else ``detail``.

    ``outcome`` is ``value``, ``undefined`` or ``eval_error``.
    """

    outcome: str
    value: Any = None
    detail: str = ""


_serials = count()
_local = threading.local()


class Program:
    """Modules and data, evaluated by any thread with an engine of its own.

    ``modules`` are (file, text) pairs; ``data`` a JSON object text. Building an engine
    parses the modules again, so ``check`` is called once where the sources are read,
    and the first evaluation in each thread pays for one more parse.
    """

    def __init__(
        self,
        modules: Sequence[tuple[str, str]],
        data_json: str = "{}",
        extensions: Sequence[Extension] = (),
    ) -> None:
        self._modules = tuple(modules)
        self._data = data_json
        self._extensions = tuple(extensions)
        self._serial = next(_serials)

    def check(self) -> None:
        """Build an engine here and drop it; raises EngineError with regorus's message."""
        self._build()

    def engine(self) -> Any:
        """This thread's engine for the program."""
        engines: OrderedDict[int, Any] | None = getattr(_local, "engines", None)
        if engines is None:
            engines = _local.engines = OrderedDict()
        engine = engines.get(self._serial)
        if engine is None:
            engine = engines[self._serial] = self._build()
            while len(engines) > _ENGINES_PER_THREAD:
                engines.popitem(last=False)
        return engine

    def _build(self) -> Any:
        engine = regorus.Engine()
        try:
            for extension in self._extensions:
                engine.add_extension(extension.name, extension.nargs, extension.function)
            for file, text in self._modules:
                engine.add_policy(file, text)
            engine.add_data_json(self._data)
        except RuntimeError as exc:
            raise EngineError(str(exc)) from None
        return engine


def query(engine: Any, rule: str, input_document: Mapping[str, Any]) -> QueryResult:
    """Evaluate ``rule`` (``data.envoy.authz.allow``) on ``engine`` for ``input_document``."""
    try:
        engine.set_input(input_document)
    except (TypeError, ValueError, OverflowError, RecursionError, RuntimeError) as exc:
        return QueryResult("eval_error", detail=f"the input cannot be given to Rego: {exc}")
    return evaluate(engine, rule)


def evaluate(engine: Any, rule: str) -> QueryResult:
    """Evaluate ``rule`` on ``engine`` with the input it holds."""
    try:
        text = engine.eval_rule_as_json(rule)
    except RuntimeError as exc:
        return QueryResult("eval_error", detail=message(exc))
    if text == _UNDEFINED_JSON and engine.eval_rule(rule) is None:
        return QueryResult("undefined")
    return QueryResult("value", value=json.loads(text))


_LOCATION = re.compile(r"-->\s*(?P<file>.*?):(?P<line>\d+):(?P<col>\d+)")
_ERROR_LINE = re.compile(r"^error:\s*(?P<message>.*)$", re.MULTILINE)


def describe(text: str) -> tuple[str | None, int | None, str]:
    """The file, line and error of a regorus message, without its source excerpt."""
    text = text.split("Stack backtrace:", 1)[0].strip()
    found = _ERROR_LINE.findall(text)
    what = found[-1].strip() if found else text
    location = _LOCATION.search(text)
    if location is None:
        return None, None, what
    return location.group("file"), int(location.group("line")), what


def message(exc: BaseException) -> str:
    """regorus's message as ``file:line: error``."""
    return _located(*describe(str(exc)))


def _located(file: str | None, line: int | None, what: str) -> str:
    return f"{file}:{line}: {what}" if file is not None else what


def builtin_names() -> frozenset[str]:
    """Every built-in the engine has (its own ``opa.runtime().builtins``)."""
    return frozenset(str(name) for name in _runtime().get("builtins", ()))


_RUNTIME: dict[str, Any] = {}
_RUNTIME_LOCK = threading.Lock()


def _runtime() -> dict[str, Any]:
    with _RUNTIME_LOCK:
        if not _RUNTIME:
            engine = regorus.Engine()
            engine.add_policy("runtime.rego", "package meshward_runtime\nr := opa.runtime()\n")
            _RUNTIME.update(json.loads(engine.eval_rule_as_json("data.meshward_runtime.r")))
        return _RUNTIME


_EXPECTS = re.compile(r"expects (\d+) argument")


def builtin_arity(name: str) -> int | None:
    """How many arguments built-in ``name`` takes, asked of the engine (None: unknown).

    regorus checks the count when the call is evaluated and says what it expects, so
    the built-in is called once with no argument.
    """
    engine = regorus.Engine()
    engine.add_policy("arity.rego", f"package meshward_arity\nr := {name}()\n")
    try:
        engine.eval_rule_as_json("data.meshward_arity.r")
    except RuntimeError as exc:
        found = _EXPECTS.search(str(exc))
        return int(found.group(1)) if found else None
    return 0

"""Calls in Rego modules checked against the built-ins rego-cpp really has.

rego-cpp 1.5 is lenient where OPA 1.x is strict, and that leniency fails open or
crashes at request time: OPA built-ins it lacks (``http.send``, ``net.*``,
``graphql.*``…) are placeholders that evaluate to undefined, unknown functions only
fail when evaluated, and a built-in called with fewer arguments than it takes
(``count()``) compiles and then crashes the process (SIGSEGV) when evaluated. So every
call a module makes is checked at load, and what rego-cpp knows of a built-in is asked
once per name per process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from authz.errors import PolicyIssue
from authz.rego_binding import (
    Bundle,
    Interpreter,
    children,
    find,
    lib,
    node_text,
    type_name,
)
from authz.rego_scan import Call, ModuleScan

__all__ = ["call_problems"]

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


def call_problems(
    scans: Mapping[str, ModuleScan], functions: Mapping[tuple[str, ...], set[str]]
) -> list[PolicyIssue]:
    """Every call in ``scans`` (file → scan) that rego-cpp would not run as written.

    ``functions`` maps each package to the functions its modules define; calls into
    ``data``, ``input`` and imports are left to rego-cpp and OPA's own checks.
    """
    problems: list[PolicyIssue] = []
    pending: list[tuple[str, Call]] = []
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
    interpreter = Interpreter()
    body = "\n".join(f"\t{name}(1)" for name in names)
    source = f"package meshward_builtin_probe\n\nprobe if {{\n{body}\n}}\n"
    if lib.regoAddModule(interpreter.handle, b"probe.rego", source.encode()):
        return None
    if lib.regoAddEntrypoint(interpreter.handle, b"meshward_builtin_probe/probe"):
        return None
    handle = lib.regoBuild(interpreter.handle)
    if not handle:
        return None
    bundle = Bundle(handle)
    found: dict[str, _Builtin | None] = dict.fromkeys(names)
    for node in find(int(lib.regoBundleNode(bundle.handle)), "rego-builtinfunction"):
        parts = children(node)
        if len(parts) < 2:
            continue
        name = node_text(parts[0])
        declaration = children(parts[1])
        if name not in found or not declaration:
            continue
        found[name] = _Builtin(
            arity=int(lib.regoNodeSize(declaration[0])),
            returns=len(declaration) > 1 and type_name(declaration[1]) == "rego-builtin-result",
            available=bool(lib.regoIsAvailableBuiltIn(interpreter.handle, name.encode())),
        )
    return found

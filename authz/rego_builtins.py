"""The built-ins a policy may call: regorus's own, and OPA's ``io.jwt``/``crypto`` ones meshward adds.

Every call a module makes is checked at load (regorus itself only notices an unknown
function or a wrong argument count when the call is evaluated): a name that is neither
a function of the policy set nor a supported built-in, a built-in meshward refuses
(``http.send``, ``opa.runtime``, ``print``), and a wrong number of arguments are load
errors with the file and line.

The added built-ins run in Python (``authz.rego_jwt``, ``authz.rego_crypto``) as regorus
extensions. OPA leaves a built-in call undefined when it fails (a malformed token);
regorus fails the whole evaluation when an extension raises. So each added built-in
is an extension that answers ``{"ok": true, "value": …}`` or ``{"ok": false}``, wrapped
in a Rego function of package ``meshward_builtins`` that is undefined unless ``ok``;
the calls in the policy are renamed to the wrapper (on the same line, so lines in
errors stay right) before regorus sees the module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from authz import rego_crypto, rego_jwt
from authz.errors import PolicyIssue
from authz.rego_jwt import BuiltinError
from authz.rego_scan import ModuleScan
from authz.regorus_binding import Extension, builtin_arity, builtin_names

__all__ = [
    "ADDED_BUILTINS",
    "ADDED_CALL_RENAMES",
    "BUILTINS_FILE",
    "BUILTINS_MODULE",
    "EXTENSIONS",
    "call_problems",
    "supported_builtins",
]

_ADDED: dict[str, Callable[..., Any]] = {
    "io.jwt.decode": rego_jwt.decode,
    "io.jwt.decode_verify": rego_jwt.decode_verify,
    "io.jwt.encode_sign": rego_jwt.encode_sign,
    "io.jwt.encode_sign_raw": rego_jwt.encode_sign_raw,
    **{f"io.jwt.verify_{alg.lower()}": rego_jwt.verify(alg) for alg in rego_jwt.VERIFY_ALGORITHMS},
    "crypto.md5": rego_crypto.digest("md5"),
    "crypto.sha1": rego_crypto.digest("sha1"),
    "crypto.sha256": rego_crypto.digest("sha256"),
    **{
        f"crypto.hmac.{name}": rego_crypto.hmac_digest(name)
        for name in ("md5", "sha1", "sha256", "sha512")
    },
    "crypto.hmac.equal": rego_crypto.hmac_equal,
    "crypto.x509.parse_certificates": rego_crypto.parse_certificates,
}
# The argument count of each added built-in, read off its Python signature.
ADDED_BUILTINS: Final[Mapping[str, int]] = {
    name: function.__code__.co_argcount for name, function in _ADDED.items()
}
BUILTINS_FILE = "<meshward builtins>"
_PACKAGE = "meshward_builtins"


def _wrapper_name(name: str) -> str:
    return name.replace(".", "_")


def _extension(function: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
    def call(*args: Any) -> dict[str, Any]:
        try:
            return {"ok": True, "value": function(*args)}
        except (BuiltinError, TypeError, ValueError):
            return {"ok": False}

    return call


EXTENSIONS: Final[tuple[Extension, ...]] = tuple(
    Extension(f"meshward.{_wrapper_name(name)}", ADDED_BUILTINS[name], _extension(function))
    for name, function in _ADDED.items()
)


def _module() -> str:
    lines = [f"package {_PACKAGE}", ""]
    for name, nargs in ADDED_BUILTINS.items():
        params = ", ".join(f"a{i}" for i in range(nargs))
        local = _wrapper_name(name)
        lines.append(f"{local}({params}) := r.value if {{ r := meshward.{local}({params}); r.ok }}")
    return "\n".join(lines) + "\n"


BUILTINS_MODULE: Final[str] = _module()
# Calls of the added built-ins, as the modules are given to the engine: their wrappers.
ADDED_CALL_RENAMES: Final[Mapping[str, str]] = {
    name: f"data.{_PACKAGE}.{_wrapper_name(name)}" for name in ADDED_BUILTINS
}


# Built-ins regorus has that a policy may not call.
_REFUSED: Final[Mapping[str, str]] = {
    "http.send": "regorus answers it undefined instead of sending; fetch the data into "
    "data documents instead",
    "opa.runtime": "it describes the engine, not OPA's runtime, so a policy cannot rely on it",
    "print": "it writes to meshward's stderr on every decision; debug with opa eval or opa test",
}
# OPA 1.0 dropped these v0 built-ins; the reason to give is the v1 one, with the replacement.
_REMOVED_IN_V1: Final[Mapping[str, str]] = {
    "any": "`some x in xs` with a test on x",
    "all": "`every x in xs { … }`",
    "re_match": "regex.match",
    "set_diff": "`a - b`",
    "net.cidr_overlap": "net.cidr_contains",
    "cast_array": "an array comprehension",
    "cast_set": "a set comprehension",
    "cast_string": "the value itself, checked with is_string",
    "cast_boolean": "the value itself, checked with is_boolean",
    "cast_null": "the value itself, checked with is_null",
    "cast_object": "the value itself, checked with is_object",
}


def supported_builtins() -> dict[str, int | None]:
    """Every built-in a policy may call, with its argument count where known."""
    internal = {name for name in builtin_names() if "__" in name}  # set operators
    names = (builtin_names() - _REFUSED.keys() - internal) | ADDED_BUILTINS.keys()
    return {name: _arity(name) for name in sorted(names)}


_ARITIES: dict[str, int | None] = {}
_ARITIES_LOCK = threading.Lock()


def _arity(name: str) -> int | None:
    if name in ADDED_BUILTINS:
        return ADDED_BUILTINS[name]
    with _ARITIES_LOCK:
        if name not in _ARITIES:
            _ARITIES[name] = builtin_arity(name)
        return _ARITIES[name]


def call_problems(
    scans: Mapping[str, ModuleScan], functions: Mapping[tuple[str, ...], set[str]]
) -> list[PolicyIssue]:
    """Every call in ``scans`` (file → scan) that the engine would not run as written.

    ``functions`` maps each package to the functions its modules define; calls into
    ``data``, ``input`` and imports are left to regorus.
    """
    problems: list[PolicyIssue] = []
    known = builtin_names() | ADDED_BUILTINS.keys()
    for file, scan in scans.items():
        local = functions.get(scan.package, set())
        for call in scan.calls:
            root = call.name.split(".", 1)[0]
            if root in ("data", "input") or root in scan.aliases or call.name in local:
                continue  # a function some module defines (or a mistake regorus reports)
            if call.name == "set" and call.argc == 0:
                continue  # the empty set, not a call
            message = _problem(call.name, call.argc, known)
            if message is not None:
                problems.append(PolicyIssue(file, 0, "", message, call.line))
    return problems


def _problem(name: str, argc: int, known: Iterable[str]) -> str | None:
    if name in _REFUSED:
        return f"`{name}` is not allowed: {_REFUSED[name]}"
    if name in _REMOVED_IN_V1:
        return f"`{name}` is a Rego v0 built-in, removed in Rego v1; use {_REMOVED_IN_V1[name]}"
    if name not in known:
        return (
            f"unknown function `{name}`: no module defines it and it is not a built-in "
            "meshward's Rego engine supports (see the README's list)"
        )
    arity = _arity(name)
    # One more argument binds the result: `count(xs, n)`.
    if arity is not None and argc not in (arity, arity + 1):
        plural = "" if arity == 1 else "s"
        return f"`{name}` takes {arity} argument{plural} (one more to bind its result), not {argc}"
    return None

"""rego-cpp through its C API: interpreters, bundles, input in and results out.

regopy's Python layer converts input without escaping strings, parses results from
rego-cpp's unescaped JSON and omits some entry points, so the C functions are called
directly, with their signatures declared on a handle of our own.

Strings: rego-cpp keeps strings JSON-escaped internally and its JSON output does not
escape strings that came in raw, so input strings are handed over escaped and results
are read node by node, never by parsing its JSON text (a quote in a header could
otherwise rewrite the decision).

Threads: an interpreter serves one thread at a time; a built bundle is read-only and
may be queried by any number of interpreters at once. A query is one blocking C call,
made through ctypes, which releases the GIL meanwhile.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

__all__ = [
    "Bundle",
    "Interpreter",
    "OutputError",
    "QueryResult",
    "children",
    "find",
    "input_handle",
    "last_error",
    "lib",
    "node_text",
    "query",
    "type_name",
]


def _open_library() -> Any:
    from regopy import rego_shared  # finds the shared library the way regopy does per platform

    library = ctypes.CDLL(rego_shared.path)
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
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = restype
    return library


lib: Any = _open_library()

# rego-cpp node kinds (rego.h); TRUE/FALSE are the raw kinds, before regopy merges them.
_TERM, _SCALAR, _ARRAY, _SET, _OBJECT = 1002, 1003, 1004, 1005, 1006
_INT, _FLOAT, _STRING, _TRUE, _FALSE, _NULL, _UNDEFINED = 1008, 1009, 1010, 1011, 1012, 1013, 1014
_TERMS, _RESULTS = 1015, 1017
_ERROR, _ERROR_MSG, _ERROR_CODE, _ERROR_SEQ = 1800, 1801, 1803, 1804
_LOG_NONE = 0
_INT64 = range(-(2**63), 2**63)


def last_error(interpreter: int) -> str:
    size = int(lib.regoErrorSize(interpreter)) + 1
    buf = ctypes.create_string_buffer(size)
    lib.regoError(interpreter, buf, size)
    return buf.value.decode("utf-8", "replace")


def node_text(node: int) -> str:
    size = int(lib.regoNodeValueSize(node)) + 1
    buf = ctypes.create_string_buffer(size)
    if lib.regoNodeValue(node, buf, size):
        raise OutputError("rego-cpp could not give a value")
    return buf.value.decode("utf-8")


def type_name(node: int) -> str:
    # regoNodeTypeNameSize counts one byte short, so a fixed buffer is used.
    buf = ctypes.create_string_buffer(128)
    lib.regoNodeTypeName(node, buf, 128)
    return buf.value.decode()


def children(node: int) -> list[int]:
    return [int(lib.regoNodeGet(node, i)) for i in range(int(lib.regoNodeSize(node)))]


class Interpreter:
    """One rego-cpp interpreter, with the input it was last given."""

    __slots__ = ("_input", "handle")

    def __init__(self) -> None:
        self.handle: int = int(lib.regoNew() or 0)
        self._input = 0
        if not self.handle:
            raise MemoryError("rego-cpp could not create an interpreter")
        # Its default log level prints every compile error to stdout.
        lib.regoSetLogLevel(self.handle, _LOG_NONE)

    def set_input(self, handle: int) -> bool:
        ok: bool = lib.regoSetInput(self.handle, handle) == 0
        # rego-cpp keeps reading the input it was given (freeing it early crashes the
        # next query), so the previous one is freed only once it is replaced.
        previous, self._input = self._input, handle
        if previous:
            lib.regoFreeInput(previous)
        return ok

    def __del__(self) -> None:
        if self.handle:
            lib.regoFree(self.handle)
        if self._input:
            lib.regoFreeInput(self._input)


class Bundle:
    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __del__(self) -> None:
        lib.regoFreeBundle(self.handle)


class OutputError(Exception):
    """A rego-cpp result that cannot be read as JSON-like data."""


def find(node: int, kind: str) -> Iterator[int]:
    """The outermost nodes of type ``kind`` (``rego-builtinfunction``) under ``node``."""
    if type_name(node) == kind:
        yield node
        return
    for child in children(node):
        yield from find(child, kind)


class QueryResult(NamedTuple):
    """One query's answer: ``value`` when ``outcome`` is ``value``, else ``detail``.

    ``outcome`` is ``value``, ``undefined`` or ``eval_error``.
    """

    outcome: str
    value: Any = None
    detail: str = ""


def query(interpreter: Interpreter, bundle: Bundle, entrypoint: bytes) -> QueryResult:
    """Evaluate ``entrypoint`` of ``bundle`` for the input ``interpreter`` holds."""
    output = lib.regoBundleQueryEntrypoint(interpreter.handle, bundle.handle, entrypoint)
    if not output:
        return QueryResult("eval_error", detail=last_error(interpreter.handle))
    try:
        return _read(output)
    finally:
        lib.regoFreeOutput(output)


def _read(output: int) -> QueryResult:
    root = int(lib.regoOutputNode(output))
    kind = lib.regoNodeType(root)
    if kind in (_ERROR, _ERROR_SEQ):
        return QueryResult("eval_error", detail=_error_detail(root, kind))
    if kind == _RESULTS:
        results = children(root)
        terms = (
            [c for c in children(results[0]) if lib.regoNodeType(c) == _TERMS] if results else []
        )
        values = children(terms[0]) if terms else []
        if values:
            try:
                value = _value(values[0])
            except (OutputError, ValueError, RecursionError) as exc:
                return QueryResult("eval_error", detail=f"unreadable rego-cpp result: {exc}")
            return QueryResult("value", value=value)
    return QueryResult("undefined")


def _error_detail(root: int, kind: int) -> str:
    parts: list[str] = []
    for error in [root] if kind == _ERROR else children(root):
        message = code = ""
        for part in children(error):
            part_kind = lib.regoNodeType(part)
            if part_kind == _ERROR_MSG:
                message = node_text(part)
            elif part_kind == _ERROR_CODE:
                code = node_text(part)
        parts.append(f"{code}: {message}" if code and message else message or code)
    return "; ".join(p for p in parts if p) or "rego-cpp reported an error"


def _value(node: int) -> Any:
    kind = lib.regoNodeType(node)
    if kind == _TRUE:
        return True
    if kind == _FALSE:
        return False
    if kind == _NULL:
        return None
    if kind == _STRING:
        return _string(node_text(node))
    if kind == _INT:
        return int(node_text(node))
    if kind == _FLOAT:
        number = float(node_text(node))
        if not math.isfinite(number):
            raise OutputError(f"{number} has no JSON form")
        return number
    if kind in (_ARRAY, _SET):
        return [_value(child) for child in children(node)]
    if kind == _OBJECT:
        out: dict[str, Any] = {}
        for item in children(node):
            key_node, value_node = children(item)
            key = _value(key_node)
            out[key if isinstance(key, str) else json.dumps(key)] = _value(value_node)
        return out
    if kind in (_TERM, _SCALAR):
        return _value(int(lib.regoNodeGet(node, 0)))
    raise OutputError(f"unexpected node {type_name(node)}")


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
        raise OutputError("a string that is not one")
    return decoded


_needs_escape = re.compile(r'["\\\x00-\x1f]').search


def _escaped(text: str) -> bytes:
    if _needs_escape(text) is None:
        return text.encode()
    return json.dumps(text, ensure_ascii=False)[1:-1].encode()


def input_handle(document: Mapping[str, Any]) -> int:
    handle = int(lib.regoNewInput() or 0)
    if not handle:
        raise ValueError("rego-cpp could not allocate an input")
    try:
        _push(handle, document)
    except BaseException:
        lib.regoFreeInput(handle)
        raise
    return handle


# Bound once: the input is built with one C call per value, the bulk of a decision's
# cost, so the lookups are kept out of the loop.
_in_string = lib.regoInputString
_in_item = lib.regoInputObjectItem
_in_object = lib.regoInputObject


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
        status = lib.regoInputBoolean(handle, value)
    elif value is None:
        status = lib.regoInputNull(handle)
    elif isinstance(value, int):
        # An int beyond 64 bits would wrap around silently.
        if value in _INT64:
            status = lib.regoInputInt(handle, value)
        else:
            status = lib.regoInputFloat(handle, float(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no JSON form")
        status = lib.regoInputFloat(handle, value)
    elif isinstance(value, list | tuple):
        for item in value:
            _push(handle, item)
        status = lib.regoInputArray(handle, len(value))
    elif isinstance(value, set | frozenset):
        for item in value:
            _push(handle, item)
        status = lib.regoInputSet(handle, len(value))
    else:
        raise TypeError(f"a {type(value).__name__} has no JSON form")
    if status:
        raise ValueError(f"rego-cpp refused a {type(value).__name__}")

"""The facts meshward checks in a Rego module, read from its tokens.

The package, the imports, the rule heads, the calls and the METADATA blocks come from
a token scan (regorus's AST is not part of what its Python binding promises). Only
modules the engine has already parsed are scanned, so the scan can assume the text is
well-formed Rego. ``rewrite_refs`` uses the same tokens to rewrite references.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "V0_MESSAGE",
    "Annotation",
    "Call",
    "ModuleScan",
    "RegoModule",
    "RequestReads",
    "Rule",
    "request_reads",
    "scan",
]


@dataclass(slots=True, frozen=True)
class RegoModule:
    """One Rego source file; ``file`` names it in issues."""

    file: str
    text: str


V0_MESSAGE = "Rego v0 syntax is not supported; use Rego v1 (`if`, `contains`) — see opa fmt --v0-v1"

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
    offset: int  # where the token starts in the text


@dataclass(slots=True, frozen=True)
class Rule:
    path: tuple[str, ...]  # the head's static ref, after the package
    line: int
    function: bool


@dataclass(slots=True, frozen=True)
class Call:
    name: str
    argc: int
    line: int


@dataclass(slots=True, frozen=True)
class Annotation:
    line: int
    on_package: bool
    text: str  # the YAML inside the block


@dataclass(slots=True)
class ModuleScan:
    package: tuple[str, ...] = ()
    aliases: set[str] = field(default_factory=set)
    # alias → the data path it imports (``import data.lib.text as t`` → t: lib.text)
    data_imports: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    annotations: list[Annotation] = field(default_factory=list)


def _tokenize(text: str) -> tuple[list[_Token], list[tuple[int, str, bool]]]:
    """Code tokens (newlines included) and comments as (line, text, alone on its line)."""
    tokens: list[_Token] = []
    comments: list[tuple[int, str, bool]] = []
    line, depth, code_on_line = 1, 0, False
    for match in _TOKEN.finditer(text):
        kind, value = match.lastgroup or "op", match.group()
        if kind == "nl":
            tokens.append(_Token(kind, value, line, depth, match.start()))
            line, code_on_line = line + 1, False
        elif kind == "comment":
            comments.append((line, value, not code_on_line))
        elif kind != "ws":
            if kind == "op" and value in _CLOSERS:
                depth = max(depth - 1, 0)
            tokens.append(_Token(kind, value, line, depth, match.start()))
            if kind == "op" and value in _OPENERS:
                depth += 1
            line += value.count("\n")  # raw strings may span lines
            code_on_line = True
    return tokens, comments


def scan(text: str) -> ModuleScan:
    """The package, imports, rule heads, calls and METADATA of one module."""
    tokens, comments = _tokenize(text)
    found = ModuleScan()
    heads: set[int] = set()
    for start in _statement_starts(tokens):
        keyword = tokens[start].text
        if keyword == "package":
            found.package = tuple(_static_ref(tokens, start + 1)[0])
        elif keyword == "import":
            path, end = _static_ref(tokens, start + 1)
            alias = path[-1] if path else None
            if end + 1 < len(tokens) and tokens[end].text == "as":
                alias = tokens[end + 1].text
            if path[:1] in (["data"], ["input"]) and alias is not None:
                found.aliases.add(alias)
                if path[0] == "data":
                    found.data_imports[alias] = tuple(path[1:])
        else:
            first = start + 1 if keyword == "default" else start
            path, end = _static_ref(tokens, first)
            if path:
                function = end < len(tokens) and tokens[end].text == "("
                found.rules.append(Rule(tuple(path), tokens[first].line, function))
                if function:
                    heads.add(first)
    found.calls = list(_calls(tokens, heads))
    found.annotations = list(_annotations(comments, tokens))
    return found


@dataclass(slots=True, frozen=True)
class RequestReads:
    """What of the request a module's references may read beyond names it spells out.

    A reference is followed field by field (``.headers``, ``["headers"]``), whatever it
    starts from, so an alias (``http_request.headers``) counts like ``input.…``.
    """

    # A headers object is read other than by a literal name: iterated
    # (``headers[name]``, ``some v in headers``), passed whole (``object.get(headers, …)``)
    # or kept in a variable to be read later.
    any_header: bool = False
    # A ``path`` field is read: the request's raw path holds its query string too.
    path: bool = False


def request_reads(text: str) -> RequestReads:
    """What ``text`` (one module) reads of the request; see :class:`RequestReads`."""
    tokens = [t for t in _tokenize(text)[0] if t.kind != "nl"]
    any_header = path = False
    for i in range(1, len(tokens)):
        after = _field_end(tokens, i)
        if after is None:
            continue
        field_name = _literal(tokens[i])
        if field_name == "path":
            path = True
        elif field_name == "headers" and _field_end(tokens, after + 2) is None:
            # Not followed by .name or ["name"]: which header it reads is not written.
            any_header = True
    return RequestReads(any_header=any_header, path=path)


def _field_end(tokens: Sequence[_Token], i: int) -> int | None:
    """Where the field access whose name is at ``i`` ends (``.name`` at the name,
    ``["name"]`` at its ``]``), or None when ``i`` is not the name of a field access."""
    if not 1 <= i < len(tokens):
        return None
    token = tokens[i]
    if token.kind == "ident" and tokens[i - 1].text == ".":
        return i
    if (
        token.kind in ("str", "raw")
        and tokens[i - 1].text == "["
        and i + 1 < len(tokens)
        and tokens[i + 1].text == "]"
    ):
        return i + 1
    return None


def _literal(token: _Token) -> str | None:
    if token.kind == "ident":
        return token.text
    if token.kind == "raw":
        return token.text[1:-1]
    try:
        value = json.loads(token.text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


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


def _calls(tokens: Sequence[_Token], heads: set[int]) -> Iterator[Call]:
    for i, j, name in _call_names(tokens, heads):
        yield Call(name, _argument_count(tokens, j), tokens[i].line)


def _call_names(tokens: Sequence[_Token], heads: set[int]) -> Iterator[tuple[int, int, str]]:
    """(first token, its `(`, dotted name) of every call."""
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
            yield i, j, ".".join(name)


def rewrite_refs(
    text: str, *, aliases: Mapping[str, tuple[str, ...]], renames: Mapping[str, str]
) -> str:
    """``text`` as the engine is given it, every line keeping its number.

    - ``alias.x`` of an ``import data.…`` (``aliases``, from the module's scan) is written
      as its full path. regorus reads ``alias.x`` by evaluating the whole aliased
      package, which it takes for a cycle when that package is the one being decided
      (``envoy.authz`` importing a staged package that imports ``data.envoy.authz``
      back); OPA reads only ``x``, and so does the full path in both.
    - A call of a name in ``renames`` calls the new name instead; a call through an
      import alias is a call into data, not of the built-in, and is left alone.
    """
    tokens, _ = _tokenize(text)
    edits: list[tuple[int, int, str]] = []
    for i, j, name in _call_names(tokens, set(_statement_starts(tokens))):
        if name in renames and name.split(".", 1)[0] not in aliases:
            # A call's name never spans lines (newlines are tokens), nor does its rewrite.
            edits.append((tokens[i].offset, tokens[j].offset, renames[name]))
    for i, token in enumerate(tokens[:-1]):
        if token.kind != "ident" or token.text not in aliases:
            continue
        if (i > 0 and tokens[i - 1].text == ".") or tokens[i + 1].text not in (".", "["):
            continue
        path = "data" + "".join(
            f".{part}" if _IDENTIFIER.fullmatch(part) else f"[{json.dumps(part)}]"
            for part in aliases[token.text]
        )
        edits.append((token.offset, token.offset + len(token.text), path))
    out: list[str] = []
    done = 0
    for start, end, replacement in sorted(edits):
        out += [text[done:start], replacement]
        done = end
    return "".join(out) + text[done:]


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


def _annotations(
    comments: Sequence[tuple[int, str, bool]], tokens: Sequence[_Token]
) -> Iterator[Annotation]:
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
        yield Annotation(line, on_package, textwrap.dedent("\n".join(body)))

"""Rego data documents: read, checked to be JSON, and merged as OPA merges a bundle.

Every ``data.json`` / ``data.yaml`` / ``data.yml`` is mounted at its directory
(``roles/data.json`` → ``data.roles``; the root one must be an object). Objects from
several files merge key by key; any other value has exactly one owner, and a path
defined twice names both files. OPA refuses a rule whose path holds base data, and so does meshward, with both
files named.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import yaml

from authz.errors import PolicyIssue
from authz.rego_scan import ModuleScan

__all__ = [
    "DATA_FILE_NAMES",
    "UNREADABLE",
    "RegoDataDocument",
    "merge_data",
    "read_data",
    "rule_data_conflicts",
]

DATA_FILE_NAMES = frozenset({"data.json", "data.yaml", "data.yml"})


@dataclass(slots=True, frozen=True)
class RegoDataDocument:
    """One data document (already parsed) mounted at ``path`` under ``data``."""

    file: str
    path: tuple[str, ...]
    value: Any


UNREADABLE: Final = object()


def read_data(file: str, text: str, issues: list[PolicyIssue]) -> Any:
    """The JSON or YAML document in ``text``, or UNREADABLE with the reason in ``issues``."""
    value: Any
    if file.endswith(".json"):
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            issues.append(PolicyIssue(file, 0, "", f"is not valid JSON: {exc.msg}", exc.lineno))
            return UNREADABLE
        except ValueError as exc:
            issues.append(PolicyIssue(file, 0, "", f"is not valid JSON: {exc}"))
            return UNREADABLE
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            message = str(exc).replace("\n", " ")
            issues.append(PolicyIssue(file, 0, "", f"is not valid YAML: {message}", line))
            return UNREADABLE
    problem = _not_json(value, "")
    if problem is not None:
        where, what = problem
        issues.append(PolicyIssue(file, 0, where, f"is not JSON data: {what}"))
        return UNREADABLE
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


def merge_data(
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


def rule_data_conflicts(
    scans: Mapping[str, ModuleScan],
    data: Mapping[str, Any],
    sources: Mapping[tuple[str, ...], str],
) -> list[PolicyIssue]:
    # OPA refuses a rule whose path holds base data ("conflicting rule for data path").
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

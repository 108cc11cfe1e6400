"""Dry-run packages declared in Rego METADATA: ``custom: {dry_run: true}`` on ``package``.

A flagged package is staged, not enforced (see ``authz.rego_engine``). The flag is
read only from the METADATA block right above ``package``; ``scope: subpackages``
extends it to the packages below, unless they set their own. Every file of a package
must agree.
"""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from authz.errors import PolicyIssue
from authz.rego_scan import Annotation, ModuleScan

__all__ = ["annotated_dry_run_packages"]


def annotated_dry_run_packages(
    scans: Mapping[str, ModuleScan], issues: list[PolicyIssue]
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
    file: str, note: Annotation, issues: list[PolicyIssue]
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

"""Which files of a policy directory count, and reading them once.

The loaders, the policy store (which watches and versions them) and the test tools
must agree on which files make a policy set: one listing serves them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from authz.errors import PolicyIssue

__all__ = ["is_istio_file", "list_files", "read_files"]


def is_istio_file(path: Path) -> bool:
    return path.suffix in (".yaml", ".yml")


def list_files(directory: Path, wanted: Callable[[Path], bool]) -> list[Path]:
    """Files under ``directory`` that ``wanted`` accepts, sorted; [] if it is no directory.

    Hidden entries are skipped: an editor's swap file or a ConfigMap's ``..data`` symlink
    farm must not load twice or make a reload of its own.
    """
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.rglob("*")
        if wanted(p)
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
        and p.is_file()
    )


def read_files(paths: Iterable[Path], issues: list[PolicyIssue]) -> list[tuple[Path, bytes]]:
    """Each file's bytes, read once; an unreadable file becomes an issue.

    A file removed since it was listed is left out: it is not part of the set, and the
    next change check sees it gone.
    """
    out: list[tuple[Path, bytes]] = []
    for path in paths:
        try:
            out.append((path, path.read_bytes()))
        except FileNotFoundError:
            continue
        except OSError as exc:
            issues.append(PolicyIssue(str(path), 0, "", f"cannot be read: {exc}"))
    return out

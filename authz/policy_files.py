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


# authz.max_policy_file_bytes: a policy or data file the loaders will read at most.
MAX_POLICY_FILE_BYTES = 8 * 1024 * 1024


def read_files(
    paths: Iterable[Path], issues: list[PolicyIssue], *, max_bytes: int = MAX_POLICY_FILE_BYTES
) -> list[tuple[Path, bytes]]:
    """Each file's bytes, read once; an unreadable or larger file becomes an issue.

    A file removed since it was listed is left out: it is not part of the set, and the
    next change check sees it gone. At most ``max_bytes + 1`` bytes are read of a file,
    so one that grows while it is read is still refused, not read whole.
    """
    out: list[tuple[Path, bytes]] = []
    for path in paths:
        try:
            with path.open("rb") as file:
                raw = file.read(max_bytes + 1)
        except FileNotFoundError:
            continue
        except OSError as exc:
            issues.append(PolicyIssue(str(path), 0, "", f"cannot be read: {exc}"))
            continue
        if len(raw) > max_bytes:
            message = (
                f"is larger than {max_bytes} bytes (authz.max_policy_file_bytes); split it "
                "into several files or raise the limit"
            )
            issues.append(PolicyIssue(str(path), 0, "", message))
            continue
        out.append((path, raw))
    return out

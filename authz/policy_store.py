"""The policy set being served, replaced atomically when the policy directory changes.

A reload compiles the whole directory first and swaps it in only if every document
is valid; otherwise the last good set keeps serving and the problems are kept for
``/ready``, the logs and metrics. No request is ever decided against a half-loaded set:
readers take one reference to an immutable :class:`ServedPolicies`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from authz.errors import PolicyIssue, PolicyLoadError
from authz.istio_loader import load_policies
from authz.istio_policy import PolicySet

__all__ = ["PolicyStore", "ServedPolicies"]

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ServedPolicies:
    istio: PolicySet
    version: str  # digest of the policy files, recorded with every decision


class PolicyStore:
    def __init__(
        self,
        directory: Path,
        *,
        trust_domain: str,
        trust_domain_aliases: tuple[str, ...] = (),
        root_namespace: str = "istio-system",
        on_reload: Callable[[bool], None] | None = None,
    ) -> None:
        self.directory = directory
        self._trust_domain = trust_domain
        self._aliases = trust_domain_aliases
        self._root_namespace = root_namespace
        self._on_reload = on_reload
        self.current: ServedPolicies | None = None
        self.issues: list[PolicyIssue] = []
        self._signature: tuple[tuple[str, int, int], ...] | None = None

    @property
    def istio_dir(self) -> Path:
        return self.directory / "istio"

    def reload(self) -> bool:
        """Load the directory; True if a new set is now served. Never raises for bad policies."""
        signature = self._files_signature()
        try:
            istio = (
                load_policies(
                    self.istio_dir,
                    root_namespace=self._root_namespace,
                    trust_domain=self._trust_domain,
                    trust_domain_aliases=self._aliases,
                )
                if self.istio_dir.exists()
                else PolicySet(policies=(), root_namespace=self._root_namespace)
            )
        except PolicyLoadError as exc:
            self._signature = signature
            self.issues = exc.issues
            log.error("authz: policies not loaded, the last good set keeps serving:\n%s", exc)
            if self._on_reload:
                self._on_reload(False)
            return False
        self._signature = signature
        self.issues = []
        self.current = ServedPolicies(istio=istio, version=self._digest())
        log.info(
            "authz: serving policy set %s (%d Istio policies)",
            self.current.version,
            len(istio.policies),
        )
        if self._on_reload:
            self._on_reload(True)
        return True

    def changed(self) -> bool:
        """Cheap check (names, sizes, mtimes) whether the directory differs from the last load."""
        return self._files_signature() != self._signature

    def _files(self) -> list[Path]:
        if not self.istio_dir.exists():
            return []
        return sorted(p for p in self.istio_dir.rglob("*") if p.suffix in (".yaml", ".yml"))

    def _files_signature(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for path in self._files():
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((str(path), st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _digest(self) -> str:
        digest = hashlib.sha256()
        for path in self._files():
            digest.update(str(path.relative_to(self.directory)).encode() + b"\0")
            try:
                digest.update(path.read_bytes())
            except OSError:
                continue
        return digest.hexdigest()[:16]

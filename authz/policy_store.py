"""The policy set being served, replaced atomically when the policy directory changes.

The directory holds ``istio/`` (AuthorizationPolicy YAML) and ``rego/`` (modules and
data documents). A reload compiles both and swaps them in together, as one
:class:`ServedPolicies` with one version, only if everything is valid; otherwise the
last good set keeps serving and the problems of both kinds are kept for ``/ready``,
the logs and metrics. No request is ever decided against a half-loaded set: readers
take one reference to an immutable :class:`ServedPolicies`.

``rego/`` without modules means no Rego engine (``rego`` is None). Rego test modules
(``*_test.rego``) are never served, so they are neither watched nor part of the
version: editing a test reloads nothing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from authz.errors import PolicyIssue, PolicyLoadError
from authz.istio_loader import load_policy_sources
from authz.istio_policy import PolicySet
from authz.policy_files import MAX_POLICY_FILE_BYTES, is_istio_file, list_files, read_files
from authz.rego_engine import (
    DEFAULT_DECISION_PATH,
    RegoEngine,
    is_rego_source,
    load_rego_sources,
)

__all__ = ["PolicyStore", "ServedPolicies"]

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ServedPolicies:
    istio: PolicySet
    rego: RegoEngine | None  # None: rego/ holds no modules
    version: str  # digest of the istio/ and rego/ files, recorded with every decision
    # The files as loaded, by path relative to the policy directory: the audit trail
    # keeps them per version, so that a decision is explained by the set that made it.
    sources: tuple[tuple[str, bytes], ...] = ()


class PolicyStore:
    def __init__(
        self,
        directory: Path,
        *,
        trust_domain: str,
        trust_domain_aliases: tuple[str, ...] = (),
        root_namespace: str = "istio-system",
        rego_decision: str = DEFAULT_DECISION_PATH,
        rego_dry_run_packages: Iterable[str] = (),
        on_reload: Callable[[bool], None] | None = None,
        max_file_bytes: int = MAX_POLICY_FILE_BYTES,
    ) -> None:
        self.directory = directory
        self._max_file_bytes = max_file_bytes
        self._trust_domain = trust_domain
        self._aliases = trust_domain_aliases
        self._root_namespace = root_namespace
        self._rego_decision = rego_decision
        self._rego_dry_run_packages = tuple(rego_dry_run_packages)
        self._on_reload = on_reload
        self.current: ServedPolicies | None = None
        self.issues: list[PolicyIssue] = []
        self._signature: tuple[tuple[str, int, int], ...] | None = None

    @property
    def istio_dir(self) -> Path:
        return self.directory / "istio"

    @property
    def rego_dir(self) -> Path:
        return self.directory / "rego"

    def reload(self) -> bool:
        """Load the directory; True if a new set is now served. Never raises for bad policies."""
        signature = self._files_signature()
        # Each file is read once: the engines compile and the version digests the same
        # bytes, so a file rewritten during the reload cannot be served under the
        # version of other contents.
        issues: list[PolicyIssue] = []
        limit = self._max_file_bytes
        istio_sources = read_files(self._istio_files(), issues, max_bytes=limit)
        rego_sources = read_files(self._rego_files(), issues, max_bytes=limit)
        istio = PolicySet(policies=(), root_namespace=self._root_namespace)
        try:
            istio = load_policy_sources(
                [(str(path), raw) for path, raw in istio_sources],
                root_namespace=self._root_namespace,
                trust_domain=self._trust_domain,
                trust_domain_aliases=self._aliases,
            )
        except PolicyLoadError as exc:
            issues.extend(exc.issues)
        rego: RegoEngine | None = None
        if any(path.suffix == ".rego" for path, _ in rego_sources):
            try:
                rego = load_rego_sources(
                    self.rego_dir,
                    rego_sources,
                    decision_path=self._rego_decision,
                    dry_run_packages=self._rego_dry_run_packages,
                )
            except PolicyLoadError as exc:
                issues.extend(exc.issues)
        self._signature = signature
        if issues:
            self.issues = issues
            log.error(
                "authz: policies not loaded, the last good set keeps serving:\n%s",
                PolicyLoadError(issues),
            )
            if self._on_reload:
                self._on_reload(False)
            return False
        self.issues = []
        sources = istio_sources + rego_sources
        self.current = ServedPolicies(
            istio=istio,
            rego=rego,
            version=self._digest(sources),
            sources=tuple((str(path.relative_to(self.directory)), raw) for path, raw in sources),
        )
        log.info(
            "authz: serving policy set %s (%d Istio policies)%s",
            self.current.version,
            len(istio.policies),
            f" and Rego {rego.decision} ({rego.modules} modules)" if rego else "",
        )
        if self._on_reload:
            self._on_reload(True)
        return True

    def changed(self) -> bool:
        """Cheap check (names, sizes, mtimes) whether the directory differs from the last load."""
        return self._files_signature() != self._signature

    def _files(self) -> list[Path]:
        return self._istio_files() + self._rego_files()

    def _istio_files(self) -> list[Path]:
        return list_files(self.istio_dir, is_istio_file)

    def _rego_files(self) -> list[Path]:
        return list_files(self.rego_dir, is_rego_source)

    def _files_signature(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for path in self._files():
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((str(path), st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _digest(self, sources: Iterable[tuple[Path, bytes]]) -> str:
        digest = hashlib.sha256()
        for path, raw in sources:
            digest.update(str(path.relative_to(self.directory)).encode() + b"\0")
            digest.update(raw)
        return digest.hexdigest()[:16]

"""``explain`` and ``replay`` wired to the engines: recorded policy sets and candidates.

The audit trail keeps the files of every policy set the authz processes served. To
explain a decision, its set is written to a private temporary directory and loaded
through the same harness ``meshward policy test`` uses (the store and servicer of
``meshward authz``, with this process's config); sets are cached by version. A
replay loads the candidate directory the same way.
"""

from __future__ import annotations

import collections
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from audit.api import Explain, Replay, ReplayError
from audit.store.queries import StoredPolicySet
from authz.errors import PolicyLoadError
from authz.explain import explain
from authz.rego_provider import RegoSettings
from authz.replay import Replay as Replayer
from meshward.authz_audit import with_settings
from meshward.config import Config
from meshward.policy_runner import Harness, load_harness

__all__ = ["PolicySets", "explainer", "replay_decisions", "replayer"]

_CACHED_SETS = 8


class PolicySets:
    """Recorded policy sets, rebuilt from their files on first use and kept by version."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, Harness | None] = collections.OrderedDict()

    def get(self, stored: StoredPolicySet) -> Harness | None:
        with self._lock:
            if stored.version in self._cache:
                self._cache.move_to_end(stored.version)
                return self._cache[stored.version]
        loaded = self._load(stored)
        with self._lock:
            self._cache[stored.version] = loaded
            while len(self._cache) > _CACHED_SETS:
                self._cache.popitem(last=False)
        return loaded

    def _load(self, stored: StoredPolicySet) -> Harness | None:
        config = with_settings(self._config, stored.settings)
        with tempfile.TemporaryDirectory(prefix="meshward-policy-set-") as tmp:
            root = Path(tmp)
            for name, raw in stored.files:
                relative = PurePosixPath(name)
                if relative.is_absolute() or ".." in relative.parts:
                    return None  # not a file of a policy directory
                target = root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(raw)
            try:
                return load_harness(config, root)
            except PolicyLoadError:
                return None  # it loaded when served: a meshward since changed what loads


def _rego_settings(config: Config) -> RegoSettings:
    rego = config.authz.rego
    return RegoSettings(
        mode=rego.mode,
        dry_run=rego.dry_run,
        parse_body=rego.parse_body,
        max_body_bytes=rego.max_body_bytes,
        timeout=rego.timeout.total_seconds(),
    )


def explainer(config: Config) -> Explain:
    sets = PolicySets(config)
    settings = _rego_settings(config)

    def run(record: dict[str, Any], stored: StoredPolicySet | None) -> dict[str, Any]:
        loaded = sets.get(stored) if stored is not None else None
        return explain(
            record,
            loaded.served if loaded else None,
            servicer=loaded.servicer if loaded else None,
            sink=loaded.sink if loaded else None,
            rego=settings,
            root=loaded.store.directory if loaded else None,
        )

    return run


def replay_decisions(
    config: Config, directory: Path, decisions: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """Replay ``decisions`` (each with ``request``: snapshot bytes or None) against
    ``directory``; raises PolicyLoadError when it does not load."""
    loaded = load_harness(config, directory)
    replay = Replayer(loaded.servicer, loaded.sink, loaded.served, str(directory))
    for decision in decisions:
        replay.add(decision, decision.get("request"))
    return replay.report()


def replayer(config: Config, roots: list[Path]) -> Replay:
    """The API's replay: only directories under ``roots`` may be named."""
    allowed = [root.resolve() for root in roots]

    def run(
        policies: str, decisions: Iterator[dict[str, Any]], latest: StoredPolicySet | None
    ) -> dict[str, Any]:
        directory = Path(policies).resolve()
        if not allowed:
            raise ReplayError(
                "this audit server reads no policy directories: set audit.replay_roots (or "
                "start `meshward audit` with --policies DIR), or run `meshward policy replay` "
                "where the candidate is"
            )
        if not any(directory == root or directory.is_relative_to(root) for root in allowed):
            raise ReplayError(
                f"{policies} is not under a directory this server may read policies from ("
                + ", ".join(str(r) for r in allowed)
                + "); set audit.replay_roots"
            )
        if not directory.is_dir():
            raise ReplayError(f"{policies} is not a directory (a policy repository)")
        # This server's config decides; what it lacks comes from the newest served set.
        settings = config if config.trust_domain or latest is None else None
        try:
            return replay_decisions(
                settings or with_settings(config, latest.settings if latest else {}),
                directory,
                decisions,
            )
        except PolicyLoadError as exc:
            raise ReplayError(f"the policies in {policies} do not load:\n{exc}") from exc

    return run

"""``explain`` and ``replay`` wired to the engines: recorded policy sets and candidates.

The audit trail keeps the files of every policy set the authz processes served, and the
authz settings each was served with (trust domain and aliases, root namespace, the Rego
decision and mode…). To explain a decision, its set is written to a private temporary
directory and loaded through the same harness ``meshward policy test`` uses (the store
and servicer of ``meshward authz``) under those settings; sets are cached by version.

A replay loads the candidate directory the same way, once per set of settings the
replayed decisions were recorded under, so that a decision is decided again as the
server that made it would decide with the candidate: this machine's config supplies
only what the trail does not keep, and explicit flags override (saying so in the
report). A principal matched under another trust domain, or Rego run in another mode,
would otherwise flip decisions the candidate does not change.
"""

from __future__ import annotations

import collections
import json
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from audit.api import Explain, Replay, ReplayError, SettingsLookup
from audit.store.queries import StoredPolicySet
from authz.errors import PolicyLoadError
from authz.explain import explain
from authz.rego_provider import RegoSettings
from authz.replay import Candidate
from authz.replay import Replay as Replayer
from meshward.authz_audit import served_settings, with_settings
from meshward.config import Config
from meshward.policy_runner import Harness, load_harness

__all__ = ["NO_SETTINGS", "PolicySets", "explainer", "replay_decisions", "replayer"]

# Why a decision is counted, not replayed, when nothing says which trust domain to use.
NO_SETTINGS = (
    "the audit trail does not keep the settings it was decided under, and no trust domain "
    "is configured here (give --trust-domain, or set trust_domain)"
)

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


class _Candidates:
    """The candidate directory loaded under the settings of each recorded policy set."""

    def __init__(
        self,
        config: Config,
        directory: Path,
        recorded: SettingsLookup | None,
        overrides: Mapping[str, Any],
    ) -> None:
        self._config = config
        self._directory = directory
        self._recorded = recorded
        self._overrides = dict(overrides)
        self._loaded: dict[str, Candidate] = {}  # by the settings, as JSON
        self._versions: dict[str | None, tuple[Candidate | None, str | None]] = {}

    def for_version(self, version: str | None) -> tuple[Candidate | None, str | None]:
        """The candidate to decide a decision of policy set ``version`` with (None: no
        trust domain is known for it), and a note when its settings are not the recorded."""
        found = self._versions.get(version)
        if found is None:
            found = self._versions[version] = self._resolve(version)
        return found

    def _resolve(self, version: str | None) -> tuple[Candidate | None, str | None]:
        settings = self._recorded(version) if version and self._recorded else None
        note: str | None = None
        if settings:
            base = with_settings(self._config, dict(settings))
        else:
            base = self._config
            if base.trust_domain is not None or self._overrides:
                note = (
                    f"the audit trail does not keep the settings of policy set {version}: its "
                    "decisions were replayed with this machine's config"
                    if version
                    else "decisions that name no policy set (Envoy's RBAC filters decided them "
                    "with a chain authz did not serve) were replayed with this machine's config"
                )
        effective = with_settings(base, self._overrides)
        if effective.trust_domain is None:
            return None, None
        if settings:
            recorded, now = served_settings(base), served_settings(effective)
            changed = [
                f"{key} {json.dumps(now[key])} (given), not {json.dumps(recorded[key])}"
                for key in self._overrides
                if recorded.get(key) != now.get(key)
            ]
            if changed:
                note = (
                    f"replayed with {', '.join(changed)} as policy set {version} was served "
                    "with: flips may come from that change, not from the policies"
                )
        return self.load(effective), note

    def load(self, config: Config) -> Candidate:
        key = json.dumps(served_settings(config), sort_keys=True)
        candidate = self._loaded.get(key)
        if candidate is None:
            loaded = load_harness(config, self._directory)
            candidate = self._loaded[key] = Candidate(loaded.servicer, loaded.sink, loaded.served)
        return candidate

    def any_loaded(self) -> bool:
        return bool(self._loaded)

    def fallback(self) -> Config:
        """The config to check that the candidate loads when no decision loaded it."""
        config = with_settings(self._config, self._overrides)
        if config.trust_domain is None:
            # Only to check that it loads and to name its version: nothing is decided.
            config = with_settings(config, {"trust_domain": "cluster.local"})
        return config


def replay_decisions(
    config: Config,
    directory: Path,
    decisions: Iterable[Mapping[str, Any]],
    *,
    recorded: SettingsLookup | None = None,
    overrides: Mapping[str, Any] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Replay ``decisions`` (each with ``request``: snapshot bytes or None) against
    ``directory``, at most ``limit`` of them (the report says when more were there).

    Each decision is decided under the authz settings its policy-set version was
    served with (``recorded``; None: not kept), ``overrides`` over them (explicit flags,
    keyed as ``served_settings`` keys them); ``config`` stands in for settings the trail
    does not keep. Raises PolicyLoadError when the candidate does not load.
    """
    candidates = _Candidates(config, directory, recorded, overrides or {})
    replay = Replayer(str(directory), limit=limit)
    notes: collections.Counter[str] = collections.Counter()
    for n, decision in enumerate(decisions):
        if limit is not None and n >= limit:
            replay.truncated = True
            break
        candidate, note = candidates.for_version(decision.get("policy_set_version"))
        if candidate is None:
            replay.skip(NO_SETTINGS)
            continue
        if note is not None:
            notes[note] += 1
        replay.add(decision, decision.get("request"), candidate)
    if not candidates.any_loaded():
        replay.version = candidates.load(candidates.fallback()).served.version
    replay.notes += [f"{note} ({count} decisions)" for note, count in notes.items()]
    return replay.report()


def replayer(config: Config, roots: list[Path]) -> Replay:
    """The API's replay: only directories under ``roots`` may be named."""
    allowed = [root.resolve() for root in roots]

    def run(
        policies: str,
        decisions: Iterator[dict[str, Any]],
        recorded: SettingsLookup,
        limit: int,
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
        # Each decision under the settings it was recorded with; this server's config
        # only where the trail does not keep them.
        try:
            return replay_decisions(config, directory, decisions, recorded=recorded, limit=limit)
        except PolicyLoadError as exc:
            raise ReplayError(f"the policies in {policies} do not load:\n{exc}") from exc

    return run

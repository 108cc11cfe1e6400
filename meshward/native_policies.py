"""The agent's ECDS source: the policy directory's Istio policies as each sidecar's RBAC chain.

Wiring only. ``authz`` loads the directory (its own :class:`PolicyStore`, built as
``meshward authz`` builds it: the same files, the same errors, the same policy set
version) and translates (``authz.rbac_translation``, one resource per chain from
``authz.rbac_chain``); ``identity`` serves the result over ECDS through the interfaces
of ``identity.extension_configs``. Neither package imports the other.

- **Generations.** Every policy set the store accepts becomes one immutable
  :class:`PolicyGeneration`; open ECDS streams wake, render their workload's chain from
  it, and push only when its digest differs from what their Envoy has: a change pushes
  to exactly the sidecars whose filters changed. A reload that leaves the set's version
  as it was makes no generation.
- **Hot reload.** The directory is checked every ``authz.reload_interval``; a change
  that does not load is logged and listed in ``/ready``, and the last good set keeps
  serving (the store's rule).
- **Translation failures.** A workload whose policies cannot be expressed as RBAC
  filters gets none: a request for its chain is refused with the loader-style
  message (file, document, field, what to change), logged once per generation, and
  listed in ``/ready``; an Envoy that runs an earlier chain keeps it.

Translations are kept per workload for the life of a generation, so a reload costs
one translation per workload with an open stream, however many sidecars it has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import extension_pb2
from google.protobuf import json_format
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from authz.errors import PolicyLoadError
from authz.policy_store import PolicyStore, ServedPolicies
from authz.rbac_chain import HTTP_CHAIN, http_chain
from authz.rbac_translation import Workload, translate
from identity.ecds import EcdsStats
from identity.errors import ExtensionConfigError
from identity.extension_configs import EnvoyWorkload
from meshward.config import Config, ConfigError

__all__ = [
    "NO_POLICIES",
    "NativePolicies",
    "NativePoliciesCollector",
    "PolicyGeneration",
    "agent_policies_ready",
    "native_policies",
]

log = logging.getLogger("meshward")

NO_POLICIES = (
    "this agent has no policy directory, so it serves no RBAC filters to native and "
    "hybrid sidecars: set agent.policies (`meshward up`: --policies) to the directory "
    "`meshward authz` serves"
)
_Configs = Mapping[str, Any]  # resource name -> TypedExtensionConfig


class PolicyGeneration:
    """One policy set as ECDS sees it (``identity.extension_configs.ExtensionConfigs``)."""

    def __init__(self, version: int, served: ServedPolicies | None, *, missing: str) -> None:
        self._version = version
        self.served = served
        self._missing = missing  # why there is no set, when served is None
        self._built: dict[EnvoyWorkload, _Configs] = {}
        self._failed: dict[EnvoyWorkload, str] = {}

    @property
    def version(self) -> int:
        return self._version

    @property
    def policy_version(self) -> str | None:
        return self.served.version if self.served else None

    def failures(self) -> tuple[tuple[EnvoyWorkload, str], ...]:
        return tuple(self._failed.items())

    def for_workload(self, workload: EnvoyWorkload) -> _Configs:
        if self.served is None:
            raise ExtensionConfigError(self._missing)
        built = self._built.get(workload)
        if built is not None:
            return built
        failed = self._failed.get(workload)
        if failed is not None:
            raise ExtensionConfigError(failed)
        try:
            rbac = translate(
                self.served.istio,
                Workload(workload.namespace, workload.label_map, workload.service),
            )
        except PolicyLoadError as exc:
            message = (
                f"policy set {self.served.version}: the policies of {workload} cannot all be "
                f"enforced by Envoy's RBAC filters, so its native and hybrid sidecars get "
                f"none until they are fixed (or run --authz-mode ext_authz):\n{exc}"
            )
            self._failed[workload] = message
            log.error("agent: %s", message)
            raise ExtensionConfigError(message) from exc
        chain = http_chain(rbac)
        config = json_format.ParseDict(chain.as_config(), extension_pb2.TypedExtensionConfig())
        built = {HTTP_CHAIN: config}
        self._built[workload] = built
        return built


class NativePolicies:
    """The agent's ``ExtensionConfigSource``: a generation per accepted policy set."""

    def __init__(self, store: PolicyStore, *, interval: float) -> None:
        self.store = store
        self._interval = interval
        self._changed = asyncio.Event()
        self.reloads = {"ok": 0, "error": 0}
        self._latest = PolicyGeneration(0, None, missing=self._missing())

    @property
    def latest(self) -> PolicyGeneration:
        return self._latest

    async def changed(self, since: int) -> PolicyGeneration:
        while self._latest.version <= since:
            self._changed.clear()
            await self._changed.wait()
        return self._latest

    def load(self) -> bool:
        """Read the directory and publish what it holds; True if a new generation serves.

        Blocking file I/O, on the loop's thread: for start-up and tests. ``run`` reads in
        a worker thread and publishes on the loop (streams wait on the loop's event).
        """
        return self.accept(self.read())

    def read(self) -> ServedPolicies | None:
        """Load the directory into the store (blocking); the set it serves now, if any."""
        accepted = self.store.reload()
        self.reloads["ok" if accepted else "error"] += 1
        return self.store.current

    def accept(self, served: ServedPolicies | None) -> bool:
        """Publish ``served`` as a new generation unless it is the one served already."""
        if served is None:
            # Nothing loaded yet: the generation's message says what the store found.
            self._publish(None)
            return False
        if served.version == self._latest.policy_version:
            return False
        self._publish(served)
        return True

    async def run(self) -> None:
        """Reload on every change of the directory, until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                # Listing, stat-ing and reading files: kept off the loop serving ECDS.
                if await asyncio.to_thread(self.store.changed):
                    self.accept(await asyncio.to_thread(self.read))
            except Exception:
                # Keep serving the current generation; the next tick tries again.
                log.exception("agent: reloading %s failed", self.store.directory)

    def _publish(self, served: ServedPolicies | None) -> None:
        self._latest = PolicyGeneration(self._latest.version + 1, served, missing=self._missing())
        self._changed.set()

    def _missing(self) -> str:
        problems = "\n".join(str(i) for i in self.store.issues)
        if problems:
            return (
                f"the policy directory {self.store.directory} has not loaded, so no RBAC "
                f"filters can be served; fix:\n{problems}"
            )
        return f"the policy directory {self.store.directory} has not been loaded yet"

    def ready(self, ecds: EcdsStats) -> tuple[bool, dict[str, Any]]:
        """What ``/ready`` says: the set served, failed translations, Envoys behind."""
        generation = self._latest
        issues = self.store.issues
        reload: dict[str, Any] = {"outcome": "rejected" if issues else "ok"}
        if issues:
            reload["message"] = (
                f"the newest policy files were rejected; policy set "
                f"{generation.policy_version} (the last good one) keeps serving"
                if generation.served
                else "the policy files were rejected and no earlier set was loaded: "
                "no sidecar can get RBAC filters"
            )
            reload["problems"] = [str(i) for i in issues]
        envoys = ecds.open_streams()
        details: dict[str, Any] = {
            "directory": str(self.store.directory),
            "policy_set": generation.policy_version,
            "last_reload": reload,
            "translation_failed": [
                {"workload": w.as_json(), "error": message} for w, message in generation.failures()
            ],
            "envoys": [e.as_json() for e in envoys],
        }
        return generation.served is not None, details


class NativePoliciesCollector(Collector):
    """The agent's native-policy metrics, read at scrape time."""

    def __init__(self, native: NativePolicies) -> None:
        self._native = native

    def collect(self) -> Iterable[Metric]:
        reloads = CounterMetricFamily(
            "meshward_agent_policy_reloads",
            "Policy directory loads by the agent, by outcome (ok: now served; error: last "
            "good set kept)",
            labels=["outcome"],
        )
        for outcome, count in self._native.reloads.items():
            reloads.add_metric([outcome], count)
        yield reloads
        yield GaugeMetricFamily(
            "meshward_agent_policy_problems",
            "Problems found in the policy directory by the agent's last load (0: it is served)",
            value=len(self._native.store.issues),
        )
        yield GaugeMetricFamily(
            "meshward_agent_rbac_translation_failures",
            "Workloads whose policies cannot be enforced by Envoy's RBAC filters "
            "(their native and hybrid sidecars get none)",
            value=len(self._native.latest.failures()),
        )


def native_policies(config: Config, directory: Path, *, trust_domain: str) -> NativePolicies:
    """The source for ``directory``, loaded as ``meshward authz`` loads it."""
    from meshward.authz_runtime import policy_store

    if not directory.is_dir():
        raise ConfigError(
            f"agent.policies {directory} is not a directory (it holds istio/ and rego/, "
            "as `meshward authz --policies` takes)"
        )
    settings = config.model_copy(update={"trust_domain": trust_domain})
    store = policy_store(settings, directory)
    return NativePolicies(store, interval=config.authz.reload_interval.total_seconds())


def agent_policies_ready(
    native: NativePolicies | None, ecds: EcdsStats
) -> tuple[bool, dict[str, Any]]:
    """The agent's /ready entry for native policies (``None``: none configured)."""
    if native is None:
        return True, {"native_policies": None}
    ok, details = native.ready(ecds)
    return ok, {"native_policies": details}

"""Prometheus metrics of an agent, read from its state at scrape time."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from identity.ecds import EcdsStats
from identity.handshake_offload import HandshakeOffload
from identity.key_provider_config import KeyProvider
from identity.sds import SdsStats
from identity.workload_cache import WorkloadCache

__all__ = ["agent_registry"]


def agent_registry(
    cache: WorkloadCache,
    sds: SdsStats,
    offload: HandshakeOffload | None = None,
    ecds: EcdsStats | None = None,
) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_AgentCollector(cache, sds, offload, ecds))
    return registry


class _AgentCollector(Collector):
    def __init__(
        self,
        cache: WorkloadCache,
        sds: SdsStats,
        offload: HandshakeOffload | None,
        ecds: EcdsStats | None,
    ) -> None:
        self._cache = cache
        self._sds = sds
        self._offload = offload
        self._ecds = ecds

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "meshward_agent_entries",
            "Registration entries this agent serves",
            value=len(self._cache.entries),
        )
        yield GaugeMetricFamily(
            "meshward_agent_streams",
            "Open Workload API and SDS streams (subscriptions to the agent's cache)",
            value=self._cache.subscribers,
        )
        for name, help_text, value in (
            ("meshward_sds_streams", "SDS streams opened", self._sds.streams),
            ("meshward_sds_responses", "SDS responses sent", self._sds.responses),
            ("meshward_sds_nacks", "SDS responses Envoy rejected (NACK)", self._sds.nacks),
            (
                "meshward_sds_denied",
                "SDS requests refused for lack of entitlement",
                self._sds.denied,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        if self._ecds is not None:
            yield from self._ecds_metrics(self._ecds)
        if self._offload is not None:
            yield from self._offload_metrics(self._offload)

    @staticmethod
    def _ecds_metrics(ecds: EcdsStats) -> Iterable[Metric]:
        for name, help_text, value in (
            ("meshward_ecds_streams", "ECDS streams opened", ecds.streams),
            ("meshward_ecds_responses", "ECDS responses sent", ecds.responses),
            ("meshward_ecds_nacks", "ECDS responses Envoy rejected (NACK)", ecds.nacks),
            (
                "meshward_ecds_denied",
                "ECDS calls refused: the caller was not attested or matches no entry",
                ecds.denied,
            ),
            (
                "meshward_ecds_refused",
                "ECDS calls ended because the configs asked for could not be built",
                ecds.refused,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        envoys = ecds.open_streams()
        yield GaugeMetricFamily(
            "meshward_ecds_envoys", "Envoys with an open ECDS stream", value=len(envoys)
        )
        yield GaugeMetricFamily(
            "meshward_ecds_envoys_rejecting",
            "Envoys whose latest ECDS response was rejected: they keep their last good configs",
            value=sum(e.rejected is not None for e in envoys),
        )
        yield GaugeMetricFamily(
            "meshward_ecds_envoys_not_updated",
            "Envoys the latest policy generation could not be built for: they keep their "
            "last good configs",
            value=sum(e.unserved is not None for e in envoys),
        )

    @staticmethod
    def _offload_metrics(offload: HandshakeOffload) -> Iterable[Metric]:
        host = offload.host
        usable = GaugeMetricFamily(
            "meshward_agent_handshake_accelerator",
            "1 if this host's accelerator is usable by an Envoy built with its key provider",
            labels=["accelerator"],
        )
        usable.add_metric([KeyProvider.QAT.value], int(host.qat.usable))
        usable.add_metric([KeyProvider.CRYPTOMB.value], int(host.cryptomb.usable))
        yield usable
        yield GaugeMetricFamily(
            "meshward_agent_qat_endpoints",
            "QAT virtual functions bound to vfio-pci that Envoy can open",
            value=len(host.qat.endpoints),
        )
        yield GaugeMetricFamily(
            "meshward_agent_qatlib",
            "1 if qatlib's shared libraries are installed (Envoy links its own copy)",
            value=int(bool(host.qat.qatlib)),
        )
        envoys = GaugeMetricFamily(
            "meshward_sds_envoys",
            "Envoys seen over SDS, by the private key provider their TLS certificates carry "
            "now (none: plain)",
            labels=["key_provider"],
        )
        for provider, count in offload.envoys_by_provider().items():
            envoys.add_metric([provider], count)
        yield envoys
        fallbacks = CounterMetricFamily(
            "meshward_sds_key_provider_fallbacks",
            "Envoys that rejected a TLS certificate carrying a private key provider and "
            "were sent plain certificates instead",
            labels=["key_provider"],
        )
        for provider in KeyProvider:
            fallbacks.add_metric([provider.value], offload.fallbacks[provider])
        yield fallbacks

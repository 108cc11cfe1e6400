"""Prometheus metrics of an agent, read from its state at scrape time."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from identity.sds import SdsStats
from identity.workload_cache import WorkloadCache

__all__ = ["agent_registry"]


def agent_registry(cache: WorkloadCache, sds: SdsStats) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_AgentCollector(cache, sds))
    return registry


class _AgentCollector(Collector):
    def __init__(self, cache: WorkloadCache, sds: SdsStats) -> None:
        self._cache = cache
        self._sds = sds

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

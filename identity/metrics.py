"""Prometheus metrics of the identity server, on a registry owned by the server (no globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["IdentityMetrics"]


class IdentityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.svids_signed = Counter(
            "meshward_svids_signed",
            "SVIDs and CA certificates signed, by type (x509_svid, jwt_svid, ca)",
            ["type"],
            registry=registry,
        )
        self.signing_seconds = Histogram(
            "meshward_svid_signing_seconds",
            "Time to sign and record one SVID, by type",
            ["type"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=registry,
        )

    def watch(
        self,
        *,
        ca_not_after: Callable[[], datetime | None],
        entries: Callable[[], int],
    ) -> None:
        """Report CA expiry and entry count read at scrape time, so they are never stale."""
        self.registry.register(_StateCollector(ca_not_after, entries))


class _StateCollector(Collector):
    def __init__(
        self, ca_not_after: Callable[[], datetime | None], entries: Callable[[], int]
    ) -> None:
        self._ca_not_after = ca_not_after
        self._entries = entries

    def collect(self) -> Iterable[Metric]:
        expiry = GaugeMetricFamily(
            "meshward_ca_expiry_timestamp_seconds",
            "Unix time at which the active X.509 CA certificate expires",
        )
        not_after = self._ca_not_after()
        if not_after is not None:
            expiry.add_metric([], not_after.timestamp())
        yield expiry
        yield GaugeMetricFamily(
            "meshward_registration_entries", "Registration entries stored", value=self._entries()
        )

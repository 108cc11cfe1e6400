"""The access-log side of ``meshward authz``: decisions Envoy enforced, and their loss.

Two more services on the authz gRPC server (its listener, mTLS and allowed clients):
Envoy's access-log service, whose entries become audit records through the same
spool as ext_authz decisions (``authz.access_log_server``), and Envoy's metrics
service, whose counters fill the ledger of what each Envoy sent against what arrived
(``authz.access_log_ledger``, saved under ``<data-dir>/audit/``). Both report in
``/metrics`` and in ``/ready``'s ``access_log`` (never making the process unready:
a loss already happened, and refusing Checks would not undo it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from prometheus_client import CollectorRegistry

from audit.redaction import Redaction
from audit.sink import AuditSink
from authz.access_log_ledger import ENVOY_COUNTER_NAMES, SAVE_INTERVAL, AccessLogLedger
from authz.access_log_server import ACCESS_LOG_SERVICE, AccessLogServicer
from authz.envoy_metrics_service import MetricsServiceServicer
from authz.rbac_versions import ChainVersions
from meshward.config import Config

__all__ = ["ACCESS_LOG_SERVICE", "AuthzTelemetry"]


class AuthzTelemetry:
    """The receivers and the ledger of one authz process."""

    def __init__(
        self,
        config: Config,
        *,
        sink: AuditSink,
        redaction: Redaction | None,
        registry: CollectorRegistry,
        versions: ChainVersions | None = None,
    ) -> None:
        worker = config.authz.worker
        # Sidecars send to worker 0 only; the others' ledgers stay empty, never shared.
        name = f"access-log-ledger-{worker}.json" if worker else "access-log-ledger.json"
        self.ledger = AccessLogLedger(config.data_dir / "audit" / name)
        self.access_log = AccessLogServicer(
            sink=sink, receipts=self.ledger, redaction=redaction, versions=versions
        )
        self.metrics = MetricsServiceServicer(self.ledger, ENVOY_COUNTER_NAMES)
        registry.register(self.access_log.collector())
        registry.register(self.ledger.collector())

    def add_to(self, server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.access_log, server)
        server.add_generic_rpc_handlers([self.metrics.handler()])

    async def keep_ledger(self) -> None:
        """Save the ledger while it changes, until cancelled (and then once more)."""
        try:
            while True:
                await asyncio.sleep(SAVE_INTERVAL)
                self.ledger.save()
        finally:
            self.ledger.save()

    def details(self) -> dict[str, Any]:
        return {**self.access_log.details(), "envoy": self.ledger.details()}

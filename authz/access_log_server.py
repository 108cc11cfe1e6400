"""``envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`` for grpc.aio.

Envoy's gRPC access loggers (``http_grpc``, ``tcp_grpc``) open one stream per worker
thread and send batches of entries on it, the node only in the first message. Each
entry becomes at most one record through :mod:`authz.envoy_access_log`, handed to the
same audit sink as ext_authz decisions. Nothing is answered per entry: the protocol
has no acknowledgement.

Every entry is counted once in ``meshward_access_log_entries_total`` by what became
of it: ``recorded``; ``ext_authz`` (ext_authz decided and recorded it); ``undecided``
(no RBAC filter decided it); ``unrecorded`` (the sink had no room: the spool is full);
``malformed`` (not what a configured Envoy sends, logged once per stream). A bad entry
never ends the stream: the next ones are still recorded.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter as Tally
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from audit.redaction import Redaction
from audit.sink import AuditSink
from authz.envoy_access_log import (
    NodeWorkload,
    Recorded,
    http_entry,
    node_workload,
    tcp_entry,
)
from authz.errors import EntryError
from authz.rbac_versions import ChainVersions

__all__ = ["ACCESS_LOG_SERVICE", "OUTCOMES", "AccessLogServicer", "Receipts"]

log = logging.getLogger(__name__)

ACCESS_LOG_SERVICE = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name
RECORDED, UNRECORDED, MALFORMED = "recorded", "unrecorded", "malformed"
OUTCOMES = (RECORDED, "ext_authz", "undecided", UNRECORDED, MALFORMED)


class Receipts(Protocol):
    def received(self, node_id: str, count: int) -> None: ...


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Records the decisions in the access-log streams of Envoys into ``sink``, and
    tells ``receipts`` how many entries each Envoy node delivered."""

    def __init__(
        self,
        *,
        sink: AuditSink,
        receipts: Receipts,
        redaction: Redaction | None,
        versions: ChainVersions | None = None,
    ) -> None:
        self._sink = sink
        self._receipts = receipts
        self._redaction = redaction  # None: records carry no request snapshot
        self._http = functools.partial(http_entry, versions=versions)
        self.outcomes: Tally[str] = Tally(dict.fromkeys(OUTCOMES, 0))
        self.streams = 0

    async def StreamAccessLogs(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        workload = NodeWorkload()
        warned = False
        self.streams += 1
        try:
            async for message in requests:
                if message.HasField("identifier"):
                    node = message.identifier.node
                    try:
                        workload = node_workload(node)
                    except EntryError as exc:
                        # Its records then name no workload; Envoy's decisions still count.
                        log.warning("access log: node %r: %s", node.id, exc)
                        workload = NodeWorkload(node_id=node.id)
                warned = self.take(message, workload, warned=warned)
        finally:
            self.streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    def take(
        self, message: als_pb2.StreamAccessLogsMessage, workload: NodeWorkload, *, warned: bool
    ) -> bool:
        """Record the entries of one message; whether a malformed one was logged yet."""
        redaction = self._redaction
        entries: list[tuple[Any, Any]] = [
            *((e, self._http) for e in message.http_logs.log_entry),
            *((e, tcp_entry) for e in message.tcp_logs.log_entry),
        ]
        self._receipts.received(workload.node_id, len(entries))
        for entry, decide in entries:
            try:
                outcome = decide(entry, workload, redaction)
            except Exception as exc:
                self.outcomes[MALFORMED] += 1
                if not warned:
                    # Once per stream: an Envoy misconfigured sends nothing else.
                    log.warning(
                        "access log: node %r sent an entry that cannot be recorded (%s); "
                        "counted in meshward_access_log_entries_total{outcome=malformed}",
                        workload.node_id,
                        exc if isinstance(exc, EntryError) else repr(exc),
                    )
                    warned = True
                continue
            if not isinstance(outcome, Recorded):
                self.outcomes[outcome.reason] += 1
            elif self._sink.submit(outcome.record, outcome.snapshot):
                self.outcomes[RECORDED] += 1
            else:
                self.outcomes[UNRECORDED] += 1
        return warned

    def details(self) -> dict[str, Any]:
        """``/ready``'s view of the receiver."""
        return {"streams": self.streams, "entries": dict(self.outcomes)}

    def collector(self) -> Collector:
        return _Collector(self)


class _Collector(Collector):
    def __init__(self, servicer: AccessLogServicer) -> None:
        self._servicer = servicer

    def collect(self) -> Iterator[Metric]:
        entries = CounterMetricFamily(
            "meshward_access_log_entries",
            "Envoy access-log entries received, by what became of them (recorded; ext_authz: "
            "recorded by ext_authz; undecided: no RBAC filter decided it; unrecorded: the "
            "spool was full; malformed)",
            labels=["outcome"],
        )
        for outcome, count in self._servicer.outcomes.items():
            entries.add_metric([outcome], count)
        yield entries
        streams = GaugeMetricFamily(
            "meshward_access_log_streams",
            "Envoy access-log streams open now (one per Envoy worker thread)",
        )
        streams.add_metric([], self._servicer.streams)
        yield streams

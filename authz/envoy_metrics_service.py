"""``envoy.service.metrics.v3.MetricsService/StreamMetrics``: Envoy's counters, pushed.

Each Envoy configured with the ``envoy.stat_sinks.metrics_service`` sink
(``meshward.envoy_telemetry.metrics_service_sink``) streams its stats every stats flush
(``stats_flush_interval``, 5 s by default) to the authz process, on the same listener
and mTLS as ext_authz: meshward learns what each Envoy's access loggers lost without
knowing its admin address. Envoy names its node in a stream's first message only and
sends counters cumulative (``report_counters_as_deltas`` off), so a report missed
while the receiver is away is made up by the next one. Only the access-log counters
go to the ledger (:mod:`authz.access_log_ledger`); the rest is read past.

The ``envoy.service.metrics.v3`` messages are not in xds-protos (they embed
Prometheus' ``io.prometheus.client`` protos): the few fields read here are declared
in a private descriptor pool, wire-compatible with Envoy's; the node is kept as bytes
and parsed with xds-protos' ``Node``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

__all__ = [
    "METRICS_SERVICE",
    "CounterSink",
    "MetricsServiceServicer",
    "StreamMetricsMessage",
    "StreamMetricsResponse",
]

log = logging.getLogger(__name__)

METRICS_SERVICE = "envoy.service.metrics.v3.MetricsService"


def _messages() -> tuple[Any, Any]:
    """The metrics service's request and response types (see the module docstring)."""
    field_type = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field_type.LABEL_OPTIONAL, field_type.LABEL_REPEATED
    prometheus = descriptor_pb2.FileDescriptorProto(
        name="meshward/io_prometheus_client.proto", package="io.prometheus.client", syntax="proto2"
    )
    service = descriptor_pb2.FileDescriptorProto(
        name="meshward/envoy_metrics_service.proto",
        package="envoy.service.metrics.v3",
        syntax="proto3",
        dependency=[prometheus.name],
    )
    # (message, [(number, name, type, label, message type)]); Prometheus' own numbers.
    shapes: list[tuple[Any, str, list[tuple[int, str, int, int, str]]]] = [
        (prometheus, "Counter", [(1, "value", field_type.TYPE_DOUBLE, optional, "")]),
        (
            prometheus,
            "Metric",
            [(3, "counter", field_type.TYPE_MESSAGE, optional, ".io.prometheus.client.Counter")],
        ),
        (
            prometheus,
            "MetricFamily",
            [
                (1, "name", field_type.TYPE_STRING, optional, ""),
                (4, "metric", field_type.TYPE_MESSAGE, repeated, ".io.prometheus.client.Metric"),
            ],
        ),
        (service, "Identifier", [(1, "node", field_type.TYPE_BYTES, optional, "")]),
        (
            service,
            "StreamMetricsMessage",
            [
                (
                    1,
                    "identifier",
                    field_type.TYPE_MESSAGE,
                    optional,
                    ".envoy.service.metrics.v3.Identifier",
                ),
                (
                    2,
                    "envoy_metrics",
                    field_type.TYPE_MESSAGE,
                    repeated,
                    ".io.prometheus.client.MetricFamily",
                ),
            ],
        ),
        (service, "StreamMetricsResponse", []),
    ]
    for file, name, fields in shapes:
        message = file.message_type.add(name=name)
        for number, field_name, kind, label, type_name in fields:
            added = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                added.type_name = type_name
    # Envoy's Identifier is nested in StreamMetricsMessage: only the wire format matters.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(prometheus)
    pool.Add(service)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("envoy.service.metrics.v3.StreamMetricsMessage")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("envoy.service.metrics.v3.StreamMetricsResponse")
        ),
    )


StreamMetricsMessage, StreamMetricsResponse = _messages()


class CounterSink(Protocol):
    def report(self, node_id: str, values: Mapping[str, float]) -> None: ...


class MetricsServiceServicer:
    """``envoy.service.metrics.v3.MetricsService/StreamMetrics`` for grpc.aio."""

    def __init__(self, sink: CounterSink, names: Mapping[str, str]) -> None:
        self._sink = sink
        self._names = dict(names)  # Envoy's stat name → the sink's key

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            METRICS_SERVICE,
            {
                "StreamMetrics": grpc.stream_unary_rpc_method_handler(
                    self.StreamMetrics,
                    request_deserializer=StreamMetricsMessage.FromString,
                    response_serializer=StreamMetricsResponse.SerializeToString,
                )
            },
        )

    async def StreamMetrics(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        node_id: str | None = None
        wanted = self._names
        warned = False
        async for message in requests:
            if message.HasField("identifier"):
                try:
                    node_id = base_pb2.Node.FromString(message.identifier.node).id
                except DecodeError:
                    node_id = None
            if node_id is None:
                # Envoy names its node first; a report of nobody cannot be added up.
                if not warned:
                    log.warning("metrics service: a stream sent counters before its node; ignored")
                    warned = True
                continue
            values = {
                wanted[family.name]: sum(m.counter.value for m in family.metric)
                for family in message.envoy_metrics
                if family.name in wanted
            }
            self._sink.report(node_id, values)
        return StreamMetricsResponse()

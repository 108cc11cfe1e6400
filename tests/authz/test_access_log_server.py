"""The access-log and metrics services on a real grpc.aio server over a Unix socket."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from audit.record import DecisionRecord
from audit.redaction import Redaction
from audit.sink import MemorySink
from authz.access_log_ledger import ENVOY_COUNTER_NAMES, AccessLogLedger
from authz.access_log_server import AccessLogServicer
from authz.envoy_access_log import NODE_WORKLOAD
from authz.envoy_metrics_service import (
    METRICS_SERVICE,
    MetricsServiceServicer,
    StreamMetricsMessage,
    StreamMetricsResponse,
)
from tests.authz.test_envoy_access_log import DENY_RULE, PASSED, entry, rbac, tcp

REDACTION = Redaction.build(b"k" * 32)


class FullSink(MemorySink):
    """A sink whose spool is full: nothing is kept."""

    def submit(self, record: DecisionRecord, request: bytes | None = None) -> bool:
        return False


def serve(
    tmp_path: Path,
    sink: MemorySink,
    client: Callable[[grpc.aio.Channel], Awaitable[None]],
) -> tuple[AccessLogServicer, AccessLogLedger]:
    ledger = AccessLogLedger()
    servicer = AccessLogServicer(sink=sink, receipts=ledger, redaction=REDACTION)
    metrics = MetricsServiceServicer(ledger, ENVOY_COUNTER_NAMES)
    socket = tmp_path / "authz.sock"

    async def scenario() -> None:
        server = grpc.aio.server()
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers([metrics.handler()])
        server.add_insecure_port(f"unix:{socket}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
                await client(channel)
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    return servicer, ledger


def node(node_id: str = "reviews-1") -> base_pb2.Node:
    out = base_pb2.Node(id=node_id, cluster="meshward")
    out.metadata.update({NODE_WORKLOAD: {"namespace": "default", "labels": {"app": "reviews"}}})
    return out


def http_message(*entries: accesslog_pb2.HTTPAccessLogEntry) -> als_pb2.StreamAccessLogsMessage:
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(entries)
    return message


async def stream_logs(channel: grpc.aio.Channel, *messages: Any) -> None:
    stub = als_pb2_grpc.AccessLogServiceStub(channel)
    await stub.StreamAccessLogs(iter(messages), timeout=10)


def test_entries_become_records_and_a_bad_one_does_not_end_the_stream(tmp_path: Path) -> None:
    first = http_message(entry(metadata=PASSED))
    first.identifier.node.CopyFrom(node())  # Envoy names its node in the first message only
    first.identifier.log_name = "meshward"
    malformed = entry(metadata=PASSED)
    malformed.response.ClearField("response_code")
    denied = entry(
        code=403,
        details=f"rbac_access_denied_matched_policy[{DENY_RULE}]",
        metadata=rbac(meshward_deny_enforced_engine_result="denied"),
    )
    custom = entry(
        metadata={
            **PASSED,
            **rbac(
                istio_ext_authz_shadow_effective_policy_id="istio-ext-authz-ns[default]-policy[o]-rule[0]"
            ),
        }
    )
    second = http_message(malformed, denied, custom, entry(code=401, details="jwt_authn_denied"))
    third = als_pb2.StreamAccessLogsMessage()  # a message holds HTTP or TCP entries
    third.tcp_logs.log_entry.add().CopyFrom(tcp(received=10))
    sink = MemorySink()

    servicer, ledger = serve(tmp_path, sink, lambda ch: stream_logs(ch, first, second, third))

    assert [(r.allowed, r.reason) for r in sink.records] == [
        (True, "no_allow_policy"),
        (False, "denied_by_policy"),
        (True, "allowed_by_rbac"),
    ]
    # The node of the first message names the workload of every later entry.
    assert {r.destination_namespace for r in sink.records} == {"default"}
    assert {r.destination_workload for r in sink.records} == {"reviews"}
    assert all(request is not None for request in sink.requests)
    assert servicer.details() == {
        "streams": 0,
        "entries": {
            "recorded": 3,
            "ext_authz": 1,
            "undecided": 1,
            "unrecorded": 0,
            "malformed": 1,
        },
    }
    assert ledger.nodes()["reviews-1"]["received"] == 6


def test_records_the_spool_cannot_keep_are_counted(tmp_path: Path) -> None:
    message = http_message(entry(metadata=PASSED), entry(metadata=PASSED))
    message.identifier.node.CopyFrom(node())
    servicer, _ = serve(tmp_path, FullSink(), lambda ch: stream_logs(ch, message))
    assert servicer.outcomes["unrecorded"] == 2
    registry = CollectorRegistry()
    registry.register(servicer.collector())
    text = generate_latest(registry).decode()
    assert 'meshward_access_log_entries_total{outcome="unrecorded"} 2.0' in text


def metrics_message(node_id: str | None, **counters: float) -> Any:
    message = StreamMetricsMessage()
    if node_id is not None:
        message.identifier.node = node(node_id).SerializeToString()
    for name, value in counters.items():
        family = message.envoy_metrics.add(name=name.replace("__", "."))
        family.metric.add().counter.value = value
    return message


async def stream_metrics(channel: grpc.aio.Channel, *messages: Any) -> None:
    call = channel.stream_unary(
        f"/{METRICS_SERVICE}/StreamMetrics",
        request_serializer=StreamMetricsMessage.SerializeToString,
        response_deserializer=StreamMetricsResponse.FromString,
    )
    await call(iter(messages), timeout=10)


def test_envoy_counters_arrive_over_the_metrics_service(tmp_path: Path) -> None:
    prefix = "access_logs__grpc_access_log__"
    first = metrics_message(
        "reviews-1",
        **{
            prefix + "logs_written": 12,
            prefix + "logs_dropped": 2,
            prefix + "grpc_entries_flushed": 10,
            prefix + "grpc_entries_flush_failed": 1,
            "server__uptime": 99,  # not an access-log counter: read past
        },
    )
    # Later reports name no node: they are the first one's.
    later = metrics_message(None, **{prefix + "grpc_entries_flushed": 15})

    async def client(channel: grpc.aio.Channel) -> None:
        await stream_metrics(channel, metrics_message(None, **{prefix + "logs_written": 1}))
        await stream_metrics(channel, first, later)

    _, ledger = serve(tmp_path, MemorySink(), client)
    counters = ledger.nodes()["reviews-1"]
    assert counters["written"] == 12
    assert counters["dropped"] == 2
    assert counters["flushed"] == 15
    assert counters["flush_failed"] == 1
    assert counters["unreceived"] == 5  # counting started at 10 flushed, none received since
    assert set(ledger.nodes()) == {"reviews-1"}  # the nameless stream was not counted

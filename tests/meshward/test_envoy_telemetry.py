"""The Envoy config that reports natively enforced decisions: valid, and what the receiver reads."""

from __future__ import annotations

from typing import Any

# Imported for their descriptors: parsing an Any resolves these types.
import envoy.extensions.access_loggers.grpc.v3.als_pb2
import envoy.extensions.filters.http.set_metadata.v3.set_metadata_pb2  # noqa: F401
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.metrics.v3 import metrics_service_pb2
from google.protobuf import any_pb2, json_format

from authz.access_log_ledger import ENVOY_COUNTER_NAMES
from authz.envoy_access_log import NodeWorkload, Skipped, http_entry, node_workload
from meshward.envoy_bootstrap import AUTHZ_CLUSTER, AuthzMode, workload_metadata
from meshward.envoy_telemetry import (
    http_access_log,
    metrics_service_sink,
    rbac_passed_filter,
    tcp_access_log,
)
from tests.authz.test_envoy_access_log import entry


def parsed(config: dict[str, Any]) -> Any:
    """The typed config as its real message (fails on any unknown or mistyped field)."""
    return json_format.ParseDict(config["typed_config"], any_pb2.Any())


def test_the_loggers_send_to_the_authz_cluster_in_batches() -> None:
    for config in (http_access_log(request_headers=["Content-Type"]), tcp_access_log()):
        typed = parsed(config)
        assert typed.type_url.endswith("GrpcAccessLogConfig")
        common = config["typed_config"]["common_config"]
        assert common["grpc_service"] == {"envoy_grpc": {"cluster_name": AUTHZ_CLUSTER}}
        assert common["transport_api_version"] == "V3"
    assert http_access_log(request_headers=["Content-Type"])["typed_config"][
        "additional_request_headers_to_log"
    ] == ["content-type"]


@pytest.mark.parametrize("header", ["authorization", "Cookie", "proxy-authorization"])
def test_a_credential_is_never_asked_of_envoy(header: str) -> None:
    with pytest.raises(ValueError, match="credential"):
        http_access_log(request_headers=["x-team", header])


def test_the_stats_sink_reports_cumulative_counters_under_their_names() -> None:
    config = metrics_service_sink()
    message = metrics_service_pb2.MetricsServiceConfig()
    parsed(config).Unpack(message)
    assert not message.report_counters_as_deltas.value
    assert not message.emit_tags_as_labels  # the ledger reads the full stat names
    assert all("." in name for name in ENVOY_COUNTER_NAMES)


def test_the_node_metadata_names_the_workload_the_receiver_reads() -> None:
    node = base_pb2.Node(id="reviews-1")
    node.metadata.update(
        workload_metadata("default", {"app": "reviews"}, "reviews", AuthzMode.NATIVE)
    )
    assert node_workload(node) == NodeWorkload(
        "default", {"app": "reviews"}, "reviews", "reviews-1"
    )
    node = base_pb2.Node(id="bare")
    node.metadata.update(workload_metadata("default", {}, None, AuthzMode.NATIVE))
    assert node_workload(node).service is None


def test_the_passed_marker_is_what_the_receiver_reads() -> None:
    workload = NodeWorkload("default", {}, None, "n")
    for marker, recorded in (
        (rbac_passed_filter(), True),
        (rbac_passed_filter(ext_authz=True), False),  # ext_authz records those
    ):
        parsed(marker)
        (item,) = marker["typed_config"]["metadata"]
        metadata = {item["metadata_namespace"]: item["value"]}
        outcome = http_entry(entry(metadata=metadata), workload, None)
        assert (not isinstance(outcome, Skipped)) is recorded
    versioned = rbac_passed_filter(policy_set_version="v42")
    (item,) = versioned["typed_config"]["metadata"]
    outcome = http_entry(
        entry(metadata={item["metadata_namespace"]: item["value"]}), workload, None
    )
    assert not isinstance(outcome, Skipped)
    assert outcome.record.policy_set_version == "v42"

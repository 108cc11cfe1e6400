"""Protobuf message → protojson-form dict, checked against ``json_format.MessageToDict``.

``CheckRequest`` itself is checked through ``build_input`` in ``test_rego_input``; here
the field kinds it does not have today, on other Envoy messages.
"""

from __future__ import annotations

from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.http.cache.file_system_http_cache.v3 import file_system_http_cache_pb2
from google.api.expr.v1alpha1 import checked_pb2, syntax_pb2
from google.protobuf import any_pb2, duration_pb2, json_format, wrappers_pb2

from authz.protojson import message_to_dict


def _reference(message: Any) -> dict[str, Any]:
    # protojson.Marshal's defaults: JSON (lowerCamelCase) names, unpopulated fields
    # left out, enums by name.
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=False,
        always_print_fields_with_no_presence=False,
        use_integers_for_enums=False,
    )


def _any(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def test_other_message_types_match_message_to_dict() -> None:
    # Fields CheckRequest does not have today (Duration, wrappers, float, repeated enum,
    # maps keyed by integers, nested maps of messages) go through the same converter as
    # soon as Envoy adds one: checked here on other Envoy messages.
    cluster = cluster_pb2.Cluster(name="c")
    cluster.connect_timeout.FromMilliseconds(1500)
    cluster.per_connection_buffer_limit_bytes.value = 0
    cluster.lb_policy = cluster_pb2.Cluster.MAGLEV
    cluster.common_lb_config.healthy_panic_threshold.value = 12.5
    cluster.outlier_detection.interval.FromNanoseconds(1)
    cluster.upstream_connection_options.tcp_keepalive.keepalive_time.value = 7
    cluster.metadata.filter_metadata["m"].update({"a": [1, "b"]})
    cluster.typed_extension_protocol_options["x"].CopyFrom(_any(duration_pb2.Duration(seconds=3)))
    cache = file_system_http_cache_pb2.FileSystemHttpCacheConfig(evict_fraction=0.1)
    statuses = accesslog_pb2.GrpcStatusFilter(
        statuses=[accesslog_pb2.GrpcStatusFilter.OK, accesslog_pb2.GrpcStatusFilter.UNAVAILABLE]
    )
    source_info = syntax_pb2.SourceInfo(positions={1: 5, 2**40: 7}, line_offsets=[1, 2])
    checked = checked_pb2.CheckedExpr()
    checked.reference_map[3].name = "x"
    checked.reference_map[4].value.int64_value = -(2**62)
    wrapper_values = [
        wrappers_pb2.UInt64Value(value=2**64 - 1),
        wrappers_pb2.BytesValue(value=b"\xff"),
        wrappers_pb2.FloatValue(value=0.1),
        wrappers_pb2.BoolValue(),
    ]
    messages: list[Any] = [
        cluster,
        cache,
        statuses,
        source_info,
        checked,
        *wrapper_values,
        base_pb2.Metadata(),
    ]
    for message in messages:
        assert message_to_dict(message) == _reference(message), message

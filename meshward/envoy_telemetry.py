"""Envoy config that reports natively enforced decisions to ``meshward authz``.

Pure functions returning dicts, for the bootstraps of sidecars that enforce Istio
policies with Envoy's RBAC filters (``native`` and ``hybrid`` modes). Everything goes
to the authz cluster (:data:`AUTHZ_CLUSTER`: the listener
and mTLS of ext_authz):

- :func:`http_access_log` (``http_grpc``) and :func:`tcp_access_log` (``tcp_grpc``):
  one entry per request or connection, batched by Envoy, off the request path. Put
  the first in the inbound ``http_connection_manager``'s ``access_log``, the second
  in a TCP port's ``tcp_proxy``'s;
- :func:`rbac_passed_filter`: an HTTP filter right after the RBAC chain
  (``meshward.rbac.http``, and native mode's ``custom_unavailable`` filter), before
  ext_authz, that marks a request as let through by every RBAC filter; without it
  meshward cannot tell "allowed, no policy applies" from "never reached the RBAC
  filters" and records neither;
- :func:`metrics_service_sink`: a ``stats_sinks`` entry streaming Envoy's counters,
  so meshward counts the entries Envoy dropped (see ``authz.access_log_ledger``).

What the logger sends is what Envoy's ``HTTPAccessLogEntry`` always holds (no header
but the pseudo headers, ``user-agent``, ``referer``, ``x-forwarded-for`` and
``x-request-id``), all dynamic metadata, the peer certificate, and the
``request_headers`` asked for: never a credential (asking for ``authorization``,
``cookie`` and the like is refused here).

Requests that go on to ext_authz are recorded by ext_authz, not from the log (see
``authz.envoy_access_log``); a ``hybrid`` sidecar whose ext_authz runs on every request
the chain lets through (Rego mode ``always``) says so with
``rbac_passed_filter(ext_authz=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from audit.redaction import ALWAYS_REDACTED_HEADERS
from authz.envoy_access_log import PASSED_NAMESPACE

__all__ = [
    "AUTHZ_CLUSTER",
    "AUTHZ_TELEMETRY_CLUSTER",
    "BUFFER_FLUSH_INTERVAL",
    "BUFFER_SIZE_BYTES",
    "LOG_NAME",
    "http_access_log",
    "metrics_service_sink",
    "rbac_passed_filter",
    "tcp_access_log",
]

# The cluster of `meshward authz`: ext_authz, and the access-log and metrics streams.
AUTHZ_CLUSTER = "meshward_authz"
# With several authz workers: the first one, where a sidecar's telemetry streams go.
AUTHZ_TELEMETRY_CLUSTER = "meshward_authz_telemetry"
LOG_NAME = "meshward"
BUFFER_FLUSH_INTERVAL = "1s"  # Envoy's default: a decision reaches the spool within ~1 s
# Envoy's default buffer: entries wait for a flush or for this many bytes; past it, with
# the stream gone or backed up, Envoy drops them (and counts logs_dropped).
BUFFER_SIZE_BYTES = 16384
_HTTP_GRPC = "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
_TCP_GRPC = "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig"
_SET_METADATA = "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config"
_METRICS_SERVICE = "type.googleapis.com/envoy.config.metrics.v3.MetricsServiceConfig"


def rbac_passed_filter(
    *, ext_authz: bool = False, policy_set_version: str | None = None
) -> dict[str, Any]:
    """The HTTP filter to put right after the RBAC chain: the request passed it.

    ``ext_authz``: every request passing here goes on to ext_authz, which records it.
    With ``policy_set_version`` (the version of the policy set whose filters precede
    it, when it is delivered with them) the record names it, and ``meshward audit
    explain`` finds the policies that decided.
    """
    value: dict[str, Any] = {"passed": True}
    if ext_authz:
        value["ext_authz"] = True
    if policy_set_version is not None:
        value["policy_set_version"] = policy_set_version
    return {
        "name": "meshward.rbac.passed",
        "typed_config": {
            "@type": _SET_METADATA,
            "metadata": [{"metadata_namespace": PASSED_NAMESPACE, "value": value}],
        },
    }


def _common_config(cluster: str) -> dict[str, Any]:
    return {
        "log_name": LOG_NAME,
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
        "buffer_flush_interval": BUFFER_FLUSH_INTERVAL,
        "buffer_size_bytes": BUFFER_SIZE_BYTES,
        # No grpc_stream_retry_policy: with Envoy 1.40 a stream that retried its
        # connection while authz restarted sometimes carried nothing once connected
        # (1 run in 5 here), stalling every later entry of that worker. Without it,
        # what is flushed while authz is away is lost, and the ledger counts it.
    }


def http_access_log(
    *, cluster: str = AUTHZ_CLUSTER, request_headers: Sequence[str] = ()
) -> dict[str, Any]:
    """An ``access_log`` entry of the inbound connection manager: every request to
    meshward. ``request_headers`` are logged too (and stored, redacted like ext_authz's
    snapshot), so ``replay`` can re-evaluate policies that read them; credentials are
    refused (``ValueError``)."""
    names = [h.lower() for h in request_headers]
    refused = sorted(set(names) & ALWAYS_REDACTED_HEADERS)
    if refused:
        raise ValueError(
            f"request_headers {', '.join(refused)}: a credential is never sent to the audit trail"
        )
    config: dict[str, Any] = {"@type": _HTTP_GRPC, "common_config": _common_config(cluster)}
    if names:
        config["additional_request_headers_to_log"] = names
    return {"name": "envoy.access_loggers.http_grpc", "typed_config": config}


def tcp_access_log(*, cluster: str = AUTHZ_CLUSTER) -> dict[str, Any]:
    """An ``access_log`` entry of a TCP port's ``tcp_proxy``: every connection to meshward."""
    return {
        "name": "envoy.access_loggers.tcp_grpc",
        "typed_config": {"@type": _TCP_GRPC, "common_config": _common_config(cluster)},
    }


def metrics_service_sink(*, cluster: str = AUTHZ_CLUSTER) -> dict[str, Any]:
    """A ``stats_sinks`` entry: Envoy's counters to meshward every ``stats_flush_interval``.

    Cumulative counters (a lost report is made up by the next) under their full names
    (``emit_tags_as_labels`` off), as ``authz.access_log_ledger`` reads them.
    """
    return {
        "name": "envoy.stat_sinks.metrics_service",
        "typed_config": {
            "@type": _METRICS_SERVICE,
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
            "report_counters_as_deltas": False,
            "emit_tags_as_labels": False,
        },
    }

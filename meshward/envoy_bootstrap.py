"""Envoy bootstraps for meshward sidecars: SVIDs from the agent over SDS, policies enforced by
Envoy's RBAC filters (from the agent over ECDS), by ext_authz to authz, or both.

Pure functions returning dicts (dump them as JSON, or as YAML with :func:`dump_yaml`);
nothing here starts a process. The shapes are the ones a SPIRE-era Envoy config uses, so
the same bootstrap works against either agent: a static gRPC cluster to the agent's Unix
socket (HTTP/2), ``default`` as the TLS certificate, ``ROOTCA`` as the validation context.
The end-to-end tests run these very shapes; ``meshward envoy bootstrap`` prints
:func:`sidecar_bootstrap`.

A sidecar enforces AuthorizationPolicy in one of three modes (:class:`AuthzMode`):

- ``ext_authz``: every request asks ``meshward authz`` (Istio and Rego policies);
- ``native``: the Istio policies run in Envoy, as the RBAC chain the agent serves over
  ECDS (``meshward.rbac.http``, one resource: ``authz.rbac_chain``); no ext_authz, so a
  request a CUSTOM policy selects is denied;
- ``hybrid``: the RBAC chain first, then ext_authz only for requests a CUSTOM policy
  selected (Istio's mechanism: the CUSTOM slot's metadata enables the filter), or for
  every request the chain let through when Rego runs on all of them
  (``authz.rego.mode: always``).

In native and hybrid mode the node metadata tells the agent which workload the sidecar
protects (``meshward.workload``, as ``context_extensions`` tell ext_authz), and the
runtime the RBAC filters need to decide as meshward's engine does is set.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from authz.envoy_access_log import NODE_LOGGED_HEADERS
from authz.rbac_chain import EXTENSION_WITH_MATCHER, HTTP_CHAIN, custom_unavailable_filter
from authz.rbac_matchers import JWT_PAYLOAD_KEY
from authz.rbac_translation import ENVOY_RUNTIME, Family, ext_authz_enabled_metadata
from identity.extension_configs import AUTHZ_MODE_METADATA_KEY, WORKLOAD_METADATA_KEY
from meshward.envoy_telemetry import (
    AUTHZ_CLUSTER,
    AUTHZ_TELEMETRY_CLUSTER,
    http_access_log,
    metrics_service_sink,
    rbac_passed_filter,
)

__all__ = [
    "AGENT_CLUSTER",
    "AUTHZ_CLUSTER",
    "JWT_AUTHN_FILTER",
    "AuthzMode",
    "JwtIssuer",
    "Upstream",
    "agent_cluster",
    "authz_cluster",
    "client_bootstrap",
    "common_tls_context",
    "dump_yaml",
    "ext_authz_filter",
    "jwt_authn_filter",
    "rbac_chain_filter",
    "sds_secret",
    "server_bootstrap",
    "sidecar_bootstrap",
    "workload_extensions",
    "workload_metadata",
]


class AuthzMode(StrEnum):
    """Where a sidecar's policies are enforced (see the module docstring)."""

    NATIVE = "native"
    EXT_AUTHZ = "ext_authz"
    HYBRID = "hybrid"


AGENT_CLUSTER = "meshward_agent"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"
_DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _grpc_cluster(name: str, *addresses: dict[str, Any]) -> dict[str, Any]:
    """A static cluster speaking gRPC (so HTTP/2) to these addresses (round robin)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": a}} for a in addresses]}],
        },
    }


def agent_cluster(agent_socket: Path, *, name: str = AGENT_CLUSTER) -> dict[str, Any]:
    """The SDS server: the agent's Unix socket."""
    return _grpc_cluster(name, {"pipe": {"path": str(agent_socket)}})


def _agent_config_source(cluster: str) -> dict[str, Any]:
    return {
        "resource_api_version": "V3",
        # Wait for the resource however long it takes: a workload the agent does not know
        # (or whose policies it cannot serve) must stay unready rather than come up
        # without a certificate or its filters after 15 s.
        "initial_fetch_timeout": "0s",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}],
        },
    }


def sds_secret(name: str, *, cluster: str = AGENT_CLUSTER) -> dict[str, Any]:
    return {"name": name, "sds_config": _agent_config_source(cluster)}


def rbac_chain_filter(*, cluster: str = AGENT_CLUSTER) -> dict[str, Any]:
    """The workload's RBAC chain, from the agent over ECDS.

    No default config: until the agent has sent the chain the listener does not serve,
    and a filter whose config is missing answers 500 (Envoy's missing-config filter):
    no request goes through unchecked. A lost ECDS stream leaves the last chain in place.
    """
    return {
        "name": HTTP_CHAIN,
        "config_discovery": {
            "config_source": _agent_config_source(cluster),
            "type_urls": [EXTENSION_WITH_MATCHER],
        },
    }


def workload_metadata(
    namespace: str, labels: dict[str, str], service: str | None, mode: AuthzMode
) -> dict[str, Any]:
    """Node metadata: which workload the agent serves RBAC filters for, and the mode."""
    workload: dict[str, Any] = {"namespace": namespace, "labels": dict(labels)}
    if service:
        workload["service"] = service
    return {WORKLOAD_METADATA_KEY: workload, AUTHZ_MODE_METADATA_KEY: str(mode)}


def common_tls_context(
    *, peer_id: str | None, svid: str = "default", bundle: str = "ROOTCA"
) -> dict[str, Any]:
    """Our SVID and the bundle from SDS; the peer must present ``peer_id`` if given.

    Without ``peer_id`` any SVID the bundle vouches for is accepted, and who may do what
    is left to ext_authz (as an Istio sidecar leaves it to its RBAC filter).
    """
    default: dict[str, Any] = {}  # Envoy requires the field even when it adds nothing
    if peer_id is not None:
        default["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": peer_id}}
        ]
    validation = {
        "default_validation_context": default,
        "validation_context_sds_secret_config": sds_secret(bundle),
    }
    return {
        "tls_certificate_sds_secret_configs": [sds_secret(svid)],
        "combined_validation_context": validation,
    }


def _node(node_id: str, metadata: dict[str, Any] | None) -> dict[str, Any]:
    node: dict[str, Any] = {"id": node_id, "cluster": "meshward"}
    if metadata:
        node["metadata"] = metadata
    return node


def _admin(port: int) -> dict[str, Any]:
    return {"address": _socket_address("127.0.0.1", port)}


_EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_EXT_AUTHZ_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


def authz_cluster(
    port: int, *, authz_id: str | None = None, workers: int = 1, name: str = AUTHZ_CLUSTER
) -> dict[str, Any]:
    """``meshward authz`` on loopback, its ``workers`` processes (``authz.workers``) on
    ``port`` and the ports after it; with ``authz_id``, over mTLS.

    The sidecar then presents its own SVID (``default`` from the agent over SDS, the
    same certificate its listener serves) and requires authz to present ``authz_id``,
    which ``meshward authz`` does with ``authz.tls`` set (its SVID from the same agent).
    """
    cluster = _grpc_cluster(name, *(_socket_address("127.0.0.1", port + i) for i in range(workers)))
    if authz_id is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _UPSTREAM_TLS,
                # gRPC servers negotiate HTTP/2 by ALPN.
                "common_tls_context": {
                    **common_tls_context(peer_id=authz_id),
                    "alpn_protocols": ["h2"],
                },
            },
        }
    return cluster


def ext_authz_filter(*, enabled_by_custom: bool = False) -> dict[str, Any]:
    """Every request asks meshward (with ``enabled_by_custom``, only those a CUSTOM policy
    of the RBAC chain before it selected); if it cannot answer, the request is denied."""
    config: dict[str, Any] = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": _EXT_AUTHZ,
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "grpc_service": {"envoy_grpc": {"cluster_name": AUTHZ_CLUSTER}, "timeout": "1s"},
            # Rego policies read parsed_body; a larger body is sent cut short and marked
            # (truncated_body), as in OPA-Envoy's recommended setup.
            "with_request_body": {"max_request_bytes": 8192, "allow_partial_message": True},
            # The verified end-user token (requestPrincipals, request.auth.*): Envoy sends
            # no filter metadata to ext_authz unless its namespace is listed.
            "metadata_context_namespaces": [JWT_AUTHN_FILTER],
        },
    }
    if enabled_by_custom:
        config["typed_config"]["filter_enabled_metadata"] = ext_authz_enabled_metadata(Family.HTTP)
    return config


def workload_extensions(
    namespace: str, labels: dict[str, str], service: str | None
) -> dict[str, Any]:
    """Tell meshward which workload this sidecar protects (context_extensions)."""
    extensions = {"namespace": namespace, "labels": ",".join(f"{k}={v}" for k, v in labels.items())}
    if service:
        extensions["service"] = service
    return {
        "envoy.filters.http.ext_authz": {
            "@type": _EXT_AUTHZ_ROUTE,
            "check_settings": {"context_extensions": extensions},
        }
    }


def _http_listener(
    name: str,
    port: int,
    route: dict[str, Any],
    transport_socket: dict[str, Any] | None,
    http_filters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": _HCM,
                    "stat_prefix": name,
                    "route_config": {
                        "virtual_hosts": [
                            {
                                "name": "all",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, **route}],
                            }
                        ]
                    },
                    "http_filters": [
                        *(http_filters or []),
                        {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
                    ],
                },
            }
        ]
    }
    if http_filters:
        # Policies read remote.ip as the peer's address, as the engine does: never an
        # address a client wrote into X-Forwarded-For.
        chain["filters"][0]["typed_config"]["use_remote_address"] = True
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "address": _socket_address("127.0.0.1", port),
        "filter_chains": [chain],
    }


def client_bootstrap(
    *,
    node_id: str,
    agent_socket: Path,
    upstream_port: int,
    server_id: str,
    listen_port: int = 0,
    admin_port: int = 0,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Plain HTTP in on ``listen_port``, out over mTLS to ``upstream_port`` (must be ``server_id``)."""
    upstream = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                # One request per upstream connection: every request is a fresh mTLS
                # handshake, so a rotated certificate is exercised at once.
                "common_http_protocol_options": {"max_requests_per_connection": 1},
                "explicit_http_config": {"http_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket_address("127.0.0.1", upstream_port)}}
                    ]
                }
            ],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _UPSTREAM_TLS,
                "common_tls_context": common_tls_context(peer_id=server_id),
            },
        },
    }
    return {
        "node": _node(node_id, metadata),
        "admin": _admin(admin_port),
        "static_resources": {
            "listeners": [
                _http_listener("outbound", listen_port, {"route": {"cluster": "upstream"}}, None)
            ],
            "clusters": [upstream, agent_cluster(agent_socket)],
        },
    }


def server_bootstrap(
    *,
    node_id: str,
    agent_socket: Path,
    client_id: str,
    listen_port: int = 0,
    admin_port: int = 0,
    metadata: dict[str, Any] | None = None,
    authz_port: int | None = None,
    workload: tuple[str, dict[str, str], str | None] = ("default", {}, None),
    authz_id: str | None = None,
) -> dict[str, Any]:
    """mTLS in on ``listen_port`` from ``client_id`` only, answered with 200 by Envoy itself.

    With ``authz_port`` every request is first checked by ``meshward authz`` there, for
    ``workload`` (namespace, labels, service); with ``authz_id`` too, over mTLS.
    """
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": common_tls_context(peer_id=client_id),
        },
    }
    route: dict[str, Any] = {"direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
    clusters = [agent_cluster(agent_socket)]
    filters = None
    if authz_port is not None:
        route["typed_per_filter_config"] = workload_extensions(*workload)
        clusters.append(authz_cluster(authz_port, authz_id=authz_id))
        filters = [ext_authz_filter()]
    return {
        "node": _node(node_id, metadata),
        "admin": _admin(admin_port),
        "static_resources": {
            "listeners": [_http_listener("inbound", listen_port, route, tls, filters)],
            "clusters": clusters,
        },
    }


@dataclass(slots=True, frozen=True)
class Upstream:
    """A destination the outbound listener routes to: ``name`` as the Host header."""

    name: str
    port: int  # the destination sidecar's inbound listener on loopback
    spiffe_id: str  # what its certificate must name, or the connection is refused


@dataclass(slots=True, frozen=True)
class JwtIssuer:
    """End-user tokens ``jwt_authn`` verifies (against ``jwks_file``) before ext_authz."""

    issuer: str
    jwks_file: Path
    audiences: tuple[str, ...] = ()


# Both directions log one line per request, naming the decision that let it through or not.
_ACCESS_LOG_FORMAT = (
    "[%START_TIME%] %DOWNSTREAM_PEER_URI_SAN% -> %UPSTREAM_PEER_URI_SAN% "
    '"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
    "%RESPONSE_CODE_DETAILS% decision=%REQ(X-MESHWARD-DECISION-ID)%%RESP(X-MESHWARD-DECISION-ID)% "
    "%DURATION%ms\n"
)


def _access_log(path: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "log_format": {"text_format_source": {"inline_string": _ACCESS_LOG_FORMAT}},
            },
        }
    ]


def jwt_authn_filter(issuer: JwtIssuer) -> dict[str, Any]:
    """Verify a bearer token when one is sent; requests without one go on to the policy.

    The verified payload reaches ext_authz as ``jwt_authn`` metadata (``request.auth.*``
    for Istio policies), and the header stays (``forward``) for Rego's ``io.jwt.decode``.
    A token that fails verification is refused by Envoy with 401.
    """
    provider: dict[str, Any] = {
        "issuer": issuer.issuer,
        "local_jwks": {"filename": str(issuer.jwks_file)},
        "forward": True,
        # Istio's key: the RBAC filters' request.auth matchers read it there too.
        "payload_in_metadata": JWT_PAYLOAD_KEY,
    }
    if issuer.audiences:
        provider["audiences"] = list(issuer.audiences)
    return {
        "name": JWT_AUTHN_FILTER,
        "typed_config": {
            "@type": _JWT_AUTHN,
            "providers": {"end_users": provider},
            "rules": [
                {
                    "match": {"prefix": "/"},
                    "requires": {
                        "requires_any": {
                            "requirements": [{"provider_name": "end_users"}, {"allow_missing": {}}]
                        }
                    },
                }
            ],
        },
    }


def _upstream_cluster(upstream: Upstream) -> dict[str, Any]:
    name = f"outbound|{upstream.name}"
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket_address("127.0.0.1", upstream.port)}}
                    ]
                }
            ],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _UPSTREAM_TLS,
                "sni": upstream.name,
                # As an Istio sidecar does: the destination must prove it is that service.
                "common_tls_context": common_tls_context(peer_id=upstream.spiffe_id),
            },
        },
    }


def _outbound_listener(
    port: int, upstreams: Sequence[Upstream], access_log: str | None
) -> dict[str, Any]:
    """Plain HTTP from the application on loopback, routed by Host to the upstream sidecars."""
    hosts = [
        {
            "name": u.name,
            "domains": [u.name, f"{u.name}:*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": f"outbound|{u.name}"}}],
        }
        for u in upstreams
    ]
    manager: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": "outbound",
        "route_config": {"name": "outbound", "virtual_hosts": hosts},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    if access_log is not None:
        manager["access_log"] = _access_log(access_log)
    return {
        "name": "outbound",
        "address": _socket_address("127.0.0.1", port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def sidecar_bootstrap(
    *,
    workload: str,
    namespace: str,
    labels: dict[str, str],
    service: str | None,
    agent_socket: Path,
    app_port: int,
    authz_port: int | None = None,
    authz_mode: AuthzMode = AuthzMode.EXT_AUTHZ,
    rego_always: bool = False,
    inbound_port: int = 15006,
    admin_port: int = 15000,
    authz_id: str | None = None,
    authz_workers: int = 1,
    outbound_port: int | None = None,
    upstreams: Sequence[Upstream] = (),
    jwt_issuer: JwtIssuer | None = None,
    access_log: str | None = None,
    logged_headers: Sequence[str] = (),
) -> dict[str, Any]:
    """A sidecar: inbound mTLS with the workload's SVID, every request checked as
    ``authz_mode`` says (ext_authz to authz on ``authz_port`` by default; the CLI's
    default is hybrid).

    Requests that pass go to the application on 127.0.0.1:``app_port``. With ``authz_id``
    the sidecar reaches authz over mTLS and requires that SPIFFE ID of it. With
    ``authz_workers`` (``authz.workers``) ext_authz spreads over that many processes from
    ``authz_port`` on, and the access logs and counters go to the first one only (a
    node's two streams must meet in one ledger). In hybrid
    mode ``rego_always`` sends every request the RBAC chain allowed to ext_authz (for
    ``authz.rego.mode: always``), not only those a CUSTOM policy selected. With
    ``outbound_port`` the application reaches ``upstreams`` through it by Host name, over
    mTLS, each required to present its SPIFFE ID. ``jwt_issuer`` verifies end-user tokens
    before the check; ``access_log`` (a path, e.g. /dev/stdout) logs every request.
    ``logged_headers``: request headers the audit trail keeps of what the RBAC chain
    decided (native, hybrid), so that replay can decide again with policies reading them.
    """
    mode = AuthzMode(authz_mode)
    ext_authz = mode is not AuthzMode.NATIVE
    if ext_authz and authz_port is None:
        raise ValueError(f"authz_port is needed in {mode} mode (where ext_authz runs)")
    if rego_always and mode is not AuthzMode.HYBRID:
        raise ValueError(
            f"rego_always applies to hybrid mode only ({mode} mode sends "
            + ("every request to ext_authz)" if ext_authz else "none to ext_authz)")
        )
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": common_tls_context(peer_id=None),
        },
    }
    app = {
        "name": "app",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "app",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket_address("127.0.0.1", app_port)}}
                    ]
                }
            ],
        },
    }
    route: dict[str, Any] = {"route": {"cluster": "app"}}
    filters: list[dict[str, Any]] = []
    if jwt_issuer is not None:
        filters.append(jwt_authn_filter(jwt_issuer))
    if mode is not AuthzMode.EXT_AUTHZ:
        filters.append(rbac_chain_filter())
    if mode is AuthzMode.NATIVE:
        filters.append(custom_unavailable_filter())
    if mode is not AuthzMode.EXT_AUTHZ and authz_port is not None:
        # The request passed every RBAC filter: what the access-log receiver records as
        # an allow (requests going on to ext_authz are recorded by ext_authz instead).
        filters.append(rbac_passed_filter(ext_authz=rego_always))
    if mode is not AuthzMode.NATIVE:
        route["typed_per_filter_config"] = workload_extensions(namespace, labels, service)
        # After the chain, never inside it (authz.rbac_chain says why).
        filters.append(
            ext_authz_filter(enabled_by_custom=mode is AuthzMode.HYBRID and not rego_always)
        )
    inbound = _http_listener("inbound", inbound_port, route, tls, filters)
    manager = inbound["filter_chains"][0]["filters"][0]["typed_config"]
    # The application learns the caller's verified SPIFFE ID (and nothing a client sent).
    manager["forward_client_cert_details"] = "SANITIZE_SET"
    manager["set_current_client_cert_details"] = {"uri": True}
    loggers = [] if access_log is None else _access_log(access_log)
    audited = mode is not AuthzMode.EXT_AUTHZ and authz_port is not None
    telemetry = AUTHZ_TELEMETRY_CLUSTER if authz_workers > 1 else AUTHZ_CLUSTER
    if audited:
        # What the RBAC chain decided reaches the audit trail over the access-log service.
        loggers.append(http_access_log(cluster=telemetry, request_headers=logged_headers))
    if loggers:
        manager["access_log"] = loggers
    listeners = [inbound]
    if outbound_port is not None:
        listeners.append(_outbound_listener(outbound_port, upstreams, access_log))
    clusters = [app, agent_cluster(agent_socket)]
    if authz_port is not None:
        clusters.append(authz_cluster(authz_port, authz_id=authz_id, workers=authz_workers))
        if audited and authz_workers > 1:
            clusters.append(authz_cluster(authz_port, authz_id=authz_id, name=telemetry))
    clusters.extend(_upstream_cluster(u) for u in upstreams)
    bootstrap: dict[str, Any] = {
        "node": _node(
            workload,
            None
            if mode is AuthzMode.EXT_AUTHZ
            else {
                **workload_metadata(namespace, labels, service, mode),
                **({NODE_LOGGED_HEADERS: list(logged_headers)} if logged_headers else {}),
            },
        ),
        "admin": _admin(admin_port),
    }
    if mode is not AuthzMode.EXT_AUTHZ:
        # The RBAC filters decide as the engine does only with this runtime.
        bootstrap["layered_runtime"] = {
            "layers": [{"name": "meshward-rbac", "static_layer": dict(ENVOY_RUNTIME)}]
        }
    bootstrap["static_resources"] = {"listeners": listeners, "clusters": clusters}
    if audited:
        # Envoy's counters, so that meshward counts access-log entries that never arrived.
        bootstrap["stats_sinks"] = [metrics_service_sink(cluster=telemetry)]
    return bootstrap


# Plain YAML scalars that Envoy's YAML reader (YAML 1.1 booleans included) takes for
# something else than the string PyYAML meant: a label value "y" would become true.
_AMBIGUOUS = re.compile(r"y|Y|n|N|yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF|=|~")


class _EnvoyDumper(yaml.SafeDumper):
    pass


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if _AMBIGUOUS.fullmatch(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_EnvoyDumper.add_representer(str, _string)


def dump_yaml(bootstrap: dict[str, Any]) -> str:
    """YAML Envoy reads back as the same values (strings it would take as booleans quoted)."""
    return yaml.dump(bootstrap, Dumper=_EnvoyDumper, sort_keys=False)

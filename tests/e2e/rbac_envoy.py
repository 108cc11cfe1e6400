"""A test Envoy that enforces translated RBAC filters, a client for it, and its access log.

One Envoy serves every policy set: per (set, workload) an HTTP listener and a TCP
listener, each with a TLS filter chain (client certificates optional, so principals
come from real peer certificates) and a plaintext one. The HTTP chain is the one a
native-mode sidecar runs: ``jwt_authn`` (payload under ``payload``), the translated
CUSTOM slot, an ``ext_authz`` filter enabled by its metadata, then the AUDIT, DENY
and ALLOW slots and a router to a tiny upstream (a listener of the same Envoy that
answers 200). The TCP chain is the translated network filters then ``tcp_proxy`` to
that upstream.

With ``chain=True`` the four HTTP RBAC filters are the one composite filter a native or
hybrid sidecar gets over ECDS (``authz.rbac_chain``), and ``ext_authz`` follows it, as in
those sidecars.

``ext_authz`` points at a port where nothing listens and fails open with
``x-envoy-auth-failure-mode-allowed``: the request goes on, and the access log shows
whether ext_authz ran, which is all a CUSTOM policy decides here.

Every request and connection is logged as one JSON line (``ACCESS_LOG_FIELDS``) with
the RBAC filters' dynamic metadata, from which the test reads Envoy's decision.
"""

from __future__ import annotations

import json
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import external_auth_pb2

from authz.rbac_chain import http_chain
from authz.rbac_translation import ENVOY_RUNTIME, Family, WorkloadRbac, ext_authz_enabled_metadata
from tests.e2e.rbac_corpus import IDENTITIES, ISSUERS, Identity, Request, WorkloadSpec

__all__ = [
    "SERVER_ID",
    "ClientCerts",
    "Listener",
    "Sent",
    "bootstrap",
    "by_connection",
    "check_request",
    "connect",
    "filter_chains",
    "read_access_log",
    "reserve_ports",
]

SERVER_ID = "spiffe://example.org/ns/default/sa/api"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
_JWT = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)

HTTP_LOG_FORMAT = {
    "kind": "http",
    "id": "%REQ(x-diff-id)%",
    "code": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "rbac": "%DYNAMIC_METADATA(envoy.filters.http.rbac)%",
    "hint": "%DYNAMIC_METADATA(envoy.common:access_log_hint)%",
    "ext_authz": "%REQ(x-envoy-auth-failure-mode-allowed)%",
    "jwt": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn)%",
    "peer": "%DOWNSTREAM_PEER_URI_SAN%",
    "remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "local": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "sni": "%REQUESTED_SERVER_NAME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
}
TCP_LOG_FORMAT = {
    "kind": "tcp",
    "termination": "%CONNECTION_TERMINATION_DETAILS%",
    "rbac": "%DYNAMIC_METADATA(envoy.filters.network.rbac)%",
    "hint": "%DYNAMIC_METADATA(envoy.common:access_log_hint)%",
    "peer": "%DOWNSTREAM_PEER_URI_SAN%",
    "remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "local": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "sni": "%REQUESTED_SERVER_NAME%",
}


def reserve_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports nothing listens on.

    Picked below the kernel's ephemeral range, so that no client connection (ours or
    another process's) takes one before Envoy binds it, and held together while picked.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, low - 12000), low))
    random.SystemRandom().shuffle(candidates)
    held: list[socket.socket] = []
    try:
        for port in candidates:
            if len(held) == count:
                break
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        assert len(held) == count, f"found only {len(held)} free ports below {low}"
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


class ClientCerts:
    """Certificates made by the tests' own authority: the server's, and each identity's."""

    def __init__(self, directory: Path) -> None:
        from tests.authz.svids import Authority

        self.authority = Authority("example.org")
        self.directory = directory
        server = self.authority.leaf(SERVER_ID)
        self.server_chain = server.chain_pem.decode()
        self.server_key = server.key_pem.decode()
        self.roots = self.authority.roots_pem.decode()
        self.jwt_key = ec.generate_private_key(ec.SECP256R1())
        # All made now: the client threads then only read them.
        self._contexts = {identity.name: self._context(identity) for identity in IDENTITIES}

    def _context(self, identity: Identity) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.roots)
        context.check_hostname = False  # the server is checked by its CA only
        if identity.has_certificate:
            leaf = self.authority.leaf(identity.uri, dns=identity.dns)
            chain = self.directory / f"{identity.name}.pem"
            key = self.directory / f"{identity.name}.key"
            chain.write_bytes(leaf.chain_pem)
            key.write_bytes(leaf.key_pem)
            context.load_cert_chain(chain, key)
        return context

    def context(self, identity: Identity) -> ssl.SSLContext:
        return self._contexts[identity.name]

    def token(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self.jwt_key, algorithm="ES256", headers={"kid": "k1"})

    def jwks(self) -> str:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.jwt_key.public_key()))
        jwk.update({"kid": "k1", "alg": "ES256", "use": "sig"})
        return json.dumps({"keys": [jwk]})


@dataclass(slots=True, frozen=True)
class Listener:
    """The two listeners of one (policy set, workload)."""

    set_name: str
    workload: WorkloadSpec
    http_port: int
    tcp_port: int
    rbac: WorkloadRbac


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _cluster(name: str, port: int, *, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def filter_chains(filters: list[dict[str, Any]], certs: ClientCerts) -> list[dict[str, Any]]:
    """TLS with the server's certificate (client certificates optional), and plaintext."""
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS,
            # Optional: a TLS client without a certificate is a case of its own.
            "require_client_certificate": False,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"inline_string": certs.server_chain},
                        "private_key": {"inline_string": certs.server_key},
                    }
                ],
                "validation_context": {"trusted_ca": {"inline_string": certs.roots}},
            },
        },
    }
    return [
        {
            "filter_chain_match": {"transport_protocol": "tls"},
            "filters": filters,
            "transport_socket": tls,
        },
        {"filters": filters},
    ]


def _access_log(path: Path, fields: Mapping[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": _FILE_LOG,
                "path": str(path),
                "log_format": {"json_format": dict(fields)},
            },
        }
    ]


def _jwt_authn(jwks: str) -> dict[str, Any]:
    providers = {
        f"issuer-{i}": {
            "issuer": issuer,
            "local_jwks": {"inline_string": jwks},
            "payload_in_metadata": "payload",  # Istio's key; the translation reads it there
        }
        for i, issuer in enumerate(ISSUERS)
    }
    requirements: list[dict[str, Any]] = [{"provider_name": name} for name in providers]
    requirements.append({"allow_missing": {}})
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _JWT,
            "providers": providers,
            "rules": [
                {
                    "match": {"prefix": "/"},
                    "requires": {"requires_any": {"requirements": requirements}},
                }
            ],
        },
    }


def _ext_authz() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": _EXT_AUTHZ,
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": "ext_authz"}, "timeout": "1s"},
            "failure_mode_allow": True,
            "failure_mode_allow_header_add": True,
            "filter_enabled_metadata": ext_authz_enabled_metadata(Family.HTTP),
        },
    }


def _http_listener(
    listener: Listener, certs: ClientCerts, log: Path, jwks: str, *, chain: bool
) -> dict[str, Any]:
    custom, *enforcing = [f.as_config() for f in listener.rbac.http]
    rbac = (
        [http_chain(listener.rbac).as_config(), _ext_authz()]
        if chain
        else [custom, _ext_authz(), *enforcing]
    )
    manager = {
        "@type": _HCM,
        "stat_prefix": f"{listener.set_name}.{listener.workload.name}",
        # remote.ip is the peer (xff_num_trusted_hops 0), as the engine has it.
        "use_remote_address": True,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ]
        },
        "http_filters": [
            _jwt_authn(jwks),
            *rbac,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
        "access_log": _access_log(log, HTTP_LOG_FORMAT),
    }
    filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]
    return {
        "name": f"http.{listener.set_name}.{listener.workload.name}",
        "address": _address(listener.http_port),
        "listener_filters": [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": _TLS_INSPECTOR},
            }
        ],
        "filter_chains": filter_chains(filters, certs),
    }


def _tcp_listener(listener: Listener, certs: ClientCerts, log: Path) -> dict[str, Any]:
    proxy = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": _TCP_PROXY,
            "stat_prefix": "tcp",
            "cluster": "upstream",
            "access_log": _access_log(log, TCP_LOG_FORMAT),
        },
    }
    filters = [*(f.as_config() for f in listener.rbac.tcp), proxy]
    return {
        "name": f"tcp.{listener.set_name}.{listener.workload.name}",
        "address": _address(listener.tcp_port),
        "listener_filters": [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": _TLS_INSPECTOR},
            }
        ],
        "filter_chains": filter_chains(filters, certs),
    }


def bootstrap(
    listeners: Sequence[Listener],
    certs: ClientCerts,
    log: Path,
    *,
    upstream_port: int,
    dead_port: int,
    chain: bool = False,
) -> dict[str, Any]:
    """The whole test Envoy: ``upstream_port`` answers 200, ``dead_port`` has no one;
    ``chain``: the HTTP RBAC filters as the one resource ECDS serves."""
    jwks = certs.jwks()
    upstream = {
        "name": "upstream",
        "address": _address(upstream_port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": _HCM,
                            "stat_prefix": "upstream",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "direct_response": {
                                                    "status": 200,
                                                    "body": {"inline_string": "ok\n"},
                                                },
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": _ROUTER},
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }
    listener_configs = [upstream]
    for listener in listeners:
        listener_configs.append(_http_listener(listener, certs, log, jwks, chain=chain))
        listener_configs.append(_tcp_listener(listener, certs, log))
    return {
        "admin": {"address": _address(0)},
        "layered_runtime": {"layers": [{"name": "rbac", "static_layer": dict(ENVOY_RUNTIME)}]},
        "static_resources": {
            "listeners": listener_configs,
            "clusters": [
                _cluster("upstream", upstream_port),
                _cluster("ext_authz", dead_port, http2=True),
            ],
        },
    }


# -- the client ----------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Sent:
    """What the client learned: the status (None: closed without an answer) and its
    own address, which names the connection in the access log."""

    status: int | None
    client_port: int


def connect(request: Request, port: int, certs: ClientCerts, request_id: str) -> Sent:
    """Send ``request`` on a fresh connection to ``port`` and read the answer."""
    raw = socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(request.source_ip, 0)
    )
    # The request right after the TLS Finished would wait for its ACK (Nagle): 40 ms.
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client_port = raw.getsockname()[1]
    sock: socket.socket = raw
    try:
        if request.identity.tls:
            sock = certs.context(request.identity).wrap_socket(raw, server_hostname=request.sni)
        sock.sendall(_http_bytes(request, request_id, certs))
        status = _read_status(sock)
    except (ConnectionError, ssl.SSLError):
        status = None  # a denied TCP connection is closed, sometimes with a reset
    finally:
        sock.close()
    return Sent(status, client_port)


def _read_status(sock: socket.socket) -> int | None:
    """The status of the response; the client closes as soon as it has the head (Envoy
    delays closing after a local reply, and the body is of no interest)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else None


def _http_bytes(request: Request, request_id: str, certs: ClientCerts) -> bytes:
    if request.tcp:
        # Through tcp_proxy to the upstream, which answers any request with 200.
        return b"GET / HTTP/1.1\r\nhost: upstream\r\nconnection: close\r\n\r\n"
    lines = [f"{request.method} {request.path} HTTP/1.1", f"host: {request.host}"]
    lines += [f"{name}: {value}" for name, value in request.headers]
    if request.claims is not None:
        lines.append(f"authorization: Bearer {certs.token(request.claims)}")
    lines += [f"x-diff-id: {request_id}", "connection: close", "", ""]
    return "\r\n".join(lines).encode()


def read_access_log(
    path: Path, complete: Callable[[list[dict[str, Any]]], bool], deadline: float = 20.0
) -> list[dict[str, Any]]:
    """The log's entries once ``complete`` says so (Envoy writes the file every second),
    or what there is at the deadline."""
    stop = time.monotonic() + deadline
    while True:
        text = path.read_text() if path.exists() else ""
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        if complete(entries) or time.monotonic() > stop:
            return entries
        time.sleep(0.2)


# -- what ext_authz would send -----------------------------------------------------


def check_request(
    request: Request, listener: Listener, client_port: int
) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy's ext_authz filter (network one for TCP) sends for ``request``.

    ``source.principal`` is the first URI SAN of the peer certificate, else its subject
    (not a SPIFFE ID, so no principal for the engine); headers are lowercase, repeated
    ones joined with ",", pseudo-headers included; the verified JWT payload is the
    ``jwt_authn`` metadata under ``payload``.
    """
    check = external_auth_pb2.CheckRequest()
    attributes = check.attributes
    attributes.source.address.socket_address.address = request.source_ip
    attributes.source.address.socket_address.port_value = client_port
    if request.identity.tls and request.identity.has_certificate:
        attributes.source.principal = request.identity.uri or "O=test"
    attributes.destination.address.socket_address.address = "127.0.0.1"
    port = listener.tcp_port if request.tcp else listener.http_port
    attributes.destination.address.socket_address.port_value = port
    if request.identity.tls and request.sni:
        attributes.tls_session.sni = request.sni
    workload = listener.workload
    attributes.context_extensions["namespace"] = workload.namespace
    attributes.context_extensions["labels"] = ",".join(f"{k}={v}" for k, v in workload.labels)
    if workload.service:
        attributes.context_extensions["service"] = workload.service
    if request.tcp:
        return check
    http = attributes.request.http
    http.method = request.method
    http.path = request.path
    http.host = request.host
    headers: dict[str, str] = {
        ":authority": request.host,
        ":method": request.method,
        ":path": request.path,
        ":scheme": "https" if request.identity.tls else "http",
    }
    for name, value in request.headers:
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    http.headers.update(headers)
    if request.claims is not None:
        metadata = attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]
        metadata.update({"payload": request.claims})
    return check


def by_connection(entries: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], Mapping[str, Any]]:
    """TCP entries by (client address, listener port)."""
    out: dict[tuple[str, int], Mapping[str, Any]] = {}
    for entry in entries:
        if entry.get("kind") == "tcp":
            local_port = int(str(entry["local"]).rsplit(":", 1)[1])
            out[(str(entry["remote"]), local_port)] = entry
    return out

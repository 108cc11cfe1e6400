"""Envoy access-log entries → audit records: the decisions Envoy's RBAC filters made.

A sidecar that enforces Istio policies natively (``authz.rbac_translation``) reports
each request over Envoy's access-log service; this module turns one entry into the
record ext_authz would have written for the same request (engine ``envoy-rbac``),
or says why it records nothing. Pure: no I/O.

What the entry must carry, and where it comes from (``meshward.envoy_telemetry``
builds the configuration that makes Envoy send it):

- the workload: the stream's node metadata ``meshward.workload`` (``namespace``,
  ``labels``, ``service``: what the agent's ECDS serves the chain for), read once per
  stream (Envoy sends its node only in a stream's first message);
- Envoy's decision: the response code details (``rbac_access_denied_matched_policy[NAME]``,
  NAME being Istio's ``ns[NS]-policy[NAME]-rule[i]``, ``none``, or native mode's
  ``CUSTOM_UNAVAILABLE_POLICY``) and the RBAC filters' dynamic metadata:
  ``meshward_deny_enforced_engine_result`` says the DENY filter denied,
  ``meshward_allow_enforced_*`` name the ALLOW rule that let a request in,
  ``meshward_audit_enforced_effective_policy_id`` the AUDIT rule, and
  ``istio_dry_run_{allow,deny}_shadow_*`` the dry-run results;
- that the request went through the RBAC chain at all: the ``meshward.rbac``
  metadata ``{"passed": true}`` (:data:`PASSED_NAMESPACE`) set by a filter right
  after the chain (``meshward.envoy_telemetry.rbac_passed_filter``). Envoy writes no
  RBAC metadata for a request an empty slot lets through, so without the marker a
  request allowed by "no policy applies" could not be told from one a filter before
  the chain answered (``jwt_authn``'s 401, a client gone before its headers were
  decided): the latter are not decisions and are counted, not recorded. The marker
  may also carry ``policy_set_version``, and ``ext_authz: true`` where every request
  it lets through goes on to ext_authz (Rego mode ``always``);
- the peer certificate (``tls_properties``): its first URI SAN is the source
  principal, as ext_authz's ``source.principal``;
- the verified JWT payload (``envoy.filters.http.jwt_authn`` metadata), for the
  request principal ``iss/sub``.

Requests that went on to ext_authz are recorded by ext_authz and skipped here. The
ext_authz filter follows the RBAC chain (``authz.rbac_chain``), so a request the chain
denied never reached it and is recorded here; one the chain let through reached
ext_authz when the CUSTOM slot's shadow rules matched
(``istio_ext_authz_shadow_effective_policy_id`` starting ``istio-ext-authz``: the
ext_authz filter's ``filter_enabled_metadata``), when the marker says so, or when
ext_authz's answer left ``envoy.filters.http.ext_authz`` metadata. All of these are
written by filters, so a client cannot forge them to keep its request out of the
trail, unlike a header (``x-meshward-decision-id`` included).

The record's request snapshot is the ``CheckRequest`` Envoy's ext_authz filter would
have sent for the request, built from the entry and redacted like ext_authz's, so
``explain`` and ``replay`` re-evaluate it. It lacks what the entry lacks: the body
(``body`` in ``redacted`` when there was one) and every header but the pseudo
headers, ``user-agent``, ``x-forwarded-for``, ``x-request-id`` and the ones the
logger was configured to add (``header:*:NAMES`` in ``redacted``: replay counts a
request as not re-evaluable when its policies read any other header). ``referer`` is never
kept: its URL may carry a token in its query.

``latency_us`` stays None: Envoy does not report how long its RBAC filters took, and
the request's duration (upstream included) is another quantity. ``status`` is the
response code the client got, allowed or not.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format

from audit.record import (
    FLIP_TO_ALLOW,
    FLIP_TO_DENY,
    DecisionRecord,
    new_decision_id,
    split_policy_id,
)
from audit.redaction import Redaction
from authz.audit_record import request_snapshot, workload_name
from authz.check_request import JWT_AUTHN_FILTER, build_view
from authz.errors import AuthzError, EntryError
from authz.rbac_chain import CHAIN_METADATA, CUSTOM_UNAVAILABLE_POLICY
from authz.rbac_translation import (
    CUSTOM_POLICY_PREFIX,
    DRY_RUN_ALLOW_PREFIX,
    DRY_RUN_DENY_PREFIX,
    EXT_AUTHZ_SHADOW_PREFIX,
    parse_policy_name,
)
from authz.rbac_versions import ChainVersions
from authz.replay import logged_headers_marker
from authz.request_view import RequestView

__all__ = [
    "ENGINE",
    "HTTP_RBAC_METADATA",
    "NETWORK_RBAC_METADATA",
    "NODE_LOGGED_HEADERS",
    "NODE_WORKLOAD",
    "PASSED_NAMESPACE",
    "SKIP_EXT_AUTHZ",
    "SKIP_UNDECIDED",
    "UNNAMED_DRY_RUN_ALLOW",
    "NodeWorkload",
    "Recorded",
    "Skipped",
    "http_entry",
    "node_workload",
    "tcp_entry",
]

ENGINE = "envoy-rbac"
# The node metadata naming the sidecar's workload, {namespace, labels, service}: the
# key the agent's ECDS reads too (identity.extension_configs, which authz may not import).
NODE_WORKLOAD = "meshward.workload"
# The request headers the sidecar's access logger carries: an absent one was not sent.
NODE_LOGGED_HEADERS = "meshward.logged_headers"
# {"passed": true}, and maybe "ext_authz": true, "policy_set_version": "..."
PASSED_NAMESPACE = "meshward.rbac"
HTTP_RBAC_METADATA = "envoy.filters.http.rbac"
NETWORK_RBAC_METADATA = "envoy.filters.network.rbac"
_EXT_AUTHZ_METADATA = ("envoy.filters.http.ext_authz", "envoy.filters.network.ext_authz")
_DENIED_PREFIX = "rbac_access_denied_matched_policy["
_CUSTOM_MATCH = EXT_AUTHZ_SHADOW_PREFIX + "shadow_effective_policy_id"
_CUSTOM_VALUE = CUSTOM_POLICY_PREFIX.rstrip("-")
# The per-filter keys of the enforcing HTTP slots (rbac_translation.RULES_STAT_PREFIX).
_DENY_RESULT = "meshward_deny_enforced_engine_result"
_ALLOW_RESULT = "meshward_allow_enforced_engine_result"
_ALLOW_POLICY = "meshward_allow_enforced_effective_policy_id"
_AUDIT_POLICY = "meshward_audit_enforced_effective_policy_id"
_SHADOW_RESULT = "shadow_engine_result"
_SHADOW_POLICY = "shadow_effective_policy_id"
# Not a policy name: Envoy does not say which dry-run ALLOW policies its shadow engine
# held, and each of them would deny where no enforced ALLOW policy applies.
UNNAMED_DRY_RUN_ALLOW = "(dry-run ALLOW policies)"

# Why an entry gave no record (the label of the receiver's counter).
SKIP_EXT_AUTHZ = "ext_authz"  # ext_authz decided it, and recorded it
SKIP_UNDECIDED = "undecided"  # no RBAC filter decided it (see the module docstring)
_PROTOCOLS = {
    accesslog_pb2.HTTPAccessLogEntry.HTTP10: "HTTP/1.0",
    accesslog_pb2.HTTPAccessLogEntry.HTTP11: "HTTP/1.1",
    accesslog_pb2.HTTPAccessLogEntry.HTTP2: "HTTP/2",
    accesslog_pb2.HTTPAccessLogEntry.HTTP3: "HTTP/3",
}


@dataclass(slots=True, frozen=True)
class NodeWorkload:
    """The workload a sidecar protects, from its node metadata (all optional: the
    namespace may also come from the sidecar's own certificate)."""

    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    service: str | None = None
    node_id: str = ""
    # The request headers its access logger was configured to carry (present or not).
    logged_headers: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class Recorded:
    record: DecisionRecord
    snapshot: bytes | None


@dataclass(slots=True, frozen=True)
class Skipped:
    reason: str  # SKIP_EXT_AUTHZ or SKIP_UNDECIDED


def node_workload(node: base_pb2.Node) -> NodeWorkload:
    """The workload of ``node``'s metadata; ``EntryError`` if a key has the wrong type."""
    workload = node.metadata.fields.get(NODE_WORKLOAD)
    if workload is None:
        return NodeWorkload(None, {}, None, node.id)
    if workload.WhichOneof("kind") != "struct_value":
        raise EntryError("malformed_node", f"node metadata {NODE_WORKLOAD} is not a map")
    fields = workload.struct_value.fields
    namespace = _string(fields, "namespace")
    service = _string(fields, "service")
    labels: dict[str, str] = {}
    if "labels" in fields:
        value = fields["labels"]
        if value.WhichOneof("kind") != "struct_value":
            raise EntryError("malformed_node", f"node metadata {NODE_WORKLOAD}.labels is not a map")
        for key, item in value.struct_value.fields.items():
            if item.WhichOneof("kind") != "string_value":
                raise EntryError(
                    "malformed_node", f"node metadata {NODE_WORKLOAD}.labels.{key} is not text"
                )
            labels[key] = item.string_value
    logged: tuple[str, ...] = ()
    if NODE_LOGGED_HEADERS in node.metadata.fields:
        value = node.metadata.fields[NODE_LOGGED_HEADERS]
        items = value.list_value.values if value.WhichOneof("kind") == "list_value" else None
        if items is None or any(i.WhichOneof("kind") != "string_value" for i in items):
            raise EntryError(
                "malformed_node", f"node metadata {NODE_LOGGED_HEADERS} is not a list of names"
            )
        logged = tuple(i.string_value.lower() for i in items)
    return NodeWorkload(namespace or None, labels, service or None, node.id, logged)


def _string(fields: Any, key: str) -> str | None:
    if key not in fields:
        return None
    value = fields[key]
    if value.WhichOneof("kind") != "string_value":
        raise EntryError("malformed_node", f"node metadata {NODE_WORKLOAD}.{key} is not text")
    text: str = value.string_value
    return text


# -- HTTP ----------------------------------------------------------------------------


def http_entry(
    entry: accesslog_pb2.HTTPAccessLogEntry,
    workload: NodeWorkload,
    redaction: Redaction | None,
    versions: ChainVersions | None = None,
) -> Recorded | Skipped:
    """The record of one HTTP request, or why there is none; ``EntryError`` for an entry
    a configured Envoy does not send. ``redaction`` None: no request snapshot.
    ``versions`` tells the policy-set version of the chain that decided, by its digest."""
    common = entry.common_properties
    metadata = common.metadata.filter_metadata
    if any(name in metadata for name in _EXT_AUTHZ_METADATA):
        return Skipped(SKIP_EXT_AUTHZ)  # ext_authz answered, with metadata
    if not entry.request.request_method:
        raise EntryError("malformed_entry", "an HTTP entry without a request method")
    if not entry.response.HasField("response_code"):
        raise EntryError("malformed_entry", "an HTTP entry without a response code")
    rbac = _plain(metadata, HTTP_RBAC_METADATA)
    details = entry.response.response_code_details
    passed = _plain(metadata, PASSED_NAMESPACE)
    if details.startswith(_DENIED_PREFIX) and details.endswith("]"):
        # Denied by the chain, so ext_authz (after it) never ran: Envoy's decision.
        name = details[len(_DENIED_PREFIX) : -1]
        if name == CUSTOM_UNAVAILABLE_POLICY:
            # Native mode: a CUSTOM policy selected it and no ext_authz could decide.
            custom = _policy_id(rbac.get(_CUSTOM_MATCH))
            verdict = _Verdict(False, "custom_provider_unavailable", custom)
        elif rbac.get(_DENY_RESULT) == "denied":
            verdict = _Verdict(False, "denied_by_policy", _policy_id(name))
        elif name == "none":
            verdict = _Verdict(False, "no_allow_policy_matched", None)
        else:
            # Only the DENY slot names a rule when it denies: a metadata-less denial
            # naming one is not the chain meshward generates.
            verdict = _Verdict(False, "denied_by_policy", _policy_id(name))
    elif passed.get("passed") is True:
        custom = rbac.get(_CUSTOM_MATCH)
        if passed.get("ext_authz") is True or (
            isinstance(custom, str) and custom.startswith(_CUSTOM_VALUE)
        ):
            return Skipped(SKIP_EXT_AUTHZ)  # it went on to ext_authz, which records it
        if rbac.get(_ALLOW_RESULT) == "allowed":
            verdict = _Verdict(True, "allowed_by_policy", _policy_id(rbac.get(_ALLOW_POLICY)))
        else:
            verdict = _Verdict(True, "no_allow_policy", None)
    else:
        return Skipped(SKIP_UNDECIDED)
    version = passed.get("policy_set_version")
    if version is None and versions is not None and CHAIN_METADATA in metadata:
        # One field read, not a conversion of the Struct: this runs for every entry.
        digest = metadata[CHAIN_METADATA].fields.get("digest")
        if digest is not None and digest.string_value:
            version = versions.version(
                workload.namespace, workload.labels, workload.service, digest.string_value
            )
    check = _check_request(entry.common_properties, workload)
    _http_attributes(check, entry, metadata)
    return _recorded(
        check,
        verdict,
        rbac,
        entry.common_properties,
        status=entry.response.response_code.value,
        version=version if isinstance(version, str) else None,
        redaction=redaction,
        body=entry.request.request_body_bytes > 0,
        logged_headers=workload.logged_headers,
    )


def _http_attributes(
    check: external_auth_pb2.CheckRequest,
    entry: accesslog_pb2.HTTPAccessLogEntry,
    metadata: Any,
) -> None:
    """What Envoy's HTTP ext_authz filter puts in ``request.http``, as far as the entry
    tells (see the module docstring for the headers)."""
    request = entry.request
    http = check.attributes.request.http
    http.method = base_pb2.RequestMethod.Name(request.request_method)
    http.path = request.path
    http.host = request.authority
    http.scheme = request.scheme
    http.id = request.request_id
    http.protocol = _PROTOCOLS.get(entry.protocol_version, "")
    headers = {
        ":authority": request.authority,
        ":method": http.method,
        ":path": request.path,
        ":scheme": request.scheme,
        "user-agent": request.user_agent,
        "x-forwarded-for": request.forwarded_for,
        "x-request-id": request.request_id,
    }
    headers.update({k.lower(): v for k, v in request.request_headers.items()})
    http.headers.update({k: v for k, v in headers.items() if v})
    if JWT_AUTHN_FILTER in metadata:
        filter_metadata = check.attributes.metadata_context.filter_metadata
        filter_metadata[JWT_AUTHN_FILTER].CopyFrom(metadata[JWT_AUTHN_FILTER])


# -- TCP -----------------------------------------------------------------------------


def tcp_entry(
    entry: accesslog_pb2.TCPAccessLogEntry,
    workload: NodeWorkload,
    redaction: Redaction | None,
) -> Recorded | Skipped:
    """The record of one TCP connection, or why there is none.

    Envoy's network RBAC filter decides on a connection's first bytes from the client
    and names a rule only when it denies (``connection_termination_details``); it
    writes no metadata when it allows. A connection that sent no byte was never
    decided (``undecided``).
    """
    common = entry.common_properties
    metadata = common.metadata.filter_metadata
    rbac = _plain(metadata, NETWORK_RBAC_METADATA)
    custom = rbac.get(_CUSTOM_MATCH)
    if any(name in metadata for name in _EXT_AUTHZ_METADATA) or (
        isinstance(custom, str) and custom.startswith(_CUSTOM_VALUE)
    ):
        # Istio's TCP chain: the network ext_authz filter, enabled by the CUSTOM slot,
        # runs before the DENY and ALLOW filters, and ext_authz records the connection.
        return Skipped(SKIP_EXT_AUTHZ)
    details = common.connection_termination_details
    if details.startswith(_DENIED_PREFIX) and details.endswith("]"):
        name = details[len(_DENIED_PREFIX) : -1]
        # The network ALLOW filter denies naming no rule; a DENY rule is always named.
        verdict = (
            _Verdict(False, "no_allow_policy_matched", None)
            if name == "none"
            else _Verdict(False, "denied_by_policy", _policy_id(name))
        )
    elif entry.connection_properties.received_bytes > 0:
        verdict = _Verdict(True, "allowed_by_rbac", None)
    else:
        return Skipped(SKIP_UNDECIDED)
    check = _check_request(common, workload)
    return _recorded(check, verdict, rbac, common, status=None, version=None, redaction=redaction)


# -- both ------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class _Verdict:
    allowed: bool
    reason: str
    policy_id: str | None


def _policy_id(name: Any) -> str | None:
    """Istio's RBAC policy name → the engine's ``ns.name[rules[i]]``."""
    if not isinstance(name, str):
        return None
    parsed = parse_policy_name(name)
    if parsed is None:
        raise EntryError("unknown_rbac_policy", f"Envoy named RBAC policy {name!r}")
    return parsed


def _plain(metadata: Any, namespace: str) -> dict[str, Any]:
    if namespace not in metadata:
        return {}
    value: dict[str, Any] = json_format.MessageToDict(metadata[namespace])
    return value


def _check_request(
    common: accesslog_pb2.AccessLogCommon, workload: NodeWorkload
) -> external_auth_pb2.CheckRequest:
    """The connection part of the CheckRequest ext_authz would send."""
    check = external_auth_pb2.CheckRequest()
    attributes = check.attributes
    remote = (
        common.downstream_direct_remote_address
        if common.HasField("downstream_direct_remote_address")
        else common.downstream_remote_address
    )
    attributes.source.address.CopyFrom(remote)
    attributes.destination.address.CopyFrom(common.downstream_local_address)
    tls = common.tls_properties
    if common.HasField("tls_properties"):
        if tls.HasField("peer_certificate_properties"):
            attributes.source.principal = _principal(tls.peer_certificate_properties)
        if tls.HasField("local_certificate_properties"):
            attributes.destination.principal = _principal(tls.local_certificate_properties)
        attributes.tls_session.sni = tls.tls_sni_hostname
    extensions = attributes.context_extensions
    if workload.namespace:
        extensions["namespace"] = workload.namespace
    extensions["labels"] = ",".join(f"{k}={v}" for k, v in sorted(workload.labels.items()))
    if workload.service:
        extensions["service"] = workload.service
    return check


def _principal(certificate: accesslog_pb2.TLSProperties.CertificateProperties) -> str:
    # Envoy's ext_authz: the first URI SAN, else the subject.
    for san in certificate.subject_alt_name:
        if san.uri:
            uri: str = san.uri
            return uri
    subject: str = certificate.subject
    return subject


def _recorded(
    check: external_auth_pb2.CheckRequest,
    verdict: _Verdict,
    rbac: Mapping[str, Any],
    common: accesslog_pb2.AccessLogCommon,
    *,
    status: int | None,
    version: str | None,
    redaction: Redaction | None,
    body: bool = False,
    logged_headers: tuple[str, ...] = (),
) -> Recorded:
    view: RequestView | None
    error: str | None = None
    try:
        view = build_view(check)
    except AuthzError as exc:
        # Envoy decided anyway; the record says what it can, without a snapshot that
        # ext_authz would have refused (replay would count a refusal, not this decision).
        view, error = None, str(exc)
    snapshot: bytes | None = None
    redacted: tuple[str, ...] = ("request",)
    if view is not None and redaction is not None:
        snapshot, redacted = request_snapshot(check, view.headers, redaction)
        # Known: the headers the entry carried, and the logged ones it did not (not sent).
        known = {*view.headers, *logged_headers}
        missing = [logged_headers_marker(known)] if view.is_http else []
        if body:
            missing.append("body")
        redacted = (*redacted, *missing)
    elif view is not None:
        redacted = ()
    dry_run = _dry_run(rbac)
    audit = _policy_id(rbac.get(_AUDIT_POLICY))
    policy, rule = split_policy_id(verdict.policy_id)
    http = view is not None and view.is_http
    record = DecisionRecord(
        decision_id=new_decision_id(),
        time_us=_time_us(common),
        allowed=verdict.allowed,
        reason=verdict.reason,
        engine=ENGINE,
        status=status,
        policy=policy,
        rule=rule,
        policy_id=verdict.policy_id,
        policy_set_version=version,
        source_principal=view.source_principal if view else None,
        source_namespace=view.source_namespace if view else None,
        source_ip=view.source_ip if view else None,
        request_principal=view.request_principal if view else None,
        destination_namespace=view.workload_namespace if view else None,
        destination_workload=(
            workload_name(view.workload_labels, view.workload_service) if view else None
        ),
        destination_service=view.workload_service if view else None,
        destination_labels=dict(view.workload_labels) if view else {},
        destination_port=view.destination_port if view else None,
        sni=view.sni if view else None,
        method=view.method if http and view else None,
        host=view.host if http and view else None,
        path=view.path_without_query if http and view else None,
        audit_policy_ids=(audit,) if audit else (),
        dry_run=dry_run or None,
        dry_run_flips=_flips(verdict, rbac),
        error=error,
        redacted=redacted,
    )
    return Recorded(record, snapshot)


def _time_us(common: accesslog_pb2.AccessLogCommon) -> int:
    if common.HasField("start_time"):
        start = common.start_time
        return int(start.seconds) * 1_000_000 + int(start.nanos) // 1000
    return time.time_ns() // 1000


def _dry_run(rbac: Mapping[str, Any]) -> dict[str, str]:
    """The shadow results in the keys ext_authz's response metadata uses, with the
    engine's rule ids."""
    out: dict[str, str] = {}
    for prefix in (DRY_RUN_ALLOW_PREFIX, DRY_RUN_DENY_PREFIX):
        result = rbac.get(prefix + _SHADOW_RESULT)
        if isinstance(result, str):
            out[prefix + _SHADOW_RESULT] = result
            rule = _policy_id(rbac.get(prefix + _SHADOW_POLICY))
            if rule is not None:
                out[prefix + _SHADOW_POLICY] = rule
    return out


def _flips(verdict: _Verdict, rbac: Mapping[str, Any]) -> tuple[dict[str, str], ...]:
    """The dry-run policies that would have turned the outcome, read as
    ``authz.audit_record.dry_run_flips`` reads the engine's shadow results."""
    flips: list[dict[str, str]] = []
    deny = rbac.get(DRY_RUN_DENY_PREFIX + _SHADOW_RESULT)
    if deny == "denied" and verdict.allowed:
        rule = _policy_id(rbac.get(DRY_RUN_DENY_PREFIX + _SHADOW_POLICY))
        flips.append(_flip(rule, FLIP_TO_DENY))
    allow = rbac.get(DRY_RUN_ALLOW_PREFIX + _SHADOW_RESULT)
    if allow == "allowed" and verdict.reason == "no_allow_policy_matched":
        rule = _policy_id(rbac.get(DRY_RUN_ALLOW_PREFIX + _SHADOW_POLICY))
        flips.append(_flip(rule, FLIP_TO_ALLOW))
    elif allow == "denied" and verdict.reason == "no_allow_policy":
        flips.append({"engine": "istio", "policy": UNNAMED_DRY_RUN_ALLOW, "to": FLIP_TO_DENY})
    return tuple(flips)


def _flip(rule: str | None, to: str) -> dict[str, str]:
    name, _ = split_policy_id(rule)
    return {"engine": "istio", "policy": name or "(unnamed)", "to": to}

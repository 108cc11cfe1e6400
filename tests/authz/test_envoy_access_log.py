"""Envoy access-log entries → audit records: Envoy's RBAC decisions as the trail keeps them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from audit.redaction import REDACTED_PREFIX, Redaction
from audit.sink import MemorySink
from authz.check_request import build_view
from authz.envoy_access_log import (
    ENGINE,
    NODE_LOGGED_HEADERS,
    NODE_WORKLOAD,
    SKIP_EXT_AUTHZ,
    SKIP_UNDECIDED,
    UNNAMED_DRY_RUN_ALLOW,
    NodeWorkload,
    Recorded,
    Skipped,
    http_entry,
    node_workload,
    tcp_entry,
)
from authz.errors import EntryError
from authz.istio_engine import evaluate
from authz.istio_loader import parse_documents
from authz.policy_store import PolicyStore
from authz.rbac_chain import CHAIN_METADATA, CUSTOM_UNAVAILABLE_POLICY
from authz.rbac_versions import ChainVersions
from authz.replay import (
    DENY_TO_ALLOW,
    UNLOGGED_HEADERS,
    Candidate,
    Dependencies,
    Replay,
    logged_headers_marker,
)
from authz.server import AuthorizationServicer

REDACTION = Redaction.build(b"k" * 32)
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
WORKLOAD = NodeWorkload("default", {"app": "reviews", "version": "v1"}, "reviews", "sidecar-1")
CLIENT = "spiffe://example.org/ns/shop/sa/frontend"
SERVER = "spiffe://example.org/ns/default/sa/reviews"
PASSED = {"meshward.rbac": {"passed": True}}
DENY_RULE = "ns[default]-policy[deny-admin]-rule[0]"
ALLOW_RULE = "ns[default]-policy[allow-frontend]-rule[1]"


def entry(
    *,
    code: int = 200,
    details: str = "via_upstream",
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    method: str = "GET",
    path: str = "/reviews/1",
    headers: Mapping[str, str] | None = None,
    peer: str | None = CLIENT,
    body_bytes: int = 0,
) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry as Envoy 1.40's http_grpc logger sends it (TLS from a client with an SVID)."""
    out = accesslog_pb2.HTTPAccessLogEntry(protocol_version=accesslog_pb2.HTTPAccessLogEntry.HTTP11)
    common = out.common_properties
    common.downstream_remote_address.socket_address.address = "10.0.0.7"
    common.downstream_remote_address.socket_address.port_value = 50123
    common.downstream_direct_remote_address.CopyFrom(common.downstream_remote_address)
    common.downstream_local_address.socket_address.address = "10.0.0.9"
    common.downstream_local_address.socket_address.port_value = 8443
    common.start_time.FromMicroseconds(1_800_000_000_123_456)
    tls = common.tls_properties
    tls.tls_sni_hostname = "reviews.default.svc"
    tls.local_certificate_properties.subject_alt_name.add(uri=SERVER)
    if peer is not None:
        tls.peer_certificate_properties.subject_alt_name.add(dns="frontend.example")
        tls.peer_certificate_properties.subject_alt_name.add(uri=peer)
    for namespace, values in (metadata or {}).items():
        common.metadata.filter_metadata[namespace].update(dict(values))
    request = out.request
    request.request_method = base_pb2.RequestMethod.Value(method)
    request.scheme = "https"
    request.authority = "reviews:8443"
    request.path = path
    request.user_agent = "curl/8"
    request.referer = "https://shop.example/cb?code=s3cret"
    request.forwarded_for = "10.0.0.7"
    request.request_id = "5d6e4f1c-0000-4000-8000-000000000001"
    request.request_body_bytes = body_bytes
    request.request_headers.update(dict(headers or {}))
    out.response.response_code.value = code
    out.response.response_code_details = details
    return out


def rbac(**values: str) -> dict[str, dict[str, Any]]:
    return {"envoy.filters.http.rbac": values}


def recorded(outcome: Recorded | Skipped) -> Recorded:
    assert isinstance(outcome, Recorded), outcome
    return outcome


def snapshot(outcome: Recorded) -> external_auth_pb2.CheckRequest:
    assert outcome.snapshot is not None
    return external_auth_pb2.CheckRequest.FromString(outcome.snapshot)


def test_allowed_by_an_allow_rule_names_it_with_the_request_and_workload() -> None:
    jwt = {"envoy.filters.http.jwt_authn": {"payload": {"iss": "https://idp", "sub": "alice"}}}
    metadata = {
        **PASSED,
        **jwt,
        **rbac(
            meshward_deny_enforced_engine_result="allowed",
            meshward_allow_enforced_engine_result="allowed",
            meshward_allow_enforced_effective_policy_id=ALLOW_RULE,
        ),
    }
    out = recorded(http_entry(entry(metadata=metadata, path="/reviews/1?x=1"), WORKLOAD, REDACTION))
    record = out.record
    assert (record.allowed, record.reason, record.engine) == (True, "allowed_by_policy", ENGINE)
    assert record.policy_id == "default.allow-frontend[rules[1]]"
    assert (record.policy, record.rule) == ("default.allow-frontend", 1)
    assert record.status == 200  # Envoy saw the response: allowed records have it too
    assert record.time_us == 1_800_000_000_123_456  # when the request started
    # The first URI SAN, not the DNS one before it; without spiffe:// as Istio writes it.
    assert record.source_principal == "example.org/ns/shop/sa/frontend"
    assert record.source_namespace == "shop"
    assert record.source_ip == "10.0.0.7"
    assert record.request_principal == "https://idp/alice"
    assert (record.method, record.host, record.path) == ("GET", "reviews:8443", "/reviews/1")
    assert (record.destination_port, record.sni) == (8443, "reviews.default.svc")
    assert record.destination_namespace == "default"
    assert record.destination_workload == "reviews"
    assert record.destination_service == "reviews"
    assert record.destination_labels == {"app": "reviews", "version": "v1"}
    assert record.latency_us is None  # Envoy does not say how long its filters took
    assert record.dry_run is None
    assert record.dry_run_flips == ()
    assert record.audit_policy_ids == ()
    # Only the headers the log carried are in the snapshot, and the record names them.
    (marker,) = (r for r in record.redacted if r.startswith(UNLOGGED_HEADERS))
    present = set(marker.removeprefix(f"{UNLOGGED_HEADERS}:").split(","))
    assert {":path", ":method", ":authority"} <= present
    assert "authorization" not in present
    # The snapshot is what ext_authz would have been sent, workload included.
    check = snapshot(out)
    assert check.attributes.source.principal == CLIENT
    assert check.attributes.context_extensions["namespace"] == "default"
    assert check.attributes.request.http.headers[":path"] == "/reviews/1?x=1"
    assert dict(check.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"])


class _Versions(ChainVersions):
    def __init__(self, known: dict[str, str]) -> None:
        self.known = known
        self.asked: list[tuple[str | None, dict[str, str], str | None, str]] = []

    def version(
        self, namespace: str | None, labels: Mapping[str, str], service: str | None, digest: str
    ) -> str | None:
        self.asked.append((namespace, dict(labels), service, digest))
        return self.known.get(digest)


def test_the_chain_digest_gives_allowed_and_denied_records_their_policy_set_version() -> None:
    versions = _Versions({"d1": "set-1"})
    chain = {CHAIN_METADATA: {"digest": "d1"}}
    allowed = {**PASSED, **chain, **rbac(meshward_deny_enforced_engine_result="allowed")}
    denied = {
        **chain,
        **rbac(
            meshward_deny_enforced_engine_result="denied",
            meshward_deny_enforced_effective_policy_id=DENY_RULE,
        ),
    }
    for metadata, code, details in (
        (allowed, 200, "via_upstream"),
        (denied, 403, f"rbac_access_denied_matched_policy[{DENY_RULE}]"),
    ):
        out = http_entry(
            entry(metadata=metadata, code=code, details=details), WORKLOAD, None, versions
        )
        assert recorded(out).record.policy_set_version == "set-1"
    assert versions.asked[0] == ("default", {"app": "reviews", "version": "v1"}, "reviews", "d1")
    # A chain the served set would not make, or none named: no version, never a guess.
    other = {**allowed, CHAIN_METADATA: {"digest": "d0"}}
    assert (
        recorded(
            http_entry(entry(metadata=other), WORKLOAD, None, versions)
        ).record.policy_set_version
        is None
    )
    assert (
        recorded(
            http_entry(entry(metadata=PASSED), WORKLOAD, None, versions)
        ).record.policy_set_version
        is None
    )


def test_allowed_where_no_allow_policy_applies() -> None:
    metadata = {**PASSED, **rbac(meshward_deny_enforced_engine_result="allowed")}
    record = recorded(http_entry(entry(metadata=metadata), WORKLOAD, REDACTION)).record
    assert (record.allowed, record.reason, record.policy_id) == (True, "no_allow_policy", None)


def test_denied_by_a_deny_rule() -> None:
    metadata = rbac(
        meshward_deny_enforced_engine_result="denied",
        meshward_deny_enforced_effective_policy_id=DENY_RULE,
    )
    details = f"rbac_access_denied_matched_policy[{DENY_RULE}]"
    record = recorded(
        http_entry(entry(code=403, details=details, metadata=metadata), WORKLOAD, REDACTION)
    ).record
    assert (record.allowed, record.reason, record.status) == (False, "denied_by_policy", 403)
    assert (record.policy, record.rule) == ("default.deny-admin", 0)


def test_denied_because_no_allow_rule_matched() -> None:
    metadata = rbac(
        meshward_deny_enforced_engine_result="allowed",
        meshward_allow_enforced_engine_result="denied",
    )
    details = "rbac_access_denied_matched_policy[none]"
    record = recorded(
        http_entry(entry(code=403, details=details, metadata=metadata), WORKLOAD, REDACTION)
    ).record
    assert (record.allowed, record.reason, record.policy_id) == (
        False,
        "no_allow_policy_matched",
        None,
    )


def test_an_audit_rule_is_kept_beside_the_decision() -> None:
    metadata = {
        **PASSED,
        **rbac(meshward_audit_enforced_effective_policy_id="ns[default]-policy[log-all]-rule[0]"),
    }
    record = recorded(http_entry(entry(metadata=metadata), WORKLOAD, REDACTION)).record
    assert record.allowed
    assert record.audit_policy_ids == ("default.log-all[rules[0]]",)


def test_a_dry_run_deny_that_matched_an_allowed_request_flips_it() -> None:
    metadata = {
        **PASSED,
        **rbac(
            istio_dry_run_deny_shadow_engine_result="denied",
            istio_dry_run_deny_shadow_effective_policy_id="ns[default]-policy[staged]-rule[2]",
        ),
    }
    record = recorded(http_entry(entry(metadata=metadata), WORKLOAD, REDACTION)).record
    # The keys of ext_authz's dry-run metadata, with the engine's rule ids.
    assert record.dry_run == {
        "istio_dry_run_deny_shadow_engine_result": "denied",
        "istio_dry_run_deny_shadow_effective_policy_id": "default.staged[rules[2]]",
    }
    assert record.dry_run_flips == ({"engine": "istio", "policy": "default.staged", "to": "deny"},)


def test_a_dry_run_allow_that_matched_a_request_no_allow_rule_let_in_flips_it() -> None:
    metadata = rbac(
        meshward_deny_enforced_engine_result="allowed",
        meshward_allow_enforced_engine_result="denied",
        istio_dry_run_allow_shadow_engine_result="allowed",
        istio_dry_run_allow_shadow_effective_policy_id="ns[default]-policy[next]-rule[0]",
    )
    details = "rbac_access_denied_matched_policy[none]"
    record = recorded(
        http_entry(entry(code=403, details=details, metadata=metadata), WORKLOAD, REDACTION)
    ).record
    assert record.dry_run_flips == ({"engine": "istio", "policy": "default.next", "to": "allow"},)


def test_dry_run_allow_policies_would_deny_where_no_allow_policy_is_enforced() -> None:
    metadata = {**PASSED, **rbac(istio_dry_run_allow_shadow_engine_result="denied")}
    record = recorded(http_entry(entry(metadata=metadata), WORKLOAD, REDACTION)).record
    assert record.reason == "no_allow_policy"
    # Envoy does not name the dry-run ALLOW policies its shadow engine held.
    assert record.dry_run_flips == (
        {"engine": "istio", "policy": UNNAMED_DRY_RUN_ALLOW, "to": "deny"},
    )


def test_dry_run_results_that_change_nothing_are_not_flips() -> None:
    metadata = {
        **PASSED,
        **rbac(
            meshward_allow_enforced_engine_result="allowed",
            meshward_allow_enforced_effective_policy_id=ALLOW_RULE,
            istio_dry_run_deny_shadow_engine_result="allowed",
            istio_dry_run_allow_shadow_engine_result="denied",
        ),
    }
    record = recorded(http_entry(entry(metadata=metadata), WORKLOAD, REDACTION)).record
    assert record.dry_run is not None
    assert record.dry_run_flips == ()


CUSTOM_MATCHED = {
    "istio_ext_authz_shadow_engine_result": "denied",
    "istio_ext_authz_shadow_effective_policy_id": "istio-ext-authz-ns[default]-policy[opa]-rule[0]",
}


@pytest.mark.parametrize(
    "metadata",
    [
        # The chain let it through and its CUSTOM slot matched: ext_authz, after the
        # chain, ran (its filter_enabled_metadata).
        {**PASSED, **rbac(**CUSTOM_MATCHED)},
        # ext_authz runs on every request the chain lets through (Rego mode always).
        {"meshward.rbac": {"passed": True, "ext_authz": True}},
        # ext_authz answered with dynamic metadata (dry-run results).
        {"envoy.filters.http.ext_authz": {"istio_dry_run_deny_shadow_engine_result": "allowed"}},
    ],
)
def test_requests_ext_authz_decided_are_left_to_its_record(
    metadata: dict[str, dict[str, Any]],
) -> None:
    outcome = http_entry(entry(metadata=metadata), WORKLOAD, REDACTION)
    assert outcome == Skipped(SKIP_EXT_AUTHZ)


def test_a_custom_selected_request_the_chain_denied_never_reached_ext_authz() -> None:
    metadata = rbac(**CUSTOM_MATCHED, meshward_deny_enforced_engine_result="denied")
    details = f"rbac_access_denied_matched_policy[{DENY_RULE}]"
    out = http_entry(entry(code=403, details=details, metadata=metadata), WORKLOAD, REDACTION)
    assert recorded(out).record.reason == "denied_by_policy"


def test_native_mode_denies_what_a_custom_policy_selected_and_names_it() -> None:
    metadata = rbac(**CUSTOM_MATCHED, meshward_custom_unavailable_enforced_engine_result="denied")
    details = f"rbac_access_denied_matched_policy[{CUSTOM_UNAVAILABLE_POLICY}]"
    record = recorded(
        http_entry(entry(code=403, details=details, metadata=metadata), WORKLOAD, REDACTION)
    ).record
    # ext_authz's reason for a CUSTOM provider it cannot run, and the CUSTOM rule.
    assert (record.allowed, record.reason) == (False, "custom_provider_unavailable")
    assert record.policy_id == "default.opa[rules[0]]"


def test_a_client_cannot_keep_its_request_out_of_the_trail_with_a_header() -> None:
    # ext_authz's decision id header is something a client can send too.
    outcome = http_entry(
        entry(metadata=PASSED, headers={"x-meshward-decision-id": "forged"}), WORKLOAD, REDACTION
    )
    assert isinstance(outcome, Recorded)


def test_requests_no_rbac_filter_decided_are_not_recorded() -> None:
    # jwt_authn refused the token before the RBAC filters ran.
    refused = entry(code=401, details="jwt_authn_access_denied{Jwt_verification_fails}")
    assert http_entry(refused, WORKLOAD, REDACTION) == Skipped(SKIP_UNDECIDED)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda e: e.response.ClearField("response_code"), "response code"),
        (lambda e: setattr(e.request, "request_method", 0), "request method"),
        (
            lambda e: setattr(
                e.response, "response_code_details", "rbac_access_denied_matched_policy[x]"
            ),
            "RBAC policy",
        ),
    ],
)
def test_malformed_entries_raise_a_named_error(change: Any, reason: str) -> None:
    bad = entry(code=403, metadata=PASSED)
    change(bad)
    with pytest.raises(EntryError, match=reason):
        http_entry(bad, WORKLOAD, REDACTION)


def test_no_secret_reaches_the_record_or_the_snapshot() -> None:
    out = recorded(
        http_entry(
            entry(
                metadata=PASSED,
                path=f"/cb?access_token=tok123&page=2&id={JWT}",
                headers={"x-session": f"Bearer {JWT}"},
            ),
            WORKLOAD,
            REDACTION,
        )
    )
    assert out.record.path == "/cb"
    assert out.snapshot is not None
    for secret in (b"tok123", JWT.encode(), b"s3cret"):  # s3cret: the referer's query
        assert secret not in out.snapshot
    http = snapshot(out).attributes.request.http
    assert http.headers["x-session"].startswith(REDACTED_PREFIX)
    assert "page=2" in http.path
    assert "referer" not in http.headers
    assert {"header:x-session", "query:access_token", "query:id"} <= set(out.record.redacted)


def test_a_body_the_entry_does_not_hold_is_marked_missing() -> None:
    record = recorded(http_entry(entry(metadata=PASSED, body_bytes=12), WORKLOAD, REDACTION)).record
    assert "body" in record.redacted


def test_without_redaction_no_snapshot_is_kept() -> None:
    out = recorded(http_entry(entry(metadata=PASSED), WORKLOAD, None))
    assert out.snapshot is None


def test_a_request_ext_authz_would_refuse_is_recorded_without_a_snapshot() -> None:
    # No namespace anywhere: the node names none and the sidecar's certificate is absent.
    bad = entry(metadata=PASSED)
    bad.common_properties.tls_properties.ClearField("local_certificate_properties")
    out = recorded(http_entry(bad, NodeWorkload(node_id="x"), REDACTION))
    assert out.snapshot is None
    assert out.record.redacted == ("request",)
    assert out.record.error is not None
    assert "no_workload_namespace" in out.record.error
    assert out.record.allowed  # what Envoy decided stands


POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: default}
spec:
  rules:
  - from: [{source: {principals: ["example.org/ns/other/sa/x"]}}]
  - from: [{source: {namespaces: ["shop"]}}]
    when: [{key: request.auth.principal, values: ["https://idp/alice"]}]
"""


@pytest.mark.parametrize(
    ("path", "details", "metadata"),
    [
        (
            "/reviews/1",
            "via_upstream",
            {
                **PASSED,
                **rbac(
                    meshward_allow_enforced_engine_result="allowed",
                    meshward_allow_enforced_effective_policy_id=ALLOW_RULE,
                ),
            },
        ),
        (
            "/admin/users",
            f"rbac_access_denied_matched_policy[{DENY_RULE}]",
            rbac(meshward_deny_enforced_engine_result="denied"),
        ),
    ],
)
def test_the_engine_decides_the_snapshot_as_envoy_did(
    path: str, details: str, metadata: dict[str, dict[str, Any]]
) -> None:
    jwt = {"envoy.filters.http.jwt_authn": {"payload": {"iss": "https://idp", "sub": "alice"}}}
    code = 200 if details == "via_upstream" else 403
    out = recorded(
        http_entry(
            entry(code=code, details=details, metadata={**metadata, **jwt}, path=path),
            WORKLOAD,
            REDACTION,
        )
    )
    policies = parse_documents(POLICIES, file="p.yaml", trust_domain="example.org")
    again = evaluate(policies, build_view(snapshot(out)))
    assert (again.allowed, again.policy_id) == (out.record.allowed, out.record.policy_id)


def test_replay_counts_a_snapshot_without_its_headers_when_a_policy_reads_one() -> None:
    reads_header = Dependencies(istio_headers=frozenset({"x-team"}), rego_text="")
    reads_none = Dependencies(istio_headers=frozenset(), rego_text="")
    rego_reads = Dependencies(
        istio_headers=frozenset(), rego_text="input.attributes.request.http.headers"
    )
    assert reads_header.reason_not_reevaluable([UNLOGGED_HEADERS], rego=False) is not None
    assert reads_none.reason_not_reevaluable([UNLOGGED_HEADERS], rego=False) is None
    assert rego_reads.reason_not_reevaluable([UNLOGGED_HEADERS], rego=True) is not None
    assert rego_reads.reason_not_reevaluable([UNLOGGED_HEADERS], rego=False) is None
    # A header the logger was configured to carry is in the snapshot: no guess.
    logged = logged_headers_marker([":path", "x-team"])
    assert reads_header.reason_not_reevaluable([logged], rego=False) is None
    other = logged_headers_marker([":path", "traceparent"])
    reason = reads_header.reason_not_reevaluable([other], rego=False)
    assert reason is not None
    assert "x-team" in reason


# -- TCP ---------------------------------------------------------------------------


def tcp(
    *, termination: str = "", received: int = 0, metadata: Mapping[str, Any] | None = None
) -> accesslog_pb2.TCPAccessLogEntry:
    out = accesslog_pb2.TCPAccessLogEntry()
    common = out.common_properties
    common.downstream_remote_address.socket_address.address = "10.0.0.7"
    common.downstream_local_address.socket_address.address = "10.0.0.9"
    common.downstream_local_address.socket_address.port_value = 5432
    common.tls_properties.peer_certificate_properties.subject_alt_name.add(uri=CLIENT)
    common.connection_termination_details = termination
    if metadata:
        common.metadata.filter_metadata["envoy.filters.network.rbac"].update(dict(metadata))
    out.connection_properties.received_bytes = received
    return out


def test_tcp_connections_denied_allowed_and_undecided() -> None:
    named = recorded(
        tcp_entry(
            tcp(termination=f"rbac_access_denied_matched_policy[{DENY_RULE}]"), WORKLOAD, REDACTION
        )
    ).record
    assert (named.allowed, named.reason, named.policy_id) == (
        False,
        "denied_by_policy",
        "default.deny-admin[rules[0]]",
    )
    assert named.destination_port == 5432
    assert named.method is None
    assert named.path is None
    unnamed = recorded(
        tcp_entry(tcp(termination="rbac_access_denied_matched_policy[none]"), WORKLOAD, REDACTION)
    ).record
    assert (unnamed.allowed, unnamed.reason) == (False, "no_allow_policy_matched")
    allowed = recorded(tcp_entry(tcp(received=120), WORKLOAD, REDACTION))
    assert (allowed.record.allowed, allowed.record.reason) == (True, "allowed_by_rbac")
    # A connection has no headers.
    assert not [r for r in allowed.record.redacted if r.startswith(UNLOGGED_HEADERS)]
    assert not snapshot(allowed).attributes.request.http.method
    # No byte from the client: the network RBAC filter never decided.
    assert tcp_entry(tcp(), WORKLOAD, REDACTION) == Skipped(SKIP_UNDECIDED)
    custom = tcp(
        received=5,
        metadata={
            "istio_ext_authz_shadow_effective_policy_id": "istio-ext-authz-ns[default]-policy[opa]-rule[0]"
        },
    )
    assert tcp_entry(custom, WORKLOAD, REDACTION) == Skipped(SKIP_EXT_AUTHZ)


# -- the node ------------------------------------------------------------------------


def test_the_workload_comes_from_the_node_metadata() -> None:
    node = base_pb2.Node(id="reviews-1")
    node.metadata.update(
        {
            NODE_WORKLOAD: {
                "namespace": "default",
                "labels": {"app": "reviews"},
                "service": "reviews",
            }
        }
    )
    assert node_workload(node) == NodeWorkload(
        "default", {"app": "reviews"}, "reviews", "reviews-1"
    )
    assert node_workload(base_pb2.Node(id="bare")) == NodeWorkload(node_id="bare")
    node.metadata.update({NODE_WORKLOAD: {"namespace": "default", "labels": "app=reviews"}})
    with pytest.raises(EntryError, match=r"meshward.workload.labels is not a map"):
        node_workload(node)
    node.metadata.update({NODE_WORKLOAD: "default"})
    with pytest.raises(EntryError, match=r"meshward.workload is not a map"):
        node_workload(node)


def test_labels_of_the_workload_reach_the_snapshot_sorted() -> None:
    out = recorded(http_entry(entry(metadata=PASSED), WORKLOAD, REDACTION))
    labels = snapshot(out).attributes.context_extensions["labels"]
    assert labels == "app=reviews,version=v1"


def candidate(root: Path, policies: str) -> Candidate:
    (root / "istio").mkdir(parents=True)
    (root / "istio" / "policies.yaml").write_text(policies)
    store = PolicyStore(root, trust_domain="example.org")
    assert store.reload()
    assert store.current is not None
    sink = MemorySink()
    servicer = AuthorizationServicer(store=store, sink=sink, registry=CollectorRegistry())
    return Candidate(servicer, sink, store.current)


def test_replay_decides_envoys_decisions_again_and_finds_flips(tmp_path: Path) -> None:
    details = f"rbac_access_denied_matched_policy[{DENY_RULE}]"
    denied = recorded(
        http_entry(
            entry(
                code=403,
                details=details,
                path="/admin/users",
                metadata=rbac(meshward_deny_enforced_engine_result="denied"),
            ),
            WORKLOAD,
            REDACTION,
        )
    )
    same = Replay(directory="same")
    same.add(denied.record.as_dict(), denied.snapshot, candidate(tmp_path / "a", POLICIES))
    assert (same.reevaluated, sum(same.flips.values())) == (1, 0)
    allow_all = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: default}
spec: {rules: [{}]}
"""
    changed = Replay(directory="changed")
    changed.add(denied.record.as_dict(), denied.snapshot, candidate(tmp_path / "b", allow_all))
    assert changed.flips[DENY_TO_ALLOW] == 1


def test_a_logged_header_the_client_did_not_send_is_known_absent_not_unknown() -> None:
    node = base_pb2.Node(id="reviews-1")
    node.metadata.update(
        {NODE_WORKLOAD: {"namespace": "default"}, NODE_LOGGED_HEADERS: ["Traceparent"]}
    )
    workload = node_workload(node)
    assert workload.logged_headers == ("traceparent",)
    out = recorded(http_entry(entry(metadata=PASSED), workload, REDACTION))
    # The request carried no traceparent: a policy reading it decides on its absence.
    reads = Dependencies(istio_headers=frozenset({"traceparent"}), rego_text="")
    assert reads.reason_not_reevaluable(out.record.redacted, rego=False) is None
    unlogged = recorded(http_entry(entry(metadata=PASSED), WORKLOAD, REDACTION))
    assert reads.reason_not_reevaluable(unlogged.record.redacted, rego=False) is not None
    node.metadata.update({NODE_LOGGED_HEADERS: "traceparent"})
    with pytest.raises(EntryError, match="not a list of names"):
        node_workload(node)

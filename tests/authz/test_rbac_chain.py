"""The RBAC chain as one filter config: the four filters in Istio's order, one digest.

That Envoy decides with it as with the plain filters is checked by
tests/e2e/test_rbac_differential.py (layout "chain"), that it switches at once by
tests/e2e/test_ecds_atomic_switch.py.
"""

from __future__ import annotations

from typing import Any

import yaml
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.composite.v3 import composite_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.set_metadata.v3 import set_metadata_pb2
from google.protobuf import json_format

from authz.istio_loader import parse_documents
from authz.policy_store import ServedPolicies
from authz.rbac_chain import (
    CHAIN_METADATA,
    CUSTOM_UNAVAILABLE_POLICY,
    HTTP_CHAIN,
    custom_unavailable_filter,
    http_chain,
)
from authz.rbac_translation import Family, Workload, ext_authz_enabled_metadata, translate
from authz.rbac_versions import ChainVersions

API = Workload("default", {"app": "api"}, "api")


def rbac(*paths: str) -> Any:
    documents = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny", "namespace": "default"},
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": list(paths)}}]}]},
        }
    ]
    policies = parse_documents(yaml.safe_dump_all(documents), file="p.yaml", trust_domain="x.org")
    return translate(policies, API)


def test_the_chain_is_the_four_http_filters_behind_an_always_matching_composite() -> None:
    translated = rbac("/admin")
    chain = http_chain(translated)
    config = json_format.ParseDict(chain.as_config(), extension_pb2.TypedExtensionConfig())
    assert config.name == HTTP_CHAIN
    matcher = extension_matcher_pb2.ExtensionWithMatcher()
    assert config.typed_config.Unpack(matcher)
    assert matcher.extension_config.typed_config.Is(composite_pb2.Composite.DESCRIPTOR)
    # No matcher list: the on_no_match action runs for every request.
    assert not matcher.xds_matcher.HasField("matcher_list")
    action = composite_pb2.ExecuteFilterAction()
    assert matcher.xds_matcher.on_no_match.action.typed_config.Unpack(action)
    digest, *filters = action.filter_chain.typed_config
    # First the digest, into the metadata every access-log entry of the chain carries.
    assert digest.name == "meshward.rbac.http.digest"
    metadata = set_metadata_pb2.Config()
    assert digest.typed_config.Unpack(metadata)
    (entry,) = metadata.metadata
    assert entry.metadata_namespace == CHAIN_METADATA
    assert dict(entry.value) == {"digest": chain.digest}
    assert [f.name for f in filters] == [f.name for f in translated.http]
    assert [f.name for f in filters] == [
        "meshward.rbac.http.custom",
        "meshward.rbac.http.audit",
        "meshward.rbac.http.deny",
        "meshward.rbac.http.allow",
    ]
    for inner, plain in zip(filters, translated.http, strict=True):
        assert inner == json_format.ParseDict(
            plain.as_config(), extension_pb2.TypedExtensionConfig()
        )


def test_the_digest_follows_the_content() -> None:
    assert http_chain(rbac("/admin")).digest == http_chain(rbac("/admin")).digest
    assert http_chain(rbac("/admin")).digest != http_chain(rbac("/root")).digest


def test_the_served_set_names_the_chains_it_makes_and_no_other() -> None:
    documents = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "default"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]},
    }
    policies = parse_documents(yaml.safe_dump(documents), file="p.yaml", trust_domain="x.org")
    served: list[ServedPolicies] = [ServedPolicies(policies, None, "v1")]
    versions = ChainVersions(lambda: served[0])
    current = http_chain(rbac("/admin")).digest
    assert versions.version("default", {"app": "api"}, "api", current) == "v1"
    # An Envoy still on the chain of an older set: not what v1 makes, so no version.
    assert versions.version("default", {"app": "api"}, "api", http_chain(rbac("/x")).digest) is None
    # A set that changes nothing for this workload makes the same chain: the newer version.
    served[0] = ServedPolicies(policies, None, "v2")
    assert versions.version("default", {"app": "api"}, "api", current) == "v2"
    assert versions.version(None, {}, None, current) is None


def test_the_native_guard_denies_what_a_custom_policy_selected() -> None:
    guard = custom_unavailable_filter()
    config = rbac_pb2.RBAC()
    json_format.ParseDict({k: v for k, v in guard["typed_config"].items() if k != "@type"}, config)
    assert config.rules.action == config.rules.DENY
    policy = config.rules.policies[CUSTOM_UNAVAILABLE_POLICY]
    (principal,) = policy.principals
    # The very metadata that enables ext_authz in hybrid mode.
    assert json_format.MessageToDict(
        principal.metadata, preserving_proto_field_name=True
    ) == ext_authz_enabled_metadata(Family.HTTP)

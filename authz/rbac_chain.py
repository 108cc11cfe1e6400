"""One sidecar's HTTP RBAC chain as one filter config, so that a policy change switches it at once.

:func:`authz.rbac_translation.translate` gives four HTTP RBAC filters (CUSTOM, AUDIT,
DENY, ALLOW). Served over ECDS as four named resources they would not switch together:
Envoy 1.40 subscribes to each name on a gRPC stream of its own and applies each update
on its own (posted to every worker separately), so a request whose filter chain is built
between two of them is decided by some filters of the old set and some of the new one —
which can allow what neither set allows (a new ALLOW that relies on a new DENY, before
that DENY arrives). Measured with the sets of ``tests/e2e/test_ecds_atomic_switch.py``
flipped 100 times under load, 5 of 4872 answers were such mixes. So the chain is one
resource, ``meshward.rbac.http`` (none of about 11000 answers over 300 flips was a mix):

    ExtensionWithMatcher                      (the match_delegate filter)
      extension_config: composite             (envoy.filters.http.composite)
      xds_matcher: on_no_match (always) → ExecuteFilterAction.filter_chain
                                             [digest, custom, audit, deny, allow]

The first filter writes the chain's digest into the request's dynamic metadata
(``meshward.rbac.chain``), so the access log of every request the chain decided names
the chain that decided it: authz, which loads the same policy sets, tells from it which
policy-set version that chain was made from (``authz.rbac_versions``). Only a change of
the filters changes it, so a policy change still reaches only the sidecars whose
decisions it changes.

For every request the composite filter instantiates the four RBAC filters from the one
config it holds, so a request sees one version of all four or another. Checked with
Envoy 1.40: the differential test (``tests/e2e/test_rbac_differential.py``) runs its
corpus through this shape as well as through the four plain filters, with the same
denials, response details (``rbac_access_denied_matched_policy[...]``), dynamic
metadata, shadow (dry-run) results, access-log hint and ext_authz enabling; ECDS
accepts it (``tests/e2e/test_native_modes.py``), and
``tests/e2e/test_ecds_atomic_switch.py`` flips between two sets whose filter-by-filter
mix would allow what neither allows, under load, and finds every answer one of the two.

ext_authz (hybrid mode) is not part of the chain. Inside a composite chain, once an
asynchronous filter such as ext_authz lets a request continue, the composite's later
filters never run: measured with Envoy 1.40, a POST passed an ALLOW policy for GET only
once a CUSTOM policy had sent it to ext_authz. So the ext_authz filter follows the
chain, enabled by the CUSTOM slot's metadata (``ext_authz_enabled_metadata``), and is
asked only about requests the RBAC filters let through. Whether a request is allowed
is the same as in Istio's order (it passes only if every filter lets it through); what
differs is which denial is reported when a DENY or ALLOW policy and the CUSTOM provider
would both deny (the RBAC one), and that the provider is not asked about requests Envoy
already denied, as with ``authz.rego.mode: always``, which asks about every request the
Istio policies allowed.

A native-mode sidecar has no ext_authz, so nothing could decide what a CUSTOM policy
selects: :func:`custom_unavailable_filter` follows the chain and denies those requests,
naming the reason in the response details, as istiod does for a CUSTOM policy whose
provider it cannot find.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Imported for their descriptors: parsing the chain's Any resolves these types.
import envoy.extensions.common.matching.v3.extension_matcher_pb2
import envoy.extensions.filters.http.composite.v3.composite_pb2
import envoy.extensions.filters.http.set_metadata.v3.set_metadata_pb2  # noqa: F401
from google.protobuf import any_pb2, json_format

from authz.rbac_translation import (
    HTTP_RBAC,
    Family,
    WorkloadRbac,
    ext_authz_enabled_metadata,
)

__all__ = [
    "CHAIN_METADATA",
    "CUSTOM_UNAVAILABLE_FILTER",
    "CUSTOM_UNAVAILABLE_POLICY",
    "EXTENSION_WITH_MATCHER",
    "HTTP_CHAIN",
    "RbacChain",
    "custom_unavailable_filter",
    "http_chain",
]

JSON = dict[str, Any]

HTTP_CHAIN = "meshward.rbac.http"  # the ECDS resource name, and the HCM filter's name
EXTENSION_WITH_MATCHER = (
    "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher"
)
_COMPOSITE = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"
_EXECUTE = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction"
_SET_METADATA = "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config"
CHAIN_METADATA = "meshward.rbac.chain"  # {"digest": RbacChain.digest}, for the access log
CUSTOM_UNAVAILABLE_FILTER = "meshward.rbac.http.custom_unavailable"
# The name a native-mode denial of a CUSTOM-selected request carries in its details.
CUSTOM_UNAVAILABLE_POLICY = "meshward-custom-provider-unavailable-in-native-mode"


@dataclass(slots=True, frozen=True)
class RbacChain:
    """The chain as one ``TypedExtensionConfig``; ``digest`` (of its RBAC filters)
    changes with any filter, and with nothing else."""

    workload: WorkloadRbac
    canonical: str  # canonical JSON of as_config(): sorted keys, no spaces
    digest: str

    def as_config(self) -> JSON:
        """A fresh copy (name and typed_config), for ECDS or to embed in a bootstrap."""
        config: JSON = json.loads(self.canonical)
        return config


def http_chain(rbac: WorkloadRbac) -> RbacChain:
    """The HTTP filters of ``rbac`` in their order, as the one resource ``meshward.rbac.http``."""
    filters = [f.as_config() for f in rbac.http]
    digest = hashlib.sha256(
        json.dumps(filters, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    chain = [_digest_filter(digest), *filters]
    config = {
        "name": HTTP_CHAIN,
        "typed_config": {
            "@type": EXTENSION_WITH_MATCHER,
            "extension_config": {
                "name": "envoy.filters.http.composite",
                "typed_config": {"@type": _COMPOSITE},
            },
            # No matcher list: on_no_match holds for every request.
            "xds_matcher": {
                "on_no_match": {
                    "action": {
                        "name": f"{HTTP_CHAIN}.filters",
                        "typed_config": {
                            "@type": _EXECUTE,
                            "filter_chain": {"typed_config": chain},
                        },
                    }
                }
            },
        },
    }
    _check_proto(config)
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return RbacChain(workload=rbac, canonical=canonical, digest=digest)


def _digest_filter(digest: str) -> JSON:
    return {
        "name": f"{HTTP_CHAIN}.digest",
        "typed_config": {
            "@type": _SET_METADATA,
            "metadata": [{"metadata_namespace": CHAIN_METADATA, "value": {"digest": digest}}],
        },
    }


def custom_unavailable_filter() -> JSON:
    """A static RBAC filter for native mode: deny what a CUSTOM policy selected."""
    matched = ext_authz_enabled_metadata(Family.HTTP)
    return {
        "name": CUSTOM_UNAVAILABLE_FILTER,
        "typed_config": {
            "@type": HTTP_RBAC,
            "rules": {
                "action": "DENY",
                "policies": {
                    CUSTOM_UNAVAILABLE_POLICY: {
                        "permissions": [{"any": True}],
                        "principals": [{"metadata": matched}],
                    }
                },
            },
            # Its own metadata keys: the chain's DENY slot writes meshward_deny_*.
            "rules_stat_prefix": "meshward_custom_unavailable_",
        },
    }


def _check_proto(config: JSON) -> None:
    # A failure here is a bug in this module, not in the policies.
    try:
        json_format.ParseDict(config["typed_config"], any_pb2.Any())
    except json_format.ParseError as exc:
        raise AssertionError(f"{HTTP_CHAIN}: generated an invalid chain config: {exc}") from exc

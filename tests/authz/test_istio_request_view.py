"""RequestView's derived attributes, which the engine matches namespaces, accounts and JWTs on."""

from __future__ import annotations

from typing import Any

import pytest

from authz.request_view import RequestView


@pytest.mark.parametrize(
    ("principal", "trust_domain", "namespace", "service_account"),
    [
        ("example.org/ns/default/sa/web", "example.org", "default", "web"),
        ("td/ns/a/sa/b", "td", "a", "b"),
        (None, None, None, None),
        # Not Istio's <td>/ns/<ns>/sa/<sa> shape: no namespace or account to offer.
        ("example.org/workload/web", None, None, None),
        ("example.org/ns/default/sa/web/extra", None, None, None),
        ("example.org/ns/default/svc/web", None, None, None),
    ],
)
def test_principal_parts(
    principal: str | None,
    trust_domain: str | None,
    namespace: str | None,
    service_account: str | None,
) -> None:
    view = RequestView(workload_namespace="w", source_principal=principal)
    assert (view.source_trust_domain, view.source_namespace, view.source_service_account) == (
        trust_domain,
        namespace,
        service_account,
    )


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"iss": "https://i", "sub": "alice"}, "https://i/alice"),
        ({"iss": "https://i"}, None),
        ({"iss": "https://i", "sub": 7}, None),
        ({}, None),
        (None, None),
    ],
)
def test_request_principal(auth: dict[str, Any] | None, expected: str | None) -> None:
    assert RequestView(workload_namespace="w", request_auth=auth).request_principal == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/a/b?x=1&y=2", "/a/b"), ("/a", "/a"), ("/?", "/"), ("/a#frag", "/a"), (None, None)],
)
def test_path_without_query(path: str | None, expected: str | None) -> None:
    assert RequestView(workload_namespace="w", path=path).path_without_query == expected


def test_view_is_frozen() -> None:
    view = RequestView(workload_namespace="w")
    with pytest.raises(AttributeError):
        view.method = "GET"  # type: ignore[misc]

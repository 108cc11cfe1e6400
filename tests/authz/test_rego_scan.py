"""What a Rego module reads of the request, from its tokens (replay's input)."""

from __future__ import annotations

import pytest

from authz.rego_scan import RequestReads, request_reads

HTTP = "input.attributes.request.http"


@pytest.mark.parametrize(
    ("module", "reads"),
    [
        # Header names spelled out: replay looks those names up itself.
        (f"allow if {HTTP}.headers.authorization", RequestReads()),
        (f'allow if {HTTP}.headers["x-api-key"] == "k"', RequestReads()),
        (f"allow if {HTTP}.headers[`x-api-key`]", RequestReads()),
        ('allow if input["attributes"]["request"]["http"]["headers"]["a"]', RequestReads()),
        # Which header is read is not written down.
        (f"allow if {{\n\tsome name\n\t{HTTP}.headers[name]\n}}", RequestReads(any_header=True)),
        (f'allow if object.get({HTTP}.headers, "a", "") == "b"', RequestReads(any_header=True)),
        (f"h := {HTTP}.headers\n\nallow if h.a", RequestReads(any_header=True)),
        (f"import {HTTP}.headers\n\nallow if headers.a", RequestReads(any_header=True)),
        (f'allow if {HTTP}["headers"][lower("A")]', RequestReads(any_header=True)),
        # A response's headers are not the request's.
        ('allow := {"allowed": true, "headers": {"x-user": "a"}}', RequestReads()),
        # The raw path, which carries the query.
        (f'allow if startswith({HTTP}.path, "/api")', RequestReads(path=True)),
        ('allow if input.parsed_path[0] == "api"', RequestReads()),
        # Strings and comments are not references.
        ('# reads http.headers[x] and .path\nallow if "x.path" == "headers"', RequestReads()),
    ],
)
def test_request_reads(module: str, reads: RequestReads) -> None:
    assert request_reads("package envoy.authz\n\n" + module + "\n") == reads

"""What a Rego module reads of the request (replay's input), and how it is rewritten for the engine."""

from __future__ import annotations

import pytest

from authz.rego_scan import RequestReads, request_reads, rewrite_refs, scan

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


def test_rewrite_refs_expands_aliases_and_renames_calls_on_their_lines() -> None:
    text = (
        "package p\n\nimport data.lib.crypto\nimport data.envoy.authz as z\n\n"
        "a := io.jwt.decode(input.t)\n"
        'b := crypto.sha256("x")\n'  # through the alias: a call into data, left alone
        'c := z.http_request["m"]\n'
    )
    rewritten = rewrite_refs(
        text,
        aliases=scan(text).data_imports,
        renames={"io.jwt.decode": "data.w.decode", "crypto.sha256": "data.w.sha"},
    )
    assert rewritten == (
        "package p\n\nimport data.lib.crypto\nimport data.envoy.authz as z\n\n"
        "a := data.w.decode(input.t)\n"
        'b := data.lib.crypto.sha256("x")\n'
        'c := data.envoy.authz.http_request["m"]\n'
    )

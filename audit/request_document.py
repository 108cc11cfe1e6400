"""A stored request snapshot (an Envoy ``CheckRequest``, binary) as JSON for people."""

from __future__ import annotations

from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format
from google.protobuf.message import DecodeError

__all__ = ["request_document"]


def request_document(blob: bytes | None) -> dict[str, Any] | None:
    """The snapshot in protojson form (Envoy's field names), or None if there is none."""
    if not blob:
        return None
    try:
        message = external_auth_pb2.CheckRequest.FromString(blob)
    except DecodeError:
        return {"error": "the stored request snapshot does not decode"}
    document: dict[str, Any] = json_format.MessageToDict(message)
    return document

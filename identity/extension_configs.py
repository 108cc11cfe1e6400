"""What the agent serves over ECDS, as the ECDS servicer sees it: two small interfaces.

``identity`` does not know what an extension config holds: ``meshward`` wires in the
Istio policies translated to Envoy RBAC filters (``meshward.native_policies``). The
servicer (:mod:`identity.ecds`) only asks an :class:`ExtensionConfigSource` for the
configs of "the workload this Envoy protects" in its latest :class:`ExtensionConfigs`,
and waits for the next one when the source says they changed.

The workload is what the Envoy's node metadata says, under ``meshward.workload``::

    node:
      metadata:
        meshward.workload: {namespace: default, labels: {app: reviews}, service: reviews}
        meshward.authz_mode: hybrid        # informational: shown in the agent's /ready

as ``meshward envoy bootstrap --authz-mode native|hybrid`` writes it: the same three
facts ``context_extensions`` give ext_authz, so both back ends select policies alike.
An Envoy states its own workload, as it states it to ext_authz; it is trusted to,
being the point that enforces the policies anyway. TCP ports are not part of it: the
agent serves no network filters (see :mod:`identity.ecds`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from envoy.config.core.v3 import base_pb2, extension_pb2
from google.protobuf import struct_pb2

from identity.errors import InvalidInputError

__all__ = [
    "AUTHZ_MODE_METADATA_KEY",
    "WORKLOAD_METADATA_KEY",
    "EnvoyWorkload",
    "ExtensionConfigSource",
    "ExtensionConfigs",
    "authz_mode",
    "envoy_workload",
]

WORKLOAD_METADATA_KEY = "meshward.workload"
AUTHZ_MODE_METADATA_KEY = "meshward.authz_mode"
_FIELDS = ("namespace", "labels", "service")


@dataclass(slots=True, frozen=True)
class EnvoyWorkload:
    """The workload an Envoy protects; hashable, so configs can be kept per workload."""

    namespace: str
    labels: tuple[tuple[str, str], ...] = ()  # sorted by key
    service: str | None = None

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def __str__(self) -> str:
        labels = ",".join(f"{k}={v}" for k, v in self.labels) or "no labels"
        service = f", service {self.service}" if self.service else ""
        return f"namespace {self.namespace} ({labels}{service})"

    def as_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "labels": self.label_map, "service": self.service}


class ExtensionConfigs(Protocol):
    """One immutable generation of everything the source serves."""

    @property
    def version(self) -> int:
        """Grows with every generation (it orders them; resource versions are digests)."""
        ...

    def for_workload(
        self, workload: EnvoyWorkload
    ) -> Mapping[str, extension_pb2.TypedExtensionConfig]:
        """Every config for ``workload`` by resource name.

        Raises ExtensionConfigError, with what to fix, when they cannot be built.
        """
        ...


class ExtensionConfigSource(Protocol):
    @property
    def latest(self) -> ExtensionConfigs: ...

    async def changed(self, since: int) -> ExtensionConfigs:
        """Wait until there is a generation with a version greater than ``since``."""
        ...


def envoy_workload(node: base_pb2.Node) -> EnvoyWorkload:
    """The workload the node metadata describes; InvalidInputError naming the key to fix."""
    key = WORKLOAD_METADATA_KEY
    value = node.metadata.fields.get(key)
    if value is None:
        raise InvalidInputError(
            f"the Envoy (node {node.id or '(no id)'}) does not say which workload it protects: "
            f"its node metadata has no {key} ({{namespace, labels, service}}); "
            "`meshward envoy bootstrap --authz-mode native|hybrid` writes it"
        )
    if value.WhichOneof("kind") != "struct_value":
        raise InvalidInputError(f"node metadata {key} must be a map of namespace, labels, service")
    fields = value.struct_value.fields
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise InvalidInputError(
            f"node metadata {key} has unknown keys {unknown}; it takes {', '.join(_FIELDS)}"
        )
    namespace = _string(fields.get("namespace"), f"{key}.namespace")
    if not namespace:
        raise InvalidInputError(f"node metadata {key}.namespace is missing or empty")
    labels: dict[str, str] = {}
    raw_labels = fields.get("labels")
    if raw_labels is not None and raw_labels.WhichOneof("kind") != "null_value":
        if raw_labels.WhichOneof("kind") != "struct_value":
            raise InvalidInputError(f"node metadata {key}.labels must be a map of strings")
        for name, label in raw_labels.struct_value.fields.items():
            labels[name] = _string(label, f"{key}.labels.{name}") or ""
    service = _string(fields.get("service"), f"{key}.service") or None
    return EnvoyWorkload(namespace, tuple(sorted(labels.items())), service)


def authz_mode(node: base_pb2.Node) -> str | None:
    """What the Envoy says its authorization mode is (for reports only)."""
    value = node.metadata.fields.get(AUTHZ_MODE_METADATA_KEY)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    return str(value.string_value)


def _string(value: struct_pb2.Value | None, key: str) -> str | None:
    if value is None or value.WhichOneof("kind") == "null_value":
        return None
    if value.WhichOneof("kind") != "string_value":
        shown = {
            "bool_value": "a boolean (YAML reads an unquoted y, yes, on, true as one: quote it)",
            "number_value": "a number (quote it)",
        }.get(str(value.WhichOneof("kind")), "not a string")
        raise InvalidInputError(f"node metadata {key} is {shown}")
    return str(value.string_value)

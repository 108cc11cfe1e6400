"""Protobuf message → the dict ``protojson.Marshal`` would write, built fast.

The output is what Go's ``protojson.Marshal`` (default options) writes and what
``json_format.MessageToDict`` with its defaults returns: lowerCamelCase names, unset and
zero-valued fields left out, 64-bit integers as strings, enums by name, bytes in
base64, ``Timestamp``/``Duration``/``FieldMask`` as their JSON strings, ``Struct`` as
plain JSON. A value protojson refuses to write (a non-finite ``Struct`` number, a
``Timestamp`` out of RFC 3339's range, an ``Any`` of an unknown type) raises
``BadRequestError("invalid_message")``, since OPA-Envoy fails the request on it.

Why not ``MessageToDict``: it walks every field through several layers of generic
code. Here each message's set fields are walked (``ListFields``) with a converter per
field made on first use, about twice as fast on an Envoy ``CheckRequest`` (see
``authz.rego_input`` for the numbers).
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor, json_format

from authz.errors import BadRequestError

__all__ = ["message_to_dict"]

# One converter per message type and one per field, made on first use: the per-request
# work is a ListFields() call per message and a dict lookup per set field.

_Converter = Callable[[Any], Any]
_FD = descriptor.FieldDescriptor
_INT64_TYPES = frozenset(
    {_FD.TYPE_INT64, _FD.TYPE_UINT64, _FD.TYPE_SINT64, _FD.TYPE_FIXED64, _FD.TYPE_SFIXED64}
)
_message_converters: dict[descriptor.Descriptor, _Converter] = {}
_field_converters: dict[descriptor.FieldDescriptor, tuple[str, _Converter | None]] = {}


def message_to_dict(message: Any) -> Any:
    """``message`` as protojson writes it: a dict, or for a well-known type its JSON value.

    ``Timestamp`` gives a string, ``Value`` any JSON value, a wrapper its scalar.
    """
    return _message_converter(message.DESCRIPTOR)(message)


def _message_converter(desc: descriptor.Descriptor) -> _Converter:
    converter = _message_converters.get(desc)
    if converter is None:
        converter = _make_message_converter(desc)
        _message_converters[desc] = converter
    return converter


def _make_message_converter(desc: descriptor.Descriptor) -> _Converter:
    name = desc.full_name
    if name == "google.protobuf.Struct":
        return _struct
    if name == "google.protobuf.Value":
        return _value
    if name == "google.protobuf.ListValue":
        return _list_value
    if name in (
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
    ):
        return _to_json_string
    if name == "google.protobuf.Any":
        return _any
    if desc.file.name == "google/protobuf/wrappers.proto":
        value_field = desc.fields_by_name["value"]
        scalar = _scalar_converter(value_field)
        if scalar is None:
            return _wrapper_value
        return lambda message: scalar(message.value)
    return _regular


def _regular(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        entry = _field_converters.get(field)
        if entry is None:
            entry = _field_converters[field] = _make_field_converter(field)
        name, converter = entry
        out[name] = value if converter is None else converter(value)
    return out


def _make_field_converter(field: descriptor.FieldDescriptor) -> tuple[str, _Converter | None]:
    name = f"[{field.full_name}]" if field.is_extension else field.json_name
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return name, _map_converter(field.message_type)
    element = _element_converter(field)
    if field.is_repeated:
        if element is None:
            return name, list
        return name, lambda values: [element(item) for item in values]
    return name, element


def _element_converter(field: descriptor.FieldDescriptor) -> _Converter | None:
    if field.message_type is not None:
        return _message_converter(field.message_type)
    return _scalar_converter(field)


def _map_converter(entry: descriptor.Descriptor) -> _Converter:
    key_field = entry.fields_by_name["key"]
    value = _element_converter(entry.fields_by_name["value"])
    if key_field.type == _FD.TYPE_BOOL:
        # protojson writes bool keys as JSON's words, not Python's.
        if value is None:
            return lambda m: {("true" if k else "false"): v for k, v in m.items()}
        return lambda m: {("true" if k else "false"): value(v) for k, v in m.items()}
    if key_field.type == _FD.TYPE_STRING:
        if value is None:
            return dict  # headers, context_extensions, labels: the common case, copied in C
        return lambda m: {k: value(v) for k, v in m.items()}
    if value is None:
        return lambda m: {str(k): v for k, v in m.items()}
    return lambda m: {str(k): value(v) for k, v in m.items()}


def _scalar_converter(field: descriptor.FieldDescriptor) -> _Converter | None:
    kind = field.type
    if kind in _INT64_TYPES:
        return str  # protojson quotes 64-bit integers: JSON numbers lose precision past 2^53
    if kind == _FD.TYPE_BYTES:
        return _base64
    if field.enum_type is not None:
        return _enum_converter(field.enum_type)
    if kind == _FD.TYPE_DOUBLE:
        return _double
    if kind == _FD.TYPE_FLOAT:
        return _float32
    return None


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _enum_converter(enum: descriptor.EnumDescriptor) -> _Converter:
    if enum.full_name == "google.protobuf.NullValue":
        return lambda _: None
    names = {number: value.name for number, value in enum.values_by_number.items()}
    # A number this build does not know is written as the number, like protojson.
    return lambda number: names.get(number, number)


def _double(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _float32(value: float) -> float | str:
    if not math.isfinite(value):
        return _double(value)
    # The shortest decimal that reads back as the same 32-bit float, so 0.1f prints as
    # 0.1 rather than 0.10000000149011612 (what protojson and MessageToDict print).
    for precision in range(6, 10):
        rounded = float(f"{value:.{precision}g}")
        if struct.unpack("<f", struct.pack("<f", rounded))[0] == value:
            return rounded
    return value


def _to_json_string(message: Any) -> str:
    try:
        return str(message.ToJsonString())
    except ValueError as exc:
        # Out of RFC 3339's years 1-9999, or nanos out of range: protojson.Marshal
        # fails on these, and so OPA-Envoy fails the request.
        raise BadRequestError(
            "invalid_message", f"{message.DESCRIPTOR.name} cannot be written as JSON: {exc}"
        ) from None


def _wrapper_value(message: Any) -> Any:
    return message.value


def _any(message: Any) -> Any:
    # Rare (typed_filter_metadata) and needs the type registry: the reference path.
    # An unknown type fails the request, as protojson.Marshal fails in OPA-Envoy.
    try:
        return json_format.MessageToDict(message)
    except (TypeError, ValueError, json_format.Error) as exc:
        raise BadRequestError(
            "invalid_message", f"Any {message.type_url!r} cannot be written as JSON: {exc}"
        ) from None


def _struct(message: Any) -> dict[str, Any]:
    return {key: _value(value) for key, value in message.fields.items()}


def _list_value(message: Any) -> list[Any]:
    return [_value(value) for value in message.values]


def _value(value: Any) -> Any:
    # WhichOneof + a direct read is about twice as fast as Struct's own items(), which
    # builds the Python value through several layers of well_known_types code.
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            # protojson refuses these (they would read back as strings), so does OPA-Envoy.
            raise BadRequestError("invalid_message", f"Struct number {number} is not JSON")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _struct(value.struct_value)
    if kind == "list_value":
        return _list_value(value.list_value)
    return None

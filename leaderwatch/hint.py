"""Leader hints on the wire: the value a server sends with a redirect (DESIGN contract 9).

A :class:`LeaderHint` names the leader's scheme-less endpoint and its epoch,
each when known. It has two wire forms:

- JSON: ``{"leader_endpoint": "host:port", "leader_epoch": 7}`` (either
  field may be ``null`` or absent; the epoch is a JSON integer);
- headers: ``leader-endpoint: host:port`` and ``leader-epoch: 7`` (unsigned
  decimal, no sign, no whitespace), either header may be absent;
- binary: the protobuf message ``tsoracle.v1.LeaderHint { optional string
  leader_endpoint = 1; optional EpochWire leader_epoch = 2; }`` with
  ``EpochWire { uint64 hi = 1; uint64 lo = 2; }`` (epoch = hi * 2**64 + lo),
  the value of the gRPC trailers ``leader-hint-bin`` and
  ``tsoracle-leader-hint-bin``. A small codec here reads and writes it; no
  protobuf runtime is needed.

The parsers never raise on wire input: anything malformed comes back as a
:class:`MalformedHint` whose ``rule`` names the rule broken. They run in time
bounded by the limits below, whatever the input size.

This module imports only :mod:`leaderwatch.state`, so clients can use it
without the server side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Final

from pydantic import Field

from leaderwatch._value import FrozenValue
from leaderwatch.state import (
    EPOCH_LIMIT,
    MAX_ENDPOINT_LENGTH,
    Endpoint,
    Epoch,
    InvalidEndpoint,
    epoch_to_wire,
    parse_endpoint,
)

__all__ = [
    "ENDPOINT_HEADER",
    "EPOCH_HEADER",
    "MALFORMED_HINT_RULES",
    "MAX_EPOCH_DIGITS",
    "MAX_HINT_BINARY_LENGTH",
    "MAX_HINT_JSON_LENGTH",
    "LeaderHint",
    "MalformedHint",
    "NoLeaderYet",
    "hint_from_wire",
    "parse_epoch_decimal",
    "parse_hint_binary",
    "parse_hint_headers",
    "parse_hint_json",
]

ENDPOINT_HEADER: Final = "leader-endpoint"
"""Header carrying the leader's scheme-less ``host:port``."""

EPOCH_HEADER: Final = "leader-epoch"
"""Header carrying the leader's epoch as unsigned decimal."""

MAX_EPOCH_DIGITS: Final = len(str(EPOCH_LIMIT - 1))
"""Longest accepted decimal epoch (39 digits: ``2**128 - 1``)."""

MAX_HINT_JSON_LENGTH: Final = 1024
"""Longest accepted JSON hint, in characters (or bytes)."""

MAX_HINT_BINARY_LENGTH: Final = 1024
"""Longest accepted binary hint, in bytes (a real one is under 300)."""

MALFORMED_HINT_RULES: Final = (
    "binary_bad_field_number",
    "binary_bad_string",
    "binary_bad_wire_type",
    "binary_not_bytes",
    "binary_too_long",
    "binary_truncated",
    "binary_varint_overflow",
    "binary_varint_too_long",
    "duplicate_header",
    "endpoint_has_scheme",
    "endpoint_invalid",
    "endpoint_not_string",
    "endpoint_too_long",
    "epoch_empty",
    "epoch_not_decimal",
    "epoch_not_integer",
    "epoch_out_of_range",
    "epoch_too_long",
    "header_not_ascii",
    "header_not_text",
    "headers_not_container",
    "headers_not_pairs",
    "json_duplicate_field",
    "json_invalid",
    "json_not_object",
    "json_too_long",
    "json_unknown_field",
)
"""Every :attr:`MalformedHint.rule` the parsers here return (stable names, for counting)."""

_DECIMAL: Final = re.compile(r"[0-9]+")
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_FIELDS: Final = frozenset({"leader_endpoint", "leader_epoch"})
_HEADER_NAME_LENGTHS: Final = frozenset({len(ENDPOINT_HEADER), len(EPOCH_HEADER)})


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."


class LeaderHint(FrozenValue):
    """Where the leader is, as far as the replying node knows.

    ``leader_endpoint`` follows the core's endpoint rules (scheme-less
    ``host:port``, refused at construction otherwise); ``leader_epoch`` is an
    epoch in ``[0, 2**128)``. Either may be ``None``.
    """

    __match_args__ = ("leader_endpoint", "leader_epoch")
    leader_endpoint: Endpoint | None = None
    leader_epoch: Epoch | None = None

    def to_json(self) -> str:
        """The JSON form; :func:`parse_hint_json` reads it back to an equal hint."""
        return self.model_dump_json()

    def to_headers(self) -> dict[str, str]:
        """The header form, with a header only for each field that is known."""
        headers: dict[str, str] = {}
        if self.leader_endpoint is not None:
            headers[ENDPOINT_HEADER] = self.leader_endpoint
        if self.leader_epoch is not None:
            headers[EPOCH_HEADER] = str(self.leader_epoch)
        return headers

    def to_binary(self) -> bytes:
        """The binary (protobuf) form; :func:`parse_hint_binary` reads it back to an equal hint.

        Fields are written in field-number order and only when known; an
        epoch half that is zero is left out, as protobuf writers do, so
        epoch 0 is ``12 00`` and the empty hint is ``b""``.
        """
        out = bytearray()
        if self.leader_endpoint is not None:
            raw = self.leader_endpoint.encode()
            out.append(_ENDPOINT_TAG)
            out += _varint_bytes(len(raw))
            out += raw
        if self.leader_epoch is not None:
            hi, lo = epoch_to_wire(self.leader_epoch)
            inner = bytearray()
            if hi:
                inner.append(_HI_TAG)
                inner += _varint_bytes(hi)
            if lo:
                inner.append(_LO_TAG)
                inner += _varint_bytes(lo)
            out.append(_EPOCH_TAG)
            out += _varint_bytes(len(inner))
            out += inner
        return bytes(out)


class MalformedHint(FrozenValue):
    """A wire hint that breaks a rule; never raised, always returned.

    ``rule`` is a stable snake_case name of the rule broken (for counting),
    ``reason`` says what was wrong in words. When the only fault is that the
    endpoint carries a scheme (``https://host:port``), ``wire_endpoint`` keeps
    the endpoint as received and ``leader_epoch`` the epoch, which was valid,
    so a client can apply its own transport policy.
    """

    __match_args__ = ("rule", "reason")
    rule: str
    reason: str
    wire_endpoint: str | None = Field(default=None, max_length=MAX_ENDPOINT_LENGTH)
    leader_epoch: Epoch | None = None


class NoLeaderYet(FrozenValue):
    """No leader can be named yet (an election is under way): retry with backoff.

    ``leader_epoch`` is the newest epoch known to the replying node, if any.
    """

    __match_args__ = ("leader_epoch",)
    leader_epoch: Epoch | None = None


def parse_epoch_decimal(text: str) -> int | MalformedHint:
    """Read an unsigned decimal epoch (the header form), or say which rule it breaks.

    Only ASCII digits are accepted: no sign, whitespace, underscores or
    exponent; at most :data:`MAX_EPOCH_DIGITS` digits; value below ``2**128``.
    Leading zeros are accepted.
    """
    if not isinstance(text, str):
        return MalformedHint(
            rule="epoch_not_decimal",
            reason=f"epoch must be a decimal string (got {type(text).__name__})",
        )
    if not text:
        return MalformedHint(rule="epoch_empty", reason="epoch must not be empty")
    if len(text) > MAX_EPOCH_DIGITS:
        return MalformedHint(
            rule="epoch_too_long",
            reason=f"epoch has {len(text)} characters; at most {MAX_EPOCH_DIGITS} digits",
        )
    if not _DECIMAL.fullmatch(text):
        return MalformedHint(
            rule="epoch_not_decimal",
            reason=(
                "epoch must be unsigned ASCII decimal digits, without sign or whitespace "
                f"(got {_shown(text)})"
            ),
        )
    value = int(text)
    if value >= EPOCH_LIMIT:
        return MalformedHint(
            rule="epoch_out_of_range", reason=f"epoch must be below 2**128 (got {text})"
        )
    return value


def _check_epoch(epoch: object) -> int | MalformedHint | None:
    if epoch is None:
        return None
    if isinstance(epoch, str):
        return parse_epoch_decimal(epoch)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        return MalformedHint(
            rule="epoch_not_integer",
            reason=f"epoch must be an integer (got {type(epoch).__name__})",
        )
    if not 0 <= epoch < EPOCH_LIMIT:
        return MalformedHint(
            rule="epoch_out_of_range",
            reason="epoch must be in [0, 2**128) (got a value outside it)",
        )
    return epoch


def hint_from_wire(endpoint: object, epoch: object) -> LeaderHint | MalformedHint:
    """Build a hint from raw wire fields, or say which rule they break.

    ``endpoint`` is a string or ``None``; ``epoch`` an ``int``, a decimal
    string (see :func:`parse_epoch_decimal`) or ``None``. The epoch is checked
    first. An endpoint carrying a scheme gives ``rule="endpoint_has_scheme"``
    with the raw endpoint in ``wire_endpoint``.
    """
    checked_epoch = _check_epoch(epoch)
    if isinstance(checked_epoch, MalformedHint):
        return checked_epoch
    if endpoint is None:
        return LeaderHint(leader_epoch=checked_epoch)
    if not isinstance(endpoint, str):
        return MalformedHint(
            rule="endpoint_not_string",
            reason=f"endpoint must be a string (got {type(endpoint).__name__})",
        )
    if len(endpoint) > MAX_ENDPOINT_LENGTH:
        return MalformedHint(
            rule="endpoint_too_long",
            reason=f"endpoint has {len(endpoint)} characters; at most {MAX_ENDPOINT_LENGTH}",
        )
    if _SCHEME.match(endpoint):
        return MalformedHint(
            rule="endpoint_has_scheme",
            reason=f"endpoint must be a scheme-less host:port (got {_shown(endpoint)})",
            wire_endpoint=endpoint,
            leader_epoch=checked_epoch,
        )
    try:
        parse_endpoint(endpoint)
    except InvalidEndpoint as exc:
        return MalformedHint(rule="endpoint_invalid", reason=str(exc))
    return LeaderHint(leader_endpoint=endpoint, leader_epoch=checked_epoch)


def parse_hint_json(text: str | bytes) -> LeaderHint | MalformedHint:
    """Read the JSON form, or say which rule it breaks.

    Accepts an object with at most the fields ``leader_endpoint`` (string or
    ``null``) and ``leader_epoch`` (integer or ``null``); an unknown or
    repeated field, any other JSON, or input longer than
    :data:`MAX_HINT_JSON_LENGTH` is malformed.
    """
    if not isinstance(text, str | bytes):
        return MalformedHint(
            rule="json_invalid", reason=f"hint must be str or bytes (got {type(text).__name__})"
        )
    if len(text) > MAX_HINT_JSON_LENGTH:
        return MalformedHint(
            rule="json_too_long",
            reason=f"hint JSON has {len(text)} characters; at most {MAX_HINT_JSON_LENGTH}",
        )
    duplicates: list[str] = []

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        document = json.loads(text, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError) as exc:
        return MalformedHint(rule="json_invalid", reason=f"hint is not valid JSON ({exc})")
    if not isinstance(document, dict):
        return MalformedHint(
            rule="json_not_object",
            reason=f"hint JSON must be an object (got {type(document).__name__})",
        )
    if duplicates:
        return MalformedHint(
            rule="json_duplicate_field",
            reason=f"hint JSON repeats field {_shown(duplicates[0])}",
        )
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        return MalformedHint(
            rule="json_unknown_field",
            reason=f"hint JSON has unknown field {_shown(unknown[0])}; "
            "expected only leader_endpoint and leader_epoch",
        )
    epoch = document.get("leader_epoch")
    if isinstance(epoch, str):
        return MalformedHint(
            rule="epoch_not_integer",
            reason="leader_epoch in JSON must be an integer, not a string",
        )
    return hint_from_wire(document.get("leader_endpoint"), epoch)


def _header_text(value: object, name: str) -> str | MalformedHint:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return MalformedHint(rule="header_not_ascii", reason=f"header {name!r} must be ASCII")
    if isinstance(value, str):
        return value
    return MalformedHint(
        rule="header_not_text",
        reason=f"header {name!r} must be str or bytes (got {type(value).__name__})",
    )


def parse_hint_headers(
    headers: Mapping[str, str | bytes]
    | Mapping[bytes, str | bytes]
    | Iterable[tuple[str | bytes, str | bytes]],
) -> LeaderHint | MalformedHint | None:
    """Read the header form, or say which rule it breaks; ``None`` if neither header is present.

    ``headers`` is a mapping or an iterable of ``(name, value)`` pairs (tuples
    or lists of two; names and values as ``str`` or ASCII ``bytes``); names
    match case-insensitively. A header given twice is malformed, and so is a
    container that is none of these (``headers_not_container``), an item that
    is not a pair (``headers_not_pairs``) or a name that is not text
    (``header_not_text``), whatever header it belongs to.
    """
    if isinstance(headers, Mapping):
        items: Iterable[object] = headers.items()
    elif isinstance(headers, str | bytes | bytearray) or not isinstance(headers, Iterable):
        return MalformedHint(
            rule="headers_not_container",
            reason="headers must be a mapping or an iterable of (name, value) pairs "
            f"(got {type(headers).__name__})",
        )
    else:
        items = headers
    found: dict[str, object] = {}
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            size = f" of {len(item)}" if isinstance(item, tuple | list) else ""
            return MalformedHint(
                rule="headers_not_pairs",
                reason=f"headers must be (name, value) pairs (got a {type(item).__name__}{size})",
            )
        raw_name, value = item
        if isinstance(raw_name, bytes):
            name = raw_name.decode("latin-1")
        elif isinstance(raw_name, str):
            name = raw_name
        else:
            return MalformedHint(
                rule="header_not_text",
                reason=f"header names must be str or bytes (got {type(raw_name).__name__})",
            )
        if len(name) not in _HEADER_NAME_LENGTHS or not name.isascii():
            continue
        name = name.lower()
        if name not in (ENDPOINT_HEADER, EPOCH_HEADER):
            continue
        if name in found:
            return MalformedHint(rule="duplicate_header", reason=f"header {name!r} is repeated")
        found[name] = value
    if not found:
        return None
    fields: dict[str, str | None] = {ENDPOINT_HEADER: None, EPOCH_HEADER: None}
    for name, value in found.items():
        text = _header_text(value, name)
        if isinstance(text, MalformedHint):
            return text
        fields[name] = text
    endpoint = fields[ENDPOINT_HEADER]
    if endpoint == "":
        return MalformedHint(
            rule="endpoint_invalid", reason=f"header {ENDPOINT_HEADER!r} must not be empty"
        )
    return hint_from_wire(endpoint, fields[EPOCH_HEADER])


# --- the binary (protobuf) form ----------------------------------------------------------------
#
# A hand-written codec for two tiny messages rather than the protobuf runtime: the core stays
# free of a compiled dependency, and the work on hostile input is bounded exactly (one pass,
# at most MAX_HINT_BINARY_LENGTH bytes, no recursion). Semantics follow protobuf (as prost,
# the original system's codec, decodes): fields in any order, unknown fields of every wire type
# skipped (groups included), a repeated scalar keeps its last value, a repeated message field
# merges into the earlier one, a varint is at most 10 bytes and below 2**64, a known field
# with the wrong wire type and a string that is not UTF-8 are errors.

_VARINT: Final = 0
_FIXED64: Final = 1
_LENGTH_DELIMITED: Final = 2
_START_GROUP: Final = 3
_END_GROUP: Final = 4
_FIXED32: Final = 5
_WIRE_TYPE_NAMES: Final = ("varint", "64-bit", "length-delimited", "start-group", "end-group",
                           "32-bit", "reserved (6)", "reserved (7)")  # fmt: skip
_MAX_FIELD_NUMBER: Final = (1 << 29) - 1
_MAX_VARINT_BYTES: Final = 10
_UINT64_LIMIT: Final = 1 << 64
_ENDPOINT_TAG: Final = (1 << 3) | _LENGTH_DELIMITED  # 0x0a
_EPOCH_TAG: Final = (2 << 3) | _LENGTH_DELIMITED  # 0x12
_HI_TAG: Final = (1 << 3) | _VARINT  # 0x08
_LO_TAG: Final = (2 << 3) | _VARINT  # 0x10


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _Broken(Exception):
    """A rule the binary form breaks; turned into a MalformedHint before leaving the module."""

    def __init__(self, *, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason


def _read_varint(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """The varint at ``pos`` (any value a 10-byte varint can hold) and the position after it."""
    value = 0
    shift = 0
    for _ in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise _Broken(rule="binary_truncated", reason=f"input ends inside the varint of {what}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Broken(
        rule="binary_varint_too_long",
        reason=f"the varint of {what} is longer than {_MAX_VARINT_BYTES} bytes",
    )


def _read_uint64(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    value, pos = _read_varint(data, pos, end, what)
    if value >= _UINT64_LIMIT:
        raise _Broken(
            rule="binary_varint_overflow", reason=f"the varint of {what} is not below 2**64"
        )
    return value, pos


def _read_tag(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Field number, wire type and the position after the tag at ``pos``."""
    tag, pos = _read_uint64(data, pos, end, "a field tag")
    number, wire_type = tag >> 3, tag & 7
    if not 0 < number <= _MAX_FIELD_NUMBER:
        raise _Broken(
            rule="binary_bad_field_number",
            reason=f"field number {number if number < 1 << 40 else '>= 2**40'} is not in "
            f"[1, {_MAX_FIELD_NUMBER}]",
        )
    if wire_type > _FIXED32:
        raise _Broken(
            rule="binary_bad_wire_type",
            reason=f"field {number} has wire type {wire_type}, which does not exist",
        )
    return number, wire_type, pos


def _read_length(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """Start and end of the length-delimited payload whose length varint is at ``pos``."""
    length, pos = _read_uint64(data, pos, end, f"the length of {what}")
    if length > end - pos:
        raise _Broken(
            rule="binary_truncated",
            reason=f"{what} declares {length} bytes but only {end - pos} remain",
        )
    return pos, pos + length


def _skip_field(data: bytes, pos: int, end: int, number: int, wire_type: int) -> int:
    """The position after the value of an unknown field (a whole group for a start-group)."""
    open_groups: list[int] = []
    while True:
        what = f"unknown field {number}"
        if wire_type == _VARINT:
            _, pos = _read_uint64(data, pos, end, what)
        elif wire_type == _LENGTH_DELIMITED:
            _, pos = _read_length(data, pos, end, what)
        elif wire_type in (_FIXED64, _FIXED32):
            size = 8 if wire_type == _FIXED64 else 4
            if size > end - pos:
                raise _Broken(
                    rule="binary_truncated",
                    reason=f"{what} needs {size} bytes but only {end - pos} remain",
                )
            pos += size
        elif wire_type == _START_GROUP:
            open_groups.append(number)
        elif not open_groups or open_groups.pop() != number:  # _END_GROUP
            raise _Broken(
                rule="binary_bad_wire_type",
                reason=f"end-group of field {number} closes no group opened by that field",
            )
        if not open_groups:
            return pos
        number, wire_type, pos = _read_tag(data, pos, end)


def _expect_wire_type(number: int, wire_type: int, expected: int, name: str) -> None:
    if wire_type != expected:
        raise _Broken(
            rule="binary_bad_wire_type",
            reason=f"field {number} ({name}) must have wire type "
            f"{_WIRE_TYPE_NAMES[expected]}, not {_WIRE_TYPE_NAMES[wire_type]}",
        )


def _merge_epoch(data: bytes, pos: int, end: int, hi: int, lo: int) -> tuple[int, int]:
    """Merge one ``EpochWire`` message into the halves read so far."""
    while pos < end:
        number, wire_type, pos = _read_tag(data, pos, end)
        if number == 1:
            _expect_wire_type(number, wire_type, _VARINT, "EpochWire.hi")
            hi, pos = _read_varint(data, pos, end, "EpochWire.hi")
            if hi >= _UINT64_LIMIT:
                raise _Broken(
                    rule="epoch_out_of_range",
                    reason="EpochWire.hi is not below 2**64: the epoch would not be below 2**128",
                )
        elif number == 2:
            _expect_wire_type(number, wire_type, _VARINT, "EpochWire.lo")
            lo, pos = _read_uint64(data, pos, end, "EpochWire.lo")
        else:
            pos = _skip_field(data, pos, end, number, wire_type)
    return hi, lo


def _decode_hint(data: bytes) -> tuple[str | None, int | None]:
    """The raw endpoint and epoch of a binary hint; raises :class:`_Broken`."""
    pos, end = 0, len(data)
    endpoint: str | None = None
    epoch_halves: tuple[int, int] | None = None
    while pos < end:
        number, wire_type, pos = _read_tag(data, pos, end)
        if number == 1:
            _expect_wire_type(number, wire_type, _LENGTH_DELIMITED, "leader_endpoint")
            start, pos = _read_length(data, pos, end, "leader_endpoint")
            try:
                endpoint = data[start:pos].decode("utf-8")
            except UnicodeDecodeError:
                raise _Broken(
                    rule="binary_bad_string", reason="leader_endpoint is not valid UTF-8"
                ) from None
        elif number == 2:
            _expect_wire_type(number, wire_type, _LENGTH_DELIMITED, "leader_epoch")
            start, pos = _read_length(data, pos, end, "leader_epoch")
            hi, lo = (0, 0) if epoch_halves is None else epoch_halves
            epoch_halves = _merge_epoch(data, start, pos, hi, lo)
        else:
            pos = _skip_field(data, pos, end, number, wire_type)
    epoch = None if epoch_halves is None else (epoch_halves[0] << 64) | epoch_halves[1]
    return endpoint, epoch


def parse_hint_binary(data: bytes | bytearray | memoryview) -> LeaderHint | MalformedHint:
    """Read the binary (protobuf) form, or say which rule it breaks.

    Protobuf semantics: fields in any order; unknown fields of every wire
    type skipped; a field given twice keeps its last value (``leader_epoch``
    given twice merges, half by half, as protobuf merges messages); an
    absent ``leader_epoch`` is ``None`` and a present one with both halves
    zero (or absent) is epoch 0; ``b""`` is the empty hint. Rules: input
    that is not bytes (``binary_not_bytes``) or longer than
    :data:`MAX_HINT_BINARY_LENGTH` (``binary_too_long``), that ends inside
    a field (``binary_truncated``), a varint over 10 bytes
    (``binary_varint_too_long``) or not below 2**64
    (``binary_varint_overflow``; in ``EpochWire.hi`` it is an epoch not
    below 2**128: ``epoch_out_of_range``), a field number outside
    ``[1, 2**29)`` (``binary_bad_field_number``), a wire type that does
    not exist or does not fit the field (``binary_bad_wire_type``), an
    endpoint that is not UTF-8 (``binary_bad_string``), and the endpoint
    rules of :func:`hint_from_wire` (an empty endpoint is ``endpoint_invalid``).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        return MalformedHint(
            rule="binary_not_bytes",
            reason=f"binary hint must be bytes (got {type(data).__name__})",
        )
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > MAX_HINT_BINARY_LENGTH:
        return MalformedHint(
            rule="binary_too_long",
            reason=f"binary hint has {size} bytes; at most {MAX_HINT_BINARY_LENGTH}",
        )
    try:
        endpoint, epoch = _decode_hint(bytes(data))
    except _Broken as broken:
        return MalformedHint(rule=broken.rule, reason=broken.reason)
    return hint_from_wire(endpoint, epoch)

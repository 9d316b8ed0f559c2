"""The binary (protobuf) hint form: hand-written test vectors, then a cross-check with protobuf.

Every vector below was written by hand from the protobuf encoding rules
(tag = field_number << 3 | wire_type; varints little-endian base 128), for
``tsoracle.v1.LeaderHint { optional string leader_endpoint = 1; optional
EpochWire leader_epoch = 2; }`` and ``EpochWire { uint64 hi = 1; uint64 lo =
2; }`` -- never taken from this library's own encoder. The last tests compare
both directions with the protobuf runtime on random messages.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaderwatch.hint import (
    MALFORMED_HINT_RULES,
    MAX_HINT_BINARY_LENGTH,
    LeaderHint,
    MalformedHint,
    parse_hint_binary,
)

TOP = 2**128 - 1
U64_MAX_VARINT = "ff ff ff ff ff ff ff ff ff 01"  # 2**64 - 1: 63 one-bits in 9 bytes, then 1
TWO_TO_64_VARINT = "80 80 80 80 80 80 80 80 80 02"  # 2**64: a 10-byte varint, too big for uint64


def wire(text: str) -> bytes:
    return bytes.fromhex(text)


# (hex, hint): the decoder must read hex as hint; the encoder must write hint as hex.
CANONICAL = [
    ("", LeaderHint()),
    ("0a 03 61 3a 31 12 02 10 2a", LeaderHint(leader_endpoint="a:1", leader_epoch=42)),
    ("0a 0b 6e 6f 64 65 2d 62 3a 39 30 30 30", LeaderHint(leader_endpoint="node-b:9000")),
    ("12 00", LeaderHint(leader_epoch=0)),
    ("12 02 10 07", LeaderHint(leader_epoch=7)),
    ("12 02 10 7f", LeaderHint(leader_epoch=127)),
    ("12 03 10 80 01", LeaderHint(leader_epoch=128)),
    ("12 03 10 ac 02", LeaderHint(leader_epoch=300)),
    (f"12 0b 10 {U64_MAX_VARINT}", LeaderHint(leader_epoch=2**64 - 1)),
    ("12 02 08 01", LeaderHint(leader_epoch=2**64)),
    ("12 04 08 01 10 05", LeaderHint(leader_epoch=2**64 + 5)),
    (f"12 16 08 {U64_MAX_VARINT} 10 {U64_MAX_VARINT}", LeaderHint(leader_epoch=TOP)),
    (
        "0a 0a 5b 3a 3a 31 5d 3a 39 30 30 30 12 03 08 ac 02",
        LeaderHint(leader_endpoint="[::1]:9000", leader_epoch=300 * 2**64),
    ),
]


@pytest.mark.parametrize(("hex_text", "hint"), CANONICAL, ids=[h for h, _ in CANONICAL])
def test_vectors_decode(hex_text: str, hint: LeaderHint) -> None:
    assert parse_hint_binary(wire(hex_text)) == hint


@pytest.mark.parametrize(("hex_text", "hint"), CANONICAL, ids=[h for h, _ in CANONICAL])
def test_encoder_writes_the_vectors(hex_text: str, hint: LeaderHint) -> None:
    assert hint.to_binary() == wire(hex_text)


# Other encodings of valid hints, as other protobuf writers (or versions) may send them.
EQUIVALENT = [
    # Fields in reverse order, at both levels.
    ("12 02 10 2a 0a 03 61 3a 31", LeaderHint(leader_endpoint="a:1", leader_epoch=42)),
    ("12 04 10 05 08 01", LeaderHint(leader_epoch=2**64 + 5)),
    # Zero halves written explicitly (a writer with explicit presence) still mean epoch 0.
    ("12 04 08 00 10 00", LeaderHint(leader_epoch=0)),
    ("12 02 08 00", LeaderHint(leader_epoch=0)),
    # A non-minimal varint is still the same number.
    ("12 03 10 87 00", LeaderHint(leader_epoch=7)),
    ("0a 83 80 00 61 3a 31", LeaderHint(leader_endpoint="a:1")),
    # Repeated scalar: the last value wins.
    ("0a 03 61 3a 31 0a 03 62 3a 32", LeaderHint(leader_endpoint="b:2")),
    ("12 04 10 05 10 07", LeaderHint(leader_epoch=7)),
    # Repeated message field: merged, half by half (hi from the first, lo from the second).
    ("12 02 08 01 12 02 10 05", LeaderHint(leader_epoch=2**64 + 5)),
    ("12 02 10 05 12 02 10 07", LeaderHint(leader_epoch=7)),
    ("12 02 10 05 12 00", LeaderHint(leader_epoch=5)),
    # Unknown fields of every wire type are skipped, before, between and after known ones.
    ("18 96 01 0a 03 61 3a 31", LeaderHint(leader_endpoint="a:1")),  # field 3, varint 150
    ("21 01 02 03 04 05 06 07 08 12 02 10 2a", LeaderHint(leader_epoch=42)),  # field 4, 64-bit
    ("0a 03 61 3a 31 2a 02 68 69", LeaderHint(leader_endpoint="a:1")),  # field 5, "hi"
    ("35 ff ff ff ff 12 02 10 2a", LeaderHint(leader_epoch=42)),  # field 6, 32-bit
    ("3b 08 01 0a 00 3c 12 02 10 2a", LeaderHint(leader_epoch=42)),  # field 7, a group
    ("3b 43 08 01 44 3c 12 00", LeaderHint(leader_epoch=0)),  # nested groups (7, then 8)
    ("c0 3e 01 12 02 10 2a", LeaderHint(leader_epoch=42)),  # field 1000, varint 1
    ("f8 ff ff ff 0f 00 12 00", LeaderHint(leader_epoch=0)),  # field 2**29 - 1, varint 0
    (f"18 {U64_MAX_VARINT} 12 00", LeaderHint(leader_epoch=0)),  # largest uint64 value
    # Unknown fields inside EpochWire.
    ("12 08 18 01 10 2a 2a 02 68 69", LeaderHint(leader_epoch=42)),
    ("12 09 21 00 00 00 00 00 00 00 00", LeaderHint(leader_epoch=0)),
    ("12 07 35 00 00 00 00 08 01", LeaderHint(leader_epoch=2**64)),
    # A tsoracle server writes the endpoint it was configured with: a scheme is
    # reported with its raw text, see the malformed vectors below.
]


@pytest.mark.parametrize(("hex_text", "hint"), EQUIVALENT, ids=[h for h, _ in EQUIVALENT])
def test_other_valid_encodings_decode(hex_text: str, hint: LeaderHint) -> None:
    assert parse_hint_binary(wire(hex_text)) == hint


MALFORMED = [
    # Truncated: input ends inside a tag, a length, a payload, a fixed field or a group.
    ("0a", "binary_truncated"),
    ("0a 03 61 3a", "binary_truncated"),
    ("12 02 10", "binary_truncated"),
    ("12 02 10 ac", "binary_truncated"),  # the inner varint runs past its message
    ("12 01 10 2a", "binary_truncated"),  # the epoch's length cuts its varint
    ("80", "binary_truncated"),  # a tag whose varint never ends
    ("18 96", "binary_truncated"),
    ("21 00 00 00", "binary_truncated"),
    ("35 00", "binary_truncated"),
    ("2a 05 68 69", "binary_truncated"),
    ("3b 08 01", "binary_truncated"),  # a group never closed
    ("12 03 3b 08 01 3c", "binary_truncated"),  # a group running past its message
    # Varints over 10 bytes, in a tag, a length and a value.
    ("80 80 80 80 80 80 80 80 80 80 01", "binary_varint_too_long"),
    ("0a 80 80 80 80 80 80 80 80 80 80 00", "binary_varint_too_long"),
    ("12 0c 10 80 80 80 80 80 80 80 80 80 80 01", "binary_varint_too_long"),
    ("18 ff ff ff ff ff ff ff ff ff ff 01", "binary_varint_too_long"),
    # 10-byte varints that are not below 2**64.
    (f"12 0b 10 {TWO_TO_64_VARINT}", "binary_varint_overflow"),
    (f"18 {TWO_TO_64_VARINT}", "binary_varint_overflow"),
    (f"0a {TWO_TO_64_VARINT}", "binary_varint_overflow"),
    # hi not below 2**64: the epoch would not be below 2**128.
    (f"12 0b 08 {TWO_TO_64_VARINT}", "epoch_out_of_range"),
    ("12 0b 08 ff ff ff ff ff ff ff ff ff 7f", "epoch_out_of_range"),
    # Wire types that do not exist, or do not fit the field.
    ("0e", "binary_bad_wire_type"),  # field 1, wire type 6
    ("1f 00", "binary_bad_wire_type"),  # field 3, wire type 7
    ("08 01", "binary_bad_wire_type"),  # leader_endpoint as a varint
    ("15 00 00 00 00", "binary_bad_wire_type"),  # leader_epoch as 32-bit
    ("12 02 0a 00", "binary_bad_wire_type"),  # EpochWire.hi length-delimited
    ("12 05 15 00 00 00 00", "binary_bad_wire_type"),  # EpochWire.lo 32-bit
    ("0c", "binary_bad_wire_type"),  # leader_endpoint as an end-group
    ("1c", "binary_bad_wire_type"),  # an end-group (field 3) that closes nothing
    ("3b 44", "binary_bad_wire_type"),  # group 7 closed by field 8's end-group
    # Field numbers outside [1, 2**29).
    ("00 00", "binary_bad_field_number"),
    ("02 00", "binary_bad_field_number"),
    ("80 80 80 80 10 00", "binary_bad_field_number"),  # field 2**29
    # The endpoint.
    ("0a 02 c3 28", "binary_bad_string"),
    ("0a 01 ff", "binary_bad_string"),
    ("0a 03 ed a0 80", "binary_bad_string"),  # an encoded surrogate
    ("0a 00", "endpoint_invalid"),
    ("0a 06 6e 6f 64 65 2d 62", "endpoint_invalid"),  # "node-b": no port
    ("0a 05 61 20 62 3a 31", "endpoint_invalid"),  # "a b:1"
    ("0a 0a 68 74 74 70 3a 2f 2f 61 3a 31 12 02 10 07", "endpoint_has_scheme"),  # http://a:1
]


@pytest.mark.parametrize(("hex_text", "rule"), MALFORMED, ids=[h for h, _ in MALFORMED])
def test_malformed_vectors_name_the_rule(hex_text: str, rule: str) -> None:
    result = parse_hint_binary(wire(hex_text))
    assert isinstance(result, MalformedHint), result
    assert result.rule == rule
    assert rule in MALFORMED_HINT_RULES
    assert len(result.reason) < 200


def test_a_scheme_keeps_the_raw_endpoint_and_epoch_for_the_client_policy() -> None:
    result = parse_hint_binary(wire("0a 0a 68 74 74 70 3a 2f 2f 61 3a 31 12 02 10 07"))
    assert result == MalformedHint(
        rule="endpoint_has_scheme",
        reason=result.reason,
        wire_endpoint="http://a:1",
        leader_epoch=7,
    )


def test_a_bad_field_anywhere_is_malformed_even_after_a_good_one() -> None:
    # A valid hint followed by a broken field: protobuf rejects the whole message.
    assert parse_hint_binary(wire("0a 03 61 3a 31 12 02 10 2a 0e")).rule == "binary_bad_wire_type"  # type: ignore[union-attr]
    assert parse_hint_binary(wire("0a 03 61 3a 31 0a 01 ff")).rule == "binary_bad_string"  # type: ignore[union-attr]


def test_every_prefix_of_a_hint_is_a_hint_or_truncated() -> None:
    data = wire("0a 03 61 3a 31 12 02 10 2a")
    boundaries = {0: LeaderHint(), 5: LeaderHint(leader_endpoint="a:1"), 9: None}
    for size in range(len(data)):
        result = parse_hint_binary(data[:size])
        if size in boundaries:
            assert result == boundaries[size]
        else:
            assert isinstance(result, MalformedHint), size
            assert result.rule == "binary_truncated", (size, result)


def test_length_is_bounded() -> None:
    head = wire("0a 03 61 3a 31")
    # An unknown length-delimited field (field 5) pads the hint to exactly the limit.
    pad = MAX_HINT_BINARY_LENGTH - len(head) - 3
    padded = head + wire("2a") + bytes([0x80 | (pad & 0x7F), pad >> 7]) + b"x" * pad
    assert len(padded) == MAX_HINT_BINARY_LENGTH
    assert parse_hint_binary(padded) == LeaderHint(leader_endpoint="a:1")
    result = parse_hint_binary(padded + b"\x00")
    assert isinstance(result, MalformedHint)
    assert result.rule == "binary_too_long"
    huge = parse_hint_binary(b"\x0a" * (1 << 20))
    assert isinstance(huge, MalformedHint)
    assert huge.rule == "binary_too_long"


def test_an_endpoint_over_the_endpoint_limit_is_too_long() -> None:
    endpoint = b"a" * 300 + b":1"
    data = bytes([0x0A, 0x80 | (len(endpoint) & 0x7F), len(endpoint) >> 7]) + endpoint
    result = parse_hint_binary(data)
    assert isinstance(result, MalformedHint)
    assert result.rule == "endpoint_too_long"


@pytest.mark.parametrize("value", ["0a 03 61 3a 31", None, 7, ["0a"], object()])
def test_input_that_is_not_bytes_is_malformed(value: object) -> None:
    result = parse_hint_binary(value)  # type: ignore[arg-type]
    assert isinstance(result, MalformedHint)
    assert result.rule == "binary_not_bytes"


def test_bytearray_and_memoryview_are_read() -> None:
    data = wire("0a 03 61 3a 31 12 02 10 2a")
    hint = LeaderHint(leader_endpoint="a:1", leader_epoch=42)
    assert parse_hint_binary(bytearray(data)) == hint
    assert parse_hint_binary(memoryview(data)) == hint


@given(
    endpoint=st.sampled_from([None, "a:1", "node-b:9000", "[::1]:9000", "10.0.0.7:50551"]),
    epoch=st.none() | st.integers(0, TOP),
)
def test_round_trip(endpoint: str | None, epoch: int | None) -> None:
    hint = LeaderHint(leader_endpoint=endpoint, leader_epoch=epoch)
    assert parse_hint_binary(hint.to_binary()) == hint


# --- against the protobuf runtime --------------------------------------------------------------


def protobuf_classes() -> tuple[type, type]:
    """LeaderHint and EpochWire built at run time from the .proto's descriptor (proto3 optional)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="leaderwatch_test_tsoracle_hint.proto", package="tsoracle.v1", syntax="proto3"
    )
    epoch = file.message_type.add(name="EpochWire")
    epoch.field.add(name="hi", number=1, type=field.TYPE_UINT64, label=field.LABEL_OPTIONAL)
    epoch.field.add(name="lo", number=2, type=field.TYPE_UINT64, label=field.LABEL_OPTIONAL)
    hint = file.message_type.add(name="LeaderHint")
    hint.field.add(
        name="leader_endpoint",
        number=1,
        type=field.TYPE_STRING,
        label=field.LABEL_OPTIONAL,
        oneof_index=0,
        proto3_optional=True,
    )
    hint.field.add(
        name="leader_epoch",
        number=2,
        type=field.TYPE_MESSAGE,
        type_name=".tsoracle.v1.EpochWire",
        label=field.LABEL_OPTIONAL,
        oneof_index=1,
        proto3_optional=True,
    )
    hint.oneof_decl.add(name="_leader_endpoint")
    hint.oneof_decl.add(name="_leader_epoch")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tsoracle.v1.LeaderHint")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tsoracle.v1.EpochWire")),
    )


ENDPOINTS = st.sampled_from(
    [None, "a:1", "node-b:9000", "[::1]:9000", "leader-0.example.internal:65535"]
)
HALVES = st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 127, 128, 2**63, 2**64 - 1])


@settings(max_examples=300)
@given(endpoint=ENDPOINTS, halves=st.none() | st.tuples(HALVES, HALVES), unknown=st.booleans())
def test_protobuf_runtime_and_codec_agree(
    endpoint: str | None, halves: tuple[int, int] | None, unknown: bool
) -> None:
    hint_class, epoch_class = protobuf_classes_cached()
    message = hint_class()
    if endpoint is not None:
        message.leader_endpoint = endpoint
    if halves is not None:
        message.leader_epoch.CopyFrom(epoch_class(hi=halves[0], lo=halves[1]))
    data = message.SerializeToString()
    if unknown:  # unknown fields of every wire type, after the known ones
        data += wire("18 96 01 21 01 02 03 04 05 06 07 08 2a 02 68 69 35 00 00 00 00")
    epoch = None if halves is None else halves[0] * 2**64 + halves[1]
    expected = LeaderHint(leader_endpoint=endpoint, leader_epoch=epoch)
    assert parse_hint_binary(data) == expected
    # And the other way: what we write, protobuf reads back field by field.
    read = hint_class.FromString(expected.to_binary())
    assert read.HasField("leader_endpoint") is (endpoint is not None)
    assert read.HasField("leader_epoch") is (halves is not None)
    if endpoint is not None:
        assert read.leader_endpoint == endpoint
    if halves is not None:
        assert (read.leader_epoch.hi, read.leader_epoch.lo) == halves
    if not unknown:
        assert expected.to_binary() == data


_CLASSES: list[tuple[type, type]] = []


def protobuf_classes_cached() -> tuple[type, type]:
    if not _CLASSES:
        _CLASSES.append(protobuf_classes())
    return _CLASSES[0]

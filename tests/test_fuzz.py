"""Fuzzing every core parser that sees outside input (issue 11, section 4).

Invariant, for every target in :data:`TARGETS` and any input up to 1 MB: the
parser returns a valid value, or raises one of its documented error types
(wire readers raise nothing at all), within :data:`TIME_BOUND` seconds.

Budget: :data:`FUZZ_EXAMPLES` hypothesis examples per target (default 400;
set ``LEADERWATCH_FUZZ_EXAMPLES`` to run more, e.g. 20000 for a long run) and
:data:`TIME_BOUND` seconds per call (``LEADERWATCH_FUZZ_TIME_BOUND``, default
1.0; the parsers answer in microseconds to milliseconds, so the bound only
catches super-linear work, not a busy machine). The number of cases run is
printed in the terminal summary (``fuzz: N cases run ...``), with the largest
input each target saw.

Adding a parser is one :class:`Target` entry: its inputs, the call, the
error types it documents, and a check of what it returns.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import SUMMARY_LINES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leaderwatch.client import CachedLeader, Follow, LeaderCache, NoLeaderYet, Rejected, Stale
from leaderwatch.drivers import _local_store as local_store
from leaderwatch.hint import (
    ENDPOINT_HEADER,
    EPOCH_HEADER,
    MALFORMED_HINT_RULES,
    LeaderHint,
    MalformedHint,
    hint_from_wire,
    parse_epoch_decimal,
    parse_hint_binary,
    parse_hint_headers,
    parse_hint_json,
)
from leaderwatch.state import (
    EPOCH_LIMIT,
    MAX_ENDPOINT_LENGTH,
    Follower,
    InvalidEndpoint,
    InvalidEpoch,
    InvalidLeaderState,
    Leader,
    Unknown,
    check_epoch,
    epoch_from_wire,
    epoch_to_wire,
    leader_state_from_json,
    parse_endpoint,
    same_endpoint,
)

FUZZ_EXAMPLES = int(os.environ.get("LEADERWATCH_FUZZ_EXAMPLES", "400"))
"""Hypothesis examples per target."""

TIME_BOUND = float(os.environ.get("LEADERWATCH_FUZZ_TIME_BOUND", "1.0"))
"""Seconds one call (and formatting its error) may take, for any input up to 1 MB."""

MAX_INPUT = 1 << 20
"""Largest input: 1 MB (characters for text, bytes for bytes, in total for containers)."""

MAX_MESSAGE = 4000
"""Longest error message: errors name the rule, they never echo a huge input."""

CASES: Counter[str] = Counter()
LARGEST: Counter[str] = Counter()

FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    # Drawing a 1 MB input is not the parser's time: each call is timed against TIME_BOUND.
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


# --- inputs ------------------------------------------------------------------------------------

# Every integer strategy is bounded: given an unbounded one, hypothesis' shrinker tries
# values past 4300 digits and fails formatting them; huge ints come from HUGE_INTS instead.
SMALL_INTS = st.integers(-(2**300), 2**300)

TOKENS = st.sampled_from(
    [
        "leader",
        "node-b",
        "a",
        "_",
        "-",
        ".",
        ":",
        "::",
        "[",
        "]",
        "::ffff:",
        "127.0.0.1",
        "10.0.0.7",
        "0x7f",
        "0X",
        "0177",
        "255",
        "256",
        "9000",
        "65535",
        "65536",
        "0",
        "00",
        "1",
        "http://",
        "https://",
        "grpc://",
        "@",
        "/",
        "?",
        "#",
        "%",
        "%eth0",
        " ",
        "\t",
        "\r\n",
        "\x00",
        "\x7f",
        "\u200b",
        "\ufeff",
        "é",
        "٣",
        "ﬀ",
        "İ",
        "K",
        "\ud800",
        "😀",
        '"',
        "{",
        "}",
        ",",
        "null",
        "true",
        "-1",
        "1e3",
        "7.0",
        str(EPOCH_LIMIT - 1),
        str(EPOCH_LIMIT),
        '"kind"',
        '"leader"',
        '"follower"',
        '"unknown"',
        '"epoch"',
        '"leader_endpoint"',
        '"leader_epoch"',
        "\\u0000",
        "\\ud800",
    ]
)
ANY_CHARS = st.characters(codec=None, exclude_categories=())

SMALL_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(ANY_CHARS, max_size=40),
    st.lists(st.one_of(TOKENS, st.text(ANY_CHARS, max_size=4)), max_size=16).map("".join),
)


def repeated(piece: str, count: int) -> str:
    """``piece`` repeated ``count`` times, cut at 1 MB."""
    return (piece * min(count, MAX_INPUT // max(len(piece), 1)))[:MAX_INPUT]


HUGE_TEXT = st.builds(
    repeated, st.one_of(TOKENS, SMALL_TEXT.filter(bool)), st.integers(1, MAX_INPUT)
)


def nested(opening: str, middle: str, closing: str, depth: int) -> str:
    depth = min(depth, (MAX_INPUT - len(middle)) // max(len(opening) + len(closing), 1))
    return opening * depth + middle + closing * depth


def many_keys(count: int, duplicate: bool) -> str:
    keys = (f'"k{index}":{index}' for index in range(count))
    body = ",".join(keys)
    if duplicate:
        body += ',"k0":1'
    return "{" + body[: MAX_INPUT - 20] + "}"


DEEP_JSON = st.builds(
    nested,
    st.sampled_from(["[", '{"a":', '{"kind":', '{"leader_epoch":', "[{"]),
    st.sampled_from(["1", "null", '"x"', "", "{}"]),
    st.sampled_from(["]", "}", "}]", ""]),
    st.integers(1, MAX_INPUT // 2),
)
MANY_KEYS_JSON = st.builds(many_keys, st.integers(0, 80_000), st.booleans())
HUGE_INT_TEXT = st.integers(1, MAX_INPUT - 64).map(lambda digits: "9" * digits)
HUGE_INT_JSON = st.one_of(
    HUGE_INT_TEXT.map(lambda digits: f'{{"kind": "leader", "epoch": {digits}}}'),
    HUGE_INT_TEXT.map(lambda digits: f'{{"leader_epoch": {digits}}}'),
    HUGE_INT_TEXT.map(lambda digits: f'{{"kind": "follower", "leader_epoch": -{digits}}}'),
)

STATES = st.one_of(
    st.builds(Leader, epoch=st.integers(0, EPOCH_LIMIT - 1)),
    st.builds(
        Follower,
        leader_endpoint=st.sampled_from([None, "a:1", "[::1]:9000", "10.0.0.7:50551"]),
        leader_epoch=st.none() | st.integers(0, EPOCH_LIMIT - 1),
    ),
    st.just(Unknown()),
)
HINTS = st.builds(
    LeaderHint,
    leader_endpoint=st.sampled_from([None, "node-b:9000", "[::ffff:127.0.0.1]:1", "a:65535"]),
    leader_epoch=st.none() | st.integers(0, EPOCH_LIMIT - 1),
)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[str]) -> str:
    """A valid encoding with a few insertions, deletions and repetitions."""
    text = draw(valid)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(text)))
        match draw(st.sampled_from(["insert", "delete", "repeat"])):
            case "insert":
                text = text[:position] + draw(st.one_of(TOKENS, SMALL_TEXT)) + text[position:]
            case "delete":
                text = text[:position] + text[position + draw(st.integers(1, 8)) :]
            case _:
                text = text[:position] + text[position:] * draw(st.integers(2, 3))
    return text


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | SMALL_INTS
    | st.floats()
    | st.text(ANY_CHARS.filter(lambda c: not 0xD800 <= ord(c) <= 0xDFFF), max_size=20)
    | st.sampled_from(["leader", "follower", "unknown", "a:1", "http://a:1", "0x7f.1:1"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["kind", "epoch", "leader_endpoint", "leader_epoch", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)

WIRE_TEXT = st.one_of(
    SMALL_TEXT,
    HUGE_TEXT,
    DEEP_JSON,
    MANY_KEYS_JSON,
    HUGE_INT_JSON,
    HUGE_INT_TEXT,
    JSON_VALUES.map(json.dumps),
    mutated(STATES.map(lambda state: state.model_dump_json())),
    mutated(HINTS.map(lambda hint: hint.to_json())),
)


def encoded(text: str, codec: str) -> bytes:
    """``text`` in ``codec``; lone surrogates pass into UTF forms as invalid bytes."""
    errors = "replace" if codec == "latin-1" else "surrogatepass"
    return text.encode(codec, errors=errors)[:MAX_INPUT]


WIRE_BYTES = st.one_of(
    st.binary(max_size=64),
    st.builds(encoded, WIRE_TEXT, st.sampled_from(["utf-8", "utf-16", "utf-32", "latin-1"])),
    st.builds(
        lambda piece, count: (piece * count)[:MAX_INPUT],
        st.binary(min_size=1, max_size=8),
        st.integers(1, MAX_INPUT),
    ),
)


@st.composite
def mutated_bytes(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with a few byte insertions, deletions, flips and repetitions."""
    data = draw(valid)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["insert", "delete", "flip", "repeat"])):
            case "insert":
                data = data[:position] + draw(st.binary(min_size=1, max_size=4)) + data[position:]
            case "delete":
                data = data[:position] + data[position + draw(st.integers(1, 4)) :]
            case "flip" if position < len(data):
                flipped = data[position] ^ draw(st.integers(1, 255))
                data = data[:position] + bytes([flipped]) + data[position + 1 :]
            case _:
                data = data[:position] + data[position:] * draw(st.integers(2, 3))
    return data[:MAX_INPUT]


BINARY_HINTS = st.one_of(
    WIRE_BYTES,
    HINTS.map(lambda hint: hint.to_binary()),
    mutated_bytes(HINTS.map(lambda hint: hint.to_binary())),
    # Deep groups, long varints and huge declared lengths, up to 1 MB.
    st.builds(
        lambda piece, count: (piece * count)[:MAX_INPUT],
        st.sampled_from([b"\x3b", b"\x3b\x08\x01", b"\xff", b"\x80", b"\x12\x7f", b"\x0a\x00"]),
        st.integers(1, MAX_INPUT),
    ),
)


HUGE_INTS = st.integers(0, 8 * MAX_INPUT).map(lambda bits: 1 << bits)
INTEGERS = st.one_of(
    SMALL_INTS,
    st.integers(-(2**130), 2**130),
    st.sampled_from([0, 1, -1, 2**64 - 1, 2**64, 2**128 - 1, 2**128, -(2**128)]),
    HUGE_INTS,
    HUGE_INTS.map(lambda value: -value),
    HUGE_INTS.map(lambda value: value - 1),
)
ANY_VALUE = st.one_of(
    INTEGERS,
    st.none(),
    st.booleans(),
    st.floats(),
    st.decimals(allow_nan=False),
    SMALL_TEXT,
    WIRE_BYTES,
    st.builds(bytearray, st.binary(max_size=16)),
    st.lists(SMALL_INTS, max_size=3),
    st.tuples(SMALL_INTS, SMALL_INTS),
    st.builds(object),
)

ENDPOINT_TEXT = st.one_of(
    SMALL_TEXT,
    mutated(st.sampled_from(["leader:9000", "[::1]:9000", "127.0.0.1:80", "a.b-c_d:65535"])),
    st.builds(
        "{}:{}".format,
        st.sampled_from(["0x7f.1", "127.1", "2130706433", "1.2.3.4.", "a.0x1", "[::ffff:1.2.3.4]"]),
        st.integers(-1, 70000),
    ),
    HUGE_TEXT,
)
EPOCH_TEXT = st.one_of(
    st.integers(0, EPOCH_LIMIT + 5).map(str),
    st.integers(0, EPOCH_LIMIT).map(lambda value: "0" * 3 + str(value)),
    SMALL_TEXT,
    HUGE_INT_TEXT,
    HUGE_TEXT,
)
HEADER_NAMES = st.one_of(
    st.sampled_from(
        [ENDPOINT_HEADER, EPOCH_HEADER, "Leader-Endpoint", "LEADER-EPOCH", "leader-epoch ", "x"]
    ),
    st.sampled_from([ENDPOINT_HEADER, EPOCH_HEADER]).map(str.encode),
    SMALL_TEXT,
    st.binary(max_size=20),
    st.sampled_from(["l\u0435ader-epoch", "leader-endpo\u0131nt"]),  # lookalikes
)
HEADER_VALUES = st.one_of(ENDPOINT_TEXT, EPOCH_TEXT, WIRE_BYTES, ANY_VALUE)


def many_headers(name: str, count: int) -> list[tuple[str, str]]:
    return [(f"{name}-{index}", "v") for index in range(min(count, MAX_INPUT // 16))]


HEADER_CONTAINERS = st.one_of(
    st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=4),
    st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4),
    st.lists(st.lists(HEADER_NAMES | HEADER_VALUES, max_size=3), max_size=3),
    st.lists(
        st.one_of(
            st.tuples(HEADER_NAMES), st.tuples(HEADER_NAMES, HEADER_VALUES, ANY_VALUE), ANY_VALUE
        ),
        max_size=3,
    ),
    st.dictionaries(
        ANY_VALUE.filter(lambda value: value.__hash__ is not None), HEADER_VALUES, max_size=3
    ),
    st.builds(many_headers, st.sampled_from(["x", ENDPOINT_HEADER]), st.integers(0, MAX_INPUT)),
    ANY_VALUE,
    WIRE_TEXT,
)


# --- what a valid result is --------------------------------------------------------------------


def check_endpoint(args: tuple[Any, ...], result: object) -> None:
    assert result == args[0]
    assert isinstance(result, str)
    assert len(result) <= MAX_ENDPOINT_LENGTH
    assert Follower(leader_endpoint=result).leader_endpoint == result
    assert same_endpoint(result, result)


def check_same_endpoint(args: tuple[Any, ...], result: object) -> None:
    assert isinstance(result, bool)
    assert same_endpoint(args[1], args[0]) is result


def check_hint(args: tuple[Any, ...], result: object) -> None:
    match result:
        case LeaderHint():
            assert parse_hint_json(result.to_json()) == result
            headers = result.to_headers()
            assert parse_hint_headers(headers) == (result if headers else None)
        case MalformedHint(rule=rule, reason=reason):
            assert rule in MALFORMED_HINT_RULES
            assert len(reason) <= MAX_MESSAGE
        case None:
            pass
        case _:
            raise AssertionError(f"not a hint: {result!r}")


def check_binary_hint(args: tuple[Any, ...], result: object) -> None:
    check_hint(args, result)
    if isinstance(result, LeaderHint):
        assert parse_hint_binary(result.to_binary()) == result


def check_epoch_decimal(args: tuple[Any, ...], result: object) -> None:
    if isinstance(result, int):
        assert 0 <= result < EPOCH_LIMIT
        assert result == int(args[0])
    else:
        check_hint(args, result)


def check_state(args: tuple[Any, ...], result: object) -> None:
    assert isinstance(result, Leader | Follower | Unknown)
    assert leader_state_from_json(result.model_dump_json()) == result


def check_epoch_value(args: tuple[Any, ...], result: object) -> None:
    assert result is args[0]
    assert isinstance(result, int)
    assert 0 <= result < EPOCH_LIMIT


def check_wire_halves(args: tuple[Any, ...], result: object) -> None:
    assert isinstance(result, tuple)
    assert epoch_from_wire(*result) == args[0]


def check_joined_epoch(args: tuple[Any, ...], result: object) -> None:
    assert isinstance(result, int)
    assert 0 <= result < EPOCH_LIMIT
    assert epoch_to_wire(result) == args


def check_seated(args: tuple[Any, ...], result: object) -> None:
    # An empty cache accepts any valid hint as it is.
    assert result == (True, CachedLeader(*args))


CONFIGURED = ("a:1", "b:1", "[::1]:9000")


def cache_after_offer(endpoint: object, epoch: object) -> tuple[bool, CachedLeader | None]:
    cache = LeaderCache(CONFIGURED, rng=random.Random(0))
    accepted = cache.compare_and_set_leader(endpoint, epoch)  # type: ignore[arg-type]
    return accepted, cache.cached_leader


WIRE_HINTS = st.one_of(
    st.tuples(st.just("json"), st.one_of(WIRE_TEXT, WIRE_BYTES)),
    st.tuples(st.just("headers"), HEADER_CONTAINERS),
    st.tuples(st.just("binary"), BINARY_HINTS),
    st.tuples(st.just("fields"), st.tuples(ENDPOINT_TEXT | ANY_VALUE, EPOCH_TEXT | ANY_VALUE)),
    st.tuples(st.just("valid"), HINTS),
    st.just(("none", None)),
)


def classify_wire_hints(tls_required: bool, wires: list[tuple[str, Any]]) -> list[object]:
    """Parse each wire hint as a client would and classify it with one cache."""
    cache = LeaderCache(CONFIGURED, tls_required=tls_required, rng=random.Random(0))
    outcomes: list[object] = []
    for form, wire in wires:
        match form:
            case "json":
                hint = parse_hint_json(wire)
            case "headers":
                hint = parse_hint_headers(wire)
            case "binary":
                hint = parse_hint_binary(wire)
            case "fields":
                hint = hint_from_wire(*wire)
            case "valid":
                hint = wire
            case _:
                hint = None
        outcomes.append(cache.classify(hint))
        cached = cache.cached_leader
        if cached is not None:
            parse_endpoint(cached.endpoint)
    return outcomes


def check_outcomes(args: tuple[Any, ...], result: object) -> None:
    assert isinstance(result, list)
    for outcome in result:
        match outcome:
            case Follow(endpoint=endpoint) | Stale(endpoint=endpoint):
                parse_endpoint(endpoint)
            case Rejected(rule=rule):
                assert rule in (*MALFORMED_HINT_RULES, "plaintext_downgrade")
            case NoLeaderYet():
                pass
            case _:
                raise AssertionError(f"not a hint outcome: {outcome!r}")


LOCAL_RECORDS = st.one_of(
    st.builds(
        local_store.LocalLeaderRecord,
        epoch=st.integers(0, EPOCH_LIMIT - 1),
        leader_endpoint=st.sampled_from(["a:1", "[::1]:9000", "10.0.0.7:50551"]),
        node_id=SMALL_TEXT,
        pid=SMALL_INTS,
    ),
    st.builds(local_store.LocalEpochCounter, epoch=st.integers(0, EPOCH_LIMIT - 1)),
)
LOCAL_FILE_TEXT = st.one_of(
    WIRE_TEXT,
    mutated(LOCAL_RECORDS.map(lambda record: record.model_dump_json())),
    HUGE_INT_TEXT.map(lambda digits: f'{{"epoch": {digits}}}'),
    st.builds(
        '{{"epoch": {}, "leader_endpoint": "a:1", "node_id": {}, "pid": 1}}'.format,
        st.one_of(
            st.integers(-(2**130), 2**130).map(str),
            st.sampled_from([EPOCH_LIMIT - 1, EPOCH_LIMIT, -1, 0]).map(str),
            HUGE_INT_TEXT,
        ),
        st.text(ANY_CHARS, max_size=8).map(json.dumps),
    ),
)
LOCAL_FILES = st.one_of(
    WIRE_BYTES, st.builds(encoded, LOCAL_FILE_TEXT, st.sampled_from(["utf-8", "utf-16"]))
)


def check_local_file(args: tuple[Any, ...], result: object) -> None:
    match result:
        case local_store.Corrupt(reason=reason):
            assert isinstance(reason, str)
            assert len(reason) <= MAX_MESSAGE
        case local_store.LocalLeaderRecord() | local_store.LocalEpochCounter():
            assert isinstance(result, args[1])
            assert 0 <= result.epoch < EPOCH_LIMIT
            assert local_store.parse(result.model_dump_json().encode(), args[1]) == result
            if isinstance(result, local_store.LocalLeaderRecord):
                parse_endpoint(result.leader_endpoint)
        case _:
            raise AssertionError(f"not a local election file: {result!r}")


# --- the targets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One parser under fuzz: its inputs (positional arguments), call, documented errors, check.

    ``raises`` empty means a wire reader: it must never raise.
    """

    name: str
    inputs: st.SearchStrategy[tuple[Any, ...]]
    call: Callable[..., object]
    check: Callable[[tuple[Any, ...], object], None]
    raises: tuple[type[BaseException], ...] = field(default=())


TARGETS = [
    Target(
        "parse_endpoint",
        st.tuples(ENDPOINT_TEXT | ANY_VALUE),
        parse_endpoint,
        check_endpoint,
        (InvalidEndpoint,),
    ),
    Target(
        "same_endpoint",
        st.tuples(ENDPOINT_TEXT, ENDPOINT_TEXT),
        same_endpoint,
        check_same_endpoint,
        (InvalidEndpoint,),
    ),
    Target(
        "parse_hint_json",
        st.tuples(st.one_of(WIRE_TEXT, WIRE_BYTES, ANY_VALUE)),
        parse_hint_json,
        check_hint,
    ),
    Target("parse_hint_headers", st.tuples(HEADER_CONTAINERS), parse_hint_headers, check_hint),
    Target(
        "parse_hint_binary",
        st.tuples(st.one_of(BINARY_HINTS, ANY_VALUE)),
        parse_hint_binary,
        check_binary_hint,
    ),
    Target(
        "parse_epoch_decimal",
        st.tuples(EPOCH_TEXT | ANY_VALUE),
        parse_epoch_decimal,
        check_epoch_decimal,
    ),
    Target(
        "hint_from_wire",
        st.tuples(ENDPOINT_TEXT | ANY_VALUE, EPOCH_TEXT | ANY_VALUE),
        hint_from_wire,
        check_hint,
    ),
    Target(
        "leader_state_from_json",
        st.tuples(st.one_of(WIRE_TEXT, WIRE_BYTES, ANY_VALUE)),
        leader_state_from_json,
        check_state,
        (InvalidLeaderState,),
    ),
    Target(
        "LeaderCache.classify",
        st.tuples(st.booleans(), st.lists(WIRE_HINTS, min_size=1, max_size=6)),
        classify_wire_hints,
        check_outcomes,
    ),
    Target(
        "LeaderCache.compare_and_set_leader",
        st.tuples(ENDPOINT_TEXT | ANY_VALUE, INTEGERS | ANY_VALUE),
        cache_after_offer,
        check_seated,
        (InvalidEndpoint, InvalidEpoch),
    ),
    Target(
        "check_epoch",
        st.tuples(INTEGERS | ANY_VALUE),
        check_epoch,
        check_epoch_value,
        (InvalidEpoch,),
    ),
    Target(
        "epoch_to_wire",
        st.tuples(INTEGERS | ANY_VALUE),
        epoch_to_wire,
        check_wire_halves,
        (InvalidEpoch,),
    ),
    Target(
        "epoch_from_wire",
        st.tuples(INTEGERS | ANY_VALUE, INTEGERS | ANY_VALUE),
        epoch_from_wire,
        check_joined_epoch,
        (InvalidEpoch,),
    ),
    Target(
        "local election files",
        st.tuples(
            LOCAL_FILES,
            st.sampled_from([local_store.LocalLeaderRecord, local_store.LocalEpochCounter]),
        ),
        local_store.parse,
        check_local_file,
    ),
]


@pytest.fixture(scope="module", autouse=True)
def report_cases(request: pytest.FixtureRequest) -> Iterator[None]:
    """Add the number of cases run to the terminal summary."""
    yield
    total = sum(CASES.values())
    per_target = ", ".join(
        f"{name} {count}" + (f" (largest {LARGEST[name]} B)" if name in LARGEST else "")
        for name, count in sorted(CASES.items())
    )
    request.config.stash.setdefault(SUMMARY_LINES, []).append(
        f"fuzz: {total} cases run; budget {FUZZ_EXAMPLES} examples per target, "
        f"{TIME_BOUND:g}s per call ({per_target})"
    )


@pytest.mark.parametrize("target", TARGETS, ids=[target.name for target in TARGETS])
@FUZZ_SETTINGS
@given(data=st.data())
def test_parser_gives_a_valid_value_or_its_documented_error(
    target: Target, data: st.DataObject
) -> None:
    args = data.draw(target.inputs, label="args")
    started = time.perf_counter()
    try:
        result = target.call(*args)
    except target.raises as error:
        message = str(error)
        elapsed = time.perf_counter() - started
        assert len(message) <= MAX_MESSAGE, f"{target.name}: message of {len(message)} characters"
    else:
        elapsed = time.perf_counter() - started
        target.check(args, result)
    assert elapsed < TIME_BOUND, f"{target.name} took {elapsed:.3f}s"
    CASES[target.name] += 1
    LARGEST[target.name] = max(LARGEST[target.name], input_size(args))


def input_size(value: object, depth: int = 0) -> int:
    """Roughly how many bytes ``value`` holds (text, bytes and ints, through containers)."""
    match value:
        case str() | bytes() | bytearray():
            return len(value)
        case bool():
            return 1
        case int():
            return (value.bit_length() + 7) // 8
        case dict() if depth < 8:
            return sum(
                input_size(k, depth + 1) + input_size(v, depth + 1) for k, v in value.items()
            )
        case list() | tuple() if depth < 8:
            return sum(input_size(item, depth + 1) for item in value)
    return 0


ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(lambda address: ("v4", address)),
    st.ip_addresses(v=6).map(lambda address: ("v6", address)),
)


def spellings(kind: str, address: Any, port: int) -> list[str]:
    if kind == "v4":
        return [f"{address}:{port}", f"[::ffff:{address}]:{port}", f"[::FFFF:{address}]:{port}"]
    exploded = address.exploded
    return [
        f"[{address.compressed}]:{port}",
        f"[{exploded}]:{port}",
        f"[{exploded.upper()}]:{port}",
    ]


@FUZZ_SETTINGS
@given(address=ADDRESSES, port=st.integers(1, 65535), other_port=st.integers(1, 65535))
def test_spellings_of_one_address_are_the_same_endpoint(
    address: tuple[str, Any], port: int, other_port: int
) -> None:
    names = spellings(*address, port)
    for first in names:
        for second in names:
            assert same_endpoint(first, second), (first, second)
        if other_port != port:
            assert not same_endpoint(first, names[0].rsplit(":", 1)[0] + f":{other_port}")
    CASES["same_endpoint spellings"] += 1

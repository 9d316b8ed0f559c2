"""LeaderHint: values, JSON and header forms, and parsers that never raise on wire input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

import leaderwatch.hint
from leaderwatch.hint import (
    ENDPOINT_HEADER,
    EPOCH_HEADER,
    MALFORMED_HINT_RULES,
    MAX_EPOCH_DIGITS,
    LeaderHint,
    MalformedHint,
    hint_from_wire,
    parse_epoch_decimal,
    parse_hint_headers,
    parse_hint_json,
)

TOP = 2**128 - 1


def test_hint_is_a_frozen_value_with_payload_equality() -> None:
    hint = LeaderHint(leader_endpoint="node-b:9000", leader_epoch=7)
    assert hint == LeaderHint(leader_endpoint="node-b:9000", leader_epoch=7)
    assert hint != LeaderHint(leader_endpoint="node-b:9000", leader_epoch=8)
    assert hint != LeaderHint(leader_endpoint="node-c:9000", leader_epoch=7)
    assert hash(hint) == hash(LeaderHint(leader_endpoint="node-b:9000", leader_epoch=7))
    with pytest.raises(ValidationError):
        hint.leader_epoch = 8  # type: ignore[misc]
    match hint:
        case LeaderHint(endpoint, epoch):
            assert (endpoint, epoch) == ("node-b:9000", 7)


@pytest.mark.parametrize(
    ("endpoint", "rule_text"),
    [
        ("https://node-b:9000", "scheme"),
        ("node-b", "port"),
        ("node-b:0", "1-65535"),
        ("node b:9000", "whitespace"),
        ("::1:9000", "bracketed"),
        ("user@node-b:9000", "user-info"),
    ],
)
def test_hint_endpoint_follows_the_core_rules(endpoint: str, rule_text: str) -> None:
    with pytest.raises(ValidationError, match=rule_text):
        LeaderHint(leader_endpoint=endpoint)


@pytest.mark.parametrize("epoch", [-1, 2**128, True, "7", 7.0])
def test_hint_epoch_follows_the_core_rules(epoch: object) -> None:
    with pytest.raises(ValidationError):
        LeaderHint(leader_epoch=epoch)


HINTS = [
    LeaderHint(leader_endpoint="node-b:9000", leader_epoch=7),
    LeaderHint(leader_endpoint="[::1]:9000", leader_epoch=TOP),
    LeaderHint(leader_endpoint="10.0.0.7:50551"),
    LeaderHint(leader_epoch=0),
    LeaderHint(),
]


@pytest.mark.parametrize("hint", HINTS)
def test_json_and_header_forms_round_trip(hint: LeaderHint) -> None:
    assert parse_hint_json(hint.to_json()) == hint
    assert parse_hint_json(hint.to_json().encode()) == hint
    headers = hint.to_headers()
    if hint == LeaderHint():
        assert headers == {}
        assert parse_hint_headers(headers) is None
    else:
        assert parse_hint_headers(headers) == hint


def test_header_form_names_and_decimal_epoch() -> None:
    hint = LeaderHint(leader_endpoint="node-b:9000", leader_epoch=TOP)
    assert hint.to_headers() == {
        "leader-endpoint": "node-b:9000",
        "leader-epoch": "340282366920938463463374607431768211455",
    }
    assert (ENDPOINT_HEADER, EPOCH_HEADER) == ("leader-endpoint", "leader-epoch")


def test_header_parser_accepts_pairs_bytes_and_any_case() -> None:
    expected = LeaderHint(leader_endpoint="node-b:9000", leader_epoch=7)
    assert (
        parse_hint_headers([(b"Leader-Endpoint", b"node-b:9000"), (b"LEADER-EPOCH", b"7")])
        == expected
    )
    assert parse_hint_headers({"content-type": "text/plain"}) is None
    assert parse_hint_headers({"leader-epoch": "007"}) == LeaderHint(leader_epoch=7)


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "epoch_empty"),
        ("-1", "epoch_not_decimal"),
        ("+5", "epoch_not_decimal"),
        (" 5", "epoch_not_decimal"),
        ("5 ", "epoch_not_decimal"),
        ("5\n", "epoch_not_decimal"),
        ("0x10", "epoch_not_decimal"),
        ("1_000", "epoch_not_decimal"),
        ("1e3", "epoch_not_decimal"),
        ("٣", "epoch_not_decimal"),  # Arabic-Indic digit three: a digit, but not ASCII
        ("5.0", "epoch_not_decimal"),
        (str(2**128), "epoch_out_of_range"),
        ("9" * 39, "epoch_out_of_range"),
        ("1" * 40, "epoch_too_long"),
        ("1" * 10_000_000, "epoch_too_long"),
    ],
    ids=lambda value: value if len(value) <= 40 else f"{len(value)}-chars",
)
def test_bad_header_epochs_are_malformed_naming_the_rule(value: str, rule: str) -> None:
    result = parse_hint_headers({"leader-epoch": value})
    assert isinstance(result, MalformedHint)
    assert result.rule == rule
    assert len(result.reason) < 200


def test_epoch_bounds_in_header_form() -> None:
    assert parse_epoch_decimal(str(TOP)) == TOP
    assert parse_epoch_decimal("0") == 0
    assert MAX_EPOCH_DIGITS == len(str(TOP)) == 39


@pytest.mark.parametrize(
    ("headers", "rule"),
    [
        ({"leader-endpoint": ""}, "endpoint_invalid"),
        ({"leader-endpoint": "node-b"}, "endpoint_invalid"),
        ({"leader-endpoint": " node-b:9000"}, "endpoint_invalid"),
        ({"leader-endpoint": "node-b:9000/path"}, "endpoint_invalid"),
        ({"leader-endpoint": "x" * 10_000_000}, "endpoint_too_long"),
        ({"leader-endpoint": "https://node-b:9000"}, "endpoint_has_scheme"),
        ({"leader-endpoint": "node-b:9000", "leader-epoch": "-3"}, "epoch_not_decimal"),
        ([("leader-epoch", "1"), ("Leader-Epoch", "2")], "duplicate_header"),
        ({b"leader-endpoint": b"n\xc3\xb6de:9000"}, "header_not_ascii"),
        ({"leader-epoch": 5}, "header_not_text"),
    ],
)
def test_bad_headers_are_malformed_naming_the_rule(headers: object, rule: str) -> None:
    result = parse_hint_headers(headers)  # type: ignore[arg-type]
    assert isinstance(result, MalformedHint)
    assert result.rule == rule


def test_scheme_bearing_endpoint_keeps_the_wire_form_and_valid_epoch() -> None:
    result = parse_hint_headers({"leader-endpoint": "http://node-b:9000", "leader-epoch": "9"})
    assert result == MalformedHint(
        rule="endpoint_has_scheme",
        reason=result.reason if isinstance(result, MalformedHint) else "",
        wire_endpoint="http://node-b:9000",
        leader_epoch=9,
    )
    other = parse_hint_headers({"leader-endpoint": "node-b", "leader-epoch": "9"})
    assert isinstance(other, MalformedHint)
    assert other.wire_endpoint is None


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("", "json_invalid"),
        ("{", "json_invalid"),
        ("[1]", "json_not_object"),
        ("null", "json_not_object"),
        ('{"leader_epoch": 1, "leader_epoch": 2}', "json_duplicate_field"),
        ('{"leader_epoch": 1, "leader": "x"}', "json_unknown_field"),
        ('{"leader_epoch": "7"}', "epoch_not_integer"),
        ('{"leader_epoch": 7.0}', "epoch_not_integer"),
        ('{"leader_epoch": true}', "epoch_not_integer"),
        ('{"leader_epoch": -1}', "epoch_out_of_range"),
        (f'{{"leader_epoch": {2**128}}}', "epoch_out_of_range"),
        ('{"leader_endpoint": 9000}', "endpoint_not_string"),
        ('{"leader_endpoint": "node-b"}', "endpoint_invalid"),
        ('{"leader_endpoint": "https://node-b:9000"}', "endpoint_has_scheme"),
        ("[" * 100_000, "json_too_long"),
        (b"\xff\xfe", "json_invalid"),
    ],
    ids=lambda value: repr(value) if len(value) <= 50 else f"{len(value)}-chars",
)
def test_bad_json_is_malformed_naming_the_rule(text: str | bytes, rule: str) -> None:
    result = parse_hint_json(text)
    assert isinstance(result, MalformedHint)
    assert result.rule == rule


def test_hint_from_wire_checks_types() -> None:
    assert hint_from_wire("node-b:9000", "12") == LeaderHint(
        leader_endpoint="node-b:9000", leader_epoch=12
    )
    assert hint_from_wire(None, None) == LeaderHint()
    bad = hint_from_wire(b"node-b:9000", None)
    assert isinstance(bad, MalformedHint)
    assert bad.rule == "endpoint_not_string"


def test_huge_inputs_are_refused_by_their_length_before_anything_else() -> None:
    huge = "9" * 10_000_000
    results = [
        parse_hint_headers({"leader-epoch": huge}),
        parse_hint_headers({"leader-endpoint": huge}),
        parse_hint_json(huge),
    ]
    assert [r.rule for r in results if isinstance(r, MalformedHint)] == [
        "epoch_too_long",
        "endpoint_too_long",
        "json_too_long",
    ]
    assert all(len(r.reason) < 100 for r in results if isinstance(r, MalformedHint))


@given(st.one_of(st.text(max_size=60), st.binary(max_size=60)))
def test_header_parser_never_raises(value: str | bytes) -> None:
    for name in (ENDPOINT_HEADER, EPOCH_HEADER):
        result = parse_hint_headers({name: value})
        assert isinstance(result, LeaderHint | MalformedHint)


@given(st.text(max_size=200))
def test_json_parser_never_raises(text: str) -> None:
    assert isinstance(parse_hint_json(text), LeaderHint | MalformedHint)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(["leader_endpoint", "leader_epoch", "x"]), children, max_size=3
            )
        ),
        max_leaves=8,
    )
)
def test_json_parser_never_raises_on_any_json_document(document: object) -> None:
    assert isinstance(parse_hint_json(json.dumps(document)), LeaderHint | MalformedHint)


@pytest.mark.parametrize(
    ("headers", "rule"),
    [
        (None, "headers_not_container"),
        ("leader-epoch: 7", "headers_not_container"),
        (b"leader-epoch: 7", "headers_not_container"),
        (7, "headers_not_container"),
        (object(), "headers_not_container"),
        ([("leader-epoch", "7", "x")], "headers_not_pairs"),
        ([("leader-epoch",)], "headers_not_pairs"),
        (["ab"], "headers_not_pairs"),
        ([None], "headers_not_pairs"),
        ([7], "headers_not_pairs"),
        ([{"leader-epoch": "7"}], "headers_not_pairs"),
        ({7: "x"}, "header_not_text"),
        ([(None, "x")], "header_not_text"),
        ({"leader-epoch": None}, "header_not_text"),
        ({"leader-endpoint": ["node-b:9000"]}, "header_not_text"),
    ],
    ids=repr,
)
def test_malformed_header_containers_are_returned_not_raised(headers: object, rule: str) -> None:
    result = parse_hint_headers(headers)  # type: ignore[arg-type]
    assert isinstance(result, MalformedHint)
    assert result.rule == rule
    assert len(result.reason) < 200


def test_header_pairs_may_be_lists_and_named_tuples() -> None:
    assert parse_hint_headers([["leader-epoch", "7"]]) == LeaderHint(leader_epoch=7)  # type: ignore[list-item]


def test_every_rule_returned_is_listed_and_documented() -> None:
    source = Path(leaderwatch.hint.__file__).read_text()
    returned = set(re.findall(r'rule="([a-z_]+)"', source))
    assert returned == set(MALFORMED_HINT_RULES)
    docs = Path(__file__).resolve().parent.parent / "docs" / "serving-and-redirects.md"
    text = docs.read_text()
    assert [rule for rule in MALFORMED_HINT_RULES if f"`{rule}`" not in text] == []

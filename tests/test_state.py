"""LeaderState values, epochs and endpoints (DESIGN contracts 1-3)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from leaderwatch import (
    Follower,
    InvalidEndpoint,
    InvalidEpoch,
    InvalidLeaderState,
    Leader,
    LeaderwatchError,
    Unknown,
    epoch_from_wire,
    epoch_to_wire,
    leader_state_from_json,
    parse_endpoint,
)
from leaderwatch.state import MAX_LEADER_STATE_JSON_LENGTH, check_epoch, same_endpoint

EPOCHS = st.integers(min_value=0, max_value=2**128 - 1)


def test_equality_compares_variant_and_every_field() -> None:
    assert Leader(epoch=1) != Leader(epoch=2)
    assert Leader(epoch=3) == Leader(epoch=3)
    assert Follower(leader_endpoint="a:1", leader_epoch=4) != Follower(
        leader_endpoint="a:1", leader_epoch=5
    )
    assert Follower(leader_endpoint="a:1", leader_epoch=4) != Follower(
        leader_endpoint="b:1", leader_epoch=4
    )
    assert Follower() == Follower(leader_endpoint=None, leader_epoch=None)
    assert Unknown() == Unknown()
    assert Follower() != Unknown()
    assert Leader(epoch=0) != Follower(leader_epoch=0)


def test_values_are_immutable_and_hashable() -> None:
    leader = Leader(epoch=7)
    with pytest.raises(ValidationError):
        leader.epoch = 8  # type: ignore[misc]
    states = {Leader(epoch=7), Leader(epoch=7), Follower(), Follower(), Unknown()}
    assert states == {Leader(epoch=7), Follower(), Unknown()}
    assert hash(Follower(leader_endpoint="a:1", leader_epoch=2)) == hash(
        Follower(leader_endpoint="a:1", leader_epoch=2)
    )


def describe(state: Leader | Follower | Unknown) -> str:
    match state:
        case Leader(epoch=epoch):
            return f"leader@{epoch}"
        case Follower(leader_endpoint=None):
            return "follower of nobody known"
        case Follower(leader_endpoint=endpoint, leader_epoch=epoch):
            return f"follower of {endpoint}@{epoch}"
        case Unknown():
            return "unknown"
    raise AssertionError("unreachable")


def test_match_with_keyword_and_positional_patterns() -> None:
    assert describe(Leader(epoch=7)) == "leader@7"
    assert describe(Follower(leader_endpoint="10.0.0.7:50551", leader_epoch=7)) == (
        "follower of 10.0.0.7:50551@7"
    )
    assert describe(Follower()) == "follower of nobody known"
    assert describe(Unknown()) == "unknown"
    match Leader(epoch=9):
        case Leader(epoch):
            assert epoch == 9


@pytest.mark.parametrize(
    "state",
    [
        Leader(epoch=0),
        Leader(epoch=2**128 - 1),
        Follower(),
        Follower(leader_endpoint="[2001:db8::1]:443", leader_epoch=2**64),
        Follower(leader_endpoint="leader:9000"),
        Unknown(),
    ],
)
def test_json_round_trip_with_discriminator(state: Leader | Follower | Unknown) -> None:
    text = state.model_dump_json()
    assert '"kind"' in text
    back = leader_state_from_json(text)
    assert back == state
    assert type(back) is type(state)


@pytest.mark.parametrize(
    "text",
    [
        '{"kind": "candidate", "epoch": 1}',
        '{"kind": "leader", "epoch": 1, "extra": true}',
        '{"epoch": 1}',
        '{"kind": "leader", "epoch": "1"}',
        '{"kind": "leader", "epoch": -1}',
        '{"kind": "follower", "leader_endpoint": "http://a:1"}',
        "not json",
    ],
)
def test_json_rejects_malformed(text: str) -> None:
    with pytest.raises(ValidationError):
        leader_state_from_json(text)


@given(EPOCHS)
def test_json_round_trip_any_epoch(epoch: int) -> None:
    assert leader_state_from_json(Leader(epoch=epoch).model_dump_json()) == Leader(epoch=epoch)


@pytest.mark.parametrize("bad", [-1, 2**128, 1.0, "7", True])
def test_epoch_out_of_range_or_wrong_type_fails_at_construction(bad: object) -> None:
    with pytest.raises(ValidationError):
        Leader(epoch=bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Follower(leader_epoch=bad)  # type: ignore[arg-type]


@given(EPOCHS)
def test_epoch_wire_round_trip(epoch: int) -> None:
    hi, lo = epoch_to_wire(epoch)
    assert 0 <= hi < 2**64
    assert 0 <= lo < 2**64
    assert epoch_from_wire(hi, lo) == epoch


@given(EPOCHS, EPOCHS)
def test_epoch_wire_order_equals_numeric_order(a: int, b: int) -> None:
    assert (epoch_to_wire(a) < epoch_to_wire(b)) == (a < b)
    assert (epoch_to_wire(a) == epoch_to_wire(b)) == (a == b)


def test_epoch_wire_known_values() -> None:
    assert epoch_to_wire(0) == (0, 0)
    assert epoch_to_wire(2**64) == (1, 0)
    assert epoch_to_wire(2**128 - 1) == (2**64 - 1, 2**64 - 1)


@pytest.mark.parametrize("bad", [-1, 2**128, True])
def test_epoch_to_wire_refuses_out_of_range(bad: int) -> None:
    with pytest.raises(InvalidEpoch):
        epoch_to_wire(bad)


@pytest.mark.parametrize(("hi", "lo"), [(-1, 0), (0, -1), (2**64, 0), (0, 2**64)])
def test_epoch_from_wire_refuses_out_of_range_halves(hi: int, lo: int) -> None:
    with pytest.raises(InvalidEpoch):
        epoch_from_wire(hi, lo)


VALID_ENDPOINTS = [
    "10.0.0.7:50551",
    "leader:9000",
    "tso-0.tso.default.svc.cluster.local:2379",
    "my_service:80",
    "[::1]:9000",
    "[2001:db8::1]:443",
    "a:1",
    "a:65535",
]


@pytest.mark.parametrize("endpoint", VALID_ENDPOINTS)
def test_valid_endpoints_pass_unchanged(endpoint: str) -> None:
    assert parse_endpoint(endpoint) == endpoint
    assert Follower(leader_endpoint=endpoint).leader_endpoint == endpoint


INVALID_ENDPOINTS = [
    ("http://a:1", "scheme"),
    ("HTTPS://a:1", "scheme"),
    ("grpc://leader:9000", "scheme"),
    ("leader", "missing its port"),
    ("leader:", "port"),
    ("leader:0", "1-65535"),
    ("leader:65536", "1-65535"),
    ("leader:http", "decimal"),
    ("leader:+80", "decimal"),
    ("leader:-1", "decimal"),
    ("leader:09000", "leading zeros"),
    ("leader:00080", "leading zeros"),
    (":9000", "host must not be empty"),
    ("", "empty"),
    ("leader:9000/path", "path"),
    ("leader:9000?x=1", "query"),
    ("leader:9000#frag", "fragment"),
    ("user@leader:9000", "user-info"),
    ("user:pw@leader:9000", "user-info"),
    ("lead er:9000", "whitespace"),
    (" leader:9000", "whitespace"),
    ("leader:9000\t", "whitespace"),
    ("leader:9000\r\n", "control"),
    ("leader\x00:9000", "control"),
    ("leader\x7f:9000", "control"),
    ("::1:9000", "bracketed"),
    ("2001:db8::1:443", "bracketed"),
    ("[::1:9000", "unclosed"),
    ("[::1]", "port"),
    ("[::1]9000", "port"),
    ("[not-an-ip]:9000", "IPv6"),
    ("[fe80::1%eth0]:9000", "zone"),
    ("::1]:9000", "']'"),
    ("300.1.1.1:80", "IPv4"),
    ("1.2.3:80", "IPv4"),
    ("-leader:80", "DNS name"),
    ("leader..local:80", "DNS name"),
    ("héllo:80", "DNS name"),
    ("a" * 64 + ":80", "DNS name"),
]


@pytest.mark.parametrize(("endpoint", "rule"), INVALID_ENDPOINTS)
def test_invalid_endpoints_name_the_rule(endpoint: str, rule: str) -> None:
    with pytest.raises(InvalidEndpoint, match=rule) as raised:
        parse_endpoint(endpoint)
    assert isinstance(raised.value, ValueError)


def test_scheme_error_suggests_the_bare_endpoint() -> None:
    with pytest.raises(InvalidEndpoint) as raised:
        parse_endpoint("http://a:1")
    assert str(raised.value) == "endpoint must not carry a scheme (got 'http://a:1'); use 'a:1'"


@pytest.mark.parametrize("endpoint", ["https://a:1", "http://leader:9000", "leader"])
def test_follower_refuses_bad_endpoint_at_construction(endpoint: str) -> None:
    with pytest.raises(ValidationError, match="endpoint"):
        Follower(leader_endpoint=endpoint)


def test_endpoint_must_be_a_string() -> None:
    with pytest.raises(InvalidEndpoint, match="string"):
        parse_endpoint(9000)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Follower(leader_endpoint=9000)  # type: ignore[arg-type]


def test_huge_endpoint_is_refused_by_its_length_before_any_scan() -> None:
    # 10 MB with a scheme, whitespace and a NUL at the end: only the length
    # rule may answer, which proves nothing scanned the text first.
    huge = "a" * (10 * 1024 * 1024) + "://x y\x00:80"
    with pytest.raises(InvalidEndpoint, match=r"too long \(10485770 characters; at most 259\)"):
        parse_endpoint(huge)
    with pytest.raises(ValidationError, match="too long"):
        Follower(leader_endpoint=huge)


def test_same_endpoint_compares_host_and_port_by_value() -> None:
    assert same_endpoint("[0:0::1]:9000", "[::1]:9000")
    assert same_endpoint("Leader.Example:80", "leader.example:80")
    assert not same_endpoint("leader:80", "leader:81")
    assert not same_endpoint("10.0.0.1:80", "10.0.0.2:80")
    with pytest.raises(InvalidEndpoint):
        same_endpoint("http://a:1", "a:1")


def test_longest_dns_endpoint_is_accepted() -> None:
    host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(host) == 253
    assert parse_endpoint(f"{host}:65535") == f"{host}:65535"
    with pytest.raises(InvalidEndpoint):
        parse_endpoint(f"{host}x:65535")


# --- issue 11: hostile input -------------------------------------------------------------------

HUGE = 10**5000  # str() of it exceeds Python's 4300-digit int-to-str limit


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: check_epoch(HUGE), id="check_epoch"),
        pytest.param(lambda: check_epoch(-HUGE), id="check_epoch-negative"),
        pytest.param(lambda: epoch_to_wire(HUGE), id="epoch_to_wire"),
        pytest.param(lambda: epoch_from_wire(HUGE, 0), id="epoch_from_wire-hi"),
        pytest.param(lambda: epoch_from_wire(0, -HUGE), id="epoch_from_wire-lo"),
    ],
)
def test_huge_integer_epoch_is_invalid_epoch_and_not_printed(call: Callable[[], object]) -> None:
    with pytest.raises(InvalidEpoch, match="bits") as raised:
        call()
    assert len(str(raised.value)) < 200


def test_out_of_range_epoch_of_normal_size_is_still_shown() -> None:
    with pytest.raises(InvalidEpoch, match=str(2**128)):
        check_epoch(2**128)


def test_leader_state_json_refuses_duplicate_keys() -> None:
    with pytest.raises(InvalidLeaderState, match="repeats") as raised:
        leader_state_from_json('{"kind": "leader", "epoch": 1, "epoch": 2}')
    assert [error["type"] for error in raised.value.errors()] == ["json_duplicate_field"]
    with pytest.raises(InvalidLeaderState, match="repeats"):
        leader_state_from_json('{"kind": "follower", "kind": "leader", "epoch": 1}')


def test_leader_state_json_is_bounded_before_parsing() -> None:
    padded = '{"kind": "unknown"}' + " " * MAX_LEADER_STATE_JSON_LENGTH
    with pytest.raises(InvalidLeaderState, match="at most") as raised:
        leader_state_from_json(padded)
    assert [error["type"] for error in raised.value.errors()] == ["json_too_long"]
    huge = "[" * (10 * 1024 * 1024)
    with pytest.raises(InvalidLeaderState, match=r"10485760 characters"):
        leader_state_from_json(huge)
    with pytest.raises(InvalidLeaderState, match="at most"):
        leader_state_from_json(padded.encode())
    host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    longest = Follower(leader_endpoint=f"{host}:65535", leader_epoch=2**128 - 1)
    assert leader_state_from_json(longest.model_dump_json(indent=8)) == longest


@pytest.mark.parametrize(
    "text",
    [
        '{"kind": "candidate", "epoch": 1}',
        '{"kind": "leader", "epoch": 1, "extra": true}',
        '{"kind": "leader", "epoch": 1, "epoch": 1}',
        "not json",
        "",
        b"\xff",
    ],
)
def test_leader_state_json_errors_are_one_specific_type(text: str | bytes) -> None:
    with pytest.raises(InvalidLeaderState) as raised:
        leader_state_from_json(text)
    assert isinstance(raised.value, LeaderwatchError)
    assert isinstance(raised.value, ValidationError)
    assert isinstance(raised.value, ValueError)


def test_leader_state_json_refuses_other_types() -> None:
    with pytest.raises(InvalidLeaderState, match="str or bytes"):
        leader_state_from_json(None)  # type: ignore[arg-type]


NON_CANONICAL_NUMERIC_HOSTS = [
    "0x7f.1",
    "0x7f000001",
    "0X7F000001",
    "0x7f.0.0.1",
    "127.1",
    "127.0.1",
    "0177.0.0.1",
    "2130706433",
    "1.2.3",
    "127.0.0.1.",
    "1.2.3.4.5",
    "08.0.0.1",
    "example.123",
    "example.0x10",
    "leader.0x",
    "0x",
    "1.2.3.256",
]


@pytest.mark.parametrize("host", NON_CANONICAL_NUMERIC_HOSTS)
def test_numeric_hosts_must_be_canonical_dotted_ipv4(host: str) -> None:
    with pytest.raises(InvalidEndpoint, match="IPv4") as raised:
        parse_endpoint(f"{host}:9000")
    assert "dotted" in str(raised.value)


@pytest.mark.parametrize(
    "endpoint",
    ["127.0.0.1:9000", "0.0.0.0:1", "255.255.255.255:80", "123.example:80", "example.0xg:80"],
)
def test_numeric_looking_but_valid_hosts_pass(endpoint: str) -> None:
    assert parse_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    "mapped",
    ["[::ffff:127.0.0.1]:9000", "[::FFFF:7f00:1]:9000", "[0:0:0:0:0:ffff:127.0.0.1]:9000"],
)
def test_ipv4_mapped_ipv6_is_the_same_endpoint_as_its_ipv4_form(mapped: str) -> None:
    assert same_endpoint(mapped, "127.0.0.1:9000")
    assert same_endpoint("127.0.0.1:9000", mapped)
    assert not same_endpoint(mapped, "127.0.0.1:9001")
    assert not same_endpoint(mapped, "127.0.0.2:9000")
    assert not same_endpoint("[::127.0.0.1]:9000", "127.0.0.1:9000")

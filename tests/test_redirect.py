"""decide(): serve, redirect with a hint, or "no leader yet" — never a hint naming this node."""

from __future__ import annotations

import pytest

import leaderwatch.client
import leaderwatch.redirect
from leaderwatch.redirect import LeaderHint, NoLeaderYet, Redirect, Serve, decide
from leaderwatch.serving import NotServing, Serving
from leaderwatch.state import InvalidEndpoint

SELF = "node-a:9000"
B = "node-b:9000"

CASES = [
    (Serving(epoch=5), None, Serve(epoch=5)),
    (Serving(epoch=5), SELF, Serve(epoch=5)),
    (
        NotServing(leader_endpoint=B, leader_epoch=7),
        SELF,
        Redirect(hint=LeaderHint(leader_endpoint=B, leader_epoch=7)),
    ),
    (
        NotServing(leader_endpoint=B),
        None,
        Redirect(hint=LeaderHint(leader_endpoint=B, leader_epoch=None)),
    ),
    (NotServing(leader_endpoint=SELF, leader_epoch=7), SELF, NoLeaderYet(leader_epoch=7)),
    (NotServing(leader_endpoint="NODE-A:9000", leader_epoch=7), SELF, NoLeaderYet(leader_epoch=7)),
    (NotServing(leader_endpoint=SELF), SELF, NoLeaderYet()),
    (NotServing(leader_epoch=8), SELF, NoLeaderYet(leader_epoch=8)),
    (NotServing(), None, NoLeaderYet()),
    (
        NotServing(leader_endpoint="[::1]:9000", leader_epoch=1),
        "[::1]:9001",
        Redirect(hint=LeaderHint(leader_endpoint="[::1]:9000", leader_epoch=1)),
    ),
]


@pytest.mark.parametrize(("gate", "self_endpoint", "expected"), CASES)
def test_decide(gate: Serving | NotServing, self_endpoint: str | None, expected: object) -> None:
    assert decide(gate, self_endpoint=self_endpoint) == expected


@pytest.mark.parametrize(
    "gate",
    [gate for gate, _, _ in CASES if isinstance(gate, NotServing) and gate.leader_endpoint],
)
def test_never_redirects_to_self(gate: NotServing) -> None:
    assert gate.leader_endpoint is not None
    for spelling in (gate.leader_endpoint, gate.leader_endpoint.upper()):
        decision = decide(gate, self_endpoint=spelling)
        assert decision == NoLeaderYet(leader_epoch=gate.leader_epoch)


@pytest.mark.parametrize(
    ("leader", "me"),
    [
        ("[0:0::1]:9000", "[::1]:9000"),
        ("[2001:DB8::1]:443", "[2001:db8:0:0:0:0:0:1]:443"),
        ("Node-A.Example:9000", "node-a.example:9000"),
    ],
)
def test_never_redirects_to_self_however_spelled(leader: str, me: str) -> None:
    decision = decide(NotServing(leader_endpoint=leader, leader_epoch=3), self_endpoint=me)
    assert decision == NoLeaderYet(leader_epoch=3)


def test_self_endpoint_must_be_valid() -> None:
    with pytest.raises(InvalidEndpoint, match="scheme"):
        decide(NotServing(leader_endpoint=B), self_endpoint="http://node-a:9000")
    with pytest.raises(InvalidEndpoint, match="port"):
        decide(Serving(epoch=1), self_endpoint="node-a")


def test_decide_refuses_other_values() -> None:
    with pytest.raises(TypeError, match="Serving or NotServing"):
        decide("serving")  # type: ignore[arg-type]


def test_redirect_hint_has_header_and_json_forms() -> None:
    decision = decide(NotServing(leader_endpoint=B, leader_epoch=7), self_endpoint=SELF)
    assert isinstance(decision, Redirect)
    assert decision.hint.to_headers() == {"leader-endpoint": B, "leader-epoch": "7"}
    assert decision.hint.to_json() == '{"leader_endpoint":"node-b:9000","leader_epoch":7}'


def test_client_and_redirect_share_the_no_leader_yet_value() -> None:
    assert leaderwatch.redirect.NoLeaderYet is leaderwatch.client.NoLeaderYet
    assert set(leaderwatch.redirect.__all__) >= {
        "decide",
        "Serve",
        "Redirect",
        "NoLeaderYet",
        "LeaderHint",
    }


@pytest.mark.parametrize(
    ("leader", "me"),
    [
        ("[::ffff:127.0.0.1]:9000", "127.0.0.1:9000"),
        ("127.0.0.1:9000", "[::ffff:127.0.0.1]:9000"),
        ("[::ffff:7f00:1]:9000", "127.0.0.1:9000"),
    ],
)
def test_never_redirects_to_self_through_an_ipv4_mapped_ipv6_spelling(leader: str, me: str) -> None:
    decision = decide(NotServing(leader_endpoint=leader, leader_epoch=3), self_endpoint=me)
    assert decision == NoLeaderYet(leader_epoch=3)


def test_numeric_host_spellings_cannot_reach_the_gate() -> None:
    with pytest.raises(InvalidEndpoint, match="IPv4"):
        decide(NotServing(leader_endpoint="127.0.0.1:9000"), self_endpoint="0x7f.1:9000")

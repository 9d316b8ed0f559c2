"""The PostgreSQL driver's decision (what to publish, whether this node leads), without a server."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.postgres._decision import Decision, decide
from leaderwatch.drivers.postgres._rows import Row, RowView
from leaderwatch.drivers.postgres._tenure import Tenure
from leaderwatch.state import Follower, Leader, LeaderState, Unknown

NOW = 100.0
OWN = "10.0.0.1:7001"
OTHER = "10.0.0.2:7002"
MINE = uuid.UUID(int=1)
THEIRS = uuid.UUID(int=2)
TIMING = LeaseTiming.of(10, 2.0)  # proof window 8 s


def tenure(epoch: int = 7, *, sent: float = NOW - 1.0, abandoned: bool = False) -> Tenure:
    held = Tenure(MINE, epoch, sent, TIMING)
    held.abandoned = abandoned
    return held


def view(
    epoch: int = 7,
    token: uuid.UUID | None = THEIRS,
    endpoint: str | None = OTHER,
    *,
    remaining: float = 5.0,
    sent: float = NOW - 0.5,
) -> RowView:
    row = Row(
        epoch=epoch,
        holder_endpoint=endpoint,
        holder_node_id="n",
        holder_token=token,
        lease_remaining=remaining,
    )
    return RowView(row, endpoint, sent)


def run(**overrides: Any) -> Decision:
    inputs: dict[str, Any] = {
        "now": NOW,
        "tenure": None,
        "campaigning": True,
        "view": view(),
        "contact_until": NOW + 5.0,
        "own_tokens": {MINE},
        "own_endpoint": OWN,
        "high_water": None,
        "epoch_seen": (7, THEIRS),
    }
    inputs.update(overrides)
    return decide(**inputs)


LEADER = Leader(epoch=7)
U = Unknown()

CASES: list[tuple[str, dict[str, Any], LeaderState, str]] = [
    ("proven tenure leads", {"tenure": tenure(), "view": view(token=MINE)}, LEADER, "leading"),
    (
        "proof outlives database silence",
        {"tenure": tenure(), "contact_until": NOW - 1.0},
        LEADER,
        "leading",
    ),
    (
        "proof ran out at exactly now",
        {"tenure": tenure(sent=NOW - TIMING.proof_window), "view": view(token=MINE)},
        U,
        "own_tenure",
    ),
    (
        "abandoned tenure never leads",
        {"tenure": tenure(abandoned=True), "view": view(token=MINE, endpoint=OWN)},
        U,
        "own_tenure",
    ),
    (
        "resigned node never leads",
        {"tenure": tenure(), "campaigning": False, "view": view(token=MINE)},
        U,
        "own_tenure",
    ),
    ("database silent", {"contact_until": NOW}, U, "no_contact"),
    ("no row", {"view": None}, U, "no_row"),
    ("row lease ran out", {"view": view(remaining=0.5, sent=NOW - 0.5)}, U, "lease_expired"),
    ("own earlier tenure in the row", {"view": view(token=MINE)}, U, "own_tenure"),
    ("row names this node's endpoint", {"view": view(endpoint=OWN)}, U, "own_endpoint"),
    ("row below the high-water mark", {"high_water": 8}, U, "below_high_water"),
    (
        "another holder at the highest epoch seen",
        {"epoch_seen": (7, uuid.UUID(int=3))},
        U,
        "other_holder_at_seen_epoch",
    ),
    (
        "follows a live row at the high-water mark",
        {"high_water": 7},
        Follower(leader_endpoint=OTHER, leader_epoch=7),
        "following",
    ),
    (
        "follows with no hint when the endpoint is invalid",
        {"view": view(endpoint=None)},
        Follower(leader_endpoint=None, leader_epoch=7),
        "following",
    ),
    (
        "an observer follows a row naming any endpoint",
        {"own_endpoint": None, "own_tokens": set(), "view": view(endpoint=OWN)},
        Follower(leader_endpoint=OWN, leader_epoch=7),
        "following",
    ),
    (
        "a held but expired tenure falls through to the row",
        {"tenure": tenure(sent=NOW - 20.0)},
        Follower(leader_endpoint=OTHER, leader_epoch=7),
        "following",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "state", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decision_table(overrides: dict[str, Any], state: LeaderState, reason: str) -> None:
    decision = run(**overrides)
    assert decision.state == state
    assert decision.reason == reason


@given(
    now=st.floats(min_value=0, max_value=1e6),
    sent=st.floats(min_value=0, max_value=1e6),
    epoch=st.integers(min_value=0, max_value=2**62),
    campaigning=st.booleans(),
    abandoned=st.booleans(),
    contact_until=st.floats(allow_nan=False) | st.just(-math.inf),
)
def test_leads_only_on_its_own_proven_tenure(
    now: float, sent: float, epoch: int, campaigning: bool, abandoned: bool, contact_until: float
) -> None:
    held = tenure(epoch, sent=sent, abandoned=abandoned)
    decision = run(
        now=now,
        tenure=held,
        campaigning=campaigning,
        contact_until=contact_until,
        view=view(epoch=epoch, token=MINE, endpoint=OWN, sent=now),
    )
    leads = campaigning and not abandoned and now < held.proven_until
    assert (decision.state == Leader(epoch=epoch)) is leads
    if not leads:
        assert decision.state == Unknown()

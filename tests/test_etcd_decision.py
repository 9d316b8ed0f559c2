"""The etcd driver's decision (what to publish, whether this node leads), without etcd."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leaderwatch.drivers.etcd._campaign import CampaignStanding
from leaderwatch.drivers.etcd._decision import Decision, decide, own_key_gone
from leaderwatch.drivers.etcd._observer import LeaderKey, LeaderRead
from leaderwatch.state import Follower, Leader, LeaderState, Unknown

NOW = 100.0
OWN = "10.0.0.1:7001"
OTHER = "10.0.0.2:7002"
MINE = b"e/1a"
THEIRS = b"e/2b"
LATER = b"e/3c"
WAITING = CampaignStanding(key=LATER, create_revision=9)


def read(
    key: bytes | None = MINE,
    create_revision: int = 5,
    endpoint: str | None = OWN,
    *,
    revision: int = 20,
    sent: float = NOW - 0.1,
) -> LeaderRead:
    leader = (
        None
        if key is None
        else LeaderKey(key=key, create_revision=create_revision, endpoint=endpoint)
    )
    return LeaderRead(leader=leader, revision=revision, sent=sent)


def mine(won_at: int | None = 10) -> CampaignStanding:
    return CampaignStanding(key=MINE, create_revision=5, won_at=won_at)


def decision(**changes: Any) -> Decision:
    """``decide`` for a node that leads with a valid proof, with ``changes`` applied."""
    inputs: dict[str, Any] = {
        "now": NOW,
        "read": read(),
        "contact_until": NOW + 1,
        "campaign": mine(),
        "proven_until": NOW + 1,
        "own_endpoint": OWN,
        "high_water": 5,
        "high_water_at": NOW - 5,
    }
    inputs.update(changes)
    return decide(**inputs)


CASES: list[tuple[str, dict[str, Any], LeaderState, str]] = [
    ("leader while the proof is valid", {}, Leader(epoch=5), "leading"),
    (
        "leader before anything was published",
        {"high_water": None, "high_water_at": -math.inf},
        Leader(epoch=5),
        "leading",
    ),
    (
        "a leader's proof, not contact, bounds it",
        {"contact_until": NOW - 1},
        Leader(epoch=5),
        "leading",
    ),
    (
        "a read older than the win cannot unseat the leader",
        {"read": read(THEIRS, 3, OTHER, revision=9), "high_water": None},
        Leader(epoch=5),
        "leading",
    ),
    ("Unknown at proof expiry", {"proven_until": NOW}, Unknown(), "own_key_unproven"),
    ("Unknown after proof expiry", {"proven_until": NOW - 0.5}, Unknown(), "own_key_unproven"),
    (
        "a lease etcd reported gone proves nothing",
        {"proven_until": -math.inf},
        Unknown(),
        "own_key_unproven",
    ),
    (
        "own key leads but the campaign has not proven it yet",
        {"campaign": mine(won_at=None)},
        Unknown(),
        "own_key_unproven",
    ),
    (
        "own key gone after the win: follow the successor",
        {"read": read(LATER, 8, OTHER, revision=11)},
        Follower(leader_endpoint=OTHER, leader_epoch=8),
        "following",
    ),
    (
        "own key gone after the win, no candidate left",
        {"read": read(None, revision=10)},
        Unknown(),
        "no_candidate",
    ),
    (
        "own abandoned key (not campaigning) never becomes a hint to itself",
        {"campaign": None, "proven_until": -math.inf},
        Unknown(),
        "own_abandoned_key",
    ),
    (
        "own abandoned key ahead of a new campaign",
        {"campaign": WAITING, "read": read(THEIRS, 5)},
        Unknown(),
        "own_abandoned_key",
    ),
    (
        "invalid leader endpoint gives Follower(None, epoch)",
        {"campaign": None, "read": read(THEIRS, 7, None)},
        Follower(leader_endpoint=None, leader_epoch=7),
        "following",
    ),
    (
        "an observer follows the leader",
        {"campaign": None, "own_endpoint": None, "read": read(THEIRS, 7, OTHER)},
        Follower(leader_endpoint=OTHER, leader_epoch=7),
        "following",
    ),
    (
        "a waiting candidate follows the leader",
        {"campaign": WAITING, "read": read(THEIRS, 7, OTHER)},
        Follower(leader_endpoint=OTHER, leader_epoch=7),
        "following",
    ),
    (
        "a leader at the high-water mark is followed",
        {"campaign": None, "read": read(THEIRS, 7, OTHER), "high_water": 7},
        Follower(leader_endpoint=OTHER, leader_epoch=7),
        "following",
    ),
    (
        "epoch behind the high-water mark, read sent after it: etcd went back",
        {"campaign": None, "read": read(THEIRS, 6, OTHER, sent=NOW - 0.1), "high_water": 7},
        Unknown(),
        "epoch_behind",
    ),
    (
        "epoch behind the high-water mark, read sent before it: merely stale",
        {
            "campaign": None,
            "read": read(THEIRS, 6, OTHER, sent=NOW - 6),
            "high_water": 7,
            "high_water_at": NOW - 5,
        },
        Unknown(),
        "stale_read",
    ),
    (
        "no contact with etcd",
        {"campaign": None, "read": read(THEIRS, 7, OTHER), "contact_until": NOW},
        Unknown(),
        "no_contact",
    ),
    (
        "no contact, not even leading on a valid-looking key of its own",
        {"campaign": mine(won_at=None), "contact_until": NOW - 1},
        Unknown(),
        "no_contact",
    ),
    ("no candidate", {"campaign": None, "read": read(None)}, Unknown(), "no_candidate"),
]


@pytest.mark.parametrize(
    ("changes", "state", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide(changes: dict[str, Any], state: LeaderState, reason: str) -> None:
    assert decision(**changes) == Decision(state=state, reason=reason)


@pytest.mark.parametrize(
    ("campaign", "seen", "gone"),
    [
        (None, read(None), False),
        (mine(won_at=None), read(None), False),  # not won: the campaign's own check decides
        (mine(), read(), False),
        (mine(), read(THEIRS, 8, OTHER, revision=10), True),
        (mine(), read(None, revision=10), True),
        (mine(), read(THEIRS, 3, OTHER, revision=9), False),  # older than the win
    ],
)
def test_own_key_gone(campaign: CampaignStanding | None, seen: LeaderRead, gone: bool) -> None:
    assert own_key_gone(campaign, seen) is gone


instants = st.floats(min_value=0, max_value=200, allow_nan=False)
revisions = st.integers(min_value=1, max_value=50)


@given(
    now=instants,
    proven_until=instants,
    contact_until=instants,
    won_at=st.none() | revisions,
    leader_key=st.sampled_from([None, MINE, THEIRS]),
    leader_revision=revisions,
    endpoint=st.sampled_from([None, OWN, OTHER]),
    read_revision=revisions,
    high_water=st.none() | revisions,
    high_water_at=instants,
    sent=instants,
)
def test_leads_only_on_a_won_campaign_with_a_valid_proof(
    now: float,
    proven_until: float,
    contact_until: float,
    won_at: int | None,
    leader_key: bytes | None,
    leader_revision: int,
    endpoint: str | None,
    read_revision: int,
    high_water: int | None,
    high_water_at: float,
    sent: float,
) -> None:
    campaign = CampaignStanding(key=MINE, create_revision=5, won_at=won_at)
    seen = read(leader_key, leader_revision, endpoint, revision=read_revision, sent=sent)
    result = decide(
        now=now,
        read=seen,
        contact_until=contact_until,
        campaign=campaign,
        proven_until=proven_until,
        own_endpoint=OWN,
        high_water=high_water,
        high_water_at=high_water_at,
    )
    match result.state:
        case Leader(epoch=epoch):
            assert epoch == campaign.create_revision
            assert won_at is not None
            assert now < proven_until
            assert not own_key_gone(campaign, seen)
        case Follower(leader_endpoint=hint, leader_epoch=epoch):
            assert now < contact_until
            assert hint != OWN  # never a hint naming this node
            assert high_water is None or (epoch is not None and epoch >= high_water)
            assert seen.leader is not None
            assert seen.leader.key != MINE
        case Unknown():
            pass

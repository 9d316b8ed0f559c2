"""The one place where the etcd driver decides what it publishes, and whether it leads.

:func:`decide` is a pure function of what the driver's parts know: the last
read of the leader key, this node's campaign, its lease proof, the clock,
when etcd last answered, and the node's epoch high-water mark.
"""

from __future__ import annotations

from typing import Literal

from leaderwatch._value import FrozenValue
from leaderwatch.drivers.etcd._campaign import CampaignStanding
from leaderwatch.drivers.etcd._observer import LeaderRead
from leaderwatch.state import Follower, Leader, LeaderState, Unknown

__all__ = ["Decision", "Reason", "decide", "own_key_gone"]

Reason = Literal[
    "leading",
    "no_contact",
    "no_candidate",
    "own_key_unproven",
    "own_abandoned_key",
    "stale_read",
    "epoch_behind",
    "following",
]
"""Why :func:`decide` chose its state (see its table)."""


class Decision(FrozenValue):
    """The state to publish, and why."""

    state: LeaderState
    reason: Reason


def own_key_gone(campaign: CampaignStanding | None, read: LeaderRead) -> bool:
    """Whether ``read`` proves that this node's *winning* key no longer leads.

    True when the campaign won at revision ``w`` and a read answered at a
    revision ``>= w`` shows another leader key, or none. A read older than
    the win proves nothing: it may predate it.
    """
    return (
        campaign is not None
        and campaign.won_at is not None
        and read.revision >= campaign.won_at
        and (read.leader is None or read.leader.key != campaign.key)
    )


def decide(
    *,
    now: float,
    read: LeaderRead,
    contact_until: float,
    campaign: CampaignStanding | None,
    proven_until: float,
    own_endpoint: str | None,
    high_water: int | None,
    high_water_at: float,
) -> Decision:
    """The leadership value to publish now: the first rule that matches decides.

    Inputs: ``read`` is the last read of the leader key; ``contact_until``
    the instant until which etcd's answers count as current; ``campaign``
    this node's key (``None`` when not campaigning); ``proven_until`` the
    lease proof of that campaign; ``own_endpoint`` this node's endpoint;
    ``high_water`` the highest epoch this node published and
    ``high_water_at`` when it did. Instants are ``anyio.current_time()``.

    1. ``leading``: ``Leader(campaign.create_revision)`` when the campaign
       won, ``now < proven_until``, and no read at or after the win shows
       another leader (:func:`own_key_gone`). ``contact_until`` does not
       apply: the lease proof is the stricter bound.
    2. ``no_contact``: ``Unknown()`` when ``now >= contact_until``.
    3. ``no_candidate``: ``Unknown()`` when no candidate key exists.
    4. ``own_key_unproven``: ``Unknown()`` when the leader key is this
       campaign's but rule 1 did not hold (not proven first, or the proof
       expired).
    5. ``own_abandoned_key``: ``Unknown()`` when the leader key holds this
       node's endpoint, as this node writes it (a key of an abandoned
       lease): never a hint pointing at this node.
    6. ``stale_read`` / ``epoch_behind``: ``Unknown()`` when the leader key
       was created below ``high_water``; ``epoch_behind`` when the read was
       sent after that epoch was published (etcd went back in time, which
       the caller reports), ``stale_read`` when it was sent before.
    7. ``following``: ``Follower(leader endpoint, its create revision)``,
       the endpoint ``None`` when the key's value is not a ``host:port``.

    So this node leads only at its own key's create revision, and never
    follows a leader below its high-water mark (the ``LeaderWatch`` the
    value goes through refuses any epoch below it, as a last guard).
    """
    if (
        campaign is not None
        and campaign.won_at is not None
        and now < proven_until
        and not own_key_gone(campaign, read)
    ):
        return Decision(state=Leader(epoch=campaign.create_revision), reason="leading")
    if now >= contact_until:
        return Decision(state=Unknown(), reason="no_contact")
    leader = read.leader
    if leader is None:
        return Decision(state=Unknown(), reason="no_candidate")
    if campaign is not None and leader.key == campaign.key:
        return Decision(state=Unknown(), reason="own_key_unproven")
    if own_endpoint is not None and leader.endpoint == own_endpoint:
        return Decision(state=Unknown(), reason="own_abandoned_key")
    if high_water is not None and leader.create_revision < high_water:
        went_back = read.sent > high_water_at
        return Decision(state=Unknown(), reason="epoch_behind" if went_back else "stale_read")
    return Decision(
        state=Follower(leader_endpoint=leader.endpoint, leader_epoch=leader.create_revision),
        reason="following",
    )

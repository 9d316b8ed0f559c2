"""The one place where the PostgreSQL driver decides what it publishes, and whether it leads.

:func:`decide` is a pure function of what the driver's parts know: this
node's tenure and its proof, the last read of the row, when the database
last answered, the clock, and the epochs this node has published and seen.
"""

from __future__ import annotations

import uuid
from collections.abc import Container
from typing import Literal

from leaderwatch._value import FrozenValue
from leaderwatch.drivers.postgres._rows import RowView
from leaderwatch.drivers.postgres._tenure import Tenure
from leaderwatch.state import Follower, Leader, LeaderState, Unknown

__all__ = ["Decision", "Reason", "decide"]

Reason = Literal[
    "leading",
    "no_contact",
    "no_row",
    "lease_expired",
    "own_tenure",
    "own_endpoint",
    "below_high_water",
    "other_holder_at_seen_epoch",
    "following",
]
"""Why :func:`decide` chose its state (see its table)."""


class Decision(FrozenValue):
    """The state to publish, and why."""

    state: LeaderState
    reason: Reason


def decide(
    *,
    now: float,
    tenure: Tenure | None,
    campaigning: bool,
    view: RowView | None,
    contact_until: float,
    own_tokens: Container[uuid.UUID],
    own_endpoint: str | None,
    high_water: int | None,
    epoch_seen: tuple[int, uuid.UUID | None] | None,
) -> Decision:
    """The leadership value to publish now: the first rule that matches decides.

    Inputs: ``tenure`` is this node's hold on the lease (``None`` when it
    holds none); ``campaigning`` whether it still campaigns (false after
    ``resign()`` or on leaving); ``view`` the row as last read (``None``:
    no row); ``contact_until`` the instant until which the database's
    answers count as current; ``own_tokens`` every tenure token this node
    ever used; ``own_endpoint`` its endpoint; ``high_water`` the highest
    epoch it published; ``epoch_seen`` the highest epoch any read showed and
    the tenure token that held it. Instants are ``anyio.current_time()``.

    1. ``leading``: ``Leader(tenure.epoch)`` while the tenure is held, not
       abandoned, the node campaigns and ``now < tenure.proven_until``.
       ``contact_until`` does not apply: the lease proof is the stricter bound.
    2. ``no_contact``: ``Unknown()`` when ``now >= contact_until``.
    3. ``no_row``: ``Unknown()`` when the election has no row.
    4. ``lease_expired``: ``Unknown()`` when the row's lease may have
       expired (``now >= view.expires_at``).
    5. ``own_tenure``: ``Unknown()`` when the row holds one of this node's
       tokens (its own tenure, unproven or given up).
    6. ``own_endpoint``: ``Unknown()`` when the row names this node's
       endpoint: never a hint naming this node.
    7. ``below_high_water``: ``Unknown()`` when the row's epoch is below
       ``high_water``; ``other_holder_at_seen_epoch``: ``Unknown()`` when it
       is the highest epoch seen but held by another tenure. Statements run
       one at a time and each read replaces the last, so either means the
       database went back (failover to a lagging replica, a restored
       backup), which the caller reports.
    8. ``following``: ``Follower(view.endpoint, row epoch)``, the endpoint
       ``None`` when the row names no valid ``host:port``.
    """
    if tenure is not None and not tenure.abandoned and campaigning and now < tenure.proven_until:
        return Decision(state=Leader(epoch=tenure.epoch), reason="leading")
    if now >= contact_until:
        return Decision(state=Unknown(), reason="no_contact")
    if view is None:
        return Decision(state=Unknown(), reason="no_row")
    if now >= view.expires_at:
        return Decision(state=Unknown(), reason="lease_expired")
    row = view.row
    if row.holder_token is not None and row.holder_token in own_tokens:
        return Decision(state=Unknown(), reason="own_tenure")
    if own_endpoint is not None and view.endpoint == own_endpoint:
        return Decision(state=Unknown(), reason="own_endpoint")
    if high_water is not None and row.epoch < high_water:
        return Decision(state=Unknown(), reason="below_high_water")
    if epoch_seen is not None and row.epoch == epoch_seen[0] and row.holder_token != epoch_seen[1]:
        return Decision(state=Unknown(), reason="other_holder_at_seen_epoch")
    return Decision(
        state=Follower(leader_endpoint=view.endpoint, leader_epoch=row.epoch),
        reason="following",
    )

"""The election row as read from the table, and what one read of it proves."""

from __future__ import annotations

import uuid

from pydantic import Field

from leaderwatch._value import FrozenValue

__all__ = ["Row", "RowView"]


class Row(FrozenValue):
    """One election row as read from the table."""

    epoch: int = Field(ge=0)
    holder_endpoint: str | None
    holder_node_id: str | None
    holder_token: uuid.UUID | None
    lease_remaining: float
    """Seconds until the lease expires on the server's clock (<= 0: expired)."""


class RowView:
    """The row as last read, and until when (monotonic clock) its lease is known live."""

    __slots__ = ("endpoint", "expires_at", "row", "sent")

    def __init__(self, row: Row, endpoint: str | None, sent: float) -> None:
        self.row = row
        self.endpoint = endpoint
        """The holder's endpoint, ``None`` when the row names no valid ``host:port``."""
        self.sent = sent
        """When the statement that returned the row was sent."""
        self.expires_at = sent + row.lease_remaining
        """No later than the server's expiry: the server measured from after ``sent``."""

"""What this node knows of the election row: the last read, and the highest epoch seen."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from leaderwatch._log import get_logger
from leaderwatch.drivers.postgres._connection import fetch
from leaderwatch.drivers.postgres._rows import Row, RowView
from leaderwatch.drivers.postgres._sql import Statements
from leaderwatch.state import InvalidEndpoint, parse_endpoint

if TYPE_CHECKING:
    from leaderwatch.drivers.postgres._connection import Connection

__all__ = ["RowObserver", "read_row"]

_log = get_logger("leaderwatch.drivers.postgres")


async def read_row(conn: Connection, sql: Statements, election: str, within: float) -> Row | None:
    """The election's row, ``None`` when there is none; failures raise ``StatementFailed``."""
    records = await fetch(conn, within, sql.read, election)
    return Row(**dict(records[0])) if records else None


class RowObserver:
    """The row as last read (:attr:`view`) and the highest epoch any read showed.

    Each recorded read replaces the last. A holder endpoint that is not a
    valid ``host:port`` is shown as ``None`` and logged once per (epoch,
    endpoint) as ``postgres_holder_endpoint_invalid``.
    """

    __slots__ = ("_election", "_node_id", "_reported_invalid", "epoch_seen", "view")

    def __init__(self, *, node_id: str, election: str) -> None:
        self._node_id = node_id
        self._election = election
        self.view: RowView | None = None
        self.epoch_seen: tuple[int, uuid.UUID | None] | None = None
        """The highest epoch in any row read, and the tenure that held it."""
        self._reported_invalid: tuple[int, str] | None = None

    def record(self, row: Row | None, sent: float) -> None:
        """A statement sent at ``sent`` returned ``row`` (``None``: the election has no row)."""
        if row is None:
            self.view = None
            return
        seen = self.epoch_seen
        if seen is None or row.epoch > seen[0]:
            self.epoch_seen = (row.epoch, row.holder_token)
        self.view = RowView(row, self._endpoint_of(row), sent)

    def expired(self, now: float) -> bool:
        """Whether no row is known, or the known row's lease may have expired by ``now``."""
        view = self.view
        return view is None or now >= view.expires_at

    def _endpoint_of(self, row: Row) -> str | None:
        raw = row.holder_endpoint
        if raw is None:
            return None
        try:
            return parse_endpoint(raw)
        except InvalidEndpoint as error:
            seen = (row.epoch, raw)
            if seen != self._reported_invalid:
                self._reported_invalid = seen
                _log.warning(
                    "postgres_holder_endpoint_invalid",
                    node_id=self._node_id,
                    election=self._election,
                    epoch=row.epoch,
                    holder_endpoint=raw[:300],
                    holder_node_id=row.holder_node_id,
                    reason=str(error),
                )
            return None

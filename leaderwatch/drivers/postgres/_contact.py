"""Whether the database is answering: until when its last answer counts as current."""

from __future__ import annotations

import math

from leaderwatch._log import get_logger
from leaderwatch.drivers._timing import LeaseTiming

__all__ = ["Contact"]

_log = get_logger("leaderwatch.drivers.postgres")


class Contact:
    """Until when (``anyio.current_time()``) the database's last answer counts as current.

    An answer to a statement sent at ``t`` counts until ``t + proof_window``;
    later answers never move that instant back. An outage is logged once
    when it starts (``postgres_request_failed``), once when the database
    answers again (``postgres_reconnected``) and once when the last answer
    stops counting (``postgres_unreachable``).
    """

    __slots__ = (
        "_election",
        "_node_id",
        "_outage",
        "_silence_reported",
        "_timing",
        "reconnects",
        "until",
    )

    def __init__(self, timing: LeaseTiming, *, node_id: str, election: str) -> None:
        self._timing = timing
        self._node_id = node_id
        self._election = election
        self.until = -math.inf
        self._silence_reported = False
        self._outage: str | None = None
        self.reconnects = 0
        """Outages ended by an answer (each logged as ``postgres_reconnected``)."""

    def answered(self, sent: float) -> None:
        """The database answered a statement sent at ``sent``."""
        until = sent + self._timing.proof_window
        if until > self.until:
            self.until = until
        self._silence_reported = False
        if self._outage is not None:
            self._outage = None
            self.reconnects += 1
            _log.info("postgres_reconnected", node_id=self._node_id, election=self._election)

    def failed(self, error: str) -> None:
        """A connection attempt or a statement failed with ``error``."""
        if self._outage is None:
            _log.warning(
                "postgres_request_failed",
                node_id=self._node_id,
                election=self._election,
                error=error,
            )
        self._outage = error

    def report_silence(self, now: float) -> None:
        """Log once that the last answer stopped counting, if it did by ``now``."""
        if now >= self.until > -math.inf and not self._silence_reported:
            self._silence_reported = True
            _log.warning(
                "postgres_unreachable",
                node_id=self._node_id,
                election=self._election,
                silent_for=round(now - self.until + self._timing.proof_window, 3),
            )

"""This node's hold on the lease, and the statements that take, renew and release it.

Every statement is one atomic autocommit statement decided on the server's
clock (see :mod:`._sql`); the proof of a tenure is measured from when the
last acknowledged renewal was *sent*, on this node's monotonic clock.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Literal

from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.postgres._connection import fetch
from leaderwatch.drivers.postgres._rows import Row
from leaderwatch.drivers.postgres._sql import Statements

if TYPE_CHECKING:
    from leaderwatch.drivers.postgres._connection import Connection

__all__ = ["LeaseStatements", "RenewOutcome", "Tenure"]

RenewOutcome = Literal["renewed", "epoch_changed", "renewal_refused"]
"""What a renewal found: the lease extended, the row edited under this token, or refused."""


class Tenure:
    """This node's hold on the lease: won at ``epoch``, renewed with ``token``.

    :attr:`proven_until` only moves forward, and only while not
    :attr:`abandoned`; once abandoned a tenure is released, never renewed.
    """

    __slots__ = ("abandoned", "acked_send", "epoch", "next_renew", "proven_until", "token")

    def __init__(self, token: uuid.UUID, epoch: int, sent: float, timing: LeaseTiming) -> None:
        self.token = token
        self.epoch = epoch
        self.acked_send = sent
        self.proven_until = timing.proven_until(sent)
        self.next_renew = sent + timing.renew_interval
        self.abandoned = False
        """Set once this node gave the tenure up; it is then released, never renewed."""

    def renewed(self, sent: float, timing: LeaseTiming) -> None:
        """The server acknowledged a renewal sent at ``sent``: extend the proof, plan the next."""
        until = timing.proven_until(sent)
        if not self.abandoned and until > self.proven_until:
            self.acked_send = sent
            self.proven_until = until
        self.next_renew = sent + timing.renew_interval


class LeaseStatements:
    """The campaign, renewal and release statements of one election, each within a deadline.

    Failures raise ``StatementFailed`` (:func:`._connection.fetch`).
    """

    __slots__ = ("_election", "_sql", "_timing")

    def __init__(self, sql: Statements, election: str, timing: LeaseTiming) -> None:
        self._sql = sql
        self._election = election
        self._timing = timing

    async def campaign(
        self, conn: Connection, endpoint: str, node_id: str, token: uuid.UUID, floor: int
    ) -> Row | None:
        """Take the lease if it expired, at an epoch above ``floor``; ``None`` when it is live."""
        records = await fetch(
            conn,
            self._timing.call_timeout,
            self._sql.campaign,
            self._election,
            endpoint,
            node_id,
            token,
            floor,
            float(self._timing.ttl),
        )
        return Row(**dict(records[0])) if records else None

    async def renew(self, conn: Connection, tenure: Tenure) -> RenewOutcome:
        """Extend ``tenure``'s live lease by ``ttl`` from the server's now."""
        records = await fetch(
            conn,
            self._timing.call_timeout,
            self._sql.renew,
            self._election,
            tenure.token,
            float(self._timing.ttl),
        )
        if not records:
            return "renewal_refused"
        return "renewed" if records[0]["epoch"] == tenure.epoch else "epoch_changed"

    async def release(self, conn: Connection, tenure: Tenure) -> None:
        """Expire ``tenure``'s lease now, if it is still live (the trigger notifies)."""
        await fetch(
            conn, self._timing.call_timeout, self._sql.release, self._election, tenure.token
        )

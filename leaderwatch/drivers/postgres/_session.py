"""The session: one connection, one statement at a time, reading, campaigning and renewing.

The session owns the connection and this node's :class:`~._tenure.Tenure`.
Statements run one at a time under one lock, so each read replaces the
last and a tenure is never renewed and released at once. A failed statement
ends the connection; the session reconnects with backoff, forever.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from leaderwatch._backoff import Backoff
from leaderwatch._log import get_logger
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.postgres._connection import (
    DB_ERRORS,
    Connector,
    StatementFailed,
    one_line,
)
from leaderwatch.drivers.postgres._contact import Contact
from leaderwatch.drivers.postgres._observer import RowObserver, read_row
from leaderwatch.drivers.postgres._sql import Statements
from leaderwatch.drivers.postgres._tenure import LeaseStatements, Tenure

if TYPE_CHECKING:
    from leaderwatch.drivers.postgres._connection import Connection

__all__ = ["Session"]

_log = get_logger("leaderwatch.drivers.postgres")


class Session:
    """Keeps the row view current and, for a candidate, takes and renews the lease.

    ``campaigning()`` says whether this node still campaigns,
    ``high_water()`` the highest epoch it published, and ``changed()`` is
    called after every change to what the driver may publish. A
    notification of another connection's change, or the connection ending,
    wakes the session at once; otherwise it reads every ``renew_interval``.
    """

    def __init__(
        self,
        *,
        connector: Connector,
        sql: Statements,
        timing: LeaseTiming,
        election: str,
        node_id: str,
        endpoint: str | None,
        contact: Contact,
        observer: RowObserver,
        campaigning: Callable[[], bool],
        high_water: Callable[[], int | None],
        changed: Callable[[], None],
    ) -> None:
        self._connector = connector
        self._sql = sql
        self._timing = timing
        self._election = election
        self._node_id = node_id
        self._endpoint = endpoint
        self._contact = contact
        self._observer = observer
        self._campaigning = campaigning
        self._high_water = high_water
        self._changed = changed
        self._lease = LeaseStatements(sql, election, timing)
        self._lock = anyio.Lock()
        self._conn: Connection | None = None
        self._wake = anyio.Event()
        self._dirty = True
        self._next_poll = -math.inf
        self._campaign_in_flight = False
        self.tenure: Tenure | None = None
        self.tokens: set[uuid.UUID] = set()
        """Every tenure token this node used: a row holding one is this node's own."""

    def wake(self) -> None:
        """Make the session look at the tenure and the row now."""
        self._wake.set()

    async def open(self) -> None:
        """Connect and read the row (see :meth:`Connector.open_first` for the errors)."""
        sent = anyio.current_time()
        conn, row = await self._connector.open_first(self._on_notify, self._on_terminated)
        self._conn = conn
        self._contact.answered(sent)
        self._observer.record(row, sent)
        self._next_poll = sent + self._timing.renew_interval

    async def run(self) -> None:
        """Serve statements on one connection after another, forever."""
        backoff = self._timing.backoff()
        while True:
            conn = self._conn
            if conn is None:
                try:
                    conn = await self._connector.connect(
                        self._timing.call_timeout, self._on_notify, self._on_terminated
                    )
                except DB_ERRORS as error:
                    self._contact.failed(one_line(error))
                    await backoff.wait()
                    continue
                self._conn = conn
                self._dirty = True
            try:
                await self._serve(conn, backoff)
            except StatementFailed as failure:
                self._contact.failed(str(failure))
                if self._conn is conn:
                    self._conn = None
                conn.terminate()
                self._dirty = True
                await backoff.wait()

    async def _serve(self, conn: Connection, backoff: Backoff) -> None:
        while True:
            if conn.is_closed() or self._conn is not conn:
                raise StatementFailed("connection closed")
            now = anyio.current_time()
            tenure = self.tenure
            if tenure is not None:
                if tenure.abandoned or not self._campaigning():
                    await self._give_up(conn, tenure)
                elif self._dirty or now >= tenure.next_renew:
                    await self._renew(conn, tenure)
                else:
                    await self._sleep_until(tenure.next_renew)
                    continue
            elif self._seeking and (self._dirty or self._observer.expired(now)):
                await self._campaign(conn)
            elif self._dirty or now >= self._next_poll:
                await self._read(conn)
            else:
                due = self._next_poll
                view = self._observer.view
                if self._seeking and view is not None:
                    due = min(due, view.expires_at)
                await self._sleep_until(due)
                continue
            backoff.reset()

    async def _sleep_until(self, deadline: float) -> None:
        wake = self._wake
        if not wake.is_set():
            with anyio.move_on_at(deadline):
                await wake.wait()
        if wake.is_set():
            self._wake = anyio.Event()

    @property
    def _seeking(self) -> bool:
        """Whether this node campaigns (a candidate that has not resigned or left)."""
        return self._endpoint is not None and self._campaigning()

    async def _read(self, conn: Connection) -> None:
        async with self._lock:
            self._dirty = False
            await self._read_locked(conn)

    async def _read_locked(self, conn: Connection) -> None:
        sent = anyio.current_time()
        row = await read_row(conn, self._sql, self._election, self._timing.call_timeout)
        self._contact.answered(sent)
        self._observer.record(row, sent)
        self._next_poll = sent + self._timing.renew_interval
        self._changed()

    async def _campaign(self, conn: Connection) -> None:
        async with self._lock:
            if not self._seeking or self._endpoint is None or self.tenure is not None:
                return
            self._dirty = False
            token = uuid.uuid4()
            seen = self._observer.epoch_seen
            floor = max(self._high_water() or 0, 0 if seen is None else seen[0])
            self.tokens.add(token)
            sent = anyio.current_time()
            self._campaign_in_flight = True
            try:
                row = await self._lease.campaign(conn, self._endpoint, self._node_id, token, floor)
            finally:
                self._campaign_in_flight = False
            self._contact.answered(sent)
            if row is None:
                # Lost: the lease is live. Read who holds it (the winner committed by now).
                await self._read_locked(conn)
                return
            tenure = Tenure(token, row.epoch, sent, self._timing)
            self.tenure = tenure
            self._observer.record(row, sent)
            self._next_poll = tenure.next_renew
            if not self._campaigning():
                tenure.abandoned = True  # resign() began meanwhile: release, never publish
            self._changed()
            _log.info(
                "postgres_campaign_won",
                node_id=self._node_id,
                election=self._election,
                epoch=row.epoch,
                proven_until=tenure.proven_until,
            )

    async def _renew(self, conn: Connection, tenure: Tenure) -> None:
        async with self._lock:
            if self.tenure is not tenure or tenure.abandoned or not self._campaigning():
                return
            self._dirty = False
            sent = anyio.current_time()
            outcome = await self._lease.renew(conn, tenure)
            self._contact.answered(sent)
            if outcome == "renewed":
                tenure.renewed(sent, self._timing)
                self._next_poll = tenure.next_renew
                self._changed()
                return
            if outcome == "epoch_changed":
                # The row keeps this node's token under another epoch: someone edited it.
                tenure.abandoned = True
            else:
                self.tenure = None
                self._dirty = True
            self._changed()
            _log.warning(
                "postgres_tenure_lost",
                node_id=self._node_id,
                election=self._election,
                epoch=tenure.epoch,
                reason=outcome,
                at=sent,
            )

    async def _give_up(self, conn: Connection, tenure: Tenure) -> None:
        async with self._lock:
            if self.tenure is not tenure:
                return
            await self._release_tenure(conn, tenure)

    async def _release_tenure(self, conn: Connection, tenure: Tenure) -> None:
        """Expire ``tenure``'s lease now (one statement; the trigger notifies). Lock held."""
        tenure.abandoned = True
        self._changed()
        sent = anyio.current_time()
        await self._lease.release(conn, tenure)
        self._contact.answered(sent)
        self.tenure = None
        self._dirty = True
        self._wake.set()
        _log.info(
            "postgres_lease_released",
            node_id=self._node_id,
            election=self._election,
            epoch=tenure.epoch,
        )

    async def resign(self) -> None:
        """Release the tenure (or the one a campaign in flight wins), within ``resign_wait``.

        A release that fails or takes too long is logged (``postgres_release_failed``);
        the lease then runs out on the server.
        """
        wait = self._timing.resign_wait
        error: str | None = None
        in_flight: Connection | None = None
        tenure = self.tenure
        if tenure is None and not self._campaign_in_flight:
            return
        with anyio.move_on_after(wait) as scope:
            async with self._lock:
                # A campaign that won while resign() waited for the lock is released too.
                tenure = self.tenure
                if tenure is None:
                    return
                tenure.abandoned = True
                conn = self._conn
                if conn is None or conn.is_closed():
                    error = "not connected"
                else:
                    in_flight = conn
                    try:
                        await self._release_tenure(conn, tenure)
                    except StatementFailed as failure:
                        error = str(failure)
                    in_flight = None
        if scope.cancelled_caught:
            error = f"no answer within {wait:g}s"
            if in_flight is not None:
                # A statement cut off halfway leaves the protocol in an unknown state.
                in_flight.terminate()
        if error is not None:
            _log.warning(
                "postgres_release_failed",
                node_id=self._node_id,
                election=self._election,
                epoch=None if tenure is None else tenure.epoch,
                error=error,
            )

    async def close(self) -> None:
        """Close the connection, within ``resign_wait``; terminate it if that takes longer."""
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        with anyio.move_on_after(self._timing.resign_wait):
            await conn.close()
        if not conn.is_closed():
            conn.terminate()

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if payload != self._election:
            return
        own = self._conn
        if own is not None and not own.is_closed() and pid == own.get_server_pid():
            return  # this node's own change: it already knows
        self._dirty = True
        self._wake.set()

    def _on_terminated(self, conn: object) -> None:
        self._wake.set()

"""The public PostgreSQL election driver: composes the connection, session and decision parts.

The client library is asyncpg, which runs on asyncio only; entering the
driver under trio raises :class:`PostgresElectionError`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup

from leaderwatch._log import get_logger
from leaderwatch.drivers._base import DriverBase
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.postgres._connection import Connector, check_dsn, on_asyncio
from leaderwatch.drivers.postgres._contact import Contact
from leaderwatch.drivers.postgres._decision import decide
from leaderwatch.drivers.postgres._errors import PostgresElectionError
from leaderwatch.drivers.postgres._observer import RowObserver
from leaderwatch.drivers.postgres._session import Session
from leaderwatch.drivers.postgres._sql import TABLE, Statements
from leaderwatch.state import LeaderState, parse_endpoint

__all__ = ["PostgresElectionDriver"]

_log = get_logger("leaderwatch.drivers.postgres")

_MAX_ELECTION_LENGTH: Final = 1000


def _check_election(election: str) -> None:
    if (
        not isinstance(election, str)
        or not election
        or len(election) > _MAX_ELECTION_LENGTH
        or "\x00" in election
    ):
        raise ValueError(
            f"election must be a non-empty string of at most {_MAX_ELECTION_LENGTH} "
            f"characters without NUL (got {election!r:.80})"
        )


class PostgresElectionDriver(DriverBase):
    """Elects one leader among the nodes that campaign in ``election`` on a PostgreSQL table.

    With ``node_endpoint`` this node campaigns; without, it only observes.

    Guarantees:

    - One row per election in ``<schema>.elections`` (created on first use if
      absent, under an advisory lock, so many nodes may start at once): the
      holder's endpoint, node id and tenure token, the **epoch** and the lease
      expiry on the **server's** clock. A campaign is one statement that takes
      the lease only if it expired on the server's clock and sets the epoch to
      ``max(row epoch, this node's high-water mark) + 1``: epochs strictly
      increase across tenures, never repeat for two holders on one timeline,
      and this node never takes an epoch it has seen before.
    - Lease safety: ``Leader(epoch)`` is published only until ``ttl - margin``
      after *sending* the last renewal the server acknowledged (monotonic
      clock; :class:`~leaderwatch.drivers.LeaseTiming`), by a timer that does
      not wait for the request in flight. The server extends the lease from
      when it *runs* the renewal, later than the send, so this node steps down
      at least ``margin`` before anyone else can take the lease. Renewals go
      out every ``(ttl - margin) / 3``; a renewal the server refuses (the lease
      expired or changed hands) ends the tenure at once. After either, the
      node publishes ``Unknown()``, releases what it still holds and
      campaigns again, at a higher epoch, once the database answers.
    - Non-leaders publish ``Follower(endpoint, epoch)`` while the row's lease
      is live, ``Unknown()`` when there is no row or its lease expired, and
      ``Follower(None, epoch)`` plus one warning (``postgres_holder_endpoint_invalid``)
      when the row names no valid ``host:port``. A trigger notifies every
      change of holder on a ``LISTEN`` channel named after the schema, so a
      hand-over is seen within a round trip; each node also polls every
      ``(ttl - margin) / 3``. A node that hears nothing from the database for
      ``ttl - margin`` publishes ``Unknown()``.
    - A row below an epoch this node has published, or naming another tenure
      at the highest epoch this node has seen (a failover to a lagging
      replica, a restored backup), gives ``Unknown()`` and one error log
      (``postgres_epoch_behind``); the next campaign moves the row's epoch
      above anything this node saw.
    - Leaving ``async with`` or :meth:`resign` publishes ``Unknown()``, then
      expires the lease in one statement (the trigger notifies), so a
      successor takes over at once. After :meth:`resign` the node keeps
      observing and never campaigns again.
    - Start-up raises :class:`PostgresUnavailable` (unreachable, refused, no
      answer within ``connect_timeout``), :class:`PostgresAuthError`,
      :class:`PostgresPermissionError` (may not create or use the table) or
      :class:`PostgresDsnError`, each with a one-line message naming the
      server (never the password). Once started, the first value subscribers
      see reflects the row the database held at start-up; later failures are
      retried (with :meth:`~leaderwatch.drivers.LeaseTiming.backoff`) forever.

    ``dsn`` is a ``postgresql://`` URI as asyncpg takes it (several hosts and
    ``sslmode`` included); ``password`` keeps a secret out of it;
    ``connect_options`` are passed to :func:`asyncpg.connect` (``ssl``,
    ``statement_cache_size=0`` behind PgBouncer, ...). Every statement is
    bounded by ``(ttl - margin) / 3`` on both sides (client deadline and
    ``statement_timeout``). Runs on anyio's asyncio backend only (asyncpg).
    """

    def __init__(
        self,
        dsn: str,
        *,
        election: str,
        node_endpoint: str | None = None,
        ttl: int = 10,
        margin: float | None = None,
        schema: str = "leaderwatch",
        node_id: str | None = None,
        connect_timeout: float = 5.0,
        password: str | None = None,
        connect_options: Mapping[str, Any] | None = None,
        strict: bool = False,
    ) -> None:
        dsn = check_dsn(dsn)
        _check_election(election)
        own = None if node_endpoint is None else parse_endpoint(node_endpoint)
        self._timing = timing = LeaseTiming.of(ttl, margin)
        self._sql = sql = Statements(schema)
        name = node_id if node_id is not None else (own or f"postgres-observer:{election}")
        connector = Connector(
            dsn,
            sql=sql,
            election=election,
            node_id=name,
            call_timeout=timing.call_timeout,
            connect_timeout=connect_timeout,
            password=password,
            connect_options=connect_options,
        )
        super().__init__(name, strict=strict)
        self._election = election
        self._node_endpoint = own
        self._contact = Contact(timing, node_id=self.node_id, election=election)
        self._observer = RowObserver(node_id=self.node_id, election=election)
        self._session = Session(
            connector=connector,
            sql=sql,
            timing=timing,
            election=election,
            node_id=self.node_id,
            endpoint=own,
            contact=self._contact,
            observer=self._observer,
            campaigning=lambda: self.campaigning,
            high_water=lambda: self._watch.high_water,
            changed=self._changed,
        )
        self._deadline_passed = anyio.Event()
        self._reported_behind: tuple[int, uuid.UUID | None] | None = None

    # -- public properties ---------------------------------------------------------

    @property
    def election(self) -> str:
        """The election name: the ``election`` column of this election's row."""
        return self._election

    @property
    def node_endpoint(self) -> str | None:
        """The endpoint this node campaigns with, ``None`` for an observer."""
        return self._node_endpoint

    @property
    def schema(self) -> str:
        """The schema holding the ``elections`` table (also the ``NOTIFY`` channel)."""
        return self._sql.schema

    @property
    def table(self) -> str:
        """The qualified election table, ``<schema>.elections``."""
        return f"{self._sql.schema}.{TABLE}"

    @property
    def timing(self) -> LeaseTiming:
        """Every duration this driver uses, from ``ttl`` and ``margin``."""
        return self._timing

    @property
    def ttl(self) -> int:
        """The lease's length on the server, in seconds."""
        return self._timing.ttl

    @property
    def margin(self) -> float:
        """Seconds before the server's expiry at which an unconfirmed leader steps down."""
        return self._timing.margin

    @property
    def reconnects(self) -> int:
        """Times the database answered again after a failed statement or connection
        (each logged as ``postgres_reconnected``)."""
        return self._contact.reconnects

    @property
    def tenure_epoch(self) -> int | None:
        """The epoch of the lease this node holds now, ``None`` when it holds none."""
        tenure = self._session.tenure
        return None if tenure is None or tenure.abandoned else tenure.epoch

    @property
    def proven_until(self) -> float:
        """Until when (``anyio.current_time()``) this node's leadership is proven; see the class."""
        tenure = self._session.tenure
        if tenure is None or tenure.abandoned or not self.campaigning:
            return -math.inf
        return tenure.proven_until

    # -- lifecycle -----------------------------------------------------------------

    async def _start(self, task_group: TaskGroup) -> None:
        if not on_asyncio():
            raise PostgresElectionError(
                "PostgresElectionDriver runs on anyio's asyncio backend only (its client, "
                "asyncpg, is asyncio-only); run the application with backend='asyncio'"
            )
        await self._session.open()
        self._publish_now()
        task_group.start_soon(self._session.run)
        task_group.start_soon(self._publish_at_deadlines)

    async def _resign(self) -> None:
        # Runs shielded. Publish first: campaigning is already false, so no
        # Leader value can be computed any more.
        self._changed()
        await self._session.resign()

    async def _release(self) -> None:
        await self._session.close()

    # -- what this node publishes ---------------------------------------------------

    def _state_now(self) -> LeaderState:
        view = self._observer.view
        high_water = self._watch.high_water
        decision = decide(
            now=anyio.current_time(),
            tenure=self._session.tenure,
            campaigning=self.campaigning,
            view=view,
            contact_until=self._contact.until,
            own_tokens=self._session.tokens,
            own_endpoint=self._node_endpoint,
            high_water=high_water,
            epoch_seen=self._observer.epoch_seen,
        )
        reason = decision.reason
        if view is not None and reason in ("below_high_water", "other_holder_at_seen_epoch"):
            row = view.row
            reported = (row.epoch, row.holder_token)
            if reported != self._reported_behind:
                self._reported_behind = reported
                _log.error(
                    "postgres_epoch_behind",
                    node_id=self.node_id,
                    election=self._election,
                    epoch=row.epoch,
                    high_water=high_water,
                    holder_endpoint=row.holder_endpoint,
                    holder_node_id=row.holder_node_id,
                    reason=reason,
                )
        return decision.state

    def _publish_now(self) -> None:
        if not self._watch.is_closed:
            self._publish(self._state_now())

    def _changed(self) -> None:
        self._publish_now()
        self._deadline_passed.set()

    async def _publish_at_deadlines(self) -> None:
        """Publish the moment a deadline passes: lease proof, database contact, a row's lease."""
        while True:
            now = anyio.current_time()
            tenure = self._session.tenure
            if tenure is not None and not tenure.abandoned and now >= tenure.proven_until:
                tenure.abandoned = True
                self._session.wake()
                _log.warning(
                    "postgres_tenure_lost",
                    node_id=self.node_id,
                    election=self._election,
                    epoch=tenure.epoch,
                    reason="lease_unproven",
                    at=now,
                    last_acked_send=tenure.acked_send,
                    proven_until=tenure.proven_until,
                )
            self._contact.report_silence(now)
            self._publish_now()
            deadlines = [self._contact.until]
            if tenure is not None and not tenure.abandoned:
                deadlines.append(tenure.proven_until)
            if self._observer.view is not None:
                deadlines.append(self._observer.view.expires_at)
            upcoming = [deadline for deadline in deadlines if deadline > now]
            wake = self._deadline_passed = anyio.Event()
            with anyio.move_on_at(min(upcoming, default=math.inf)):
                await wake.wait()

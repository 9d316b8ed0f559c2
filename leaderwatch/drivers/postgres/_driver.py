"""The PostgreSQL election driver: a lease on one table row, renewed by its holder.

The client library is asyncpg, which runs on asyncio only; this module is
therefore the one place where the driver relies on asyncio (through asyncpg),
and entering the driver under trio raises :class:`PostgresElectionError`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias
from urllib.parse import urlsplit

import anyio
import asyncpg
from anyio.abc import TaskGroup
from pydantic import Field, ValidationError

from leaderwatch._backoff import Backoff
from leaderwatch._log import get_logger
from leaderwatch._value import FrozenValue
from leaderwatch.drivers._base import DriverBase
from leaderwatch.drivers._timing import LeaseTiming
from leaderwatch.drivers.postgres._sql import TABLE, Statements
from leaderwatch.errors import LeaderwatchError
from leaderwatch.state import (
    Follower,
    InvalidEndpoint,
    Leader,
    LeaderState,
    Unknown,
    parse_endpoint,
)

if TYPE_CHECKING:
    _Connection: TypeAlias = asyncpg.Connection[asyncpg.Record]

__all__ = [
    "PostgresAuthError",
    "PostgresDsnError",
    "PostgresElectionDriver",
    "PostgresElectionError",
    "PostgresPermissionError",
    "PostgresUnavailable",
]

_log = get_logger("leaderwatch.drivers.postgres")

_MAX_ELECTION_LENGTH: Final = 1000
_RESERVED_OPTIONS: Final = frozenset({"dsn", "password", "timeout", "loop"})
_DB_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # Raised by a connection the server just ended (its protocol still awaits the end).
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


class PostgresElectionError(LeaderwatchError, RuntimeError):
    """The PostgreSQL election cannot start or run; the message says why and what to do."""


class PostgresUnavailable(PostgresElectionError):
    """PostgreSQL did not answer at start-up (refused, unreachable, TLS refused or timed out)."""


class PostgresAuthError(PostgresElectionError):
    """PostgreSQL refused the credentials (wrong password, unknown role, no pg_hba.conf entry)."""


class PostgresPermissionError(PostgresElectionError):
    """The role may not create, read or write the election table."""


class PostgresDsnError(PostgresElectionError, ValueError):
    """The DSN is not a usable ``postgresql://`` URI; the message names the problem."""


class _Failure(Exception):
    """A request failed or timed out; the session loop reconnects and retries."""


class _Row(FrozenValue):
    """One election row as read from the table."""

    epoch: int = Field(ge=0)
    holder_endpoint: str | None
    holder_node_id: str | None
    holder_token: uuid.UUID | None
    lease_remaining: float
    """Seconds until the lease expires on the server's clock (<= 0: expired)."""


class _View:
    """The row as last read, and until when (monotonic clock) its lease is known live."""

    __slots__ = ("endpoint", "expires_at", "row", "sent")

    def __init__(self, row: _Row, endpoint: str | None, sent: float) -> None:
        self.row = row
        self.endpoint = endpoint
        self.sent = sent
        """When the statement that returned the row was sent."""
        self.expires_at = sent + row.lease_remaining
        """No later than the server's expiry: the server measured from after ``sent``."""


class _Tenure:
    """This node's hold on the lease: won at ``epoch``, renewed with ``token``."""

    __slots__ = ("abandoned", "acked_send", "epoch", "next_renew", "proven_until", "token")

    def __init__(self, token: uuid.UUID, epoch: int, sent: float, timing: LeaseTiming) -> None:
        self.token = token
        self.epoch = epoch
        self.acked_send = sent
        self.proven_until = timing.proven_until(sent)
        self.next_renew = sent + timing.renew_interval
        self.abandoned = False
        """Set once this node gave the tenure up; it is then released, never renewed."""


def _on_asyncio() -> bool:
    try:
        import sniffio
    except ImportError:  # pragma: no cover - trio depends on sniffio
        return True
    try:
        return sniffio.current_async_library() == "asyncio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


def _check_dsn(dsn: str) -> str:
    if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
        shown = _describe_dsn(dsn) if isinstance(dsn, str) else repr(dsn)
        raise PostgresDsnError(
            f"dsn must be a postgresql://user[:password]@host[:port]/database URI (got {shown})"
        )
    return dsn


def _describe_dsn(dsn: str) -> str:
    """The DSN without its password or query string, fit for messages and logs."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparsable DSN>"
    if not parts.scheme:
        return "<not a URI>"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return f"{parts.scheme}://{user + '@' if user else ''}{hosts}{parts.path}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
        self._dsn = _check_dsn(dsn)
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
        own = None if node_endpoint is None else parse_endpoint(node_endpoint)
        self._timing = LeaseTiming.of(ttl, margin)
        self._sql = Statements(schema)
        if not (
            isinstance(connect_timeout, int | float)
            and not isinstance(connect_timeout, bool)
            and math.isfinite(connect_timeout)
            and connect_timeout > 0
        ):
            raise ValueError(f"connect_timeout must be > 0 seconds (got {connect_timeout!r})")
        options = dict(connect_options or {})
        reserved = sorted(_RESERVED_OPTIONS & options.keys())
        if reserved:
            raise ValueError(
                f"connect_options may not set {', '.join(reserved)}: pass dsn, password and "
                "connect_timeout to the driver itself"
            )
        super().__init__(
            node_id if node_id is not None else (own or f"postgres-observer:{election}"),
            strict=strict,
        )
        self._election = election
        self._node_endpoint = own
        self._connect_timeout = float(connect_timeout)
        self._password = password
        self._server_settings = {
            "application_name": f"leaderwatch {self.node_id}"[:63],
            "statement_timeout": str(max(1, int(self._timing.call_timeout * 1000))),
            **options.pop("server_settings", {}),
        }
        self._connect_options = options
        self._lock = anyio.Lock()
        self._conn: _Connection | None = None
        self._wake = anyio.Event()
        self._guard_wake = anyio.Event()
        self._dirty = True
        self._next_poll = -math.inf
        self._contact_until = -math.inf
        self._silence_reported = False
        self._outage: str | None = None
        self._view: _View | None = None
        self._tenure: _Tenure | None = None
        self._campaign_in_flight = False
        self._tokens: set[uuid.UUID] = set()
        self._epoch_seen: tuple[int, uuid.UUID | None] | None = None
        """The highest epoch in any row read, and the tenure that held it."""
        self._reported_invalid: tuple[int, str] | None = None
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
    def tenure_epoch(self) -> int | None:
        """The epoch of the lease this node holds now, ``None`` when it holds none."""
        tenure = self._tenure
        return None if tenure is None or tenure.abandoned else tenure.epoch

    @property
    def proven_until(self) -> float:
        """Until when (``anyio.current_time()``) this node's leadership is proven; see the class."""
        tenure = self._tenure
        if tenure is None or tenure.abandoned or not self.campaigning:
            return -math.inf
        return tenure.proven_until

    # -- lifecycle -----------------------------------------------------------------

    async def _start(self, task_group: TaskGroup) -> None:
        if not _on_asyncio():
            raise PostgresElectionError(
                "PostgresElectionDriver runs on anyio's asyncio backend only (its client, "
                "asyncpg, is asyncio-only); run the application with backend='asyncio'"
            )
        sent = anyio.current_time()
        conn, row = await self._open_first()
        self._conn = conn
        self._touch(sent)
        self._set_view(row, sent)
        self._next_poll = sent + self._timing.renew_interval
        self._update()
        task_group.start_soon(self._session_loop)
        task_group.start_soon(self._guard)

    async def _resign(self) -> None:
        # Runs shielded. Publish first: campaigning is already false, so no
        # Leader value can be computed any more.
        self._changed()
        wait = self._timing.resign_wait
        error: str | None = None
        in_flight: _Connection | None = None
        tenure = self._tenure
        if tenure is None and not self._campaign_in_flight:
            return
        with anyio.move_on_after(wait) as scope:
            async with self._lock:
                # A campaign that won while resign() waited for the lock is released too.
                tenure = self._tenure
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
                    except _Failure as failure:
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
                node_id=self.node_id,
                election=self._election,
                epoch=None if tenure is None else tenure.epoch,
                error=error,
            )

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        with anyio.move_on_after(self._timing.resign_wait):
            await conn.close()
        if not conn.is_closed():
            conn.terminate()

    # -- connections ---------------------------------------------------------------

    async def _connect(self, wait: float) -> _Connection:
        """Connect and ``LISTEN`` within ``wait`` seconds; errors are asyncpg's own."""
        with anyio.fail_after(wait):
            conn: _Connection = await asyncpg.connect(
                self._dsn,
                password=self._password,
                timeout=wait,
                server_settings=self._server_settings,
                **self._connect_options,
            )
            try:
                await conn.add_listener(self._sql.channel, self._on_notify)
                conn.add_termination_listener(self._on_terminated)
            except BaseException:
                conn.terminate()
                raise
        return conn

    async def _open_first(self) -> tuple[_Connection, _Row | None]:
        where = _describe_dsn(self._dsn)
        timeout = self._connect_timeout
        try:
            with anyio.fail_after(timeout):
                conn = await self._connect(timeout)
                try:
                    await self._ensure_schema(conn)
                    records = await conn.fetch(self._sql.read, self._election)
                    row = _Row(**dict(records[0])) if records else None
                except BaseException:
                    conn.terminate()
                    raise
        except TimeoutError:
            raise PostgresUnavailable(
                f"no answer from PostgreSQL at {where} within {timeout:g}s; check that the "
                "server runs there and is not overloaded, or raise connect_timeout"
            ) from None
        except _DB_ERRORS as error:
            raise self._start_up_error(where, error) from error
        except ValidationError as error:
            raise PostgresElectionError(
                f"{self.table} at {where} holds a row for election {self._election!r} that is "
                f"not a leaderwatch election row ({error.error_count()} errors, first: "
                f"{error.errors()[0]['msg']}); choose another schema="
            ) from error
        except ValueError as error:
            # asyncpg parses the DSN when connecting and raises ValueError for bad parts.
            raise PostgresDsnError(f"bad DSN {where}: {_one_line(error)}") from error
        _log.info(
            "postgres_connected",
            node_id=self.node_id,
            server=where,
            table=self.table,
            election=self._election,
        )
        return conn, row

    def _start_up_error(self, where: str, error: BaseException) -> PostgresElectionError:
        what = _one_line(error)
        if isinstance(error, asyncpg.InvalidAuthorizationSpecificationError):
            return PostgresAuthError(
                f"PostgreSQL at {where} refused the credentials ({what}); check the user and "
                "password (dsn or password=) and the server's pg_hba.conf"
            )
        if isinstance(error, asyncpg.InsufficientPrivilegeError):
            return PostgresPermissionError(
                f"PostgreSQL at {where} refused access to {self.table} ({what}); grant the role "
                f"CREATE on the database, or create the table beforehand (schema_ddl("
                f"{self._sql.schema!r})) and grant USAGE on schema {self._sql.schema} and "
                f"SELECT, INSERT, UPDATE on {self.table}"
            )
        if isinstance(error, asyncpg.InvalidCatalogNameError):
            return PostgresElectionError(
                f"PostgreSQL at {where}: {what}; create the database or fix the DSN's path"
            )
        if isinstance(
            error,
            asyncpg.UndefinedColumnError
            | asyncpg.DatatypeMismatchError
            | asyncpg.WrongObjectTypeError,
        ):
            return PostgresElectionError(
                f"{self.table} at {where} is not a leaderwatch election table ({what}); "
                "choose another schema="
            )
        if isinstance(error, asyncpg.ClientConfigurationError):
            return PostgresDsnError(f"bad DSN {where}: {what}")
        if isinstance(error, OSError | asyncpg.PostgresConnectionError):
            return PostgresUnavailable(
                f"cannot reach PostgreSQL at {where} ({what}); check that the server runs there "
                "and the DSN's host, port and sslmode"
            )
        return PostgresElectionError(f"PostgreSQL at {where} failed start-up ({what})")

    async def _ensure_schema(self, conn: _Connection) -> None:
        """Create the table and its notify trigger if either is missing (idempotent, race-safe)."""
        sql = self._sql
        found = await conn.fetchrow(sql.check)
        assert found is not None
        if found["table_ok"] and found["trigger_ok"]:
            return
        table_existed = bool(found["table_ok"])
        try:
            async with conn.transaction():
                wait_ms = max(1, int(self._connect_timeout * 1000))
                await conn.execute(f"SET LOCAL statement_timeout = {wait_ms}")
                # Nodes starting together create the objects one after the other.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", sql.lock_key)
                found = await conn.fetchrow(sql.check)
                assert found is not None
                if found["table_ok"] and found["trigger_ok"]:
                    return
                if not found["schema_ok"]:
                    await conn.execute(sql.create_schema)
                await conn.execute(sql.create_objects)
        except asyncpg.InsufficientPrivilegeError as error:
            if not table_existed:
                raise
            _log.warning(
                "postgres_notify_trigger_missing",
                node_id=self.node_id,
                table=self.table,
                error=_one_line(error),
            )
            return
        _log.info("postgres_schema_created", node_id=self.node_id, table=self.table)

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

    # -- the session: one connection, one statement at a time --------------------------

    async def _session_loop(self) -> None:
        backoff = self._timing.backoff()
        while True:
            conn = self._conn
            if conn is None:
                try:
                    conn = await self._connect(self._timing.call_timeout)
                except _DB_ERRORS as error:
                    self._note_failure(_one_line(error))
                    await backoff.wait()
                    continue
                self._conn = conn
                self._dirty = True
            try:
                await self._serve(conn, backoff)
            except _Failure as failure:
                self._note_failure(str(failure))
                if self._conn is conn:
                    self._conn = None
                conn.terminate()
                self._dirty = True
                await backoff.wait()

    def _note_failure(self, error: str) -> None:
        if self._outage is None:
            _log.warning(
                "postgres_request_failed",
                node_id=self.node_id,
                election=self._election,
                error=error,
            )
        self._outage = error

    async def _serve(self, conn: _Connection, backoff: Backoff) -> None:
        while True:
            if conn.is_closed() or self._conn is not conn:
                raise _Failure("connection closed")
            now = anyio.current_time()
            tenure = self._tenure
            if tenure is not None:
                if tenure.abandoned or not self.campaigning:
                    await self._give_up(conn, tenure)
                elif self._dirty or now >= tenure.next_renew:
                    await self._renew(conn, tenure)
                else:
                    await self._sleep_until(tenure.next_renew)
                    continue
            elif self._seeking and (self._dirty or self._view_expired(now)):
                await self._campaign(conn)
            elif self._dirty or now >= self._next_poll:
                await self._read(conn)
            else:
                due = self._next_poll
                view = self._view
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
        return self._node_endpoint is not None and self.campaigning

    def _view_expired(self, now: float) -> bool:
        view = self._view
        return view is None or now >= view.expires_at

    async def _fetch(self, conn: _Connection, query: str, *args: object) -> list[asyncpg.Record]:
        """One statement within the call timeout; failures raise :class:`_Failure`."""
        timeout = self._timing.call_timeout
        try:
            with anyio.fail_after(timeout):
                return await conn.fetch(query, *args)
        except TimeoutError:
            raise _Failure(f"no answer within {timeout:g}s") from None
        except _DB_ERRORS as error:
            raise _Failure(_one_line(error)) from error

    async def _read(self, conn: _Connection) -> None:
        async with self._lock:
            self._dirty = False
            sent = anyio.current_time()
            records = await self._fetch(conn, self._sql.read, self._election)
            self._touch(sent)
            self._set_view(_Row(**dict(records[0])) if records else None, sent)
            self._next_poll = sent + self._timing.renew_interval
            self._changed()

    async def _campaign(self, conn: _Connection) -> None:
        async with self._lock:
            if not self._seeking or self._node_endpoint is None or self._tenure is not None:
                return
            self._dirty = False
            token = uuid.uuid4()
            seen = self._epoch_seen
            floor = max(self._watch.high_water or 0, 0 if seen is None else seen[0])
            self._tokens.add(token)
            sent = anyio.current_time()
            self._campaign_in_flight = True
            try:
                records = await self._fetch(
                    conn,
                    self._sql.campaign,
                    self._election,
                    self._node_endpoint,
                    self.node_id,
                    token,
                    floor,
                    float(self._timing.ttl),
                )
            finally:
                self._campaign_in_flight = False
            self._touch(sent)
            if not records:
                # Lost: the lease is live. Read who holds it (the winner committed by now).
                sent = anyio.current_time()
                records = await self._fetch(conn, self._sql.read, self._election)
                self._touch(sent)
                self._set_view(_Row(**dict(records[0])) if records else None, sent)
                self._next_poll = sent + self._timing.renew_interval
                self._changed()
                return
            row = _Row(**dict(records[0]))
            tenure = _Tenure(token, row.epoch, sent, self._timing)
            self._tenure = tenure
            self._set_view(row, sent)
            self._next_poll = tenure.next_renew
            if not self.campaigning:
                tenure.abandoned = True  # resign() began meanwhile: release, never publish
            self._changed()
            _log.info(
                "postgres_campaign_won",
                node_id=self.node_id,
                election=self._election,
                epoch=row.epoch,
                proven_until=tenure.proven_until,
            )

    async def _renew(self, conn: _Connection, tenure: _Tenure) -> None:
        async with self._lock:
            if self._tenure is not tenure or tenure.abandoned or not self.campaigning:
                return
            self._dirty = False
            sent = anyio.current_time()
            records = await self._fetch(
                conn, self._sql.renew, self._election, tenure.token, float(self._timing.ttl)
            )
            self._touch(sent)
            if records and records[0]["epoch"] == tenure.epoch:
                until = self._timing.proven_until(sent)
                if not tenure.abandoned and until > tenure.proven_until:
                    tenure.acked_send = sent
                    tenure.proven_until = until
                tenure.next_renew = sent + self._timing.renew_interval
                self._next_poll = tenure.next_renew
                self._changed()
                return
            if records:
                # The row keeps this node's token under another epoch: someone edited it.
                tenure.abandoned = True
                reason = "epoch_changed"
            else:
                self._tenure = None
                self._dirty = True
                reason = "renewal_refused"
            self._changed()
            _log.warning(
                "postgres_tenure_lost",
                node_id=self.node_id,
                election=self._election,
                epoch=tenure.epoch,
                reason=reason,
                at=sent,
            )

    async def _give_up(self, conn: _Connection, tenure: _Tenure) -> None:
        async with self._lock:
            if self._tenure is not tenure:
                return
            await self._release_tenure(conn, tenure)

    async def _release_tenure(self, conn: _Connection, tenure: _Tenure) -> None:
        """Expire ``tenure``'s lease now (one statement; the trigger notifies). Lock held."""
        tenure.abandoned = True
        self._changed()
        sent = anyio.current_time()
        await self._fetch(conn, self._sql.release, self._election, tenure.token)
        self._touch(sent)
        self._tenure = None
        self._dirty = True
        self._wake.set()
        _log.info(
            "postgres_lease_released",
            node_id=self.node_id,
            election=self._election,
            epoch=tenure.epoch,
        )

    # -- what this node publishes ---------------------------------------------------

    def _touch(self, sent: float) -> None:
        """The database answered a statement sent at ``sent``."""
        until = sent + self._timing.proof_window
        if until > self._contact_until:
            self._contact_until = until
        self._silence_reported = False
        if self._outage is not None:
            self._outage = None
            _log.info("postgres_reconnected", node_id=self.node_id, election=self._election)

    def _set_view(self, row: _Row | None, sent: float) -> None:
        if row is None:
            self._view = None
            return
        seen = self._epoch_seen
        if seen is None or row.epoch > seen[0]:
            self._epoch_seen = (row.epoch, row.holder_token)
        self._view = _View(row, self._endpoint_of(row), sent)

    def _endpoint_of(self, row: _Row) -> str | None:
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
                    node_id=self.node_id,
                    election=self._election,
                    epoch=row.epoch,
                    holder_endpoint=raw[:300],
                    holder_node_id=row.holder_node_id,
                    reason=str(error),
                )
            return None

    def _state_now(self) -> LeaderState:
        now = anyio.current_time()
        tenure = self._tenure
        if (
            tenure is not None
            and not tenure.abandoned
            and self.campaigning
            and now < tenure.proven_until
        ):
            return Leader(epoch=tenure.epoch)
        view = self._view
        if view is None or now >= self._contact_until or now >= view.expires_at:
            return Unknown()
        row = view.row
        if row.holder_token is not None and row.holder_token in self._tokens:
            return Unknown()  # this node's own tenure, unproven or given up
        if self._node_endpoint is not None and view.endpoint == self._node_endpoint:
            return Unknown()  # never a hint naming this node
        # Statements run one at a time and each view replaces the last, so a row
        # below what this node saw is never a stale read: the database went back.
        high_water = self._watch.high_water
        seen = self._epoch_seen
        behind = high_water is not None and row.epoch < high_water
        reused = seen is not None and row.epoch == seen[0] and row.holder_token != seen[1]
        if behind or reused:
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
                    reason="below_high_water" if behind else "other_holder_at_seen_epoch",
                )
            return Unknown()
        return Follower(leader_endpoint=view.endpoint, leader_epoch=row.epoch)

    def _update(self) -> None:
        if not self._watch.is_closed:
            self._publish(self._state_now())

    def _changed(self) -> None:
        self._update()
        self._guard_wake.set()

    async def _guard(self) -> None:
        """Publish the moment a deadline passes: lease proof, database contact, a row's lease."""
        while True:
            now = anyio.current_time()
            tenure = self._tenure
            if tenure is not None and not tenure.abandoned and now >= tenure.proven_until:
                tenure.abandoned = True
                self._wake.set()
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
            if now >= self._contact_until > -math.inf and not self._silence_reported:
                self._silence_reported = True
                _log.warning(
                    "postgres_unreachable",
                    node_id=self.node_id,
                    election=self._election,
                    silent_for=round(now - self._contact_until + self._timing.proof_window, 3),
                )
            self._update()
            deadlines = [self._contact_until]
            if tenure is not None and not tenure.abandoned:
                deadlines.append(tenure.proven_until)
            if self._view is not None:
                deadlines.append(self._view.expires_at)
            upcoming = [deadline for deadline in deadlines if deadline > now]
            wake = self._guard_wake = anyio.Event()
            with anyio.move_on_at(min(upcoming, default=math.inf)):
                await wake.wait()

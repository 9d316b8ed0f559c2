"""The one boundary to asyncpg: connecting, ``LISTEN``, statement deadlines, error mapping.

asyncpg runs on asyncio only; this module and the statements in
:mod:`._tenure` are where the driver relies on asyncio (through asyncpg).
Every asyncpg error is mapped here: at start-up to one of this driver's
errors (:meth:`Connector.open_first`), afterwards to :class:`StatementFailed`
(:func:`fetch`), which the session answers by reconnecting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias
from urllib.parse import urlsplit

import anyio
import asyncpg
from pydantic import ValidationError

from leaderwatch._log import get_logger
from leaderwatch.drivers.postgres._errors import (
    PostgresAuthError,
    PostgresDsnError,
    PostgresElectionError,
    PostgresPermissionError,
    PostgresUnavailable,
)
from leaderwatch.drivers.postgres._rows import Row
from leaderwatch.drivers.postgres._sql import TABLE, Statements

if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record]

__all__ = [
    "DB_ERRORS",
    "Connector",
    "StatementFailed",
    "check_dsn",
    "describe_dsn",
    "fetch",
    "on_asyncio",
    "one_line",
]

_log = get_logger("leaderwatch.drivers.postgres")

_RESERVED_OPTIONS: Final = frozenset({"dsn", "password", "timeout", "loop"})
DB_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # Raised by a connection the server just ended (its protocol still awaits the end).
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
"""What a statement or a connection attempt may raise when the database misbehaves."""

NotifyHandler: TypeAlias = Callable[[object, int, str, object], None]
TerminationHandler: TypeAlias = Callable[[object], None]


class StatementFailed(PostgresElectionError):
    """A statement failed or timed out; the session reconnects and retries (never raised out)."""


def on_asyncio() -> bool:
    """Whether the running async library is asyncio (asyncpg needs it)."""
    try:
        import sniffio
    except ImportError:  # pragma: no cover - trio depends on sniffio
        return True
    try:
        return sniffio.current_async_library() == "asyncio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


def check_dsn(dsn: str) -> str:
    """Return ``dsn`` if it is a ``postgresql://`` URI, else raise :class:`PostgresDsnError`."""
    if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
        shown = describe_dsn(dsn) if isinstance(dsn, str) else repr(dsn)
        raise PostgresDsnError(
            f"dsn must be a postgresql://user[:password]@host[:port]/database URI (got {shown})"
        )
    return dsn


def describe_dsn(dsn: str) -> str:
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


def one_line(error: BaseException) -> str:
    """``error`` as ``Type: message`` on one line, for logs and messages."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def fetch(conn: Connection, within: float, query: str, *args: object) -> list[asyncpg.Record]:
    """Run one statement within ``within`` seconds; any failure raises :class:`StatementFailed`."""
    try:
        with anyio.fail_after(within):
            return await conn.fetch(query, *args)
    except TimeoutError:
        raise StatementFailed(f"no answer within {within:g}s") from None
    except DB_ERRORS as error:
        raise StatementFailed(one_line(error)) from error


class Connector:
    """Opens connections to one database, each listening on the election's channel.

    Validates ``connect_timeout`` and ``connect_options`` on construction
    (``ValueError`` naming the rule). Every connection carries
    ``application_name`` and a ``statement_timeout`` of ``call_timeout``, so
    the server bounds each statement as the client does.
    """

    def __init__(
        self,
        dsn: str,
        *,
        sql: Statements,
        election: str,
        node_id: str,
        call_timeout: float,
        connect_timeout: float,
        password: str | None,
        connect_options: Mapping[str, Any] | None,
    ) -> None:
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
        self._dsn = dsn
        self._sql = sql
        self._election = election
        self._node_id = node_id
        self._table = f"{sql.schema}.{TABLE}"
        self.connect_timeout = float(connect_timeout)
        self._password = password
        self._server_settings = {
            "application_name": f"leaderwatch {node_id}"[:63],
            "statement_timeout": str(max(1, int(call_timeout * 1000))),
            **options.pop("server_settings", {}),
        }
        self._connect_options = options

    async def connect(
        self, wait: float, on_notify: NotifyHandler, on_terminated: TerminationHandler
    ) -> Connection:
        """Connect and ``LISTEN`` within ``wait`` seconds; errors are asyncpg's own."""
        with anyio.fail_after(wait):
            conn: Connection = await asyncpg.connect(
                self._dsn,
                password=self._password,
                timeout=wait,
                server_settings=self._server_settings,
                **self._connect_options,
            )
            try:
                await conn.add_listener(self._sql.channel, on_notify)
                conn.add_termination_listener(on_terminated)
            except BaseException:
                conn.terminate()
                raise
        return conn

    async def open_first(
        self, on_notify: NotifyHandler, on_terminated: TerminationHandler
    ) -> tuple[Connection, Row | None]:
        """Connect, create the table if missing and read the row, within ``connect_timeout``.

        Raises :class:`PostgresUnavailable`, :class:`PostgresAuthError`,
        :class:`PostgresPermissionError`, :class:`PostgresDsnError` or
        :class:`PostgresElectionError`, each naming the server (never the password).
        """
        where = describe_dsn(self._dsn)
        timeout = self.connect_timeout
        try:
            with anyio.fail_after(timeout):
                conn = await self.connect(timeout, on_notify, on_terminated)
                try:
                    await self._ensure_schema(conn)
                    records = await conn.fetch(self._sql.read, self._election)
                    row = Row(**dict(records[0])) if records else None
                except BaseException:
                    conn.terminate()
                    raise
        except TimeoutError:
            raise PostgresUnavailable(
                f"no answer from PostgreSQL at {where} within {timeout:g}s; check that the "
                "server runs there and is not overloaded, or raise connect_timeout"
            ) from None
        except DB_ERRORS as error:
            raise self._start_up_error(where, error) from error
        except ValidationError as error:
            raise PostgresElectionError(
                f"{self._table} at {where} holds a row for election {self._election!r} that is "
                f"not a leaderwatch election row ({error.error_count()} errors, first: "
                f"{error.errors()[0]['msg']}); choose another schema="
            ) from error
        except ValueError as error:
            # asyncpg parses the DSN when connecting and raises ValueError for bad parts.
            raise PostgresDsnError(f"bad DSN {where}: {one_line(error)}") from error
        _log.info(
            "postgres_connected",
            node_id=self._node_id,
            server=where,
            table=self._table,
            election=self._election,
        )
        return conn, row

    def _start_up_error(self, where: str, error: BaseException) -> PostgresElectionError:
        what = one_line(error)
        if isinstance(error, asyncpg.InvalidAuthorizationSpecificationError):
            return PostgresAuthError(
                f"PostgreSQL at {where} refused the credentials ({what}); check the user and "
                "password (dsn or password=) and the server's pg_hba.conf"
            )
        if isinstance(error, asyncpg.InsufficientPrivilegeError):
            return PostgresPermissionError(
                f"PostgreSQL at {where} refused access to {self._table} ({what}); grant the role "
                f"CREATE on the database, or create the table beforehand (schema_ddl("
                f"{self._sql.schema!r})) and grant USAGE on schema {self._sql.schema} and "
                f"SELECT, INSERT, UPDATE on {self._table}"
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
                f"{self._table} at {where} is not a leaderwatch election table ({what}); "
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

    async def _ensure_schema(self, conn: Connection) -> None:
        """Create the table and its notify trigger if either is missing (idempotent, race-safe)."""
        sql = self._sql
        found = await conn.fetchrow(sql.check)
        assert found is not None
        if found["table_ok"] and found["trigger_ok"]:
            return
        table_existed = bool(found["table_ok"])
        try:
            async with conn.transaction():
                wait_ms = max(1, int(self.connect_timeout * 1000))
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
                node_id=self._node_id,
                table=self._table,
                error=one_line(error),
            )
            return
        _log.info("postgres_schema_created", node_id=self._node_id, table=self._table)

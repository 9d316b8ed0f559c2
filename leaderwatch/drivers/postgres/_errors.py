"""The errors the PostgreSQL driver raises at start-up: one type per thing to fix."""

from __future__ import annotations

from leaderwatch.errors import LeaderwatchError

__all__ = [
    "PostgresAuthError",
    "PostgresDsnError",
    "PostgresElectionError",
    "PostgresPermissionError",
    "PostgresUnavailable",
]


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

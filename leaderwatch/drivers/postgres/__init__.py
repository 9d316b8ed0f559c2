"""Leader election on a PostgreSQL table (``pip install 'leaderwatch[postgres]'``).

Candidates share one row per election in ``<schema>.elections``: a lease on
the database server's clock, taken by one atomic statement when it expired
and renewed by its holder, and an epoch that grows by one with every new
tenure. A trigger ``NOTIFY``s every change of holder, so a graceful
hand-over takes a round trip, not a poll. See :class:`PostgresElectionDriver`
and the Drivers page for the table, the timing bounds and the failure modes.

The client is asyncpg, so the driver runs on anyio's asyncio backend only.
"""

from __future__ import annotations

from leaderwatch.drivers.postgres._errors import (
    PostgresAuthError,
    PostgresDsnError,
    PostgresElectionError,
    PostgresPermissionError,
    PostgresUnavailable,
)
from leaderwatch.drivers.postgres._sql import schema_ddl
from leaderwatch.drivers.postgres.driver import PostgresElectionDriver

__all__ = [
    "PostgresAuthError",
    "PostgresDsnError",
    "PostgresElectionDriver",
    "PostgresElectionError",
    "PostgresPermissionError",
    "PostgresUnavailable",
    "schema_ddl",
]

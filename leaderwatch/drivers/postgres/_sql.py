"""The SQL of the PostgreSQL election: the table, its notify trigger and every statement.

One table per schema, ``<schema>.elections``, one row per election. Each
statement is one autocommit statement, so each is atomic on its own and the
server's clock (``now()``, the statement's transaction start) decides every
lease question.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

__all__ = ["TABLE", "TRIGGER", "Statements", "check_schema_name", "schema_ddl"]

TABLE: Final = "elections"
TRIGGER: Final = "elections_notify"
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def check_schema_name(schema: str) -> str:
    """Return ``schema`` if it is a plain lowercase SQL identifier, else raise ``ValueError``.

    Plain names need no quoting, so operators can type ``leaderwatch.elections``
    as is, and the name doubles as the ``NOTIFY`` channel.
    """
    if not isinstance(schema, str) or _SCHEMA_NAME.fullmatch(schema) is None:
        raise ValueError(
            "schema must be a lowercase SQL identifier: a-z, 0-9 and _, not starting with a "
            f"digit, at most 63 characters (got {schema!r})"
        )
    return schema


def schema_ddl(schema: str = "leaderwatch") -> str:
    """The DDL that creates the election table and its notify trigger in ``schema``.

    The driver runs it itself when the table is missing; an operator who
    prefers to create the table beforehand (and grant the nodes only
    ``SELECT, INSERT, UPDATE`` on it and ``USAGE`` on the schema) runs this.
    """
    name = check_schema_name(schema)
    return f"CREATE SCHEMA IF NOT EXISTS {name};\n\n" + _objects_ddl(name)


def _objects_ddl(name: str) -> str:
    return f"""\
CREATE TABLE IF NOT EXISTS {name}.{TABLE} (
    election         text        PRIMARY KEY,
    epoch            bigint      NOT NULL CHECK (epoch >= 0),
    holder_endpoint  text,
    holder_node_id   text,
    holder_token     uuid,
    lease_expires_at timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE {name}.{TABLE} IS
    'leaderwatch elections: the holder leads at epoch while lease_expires_at > now()';

CREATE OR REPLACE FUNCTION {name}.{TRIGGER}() RETURNS trigger
LANGUAGE plpgsql AS $body$
BEGIN
    -- A renewal (same tenure, later expiry) changes nothing an observer shows.
    IF TG_OP = 'UPDATE'
       AND NEW.epoch = OLD.epoch
       AND NEW.holder_token IS NOT DISTINCT FROM OLD.holder_token
       AND NEW.holder_endpoint IS NOT DISTINCT FROM OLD.holder_endpoint
       AND NEW.holder_node_id IS NOT DISTINCT FROM OLD.holder_node_id
       AND NEW.lease_expires_at >= OLD.lease_expires_at THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify(TG_TABLE_SCHEMA, COALESCE(NEW.election, OLD.election));
    RETURN NULL;
END
$body$;

DROP TRIGGER IF EXISTS {TRIGGER} ON {name}.{TABLE};
CREATE TRIGGER {TRIGGER}
    AFTER INSERT OR UPDATE OR DELETE ON {name}.{TABLE}
    FOR EACH ROW EXECUTE FUNCTION {name}.{TRIGGER}();
"""


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"leaderwatch schema {schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Statements:
    """Every statement the driver sends, for one schema.

    Row columns returned by :attr:`read`: ``epoch, holder_endpoint,
    holder_node_id, holder_token, lease_remaining`` (seconds until the lease
    expires on the server's clock; zero or negative once it has).
    """

    def __init__(self, schema: str) -> None:
        name = check_schema_name(schema)
        table = f"{name}.{TABLE}"
        self.schema = name
        self.channel = name
        self.lock_key = _lock_key(name)
        self.create_schema = f"CREATE SCHEMA IF NOT EXISTS {name}"
        self.create_objects = _objects_ddl(name)
        self.check = f"""
            SELECT to_regnamespace('{name}') IS NOT NULL AS schema_ok,
                   to_regclass('{table}') IS NOT NULL AS table_ok,
                   EXISTS (SELECT 1 FROM pg_trigger
                           WHERE tgrelid = to_regclass('{table}') AND tgname = '{TRIGGER}')
                       AS trigger_ok"""
        self.read = f"""
            SELECT epoch, holder_endpoint, holder_node_id, holder_token,
                   EXTRACT(EPOCH FROM lease_expires_at - now())::float8 AS lease_remaining
            FROM {table} WHERE election = $1"""
        # $1 election, $2 endpoint, $3 node id, $4 token, $5 epoch floor, $6 ttl (s).
        # Takes the lease only if it expired on the server's clock; the new epoch
        # is above both the row's and the campaigner's high-water mark.
        self.campaign = f"""
            INSERT INTO {table} AS e (election, epoch, holder_endpoint, holder_node_id,
                                      holder_token, lease_expires_at, updated_at)
            VALUES ($1, $5::bigint + 1, $2, $3, $4, now() + make_interval(secs => $6), now())
            ON CONFLICT (election) DO UPDATE
                SET epoch = GREATEST(e.epoch, $5::bigint) + 1,
                    holder_endpoint = EXCLUDED.holder_endpoint,
                    holder_node_id = EXCLUDED.holder_node_id,
                    holder_token = EXCLUDED.holder_token,
                    lease_expires_at = EXCLUDED.lease_expires_at,
                    updated_at = EXCLUDED.updated_at
                WHERE e.lease_expires_at <= now()
            RETURNING e.epoch, e.holder_endpoint, e.holder_node_id, e.holder_token,
                      EXTRACT(EPOCH FROM e.lease_expires_at - now())::float8 AS lease_remaining"""
        # $1 election, $2 token, $3 ttl (s): extends only this tenure's live lease.
        self.renew = f"""
            UPDATE {table}
            SET lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
            WHERE election = $1 AND holder_token = $2 AND lease_expires_at > now()
            RETURNING epoch"""
        # $1 election, $2 token: expires this tenure's lease now (the trigger notifies).
        self.release = f"""
            UPDATE {table}
            SET lease_expires_at = now(), updated_at = now()
            WHERE election = $1 AND holder_token = $2 AND lease_expires_at > now()"""

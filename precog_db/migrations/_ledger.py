"""The ledger: ``precog_meta.schema_migrations``, one row per file applied (or baselined) to a database.

Creating it (`ensure_ledger`), reading it (`read_ledger`), recording a
baseline (`baseline`), and who is recorded as having applied a file
(`applied_by`). Writing the row of one applied or reverted file is
`_apply`'s, in the file's own transaction.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import Connection
from psycopg.rows import tuple_row

from precog_db._secrets import current_os_user
from precog_db.errors import ConfigurationError, MigrationValidationError
from precog_db.migrations._files import MigrationFile
from precog_db.stamp import SCHEMA

__all__ = [
    "LEDGER",
    "RETURNING",
    "AppliedMigration",
    "applied_by",
    "applied_from_row",
    "baseline",
    "ensure_ledger",
    "read_ledger",
]

#: The ledger table, one row per applied (or baselined) file.
LEDGER = f"{SCHEMA}.schema_migrations"

#: What an INSERT into the ledger returns, in the order `applied_from_row` reads.
RETURNING = "RETURNING version, name, checksum, kind, applied_by, applied_role, applied_at, duration_ms"

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {LEDGER} (
    version integer PRIMARY KEY CHECK (version > 0),
    name text NOT NULL,
    checksum text NOT NULL,
    kind text NOT NULL DEFAULT 'applied' CHECK (kind IN ('applied', 'baseline')),
    applied_by text NOT NULL,
    applied_role text NOT NULL DEFAULT current_user,
    applied_at timestamptz NOT NULL DEFAULT now(),
    duration_ms integer NOT NULL DEFAULT 0
);
COMMENT ON TABLE {LEDGER} IS
    'Migrations applied to this database by precog-db migrate (one row per file). Do not edit by hand.';
"""


@dataclass(frozen=True)
class AppliedMigration:
    """One row of the ledger."""

    version: int
    name: str
    checksum: str
    kind: str
    applied_by: str
    applied_role: str
    applied_at: datetime
    duration_ms: int


def ensure_ledger(conn: Connection[Any]) -> None:
    """Create ``precog_meta.schema_migrations`` if it does not exist (call it holding the lock)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (LEDGER,))
        row = cur.fetchone()
        if not (row and row[0]):
            cur.execute(_DDL)


def read_ledger(conn: Connection[Any]) -> dict[int, AppliedMigration]:
    """The ledger by version; empty when the database has none yet."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (LEDGER,))
        row = cur.fetchone()
        if not (row and row[0]):
            return {}
        cur.execute(
            "SELECT version, name, checksum, kind, applied_by, applied_role, applied_at, duration_ms "
            f"FROM {LEDGER} ORDER BY version"
        )
        return {int(r[0]): applied_from_row(r) for r in cur.fetchall()}


def applied_from_row(row: Sequence[Any]) -> AppliedMigration:
    """An `AppliedMigration` from a row in `RETURNING` order."""
    return AppliedMigration(
        version=int(row[0]),
        name=str(row[1]),
        checksum=str(row[2]),
        kind=str(row[3]),
        applied_by=str(row[4]),
        applied_role=str(row[5]),
        applied_at=row[6],
        duration_ms=int(row[7]),
    )


def applied_by() -> str:
    """``user@machine`` for the ledger."""
    return f"{current_os_user()}@{socket.gethostname()}"


def baseline(conn: Connection[Any], files: Sequence[MigrationFile], version: int) -> list[AppliedMigration]:
    """Record every file up to ``version`` as already applied (kind ``baseline``) in an empty ledger.

    For a database that existed before the ledger: write its current schema
    as migration files, then baseline at the last of them. Hold the lock.
    """
    upto = [f for f in files if f.version <= version]
    if not any(f.version == version for f in files):
        raise ConfigurationError(
            f"there is no migration file with version {version}; baseline marks existing files as applied, "
            "so write the file that describes the current schema first"
        )
    ensure_ledger(conn)
    ledger = read_ledger(conn)
    if ledger:
        raise MigrationValidationError(
            f"the ledger already records {len(ledger)} migration(s) (latest {max(ledger)}); baseline is only "
            "for a database that has none. Nothing was changed"
        )
    who = applied_by()
    out: list[AppliedMigration] = []
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        for f in upto:
            cur.execute(
                f"INSERT INTO {LEDGER} (version, name, checksum, kind, applied_by, duration_ms) "
                f"VALUES (%s, %s, %s, 'baseline', %s, 0) {RETURNING}",
                (f.version, f.name, f.checksum, who),
            )
            row = cur.fetchone()
            assert row is not None
            out.append(applied_from_row(row))
    return out

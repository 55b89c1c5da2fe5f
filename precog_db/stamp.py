"""The identity stamp: the database itself says which environment it belongs to.

Environment variables lie (a stale shell export, a copied ``.env``), so each
database can carry a one-row table, ``precog_meta.stamp``, recording the
environment it belongs to, who stamped it and when, the database name and the
cluster's ``system_identifier`` (from ``pg_control_system()``).

`stamp_database` writes it; `read_stamp` reads it; `verify_stamp` is what the
pool runs once, on its probe connection, when it opens:

* stamped with another environment than the resolved one: `EnvironmentMismatchError`;
* unstamped ``staging`` / ``prod``: `UnstampedDatabaseError` with the command that stamps it;
* unstamped ``dev`` / ``test``: allowed, with a ``database_unstamped`` warning;
* a restored copy (the stamp names another database or another cluster) of
  another environment: `RestoredCopyError`, saying it is a copy and giving the
  one command that re-stamps it. A copy of the *same* environment is allowed
  with a ``database_copy_detected`` warning.

`stamp_database` and `read_stamp` open their connection through the chokepoint
(`precog_db.connection`). The record, the reading steps and the decision, which
the chokepoint itself runs on every new connection, live in
`precog_db._stamp_check` and are re-exported here, with the I/O that reads and
verifies it over a given connection (`read_stamp_on`, `verify_stamp`,
`cluster_system_identifier`: `precog_db._stamp_sync`, generated from its
asyncio source `precog_db._stamp_async`, whose functions have the same names).
``aread_stamp_on`` and ``averify_stamp`` (same arguments, on an
``AsyncConnection``) are deprecated aliases of the asyncio ones, kept for
existing callers; the chokepoint already verifies every connection of either
layer when it opens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import Connection
from psycopg.rows import tuple_row

from precog_db._secrets import current_os_user
from precog_db._stamp_async import read_stamp_on as aread_stamp_on
from precog_db._stamp_async import verify_stamp as averify_stamp
from precog_db._stamp_check import (
    COLUMNS,
    CURRENT_OID,
    SCHEMA,
    TABLE,
    Stamp,
    judge_stamp,
    privilege_error,
    read_steps,
    stamp_command,
)
from precog_db._stamp_sync import cluster_system_identifier, read_stamp_on, verify_stamp
from precog_db._steps_sync import run
from precog_db.connection import connect, direct_settings
from precog_db.environment import Environment, parse_environment
from precog_db.errors import EnvironmentMismatchError, ProductionAccessError
from precog_db.guard import production_confirmed
from precog_db.log import get_logger
from precog_db.settings import DatabaseSettings, load_settings, settings_for

__all__ = [
    "SCHEMA",
    "TABLE",
    "Stamp",
    "aread_stamp_on",
    "averify_stamp",
    "cluster_system_identifier",
    "judge_stamp",
    "read_stamp",
    "read_stamp_on",
    "restamp_on",
    "stamp_command",
    "stamp_database",
    "verify_stamp",
]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

#: Serializes concurrent stampers of one database (any constant works; this is "precog_stamp" in ASCII).
_LOCK_KEY = 0x707265636F675F73


_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {TABLE} (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    env text NOT NULL CHECK (env IN ('dev', 'test', 'staging', 'prod')),
    dbname text NOT NULL,
    system_identifier bigint,
    stamped_by text NOT NULL,
    stamped_role text NOT NULL DEFAULT current_user,
    stamped_at timestamptz NOT NULL DEFAULT now(),
    library_version text NOT NULL,
    database_oid oid
);
COMMENT ON TABLE {TABLE} IS
    'Which environment this database belongs to. Written by precog_db stamp_database '
    '(precog-db --env <env> stamp); checked by precog_db whenever a pool opens. One row.';
GRANT USAGE ON SCHEMA {SCHEMA} TO PUBLIC;
GRANT SELECT ON {TABLE} TO PUBLIC;
"""

#: Stamps written before database_oid existed gain the column when they are next written.
_ADD_OID = f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS database_oid oid"
_UPSERT = f"""
INSERT INTO {TABLE} (
    singleton, env, dbname, system_identifier, stamped_by, stamped_role, stamped_at, library_version, database_oid
)
VALUES (true, %s, current_database(), %s, %s, current_user, now(), %s, {CURRENT_OID})
ON CONFLICT (singleton) DO UPDATE SET
    env = EXCLUDED.env,
    dbname = EXCLUDED.dbname,
    system_identifier = EXCLUDED.system_identifier,
    stamped_by = EXCLUDED.stamped_by,
    stamped_role = EXCLUDED.stamped_role,
    stamped_at = EXCLUDED.stamped_at,
    library_version = EXCLUDED.library_version,
    database_oid = EXCLUDED.database_oid
RETURNING {COLUMNS}
"""


def _library_version() -> str:
    from precog_db import __version__  # the one place the version is written

    return __version__


# --- reading on demand ---------------------------------------------------------------------


def read_stamp(settings: DatabaseSettings | None = None) -> Stamp | None:
    """Connect to the configured database and return its stamp, or None when it is unstamped.

    ``settings`` defaults to `load_settings()`. Reading production needs
    ``PRECOG_PROD_CONFIRMED=yes`` like any other production access.
    """
    if settings is None:
        settings = load_settings()
    # Behind a transaction pooler the stamp is read on DB_DIRECT_HOST, and messages name that server.
    settings = direct_settings(settings, operation="read the identity stamp")
    conn = connect(settings, operation="read the identity stamp", verify=False)
    try:
        return read_stamp_on(conn, settings)
    finally:
        conn.close()


# --- writing ----------------------------------------------------------------------------


def stamp_database(
    env: str | Environment | None = None,
    *,
    force: bool = False,
    settings: DatabaseSettings | None = None,
) -> Stamp:
    """Stamp the configured database as belonging to ``env``; return the new stamp.

    ``settings`` defaults to `load_settings(env)`; ``env`` defaults to the
    settings' environment. Stamping again with the same environment refreshes
    the stamp (who, when, database name, cluster). A database stamped with
    another environment needs ``force=True``. Stamping ``prod`` needs
    ``PRECOG_PROD_CONFIRMED=yes``, and so does re-stamping a database stamped
    ``prod`` as anything else, unless it is a restored copy.
    """
    settings = settings_for(env, settings, caller="stamp_database")
    operation = f"write the {settings.env.value} identity stamp"
    # Behind a transaction pooler the stamp is written on DB_DIRECT_HOST, and messages and logs name that server.
    settings = direct_settings(settings, operation=operation)
    conn = connect(settings, operation=operation, verify=False)
    try:
        return _write(conn, settings, force=force)
    finally:
        conn.close()


def restamp_on(conn: Connection[Any], settings: DatabaseSettings, *, accept: Callable[[Stamp], None]) -> Stamp:
    """Re-stamp (``force``) the database of ``conn``, an open connection its caller pinned and checked.

    ``accept(previous)`` runs on the stamp being replaced, read under the
    stamp's lock in the writing transaction, and raises to refuse
    (`precog_db.backup.restore_database` refuses a staging or prod stamp that
    is not the one its archive brought in). ``conn`` must be autocommit, as
    `connect` makes it; the caller closes it.
    """
    return _write(conn, settings, force=True, accept=accept)


def _write(
    conn: Connection[Any], settings: DatabaseSettings, *, force: bool, accept: Callable[[Stamp], None] | None = None
) -> Stamp:
    target = settings.env
    current_id = cluster_system_identifier(conn)
    if current_id is None:
        log.warning(
            "stamp_without_system_identifier",
            dbname=settings.dbname,
            role=settings.user,
            reason="pg_control_system() is not readable by this role; copies will be detected by name only",
            fix=f"stamp as a role that may run pg_control_system(), e.g. GRANT EXECUTE ON FUNCTION "
            f"pg_control_system() TO {settings.user}",
        )
    try:
        with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,))
            row = cur.fetchone()
            if not (row and row[0]):
                cur.execute(_DDL)
            else:
                cur.execute(_ADD_OID)
            previous = run(conn, read_steps(for_update=True))
            if previous is not None and accept is not None:
                accept(previous)
            if previous is not None and previous.env is not target:
                _check_restamp(settings, previous, force=force)
            cur.execute(_UPSERT, (target.value, current_id, current_os_user(), _library_version()))
            written = cur.fetchone()
            assert written is not None
            cur.execute("SELECT current_database()")
            db_row = cur.fetchone()
    except psycopg.errors.InsufficientPrivilege:
        raise privilege_error(
            settings,
            f"create or update {TABLE}",
            "stamp as the database owner or a superuser (set DB_USER/DB_PASSWORD for that role just for "
            f"this command), or grant CREATE on the database and UPDATE on {TABLE} to this role",
        ) from None
    stamp = Stamp(
        env=parse_environment(written[0]),
        dbname=str(written[1]),
        system_identifier=None if written[2] is None else int(written[2]),
        stamped_by=str(written[3]),
        stamped_role=str(written[4]),
        stamped_at=written[5],
        library_version=str(written[6]),
        current_dbname=str(db_row[0]) if db_row else str(written[1]),
        current_system_identifier=current_id,
        database_oid=None if written[7] is None else int(written[7]),
        current_database_oid=None if written[7] is None else int(written[7]),
    )
    log.info(
        "database_stamped",
        env=target.value,
        previous_env=None if previous is None else previous.env.value,
        previous_was_copy=None if previous is None else previous.is_copy,
        dbname=stamp.dbname,
        host=settings.host,
        port=settings.port,
        os_user=stamp.stamped_by,
        system_identifier=stamp.system_identifier,
    )
    return stamp


def _check_restamp(settings: DatabaseSettings, previous: Stamp, *, force: bool) -> None:
    target = settings.env
    if not force:
        raise EnvironmentMismatchError(
            f"the {settings.describe()} is {previous.describe()}; stamping it {target.value} "
            f"replaces that, so it needs force=True (`{stamp_command(target, force=True)}`). "
            "Check first that you are connected to the database you think you are"
        )
    if previous.env is Environment.PROD and not previous.provably_another_database:
        # Turning the real production database into anything else disarms every
        # check that protects it, so it is production access like any other.
        # Only a copy proven to be another database (another cluster, or another
        # OID on this one) is exempt: a renamed prod database keeps its OID, and
        # an old stamp without one cannot tell a rename from a copy.
        if not production_confirmed():
            raise ProductionAccessError(
                f"refusing to re-stamp the production database as {target.value}: the {settings.describe()} is "
                f"{previous.describe()}, and nothing proves it is a copy rather than that database itself "
                f"({previous.copy_reason or 'the same database'}; a renamed database keeps its identity). "
                "Set PRECOG_PROD_CONFIRMED=yes in the environment of this process to confirm that you mean to "
                "turn it into a non-production database"
            )
        log.warning(
            "production_access",
            operation=f"re-stamp the production database as {target.value}",
            os_user=current_os_user(),
            host=settings.host,
            port=settings.port,
            dbname=settings.dbname,
            user=settings.user,
            env=Environment.PROD.value,
        )

"""A test database that builds itself: created when missing, migrated once, before the tests start.

The pytest plugin calls `build_test_database` from its session guard, after
the guard's checks on the settings (environment ``test``, a name that names
test) and before its connection probe, so a fresh checkout needs neither
``createdb`` nor a manual ``migrate up`` before ``pytest``:

1. the database is created (from the maintenance database, default
   ``postgres``) when it does not exist, and stamped ``test``;
2. with ``rebuild`` (``--precog-create-db``) an existing database is dropped
   and created again first, once per run (a comment on the database records
   the run, so xdist workers do it once between them);
3. with a migrations directory (the ``precog_migrations_dir`` ini option),
   the pending migrations are applied under the migration lock, exactly as
   ``precog-db migrate up`` applies them (`precog_db.migrations.apply_migration`).

Everything runs inside `precog_db.connection.gate_allows` for ``test`` only
and re-checks the settings itself: whatever calls it, no other environment's
database is created, dropped or migrated. All of it happens under one
advisory lock (``lock_key``, taken on the maintenance database), the same one
the plugin holds while it clones the xdist template, so a database is never
migrated while it is being cloned, and two workers never create it twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import Connection, sql

from precog_db.connection import connect, gate_allows
from precog_db.environment import Environment, environment_named_by
from precog_db.errors import EnvironmentNotAllowedError
from precog_db.migrations import apply_migration, discover, ensure_ledger, migration_lock, pending, read_ledger
from precog_db.settings import DatabaseSettings
from precog_db.stamp import stamp_database

__all__ = ["build_test_database", "database_missing", "migrate_database"]

_OPERATION = "build the test database"


def _refuse_unless_test(settings: DatabaseSettings) -> None:
    if settings.env is not Environment.TEST or environment_named_by(settings.dbname) is not Environment.TEST:
        raise EnvironmentNotAllowedError(
            f"{_OPERATION} works only on a test database whose name names test, not the {settings.describe()}; "
            "nothing was created, dropped or migrated"
        )


def _comment(admin: Connection[Any], name: str) -> tuple[bool, str | None]:
    row = admin.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    return (row is not None, None if row is None else row[0])


def migrate_database(settings: DatabaseSettings, directory: Path) -> list[str]:
    """Apply the pending migrations in ``directory`` to the test database ``settings``; the files applied."""
    _refuse_unless_test(settings)
    applied: list[str] = []
    with gate_allows(_OPERATION, (Environment.TEST,)):
        files = discover(directory)
        conn = connect(settings.replace(application_name="precog-db pytest migrate"), operation=_OPERATION, direct=True)
        try:
            with migration_lock(conn, timeout=300):
                ensure_ledger(conn)
                for migration in pending(files, read_ledger(conn)):
                    apply_migration(conn, migration)
                    applied.append(migration.filename)
        finally:
            conn.close()
    return applied


def build_test_database(
    settings: DatabaseSettings,
    *,
    maintenance_db: str = "postgres",
    migrations_dir: Path | None = None,
    rebuild: bool = False,
    run_id: str = "",
    lock_key: int = 0,
    note: Callable[[str], None] | None = None,
) -> None:
    """Create the test database if missing (or once per ``run_id`` when ``rebuild``), then migrate it.

    See the module docstring. ``note`` receives one line per thing done, for
    the session summary. Raises `EnvironmentNotAllowedError` for anything but
    a test target, `psycopg.Error` when the server refuses (e.g. no CREATEDB).
    """
    _refuse_unless_test(settings)
    tell = note if note is not None else (lambda _line: None)
    marker = f"precog_db test database rebuilt for run {run_id}"
    with gate_allows(_OPERATION, (Environment.TEST,)):
        admin = connect(settings.replace(dbname=maintenance_db), operation=_OPERATION, verify=False, direct=True)
        try:
            admin.execute("SELECT pg_advisory_lock(%s)", (lock_key,))
            try:
                exists, comment = _comment(admin, settings.dbname)
                name = sql.Identifier(settings.dbname)
                if exists and rebuild and comment != marker:
                    admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name))
                    exists = False
                    tell(f"dropped test database {settings.dbname} (--precog-create-db)")
                if not exists:
                    admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
                    if rebuild:
                        admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(name, sql.Literal(marker)))
                    stamp_database(Environment.TEST, settings=settings)
                    tell(f"created test database {settings.dbname}")
                if migrations_dir is not None:
                    applied = migrate_database(settings, migrations_dir)
                    tell(
                        f"applied {len(applied)} migration(s) from {migrations_dir} to {settings.dbname}"
                        + (f": {', '.join(applied)}" if applied else " (up to date)")
                    )
            finally:
                if not admin.closed and not admin.broken:
                    admin.execute("SELECT pg_advisory_unlock(%s)", (lock_key,))
        finally:
            admin.close()


def database_missing(exc: BaseException) -> bool:
    """True when ``exc`` (or what it was raised from) says the database does not exist (SQLSTATE 3D000)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, psycopg.errors.InvalidCatalogName):
            return True
        if "does not exist" in str(seen) and "database" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False

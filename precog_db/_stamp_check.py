"""The identity stamp as read from a database, and the decision on it; import these from `precog_db.stamp`.

`Stamp` (the record), the reading steps (sans-I/O, `precog_db._steps`) and
`judge_stamp` (the rules, see `precog_db.stamp`), driven by `verify_stamp`
(`precog_db._stamp_async`, and `precog_db._stamp_sync` generated from it) over
a connection it is given. The chokepoint (`precog_db._connection_async` and
its generated sync twin) runs it on every new connection; `precog_db.stamp`,
which writes the stamp and reads it on demand through that chokepoint, builds on this module. Nothing here opens a
connection, so the chokepoint imports it without importing `precog_db.stamp` back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

from precog_db._steps import Query, Steps
from precog_db.environment import STRICT, Environment, ambiguous_environment, parse_environment
from precog_db.errors import (
    EnvironmentMismatchError,
    RestoredCopyError,
    StampError,
    UnstampedDatabaseError,
)
from precog_db.log import get_logger
from precog_db.settings import DatabaseSettings

__all__ = [
    "COLUMNS",
    "CURRENT_OID",
    "SCHEMA",
    "TABLE",
    "Stamp",
    "judge_stamp",
    "privilege_error",
    "read_steps",
    "stamp_command",
    "system_identifier_steps",
    "unreadable_error",
]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

SCHEMA = "precog_meta"
TABLE = f"{SCHEMA}.stamp"


COLUMNS = "env, dbname, system_identifier, stamped_by, stamped_role, stamped_at, library_version, database_oid"
#: The database's own OID: kept by ALTER DATABASE … RENAME, new for a copy (CREATE DATABASE … TEMPLATE, a restore).
CURRENT_OID = "(SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())"


@dataclass(frozen=True)
class Stamp:
    """One database's identity stamp, plus where it was read from.

    ``env`` … ``library_version`` are what was recorded when the database was
    stamped; ``current_dbname`` and ``current_system_identifier`` describe the
    database and cluster it was read from just now. A difference between the
    two means the database is a restored copy (see `copy_reason`).
    ``system_identifier`` is None when the stamping role could not read
    ``pg_control_system()``; ``current_system_identifier`` is None when the
    reading role cannot. Copy detection then relies on the database name alone.
    """

    env: Environment
    dbname: str
    system_identifier: int | None
    stamped_by: str
    stamped_role: str
    stamped_at: datetime
    library_version: str
    current_dbname: str
    current_system_identifier: int | None
    #: The OID of the database that was stamped, and of the one read now (None for stamps written before 0.2).
    database_oid: int | None = None
    current_database_oid: int | None = None

    @property
    def copy_reason(self) -> str | None:
        """Why this database is a copy of the one that was stamped, or None when it is that database.

        The same cluster (``system_identifier``) and the same database OID
        mean the same database, even under a new name: ``ALTER DATABASE …
        RENAME`` keeps the OID, while a copy (``CREATE DATABASE … TEMPLATE``,
        a restore) gets a new one.
        """
        if self.same_database_renamed:
            return None
        if self.dbname != self.current_dbname:
            return f"it was stamped as database {self.dbname!r} and is now database {self.current_dbname!r}"
        if (
            self.system_identifier is not None
            and self.current_system_identifier is not None
            and self.system_identifier != self.current_system_identifier
        ):
            return (
                f"it was stamped on the cluster with system identifier {self.system_identifier} "
                f"and now lives on the cluster {self.current_system_identifier}"
            )
        return None

    @property
    def same_database_renamed(self) -> bool:
        """True when this is provably the stamped database itself (same cluster, same OID), renamed or not."""
        return (
            self.database_oid is not None
            and self.database_oid == self.current_database_oid
            and self.system_identifier is not None
            and self.system_identifier == self.current_system_identifier
        )

    @property
    def provably_another_database(self) -> bool:
        """True only when the stamp was written in another cluster, or in another database of this cluster."""
        if (
            self.system_identifier is not None
            and self.current_system_identifier is not None
            and self.system_identifier != self.current_system_identifier
        ):
            return True
        return (
            self.database_oid is not None
            and self.current_database_oid is not None
            and self.database_oid != self.current_database_oid
            and self.system_identifier is not None
            and self.system_identifier == self.current_system_identifier
        )

    @property
    def is_copy(self) -> bool:
        """True when the database is a restored copy of the one that was stamped."""
        return self.copy_reason is not None

    def describe(self) -> str:
        """``stamped prod by alice (role precog_prod) at 2024-05-01 10:00:00+00:00``."""
        return (
            f"stamped {self.env.value} by {self.stamped_by} (role {self.stamped_role}) "
            f"at {self.stamped_at.isoformat(sep=' ', timespec='seconds')}"
        )


def stamp_command(env: Environment, *, force: bool = False) -> str:
    """The shell command that stamps the configured database as ``env``."""
    prefix = "PRECOG_PROD_CONFIRMED=yes " if env is Environment.PROD else ""
    return f"{prefix}precog-db --env {env.value} stamp{' --force' if force else ''}"


def _call(env: Environment, *, force: bool = False) -> str:
    return f"stamp_database({env.value!r}{', force=True' if force else ''})"


# --- reading ---------------------------------------------------------------------------


_SYSTEM_IDENTIFIER = Query("SELECT system_identifier FROM pg_catalog.pg_control_system()", guarded=True)
#: What a role that may not read pg_control_system() gets; any other error propagates.
_NO_SYSTEM_IDENTIFIER = (
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.FeatureNotSupported,
)


def system_identifier_steps() -> Steps[int | None]:
    """The cluster's ``system_identifier``, or None when this role may not read ``pg_control_system()``."""
    try:
        row = yield _SYSTEM_IDENTIFIER
    except _NO_SYSTEM_IDENTIFIER:
        log.info("system_identifier_unreadable", reason="pg_control_system() is not available to this role")
        return None
    return int(row[0]) if row and row[0] is not None else None


def read_steps(*, for_update: bool = False) -> Steps[Stamp | None]:
    """Read the stamp (sans-I/O, see `precog_db._steps`): the SQL and every decision, for both layers."""
    row = yield Query(
        f"SELECT current_database(), to_regclass(%s) IS NOT NULL, {CURRENT_OID}, "
        "EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = to_regclass(%s) "
        "AND attname = 'database_oid' AND NOT attisdropped)",
        (TABLE, TABLE),
    )
    assert row is not None
    current_dbname, exists, current_oid, has_oid = str(row[0]), bool(row[1]), int(row[2]), bool(row[3])
    if not exists:
        return None
    columns = COLUMNS if has_oid else COLUMNS.replace(", database_oid", ", NULL")
    found = yield Query(f"SELECT {columns} FROM {TABLE}{' FOR UPDATE' if for_update else ''}")
    if found is None:
        return None
    recorded_id = None if found[2] is None else int(found[2])
    # Read the live identifier only when there is one to compare with.
    current_id = (yield from system_identifier_steps()) if recorded_id is not None else None
    return Stamp(
        env=parse_environment(found[0], source=f"the stamp in {TABLE}"),
        dbname=str(found[1]),
        system_identifier=recorded_id,
        stamped_by=str(found[3]),
        stamped_role=str(found[4]),
        stamped_at=found[5],
        library_version=str(found[6]),
        current_dbname=current_dbname,
        current_system_identifier=current_id,
        database_oid=None if found[7] is None else int(found[7]),
        current_database_oid=current_oid,
    )


def privilege_error(settings: DatabaseSettings, action: str, fix: str) -> StampError:
    return StampError(f"role {settings.user!r} may not {action} in the {settings.describe()}; {fix}")


def unreadable_error(settings: DatabaseSettings) -> StampError:
    return privilege_error(
        settings,
        f"read the identity stamp {TABLE}",
        f"stamping grants it to everyone, so someone revoked it: run `GRANT USAGE ON SCHEMA {SCHEMA} "
        f"TO {settings.user}; GRANT SELECT ON {TABLE} TO {settings.user};` as the database owner",
    )


# --- checking (at pool open) ---------------------------------------------------------------


def judge_stamp(settings: DatabaseSettings, stamp: Stamp | None, *, quiet: bool = False) -> Stamp | None:
    """The decision on a stamp read from the database of ``settings`` (no I/O): return it, warn, or raise."""
    env = settings.env
    where = settings.describe()
    if stamp is None:
        hinted = ambiguous_environment(settings.dbname)
        if hinted is not None and hinted is not env:
            raise UnstampedDatabaseError(
                f"the {where} carries no identity stamp, and its name mentions {hinted.value} inside a word "
                f"({settings.dbname!r}), so the name cannot say whether it is a {env.value} database or a "
                f"{hinted.value} one under a careless name. If it is the {env.value} database, stamp it once "
                f"with `{stamp_command(env)}` (or {_call(env)} in Python) and try again"
            )
        if env in STRICT:
            raise UnstampedDatabaseError(
                f"the {where} carries no identity stamp, and {env.value} databases must: "
                f"without it nothing proves this is the {env.value} database rather than another one "
                f"reached through a stale setting. If it is the {env.value} database, stamp it once "
                f"with `{stamp_command(env)}` (or {_call(env)} in Python) and try again"
            )
        if quiet:
            return None
        log.warning(
            "database_unstamped",
            env=env.value,
            dbname=settings.dbname,
            host=settings.host,
            port=settings.port,
            fix=stamp_command(env),
        )
        return None
    copy = stamp.copy_reason
    if stamp.env is env:
        if copy is not None and not quiet:
            log.warning(
                "database_copy_detected",
                env=env.value,
                dbname=settings.dbname,
                host=settings.host,
                port=settings.port,
                reason=copy,
                fix=stamp_command(env),
            )
        return stamp
    if copy is not None:
        raise RestoredCopyError(
            f"the {where} is {stamp.describe()}, but it is a restored copy ({copy}), so it is not the "
            f"{stamp.env.value} database itself. If it now belongs to {env.value}, re-stamp it once with "
            f"`{stamp_command(env, force=True)}` (or {_call(env, force=True)} in Python); until then it is "
            f"refused, because a real {stamp.env.value} database that moved to a new cluster looks the same"
        )
    hint = (
        " (re-stamping a production database also needs PRECOG_PROD_CONFIRMED=yes)"
        if stamp.env is Environment.PROD
        else ""
    )
    raise EnvironmentMismatchError(
        f"the {where} is {stamp.describe()}, but this process resolved environment {env.value}; "
        f"refusing to open a {stamp.env.value} database as {env.value}. Fix PRECOG_ENV or DB_NAME "
        "(a stale shell export or a copied .env file is the usual cause). Only if the database really "
        f"belongs to {env.value} now, re-stamp it with `{stamp_command(env, force=True)}`{hint}"
    )

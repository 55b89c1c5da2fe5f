"""``precog-db migrate rehearse``: the pending migrations applied to a restored copy, never to the target.

`rehearse` finds the newest verified backup of the target (`precog_db.backup.newest_verified`,
the dumps ``precog-db backup`` writes), creates a throwaway database on the
same server (``<db>_rehearse_<random>``), restores the backup into it
(`precog_db.backup.restore_copy`, the same pg_restore as ``precog-db
restore``), and applies there what the copy has pending, with the same code
as ``migrate up`` (`apply_migration`, the lint of `check_safety`,
``DB_MIGRATION_LOCK_TIMEOUT``). For each file it reports: applied or failed
(with the error), the time taken, and the strongest table lock the file took
(read from ``pg_locks`` of its own session inside its transaction, before the
commit). The throwaway database is dropped in every case (``finally``; SIGTERM
is turned into `KeyboardInterrupt` while it runs, in the main thread). The
target database is only read (its stamp, its server version).

With ``local=True`` the copy lives in a throwaway `LocalCluster` instead
(`_local_copy`: a temporary directory of its own, a free port, server binaries
of the dump's major version, else a newer one), stopped and deleted in every
case. Where the copy lives is the only difference: `_server_copy` and
`_local_copy` each yield the copy's settings and server, and the restore, the
per-file apply and the report are the same code for both.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from precog_db import audit
from precog_db.backup import backup_dir, newest_verified, restore_copy
from precog_db.connection import connect, direct_settings, pin_of
from precog_db.environment import Environment
from precog_db.errors import BackupError, MigrationError
from precog_db.guard import production_confirmed
from precog_db.migrations._apply import apply_migration
from precog_db.migrations._checks import pending
from precog_db.migrations._files import discover
from precog_db.migrations._ledger import read_ledger
from precog_db.migrations._workflows import _lint_plan  # the same lint as migrate up
from precog_db.settings import DatabaseSettings

__all__ = ["LOCK_STRENGTH", "REHEARSAL_INFIX", "RehearsalResult", "RehearsedFile", "rehearse", "strongest_lock"]

#: The throwaway database is ``<target db>`` + this + 8 hex digits.
REHEARSAL_INFIX = "_rehearse_"

#: PostgreSQL's table lock modes, weakest first (each conflicts with at least what the one before does).
LOCK_STRENGTH = (
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)

# The table locks this session holds now: relation, mode, and whether the relation was created in this transaction.
_OWN_LOCKS = """
SELECT format('%I.%I', n.nspname, c.relname), l.mode,
       c.xmin::text = (txid_current() % 4294967296)::text
FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.granted
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'precog_meta')
ORDER BY c.relkind NOT IN ('r', 'p', 'm', 'f'), 1
"""


@dataclass(frozen=True)
class RehearsedFile:
    """What one pending file did on the copy."""

    file: str
    #: ``applied``, ``failed`` or ``not run`` (after an earlier failure).
    status: str
    duration_ms: int | None = None
    error: str | None = None
    #: The strongest lock mode the file held on a table that existed before it (`LOCK_STRENGTH`), or None.
    lock: str | None = None
    #: The table (``schema.name``) that lock was on.
    table: str | None = None
    #: Every table lock the file held before its commit, ``schema.name -> mode`` (new relations marked ``(new)``).
    locks: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """For ``--json`` and the audit log."""
        return {
            "file": self.file,
            "status": self.status,
            "duration_ms": self.duration_ms,
            "error": self.error,
            "lock": self.lock,
            "table": self.table,
            "locks": self.locks,
        }


@dataclass(frozen=True)
class RehearsalResult:
    """The outcome of `rehearse`."""

    backup: Path
    #: The throwaway database (dropped by the time this is returned).
    database: str
    files: list[RehearsedFile]
    #: With ``local=True``: the throwaway local cluster's data directory (stopped and deleted by now).
    cluster: Path | None = None

    @property
    def failed(self) -> list[RehearsedFile]:
        """The files that failed on the copy."""
        return [f for f in self.files if f.status == "failed"]


def strongest_lock(locks: list[tuple[str, str, bool]]) -> tuple[str | None, str | None]:
    """The strongest ``(mode, table)`` among ``(table, mode, created_here)``; tables that existed before win.

    Among equally strong locks the first listed wins (`_OWN_LOCKS` lists tables before their indexes).
    """
    old = [(LOCK_STRENGTH.index(m), t, m) for t, m, new in locks if not new and m in LOCK_STRENGTH]
    pool = old or [(LOCK_STRENGTH.index(m), t, m) for t, m, _ in locks if m in LOCK_STRENGTH]
    if not pool:
        return None, None
    _, table, mode = max(pool, key=lambda entry: entry[0])  # the first of the strongest: tables come first
    return mode, table


def _copy_name(dbname: str) -> str:
    """``<dbname>_rehearse_<8 hex>`` within 63 bytes (the database name shortened by whole characters)."""
    suffix = REHEARSAL_INFIX + secrets.token_hex(4)
    head = dbname
    while len((head + suffix).encode("utf-8")) > 63:
        head = head[:-1]
    return head + suffix


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While inside: SIGTERM raises `KeyboardInterrupt` (main thread only), so ``finally`` blocks run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def rehearse(
    settings: DatabaseSettings,
    directory: Path = Path("migrations"),
    *,
    backup_root: Path | None = None,
    target: int | None = None,
    notify: Callable[[str], None] | None = None,
    local: bool = False,
) -> RehearsalResult:
    """Apply the pending migrations of ``directory`` to a restored copy of ``settings``' database; report per file.

    Audited as ``migrate rehearse`` (an entry when it starts and one with the
    result). Refused (`BackupError`, before anything is created) when
    ``backup_root`` (``PRECOG_BACKUP_DIR``, default ``backups``) holds no
    verified dump of the target. The throwaway database is dropped whatever
    happens; a file that fails is in the result (``failed``), the files after
    it are ``not run``. On staging and prod an unacknowledged lint finding is
    refused as by ``migrate up``; the target itself is never changed.
    """
    tell = notify if notify is not None else (lambda _text: None)
    settings = direct_settings(settings, operation="rehearse migrations")
    env = settings.env
    with audit.operation("migrate rehearse", settings, migrations_dir=str(directory)) as info:
        if env is not Environment.PROD:
            info["confirmation"] = "not required"
        else:
            info["confirmation"] = "PRECOG_PROD_CONFIRMED=yes" if production_confirmed() else "none"
        files = discover(directory)
        conn = connect(settings, operation="rehearse migrations")  # the target: checked (stamp), only read
        try:
            major = conn.info.server_version // 10000
            pin = pin_of(conn)
        finally:
            conn.close()
        found = newest_verified(settings, server_major=major, root=backup_root)
        if found is None:
            raise BackupError(
                f"no verified backup of the {settings.describe()} in {backup_dir(backup_root) / env.value} "
                "(PRECOG_BACKUP_DIR, --backup-dir) to rehearse on; nothing was created. Make one with "
                f"`precog-db --env {env.value} backup` and run the rehearsal again"
            )
        dump, _entries = found
        copy = settings.replace(dbname=_copy_name(settings.dbname), application_name="precog-db migrate rehearse")
        info.update(backup=str(dump), database=copy.dbname, local=local)
        audit.record(
            "migrate rehearse",
            outcome="started",
            settings=settings,
            backup=str(dump),
            database=copy.dbname,
            local=local,
            migrations_dir=str(directory),
        )
        if not local:
            tell(f"rehearsing on {copy.dbname}, restored from {dump}")
        results: list[RehearsedFile] = []
        with _sigterm_interrupts():
            try:
                place = _local_copy(copy, dump, tell) if local else _server_copy(settings, copy, pin, major)
                with place as (where, where_pin, where_major, facts):
                    info.update(facts)
                    restore_copy(where, dump, server_major=where_major, pin=where_pin)
                    _apply_all(where, where_pin, directory, files, target, env, info, tell, results)
            finally:
                info["files"] = [r.as_dict() for r in results]
        failed = [r.file for r in results if r.status == "failed"]
        info["result"] = f"failed: {', '.join(failed)}" if failed else f"passed: {len(results)} file(s) applied"
    return RehearsalResult(dump, copy.dbname, results, Path(info["cluster"]) if local else None)


#: Where the copy lives: its settings, the `Pin` of its server, that server's major version, and facts for the audit.
_Where = tuple[DatabaseSettings, Any, int, dict[str, Any]]


@contextlib.contextmanager
def _server_copy(settings: DatabaseSettings, copy: DatabaseSettings, pin: Any, major: int) -> Iterator[_Where]:
    """A throwaway database on the target's own server, dropped on the way out (also when interrupted)."""
    # Set before CREATE DATABASE: an interrupt right after the server made it still drops it (IF EXISTS).
    created = True
    try:
        try:
            _create(settings, copy.dbname, pin)
        except psycopg.errors.DuplicateDatabase:
            created = False  # not ours: never dropped
            raise MigrationError(
                f"a database named {copy.dbname} exists already, so no rehearsal copy was made; run the "
                "rehearsal again (the name is random)"
            ) from None
        yield copy, pin, major, {}
    finally:
        if created:
            _drop(settings, copy.dbname, pin)


def _dump_major(dump: Path) -> int | None:
    """The major version of the server ``dump`` was taken from (its archive header), None if unreadable."""
    import re
    import subprocess

    from precog_db.backup import find_tool

    try:
        listing = subprocess.run(
            [str(find_tool("pg_restore", 1)), "--list", str(dump)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired, BackupError):
        return None
    found = re.search(r"Dumped from database version: (\d+)", listing)
    return int(found[1]) if found else None


def _local_binaries(dump_major: int | None) -> Any:
    """Server binaries of the dump's major version, else a newer one; a clear error when neither exists."""
    from precog_db.errors import LocalClusterError
    from precog_db.local.binaries import find_server_binaries, server_major

    if dump_major is None:
        return find_server_binaries()
    try:
        return find_server_binaries(major=dump_major)
    except LocalClusterError as exact:
        try:
            other = find_server_binaries()
        except LocalClusterError:
            other = None
        newer = other is not None and (server_major(other.bindir) or 0) > dump_major
        if newer:
            return other
        have = f"; the only server found is PostgreSQL {server_major(other.bindir)}" if other is not None else ""
        raise MigrationError(
            f"a local rehearsal needs PostgreSQL {dump_major} server binaries (the backup was dumped from "
            f"PostgreSQL {dump_major}, and pg_restore cannot load a dump into an older server){have}. Install "
            f"PostgreSQL {dump_major} (e.g. `apt-get install postgresql-{dump_major}`) or set PRECOG_PG_BINDIR to "
            f"its bin directory, or rehearse on the target's server without --local. Nothing was created "
            f"({exact})"
        ) from None


@contextlib.contextmanager
def _local_copy(copy: DatabaseSettings, dump: Path, tell: Callable[[str], None]) -> Iterator[_Where]:
    """A throwaway local cluster (own temporary directory, free port) holding the copy; stopped and deleted after."""
    import tempfile

    from precog_db.connection import Pin
    from precog_db.local.cluster import SUPERUSER, LocalCluster

    dump_major = _dump_major(dump)
    binaries = _local_binaries(dump_major)
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="precog-rehearse-")), binaries=binaries)
    try:
        cluster.init()
        cluster.start()
        major = int((cluster.data_dir / "PG_VERSION").read_text().strip())
        cluster.create_database(copy.dbname, template="template0")
        where = copy.replace(
            host=cluster.host,
            port=cluster.port,
            user=SUPERUSER,
            password="",
            password_file="",
            passfile="",
            password_provider=None,
            sslmode="disable",
            pooler="none",
            direct_host="",
            target_session_attrs="any",
            replica_hosts=(),
        )
        tell(
            f"rehearsing on {copy.dbname} in a throwaway local cluster on {cluster.host}:{cluster.port} "
            f"({cluster.source}; data in {cluster.data_dir}), restored from {dump}"
        )
        facts = {"cluster": str(cluster.data_dir), "cluster_server": cluster.source, "cluster_port": cluster.port}
        yield where, Pin(cluster.host, cluster.port, cluster.host), major, facts
    finally:
        data_dir = cluster.data_dir
        cluster.destroy()
        if data_dir.exists() or cluster.root.exists():
            raise MigrationError(
                f"the rehearsal's local cluster could not be removed completely; stop it "
                f"(pg_ctl stop -D {data_dir}) and delete {data_dir.parent} and {cluster.root}"
            )


def _create(settings: DatabaseSettings, name: str, pin: Any) -> None:
    conn = connect(settings, operation="create the rehearsal database", pin=pin)
    try:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    except psycopg.errors.InsufficientPrivilege:
        raise MigrationError(
            f"the role {settings.user!r} may not create databases, and a rehearsal restores into a throwaway "
            "database on the same server; grant it CREATEDB (or rehearse as a role that has it). Nothing was made"
        ) from None
    finally:
        conn.close()


def _drop(settings: DatabaseSettings, name: str, pin: Any) -> None:
    """Drop the throwaway database (ending any session still in it); a failure says what to drop by hand."""
    try:
        conn = connect(settings, operation="drop the rehearsal database", pin=pin)
        try:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        finally:
            conn.close()
    except (psycopg.Error, MigrationError, OSError) as exc:
        raise MigrationError(
            f"the rehearsal database {name!r} could not be dropped ({exc}); drop it by hand: "
            f'DROP DATABASE "{name}" WITH (FORCE);'
        ) from None


def _apply_all(
    copy: DatabaseSettings,
    pin: Any,
    directory: Path,
    files: list[Any],
    target: int | None,
    env: Environment,
    info: dict[str, Any],
    tell: Callable[[str], None],
    results: list[RehearsedFile],
) -> None:
    """Apply what the copy has pending, appending each file's report to ``results``."""
    # The restored copy carries the target's stamp (another database name): not verified, it is ours.
    conn = connect(copy, operation="rehearse migrations", verify=False, pin=pin)
    try:
        plan = pending(files, read_ledger(conn), target)
        info["planned"] = [m.filename for m in plan]
        if not plan:
            return
        _lint_plan(plan, env, info, tell, down=False)
        failed = False
        for migration in plan:
            if failed:
                results.append(RehearsedFile(migration.filename, "not run"))
                continue
            seen: list[tuple[str, str, bool]] = []

            def observe(cur: psycopg.Cursor[Any], seen: list[tuple[str, str, bool]] = seen) -> None:
                with conn.cursor(row_factory=tuple_row) as own:
                    own.execute(_OWN_LOCKS)
                    seen.extend((str(t), str(m), bool(n)) for t, m, n in own.fetchall())

            started = time.monotonic()
            try:
                apply_migration(conn, migration, lock_timeout_ms=copy.migration_lock_timeout_ms, observe=observe)
            except MigrationError as exc:
                failed = True
                ms = int((time.monotonic() - started) * 1000)
                results.append(RehearsedFile(migration.filename, "failed", ms, str(exc)))
                tell(f"FAILED {migration.filename} ({ms} ms): {exc}")
                continue
            ms = int((time.monotonic() - started) * 1000)
            mode, table = strongest_lock(seen)
            locks: dict[str, str] = {}
            for t, m, new in seen:
                if m not in LOCK_STRENGTH:
                    continue
                name = f"{t} (new)" if new else t
                if name not in locks or LOCK_STRENGTH.index(m) > LOCK_STRENGTH.index(locks[name]):
                    locks[name] = m
            results.append(RehearsedFile(migration.filename, "applied", ms, None, mode, table, locks))
            tell(f"applied {migration.filename} ({ms} ms)" + (f", {mode} on {table}" if mode else ""))
    finally:
        conn.close()

"""The pytest plugin's heavy half: the guard, the xdist databases and the fixtures' bodies.

Imported by `precog_db.plugin` only when a session uses a database fixture (or the
guard or an xdist hook needs it), so a pytest run that never touches the database
imports neither psycopg nor the pool. See `precog_db.plugin` and docs/TESTING.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
from psycopg import AsyncCursor, Connection, Cursor, sql
from psycopg.rows import dict_row, tuple_row

from precog_db.apool import AsyncPrecogPool
from precog_db.connection import connect
from precog_db.environment import Environment, environment_named_by
from precog_db.errors import DatabaseUnavailableError, EnvironmentNotAllowedError, PrecogDBError
from precog_db.gates import current_environments
from precog_db.log import get_logger
from precog_db.migrations import read_ledger
from precog_db.plugin import _PATCH, _SUMMARY, _TARGET, _reuse, _workerinput
from precog_db.pool import PrecogPool, close_pool, initialize_pool
from precog_db.settings import DatabaseSettings, environment_resolution, load_settings
from precog_db.stamp import stamp_database
from precog_db.testdb import build_test_database, database_missing

__all__ = ["derived_name", "resolve_test_target"]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

_MAX_IDENT = 63


def _recreate(config: pytest.Config) -> bool:
    return bool(config.getoption("precog_create_db"))


# --- the guard --------------------------------------------------------------------------


def _declared(environ: Mapping[str, str]) -> bool:
    """True when something besides the default decides the environment (see `environment_resolution`)."""
    return environment_resolution(environ=environ).source != "default"


#: Called by the guard, after its checks on the settings, with (settings, database_missing).
Builder = Callable[[DatabaseSettings, bool], None]


def resolve_test_target(environ: Mapping[str, str] | None = None, *, build: Builder | None = None) -> DatabaseSettings:
    """Return the settings of the test database, or raise a `PrecogDBError` that says why not.

    Checks, in order: the resolved environment is ``test`` (``staging`` and
    ``prod`` are refused outright); the settings load without an environment
    mismatch; the database name names ``test``; the server is reachable; the
    database is not stamped as another environment (nor a copy of one).
    When neither ``PRECOG_ENV`` nor ``DB_NAME`` is set, a test run resolves to
    ``test`` rather than the library's usual ``dev``. ``build`` (the plugin's
    self-building test database, `precog_db.testdb`) runs after the checks on
    the settings, told whether the database is missing; the probe runs again after it.
    """
    env_vars = os.environ if environ is None else environ
    if not _declared(env_vars):
        return _checked(load_settings(Environment.TEST, environ=env_vars), build)
    resolution = environment_resolution(environ=env_vars)
    env, why = resolution.env, f"from {resolution.source}"
    if env in (Environment.STAGING, Environment.PROD):
        raise EnvironmentNotAllowedError(
            f"the environment is {env.value} ({why}). precog_db's test fixtures never run against "
            "staging or production, whatever PRECOG_PROD_CONFIRMED or any option says. Point the tests "
            "at a test database: PRECOG_ENV=test and DB_NAME=<name>_test (for example in config/.env.test)"
        )
    if env is not Environment.TEST:
        raise EnvironmentNotAllowedError(
            f"the environment is {env.value} ({why}), and database tests run only in test. "
            "Set PRECOG_ENV=test for the test run (and DB_NAME to a test database, e.g. in config/.env.test)"
        )
    return _checked(load_settings(Environment.TEST, environ=env_vars), build)


_ORIGINS = {"default": "the defaults", "environment": "DB_NAME in the process environment", "argument": "an argument"}


def _checked(settings: DatabaseSettings, build: Builder | None = None) -> DatabaseSettings:
    if environment_named_by(settings.dbname) is not Environment.TEST:
        origin = settings.origins.get("dbname", "default")
        raise EnvironmentNotAllowedError(
            f"database {settings.dbname!r} (from {_ORIGINS.get(origin, origin)}) does not "
            "look like a test database: its name must contain the word 'test', e.g. precog_test or "
            "myapp_test. Point DB_NAME at a test database; the plugin never runs tests on anything else"
        )
    missing = False
    try:
        connect(settings, operation="check the test database").close()
    except DatabaseUnavailableError as exc:
        if build is None or not database_missing(exc):
            raise
        missing = True
    if build is not None:
        build(settings, missing)
        connect(settings, operation="check the test database").close()
    return settings


def _stop(session: pytest.Session, message: str) -> NoReturn:
    # The refusal is printed once. In a plain run it is a usage error: pytest
    # prints "ERROR: <message>" on stderr and exits 4 (pytest.exit would print it
    # twice, as "! message !" and "! _pytest.outcomes.Exit: message !").
    # An xdist worker cannot just exit: its controller would report "no active
    # workers" and lose the message. `shouldstop` travels back to the
    # controller, which stops the run and shows it once.
    if hasattr(session.config, "workerinput"):
        session.shouldstop = message
        pytest.exit(message, returncode=pytest.ExitCode.USAGE_ERROR)
    raise pytest.UsageError(message)


def guarded_settings(session: pytest.Session) -> DatabaseSettings:
    """The checked test target; stops the session with the reason when there is none."""
    cached = session.config.stash.get(_TARGET, None)
    if cached is not None:
        return cached
    try:
        settings = resolve_test_target(build=_builder(session))
    except PrecogDBError as exc:
        _stop(session, f"precog_db refuses to run database tests: {exc}")
    except psycopg.Error as exc:
        _stop(session, f"precog_db could not build the test database: {_admin_failure_text(exc)}")
    if not _declared(os.environ):
        # Code under test resolves the environment itself: make it agree (undone at exit).
        patch = pytest.MonkeyPatch()
        patch.setenv("PRECOG_ENV", Environment.TEST.value)
        session.config.stash[_PATCH] = patch
    session.config.stash[_TARGET] = settings
    return settings


def _builder(session: pytest.Session) -> Builder:
    """The self-building step: create a missing test database; with ``precog_migrations_dir``, migrate it.

    ``--precog-create-db`` with ``precog_migrations_dir`` drops and rebuilds it from scratch, once per run.
    """
    config = session.config
    configured = str(config.getini("precog_migrations_dir") or "").strip()
    directory = Path(configured) if configured else None
    if directory is not None and not directory.is_absolute():
        directory = config.rootpath / directory
    workerinput = _workerinput(config)
    run_id = str(workerinput["testrunuid"]) if workerinput is not None else uuid.uuid4().hex
    rebuild = _recreate(config) and directory is not None

    def build(settings: DatabaseSettings, missing: bool) -> None:
        if not (missing or directory is not None):
            return
        notes = config.stash.setdefault(_SUMMARY, [])
        build_test_database(
            settings,
            maintenance_db=str(config.getini("precog_maintenance_db") or "postgres"),
            migrations_dir=directory,
            rebuild=rebuild,
            run_id=run_id,
            lock_key=_lock_key(derived_name(settings.dbname, "template")),
            note=notes.append,
        )

    return build


def _admin_failure_text(exc: psycopg.Error) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return f"{detail}; the test role needs CREATEDB (ALTER ROLE <role> CREATEDB), or create the database by hand"
    return f"{detail}; check the server log"


# --- xdist: one database per worker ----------------------------------------------------------


def derived_name(base: str, suffix: str) -> str:
    """``<base>_<suffix>``, shortened to PostgreSQL's 63-byte limit while still naming test."""
    name = f"{base}_{suffix}"
    if len(name.encode()) <= _MAX_IDENT:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:12]
    return f"precog_test_{digest}_{suffix}"


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _database_exists(admin: Connection[Any], name: str) -> tuple[bool, str | None]:
    row = admin.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    return (row is not None, None if row is None else row[0])


def _admin_failure(exc: psycopg.Error, settings: DatabaseSettings, action: str) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        fix = f"the role {settings.user!r} needs CREATEDB (ALTER ROLE {settings.user} CREATEDB), or run without -n"
    elif isinstance(exc, psycopg.errors.ObjectInUse):
        fix = (
            f"close the other sessions on {settings.dbname!r} (pg_stat_activity lists them), because a "
            "database is cloned only while nobody is connected to it"
        )
    else:
        fix = "check the server log"
    return f"precog_db could not {action}: {detail}; {fix}"


def _clone(admin: Connection[Any], name: str, template: str) -> None:
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))


def _maintenance(settings: DatabaseSettings, config: pytest.Config) -> DatabaseSettings:
    return settings.replace(dbname=str(config.getini("precog_maintenance_db") or "postgres"))


def _connect_maintenance(settings: DatabaseSettings, config: pytest.Config) -> Connection[Any]:
    """The admin connection to the maintenance database; a failure says it is not the test database itself."""
    admin = _maintenance(settings, config)
    try:
        return connect(admin, operation="manage test databases", verify=False, direct=True)
    except DatabaseUnavailableError as exc:
        raise DatabaseUnavailableError(
            f"under pytest-xdist the plugin creates each worker's copy of the test database {settings.dbname!r} "
            f"from the maintenance database {admin.dbname!r} (ini option precog_maintenance_db), and that failed. "
            f"{exc}"
        ) from None


def _worker_database(session: pytest.Session, settings: DatabaseSettings, worker: str, run: str) -> DatabaseSettings:
    """Build (once per run) the template and clone this worker's database from it."""
    config = session.config
    template = derived_name(settings.dbname, "template")
    mine = derived_name(settings.dbname, worker)
    marker = f"precog_db test template built from {settings.dbname} for run {run}"
    reuse, recreate = _reuse(config), _recreate(config)
    notes = config.stash.setdefault(_SUMMARY, [])
    admin = _connect_maintenance(settings, config)
    step = f"build the template database {template!r} from {settings.dbname!r}"
    try:
        admin.execute("SELECT pg_advisory_lock(%s)", (_lock_key(template),))
        try:
            exists, comment = _database_exists(admin, template)
            built_this_run = (comment or "").startswith(marker)
            schema = _schema_fingerprint(settings) if config.getini("precog_migrations_dir") else ""
            stale = bool(schema) and not (comment or "").endswith(schema)
            rebuilt = not built_this_run and (not exists or not reuse or recreate or stale)
            if rebuilt:
                _clone(admin, template, settings.dbname)
                stamp_database(Environment.TEST, settings=settings.replace(dbname=template))
                admin.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                        sql.Identifier(template), sql.Literal(marker + schema)
                    )
                )
                notes.append(f"built template database {template} from {settings.dbname}")
            step = f"create the worker database {mine!r} from {template!r}"
            exists, _ = _database_exists(admin, mine)
            # A template (re)built in this run means the kept worker databases have the old schema.
            if exists and reuse and not recreate and not (rebuilt or built_this_run):
                notes.append(f"reused worker database {mine}")
            else:
                _clone(admin, mine, template)
                notes.append(f"cloned worker database {mine} from {template}")
        finally:
            admin.execute("SELECT pg_advisory_unlock(%s)", (_lock_key(template),))
    except psycopg.Error as exc:
        _stop(session, _admin_failure(exc, settings, step))
    finally:
        admin.close()
    worker_settings = settings.replace(dbname=mine)
    stamp_database(Environment.TEST, settings=worker_settings)
    workeroutput = getattr(config, "workeroutput", None)
    if isinstance(workeroutput, dict):
        workeroutput["precog_template"] = template
        workeroutput["precog_template_marker"] = marker
    return worker_settings


def _schema_fingerprint(settings: DatabaseSettings) -> str:
    """``; schema <hash>`` of the migration ledger of the test database: a reused template with another is stale."""
    conn = connect(settings, operation="read the test database's migration ledger")
    try:
        ledger = read_ledger(conn)
    finally:
        conn.close()
    text = ",".join(f"{v}:{row.checksum}" for v, row in sorted(ledger.items()))
    return f"; schema {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _drop_database(settings: DatabaseSettings, config: pytest.Config, name: str, *, marker: str | None = None) -> None:
    """Drop ``name`` (only if its comment starts with ``marker``, when given); never fails the run."""
    try:
        admin = _connect_maintenance(settings, config)
    except PrecogDBError as exc:
        log.warning("test_database_not_dropped", dbname=name, reason=str(exc))
        return
    try:
        if marker is not None and not (_database_exists(admin, name)[1] or "").startswith(marker):
            return
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        log.warning("test_database_not_dropped", dbname=name, reason=str(exc).strip().splitlines()[0])
    finally:
        admin.close()


def drop_templates(config: pytest.Config, templates: Mapping[str, str]) -> None:
    """Controller side, at the end of the run: drop the xdist template databases the workers used."""
    try:
        settings = load_settings(Environment.TEST)
    except PrecogDBError as exc:
        log.warning("test_database_not_dropped", dbname=", ".join(templates), reason=str(exc))
        return
    for name, marker in templates.items():
        _drop_database(settings, config, name, marker=marker)
        config.stash.setdefault(_SUMMARY, []).append(f"dropped template database {name}")


# --- fixtures ----------------------------------------------------------------------------


@contextlib.contextmanager
def db_pool(request: pytest.FixtureRequest) -> Iterator[PrecogPool]:
    """The process-wide pool, opened on the (guarded) test database; under xdist, this worker's own database."""
    config = request.config
    settings = guarded_settings(request.session)
    workerinput = _workerinput(config)
    with pytest.MonkeyPatch.context() as patch:
        if workerinput is not None:
            worker = str(workerinput["workerid"])
            settings = _worker_database(request.session, settings, worker, str(workerinput["testrunuid"]))
            # Code under test that loads settings itself must find this worker's database too.
            patch.setenv("DB_NAME", settings.dbname)
        else:
            config.stash.setdefault(_SUMMARY, []).append(f"tests ran on the {settings.describe()}")
        pool = initialize_pool(settings=settings)
        try:
            yield pool
        finally:
            close_pool()
            if workerinput is not None and not _reuse(config):
                _drop_database(settings, config, settings.dbname)
                config.stash.setdefault(_SUMMARY, []).append(f"dropped worker database {settings.dbname}")


@contextlib.contextmanager
def db_cursor(db_pool: PrecogPool) -> Iterator[Cursor[dict[str, Any]]]:
    """A dict-row cursor inside a read-write transaction that is rolled back after the test."""
    conn = db_pool.checkout()
    try:
        with conn.transaction(force_rollback=True), conn.cursor(row_factory=dict_row) as cur:
            yield cur
    finally:
        db_pool.checkin(conn)


# --- asyncio fixtures --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def adb_pool(db_pool: PrecogPool) -> AsyncIterator[AsyncPrecogPool]:
    """The asyncio pool (`precog_db.aio`) on the same guarded test database as ``db_pool``, for one test's loop."""
    from precog_db import aio

    pool = await aio.initialize_pool(settings=db_pool.settings)
    try:
        yield pool
    finally:
        await aio.close_pool()


@contextlib.asynccontextmanager
async def adb_cursor(adb_pool: AsyncPrecogPool) -> AsyncIterator[AsyncCursor[dict[str, Any]]]:
    """An asyncio dict-row cursor inside a read-write transaction that is rolled back after the test."""
    conn = await adb_pool.lend()
    try:
        async with conn.transaction(force_rollback=True), conn.cursor(row_factory=dict_row) as cur:
            yield cur
    finally:
        await adb_pool.give_back(conn)


def _refuse_outside_test(pool: PrecogPool) -> None:
    envs = set(current_environments()) | {pool.env}
    named = environment_named_by(pool.settings.dbname)
    wrong = sorted(e.value for e in envs if e is not Environment.TEST)
    if wrong or named is not Environment.TEST:
        what = f"environment {', '.join(wrong)}" if wrong else f"database {pool.settings.dbname!r}"
        pytest.fail(
            f"clean_test_data refuses to truncate anything outside test: the {what} is not a test one. "
            "Nothing was truncated",
            pytrace=False,
        )


def _children_first(conn: Connection[Any], names: Sequence[str]) -> list[tuple[str, str]]:
    """Resolve ``names`` and order them so that a table comes before the tables it references."""
    with conn.cursor(row_factory=tuple_row) as cur:
        resolved: dict[int, tuple[str, str]] = {}
        order: list[int] = []
        for name in names:
            cur.execute(
                "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = to_regclass(%s)",
                (name,),
            )
            row = cur.fetchone()
            if row is None:
                pytest.fail(
                    f"precog_clean_tables lists {name!r}, which does not exist in database "
                    f"{conn.info.dbname!r}; fix the ini option. Nothing was truncated",
                    pytrace=False,
                )
            if int(row[0]) not in resolved:
                resolved[int(row[0])] = (str(row[1]), str(row[2]))
                order.append(int(row[0]))
        cur.execute(
            "SELECT conrelid::oid, confrelid::oid, conrelid::regclass::text FROM pg_constraint "
            # conparentid = 0 skips the copies of a foreign key on each partition of a partitioned
            # table: truncating the partitioned table truncates its partitions.
            "WHERE contype = 'f' AND confrelid = ANY(%s) AND conrelid <> confrelid AND conparentid = 0",
            (order,),
        )
        edges = cur.fetchall()
    missing = sorted({str(text) for child, _, text in edges if int(child) not in resolved})
    if missing:
        pytest.fail(
            f"clean_test_data cannot truncate the tables in precog_clean_tables: {', '.join(missing)} "
            "reference(s) them through a foreign key but is not listed. Add it to precog_clean_tables "
            "(the plugin never cascades into tables you did not list). Nothing was truncated",
            pytrace=False,
        )
    children: dict[int, set[int]] = {oid: set() for oid in order}
    for child, parent, _ in edges:
        children[int(parent)].add(int(child))
    done: list[int] = []
    remaining = list(order)
    while remaining:
        ready = [oid for oid in remaining if children[oid] <= set(done)]
        if not ready:  # a cycle: one TRUNCATE statement handles it whatever the order
            ready = remaining[:1]
        for oid in ready:
            done.append(oid)
            remaining.remove(oid)
    return [resolved[oid] for oid in done]


def clean_test_data(db_pool: PrecogPool, request: pytest.FixtureRequest) -> list[str]:
    """Truncate the ``precog_clean_tables`` tables, children first, before the test; return them in that order.

    One ``TRUNCATE … RESTART IDENTITY`` statement, so foreign keys between the
    listed tables never get in the way. Refuses outside the test environment.
    """
    _refuse_outside_test(db_pool)
    names = [str(n) for n in request.config.getini("precog_clean_tables")]
    if not names:
        pytest.fail(
            "clean_test_data needs the tables to truncate: list them, one per line, in the ini option "
            "precog_clean_tables (e.g. in pytest.ini or [tool.pytest.ini_options])",
            pytrace=False,
        )
    conn = db_pool.checkout()
    try:
        ordered = _children_first(conn, names)
        idents = [sql.Identifier(schema, table) for schema, table in ordered]
        with conn.transaction():
            conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(sql.SQL(", ").join(idents)))
    finally:
        db_pool.checkin(conn)
    tables = [f"{schema}.{table}" for schema, table in ordered]
    log.info("test_tables_truncated", tables=tables, dbname=db_pool.settings.dbname)
    return tables

"""Test harness: every database test runs against a real PostgreSQL.

The server comes from ``PRECOG_TEST_DSN`` when it is set (its user must be
allowed to create databases). Otherwise the harness starts a throwaway
cluster with ``initdb`` + ``pg_ctl`` in a temporary directory on a free port
(as the ``postgres`` user when running as root) and removes it at the end; the
binaries come from ``find_server_binaries`` (``PRECOG_PG_BINDIR``, PostgreSQL
installed on the machine, then the embedded server of the ``local`` extra;
``PRECOG_PG_SEARCH`` limits the search). The report header and the final
summary say which server was used. If none works the session stops with a
message saying how to provide one: database tests are never skipped silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from precog_db import close_pool
from precog_db.errors import PrecogDBError
from precog_db.local.binaries import find_server_binaries
from precog_db.settings import DatabaseSettings
from tests._helpers.cli import Workspace, workspace
from tests._helpers.server import TEST_DB, Server, start_throwaway_cluster

_CLEARED_PREFIXES = ("DB_", "PRECOG_")
_KEPT = {"PRECOG_TEST_DSN", "PRECOG_PG_BINDIR", "PRECOG_PG_SEARCH"}
_USED: list[str] = []  # what pg_server used, for the final summary
_DATABASES: list[str] = []  # the database test_db made, for the final summary


def pytest_report_header(config: pytest.Config) -> str:
    """Say up front which server the database tests will use."""
    if os.environ.get("PRECOG_TEST_DSN", "").strip():
        return "precog_db test server: the server named by PRECOG_TEST_DSN"
    try:
        return f"precog_db test server: throwaway clusters from {find_server_binaries().describe()}"
    except PrecogDBError:
        return "precog_db test server: none found (database tests will stop with the fix)"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Repeat, after the results, which server the database tests ran against (also under -q)."""
    for line in _USED:
        terminalreporter.write_line(f"precog_db test server: {line}")
    for name in _DATABASES:
        terminalreporter.write_line(f"precog_db test database: {name} (this run's own, dropped at its end)")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """The session's PostgreSQL server (PRECOG_TEST_DSN or a throwaway cluster)."""
    dsn = os.environ.get("PRECOG_TEST_DSN", "").strip()
    if dsn:
        try:
            params = conninfo_to_dict(dsn)
            server = Server(
                host=str(params.get("host", "127.0.0.1")),
                port=int(str(params.get("port", 5432))),
                user=str(params.get("user", "postgres")),
                password=str(params.get("password", "")),
                admin_db=str(params.get("dbname", "postgres")),
            )
            with server.connect():
                pass
        except (psycopg.Error, ValueError) as exc:
            pytest.exit(f"PRECOG_TEST_DSN is set but unusable ({type(exc).__name__}); fix it or unset it", 3)
        server.source = f"the server from PRECOG_TEST_DSN ({server.host}:{server.port})"
        _USED.append(server.source)
        yield server
        return
    try:
        cluster = start_throwaway_cluster()
    except PrecogDBError as exc:
        pytest.exit(f"no PostgreSQL for the tests: {exc}", 3)
    source = f"a throwaway cluster on {cluster.host}:{cluster.port} from {cluster.source}"
    _USED.append(source)
    try:
        yield Server(
            host=cluster.host,
            port=cluster.port,
            user="postgres",
            password="",
            admin_db="postgres",
            cluster=cluster,
            source=source,
        )
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def test_db(pg_server: Server) -> Iterator[str]:
    """This run's own database (``precog_test_<run>``, `TEST_DB`), created once per session and dropped at its end.

    Per run, not a fixed ``precog_test``: two runs against one ``PRECOG_TEST_DSN`` (two CI jobs,
    two xdist workers of an outer run, a developer's run during CI) would otherwise force-drop each
    other's database mid-test. The naming rule reads the name as ``test``, like ``precog_test``.
    """
    name = pg_server.fresh_database(TEST_DB)
    pg_server.default_db = name  # what pg_server.settings() / env_vars() name when not told
    _DATABASES.append(name)
    yield name
    with pg_server.connect() as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def test_settings(pg_server: Server, test_db: str) -> DatabaseSettings:
    """Settings for the test environment pointing at the session's test database (`test_db`)."""
    return pg_server.settings(test_db)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test starts with no DB_*/PRECOG_* variables, in an empty directory, with no pool."""
    for key in list(os.environ):
        if key.startswith(_CLEARED_PREFIXES) and key not in _KEPT:
            monkeypatch.delenv(key)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    close_pool()
    yield
    close_pool()


@pytest.fixture
def ws(pg_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    """A CLI workspace in ``tmp_path`` on the session's server; every database it made is dropped afterwards."""
    with workspace(pg_server, tmp_path, monkeypatch) as w:
        yield w

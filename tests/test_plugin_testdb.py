"""The self-building test database: created when missing, migrated once (``precog_migrations_dir``), guarded."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from psycopg import sql

from precog_db.plugin import derived_name
from tests._helpers.server import RUN_ID, Server

pytest_plugins = ["pytester"]

DB = f"precog_selfbuild_test_{RUN_ID}"  # one per test process: runs sharing a server keep apart
RUN_TIMEOUT = 180

ITEMS = "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);\n-- precog:down\nDROP TABLE items;\n"
INDEX = "-- precog:no-transaction\nCREATE INDEX CONCURRENTLY items_name ON items (name);\n"

USES_ITEMS = """
    def test_items(db_cursor):
        db_cursor.execute("INSERT INTO items (name) VALUES ('x')")
        db_cursor.execute("SELECT count(*) AS n FROM items")
        assert db_cursor.fetchone() == {"n": 1}
"""

Run = Callable[..., pytest.RunResult]


def exists(pg_server: Server, name: str) -> bool:
    with pg_server.connect() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def query(pg_server: Server, dbname: str, statement: str) -> list[tuple[object, ...]]:
    with pg_server.connect(dbname) as conn:
        return list(conn.execute(statement).fetchall())


def drop(pg_server: Server, *names: str) -> None:
    with pg_server.connect() as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def missing(pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """DB_*/PRECOG_ENV pointing at a test database that does not exist yet (dropped again afterwards)."""
    extra = [derived_name(DB, s) for s in ("template", "gw0", "gw1")]
    drop(pg_server, DB, *extra)
    for key, value in pg_server.env_vars(DB).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PRECOG_ENV", "test")
    monkeypatch.setenv("DB_POOL_MIN_CONN", "1")
    monkeypatch.setenv("DB_POOL_MAX_CONN", "4")
    for key in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(key, raising=False)
    yield DB
    drop(pg_server, DB, *extra)


@pytest.fixture
def run(pytester: pytest.Pytester, missing: str) -> Run:
    def runner(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=RUN_TIMEOUT)

    return runner


def with_migrations(pytester: pytest.Pytester, *files: tuple[str, str]) -> None:
    pytester.makeini("[pytest]\nprecog_migrations_dir = db/migrations\n")
    directory = pytester.mkdir("db") / "migrations"
    directory.mkdir()
    for name, body in files:
        (directory / name).write_text(body)


class TestSelfBuilding:
    def test_missing_database_is_created_stamped_and_migrated_once(
        self, pytester: pytest.Pytester, run: Run, pg_server: Server
    ) -> None:
        """A missing test database is created, stamped test and migrated; the next run finds it up to date."""
        with_migrations(pytester, ("0001_items.sql", ITEMS), ("0002_index.sql", INDEX))
        pytester.makepyfile(test_items=USES_ITEMS)
        result = run()
        result.assert_outcomes(passed=1)
        out = result.stdout.str()
        assert f"created test database {DB}" in out
        assert "applied 2 migration(s) from" in out and "0001_items.sql, 0002_index.sql" in out
        assert query(pg_server, DB, "SELECT version FROM precog_meta.schema_migrations ORDER BY 1") == [(1,), (2,)]
        assert query(pg_server, DB, "SELECT env FROM precog_meta.stamp") == [("test",)]
        again = run()
        again.assert_outcomes(passed=1)
        assert "applied 0 migration(s)" in again.stdout.str() and "created test database" not in again.stdout.str()

    def test_missing_database_without_migrations_is_created_empty(
        self, pytester: pytest.Pytester, run: Run, pg_server: Server
    ) -> None:
        """Without precog_migrations_dir a missing test database is still created, so db_cursor works at once."""
        pytester.makepyfile(test_x="def test_x(db_cursor):\n    db_cursor.execute('SELECT 1')\n")
        run().assert_outcomes(passed=1)
        assert exists(pg_server, DB)

    def test_create_db_rebuilds_from_scratch(self, pytester: pytest.Pytester, run: Run, pg_server: Server) -> None:
        """--precog-create-db with migrations drops the test database, recreates it and applies every migration."""
        with_migrations(pytester, ("0001_items.sql", ITEMS))
        pytester.makepyfile(test_items=USES_ITEMS)
        run().assert_outcomes(passed=1)
        with pg_server.connect(DB) as conn:
            conn.execute("INSERT INTO items (name) VALUES ('left over')")
        run().assert_outcomes(failed=1)  # the committed row is still there
        rebuilt = run("--precog-create-db")
        rebuilt.assert_outcomes(passed=1)
        assert f"dropped test database {DB}" in rebuilt.stdout.str()
        assert query(pg_server, DB, "SELECT count(*) FROM items") == [(0,)]


class TestGuardFirst:
    @pytest.mark.parametrize(
        ("env", "dbname", "needle"),
        [
            ("staging", "precog_selfbuild_staging", "environment is staging"),
            ("test", "precog_selfbuild_scratch", "does not look like a test database"),
        ],
    )
    def test_nothing_is_created_for_a_refused_target(
        self,
        pytester: pytest.Pytester,
        run: Run,
        pg_server: Server,
        monkeypatch: pytest.MonkeyPatch,
        env: str,
        dbname: str,
        needle: str,
    ) -> None:
        """The guard refuses staging and non-test names before anything is created or migrated."""
        drop(pg_server, dbname)
        monkeypatch.setenv("PRECOG_ENV", env)
        monkeypatch.setenv("DB_NAME", dbname)
        with_migrations(pytester, ("0001_items.sql", ITEMS))
        pytester.makepyfile(test_items=USES_ITEMS)
        result = run()
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert needle in result.stdout.str() + result.stderr.str()
        assert not exists(pg_server, dbname)


class TestXdistTemplates:
    def test_templates_come_from_the_migrated_database_and_go_stale(
        self, pytester: pytest.Pytester, run: Run, pg_server: Server
    ) -> None:
        """Workers clone a template of the migrated database; a reused template is rebuilt after a new migration."""
        with_migrations(pytester, ("0001_items.sql", ITEMS))
        pytester.makepyfile(test_items=USES_ITEMS)
        first = run("-n", "2", "--dist", "each", "--precog-reuse-db")
        first.assert_outcomes(passed=2)
        assert first.stdout.str().count("built template database") == 1
        assert query(pg_server, DB, "SELECT count(*) FROM precog_meta.schema_migrations") == [(1,)]
        (pytester.path / "db" / "migrations" / "0002_more.sql").write_text("CREATE TABLE more_items (id int);\n")
        pytester.makepyfile(
            test_more="def test_more(db_cursor):\n    db_cursor.execute('SELECT count(*) FROM more_items')\n"
        )
        second = run("-n", "2", "--dist", "each", "--precog-reuse-db")
        second.assert_outcomes(passed=4)
        assert second.stdout.str().count("built template database") == 1

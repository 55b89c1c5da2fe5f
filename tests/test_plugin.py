"""The pytest plugin, run for real in pytester subprocesses against the harness server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from psycopg import sql

from precog_db import stamp_database
from precog_db.plugin import derived_name
from tests._helpers.server import RUN_ID, Server

pytest_plugins = ["pytester"]

# One database per test process (each outer xdist worker, each run), in case they share a server (PRECOG_TEST_DSN).
DB = f"precog_plugin_test_{RUN_ID}"
RUN_TIMEOUT = 180

Run = Callable[..., pytest.RunResult]


def admin(pg_server: Server, dbname: str, query: str) -> list[tuple[object, ...]]:
    with pg_server.connect(dbname) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def databases(pg_server: Server, prefix: str) -> set[str]:
    rows = admin(pg_server, pg_server.admin_db, f"SELECT datname FROM pg_database WHERE datname LIKE '{prefix}%'")
    return {str(r[0]) for r in rows}


def drop(pg_server: Server, *names: str) -> None:
    with pg_server.connect() as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def target(pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh test database with two FK-linked tables, DB_*/PRECOG_ENV pointing at it; dropped afterwards."""
    pg_server.fresh_database(DB)
    admin(
        pg_server,
        DB,
        "CREATE TABLE parent (id serial PRIMARY KEY, name text NOT NULL);"
        "CREATE TABLE child (id serial PRIMARY KEY, parent_id int NOT NULL REFERENCES parent (id));"
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, worker text);"
        "CREATE TABLE events (id int NOT NULL, parent_id int REFERENCES parent (id)) PARTITION BY RANGE (id);"
        "CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (0) TO (1000);",
    )
    for key, value in pg_server.env_vars(DB).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PRECOG_ENV", "test")
    monkeypatch.setenv("DB_POOL_MIN_CONN", "1")
    monkeypatch.setenv("DB_POOL_MAX_CONN", "4")
    for key in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(key, raising=False)
    yield DB
    drop(pg_server, DB)


@pytest.fixture
def run(pytester: pytest.Pytester, target: str) -> Run:
    """Run pytest in a subprocess in the pytester directory (the plugin loads through its entry point)."""

    def runner(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=RUN_TIMEOUT)

    return runner


GUARDED_MODULE = """
    import pathlib

    def test_runs_first():
        pathlib.Path("ran_first").write_text("yes")

    def test_db(db_cursor):
        db_cursor.execute("SELECT 1 AS one")
        assert db_cursor.fetchone() == {"one": 1}
"""


def refusal_printed_once(result: pytest.RunResult) -> str:
    """The run's whole output, after checking that the refusal appears in it exactly once and plainly."""
    out = result.stdout.str() + result.stderr.str()
    assert out.count("precog_db refuses to run database tests") == 1, out
    assert "_pytest.outcomes.Exit" not in out, out
    return out


class TestGuard:
    def _refused(self, pytester: pytest.Pytester, run: Run, *needles: str) -> None:
        pytester.makepyfile(test_guarded=GUARDED_MODULE)
        result = run()
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        out = refusal_printed_once(result)
        for needle in needles:
            assert needle in out
        assert not (pytester.path / "ran_first").exists(), "a test ran before the guard"

    def test_allows_a_test_database(self, pytester: pytest.Pytester, run: Run) -> None:
        """With PRECOG_ENV=test and a database named *_test, the guarded session runs."""
        pytester.makepyfile(test_guarded=GUARDED_MODULE)
        result = run()
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines([f"*tests ran on the test database '{DB}'*"])

    def test_fresh_project_defaults_to_the_test_database(
        self, pytester: pytest.Pytester, run: Run, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With neither PRECOG_ENV nor DB_NAME set, db_cursor uses precog_test and code under test sees test.

        The suite's own database has a per-run name (tests/conftest.py ``test_db``); the plugin creates
        ``precog_test`` itself when it is missing (tests/test_plugin_testdb.py).
        """
        monkeypatch.delenv("PRECOG_ENV")
        monkeypatch.delenv("DB_NAME")
        pytester.makepyfile(
            test_fresh="""
            from precog_db import get_environment

            def test_x(db_cursor):
                db_cursor.execute("SELECT current_database() AS db")
                assert db_cursor.fetchone() == {"db": "precog_test"}
                assert get_environment().value == "test"
            """
        )
        run().assert_outcomes(passed=1)

    def test_refuses_dev(self, pytester: pytest.Pytester, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
        """Environment dev (here the default, no PRECOG_ENV and a neutral DB_NAME) ends the session."""
        monkeypatch.delenv("PRECOG_ENV")
        monkeypatch.setenv("DB_NAME", "trading")
        self._refused(pytester, run, "environment is dev", "inferred from DB_NAME", "PRECOG_ENV=test")

    @pytest.mark.parametrize("env", ["staging", "prod"])
    def test_refuses_staging_and_prod_whatever_the_flags(
        self, pytester: pytest.Pytester, run: Run, monkeypatch: pytest.MonkeyPatch, env: str
    ) -> None:
        """Staging and prod are refused even with PRECOG_PROD_CONFIRMED=yes and every plugin option."""
        monkeypatch.setenv("PRECOG_ENV", env)
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        pytester.makepyfile(test_guarded=GUARDED_MODULE)
        result = run("--precog-reuse-db", "--precog-create-db")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        refusal_printed_once(result)
        result.stderr.fnmatch_lines([f"ERROR: precog_db refuses*environment is {env}*never run against staging*"])
        assert not (pytester.path / "ran_first").exists()

    def test_refuses_a_name_that_is_not_a_test_database(
        self, pytester: pytest.Pytester, run: Run, monkeypatch: pytest.MonkeyPatch, pg_server: Server
    ) -> None:
        """An existing database whose name does not say test is refused even with PRECOG_ENV=test."""
        pg_server.fresh_database("scratch")
        monkeypatch.setenv("DB_NAME", "scratch")
        self._refused(pytester, run, "'scratch'", "does not look like a test database")

    def test_refuses_a_name_of_another_environment(
        self, pytester: pytest.Pytester, run: Run, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """PRECOG_ENV=test with DB_NAME naming prod is refused before connecting."""
        monkeypatch.setenv("DB_NAME", "precog_prod")
        self._refused(pytester, run, "'precog_prod'", "belongs to prod")

    def test_refuses_a_database_stamped_as_another_environment(
        self, pytester: pytest.Pytester, run: Run, pg_server: Server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A test-named database stamped prod is refused, naming the stamp."""
        # No DatabaseSettings can say prod for a test-named database any more (the naming
        # rule), so the prod stamp is written behind the library's back, as a restore would.
        stamp_database("test", settings=pg_server.settings(DB))
        with pg_server.connect(DB) as conn:
            conn.execute("UPDATE precog_meta.stamp SET env = 'prod'")
        self._refused(pytester, run, "stamped prod", "resolved environment test")

    def test_guard_sees_fixtures_used_indirectly(
        self, pytester: pytest.Pytester, run: Run, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A test that reaches db_cursor only through its own fixture is guarded too."""
        monkeypatch.setenv("PRECOG_ENV", "prod")
        pytester.makeconftest(
            """
            import pytest

            @pytest.fixture
            def orders(db_cursor):
                return db_cursor
            """
        )
        pytester.makepyfile(test_indirect="def test_orders(orders):\n    pass\n")
        result = run()
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        refusal_printed_once(result)
        result.stderr.fnmatch_lines(["*never run against staging or production*"])

    def test_sessions_without_database_fixtures_are_left_alone(
        self, pytester: pytest.Pytester, run: Run, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A session whose tests use no database fixture runs in any environment (unique_test_id needs none)."""
        monkeypatch.setenv("PRECOG_ENV", "prod")
        pytester.makepyfile(
            test_plain="""
            def test_ids(unique_test_id):
                assert unique_test_id.startswith("t") and len(unique_test_id) == 13
            """
        )
        run().assert_outcomes(passed=1)

    def test_disabled_with_p_no(self, pytester: pytest.Pytester, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
        """-p no:precog_db removes the plugin: no guard and no fixtures."""
        monkeypatch.setenv("PRECOG_ENV", "prod")
        pytester.makepyfile(test_guarded=GUARDED_MODULE)
        result = run("-p", "no:precog_db")
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(["*fixture 'db_cursor' not found*"])
        assert "precog_db refuses" not in result.stdout.str()


class TestFixtures:
    def test_db_cursor_rolls_back_every_test(self, pytester: pytest.Pytester, run: Run, pg_server: Server) -> None:
        """Writes through db_cursor are visible inside the test and gone after it, even when the test fails."""
        pytester.makepyfile(
            test_rollback="""
            seen = []

            def test_write(db_cursor, unique_test_id):
                seen.append(unique_test_id)
                db_cursor.execute("INSERT INTO items (name) VALUES (%s)", (unique_test_id,))
                db_cursor.execute("SELECT count(*) AS n FROM items")
                assert db_cursor.fetchone() == {"n": 1}

            def test_write_then_fail(db_cursor, unique_test_id):
                seen.append(unique_test_id)
                db_cursor.execute("INSERT INTO items (name) VALUES (%s)", (unique_test_id,))
                raise AssertionError("expected failure")

            def test_nothing_survived(db_cursor):
                db_cursor.execute("SELECT count(*) AS n FROM items")
                assert db_cursor.fetchone() == {"n": 0}
                assert len(set(seen)) == 2
            """
        )
        result = run()
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(["*expected failure*"])
        assert admin(pg_server, DB, "SELECT count(*) FROM items") == [(0,)]

    def test_clean_test_data_truncates_children_first(
        self, pytester: pytest.Pytester, run: Run, pg_server: Server
    ) -> None:
        """Listed parent first, FK-linked tables (one partitioned) are truncated children first; identities restart."""
        admin(
            pg_server,
            DB,
            "INSERT INTO parent (name) VALUES ('a'), ('b'); INSERT INTO child (parent_id) VALUES (1);"
            "INSERT INTO events VALUES (5, 2)",
        )
        pytester.makeini("[pytest]\nprecog_clean_tables =\n    parent\n    public.child\n    events\n")
        pytester.makepyfile(
            test_clean="""
            def test_clean(clean_test_data, db_cursor):
                assert clean_test_data == ["public.child", "public.events", "public.parent"]
                db_cursor.execute("SELECT (SELECT count(*) FROM parent) + (SELECT count(*) FROM child) AS n")
                assert db_cursor.fetchone() == {"n": 0}
                db_cursor.execute("INSERT INTO parent (name) VALUES ('c') RETURNING id")
                assert db_cursor.fetchone() == {"id": 1}
            """
        )
        run().assert_outcomes(passed=1)
        assert admin(pg_server, DB, "SELECT count(*) FROM parent") == [(0,)]

    def test_clean_test_data_also_cleans_after_the_test(
        self, pytester: pytest.Pytester, run: Run, pg_server: Server
    ) -> None:
        """A row the (last) test committed is gone when the run ends, not only when the next test starts."""
        pytester.makeini("[pytest]\nprecog_clean_tables =\n    parent\n    public.child\n    events\n")
        pytester.makepyfile(
            test_commits="""
            from precog_db import get_cursor

            def test_commits_a_row(clean_test_data):
                with get_cursor(commit=True) as cur:
                    cur.execute("INSERT INTO parent (name) VALUES ('kept?')")
            """
        )
        run().assert_outcomes(passed=1)
        assert admin(pg_server, DB, "SELECT count(*) FROM parent") == [(0,)]

    def test_clean_test_data_refusals(self, pytester: pytest.Pytester, run: Run, pg_server: Server) -> None:
        """clean_test_data refuses outside test and when a referencing table is not listed, truncating nothing."""
        admin(pg_server, DB, "INSERT INTO parent (name) VALUES ('a'); INSERT INTO child (parent_id) VALUES (1)")
        pytester.makeini("[pytest]\nprecog_clean_tables = parent\n")
        pytester.makepyfile(
            test_refusals="""
            import pytest

            @pytest.fixture
            def staging(monkeypatch):
                monkeypatch.setenv("PRECOG_ENV", "staging")

            def test_outside_test(db_pool, staging, clean_test_data):
                pass

            def test_unlisted_child(clean_test_data):
                pass
            """
        )
        result = run()
        result.assert_outcomes(errors=2)
        result.stdout.fnmatch_lines(
            [
                "*clean_test_data refuses to truncate anything outside test: the environment staging*",
                "*child, events reference(s) them through a foreign key but is not listed*",
            ]
        )
        assert admin(pg_server, DB, "SELECT (SELECT count(*) FROM parent), (SELECT count(*) FROM child)") == [(1, 1)]


XDIST_MODULE = """
    import os, pathlib, time
    from precog_db import get_cursor

    def test_workers_are_isolated(db_cursor):
        worker = os.environ["PYTEST_XDIST_WORKER"]
        db_cursor.execute("SELECT current_database() AS db")
        db = db_cursor.fetchone()["db"]
        assert db.endswith("_" + worker) and os.environ["DB_NAME"] == db
        # Commit for real, as service code would, then wait until the other worker has too.
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO items (name, worker) VALUES ('row', %s)", (worker,))
        shared = pathlib.Path(os.environ["BARRIER_DIR"])
        (shared / worker).write_text("committed")
        deadline = time.monotonic() + 60
        while len(list(shared.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(shared.iterdir())) == 2, "the other worker never committed"
        with get_cursor() as cur:
            cur.execute("SELECT worker FROM items")
            assert [r["worker"] for r in cur.fetchall()] == [worker]
"""


@pytest.mark.slow
class TestXdist:
    def _module(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        barrier = pytester.mkdir("barrier")
        monkeypatch.setenv("BARRIER_DIR", str(barrier))
        pytester.makepyfile(test_xdist=XDIST_MODULE)

    def test_workers_do_not_see_each_other(
        self, pytester: pytest.Pytester, run: Run, pg_server: Server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two workers each commit a row into their own clone of a once-built template and see only their own."""
        self._module(pytester, monkeypatch)
        result = run("-n", "2", "--dist", "each")
        result.assert_outcomes(passed=2)
        out = result.stdout.str()
        assert out.count("built template database") == 1
        assert out.count("cloned worker database") == 2
        # By default everything the run created is dropped, and the source database is untouched.
        assert databases(pg_server, DB + "_") == set()
        assert admin(pg_server, DB, "SELECT count(*) FROM items") == [(0,)]

    def test_guard_stops_xdist_runs_with_its_message(
        self, pytester: pytest.Pytester, run: Run, monkeypatch: pytest.MonkeyPatch, pg_server: Server
    ) -> None:
        """Under xdist the guard still stops the run before any test, and the controller shows why."""
        monkeypatch.setenv("PRECOG_ENV", "staging")
        pytester.makepyfile(test_guarded=GUARDED_MODULE)
        result = run("-n", "2")
        assert result.ret not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
        result.stdout.fnmatch_lines(["*precog_db refuses to run database tests: the environment is staging*"])
        refusal_printed_once(result)
        assert "INTERNALERROR" not in result.stdout.str()
        assert not (pytester.path / "ran_first").exists()
        assert databases(pg_server, DB + "_") == set()

    def test_reuse_keeps_databases_between_runs(
        self, pytester: pytest.Pytester, run: Run, pg_server: Server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """--precog-reuse-db keeps the template and worker databases; the next run reuses them; create rebuilds."""
        kept = {derived_name(DB, "template"), derived_name(DB, "gw0"), derived_name(DB, "gw1")}
        try:
            self._module(pytester, monkeypatch)
            run("-n", "2", "--dist", "each", "--precog-reuse-db").assert_outcomes(passed=2)
            assert databases(pg_server, DB + "_") == kept
            admin(pg_server, derived_name(DB, "gw0"), "DELETE FROM items")
            admin(pg_server, derived_name(DB, "gw1"), "DELETE FROM items")

            for entry in (pytester.path / "barrier").iterdir():
                entry.unlink()
            second = run("-n", "2", "--dist", "each", "--precog-reuse-db")
            second.assert_outcomes(passed=2)
            assert second.stdout.str().count("reused worker database") == 2
            assert "built template database" not in second.stdout.str()

            for entry in (pytester.path / "barrier").iterdir():
                entry.unlink()
            third = run("-n", "2", "--dist", "each", "--precog-reuse-db", "--precog-create-db")
            third.assert_outcomes(passed=2)
            assert third.stdout.str().count("built template database") == 1
            assert databases(pg_server, DB + "_") == kept
        finally:
            drop(pg_server, *kept)


ASYNC_MODULE = """
    import pathlib
    import pytest

    @pytest.fixture
    def anyio_backend():
        return "asyncio"

    def test_runs_first():
        pathlib.Path("ran_first").write_text("yes")

    @pytest.mark.asyncio
    async def test_under_pytest_asyncio(adb_cursor, unique_test_id):
        await adb_cursor.execute("INSERT INTO items (name) VALUES (%s)", (unique_test_id,))
        await adb_cursor.execute("SELECT count(*) AS n FROM items")
        assert await adb_cursor.fetchone() == {"n": 1}

    @pytest.mark.anyio
    async def test_under_anyio(adb_cursor, adb_pool):
        await adb_cursor.execute("SELECT current_database() AS db")
        assert (await adb_cursor.fetchone())["db"] == adb_pool.settings.dbname

    @pytest.mark.asyncio
    async def test_nothing_survived(adb_cursor):
        await adb_cursor.execute("SELECT count(*) AS n FROM items")
        assert await adb_cursor.fetchone() == {"n": 0}
"""


class TestAsyncFixtures:
    def test_run_under_both_plugins_and_roll_back(self, pytester: pytest.Pytester, run: Run) -> None:
        """adb_cursor works under pytest-asyncio and anyio and rolls back each test's writes."""
        pytester.makepyfile(test_async=ASYNC_MODULE)
        pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
        result = run("-p", "no:randomly")
        result.assert_outcomes(passed=4)

    def test_refused_outside_test(self, pytester: pytest.Pytester, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
        """A session whose async tests use adb_cursor is refused in staging before any test runs."""
        monkeypatch.setenv("PRECOG_ENV", "staging")
        pytester.makepyfile(test_async=ASYNC_MODULE)
        pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
        result = run()
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        refusal_printed_once(result)
        assert not (pytester.path / "ran_first").exists(), "a test ran before the guard"

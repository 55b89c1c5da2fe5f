"""The test harness itself (issue 21.23): two runs against one server keep out of each other's way.

``tests/conftest.py``'s ``test_db`` once force-dropped a fixed ``precog_test`` at the start of every
session: a second run against the same ``PRECOG_TEST_DSN`` (two CI jobs, a developer's run during
CI) killed the first run's connections and dropped its tables mid-test.
"""

from __future__ import annotations

import os
import subprocess
import sys

from precog_db.environment import Environment, environment_named_by
from precog_db.plugin import derived_name
from tests._helpers.server import REPO, Server

_CHILD_TIMEOUT = 240.0  # seconds for the whole second run (a throwaway-free pytest session of one test)


def _test_databases(pg_server: Server) -> set[str]:
    with pg_server.connect() as admin:
        return {str(r[0]) for r in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'precog_test%'")}


def test_the_session_database_is_this_runs_own_and_named_test(test_db: str) -> None:
    """Not the fixed precog_test; the naming rule reads it (and the plugin's per-xdist-worker names) as test."""
    assert test_db != "precog_test" and test_db.startswith("precog_test_")
    assert environment_named_by(test_db) is Environment.TEST
    for worker in ("gw0", "gw17", "template"):
        assert environment_named_by(derived_name(test_db, worker)) is Environment.TEST


def test_a_second_run_on_the_same_server_leaves_this_run_alone(pg_server: Server, test_db: str) -> None:
    """A whole second pytest session against this session's server (PRECOG_TEST_DSN) runs a database test.

    Meanwhile this run holds a connection to its own database: the second run must neither drop it
    nor terminate the connection, and it drops the database it made for itself when it ends.
    """
    before = _test_databases(pg_server)
    assert test_db in before
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_", "PYTEST_")) and k != "DATABASE_URL"
    }
    env["PRECOG_TEST_DSN"] = pg_server.conninfo()
    env["PYTHONPATH"] = str(REPO)
    with pg_server.connect(test_db) as mine:
        mine.execute("CREATE TABLE IF NOT EXISTS harness_mine (x int)")
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/test_cursors.py::TestHarness::test_table_fixture_leaves_a_full_pool_that_never_grew",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=_CHILD_TIMEOUT,
            check=False,
        )
        assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-2000:]
        assert "1 passed" in child.stdout, child.stdout[-3000:]
        # This run's connection and database survived the second run's start and end.
        assert mine.execute("SELECT current_database(), to_regclass('harness_mine') IS NOT NULL").fetchone() == (
            test_db,
            True,
        )
        mine.execute("DROP TABLE harness_mine")
    assert _test_databases(pg_server) == before  # the second run's own database is gone again

"""The test harness itself (issue 21.23): two runs against one server keep out of each other's way.

``tests/conftest.py``'s ``test_db`` once force-dropped a fixed ``precog_test`` at the start of every
session: a second run against the same ``PRECOG_TEST_DSN`` (two CI jobs, a developer's run during
CI) killed the first run's connections and dropped its tables mid-test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from precog_db.environment import Environment, environment_named_by
from precog_db.plugin import derived_name
from tests._helpers.server import REPO, Server

_CHILD_TIMEOUT = 240.0  # seconds for the whole second run (a throwaway-free pytest session of one test)
_CHILD_TEST = "tests/test_cursor_common.py::TestHarness::test_table_fixture_leaves_a_full_pool_that_never_grew"


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
    nor terminate the connection, and it drops the database it made for itself when it ends (named
    after its process id, `tests._helpers.server.RUN_ID`; other runs' databases may come and go).
    """
    assert test_db in _test_databases(pg_server)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_", "PYTEST_")) and k != "DATABASE_URL"
    }
    env["PRECOG_TEST_DSN"] = pg_server.conninfo()
    env["PYTHONPATH"] = str(REPO)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", _CHILD_TEST]
    with pg_server.connect(test_db) as mine:
        mine.execute("CREATE TABLE IF NOT EXISTS harness_mine (x int)")
        with subprocess.Popen(
            args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as child:
            try:
                out, err = child.communicate(timeout=_CHILD_TIMEOUT)
            finally:
                child.kill()  # a no-op once it ended; a hang is bounded
        assert child.returncode == 0, out[-3000:] + err[-2000:]
        assert "1 passed" in out, out[-3000:]
        # This run's connection and database survived the second run's start and end.
        assert mine.execute("SELECT current_database(), to_regclass('harness_mine') IS NOT NULL").fetchone() == (
            test_db,
            True,
        )
        mine.execute("DROP TABLE harness_mine")
    theirs = re.findall(r"precog_db test database: (\S+) ", out)
    assert len(theirs) == 1 and theirs[0].startswith(f"precog_test_{child.pid}_"), out[-3000:]
    assert theirs[0] != test_db and theirs[0] not in _test_databases(pg_server)  # its own, and gone again

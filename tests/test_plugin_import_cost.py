"""Loading the pytest plugin costs nothing where no test uses the database (issue 26).

The plugin (`precog_db.plugin`, registered through ``pytest11``) loads in every pytest run of
every project where precog_db is installed. Its heavy half (`precog_db._plugin_impl`: psycopg,
the pools, the settings) is imported only when a collected test uses a database fixture.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = """
import sys

def pytest_sessionfinish(session):
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("psycopg", "psycopg_pool")
                   or m in ("precog_db._plugin_impl", "precog_db.pool", "precog_db.settings"))
    print("HEAVY=" + ",".join(heavy))
    print("PLUGIN=" + str("precog_db.plugin" in sys.modules))
"""


def _run(project: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", *args, str(project)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout + done.stderr


def test_a_run_without_database_tests_imports_no_driver(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_plain.py").write_text("def test_plain(unique_test_id):\n    assert unique_test_id\n")
    out = _run(tmp_path)
    assert "1 passed" in out, out
    assert "PLUGIN=True" in out, out  # the plugin did load (its fixture ran) ...
    assert "HEAVY=\n" in out, out  # ... and imported neither psycopg nor its own heavy half


def test_a_collect_only_run_imports_no_driver(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_db.py").write_text("def test_db(db_cursor):\n    pass\n")
    out = _run(tmp_path, "--collect-only")
    assert "HEAVY=\n" in out, out


def test_a_database_test_still_meets_the_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lazy import never skips the session guard: a test using db_cursor on a dev database is stopped."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    (tmp_path / "test_db.py").write_text("def test_db(db_cursor):\n    pass\n")
    monkeypatch.setenv("PRECOG_ENV", "dev")
    monkeypatch.setenv("DB_NAME", "precog_dev")
    out = _run(tmp_path)
    assert "1 passed" not in out, out
    assert "precog_db refuses to run database tests: the environment is dev" in out, out

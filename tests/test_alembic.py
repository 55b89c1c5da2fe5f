"""``precog_db.alembic.run_migrations``: a real ``alembic upgrade head`` through precog_db's environments and guards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from precog_db.environment import Environment
from precog_db.stamp import stamp_database
from tests._helpers.cli import SENTINEL, Result, Workspace
from tests._helpers.server import REPO

ENV_PY = """\
from alembic import context

from precog_db.alembic import run_migrations

run_migrations(context)
"""

REVISION = '''\
"""create markets"""
import sqlalchemy as sa
from alembic import op

revision = "a1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("markets", sa.Column("id", sa.Integer, primary_key=True), sa.Column("symbol", sa.Text))


def downgrade():
    op.drop_table("markets")
'''


def alembic_project(root: Path) -> Path:
    """An Alembic project in ``root`` (alembic.ini, an env.py on precog_db, revision a1); return its versions dir."""
    (root / "alembic.ini").write_text("[alembic]\nscript_location = migrations\n")
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(ENV_PY)
    (versions / "a1_create_markets.py").write_text(REVISION)
    return versions


@pytest.fixture
def ws(ws: Workspace, tmp_path: Path) -> Workspace:
    """The shared workspace (tests/conftest.py), with an Alembic project in it."""
    alembic_project(tmp_path)
    return ws


def alembic(ws: Workspace, *argv: str, env: dict[str, str] | None = None) -> Result:
    """Run the real ``alembic`` command line in a subprocess, in the workspace, with no terminal."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_")) and k != "DATABASE_URL"}
    environ.update({"PYTHONPATH": str(REPO), **(env or {})})
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", *argv],
        cwd=ws.root,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


class TestOnline:
    def test_upgrade_head_runs_through_the_chokepoint_and_is_audited(self, ws: Workspace) -> None:
        """alembic -x env=test upgrade head creates the table and records one audit entry, password nowhere."""
        ws.add("test")
        result = alembic(ws, "-x", "env=test", "upgrade", "head")
        assert result.code == 0, result.err
        assert ws.has_table("test", "markets")
        assert ws.query("test", "SELECT version_num FROM alembic_version") == [("a1",)]
        entry = ws.audit_entries()[-1]
        assert (entry["operation"], entry["outcome"], entry["revision"], entry["sql"]) == (
            "alembic upgrade",
            "ok",
            "head",
            False,
        )
        assert entry["database"]["name"] == ws.databases["test"].dbname
        assert SENTINEL not in result.out + result.err + ws.audit_log.read_text()
        down = alembic(ws, "-x", "env=test", "downgrade", "base")
        assert down.code == 0, down.err
        assert not ws.has_table("test", "markets")

    def test_environment_from_precog_env_and_x_env_wins(self, ws: Workspace) -> None:
        """Without -x env, PRECOG_ENV chooses; -x env=test overrides PRECOG_ENV=staging."""
        ws.add("test")
        ws.add("staging")
        assert alembic(ws, "upgrade", "head", env={"PRECOG_ENV": "test"}).code == 0
        assert ws.has_table("test", "markets") and not ws.has_table("staging", "markets")
        assert alembic(ws, "-x", "env=test", "downgrade", "base", env={"PRECOG_ENV": "staging"}).code == 0
        assert not ws.has_table("test", "markets")

    def test_stamp_of_another_environment_is_refused(self, ws: Workspace) -> None:
        """A database stamped staging but configured as test is refused before any migration runs."""
        settings = ws.add("test", stamp=False, dbname="alembic_plain_db")
        stamp_database(Environment.STAGING, settings=settings.replace(env="staging"))
        result = alembic(ws, "-x", "env=test", "upgrade", "head")
        assert result.code != 0
        assert "stamped staging" in result.err
        assert not ws.has_table("test", "markets")
        assert ws.audit_entries()[-1]["outcome"] == "refused"


class TestOffline:
    def test_sql_mode_prints_the_sql_and_connects_nowhere(self, ws: Workspace) -> None:
        """upgrade head --sql writes PostgreSQL DDL to stdout and leaves the database untouched."""
        ws.add("test")
        result = alembic(ws, "-x", "env=test", "upgrade", "head", "--sql")
        assert result.code == 0, result.err
        assert "CREATE TABLE markets" in result.out
        assert not ws.has_table("test", "markets")
        assert ws.audit_entries()[-1]["sql"] is True


class TestProduction:
    def test_refused_without_precog_prod_confirmed(self, ws: Workspace) -> None:
        """A prod run without PRECOG_PROD_CONFIRMED=yes is refused before connecting, and audited as refused."""
        ws.add("prod")
        result = alembic(ws, "-x", "env=prod", "upgrade", "head")
        assert result.code != 0
        assert "PRECOG_PROD_CONFIRMED=yes" in result.err
        assert "PRODUCTION" in result.err  # the banner came first
        assert not ws.has_table("prod", "markets")
        entry = ws.audit_entries()[-1]
        assert (entry["operation"], entry["outcome"]) == ("alembic upgrade", "refused")

    def test_typed_name_is_required(self, ws: Workspace) -> None:
        """With PRECOG_PROD_CONFIRMED=yes, no terminal and no name, or a wrong name, is refused; the right one runs."""
        ws.add("prod")
        name = ws.databases["prod"].dbname
        confirmed = {"PRECOG_PROD_CONFIRMED": "yes"}
        missing = alembic(ws, "-x", "env=prod", "upgrade", "head", env=confirmed)
        assert missing.code != 0
        assert f"-x confirm_database={name}" in missing.err
        wrong = alembic(ws, "-x", "env=prod", "-x", "confirm_database=precog_prod", "upgrade", "head", env=confirmed)
        assert wrong.code != 0 and "does not match" in wrong.err
        assert not ws.has_table("prod", "markets")
        right = alembic(ws, "-x", "env=prod", "-x", f"confirm_database={name}", "upgrade", "head", env=confirmed)
        assert right.code == 0, right.err
        assert ws.has_table("prod", "markets")
        outcomes = [(e["operation"], e["outcome"]) for e in ws.audit_entries()[-3:]]
        assert outcomes == [("alembic upgrade", "refused")] * 2 + [("alembic upgrade", "ok")]
        assert ws.audit_entries()[-1]["confirmation"] == "PRECOG_PROD_CONFIRMED=yes + --confirm-database"

    def test_read_only_commands_need_only_the_prod_confirmation(self, ws: Workspace) -> None:
        """alembic current on prod runs with PRECOG_PROD_CONFIRMED=yes alone (no typed name), and not without it."""
        ws.add("prod")
        assert alembic(ws, "-x", "env=prod", "current").code != 0
        result = alembic(ws, "-x", "env=prod", "current", env={"PRECOG_PROD_CONFIRMED": "yes"})
        assert result.code == 0, result.err
        assert ws.audit_entries()[-1]["confirmation"] == "PRECOG_PROD_CONFIRMED=yes"


LOCK_TIMEOUT_REVISION = '''\
"""record the lock_timeout the revision runs under"""
from alembic import op

revision = "a2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("CREATE TABLE seen_lock_timeout AS SELECT current_setting('lock_timeout') AS value")


def downgrade():
    op.execute("DROP TABLE seen_lock_timeout")
'''


def test_revisions_run_under_the_migration_lock_timeout(ws: Workspace) -> None:
    """DB_MIGRATION_LOCK_TIMEOUT is the lock_timeout of the session the revisions run in."""
    ws.add("test")
    (ws.root / "migrations" / "versions" / "a2_lock_timeout.py").write_text(LOCK_TIMEOUT_REVISION)
    result = alembic(ws, "-x", "env=test", "upgrade", "head", env={"DB_MIGRATION_LOCK_TIMEOUT": "1234"})
    assert result.code == 0, result.err
    assert ws.query("test", "SELECT value FROM seen_lock_timeout") == [("1234ms",)]

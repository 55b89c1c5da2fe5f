"""The README's demo and the local cluster behind it, run as a newcomer would."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from precog_db.local.cluster import LocalCluster, free_port, local_up
from tests._helpers.cli import console_script
from tests._helpers.server import REPO

MARKER = "# written by precog-db local up"


def run_demo(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_"))}
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo.py")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    LocalCluster(tmp_path / ".precog").destroy()


def stop_command(stdout: str) -> list[str]:
    """The `precog-db … local down` command the demo's closing notice tells the user to run."""
    found = re.search(r"\(or `(.+?) local down`\)", stdout)
    assert found, stdout
    return [*shlex.split(found.group(1)), "local", "down"]


@pytest.mark.slow
class TestDemo:
    def test_demo_starts_local_cluster_and_keeps_data(self, workdir: Path) -> None:
        """With no reachable dev database the demo starts a local cluster, runs the service, and reuses it next time."""
        # A stale generated file pointing at a port where nothing listens: the demo says it is not usable.
        (workdir / "config").mkdir()
        (workdir / "config" / ".env.dev").write_text(f"{MARKER}\nDB_HOST=127.0.0.1\nDB_PORT={free_port()}\n")
        first = run_demo(workdir)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "the configured dev database is not usable here" in first.stdout
        assert "using the local cluster" in first.stdout and "PostgreSQL binaries in" in first.stdout
        assert "recorded fill #5" in first.stdout
        env_dev = (workdir / "config" / ".env.dev").read_text()
        assert "DB_NAME=precog_dev" in env_dev
        assert (workdir / "config" / ".env.dev").stat().st_mode & 0o077 == 0

        second = run_demo(workdir)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "using the configured dev database" in second.stdout
        assert "recorded fill #10" in second.stdout  # data from the first run survived
        fills = sum(int(n) for n in re.findall(r"\((\d+) fills\)", second.stdout))
        assert fills == 10

    def test_demo_tells_where_the_data_is_stamps_and_says_how_to_stop(self, workdir: Path) -> None:
        """The demo names the real data directory (and why, as root), stamps its databases, and says how to stop."""
        first = run_demo(workdir)
        assert first.returncode == 0, first.stdout + first.stderr
        cluster = LocalCluster(workdir / ".precog")
        assert f"its data is in {cluster.data_dir}" in first.stdout
        if os.geteuid() == 0:
            assert "PostgreSQL refuses to run as root" in first.stdout
        assert "stamped database precog_dev as dev" in first.stdout
        assert "stamped database precog_test as test" in first.stdout
        second = run_demo(workdir)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "the local PostgreSQL that an earlier run started" in second.stdout
        assert f"its data is in {cluster.data_dir}" in second.stdout
        for run in (first, second):
            output = run.stdout + run.stderr
            assert "database_unstamped" not in output  # the demo's databases are stamped
            assert "pool_opened" not in run.stdout and "pool_opened" in run.stderr  # library logs on stderr
            assert "is still running" in run.stdout and "make local-down" in run.stdout

        # Stop the server exactly as the demo says.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_"))}
        stop = subprocess.run(
            stop_command(second.stdout), cwd=workdir, env=env, capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "stopped the local cluster" in stop.stdout
        assert not LocalCluster(workdir / ".precog").running()


@pytest.mark.slow
class TestLocalUp:
    def test_idempotent_and_respects_hand_written_files(self, workdir: Path) -> None:
        """local_up twice reuses the cluster; a .env file a person wrote is never overwritten."""
        config = workdir / "config"
        config.mkdir()
        (config / ".env.test").write_text("DB_HOST=my-own-server\n")
        cluster, done = local_up(workdir / ".precog", config)
        assert any(line.startswith("started") for line in done)
        assert any("kept" in line and ".env.test" in line for line in done)
        assert (config / ".env.test").read_text() == "DB_HOST=my-own-server\n"
        again_cluster, again = local_up(workdir / ".precog", config)
        assert again_cluster.port == cluster.port
        assert any(line.startswith("reused running") for line in again)
        assert "kept database precog_dev" in again and f"unchanged {config / '.env.dev'}" in again

    def test_stop_and_start_keep_data(self, workdir: Path) -> None:
        """Stopping and starting the cluster keeps databases and rows."""
        cluster, _ = local_up(workdir / ".precog", workdir / "config")
        import psycopg

        with psycopg.connect(cluster.conninfo("precog_dev"), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
        cluster.stop()
        assert not cluster.running()
        reopened = LocalCluster(workdir / ".precog")
        reopened.start()
        with psycopg.connect(reopened.conninfo("precog_dev"), autocommit=True) as conn:
            assert conn.execute("SELECT x FROM kept").fetchone() == (42,)


class TestLocalUrlRefusal:
    def test_env_option_is_named_when_it_chose_the_environment(self, tmp_path: Path) -> None:
        """`--env staging local url` is told to use --env, not to set PRECOG_ENV."""
        refused = console_script(["--env", "staging", "local", "url"], cwd=tmp_path)
        assert refused.code == 1
        assert "the environment is staging (--env); use --env dev or --env test" in refused.err
        assert "PRECOG_ENV" not in refused.err

    def test_precog_env_is_named_when_it_chose_the_environment(self, tmp_path: Path) -> None:
        """With PRECOG_ENV=staging the refusal names PRECOG_ENV and both fixes."""
        refused = console_script(["local", "url"], cwd=tmp_path, env={"PRECOG_ENV": "staging"})
        assert refused.code == 1
        assert "the environment is staging (PRECOG_ENV)" in refused.err
        assert "or set PRECOG_ENV to dev or test" in refused.err


def make_sandbox(tmp_path: Path) -> Path:
    """A directory with the real Makefile and a .venv/bin whose precog-db is this installation's, "installed"."""
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    (tmp_path / "pyproject.toml").write_text("")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("precog-db", "python"):
        (bin_dir / tool).symlink_to(Path(sys.executable).with_name(tool))
    (bin_dir / ".installed").write_text("")
    return tmp_path


def make(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_", "MAKE"))}
    return subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/bin/.installed", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class TestMakefileOptions:
    @pytest.mark.parametrize(
        ("args", "command"),
        [
            (["migrate", "ENV=staging", "ARGS=--yes"], ".venv/bin/precog-db --env staging migrate up --yes"),
            (
                ["migrate", "ENV=prod", "CONFIRM=precog_prod"],
                ".venv/bin/precog-db --env prod migrate up --confirm-database precog_prod",
            ),
            (["backup", "ARGS=--keep 3 --yes"], ".venv/bin/precog-db --env dev backup --keep 3 --yes"),
            (["check"], ".venv/bin/precog-db --env dev check"),
        ],
    )
    def test_args_and_confirm_reach_precog_db(self, tmp_path: Path, args: list[str], command: str) -> None:
        """ARGS and CONFIRM are appended to the database targets' precog-db command line (and nothing when unset)."""
        dry = make(make_sandbox(tmp_path), "-n", *args)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines() == [command]

    def test_args_are_parsed_by_the_real_command(self, tmp_path: Path) -> None:
        """`make local-down ARGS=--json` runs precog-db with --json after the command, which it accepts."""
        result = make(make_sandbox(tmp_path), "local-down", "ARGS=--json")
        assert result.returncode == 0, result.stderr
        body = result.stdout.split("local down --json\n", 1)[1]
        assert json.loads(body)["message"].startswith("no local cluster under .precog")

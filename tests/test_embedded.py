"""The server lookup and the embedded PostgreSQL fallback (the `local` extra), run as a newcomer would.

The slow tests hide the machine's PostgreSQL from the lookup the way a user can:
``PRECOG_PG_SEARCH=embedded`` plus a ``PATH`` without server binaries, in a
subprocess. The server they get must then be the embedded PostgreSQL 16.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from precog_db.errors import ConfigurationError, EmbeddedPostgresError, LocalClusterError
from precog_db.local import binaries, embedded
from precog_db.local import cluster as local_cluster
from precog_db.local.binaries import find_server_binaries
from precog_db.local.cluster import LocalCluster, local_up
from tests._helpers.server import REPO

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")


def installed_package() -> Path:
    """The pgserver package of the dev extra; the tests need it."""
    package = embedded.embedded_package_dir()
    assert package is not None, "pgserver is missing: install the dev extra (pip install -e '.[dev]')"
    return package


def hidden_env(**extra: str) -> dict[str, str]:
    """The environment of a machine whose PostgreSQL the lookup cannot see; no DB_*/PRECOG_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_"))}
    path = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(d for d in path if d and not any((Path(d) / b).exists() for b in SERVER_BINARIES))
    env["PRECOG_PG_SEARCH"] = "embedded"
    env.update(extra)
    return env


def run_python(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet with the project's interpreter; fail the test with its output if it fails."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def server_version(cluster: LocalCluster, dbname: str = "postgres") -> int:
    """The running server's major version, asked over a connection."""
    with psycopg.connect(cluster.conninfo(dbname), autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A project directory whose `.precog/` cluster is destroyed afterwards."""
    yield tmp_path
    LocalCluster(tmp_path / ".precog").destroy()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own temporary directories are private)."""
    path = Path(tempfile.mkdtemp(prefix="precog-test-open-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def package_copy() -> Iterator[Path]:
    """A copy of the installed pgserver package (and its libraries) that everyone may read, as in site-packages."""
    package = installed_package()
    site = Path(tempfile.mkdtemp(prefix="precog-test-site-"))  # pytest's own temporary directories are private
    site.chmod(0o755)
    shutil.copytree(package / "pginstall", site / package.name / "pginstall", symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    for dirpath, _dirs, files in os.walk(site):
        os.chmod(dirpath, 0o755)
        for name in files:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644)
    yield site / package.name
    shutil.rmtree(site)


class TestLookup:
    """find_server_binaries: PRECOG_PG_BINDIR, then installed binaries, then the embedded server."""

    def test_embedded_when_nothing_is_installed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With no PostgreSQL on the machine the default lookup falls back to the embedded server."""
        monkeypatch.setattr(binaries, "system_bindirs", list)
        found = find_server_binaries()
        assert found.kind == "embedded"
        assert (found.bindir / "initdb").is_file()
        assert "embedded" in found.describe() and "PostgreSQL 16" in found.describe()

    def test_installed_binaries_win_over_embedded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Binaries installed on the machine are preferred to the embedded ones."""
        installed = installed_package() / "pginstall" / "bin"  # stands in for a system installation
        monkeypatch.setattr(binaries, "system_bindirs", lambda: [(installed, "standard location")])
        found = find_server_binaries()
        assert (found.kind, found.bindir, found.found_by) == ("system", installed, "standard location")
        assert "installed on this machine" in found.describe()

    def test_search_embedded_skips_installed_binaries(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """PRECOG_PG_SEARCH=embedded ignores binaries installed on the machine."""
        installed = installed_package() / "pginstall" / "bin"
        monkeypatch.setattr(binaries, "system_bindirs", lambda: [(installed, "standard location")])
        monkeypatch.setenv("PRECOG_PG_SEARCH", "embedded")
        assert find_server_binaries().kind == "embedded"

    def test_search_system_refuses_embedded_with_three_fixes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """PRECOG_PG_SEARCH=system never uses the embedded server; the error names the three fixes."""
        monkeypatch.setattr(binaries, "system_bindirs", list)
        monkeypatch.setenv("PRECOG_PG_SEARCH", "system")
        with pytest.raises(LocalClusterError) as info:
            find_server_binaries()
        message = str(info.value)
        assert "PRECOG_PG_SEARCH=system" in message
        assert "install PostgreSQL" in message
        assert "pip install 'precog-db[local]'" in message
        assert "PRECOG_TEST_DSN" in message and "config/.env.dev" in message

    def test_nothing_available_names_three_fixes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without installed binaries and without the extra, one message names the three ways out."""
        monkeypatch.setattr(binaries, "system_bindirs", list)
        monkeypatch.setattr(embedded, "embedded_package_dir", lambda: None)
        with pytest.raises(LocalClusterError) as info:
            find_server_binaries()
        message = str(info.value)
        assert "the embedded server (not installed)" in message
        assert "(1) install PostgreSQL" in message
        assert "(2) install the embedded PostgreSQL with `pip install 'precog-db[local]'`" in message
        assert "(3) point PRECOG_TEST_DSN" in message

    def test_bad_bindir_setting_is_refused(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """A PRECOG_PG_BINDIR without server binaries is an error, not a silent fallback."""
        monkeypatch.setenv("PRECOG_PG_BINDIR", str(tmp_path))
        with pytest.raises(LocalClusterError, match=r"PRECOG_PG_BINDIR=.* does not hold initdb"):
            find_server_binaries()

    def test_bindir_setting_comes_first(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """PRECOG_PG_BINDIR is used even when the search mode would exclude it."""
        bindir = installed_package() / "pginstall" / "bin"
        monkeypatch.setenv("PRECOG_PG_BINDIR", str(bindir))
        monkeypatch.setenv("PRECOG_PG_SEARCH", "system")
        found = find_server_binaries()
        assert (found.kind, found.bindir) == ("configured", bindir)
        assert "set by PRECOG_PG_BINDIR" in found.describe()

    def test_unknown_search_mode_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An unknown PRECOG_PG_SEARCH value is a ConfigurationError listing the valid ones."""
        monkeypatch.setenv("PRECOG_PG_SEARCH", "docker")
        with pytest.raises(ConfigurationError, match="auto, system, embedded"):
            find_server_binaries()

    def test_existing_data_needs_its_major_version(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Binaries of another major version than the data directory's are never picked."""
        monkeypatch.setattr(binaries, "system_bindirs", list)
        assert find_server_binaries(major=16).kind == "embedded"
        with pytest.raises(LocalClusterError, match="no PostgreSQL 15 server binaries"):
            find_server_binaries(major=15)


class TestEmbeddedPackage:
    """embedded_bindir: the bundled binaries, copied where the server user can run them."""

    def test_missing_package_means_none(self, tmp_path: Path) -> None:
        """A package directory without bundled binaries yields None, not an error."""
        assert embedded.embedded_bindir(shared=True, package_dir=tmp_path / "pgserver") is None

    def test_open_installation_is_used_in_place(self, package_copy: Path, tmp_path: Path) -> None:
        """An installation everyone can read is used where it is, without a copy."""
        cache = tmp_path / "cache"
        assert embedded.embedded_bindir(shared=True, package_dir=package_copy, cache_parent=cache) == (
            package_copy / "pginstall" / "bin"
        )
        assert not cache.exists()

    def test_private_installation_is_copied_for_the_server_user(
        self, package_copy: Path, tmp_path: Path, open_dir: Path
    ) -> None:
        """Binaries inside a private directory (a venv under /root) are copied to an open cache that works."""
        private = tmp_path / "home"
        shutil.copytree(package_copy.parent, private / "site", symlinks=True)
        private.chmod(0o700)
        cache = open_dir / "cache"
        bindir = embedded.embedded_bindir(shared=True, package_dir=private / "site" / "pgserver", cache_parent=cache)
        assert bindir is not None and bindir.is_relative_to(cache)
        assert (bindir / "initdb").stat().st_mode & 0o755 == 0o755
        for dirpath, _dirs, files in os.walk(bindir.parent.parent.parent):
            assert os.stat(dirpath).st_mode & 0o777 == 0o755, dirpath
            for name in files:
                assert os.lstat(Path(dirpath) / name).st_mode & 0o022 == 0, name
        version = subprocess.run(
            [str(bindir / "initdb"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
            user="postgres" if IS_ROOT else None,
        )
        assert "16." in version.stdout
        # The second call reuses the copy.
        again = embedded.embedded_bindir(shared=True, package_dir=private / "site" / "pgserver", cache_parent=cache)
        assert again == bindir
        assert len(list(cache.iterdir())) == 1

    def test_cache_writable_by_others_is_refused(self, package_copy: Path, tmp_path: Path, open_dir: Path) -> None:
        """A cache directory others could have written is never used to run binaries."""
        private = tmp_path / "home"
        shutil.copytree(package_copy.parent, private / "site", symlinks=True)
        private.chmod(0o700)
        cache = open_dir / "cache"
        bindir = embedded.embedded_bindir(shared=True, package_dir=private / "site" / "pgserver", cache_parent=cache)
        assert bindir is not None
        (target,) = cache.iterdir()
        target.chmod(0o777)
        with pytest.raises(EmbeddedPostgresError, match="remove it"):
            embedded.embedded_bindir(shared=True, package_dir=private / "site" / "pgserver", cache_parent=cache)


@pytest.mark.slow
class TestEmbeddedServer:
    """local up, the demo and the test harness on a machine whose PostgreSQL the lookup cannot see."""

    def test_local_up_starts_embedded_and_down_up_keeps_data(self, workdir: Path) -> None:
        """local_up starts the embedded server and says so; after local down, local up finds the same data."""
        first = run_python(
            """
            from pathlib import Path
            import psycopg
            from precog_db.local.cluster import local_up
            cluster, done = local_up(Path(".precog"), Path("config"))
            print("\\n".join(done))
            with psycopg.connect(cluster.conninfo("precog_dev"), autocommit=True) as conn:
                conn.execute("CREATE TABLE kept (note text)")
                conn.execute("INSERT INTO kept VALUES ('survives down/up')")
            cluster.stop()  # what `precog-db local down` does
            print("running after down:", cluster.running())
            """,
            workdir,
            hidden_env(),
        )
        assert "started local PostgreSQL" in first.stdout
        assert "embedded: the pgserver" in first.stdout and "precog-db[local]" in first.stdout
        assert "running after down: False" in first.stdout
        assert "DB_NAME=precog_dev" in (workdir / "config" / ".env.dev").read_text()

        second = run_python(
            """
            from pathlib import Path
            from precog_db.local.cluster import local_up
            cluster, done = local_up(Path(".precog"), Path("config"))
            print("\\n".join(done))
            """,
            workdir,
            hidden_env(),
        )
        assert "started local PostgreSQL" in second.stdout and "kept database precog_dev" in second.stdout
        assert "recovered" not in second.stdout  # the stop was clean
        cluster = LocalCluster(workdir / ".precog")
        assert cluster.kind == "embedded"
        assert server_version(cluster) == 16
        with psycopg.connect(cluster.conninfo("precog_dev"), autocommit=True) as conn:
            assert conn.execute("SELECT note FROM kept").fetchall() == [("survives down/up",)]

    def test_cli_local_up_down_up_on_embedded_server(self, workdir: Path) -> None:
        """`precog-db local up` says it started the embedded server; `local down` then `local up` keep the data."""

        def cli(*args: str) -> str:
            result = subprocess.run(
                [str(Path(sys.executable).parent / "precog-db"), "local", *args],
                cwd=workdir,
                env=hidden_env(),
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            return result.stdout

        up = cli("up")
        assert "started local PostgreSQL" in up and "embedded: the pgserver" in up
        cluster = LocalCluster(workdir / ".precog")
        with psycopg.connect(cluster.conninfo("precog_test"), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        assert "stopped the local cluster" in cli("down")
        assert not cluster.running()
        again = cli("up")
        assert "started local PostgreSQL" in again and "embedded: the pgserver" in again
        assert "kept database precog_test" in again
        with psycopg.connect(cluster.conninfo("precog_test"), autocommit=True) as conn:
            assert conn.execute("SELECT n FROM kept").fetchall() == [(42,)]
        assert server_version(cluster) == 16

    def test_demo_runs_on_embedded_server(self, workdir: Path) -> None:
        """The README's demo starts the embedded server, says so, and runs the service through get_cursor."""
        result = subprocess.run(
            [sys.executable, str(REPO / "examples" / "demo.py")],
            cwd=workdir,
            env=hidden_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "using the local cluster" in result.stdout
        assert "embedded: the pgserver" in result.stdout
        assert "recorded fill #5" in result.stdout
        cluster = LocalCluster(workdir / ".precog")
        assert cluster.kind == "embedded" and server_version(cluster, "precog_dev") == 16
        with psycopg.connect(cluster.conninfo("precog_dev"), autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM fills").fetchone()
        assert row is not None and row[0] == 5

    def test_harness_runs_on_embedded_server(self, tmp_path: Path) -> None:
        """A pytest session of this suite, with no server configured, runs on the embedded server and says so."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/test_cursor_common.py",
                "-p",
                "no:cacheprovider",
                f"--basetemp={tmp_path / 'inner'}",
            ],
            cwd=REPO,
            env=hidden_env(),
            capture_output=True,
            text=True,
            timeout=280,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        header = [line for line in result.stdout.splitlines() if line.startswith("precog_db test server:")]
        assert len(header) == 2, result.stdout  # the report header, then the final summary
        assert "throwaway clusters from PostgreSQL binaries in" in header[0] and "embedded" in header[0]
        assert "a throwaway cluster on 127.0.0.1:" in header[1] and "PostgreSQL 16" in header[1]
        assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.slow
@pytest.mark.fault
class TestStaleServer:
    """A crashed server or a stale postmaster.pid is detected, recovered and reported."""

    def test_killed_server_is_recovered_and_reported(self, workdir: Path) -> None:
        """After kill -9 of the postmaster, local_up restarts it, says it recovered, and keeps the data."""
        cluster, _ = local_up(workdir / ".precog", workdir / "config", envs=("dev",))
        with psycopg.connect(cluster.conninfo("precog_dev"), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (1)")
        pid = cluster._postmaster_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while local_cluster._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (cluster.data_dir / "postmaster.pid").exists()  # the crash left it behind
        assert not cluster.running()

        again, done = local_up(workdir / ".precog", workdir / "config", envs=("dev",))
        assert any(line.startswith("started") for line in done), done
        assert any("recovered from an unclean stop" in line and str(pid) in line for line in done), done
        with psycopg.connect(again.conninfo("precog_dev"), autocommit=True) as conn:
            assert conn.execute("SELECT n FROM kept").fetchall() == [(1,)]

    def test_pid_file_naming_another_program_is_cleared(self, workdir: Path) -> None:
        """A postmaster.pid whose pid now belongs to another program neither counts as running nor blocks a start."""
        cluster, _ = local_up(workdir / ".precog", workdir / "config", envs=("dev",))
        cluster.stop()
        # A live process of the server's user, as after a reboot that reused the pid.
        other = subprocess.Popen(["sleep", "120"], user="postgres" if IS_ROOT else None)
        try:
            (cluster.data_dir / "postmaster.pid").write_text(f"{other.pid}\n{cluster.data_dir}\n")
            assert not cluster.running()
            again, done = local_up(workdir / ".precog", workdir / "config", envs=("dev",))
            assert any(line.startswith("started") for line in done), done
            assert any("now belongs to another program" in line for line in done), done
            assert again.running()
            assert again._postmaster_pid() != other.pid
            with psycopg.connect(again.conninfo("precog_dev"), autocommit=True, connect_timeout=10) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            other.kill()
            other.wait()

    def test_leftover_server_process_is_named(self, workdir: Path) -> None:
        """A process still running in the data directory of a dead server is named with the kill that stops it."""
        cluster, _ = local_up(workdir / ".precog", workdir / "config", envs=("dev",))
        cluster.stop()
        pid_file = cluster.data_dir / "postmaster.pid"
        gone = subprocess.Popen(["true"])
        gone.wait()
        pid_file.write_text(f"{gone.pid}\n{cluster.data_dir}\n")
        leftover = subprocess.Popen(["sleep", "120"], cwd=cluster.data_dir, user="postgres" if IS_ROOT else None)
        try:
            with pytest.raises(LocalClusterError, match=f"processes {leftover.pid} still run.*kill {leftover.pid}"):
                cluster._clear_stale_pid(leftovers_wait=0.5)
            assert pid_file.exists()
        finally:
            leftover.kill()
            leftover.wait()
        assert cluster._clear_stale_pid(leftovers_wait=0.5) is not None

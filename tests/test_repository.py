"""The files a newcomer relies on: compose file, templates, ignore rules, public API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

import precog_db
from tests._helpers.server import REPO


class TestDockerCompose:
    def compose(self) -> dict[str, object]:
        data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
        assert isinstance(data, dict)
        return data

    def test_postgres_service_with_healthcheck(self) -> None:
        """The compose file has a postgres service whose health check uses pg_isready."""
        service = self.compose()["services"]["postgres"]  # type: ignore[index]
        assert str(service["image"]).startswith("postgres:")
        assert "pg_isready" in " ".join(service["healthcheck"]["test"])

    def test_named_volume_is_declared_and_used(self) -> None:
        """Data lives in a named volume declared at the top level."""
        data = self.compose()
        mounts = data["services"]["postgres"]["volumes"]  # type: ignore[index]
        named = [m.split(":")[0] for m in mounts if not m.startswith(".")]
        assert named and all(n in data["volumes"] for n in named)  # type: ignore[operator]

    def test_init_script_exists_and_creates_databases(self) -> None:
        """The mounted init directory exists and creates precog_dev and precog_test with their roles."""
        mounts = self.compose()["services"]["postgres"]["volumes"]  # type: ignore[index]
        init = [m for m in mounts if "docker-entrypoint-initdb.d" in m]
        assert init
        host_dir = REPO / init[0].split(":")[0]
        scripts = sorted(host_dir.glob("*.sql"))
        assert scripts
        sql = "\n".join(s.read_text() for s in scripts)
        for name in ("precog_dev", "precog_test"):
            assert f"CREATE DATABASE {name} OWNER {name}" in sql
            assert f"CREATE ROLE {name}" in sql


class TestTemplates:
    def test_templates_for_dev_test_staging_but_not_prod(self) -> None:
        """Templates exist for dev, test and staging; there is never a prod file."""
        assert (REPO / ".env.template").is_file()
        for env in ("dev", "test", "staging"):
            assert (REPO / "config" / f".env.{env}.template").is_file()
        assert not list(REPO.glob("**/.env.prod*"))

    def test_real_env_files_are_ignored(self) -> None:
        """git ignores real .env files and keeps templates."""
        ignored = [
            "config/.env",
            "config/.env.dev",
            "config/.env.prod",
            ".env",
            ".env.local",
            ".precog/x",
            "logs/a.log",
        ]
        kept = ["config/.env.dev.template", ".env.template"]
        result = subprocess.run(
            ["git", "check-ignore", "--no-index", *ignored, *kept], cwd=REPO, capture_output=True, text=True
        )
        assert set(result.stdout.split()) == set(ignored)


class TestPublicApi:
    def test_all_is_sorted_and_importable(self) -> None:
        """Every name in __all__ exists and the list is sorted."""
        assert precog_db.__all__ == sorted(precog_db.__all__)
        for name in precog_db.__all__:
            assert hasattr(precog_db, name), name

    def test_issue_names_are_exported(self) -> None:
        """The names services rely on are importable from precog_db."""
        for name in (
            "Environment",
            "get_environment",
            "require_environment",
            "load_settings",
            "DatabaseSettings",
            "initialize_pool",
            "get_pool",
            "close_pool",
            "get_connection",
            "get_cursor",
            "dangerous_operation",
            "truncate_tables",
            "delete_all",
            "configure_logging",
            "ConfigurationError",
            "EnvironmentNotAllowedError",
            "EnvironmentMismatchError",
            "ProductionAccessError",
        ):
            assert name in precog_db.__all__

    def test_import_and_cli_env_do_not_import_the_driver(self, tmp_path: Path) -> None:
        """`import precog_db`, `import precog_db.cli`, `precog-db env` and `--help` never import psycopg."""
        probe = (
            "import sys, contextlib, io\n"
            "import precog_db, precog_db.cli\n"
            "assert 'psycopg' not in sys.modules, 'import'\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert precog_db.cli.main(['env']) == 0\n"
            "    assert precog_db.cli.main(['--help']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('psycopg', 'psycopg_pool')))\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_"))}
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"

    def test_version_is_the_installed_distribution_version(self) -> None:
        """`precog_db.__version__` is the one source of the version the installed distribution reports."""
        from importlib.metadata import version

        assert precog_db.__version__ == version("precog-db")

    def test_ships_py_typed(self) -> None:
        """The package is marked as typed."""
        assert (Path(precog_db.__file__).parent / "py.typed").is_file()

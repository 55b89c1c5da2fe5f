"""The files a newcomer relies on: compose file, templates, ignore rules, public API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

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


def pyproject() -> dict[str, object]:
    """The parsed pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def runtime_floors() -> dict[str, Version]:
    """The lower bound (``>=``) of every runtime dependency in pyproject.toml, by canonical name."""
    project = pyproject()["project"]
    assert isinstance(project, dict)
    floors: dict[str, Version] = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        lower = [Version(spec.version) for spec in req.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{line!r}: every runtime dependency needs exactly one >= floor"
        name = canonicalize_name(req.name)
        assert name not in floors or floors[name] == lower[0], f"two different floors for {name}"
        floors[name] = lower[0]
    return floors


def lowest_pins() -> dict[str, Version]:
    """The exact versions `make test-lowest` installs (.ci/lowest-versions.txt), by canonical name."""
    pins: dict[str, Version] = {}
    for raw in (REPO / ".ci" / "lowest-versions.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{line!r}: pin one exact version with =="
        pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins


class TestDependencyRanges:
    """The declared range of each runtime dependency is the one CI tests at both ends."""

    def test_lowest_job_pins_exactly_the_declared_floors(self) -> None:
        """Every runtime dependency's floor in pyproject.toml is the version the lowest-version CI job installs."""
        floors, pins = runtime_floors(), lowest_pins()
        assert set(floors) == {"pglast", "psycopg", "psycopg-pool", "python-dotenv", "structlog"}
        assert pins == floors, (
            f"pyproject.toml floors {dict(sorted(floors.items()))} differ from .ci/lowest-versions.txt "
            f"{dict(sorted(pins.items()))}: change both together, then run `make test-lowest`"
        )

    def test_lowest_job_installs_the_binary_psycopg(self) -> None:
        """The lowest-version job installs psycopg with the [binary] extra the runtime dependency asks for."""
        text = (REPO / ".ci" / "lowest-versions.txt").read_text()
        assert re.search(r"^psycopg\[binary\]==", text, re.MULTILINE)

    def test_psycopg_pool_floor_has_the_internals_pool_py_reads(self) -> None:
        """psycopg-pool 3.2 lacks the connection attribute _created_at that PrecogPool.checkin reads: never allowed."""
        project = pyproject()["project"]
        assert isinstance(project, dict)
        spec = next(Requirement(d).specifier for d in project["dependencies"] if d.startswith("psycopg-pool"))
        assert isinstance(spec, SpecifierSet)
        assert not spec.contains("3.2.8") and spec.contains("3.3.0")

    def test_ci_runs_the_suite_on_newest_and_lowest(self) -> None:
        """.ci/run runs the suite on the newest versions (make test) and on the declared floors (make test-lowest)."""
        commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
        assert "make test" in commands and "make test-lowest" in commands
        makefile = (REPO / "Makefile").read_text()
        assert "-r .ci/lowest-versions.txt" in makefile


class TestPackaging:
    def test_license_is_an_spdx_expression(self) -> None:
        """project.license is an SPDX string (the TOML-table form makes setuptools warn on every install)."""
        project = pyproject()["project"]
        assert isinstance(project, dict)
        assert project["license"] == "LicenseRef-Proprietary"

    def test_build_backend_understands_spdx_licenses(self) -> None:
        """The build requires a setuptools that reads SPDX license expressions (77+; 76 rejects the string)."""
        build = pyproject()["build-system"]
        assert isinstance(build, dict)
        setuptools = [Requirement(r) for r in build["requires"] if Requirement(r).name == "setuptools"]
        assert len(setuptools) == 1 and not setuptools[0].specifier.contains("76.1.0")
        assert setuptools[0].specifier.contains("77.0.1")

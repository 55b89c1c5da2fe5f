"""``DATABASE_URL``: a PostgreSQL URL as a source of settings, its precedence, and the checks it gets."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from precog_db.connection import connect
from precog_db.environment import Environment
from precog_db.errors import ConfigurationError, EnvironmentMismatchError, ProductionAccessError
from precog_db.settings import environment_resolution, load_settings
from tests._helpers.cli import Workspace, workspace
from tests._helpers.server import Server

SECRET = "url-Pa55w0rd-q7x"


def url(server: Server, dbname: str, *, password: str = SECRET, query: str = "") -> str:
    return f"postgresql://{server.user}:{password}@{server.host}:{server.port}/{dbname}{query}"


def write_env(path: Path, text: str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


class TestPrecedence:
    def test_process_url_fills_the_connection_fields(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A process DATABASE_URL sets host, port, dbname, user, password and sslmode, each with its origin."""
        monkeypatch.setenv("DATABASE_URL", f"postgres://svc:{SECRET}@db.internal:6543/precog_test?sslmode=require")
        settings = load_settings()
        assert (settings.env, settings.host, settings.port, settings.dbname, settings.user, settings.sslmode) == (
            Environment.TEST,
            "db.internal",
            6543,
            "precog_test",
            "svc",
            "require",
        )
        assert settings.password == SECRET
        assert settings.origins["host"] == "DATABASE_URL in the process environment"
        assert SECRET not in repr(settings) + str(settings) + repr(settings.password)

    def test_db_variables_of_the_same_source_override_the_url(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """DB_NAME next to DATABASE_URL wins over the URL's database name, and also drives the inference."""
        monkeypatch.setenv("DATABASE_URL", f"postgresql://svc:{SECRET}@db.internal/precog_staging")
        monkeypatch.setenv("DB_NAME", "precog_test")
        settings = load_settings()
        assert (settings.env, settings.dbname, settings.host) == (Environment.TEST, "precog_test", "db.internal")
        assert settings.origins["dbname"] == "environment"

    def test_file_url_sits_below_the_files_db_variables_and_the_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A URL in config/.env.test fills what its DB_* lines do not; the process environment beats both."""
        write_env(
            Path("config/.env.test"),
            f"DATABASE_URL=postgresql://svc:{SECRET}@file-host:5433/precog_test\nDB_USER=from_file\n",
        )
        monkeypatch.setenv("DB_PORT", "7000")
        settings = load_settings("test")
        assert (settings.host, settings.port, settings.user) == ("file-host", 7000, "from_file")
        assert settings.origins["host"] == f"DATABASE_URL in {Path('config/.env.test')}"
        monkeypatch.setenv("DATABASE_URL", "postgresql://proc-host/precog_test")
        assert load_settings("test").host == "proc-host"

    def test_shared_file_url_names_the_environment(self) -> None:
        """The database name of a DATABASE_URL in config/.env infers the environment, as DB_NAME would."""
        write_env(Path("config/.env"), f"DATABASE_URL=postgresql://svc:{SECRET}@h/precog_staging\n")
        resolution = environment_resolution()
        assert resolution.env is Environment.STAGING
        assert "DATABASE_URL" in resolution.source


class TestRefusals:
    def test_url_naming_another_environment_is_a_mismatch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """PRECOG_ENV=test with a URL whose database names prod is refused, naming DATABASE_URL, no password."""
        monkeypatch.setenv("PRECOG_ENV", "test")
        monkeypatch.setenv("DATABASE_URL", f"postgresql://svc:{SECRET}@h/precog_prod")
        with pytest.raises(EnvironmentMismatchError, match="DATABASE_URL") as info:
            load_settings()
        assert SECRET not in str(info.value)

    @pytest.mark.parametrize(
        ("value", "match"),
        [
            (f"postgresql://svc:{SECRET}@h/precog_test?options=-c%20search_path%3Dx", "sets options"),
            (f"postgresql://svc:{SECRET}@h/precog_test?target_session_attrs=any", "sets target_session_attrs"),
            (f"mysql://svc:{SECRET}@h/precog_test", "is not a PostgreSQL URL"),
            (f"host=h password={SECRET} dbname=precog_test", "is not a PostgreSQL URL"),
            (f"postgresql://svc:{SECRET}@h1,h2/precog_test", "several hosts"),
            (f"postgresql://svc:{SECRET}@h:notaport/precog_test", "DATABASE_URL"),
            (f"postgresql://svc:{SECRET}@h/precog_test?sslmode=sometimes", "DB_SSLMODE in DATABASE_URL"),
        ],
    )
    def test_unusable_urls_are_refused_without_the_password(
        self, monkeypatch: pytest.MonkeyPatch, value: str, match: str
    ) -> None:
        """Unknown parameters, other schemes, several hosts and bad values are refused, naming what is wrong only."""
        monkeypatch.setenv("DATABASE_URL", value)
        with pytest.raises(ConfigurationError, match=match) as info:
            load_settings()
        assert SECRET not in str(info.value)
        assert info.value.__context__ is None or SECRET not in str(info.value.__context__)

    def test_readable_file_holding_a_url_password_is_refused_on_staging(self) -> None:
        """A .env.staging whose DATABASE_URL carries a password must be chmod 600, like DB_PASSWORD."""
        write_env(Path("config/.env.staging"), f"DATABASE_URL=postgresql://svc:{SECRET}@h/precog_staging\n", 0o644)
        with pytest.raises(ConfigurationError, match="chmod 600"):
            load_settings("staging")


class TestRealServer:
    def test_connects_through_the_url(self, pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        """With only DATABASE_URL set, the chokepoint connects to the database it names."""
        name = pg_server.fresh_database(f"url_test_{uuid.uuid4().hex[:6]}")
        try:
            password = pg_server.password or SECRET  # the throwaway cluster trusts local connections
            monkeypatch.setenv("DATABASE_URL", url(pg_server, name, password=password, query="?sslmode=disable"))
            settings = load_settings()
            assert settings.env is Environment.TEST
            conn = connect(settings, operation="test")
            try:
                row = conn.execute("SELECT current_database()").fetchone()
            finally:
                conn.close()
            assert row == (name,)
        finally:
            with pg_server.connect() as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def test_prod_url_meets_the_production_guard(self, pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        """A URL whose database names prod resolves to prod and is refused without PRECOG_PROD_CONFIRMED=yes."""
        name = pg_server.fresh_database(f"url_prod_{uuid.uuid4().hex[:6]}")
        try:
            monkeypatch.setenv("DATABASE_URL", url(pg_server, name, query="?sslmode=disable"))
            settings = load_settings()
            assert settings.env is Environment.PROD
            assert os.environ.get("PRECOG_PROD_CONFIRMED") is None
            with pytest.raises(ProductionAccessError) as info:
                connect(settings, operation="test")
            assert SECRET not in str(info.value)
            with pg_server.connect(name) as conn:
                assert conn.execute("SELECT to_regnamespace('precog_meta') IS NULL").fetchone() == (True,)
        finally:
            with pg_server.connect() as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_precog_db_env_names_the_url_as_the_source_and_masks_its_password(
    pg_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """precog-db env shows DATABASE_URL as the source of each field it set, and never its password."""
    with workspace(pg_server, tmp_path, monkeypatch) as ws:
        assert isinstance(ws, Workspace)
        monkeypatch.setenv("DATABASE_URL", f"postgresql://svc:{SECRET}@db.internal:6543/precog_test")
        result = ws.run("env")
        assert result.code == 0, result.err
        assert "DATABASE_URL in the process environment" in result.out
        assert "db.internal" in result.out and "(DB_*, then DATABASE_URL)" in result.out
        assert SECRET not in result.out + result.err

"""The chokepoint (precog_db.connection): every way in gets every check, on a real server.

Each test is an attack the adversarial pass of issue 10 found (or a variant of
it): a gate bypassed through fork(), settings built by hand or tampered with,
a database name that was inferred as prod but passed as dev, a settings file
that quietly decided the environment, a server that goes silent after the
handshake, and a renamed production database re-stamped without confirmation.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql
from structlog.testing import capture_logs

from precog_db import (
    ConfigurationError,
    ConnectionLostError,
    DatabaseSettings,
    Environment,
    EnvironmentMismatchError,
    EnvironmentNotAllowedError,
    ProductionAccessError,
    UnstampedDatabaseError,
    dangerous_operation,
    initialize_pool,
    load_settings,
    read_stamp,
    stamp_database,
)
from precog_db.pool import create_pool
from tests._helpers.fault_proxy import fault_proxy
from tests._helpers.server import REPO, Server

UNIQUE = uuid.uuid4().hex[:8]


def make_database(pg_server: Server, name: str, *, rows: int = 0) -> str:
    """Create database ``name`` (dropped first) with a table ``accounts`` holding ``rows`` rows."""
    pg_server.fresh_database(name)
    with pg_server.connect(name) as conn:
        conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL)")
        if rows:
            conn.execute("INSERT INTO accounts SELECT g, 100 FROM generate_series(1, %s) g", (rows,))
    return name


def drop_database(pg_server: Server, name: str) -> None:
    with pg_server.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def sessions_on(pg_server: Server, dbname: str) -> int:
    with pg_server.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)
        ).fetchone()
        assert row is not None
        return int(row[0])


def tamper(settings: DatabaseSettings, **fields: Any) -> DatabaseSettings:
    """Change a frozen settings object behind its back (what a careless colleague's code might do)."""
    for name, value in fields.items():
        object.__setattr__(settings, name, value)
    return settings


@pytest.fixture
def prod_named(pg_server: Server) -> Iterator[str]:
    """An unstamped database whose name has the whole word prod: chk_prod_<id>."""
    name = make_database(pg_server, f"chk_prod_{UNIQUE}", rows=3)
    yield name
    drop_database(pg_server, name)


@pytest.fixture
def prod_like(pg_server: Server) -> Iterator[str]:
    """An unstamped database whose name has prod only inside a word (ambiguous): x_precogprod_<id>."""
    name = make_database(pg_server, f"x_precogprod_{UNIQUE}", rows=3)
    yield name
    drop_database(pg_server, name)


def test_fork_child_cannot_truncate_through_the_parents_staging_pool(pg_server: Server, tmp_path: Path) -> None:
    """A child forked from a process with a staging pool is refused by truncate_tables: the table keeps its rows."""
    name = make_database(pg_server, f"chk_staging_{UNIQUE}", rows=5)
    try:
        settings = pg_server.settings(name, env=Environment.STAGING)
        stamp_database(settings=settings)
        fields = {
            k: getattr(settings, k)
            for k in ("host", "port", "dbname", "user", "password", "sslmode", "pool_min", "pool_max")
        }
        fields["password"] = str(fields["password"])
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("DB_", "PRECOG_"))}
        env["PRECOG_ENV"] = "dev"  # the child resolves dev, as in the reported attack
        env["PRECOG_AUDIT_LOG"] = str(tmp_path / "audit.log")
        out = subprocess.run(
            [sys.executable, str(REPO / "tests" / "fork_gate_workload.py"), json.dumps(fields), "accounts"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["child"] == "EnvironmentNotAllowedError", result
        assert "staging" in result["message"]
        assert result["rows_before"] == result["rows_after"] == 5
    finally:
        drop_database(pg_server, name)


def test_gated_call_cannot_open_a_pool_on_a_forbidden_environment(pg_server: Server) -> None:
    """Inside a dev/test gate, opening a staging pool with explicit settings is refused before any connection."""
    name = make_database(pg_server, f"chk_staging2_{UNIQUE}", rows=2)
    try:
        settings = pg_server.settings(name, env=Environment.STAGING)
        stamp_database(settings=settings)

        @dangerous_operation()
        def wipe() -> None:
            initialize_pool(settings=settings)

        with pytest.raises(EnvironmentNotAllowedError, match="about to use a staging database"):
            wipe()
        assert sessions_on(pg_server, name) == 0
    finally:
        drop_database(pg_server, name)


class TestHandBuiltSettings:
    def test_constructed_settings_naming_prod_are_refused(self) -> None:
        """DatabaseSettings(env="dev", dbname="x_prod_y") fails at construction."""
        with pytest.raises(EnvironmentMismatchError, match="belongs to prod"):
            DatabaseSettings(env=Environment.DEV, dbname="x_prod_y")

    def test_replace_to_a_prod_name_is_refused(self, tmp_path: Path) -> None:
        """load_settings("dev").replace(dbname="x_prod_y") fails like load_settings(dbname=...)."""
        with pytest.raises(EnvironmentMismatchError, match="belongs to prod"):
            load_settings("dev", config_dir=tmp_path, environ={}).replace(dbname="x_prod_y")

    @pytest.mark.parametrize(
        "opener",
        [
            pytest.param(lambda s: initialize_pool(settings=s), id="initialize_pool"),
            pytest.param(lambda s: create_pool(s, prod_confirmed=False), id="create_pool"),
            pytest.param(lambda s: stamp_database(settings=s), id="stamp_database"),
            pytest.param(lambda s: read_stamp(s), id="read_stamp"),
        ],
    )
    def test_tampered_settings_never_reach_a_prod_named_database(
        self, pg_server: Server, prod_named: str, opener: Callable[[DatabaseSettings], object]
    ) -> None:
        """Settings changed behind the validation still get the naming rule at the chokepoint: no session opens."""
        settings = tamper(pg_server.settings("scratch_dev", env=Environment.DEV), dbname=prod_named)
        with pytest.raises(EnvironmentMismatchError, match="belongs to prod"):
            opener(settings)
        assert sessions_on(pg_server, prod_named) == 0

    @pytest.mark.parametrize(
        "opener",
        [
            pytest.param(lambda s: initialize_pool(settings=s), id="initialize_pool"),
            pytest.param(lambda s: create_pool(s, prod_confirmed=False), id="create_pool"),
        ],
    )
    def test_tampered_settings_never_open_an_unstamped_ambiguous_database(
        self, pg_server: Server, prod_like: str, opener: Callable[[DatabaseSettings], object]
    ) -> None:
        """x_precogprod behind dev settings is refused by its (missing) stamp; the checking session is closed."""
        settings = tamper(pg_server.settings("scratch_dev", env=Environment.DEV), dbname=prod_like)
        with pytest.raises(UnstampedDatabaseError, match="inside a word"):
            opener(settings)
        assert sessions_on(pg_server, prod_like) == 0

    def test_defaults_come_from_one_table(self, tmp_path: Path) -> None:
        """A hand-built DatabaseSettings(env=X) has exactly load_settings(X)'s defaults, for every environment."""
        for env in Environment:
            loaded = load_settings(env, config_dir=tmp_path, environ={})
            built = DatabaseSettings(env=env)
            for f in dataclasses.fields(DatabaseSettings):
                if f.name not in ("files", "origins"):
                    assert getattr(built, f.name) == getattr(loaded, f.name), (env, f.name)
        prod = DatabaseSettings(env=Environment.PROD)
        assert (prod.sslmode, prod.pool_min, prod.pool_max) == ("require", 10, 50)

    def test_changing_the_environment_takes_its_defaults(self, tmp_path: Path) -> None:
        """replace(env="prod") on dev settings gives prod's defaults for the fields that held dev's."""
        prod = load_settings("dev", config_dir=tmp_path, environ={}).replace(env="prod")
        assert (prod.dbname, prod.sslmode, prod.pool_min, prod.pool_max) == ("precog_prod", "require", 10, 50)


class TestOneNamingRule:
    def test_inferred_prod_name_needs_confirmation(self, pg_server: Server, prod_like: str) -> None:
        """DB_NAME=x_precogprod… with no PRECOG_ENV is production: refused without confirmation, no session."""
        environ = {**pg_server.env_vars(prod_like), "DB_SSLMODE": "disable"}
        settings = load_settings(environ=environ)
        assert settings.env is Environment.PROD
        with pytest.raises(ProductionAccessError):
            create_pool(settings, prod_confirmed=False)
        assert sessions_on(pg_server, prod_like) == 0

    def test_ambiguous_prod_name_under_dev_is_decided_by_its_stamp(
        self, pg_server: Server, prod_like: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """PRECOG_ENV=dev, DB_NAME=x_precogprod…: unstamped refused with the fix; stamped prod refused."""
        environ = {**pg_server.env_vars(prod_like), "PRECOG_ENV": "dev", "DB_SSLMODE": "disable"}
        settings = load_settings(environ=environ)
        assert settings.env is Environment.DEV
        with pytest.raises(UnstampedDatabaseError, match=r"precog-db --env dev stamp"):
            create_pool(settings, prod_confirmed=False)
        assert sessions_on(pg_server, prod_like) == 0
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        stamp_database(settings=settings.replace(env="prod", sslmode="disable"))
        monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
        with pytest.raises(EnvironmentMismatchError, match="refusing to open a prod database as dev"):
            create_pool(settings, prod_confirmed=False)
        assert sessions_on(pg_server, prod_like) == 0

    @pytest.mark.parametrize("word", ["products", "reproduction", "productivity", "stagger", "backstage"])
    def test_ambiguous_dev_name_opens_once_stamped_dev(self, pg_server: Server, word: str) -> None:
        """The false positives of the old rule: usable in dev once stamped dev (refused before, with the fix)."""
        name = make_database(pg_server, f"{word}_{UNIQUE}", rows=1)
        try:
            settings = pg_server.settings(name, env=Environment.DEV)
            with pytest.raises(UnstampedDatabaseError, match="stamp it once"):
                create_pool(settings, prod_confirmed=False)
            stamp_database(settings=settings)
            pool = create_pool(settings, prod_confirmed=False)
            try:
                with pool.connection() as conn:
                    assert conn.execute("SELECT count(*) FROM accounts").fetchone() is not None
            finally:
                pool.close()
        finally:
            drop_database(pg_server, name)


class TestSettingsFiles:
    def test_precog_env_in_shared_file_counts(self, tmp_path: Path) -> None:
        """PRECOG_ENV=staging in config/.env selects staging (and its own file) and says so."""
        (tmp_path / ".env").write_text("PRECOG_ENV=staging\n")
        (tmp_path / ".env.staging").write_text("DB_HOST=staging.internal\n")
        settings = load_settings(config_dir=tmp_path, environ={})
        assert (settings.env, settings.host) == (Environment.STAGING, "staging.internal")
        assert settings.origins["env"] == f"PRECOG_ENV in {tmp_path / '.env'}"

    def test_db_name_in_shared_file_is_inferred(self, tmp_path: Path) -> None:
        """DB_NAME=x_precogprod in config/.env makes the environment prod (it used to resolve dev silently)."""
        (tmp_path / ".env").write_text("DB_NAME=x_precogprod\n")
        assert load_settings(config_dir=tmp_path, environ={}).env is Environment.PROD

    def test_own_file_cannot_change_the_environment(self, tmp_path: Path) -> None:
        """PRECOG_ENV=prod inside .env.dev is an error naming the file, not silently dropped."""
        (tmp_path / ".env.dev").write_text("PRECOG_ENV=prod\n")
        with pytest.raises(ConfigurationError, match=r"\.env\.dev sets PRECOG_ENV"):
            load_settings("dev", config_dir=tmp_path, environ={})

    def test_confirmation_in_a_file_is_reported_as_ignored(self, tmp_path: Path) -> None:
        """PRECOG_PROD_CONFIRMED=yes in a file is reported as deliberately ignored, and does not confirm."""
        (tmp_path / ".env").write_text("PRECOG_PROD_CONFIRMED=yes\n")
        with capture_logs() as logs:
            settings = load_settings("prod", config_dir=tmp_path, environ={})
        ignored = [e for e in logs if e["event"] == "prod_confirmation_in_file_ignored"]
        assert len(ignored) == 1 and "never read from a .env file" in ignored[0]["reason"]
        with pytest.raises(ProductionAccessError):
            create_pool(settings, prod_confirmed=False)


class TestBoundedWaits:
    """A server that goes silent after the handshake: every wait is bounded by the reply timeout."""

    @pytest.fixture
    def stalled(self, pg_server: Server, test_db: str) -> Iterator[DatabaseSettings]:
        with fault_proxy(pg_server.host, pg_server.port) as proxy:
            proxy.stall_after_handshake()
            yield pg_server.settings(
                test_db, host="127.0.0.1", port=proxy.port, statement_timeout_ms=300, tcp_user_timeout_ms=700
            )

    @staticmethod
    def bounded(call: Callable[[], object], limit: float = 30.0) -> BaseException | None:
        """Run ``call`` in a thread; fail if it is still waiting after ``limit`` s, else return what it raised."""
        caught: list[BaseException] = []

        def run() -> None:
            try:
                call()
            except BaseException as exc:
                caught.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(limit)
        assert not thread.is_alive(), f"still waiting after {limit}s: the wait is not bounded"
        return caught[0] if caught else None

    def test_pool_open_is_bounded(self, stalled: DatabaseSettings) -> None:
        """initialize_pool's probe (the stamp check) fails with ConnectionLostError instead of hanging."""
        error = self.bounded(lambda: initialize_pool(settings=stalled))
        assert isinstance(error, ConnectionLostError), error

    def test_read_stamp_is_bounded(self, stalled: DatabaseSettings) -> None:
        """read_stamp on a stalled server fails with ConnectionLostError instead of hanging."""
        error = self.bounded(lambda: read_stamp(stalled))
        assert isinstance(error, ConnectionLostError), error

    @pytest.mark.parametrize("command", [["check"], ["migrate", "status"], ["backup"]])
    def test_cli_commands_are_bounded(self, stalled: DatabaseSettings, tmp_path: Path, command: list[str]) -> None:
        """precog-db check / migrate status / backup end with an error on a stalled server, never hang."""
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("DB_", "PRECOG_"))}
        env.update(
            DB_HOST=stalled.host,
            DB_PORT=str(stalled.port),
            DB_NAME=stalled.dbname,
            DB_USER=stalled.user,
            DB_SSLMODE="disable",
            DB_STATEMENT_TIMEOUT="300",
            DB_TCP_USER_TIMEOUT="700",
            PRECOG_ENV="test",
            PRECOG_AUDIT_LOG=str(tmp_path / "audit.jsonl"),
        )
        (tmp_path / "migrations").mkdir()
        out = subprocess.run(
            [sys.executable, "-m", "precog_db", *command],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
            check=False,
        )
        assert out.returncode != 0
        assert "no reply" in out.stderr, out.stderr[-2000:]


class TestRenamedProduction:
    def test_renamed_prod_database_needs_confirmation_to_restamp(
        self, pg_server: Server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """ALTER DATABASE … RENAME keeps the prod identity: force alone does not re-stamp it as dev."""
        original = make_database(pg_server, f"chk_live_{UNIQUE}", rows=1)
        renamed = f"chk_renamed_{UNIQUE}"
        try:
            monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
            stamp_database(settings=pg_server.settings(original, env=Environment.PROD))
            monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
            with pg_server.connect() as conn:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(original), sql.Identifier(renamed))
                )
            dev = pg_server.settings(renamed, env=Environment.DEV)
            stamp = read_stamp(dev)
            assert stamp is not None and stamp.env is Environment.PROD and not stamp.is_copy
            with pytest.raises(EnvironmentMismatchError, match="stamped prod"):
                initialize_pool(settings=dev)
            with pytest.raises(ProductionAccessError, match="re-stamp the production database as dev"):
                stamp_database(settings=dev, force=True)
            restamped = read_stamp(dev)
            assert restamped is not None and restamped.env is Environment.PROD
            monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
            assert stamp_database(settings=dev, force=True).env is Environment.DEV
        finally:
            drop_database(pg_server, original)
            drop_database(pg_server, renamed)

    def test_copy_in_the_same_cluster_is_still_a_copy(self, pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        """CREATE DATABASE … TEMPLATE gets a new OID: a copy, re-stamped with force alone."""
        original = make_database(pg_server, f"chk_src_{UNIQUE}")
        copy = f"chk_copy_{UNIQUE}"
        try:
            monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
            stamp_database(settings=pg_server.settings(original, env=Environment.PROD))
            monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
            with pg_server.connect() as conn:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(copy), sql.Identifier(original))
                )
            dev = pg_server.settings(copy, env=Environment.DEV)
            stamp = read_stamp(dev)
            assert stamp is not None and stamp.is_copy and stamp.provably_another_database
            assert stamp_database(settings=dev, force=True).env is Environment.DEV
        finally:
            drop_database(pg_server, original)
            drop_database(pg_server, copy)

    def test_old_stamp_without_oid_is_treated_as_possibly_renamed(
        self, pg_server: Server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A prod stamp written before database_oid existed cannot prove a copy: re-stamping needs confirmation."""
        original = make_database(pg_server, f"chk_old_{UNIQUE}")
        try:
            monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
            stamp_database(settings=pg_server.settings(original, env=Environment.PROD))
            monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
            with pg_server.connect(original) as conn:
                conn.execute("ALTER TABLE precog_meta.stamp DROP COLUMN database_oid")
                conn.execute("UPDATE precog_meta.stamp SET dbname = 'chk_elsewhere'")
            with pytest.raises(ProductionAccessError, match="nothing proves it is a copy"):
                stamp_database(settings=pg_server.settings(original, env=Environment.DEV), force=True)
        finally:
            drop_database(pg_server, original)


def test_gated_call_cannot_borrow_from_a_hand_built_pool(pg_server: Server) -> None:
    """A staging pool built with create_pool and used directly inside a dev/test gate lends nothing."""
    name = make_database(pg_server, f"chk_staging3_{UNIQUE}", rows=2)
    try:
        settings = pg_server.settings(name, env=Environment.STAGING)
        stamp_database(settings=settings)
        pool = create_pool(settings, prod_confirmed=False)
        try:

            @dangerous_operation()
            def wipe_through_connection() -> None:
                with pool.connection() as conn:
                    conn.execute("TRUNCATE accounts")

            @dangerous_operation()
            def wipe_through_checkout() -> None:
                conn = pool.checkout()
                try:
                    with conn.transaction():
                        conn.execute("TRUNCATE accounts")
                finally:
                    pool.checkin(conn)

            for wipe in (wipe_through_connection, wipe_through_checkout):
                with pytest.raises(EnvironmentNotAllowedError, match="about to use a staging database"):
                    wipe()
            with pool.connection() as conn:
                row = conn.execute("SELECT count(*) FROM accounts").fetchone()
            assert row is not None and row[0] == 2
        finally:
            pool.close()
    finally:
        drop_database(pg_server, name)

"""The identity stamp on a real server: writing it, reading it, and every refusal at pool open."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from precog_db import (
    ConfigurationError,
    Environment,
    EnvironmentMismatchError,
    ProductionAccessError,
    RestoredCopyError,
    StampError,
    UnstampedDatabaseError,
    get_cursor,
    initialize_pool,
    read_stamp,
    stamp_database,
)
from precog_db._secrets import current_os_user
from precog_db.local.binaries import find_postgres_bindir
from precog_db.pool import active_pool, close_pool
from precog_db.stamp import TABLE, stamp_command
from tests._helpers.server import Server, start_throwaway_cluster

# Role and database names per outer xdist worker, in case they share a server (PRECOG_TEST_DSN).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
ROLE = f"stamp_app_{WORKER}"
PREFIX = f"stampdb_{WORKER}_"
ROLE_PASSWORD = "stamp-app-pw"  # the harness server trusts loopback; this only matters under PRECOG_TEST_DSN


def fresh(pg_server: Server) -> str:
    """A new, empty database with a unique neutral name."""
    return pg_server.fresh_database(f"{PREFIX}{uuid.uuid4().hex[:8]}")


def admin(pg_server: Server, dbname: str, query: str) -> list[tuple[object, ...]]:
    with pg_server.connect(dbname) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def system_identifier(pg_server: Server) -> int:
    return int(str(admin(pg_server, pg_server.admin_db, "SELECT system_identifier FROM pg_control_system()")[0][0]))


def has_meta_schema(pg_server: Server, dbname: str) -> bool:
    return bool(admin(pg_server, dbname, "SELECT to_regnamespace('precog_meta') IS NOT NULL")[0][0])


@pytest.fixture(scope="module")
def app_role(pg_server: Server) -> Iterator[str]:
    """An ordinary login role: not a superuser, no CREATE on databases."""
    with pg_server.connect() as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ROLE)))
        create = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
        conn.execute(create.format(sql.Identifier(ROLE), sql.Literal(ROLE_PASSWORD)))
    yield ROLE
    with pg_server.connect() as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (PREFIX,)).fetchall()
        for (name,) in rows:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ROLE)))


class TestWriting:
    def test_stamp_records_identity(self, pg_server: Server) -> None:
        """A stamp records env, OS user, role, time, database name and the cluster's system_identifier."""
        db = fresh(pg_server)
        written = stamp_database("test", settings=pg_server.settings(db))
        assert written.env is Environment.TEST
        assert written.dbname == db
        assert written.system_identifier == system_identifier(pg_server)
        assert written.stamped_by == current_os_user()
        assert written.stamped_role == pg_server.user
        assert not written.is_copy
        read = read_stamp(pg_server.settings(db))
        assert read == written
        rows = admin(pg_server, db, f"SELECT env, dbname FROM {TABLE}")
        assert rows == [("test", db)]

    def test_one_row_only(self, pg_server: Server) -> None:
        """The stamp table holds at most one row, whatever is inserted by hand."""
        db = fresh(pg_server)
        stamp_database("dev", settings=pg_server.settings(db, env=Environment.DEV))
        with pytest.raises(psycopg.errors.UniqueViolation):
            insert = f"INSERT INTO {TABLE} (env, dbname, stamped_by, library_version) VALUES ('prod', 'x', 'y', 'z')"
            admin(pg_server, db, insert)
        with pytest.raises(psycopg.errors.CheckViolation):
            admin(
                pg_server,
                db,
                f"INSERT INTO {TABLE} (singleton, env, dbname, stamped_by, library_version) "
                "VALUES (false, 'prod', 'x', 'y', 'z')",
            )

    def test_same_environment_refreshes_without_force(self, pg_server: Server) -> None:
        """Stamping again with the same environment needs no force and refreshes the time."""
        db = fresh(pg_server)
        first = stamp_database("test", settings=pg_server.settings(db))
        second = stamp_database("test", settings=pg_server.settings(db))
        assert second.env is Environment.TEST and second.stamped_at >= first.stamped_at
        assert admin(pg_server, db, f"SELECT count(*) FROM {TABLE}") == [(1,)]

    def test_other_environment_needs_force(self, pg_server: Server) -> None:
        """Replacing a stamp of another environment is refused without force=True, naming both."""
        db = fresh(pg_server)
        stamp_database("dev", settings=pg_server.settings(db, env=Environment.DEV))
        with pytest.raises(EnvironmentMismatchError, match=r"stamped dev .*stamping it test.*force=True") as info:
            stamp_database("test", settings=pg_server.settings(db))
        assert "precog-db --env test stamp --force" in str(info.value)
        assert admin(pg_server, db, f"SELECT env FROM {TABLE}") == [("dev",)]
        assert stamp_database("test", force=True, settings=pg_server.settings(db)).env is Environment.TEST

    def test_prod_needs_confirmation(self, pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        """Stamping prod goes through the production guard: nothing is written without confirmation."""
        db = fresh(pg_server)
        settings = pg_server.settings(db, env=Environment.PROD)
        with pytest.raises(ProductionAccessError, match="PRECOG_PROD_CONFIRMED=yes"):
            stamp_database("prod", settings=settings)
        assert not has_meta_schema(pg_server, db)
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        assert stamp_database("prod", settings=settings).env is Environment.PROD

    def test_restamping_real_prod_needs_confirmation(self, pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        """Re-stamping a (non-copy) prod database as anything else needs confirmation even with force."""
        db = fresh(pg_server)
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        stamp_database("prod", settings=pg_server.settings(db, env=Environment.PROD))
        monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
        with pytest.raises(ProductionAccessError, match="re-stamp the production database as dev"):
            stamp_database("dev", force=True, settings=pg_server.settings(db, env=Environment.DEV))
        assert admin(pg_server, db, f"SELECT env FROM {TABLE}") == [("prod",)]
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        restamped = stamp_database("dev", force=True, settings=pg_server.settings(db, env=Environment.DEV))
        assert restamped.env is Environment.DEV

    def test_env_and_settings_must_agree(self, pg_server: Server) -> None:
        """Passing an environment and settings for another one is a configuration error."""
        with pytest.raises(ConfigurationError, match="pass one or the other"):
            stamp_database("dev", settings=pg_server.settings("precog_test"))

    def test_role_without_create_gets_clear_error(self, pg_server: Server, app_role: str) -> None:
        """A role that may not create the schema gets a StampError that says who can stamp."""
        db = fresh(pg_server)
        settings = pg_server.settings(db, env=Environment.DEV, user=app_role, password=ROLE_PASSWORD)
        with pytest.raises(StampError, match="database owner or a superuser"):
            stamp_database("dev", settings=settings)
        assert not has_meta_schema(pg_server, db)

    def test_without_pg_control_system_records_null(self, pg_server: Server, app_role: str) -> None:
        """A role that cannot read pg_control_system() still stamps, recording no system identifier."""
        db = fresh(pg_server)
        admin(pg_server, db, "REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
        admin(pg_server, db, f"GRANT CREATE ON DATABASE {db} TO {app_role}")
        settings = pg_server.settings(db, env=Environment.DEV, user=app_role, password=ROLE_PASSWORD)
        with capture_logs() as logs:
            written = stamp_database("dev", settings=settings)
        assert written.system_identifier is None and written.stamped_role == app_role
        assert any(e["event"] == "stamp_without_system_identifier" for e in logs)
        initialize_pool(settings=settings)  # same name, no identifier to compare: not a copy
        assert active_pool() is not None


class TestCheckedAtPoolOpen:
    @pytest.mark.parametrize("env", [Environment.DEV, Environment.TEST])
    def test_unstamped_dev_and_test_open_with_warning(self, pg_server: Server, env: Environment) -> None:
        """An unstamped dev or test database opens, with a database_unstamped warning naming the fix."""
        db = fresh(pg_server)
        with capture_logs() as logs:
            initialize_pool(settings=pg_server.settings(db, env=env))
        warnings = [e for e in logs if e["event"] == "database_unstamped"]
        assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
        assert warnings[0]["fix"] == f"precog-db --env {env.value} stamp"

    @pytest.mark.parametrize("env", [Environment.STAGING, Environment.PROD])
    def test_unstamped_staging_and_prod_refused(
        self, pg_server: Server, env: Environment, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unstamped staging or prod database is refused with the command that stamps it."""
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        db = fresh(pg_server)
        with pytest.raises(UnstampedDatabaseError) as info:
            initialize_pool(settings=pg_server.settings(db, env=env))
        assert stamp_command(env) in str(info.value)
        assert f"precog-db --env {env.value} stamp" in str(info.value)
        assert active_pool() is None

    @pytest.mark.parametrize("env", [Environment.STAGING, Environment.PROD])
    def test_stamped_staging_and_prod_open(
        self, pg_server: Server, env: Environment, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A staging or prod database stamped with its own environment opens."""
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        db = fresh(pg_server)
        stamp_database(env, settings=pg_server.settings(db, env=env))
        initialize_pool(settings=pg_server.settings(db, env=env))
        with get_cursor() as cur:
            cur.execute("SELECT current_database() AS db")
            assert cur.fetchone() == {"db": db}

    @pytest.mark.parametrize(
        ("stamped", "opened"),
        [
            (Environment.PROD, Environment.TEST),
            (Environment.PROD, Environment.DEV),
            (Environment.STAGING, Environment.DEV),
            (Environment.TEST, Environment.STAGING),
            (Environment.DEV, Environment.TEST),
        ],
    )
    def test_other_environment_refused_naming_both(
        self, pg_server: Server, stamped: Environment, opened: Environment, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A database stamped with another environment is refused with EnvironmentMismatchError naming both."""
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        db = fresh(pg_server)
        stamp_database(stamped, settings=pg_server.settings(db, env=stamped))
        with pytest.raises(EnvironmentMismatchError) as info:
            initialize_pool(settings=pg_server.settings(db, env=opened))
        assert not isinstance(info.value, RestoredCopyError)
        message = str(info.value)
        assert f"stamped {stamped.value}" in message and f"resolved environment {opened.value}" in message
        assert active_pool() is None

    def test_checked_once_per_pool_not_per_checkout(self, pg_server: Server) -> None:
        """The stamp is read when a connection opens; checkouts do not re-read it, the next pool does."""
        db = fresh(pg_server)
        stamp_database("test", settings=pg_server.settings(db))
        initialize_pool(settings=pg_server.settings(db)).wait(timeout=10)  # its connection opened and checked
        stamp_database("dev", force=True, settings=pg_server.settings(db, env=Environment.DEV))
        with get_cursor() as cur:
            cur.execute("SELECT 1 AS one")
            assert cur.fetchone() == {"one": 1}
        close_pool()
        with pytest.raises(EnvironmentMismatchError, match="stamped dev"):
            initialize_pool(settings=pg_server.settings(db))

    def test_unreadable_stamp_is_refused(self, pg_server: Server, app_role: str) -> None:
        """A role that may not read the stamp is refused with the GRANT that fixes it, even in dev."""
        db = fresh(pg_server)
        stamp_database("dev", settings=pg_server.settings(db, env=Environment.DEV))
        admin(pg_server, db, f"REVOKE SELECT ON {TABLE} FROM PUBLIC")
        settings = pg_server.settings(db, env=Environment.DEV, user=app_role, password=ROLE_PASSWORD)
        with pytest.raises(StampError, match=f"GRANT SELECT ON {TABLE} TO {app_role}"):
            initialize_pool(settings=settings)


class TestCopies:
    def _stamped_prod(self, pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> str:
        db = fresh(pg_server)
        monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
        stamp_database("prod", settings=pg_server.settings(db, env=Environment.PROD))
        monkeypatch.delenv("PRECOG_PROD_CONFIRMED")
        return db

    def test_copy_in_same_cluster_is_refused_with_restamp_command(
        self, pg_server: Server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A prod database cloned under another name and opened as dev is a RestoredCopyError with the fix."""
        source = self._stamped_prod(pg_server, monkeypatch)
        copy = f"{PREFIX}{uuid.uuid4().hex[:8]}"
        admin(pg_server, pg_server.admin_db, f"CREATE DATABASE {copy} TEMPLATE {source}")
        dev = pg_server.settings(copy, env=Environment.DEV)
        with pytest.raises(RestoredCopyError) as info:
            initialize_pool(settings=dev)
        message = str(info.value)
        assert "restored copy" in message and f"stamped as database {source!r}" in message
        assert "precog-db --env dev stamp --force" in message
        # The fix works without production confirmation, because this is not production.
        assert stamp_database("dev", force=True, settings=dev).env is Environment.DEV
        initialize_pool(settings=dev)
        assert active_pool() is not None

    def test_copy_needs_force_to_restamp(self, pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        """Re-stamping a copy of another environment still needs force=True."""
        source = self._stamped_prod(pg_server, monkeypatch)
        copy = f"{PREFIX}{uuid.uuid4().hex[:8]}"
        admin(pg_server, pg_server.admin_db, f"CREATE DATABASE {copy} TEMPLATE {source}")
        with pytest.raises(EnvironmentMismatchError, match="force=True"):
            stamp_database("dev", settings=pg_server.settings(copy, env=Environment.DEV))

    def test_other_system_identifier_is_a_copy(self, pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        """A stamp whose system_identifier is not this cluster's marks the database as a copy."""
        db = self._stamped_prod(pg_server, monkeypatch)
        admin(pg_server, db, f"UPDATE {TABLE} SET system_identifier = system_identifier # 1")
        with pytest.raises(RestoredCopyError, match="system identifier"):
            initialize_pool(settings=pg_server.settings(db, env=Environment.TEST))

    def test_copy_of_same_environment_opens_with_warning(self, pg_server: Server) -> None:
        """A copy of a test database opened as test is allowed, with a database_copy_detected warning."""
        source = fresh(pg_server)
        stamp_database("test", settings=pg_server.settings(source))
        copy = f"{PREFIX}{uuid.uuid4().hex[:8]}"
        admin(pg_server, pg_server.admin_db, f"CREATE DATABASE {copy} TEMPLATE {source}")
        with capture_logs() as logs:
            initialize_pool(settings=pg_server.settings(copy))
        events = [e for e in logs if e["event"] == "database_copy_detected"]
        assert len(events) == 1 and events[0]["fix"] == "precog-db --env test stamp"

    @pytest.mark.slow
    def test_prod_dump_restored_on_another_cluster(
        self, pg_server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """pg_dump of a prod-stamped database, pg_restore'd under the same name on another cluster, is a copy."""
        bindir, _ = find_postgres_bindir()
        source = self._stamped_prod(pg_server, monkeypatch)
        dump = tmp_path / "prod.dump"
        subprocess.run(
            [str(bindir / "pg_dump"), "-Fc", "-f", str(dump), pg_server.conninfo(source)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        laptop = start_throwaway_cluster()
        try:
            laptop.create_database(source)
            subprocess.run(
                [str(bindir / "pg_restore"), "--no-owner", "-d", laptop.conninfo(source), str(dump)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            on_laptop = Server(host=laptop.host, port=laptop.port, user="postgres", password="", admin_db="postgres")
            dev = on_laptop.settings(source, env=Environment.DEV)

            with pytest.raises(RestoredCopyError) as info:
                initialize_pool(settings=dev)
            message = str(info.value)
            assert "stamped prod" in message and "restored copy" in message
            assert str(system_identifier(pg_server)) in message and str(system_identifier(on_laptop)) in message
            assert "precog-db --env dev stamp --force" in message

            # A prod process on the new cluster (a migrated server) opens it, with a warning.
            monkeypatch.setenv("PRECOG_PROD_CONFIRMED", "yes")
            with capture_logs() as logs:
                initialize_pool(settings=on_laptop.settings(source, env=Environment.PROD))
            assert any(e["event"] == "database_copy_detected" for e in logs)
            close_pool()
            monkeypatch.delenv("PRECOG_PROD_CONFIRMED")

            # The one command in the message fixes it for good, without production confirmation.
            restamped = stamp_database("dev", force=True, settings=dev)
            assert restamped.system_identifier == system_identifier(on_laptop) and not restamped.is_copy
            initialize_pool(settings=dev)
            with get_cursor() as cur:
                cur.execute(f"SELECT env FROM {TABLE}")
                assert cur.fetchone() == {"env": "dev"}
            close_pool()
        finally:
            laptop.destroy()
        # The original is untouched: still prod, still on its own cluster.
        assert admin(pg_server, source, f"SELECT env FROM {TABLE}") == [("prod",)]


class TestMessages:
    def test_stamp_command(self) -> None:
        """The command in messages includes the confirmation for prod and --force when needed."""
        assert stamp_command(Environment.STAGING) == "precog-db --env staging stamp"
        prod = stamp_command(Environment.PROD, force=True)
        assert prod == "PRECOG_PROD_CONFIRMED=yes precog-db --env prod stamp --force"
